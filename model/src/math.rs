//! Small numeric kernels shared by the forward pass and the sampler, written so the
//! compiler vectorizes them while their summation order stays fixed.

/// Dot product with 16 independent accumulators, so the compiler vectorizes it while the
/// summation order stays fixed.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let chunks = a.len() / 16;
    for c in 0..chunks {
        let (x, y) = (&a[c * 16..][..16], &b[c * 16..][..16]);
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0;
    for i in chunks * 16..a.len() {
        tail += a[i] * b[i];
    }
    acc.iter().sum::<f32>() + tail
}
/// Sum in 16 interleaved lanes (a fixed order the compiler can vectorize).
#[inline]
pub fn lanes_sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Largest element (`-inf` when empty), in 16 interleaved lanes.
#[inline]
pub fn lanes_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().copied();
    acc.into_iter()
        .chain(tail)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `e^x` to about 2 ulp, in a form the compiler vectorizes (no branches, no libm call):
/// `x = n·ln2 + r`, a degree-6 polynomial for `e^r`, `2^n` from the exponent bits. Below
/// -87 the result is 0 (the true value is below f32's normal range); above 88 it is
/// `e^88`, so `1 + e^x` never overflows to infinity.
#[inline]
pub fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * std::f32::consts::LOG2_E).round();
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p: f32 = 1.0 / 720.0;
    let p = p.mul_add(r, 1.0 / 120.0);
    let p = p.mul_add(r, 1.0 / 24.0);
    let p = p.mul_add(r, 1.0 / 6.0);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r, 1.0);
    let p = p.mul_add(r, 1.0);
    let y = p * pow2(n);
    if x > -87.0 {
        y
    } else {
        0.0
    }
}

/// `2^n` for a whole `n` in -126..=127, from the exponent bits. Adding 2^23 to `n + 127`
/// puts it in the low mantissa bits: an integer without a float-to-int cast, whose
/// saturating semantics kept the compiler from vectorizing `exp` (a scalar conversion
/// per lane was most of the softmax in attention).
#[inline]
fn pow2(n: f32) -> f32 {
    let biased = (n + 127.0).max(0.0) + 8_388_608.0;
    f32::from_bits((biased.to_bits() - 0x4B00_0000) << 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pow2_is_exact_over_the_exponent_range() {
        for n in -126..=127 {
            assert_eq!(pow2(n as f32), 2f32.powi(n), "2^{n}");
        }
    }

    #[test]
    fn exp_is_finite_and_monotone_at_the_ends() {
        assert_eq!(exp(-1000.0), 0.0);
        assert!(exp(88.0).is_finite() && exp(1000.0) == exp(88.0));
        assert!((exp(88.0) / 88f32.exp() - 1.0).abs() < 1e-6);
        assert!((exp(10.0) / 10f32.exp() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn exp_matches_libm() {
        for i in 0..=100_000 {
            let x = -90.0 * i as f32 / 100_000.0;
            let (got, want) = (exp(x), x.exp());
            if x <= -87.0 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= 4e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
        }
    }
}
