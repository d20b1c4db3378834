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

/// Activations rounded per block: the definition [`Acts::quantize`] must equal bit for bit.
#[cfg_attr(not(test), allow(dead_code))]
pub fn quantize(x: &[f32], rows: usize, k: usize, two_limbs: bool) -> Acts {
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
