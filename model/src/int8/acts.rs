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
    pub fn quantize(x: &[f32], rows: usize, k: usize, two_limbs: bool) -> Self {
        let blocks = rows * (k / QK);
        let mut out = Acts {
            k,
            q: vec![0; rows * k],
            q2: if two_limbs {
                vec![0; rows * k]
            } else {
                Vec::new()
            },
            scale: Vec::with_capacity(blocks),
            sx: Vec::with_capacity(blocks),
            qsum: Vec::with_capacity(blocks),
        };
        let limb = (1 << LIMB_SHIFT) as f32;
        for (b, xs) in x.chunks_exact(QK).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let mut sum = 0i32;
            for (i, &v) in xs.iter().enumerate() {
                let at = b * QK + i;
                let scaled = v * id;
                // `as` saturates (and maps NaN to 0): never outside -127..=127 here.
                let q = scaled.round().clamp(-127.0, 127.0);
                out.q[at] = q as i8;
                if two_limbs {
                    let q2 = ((scaled - q) * limb).round().clamp(-127.0, 127.0) as i8;
                    out.q2[at] = q2;
                    sum += (i32::from(q as i8) << LIMB_SHIFT) + i32::from(q2);
                } else {
                    sum += i32::from(q as i8);
                }
            }
            let step = if two_limbs { d / limb } else { d };
            out.scale.push(step);
            out.sx.push(step * sum as f32);
            out.qsum.push(sum);
        }
        out
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
