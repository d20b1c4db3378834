//! Projection weights kept in the file's quantized blocks (Q4_1, Q8_0), repacked into
//! strips of 64 output columns, and multiplied with f32 activations by dequantizing one
//! strip at a time into a small f32 buffer.
//!
//! Why: candle's quantized matmul rounds activations to 8 bits (enough to derail a 135M
//! model's answers) and costs the same per row at any batch size, while its f32 gemm
//! needs 4 bytes per weight and repacks the weight on every call. Here the weights stay
//! at ~0.63 bytes each, activations stay f32, and a dequantized strip is reused by every
//! row of the step.
//!
//! Row independence: every output element is one fused multiply-add chain over `k` in
//! the same order, whatever the row count and however rows are tiled, so a row's result
//! is bit-identical alone and in any batch (tests below check it).

use std::cell::RefCell;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::Result;
pub use crate::strips::STRIP;
use crate::strips::{by_strips, dense_rows, stacked_shape};

/// Columns per accumulator group (two 8-lane registers).
const LANES: usize = 16;
/// ggml's block length along `k`.
const QK: usize = 32;
/// Rows per full tile of the kernel. With AVX-512 (32 vector registers, 16 lanes each)
/// a full tile is 6 rows × 64 columns = 24 accumulators; with AVX2 (16 registers of 8
/// lanes) 6 rows × 16 columns = 12.
const TILE_ROWS: usize = 6;

thread_local! {
    /// Each compute thread's dequantized strip, kept between calls so that it is neither
    /// allocated nor zeroed per task.
    static STRIP_BUF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The weight bytes, strip by strip. `kb = k / 32` blocks per column.
enum Blocks {
    /// Per (strip, block): 32 rows of 32 bytes (byte `c` holds column `c` in its low
    /// nibble and column `c + 32` in its high nibble); scales `d` and mins `m` per column,
    /// f16 as in the file (0.625 bytes per weight in all).
    Q4_1 {
        q: Vec<u8>,
        d: Vec<f16>,
        m: Vec<f16>,
    },
    /// Per (strip, block): 32 rows of 64 signed bytes; scales `d` per column.
    Q8_0 { q: Vec<i8>, d: Vec<f16> },
    /// Any other type, dequantized once: per strip, `k` rows of 64 floats.
    F32 { w: Vec<f32> },
}

/// A `[n, k]` weight for `y = x · wᵀ`.
pub struct PackedLinear {
    n: usize,
    k: usize,
    strips: usize,
    blocks: Blocks,
}

impl PackedLinear {
    /// Packs the row-wise stack of `parts` (`[n_i, k]` each, e.g. q, k and v).
    pub fn from_parts(parts: &[QTensor]) -> Result<Self> {
        let (dtype, n, k) = stacked_shape(parts)?;
        let same_type = parts.iter().all(|p| p.dtype() == dtype);
        if same_type && matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0) && k % QK == 0 {
            let mut bytes = Vec::new();
            for p in parts {
                bytes.extend_from_slice(&p.data()?);
            }
            return Ok(Self::from_blocks(dtype, &bytes, n, k));
        }
        let dense = dense_rows(parts)?;
        // Other block formats (k-quants, Q5_0…) are re-blocked as Q8_0: within 1/254 of
        // each block's largest weight of the file's values, at a quarter of f32's bytes.
        let reblock = parts.iter().any(|p| {
            !matches!(
                p.dtype(),
                GgmlDType::Q4_1
                    | GgmlDType::Q8_0
                    | GgmlDType::F32
                    | GgmlDType::F16
                    | GgmlDType::BF16
            )
        });
        if reblock && k % QK == 0 {
            let t = candle_core::Tensor::from_vec(dense, (n, k), &Device::Cpu)?;
            let q8 = QTensor::quantize(&t, GgmlDType::Q8_0)?;
            return Ok(Self::from_blocks(GgmlDType::Q8_0, &q8.data()?, n, k));
        }
        Ok(Self::from_dense(&dense, n, k))
    }

    /// `(n, k)`: output and input widths.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Packs a row-major `[n, k]` f32 matrix.
    pub fn from_dense(w: &[f32], n: usize, k: usize) -> Self {
        let strips = n.div_ceil(STRIP);
        let mut out = vec![0.0; strips * k * STRIP];
        for (col, row) in w.chunks_exact(k).enumerate() {
            let (s, c) = (col / STRIP, col % STRIP);
            for (kk, &v) in row.iter().enumerate() {
                out[(s * k + kk) * STRIP + c] = v;
            }
        }
        Self {
            n,
            k,
            strips,
            blocks: Blocks::F32 { w: out },
        }
    }

    /// Repacks ggml blocks (row-major: each of the `n` rows is `k / 32` blocks).
    fn from_blocks(dtype: GgmlDType, bytes: &[u8], n: usize, k: usize) -> Self {
        let (kb, strips) = (k / QK, n.div_ceil(STRIP));
        let groups = strips * kb;
        let half = |b: &[u8]| f16::from_le_bytes([b[0], b[1]]);
        let blocks = match dtype {
            GgmlDType::Q4_1 => {
                const SIZE: usize = 20;
                let (mut q, mut d, mut m) = (
                    vec![0u8; groups * QK * 32],
                    vec![f16::ZERO; groups * STRIP],
                    vec![f16::ZERO; groups * STRIP],
                );
                for (col, row) in bytes.chunks_exact(kb * SIZE).enumerate().take(n) {
                    let (s, c) = (col / STRIP, col % STRIP);
                    for (b, block) in row.chunks_exact(SIZE).enumerate() {
                        let g = s * kb + b;
                        d[g * STRIP + c] = half(&block[0..2]);
                        m[g * STRIP + c] = half(&block[2..4]);
                        let qs = &block[4..SIZE];
                        for j in 0..QK {
                            let v = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                            let at = (g * QK + j) * 32 + c % 32;
                            q[at] |= if c < 32 { v } else { v << 4 };
                        }
                    }
                }
                Blocks::Q4_1 { q, d, m }
            }
            _ => {
                const SIZE: usize = 34;
                let (mut q, mut d) = (
                    vec![0i8; groups * QK * STRIP],
                    vec![f16::ZERO; groups * STRIP],
                );
                for (col, row) in bytes.chunks_exact(kb * SIZE).enumerate().take(n) {
                    let (s, c) = (col / STRIP, col % STRIP);
                    for (b, block) in row.chunks_exact(SIZE).enumerate() {
                        let g = s * kb + b;
                        d[g * STRIP + c] = half(&block[0..2]);
                        for j in 0..QK {
                            q[(g * QK + j) * STRIP + c] = block[2 + j] as i8;
                        }
                    }
                }
                Blocks::Q8_0 { q, d }
            }
        };
        Self {
            n,
            k,
            strips,
            blocks,
        }
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn cols(&self) -> usize {
        self.k
    }

    /// `x · wᵀ` for `x`: `[rows, k]` row-major. Returns `[rows, n]`.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let k = self.k;
        debug_assert_eq!(x.len(), rows * k);
        if rows == 0 {
            return Vec::new();
        }
        let tiles = pack_tiles(x, rows, k);
        by_strips(self.strips, rows, self.n, |s, out| {
            STRIP_BUF.with_borrow_mut(|wbuf| {
                let w = self.strip(s, wbuf);
                for t in &tiles {
                    run_tile(t.rows, &t.x, w, &mut out[t.first * STRIP..]);
                }
            })
        })
    }

    /// Strip `s` as `[k][STRIP]` floats: borrowed when stored dense, else dequantized
    /// into `buf`.
    fn strip<'a>(&'a self, s: usize, buf: &'a mut Vec<f32>) -> &'a [f32] {
        let (k, kb) = (self.k, self.k / QK);
        match &self.blocks {
            Blocks::F32 { w } => &w[s * k * STRIP..][..k * STRIP],
            Blocks::Q4_1 { q, d, m } => {
                buf.resize(k * STRIP, 0.0);
                for (b, rows) in buf.chunks_exact_mut(QK * STRIP).enumerate() {
                    let g = s * kb + b;
                    let (mut df, mut mf) = ([0.0f32; STRIP], [0.0f32; STRIP]);
                    d[g * STRIP..][..STRIP].convert_to_f32_slice(&mut df);
                    m[g * STRIP..][..STRIP].convert_to_f32_slice(&mut mf);
                    let (d, m) = (&df, &mf);
                    let q = &q[g * QK * 32..][..QK * 32];
                    for (row, qrow) in rows.chunks_exact_mut(STRIP).zip(q.chunks_exact(32)) {
                        dequant_q4_row(row, qrow, d, m);
                    }
                }
                buf
            }
            Blocks::Q8_0 { q, d } => {
                buf.resize(k * STRIP, 0.0);
                for (b, rows) in buf.chunks_exact_mut(QK * STRIP).enumerate() {
                    let g = s * kb + b;
                    let mut df = [0.0f32; STRIP];
                    d[g * STRIP..][..STRIP].convert_to_f32_slice(&mut df);
                    let d = &df;
                    let q = &q[g * QK * STRIP..][..QK * STRIP];
                    for (row, qrow) in rows.chunks_exact_mut(STRIP).zip(q.chunks_exact(STRIP)) {
                        for ((w, &q), &d) in row.iter_mut().zip(qrow).zip(d) {
                            *w = f32::from(q) * d;
                        }
                    }
                }
                buf
            }
        }
    }
}

/// One `k` row of a Q4_1 strip: `d * q + m` per column, fused.
#[inline]
fn dequant_q4_row(row: &mut [f32], q: &[u8], d: &[f32], m: &[f32]) {
    let (lo, hi) = row.split_at_mut(32);
    let (dlo, dhi) = d.split_at(32);
    let (mlo, mhi) = m.split_at(32);
    for i in 0..32 {
        lo[i] = f32::from(q[i] & 0xF).mul_add(dlo[i], mlo[i]);
        hi[i] = f32::from(q[i] >> 4).mul_add(dhi[i], mhi[i]);
    }
}

/// A group of consecutive rows, transposed to `[k][rows]` so the kernel reads one
/// contiguous run of `rows` activations per `k`.
struct Tile {
    first: usize,
    rows: usize,
    x: Vec<f32>,
}

fn pack_tiles(x: &[f32], rows: usize, k: usize) -> Vec<Tile> {
    (0..rows)
        .step_by(TILE_ROWS)
        .map(|first| {
            let n = TILE_ROWS.min(rows - first);
            let mut t = vec![0.0; k * n];
            for r in 0..n {
                let src = &x[(first + r) * k..][..k];
                for (kk, &v) in src.iter().enumerate() {
                    t[kk * n + r] = v;
                }
            }
            Tile {
                first,
                rows: n,
                x: t,
            }
        })
        .collect()
}

/// Multiplies one tile by one dequantized strip into `out` (`[rows][STRIP]`). Fewer rows
/// take wider column groups so that every kernel keeps 8 to 12 independent accumulator
/// chains in flight (a lone chain would wait on FMA latency).
fn run_tile(rows: usize, xt: &[f32], w: &[f32], out: &mut [f32]) {
    if cfg!(target_feature = "avx512f") {
        match rows {
            1 => columns::<1, 4>(xt, w, out),
            2 => columns::<2, 4>(xt, w, out),
            3 => columns::<3, 4>(xt, w, out),
            4 => columns::<4, 4>(xt, w, out),
            5 => columns::<5, 4>(xt, w, out),
            _ => columns::<TILE_ROWS, 4>(xt, w, out),
        }
    } else {
        match rows {
            1 => columns::<1, 4>(xt, w, out),
            2 => columns::<2, 2>(xt, w, out),
            3 => columns::<3, 2>(xt, w, out),
            4 => columns::<4, 1>(xt, w, out),
            5 => columns::<5, 1>(xt, w, out),
            _ => columns::<TILE_ROWS, 1>(xt, w, out),
        }
    }
}

fn columns<const R: usize, const P: usize>(xt: &[f32], w: &[f32], out: &mut [f32]) {
    for col0 in (0..STRIP).step_by(P * LANES) {
        kernel::<R, P>(xt, w, col0, out);
    }
}

/// `out[r][col0 + c] = Σ_k xt[k][r] · w[k][col0 + c]` for `R` rows and `P · 16` columns,
/// one fused multiply-add chain per output element, `k` in ascending order.
#[inline(always)]
fn kernel<const R: usize, const P: usize>(xt: &[f32], w: &[f32], col0: usize, out: &mut [f32]) {
    let mut acc = [[[0.0f32; LANES]; P]; R];
    for (xs, wrow) in xt.chunks_exact(R).zip(w.chunks_exact(STRIP)) {
        let Some(wrow) = wrow.get(col0..col0 + P * LANES) else {
            return;
        };
        for r in 0..R {
            let xv = xs[r];
            for p in 0..P {
                let wp = &wrow[p * LANES..(p + 1) * LANES];
                for c in 0..LANES {
                    acc[r][p][c] = xv.mul_add(wp[c], acc[r][p][c]);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        for (p, acc) in acc.iter().enumerate() {
            out[r * STRIP + col0 + p * LANES..][..LANES].copy_from_slice(acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    fn reference(x: &[f32], w: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0; rows * n];
        for r in 0..rows {
            for c in 0..n {
                let dot: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i]))
                    .sum();
                y[r * n + c] = dot as f32;
            }
        }
        y
    }

    fn quantized(w: &[f32], n: usize, k: usize, dtype: GgmlDType) -> (QTensor, Vec<f32>) {
        let t = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&t, dtype).unwrap();
        let dense = q.dequantize(&Device::Cpu).unwrap();
        (q, dense.flatten_all().unwrap().to_vec1().unwrap())
    }

    /// Packed results match a f64 reference over the same dequantized weights, for
    /// each storage kind, with a column count that is not a multiple of the strip.
    #[test]
    fn matches_dense_reference() {
        let (n, k, rows) = (80, 96, 9);
        let x = random(rows * k, 1);
        let w = random(n * k, 2);
        for dtype in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::F32,
        ] {
            let (q, mut dense) = quantized(&w, n, k, dtype);
            if dtype == GgmlDType::Q4_0 {
                // Other block formats are re-blocked as Q8_0 of their values.
                dense = quantized(&dense, n, k, GgmlDType::Q8_0).1;
            }
            let packed = PackedLinear::from_parts(&[q]).unwrap();
            let got = packed.forward(&x, rows);
            let want = reference(&x, &dense, rows, n, k);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{dtype:?}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn stacked_parts_equal_separate_parts() {
        let k = 64;
        let (a, b) = (random(48 * k, 3), random(16 * k, 4));
        let (qa, _) = quantized(&a, 48, k, GgmlDType::Q4_1);
        let (qb, _) = quantized(&b, 16, k, GgmlDType::Q4_1);
        let x = random(2 * k, 5);
        let both = PackedLinear::from_parts(&[qa, qb]).unwrap().forward(&x, 2);
        let (qa, _) = quantized(&a, 48, k, GgmlDType::Q4_1);
        let (qb, _) = quantized(&b, 16, k, GgmlDType::Q4_1);
        let ya = PackedLinear::from_parts(&[qa]).unwrap().forward(&x, 2);
        let yb = PackedLinear::from_parts(&[qb]).unwrap().forward(&x, 2);
        for r in 0..2 {
            assert_eq!(both[r * 64..r * 64 + 48], ya[r * 48..(r + 1) * 48]);
            assert_eq!(both[r * 64 + 48..(r + 1) * 64], yb[r * 16..(r + 1) * 16]);
        }
    }

    /// A row's output is bit-identical whether it runs alone or at any place in a
    /// batch of any size: the property that keeps requests independent of each other.
    #[test]
    fn rows_are_independent_of_batch_size() {
        let (n, k) = (128, 64);
        let (q, _) = quantized(&random(n * k, 6), n, k, GgmlDType::Q4_1);
        let packed = PackedLinear::from_parts(&[q]).unwrap();
        let probe = random(k, 7);
        let alone = packed.forward(&probe, 1);
        for rows in 1..=14 {
            for at in 0..rows {
                let mut x = random(rows * k, 8 + rows as u64);
                x[at * k..(at + 1) * k].copy_from_slice(&probe);
                let y = packed.forward(&x, rows);
                assert_eq!(y[at * n..(at + 1) * n], alone[..], "row {at} of {rows}");
            }
        }
    }
}
