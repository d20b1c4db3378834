//! Repacking ggml blocks (each of `n` rows is `k / 32` blocks) into the kernels' layout.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use half::f16;

use super::{Format, GROUP, GROUPS, QK, STRIP};
use crate::error::Result;
use crate::strips::{dense_rows, stacked_shape};

pub struct Packed {
    pub n: usize,
    pub k: usize,
    pub format: Format,
    pub q: Vec<u8>,
    pub d: Vec<f16>,
    pub m: Vec<f16>,
}

/// The row-wise stack of `parts`; `None` for float weights or widths not a multiple of 32.
pub fn from_parts(parts: &[QTensor]) -> Result<Option<Packed>> {
    let (dtype, n, k) = stacked_shape(parts)?;
    let float = |t: GgmlDType| matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    if k % QK != 0 || parts.iter().any(|p| float(p.dtype())) {
        return Ok(None);
    }
    let same = |t: GgmlDType| parts.iter().all(|p| p.dtype() == t);
    let mut bytes = Vec::new();
    if same(GgmlDType::Q4_1) || same(GgmlDType::Q8_0) {
        for p in parts {
            bytes.extend_from_slice(&p.data()?);
        }
        return Ok(Some(if dtype == GgmlDType::Q4_1 {
            q4_1(&bytes, n, k)
        } else {
            q8_0(&bytes, n, k)
        }));
    }
    // Other block formats (k-quants, Q5_0…) are re-blocked as Q8_0 of their values.
    let t = Tensor::from_vec(dense_rows(parts)?, (n, k), &Device::Cpu)?;
    let q8 = QTensor::quantize(&t, GgmlDType::Q8_0)?;
    Ok(Some(q8_0(&q8.data()?, n, k)))
}

fn half(b: &[u8]) -> f16 {
    f16::from_le_bytes([b[0], b[1]])
}

/// Where column `col`'s weight `j` (0..32) of block `b` lives: (strip, block-group
/// index, position in the group's bytes or nibble pair, high nibble?).
fn place(format: Format, col: usize, b: usize, kb: usize, j: usize) -> (usize, bool) {
    let (s, c) = (col / STRIP, col % STRIP);
    let (g, cc) = (c / GROUP, c % GROUP);
    let group = (s * kb + b) * GROUPS + g;
    let (quad, i) = (j / 4, j % 4);
    match format {
        Format::Q4 => {
            let at = group * format.group_bytes() + (quad % 4) * 64 + cc * 4 + i;
            (at, quad >= 4)
        }
        Format::Q8 => (group * format.group_bytes() + quad * 64 + cc * 4 + i, false),
    }
}

fn empty(format: Format, n: usize, k: usize) -> Packed {
    let (kb, strips) = (k / QK, n.div_ceil(STRIP));
    let scales = strips * kb * STRIP;
    Packed {
        n,
        k,
        format,
        q: vec![0; strips * kb * GROUPS * format.group_bytes()],
        d: vec![f16::ZERO; scales],
        m: match format {
            Format::Q4 => vec![f16::ZERO; scales],
            Format::Q8 => Vec::new(),
        },
    }
}

/// Q4_1 blocks: `d`, `m` (f16), 16 bytes: weight `j` is the low nibble of byte `j` for
/// `j < 16`, else the high nibble of byte `j - 16`.
fn q4_1(bytes: &[u8], n: usize, k: usize) -> Packed {
    const SIZE: usize = 20;
    let kb = k / QK;
    let mut p = empty(Format::Q4, n, k);
    for (col, row) in bytes.chunks_exact(kb * SIZE).enumerate().take(n) {
        for (b, block) in row.chunks_exact(SIZE).enumerate() {
            let at = ((col / STRIP) * kb + b) * STRIP + col % STRIP;
            p.d[at] = half(&block[0..2]);
            p.m[at] = half(&block[2..4]);
            let qs = &block[4..SIZE];
            for j in 0..QK {
                let v = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                let (at, high) = place(Format::Q4, col, b, kb, j);
                p.q[at] |= if high { v << 4 } else { v };
            }
        }
    }
    p
}

/// Q8_0 blocks: `d` (f16), 32 signed bytes; stored as `q + 128`.
fn q8_0(bytes: &[u8], n: usize, k: usize) -> Packed {
    const SIZE: usize = 34;
    let kb = k / QK;
    let mut p = empty(Format::Q8, n, k);
    for (col, row) in bytes.chunks_exact(kb * SIZE).enumerate().take(n) {
        for (b, block) in row.chunks_exact(SIZE).enumerate() {
            p.d[((col / STRIP) * kb + b) * STRIP + col % STRIP] = half(&block[0..2]);
            for j in 0..QK {
                let (at, _) = place(Format::Q8, col, b, kb, j);
                p.q[at] = block[2 + j] ^ 0x80;
            }
        }
    }
    p
}

/// Column `c`'s (0..64) stored weight `j` of block `b` in one strip's bytes: the
/// reference kernel's view of the layout.
pub fn weight(format: Format, q: &[u8], kb: usize, b: usize, c: usize, j: usize) -> u8 {
    let (at, high) = place(format, c, b, kb, j);
    let v = q[at];
    match (format, high) {
        (Format::Q4, false) => v & 0xF,
        (Format::Q4, true) => v >> 4,
        (Format::Q8, _) => v,
    }
}
