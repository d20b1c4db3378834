//! Activations rounded to 8 bits per block of 32, each row on its own (as llama.cpp's
//! Q8_1): the scale is the block's largest magnitude over 127. With two limbs, a second
//! 8-bit value per activation holds the rounding residual in 1/256 steps, so that
//! `x ≈ scale · (256 · q + q2)`: about 15 bits of precision for twice the integer work.

use super::QK;

/// The residual limb's weight: the second limb counts 1/256 of the first's step.
pub const LIMB_SHIFT: u32 = 8;

/// `rows` rows of `k` activations, quantized.
pub struct Acts {
    pub k: usize,
    /// `[rows][k]` 8-bit values in -127..=127.
    pub q: Vec<i8>,
    /// `[rows][k]` residual limb in -127..=127; empty with one limb.
    pub q2: Vec<i8>,
    /// `[rows][k / 32]` the step of the combined integer (`amax / 127`, over 256 with
    /// two limbs).
    pub scale: Vec<f32>,
    /// `[rows][k / 32]` the step times the block's combined integer sum.
    pub sx: Vec<f32>,
    /// `[rows][k / 32]` the block's combined integer sum (`Σ q`, or `Σ (256 q + q2)`).
    pub qsum: Vec<i32>,
}

impl Acts {
    /// `rows` rows of `k` activations (`k` a multiple of 32), rounded per block; equal bit
    /// for bit to [`super::reference::quantize`], the definition.
    pub fn quantize(x: &[f32], rows: usize, k: usize, two_limbs: bool) -> Self {
        let blocks = rows * (k / QK);
        let mut q = vec![0; rows * k];
        let mut q2 = if two_limbs {
            vec![0; rows * k]
        } else {
            Vec::new()
        };
        let mut sums = Vec::with_capacity(blocks);
        let x = &x[..rows * k];
        if two_limbs {
            let limbs = q.chunks_exact_mut(QK).zip(q2.chunks_exact_mut(QK));
            for (xs, (q, q2)) in x.chunks_exact(QK).zip(limbs) {
                sums.push(two_limb_block(xs, q, q2));
            }
        } else {
            for (xs, q) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)) {
                sums.push(one_limb_block(xs, q));
            }
        }
        Acts {
            k,
            q,
            q2,
            scale: sums.iter().map(|&(step, _)| step).collect(),
            sx: sums.iter().map(|&(step, sum)| step * sum as f32).collect(),
            qsum: sums.iter().map(|&(_, sum)| sum).collect(),
        }
    }

    pub fn two_limbs(&self) -> bool {
        !self.q2.is_empty()
    }

    /// Row `r`'s four bytes of quad `j` of block `b` (of the residual limb if `second`),
    /// as one little-endian `i32`.
    #[inline(always)]
    pub fn quad(&self, second: bool, r: usize, b: usize, j: usize) -> i32 {
        let at = r * self.k + b * QK + j * 4;
        let q = if second {
            &self.q2[at..at + 4]
        } else {
            &self.q[at..at + 4]
        };
        i32::from_le_bytes([q[0] as u8, q[1] as u8, q[2] as u8, q[3] as u8])
    }

    /// Index of row `r`'s block `b` in `scale`, `sx` and `qsum`.
    #[inline(always)]
    pub fn block(&self, r: usize, b: usize) -> usize {
        r * (self.k / QK) + b
    }
}

// The per-block work below is written for the compiler to vectorize: no saturating
// float-to-integer conversion and no running `f32::max`, which kept the first version of
// this loop scalar, an eighth of a decode step at 8 streams on the default model.

/// A block's step (its largest magnitude over 127) and the step's inverse (0 for a block of
/// zeros). The magnitudes are compared as integers, which orders non-negative floats as
/// floats and has a vector maximum that may be taken in any order; NaN is skipped, as a
/// running `f32::max` does.
#[inline(always)]
fn steps(xs: &[f32]) -> (f32, f32) {
    const NAN_ABOVE: u32 = 0x7f80_0000; // infinity's bits: anything above is NaN
    let mut lanes = [0u32; 8];
    for chunk in xs.chunks_exact(lanes.len()) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            let b = v.to_bits() & !(1 << 31);
            *m = (*m).max(if b > NAN_ABOVE { 0 } else { b });
        }
    }
    let amax = f32::from_bits(lanes.into_iter().fold(0, u32::max));
    let d = amax / 127.0;
    (d, if d > 0.0 { 1.0 / d } else { 0.0 })
}

/// 1.5 · 2^23: an integer-valued float under 2^22 in magnitude plus this has the integer
/// in its low mantissa bits.
const MAGIC: f32 = 12_582_912.0;

/// `v` rounded half away from zero and clamped to -127..=127; NaN gives 0. The integer is
/// read from the bits of a sum rather than converted with `as`, whose saturating
/// semantics keep the loop scalar.
#[inline(always)]
fn round_clamped(v: f32) -> i32 {
    let r = if v.is_nan() {
        0.0
    } else {
        v.clamp(-127.0, 127.0).round()
    };
    (r + MAGIC).to_bits() as i32 - MAGIC.to_bits() as i32
}

/// One block of one limb: `(step, Σ q)`.
#[inline(always)]
fn one_limb_block(xs: &[f32], q: &mut [i8]) -> (f32, i32) {
    let (d, id) = steps(xs);
    let mut sum = 0;
    for (q, &v) in q.iter_mut().zip(xs) {
        let hi = round_clamped(v * id);
        *q = hi as i8;
        sum += hi;
    }
    (d, sum)
}

/// One block of two limbs: `(step, Σ (256 q + q2))`, the residual limb rounding what the
/// first left, in 1/256 steps.
#[inline(always)]
fn two_limb_block(xs: &[f32], q: &mut [i8], q2: &mut [i8]) -> (f32, i32) {
    let (d, id) = steps(xs);
    let limb = (1 << LIMB_SHIFT) as f32;
    let mut sum = 0;
    for ((q, q2), &v) in q.iter_mut().zip(q2.iter_mut()).zip(xs) {
        let scaled = v * id;
        let hi = round_clamped(scaled);
        let lo = round_clamped((scaled - hi as f32) * limb);
        *q = hi as i8;
        *q2 = lo as i8;
        sum += (hi << LIMB_SHIFT) + lo;
    }
    (d / limb, sum)
}
