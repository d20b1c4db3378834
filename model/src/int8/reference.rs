//! The definition of the result, in plain Rust: every SIMD kernel must equal it bit for
//! bit (the integer sums are exact; the float steps are the same operations in the same
//! order).

use super::acts::LIMB_SHIFT;
use super::pack::weight;
use super::{Acts, Format, Strip, QK, STRIP};

pub fn tile(strip: &Strip, x: &Acts, first: usize, rows: usize, out: &mut [f32]) {
    let kb = strip.d.len() / STRIP;
    for r in 0..rows {
        let row = first + r;
        for c in 0..STRIP {
            let mut acc = 0.0f32;
            for b in 0..kb {
                let (mut isum, mut isum2) = (0i32, 0i32);
                for j in 0..QK {
                    let u = i32::from(weight(strip.format, strip.q, kb, b, c, j));
                    let at = row * x.k + b * QK + j;
                    isum += u * i32::from(x.q[at]);
                    if x.two_limbs() {
                        isum2 += u * i32::from(x.q2[at]);
                    }
                }
                if x.two_limbs() {
                    isum = (isum << LIMB_SHIFT) + isum2;
                }
                let d = f32::from(strip.d[b * STRIP + c]);
                let m = match strip.format {
                    Format::Q4 => f32::from(strip.m[b * STRIP + c]),
                    Format::Q8 => -128.0 * d,
                };
                let at = x.block(row, b);
                acc = d.mul_add(isum as f32 * x.scale[at], acc);
                acc = m.mul_add(x.sx[at], acc);
            }
            out[r * STRIP + c] = acc;
        }
    }
}
