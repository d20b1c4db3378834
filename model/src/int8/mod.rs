//! Projection weights kept as unsigned 4/8-bit integers per 32-long block, multiplied with
//! activations rounded to 8 bits per block (llama.cpp's method, `--weights packed-int8`)
//! or to two 8-bit limbs per activation (~15 bits, `--weights packed-int16`, the
//! default): integer dot products over each block, one float scale step per block.
//!
//! Why: one token's decode step at batch 1 was bound by turning every weight into an f32
//! ([`crate::packed`]); an integer multiply-add instruction does four weights per lane
//! (`vpdpbusd` with AVX-512 VNNI, `vpmaddubsw` with AVX2) and nothing is written back.
//! The price is rounded activations, measured in benches/RESULTS.md (perplexity): one
//! 8-bit limb flips knife-edge greedy choices as llama.cpp's kernels do; the second limb
//! (twice the integer work) keeps them to the f32 path's.
//!
//! The kernels (one module per instruction set, picked at run time, and a safe scalar
//! reference every one of them must equal bit for bit):
//! - [`reference`]: plain Rust, the definition of the result;
//! - [`avx512`]: AVX-512 with VNNI (Zen 4, Sapphire Rapids and later);
//! - [`avx2`]: AVX2 + FMA + F16C (Zen 3, Haswell and later).
//!
//! Layout, per strip of 64 output columns and block `b` of 32 inputs, per group of 16
//! columns: vector `v` holds, for each column `c`, four consecutive inputs (`c * 4 + i`)
//! of "quad" `v`, so one 32-bit lane is one column's four weights, which is what
//! `vpdpbusd`/`vpmaddubsw` multiply with four broadcast activation bytes.
//! - Q4 (from Q4_1): 4 vectors of 64 bytes; the low nibbles are quads 0-3, the high
//!   nibbles quads 4-7; per column a scale `d` and a minimum `m` (f16, as in the file).
//! - Q8 (from Q8_0 and re-blocked formats): 8 vectors, each weight stored as `q + 128`
//!   (unsigned, as `vpdpbusd` wants), with `m = -128 d` folding the offset back.
//!
//! Per block and column, with `u` the stored weights, `X` the row's activations as
//! integers (`qx`, or `256 qx + qx2` with two limbs), `step` their scale and
//! `sx = step · Σ X`: `acc = fma(d, (Σ u·X) · step, acc); acc = fma(m, sx, acc)`, blocks
//! in ascending order.
//! Every kernel does exactly these float operations, so results are bit-identical across
//! kernels and a row's result never depends on the rows beside it.

mod acts;
// The SIMD kernels: the only `unsafe` here, every block with a `// SAFETY:` comment.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx512;
mod pack;
mod reference;

use std::sync::OnceLock;

use candle_core::quantized::QTensor;
use half::f16;

pub use acts::Acts;

use crate::error::Result;
use crate::strips::by_strips;

pub use crate::strips::STRIP;
/// Columns per group: one 512-bit vector of 32-bit lanes.
const GROUP: usize = 16;
const GROUPS: usize = STRIP / GROUP;
/// ggml's block length along `k`.
const QK: usize = 32;

/// The stored weight format of a strip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4,
    Q8,
}

impl Format {
    /// Bytes of one (block, group): 16 columns × 32 weights.
    const fn group_bytes(self) -> usize {
        match self {
            Self::Q4 => GROUP * QK / 2,
            Self::Q8 => GROUP * QK,
        }
    }
}

/// One strip's weights as the kernels read them.
pub struct Strip<'a> {
    pub format: Format,
    /// `kb` blocks × 4 groups × `group_bytes`.
    pub q: &'a [u8],
    /// Per block, 64 column scales.
    pub d: &'a [f16],
    /// Per block, 64 column minimums (Q4 only; Q8's is `-128 d`).
    pub m: &'a [f16],
}

/// The instruction sets a kernel exists for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    Avx512Vnni,
}

impl Isa {
    /// Every kernel this machine can run, the reference first.
    pub fn available() -> Vec<Isa> {
        let mut out = vec![Isa::Scalar];
        #[cfg(target_arch = "x86_64")]
        {
            if avx2::supported() {
                out.push(Isa::Avx2);
            }
            if avx512::supported() {
                out.push(Isa::Avx512Vnni);
            }
        }
        out
    }

    /// The fastest kernel this machine can run, detected once.
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| *Self::available().last().unwrap_or(&Isa::Scalar))
    }

    /// Rows per tile: how many rows share each loaded weight vector.
    fn tile_rows(self) -> usize {
        match self {
            Isa::Scalar => 1,
            Isa::Avx2 => 2,
            Isa::Avx512Vnni => 4,
        }
    }
}

/// `out[r][c] += Σ_k x[first + r][k] · w[k][c]` for `rows` rows (at most the ISA's tile)
/// and the strip's 64 columns; `out` is `[rows][STRIP]`, zeroed by the caller.
pub fn run_tile(isa: Isa, strip: &Strip, x: &Acts, first: usize, rows: usize, out: &mut [f32]) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512Vnni if avx512::supported() => avx512::tile(strip, x, first, rows, out),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if avx2::supported() => avx2::tile(strip, x, first, rows, out),
        _ => reference::tile(strip, x, first, rows, out),
    }
}

/// The lengths the kernels read within, checked once per tile.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn check(strip: &Strip, x: &Acts, first: usize, rows: usize, out: &[f32]) {
    let kb = strip.d.len() / STRIP;
    assert_eq!(strip.d.len(), kb * STRIP);
    assert_eq!(strip.q.len(), kb * GROUPS * strip.format.group_bytes());
    if strip.format == Format::Q4 {
        assert_eq!(strip.m.len(), kb * STRIP);
    }
    assert_eq!(x.k, kb * QK);
    assert!(x.q.len() >= (first + rows) * x.k);
    assert!(x.scale.len() >= (first + rows) * kb && x.sx.len() >= (first + rows) * kb);
    if x.two_limbs() {
        assert_eq!(x.q2.len(), x.q.len());
    }
    assert!(x.qsum.len() >= (first + rows) * kb);
    assert!(out.len() >= rows * STRIP);
}

/// A `[n, k]` weight for `y = x · wᵀ` with 8-bit activations.
pub struct Int8Linear {
    n: usize,
    k: usize,
    strips: usize,
    format: Format,
    q: Vec<u8>,
    d: Vec<f16>,
    m: Vec<f16>,
    isa: Isa,
    two_limbs: bool,
}

impl Int8Linear {
    /// Packs the row-wise stack of `parts` (`[n_i, k]` each, e.g. q, k and v), or `None`
    /// where the weights are not block-quantized (f32/f16 files keep f32 kernels);
    /// `two_limbs`: activations keep a residual limb (~15 bits instead of 8).
    pub fn from_parts(parts: &[QTensor], two_limbs: bool) -> Result<Option<Self>> {
        let Some(packed) = pack::from_parts(parts)? else {
            return Ok(None);
        };
        Ok(Some(Self {
            n: packed.n,
            k: packed.k,
            strips: packed.n.div_ceil(STRIP),
            format: packed.format,
            q: packed.q,
            d: packed.d,
            m: packed.m,
            isa: Isa::best(),
            two_limbs,
        }))
    }

    /// The same weights multiplied by another kernel (tests and benchmarks).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// `(n, k)`: output and input widths.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    fn strip(&self, s: usize) -> Strip<'_> {
        let kb = self.k / QK;
        let bytes = kb * GROUPS * self.format.group_bytes();
        let scales = kb * STRIP;
        Strip {
            format: self.format,
            q: &self.q[s * bytes..][..bytes],
            d: &self.d[s * scales..][..scales],
            m: match self.format {
                Format::Q4 => &self.m[s * scales..][..scales],
                Format::Q8 => &[],
            },
        }
    }

    /// `x · wᵀ` for `x`: `[rows, k]` row-major. Returns `[rows, n]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.k);
        if rows == 0 {
            return Vec::new();
        }
        let acts = Acts::quantize(x, rows, self.k, self.two_limbs);
        let tile = self.isa.tile_rows();
        by_strips(self.strips, rows, self.n, |s, out| {
            let strip = self.strip(s);
            for first in (0..rows).step_by(tile) {
                let n = tile.min(rows - first);
                let out = &mut out[first * STRIP..][..n * STRIP];
                run_tile(self.isa, &strip, &acts, first, n, out);
            }
        })
    }
}

#[cfg(test)]
mod tests;
