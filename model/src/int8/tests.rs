use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};

use super::*;

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

fn quantized(w: &[f32], n: usize, k: usize, dtype: GgmlDType) -> QTensor {
    let t = Tensor::from_vec(w.to_vec(), (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&t, dtype).unwrap()
}

fn dequantized(q: &QTensor) -> Vec<f32> {
    let t = q.dequantize(&Device::Cpu).unwrap();
    t.flatten_all().unwrap().to_vec1().unwrap()
}

const DTYPES: [GgmlDType; 3] = [GgmlDType::Q4_1, GgmlDType::Q8_0, GgmlDType::Q4_0];

/// Every kernel this machine supports gives the scalar reference's result bit for bit,
/// for each stored format and every tile height, with a column count that is not a
/// multiple of the strip.
#[test]
fn every_kernel_equals_the_reference() {
    let (n, k, rows) = (80, 96, 9);
    let w = random(n * k, 1);
    let x = random(rows * k, 2);
    eprintln!("kernels here: {:?}", Isa::available());
    for (dtype, two) in DTYPES.into_iter().flat_map(|d| [(d, false), (d, true)]) {
        let want = Int8Linear::from_parts(&[quantized(&w, n, k, dtype)], two)
            .unwrap()
            .unwrap()
            .with_isa(Isa::Scalar)
            .forward(&x, rows);
        for isa in Isa::available() {
            let linear = Int8Linear::from_parts(&[quantized(&w, n, k, dtype)], two)
                .unwrap()
                .unwrap()
                .with_isa(isa);
            assert_eq!(
                linear.forward(&x, rows),
                want,
                "{isa:?} on {dtype:?}, two limbs: {two}"
            );
        }
    }
}

/// Integer sums at their largest: every weight at its format's top (15 for Q4, 127 for
/// Q8) and every activation limb at ±127, so that any partial sum a kernel keeps in 16
/// bits would overflow if its bound were wrong; every kernel still equals the reference.
#[test]
fn kernels_hold_the_largest_sums() {
    let (n, k) = (STRIP, 4 * QK);
    // One -1 per block gives Q4_1 its minimum; the rest sit at the top step.
    let w: Vec<f32> = (0..n * k)
        .map(|i| if i % QK == 0 { -1.0 } else { 1.0 })
        .collect();
    // Per block: a 1 fixes the step at 1/127; 100.496/127 then rounds to a high limb of
    // 100 and a residual limb of 127.
    let top = |sign: f32, residual: bool| {
        (0..k).map(move |i| match (i % QK, residual) {
            (0, _) | (_, false) => sign,
            _ => sign * 100.496 / 127.0,
        })
    };
    let x: Vec<f32> = [(1.0, false), (-1.0, false), (1.0, true), (-1.0, true)]
        .into_iter()
        .flat_map(|(sign, residual)| top(sign, residual))
        .collect();
    let rows = x.len() / k;
    // The rows do reach the limbs' extremes: ±127 in every high limb of the first two,
    // in every residual limb past each block's first of the last two.
    let acts = Acts::quantize(&x, rows, k, true);
    assert!(acts.q[..2 * k].iter().all(|q| q.unsigned_abs() == 127));
    let mut residuals = acts.q2[2 * k..]
        .iter()
        .enumerate()
        .filter(|(i, _)| i % QK != 0);
    assert!(residuals.all(|(_, q)| q.unsigned_abs() == 127));
    for (dtype, two) in DTYPES.into_iter().flat_map(|d| [(d, false), (d, true)]) {
        let linear = |isa| {
            Int8Linear::from_parts(&[quantized(&w, n, k, dtype)], two)
                .unwrap()
                .unwrap()
                .with_isa(isa)
        };
        let want = linear(Isa::Scalar).forward(&x, rows);
        for isa in Isa::available() {
            assert_eq!(
                linear(isa).forward(&x, rows),
                want,
                "{isa:?} on {dtype:?}, two limbs: {two}"
            );
        }
    }
}

/// The result is the weights' dot product with rounded activations: within a small
/// fraction of the f32 product's typical magnitude with one limb, and a much smaller one
/// with two.
#[test]
fn close_to_the_f32_product() {
    let (n, k, rows) = (70, 256, 3);
    let w = random(n * k, 3);
    let x = random(rows * k, 4);
    for dtype in DTYPES {
        let q = quantized(&w, n, k, dtype);
        let mut dense = dequantized(&q);
        if dtype == GgmlDType::Q4_0 {
            dense = dequantized(&quantized(&dense, n, k, GgmlDType::Q8_0));
        }
        let scale = (k as f32).sqrt() / 3.0; // the typical |dot| of uniform ±1 vectors
        for (two, tolerance) in [(false, 0.02), (true, 2e-4)] {
            let got = Int8Linear::from_parts(std::slice::from_ref(&q), two)
                .unwrap()
                .unwrap()
                .forward(&x, rows);
            let mut worst = 0.0f32;
            for r in 0..rows {
                for c in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * dense[c * k + i]).sum();
                    worst = worst.max((got[r * n + c] - exact).abs() / scale);
                }
            }
            assert!(worst < tolerance, "{dtype:?}, two limbs {two}: {worst}");
        }
    }
}

/// A row's output is bit-identical alone and at any place in a batch of any size, with
/// every kernel.
#[test]
fn rows_are_independent_of_batch_size() {
    let (n, k) = (128, 64);
    let w = random(n * k, 6);
    for (isa, two) in Isa::available()
        .into_iter()
        .flat_map(|i| [(i, false), (i, true)])
    {
        let linear = Int8Linear::from_parts(&[quantized(&w, n, k, GgmlDType::Q4_1)], two)
            .unwrap()
            .unwrap()
            .with_isa(isa);
        let probe = random(k, 7);
        let alone = linear.forward(&probe, 1);
        for rows in 1..=9 {
            for at in 0..rows {
                let mut x = random(rows * k, 8 + rows as u64);
                x[at * k..(at + 1) * k].copy_from_slice(&probe);
                let y = linear.forward(&x, rows);
                assert_eq!(
                    y[at * n..(at + 1) * n],
                    alone[..],
                    "{isa:?} {two}: row {at} of {rows}"
                );
            }
        }
    }
}

#[test]
fn stacked_parts_equal_separate_parts() {
    let k = 64;
    let (a, b) = (random(48 * k, 3), random(16 * k, 4));
    let x = random(2 * k, 5);
    let pack = |parts: &[QTensor]| Int8Linear::from_parts(parts, true).unwrap().unwrap();
    let qa = || quantized(&a, 48, k, GgmlDType::Q4_1);
    let qb = || quantized(&b, 16, k, GgmlDType::Q4_1);
    let both = pack(&[qa(), qb()]).forward(&x, 2);
    let (ya, yb) = (pack(&[qa()]).forward(&x, 2), pack(&[qb()]).forward(&x, 2));
    for r in 0..2 {
        assert_eq!(both[r * 64..r * 64 + 48], ya[r * 48..(r + 1) * 48]);
        assert_eq!(both[r * 64 + 48..(r + 1) * 64], yb[r * 16..(r + 1) * 16]);
    }
}

/// Float weights are not this format's: the caller keeps its f32 kernels.
#[test]
fn float_weights_are_declined() {
    let q = quantized(&random(64 * 32, 9), 64, 32, GgmlDType::F32);
    assert!(Int8Linear::from_parts(&[q], false).unwrap().is_none());
}

/// The vectorized rounding equals the scalar definition bit for bit: random blocks of many
/// magnitudes, exact ties of both limbs (a block whose largest value is 127 has step 1),
/// zeros, and the values no activation should be but a broken checkpoint can make (NaN,
/// infinities, subnormal and huge blocks).
#[test]
fn activations_round_as_the_reference() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut x: Vec<f32> = Vec::new();
    for b in 0..64 {
        let magnitude = 10f32.powi(b % 13 - 6);
        x.extend((0..QK).map(|_| rng.random_range(-1.0..1.0) * magnitude));
    }
    let ties: Vec<f32> = (0..QK)
        .map(|i| {
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            sign * (i as f32 * 3.0 + 0.5 + (i % 5) as f32 / 512.0)
        })
        .collect();
    x.extend(&ties[..QK - 1]);
    x.push(127.0);
    x.extend([0.0f32; QK]);
    let specials = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        f32::MAX,
        -0.0,
    ];
    for (i, &special) in specials.iter().enumerate() {
        let mut block: Vec<f32> = (0..QK).map(|j| j as f32 * 1e-3 - 0.01).collect();
        block[i * 5] = special;
        x.extend(block);
    }
    x.extend((0..QK).map(|i| i as f32 * 1e-41));
    let k = 4 * QK;
    x.resize(x.len().next_multiple_of(k), 0.5);
    let rows = x.len() / k;
    for two in [false, true] {
        let want = reference::quantize(&x, rows, k, two);
        let got = Acts::quantize(&x, rows, k, two);
        assert_eq!(got.q, want.q, "two limbs: {two}");
        assert_eq!(got.q2, want.q2, "two limbs: {two}");
        assert_eq!(got.qsum, want.qsum, "two limbs: {two}");
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got.scale), bits(&want.scale), "two limbs: {two}");
        assert_eq!(bits(&got.sx), bits(&want.sx), "two limbs: {two}");
    }
}

#[test]
fn activations_round_per_block() {
    let mut x = random(2 * 64, 10);
    x[32..64].fill(0.0); // an all-zero block
    for two in [false, true] {
        let a = Acts::quantize(&x, 2, 64, two);
        assert_eq!(a.scale[1], 0.0);
        assert!(a.q[32..64].iter().all(|&q| q == 0));
        for (b, xs) in x.chunks_exact(QK).enumerate() {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let q = &a.q[b * QK..][..QK];
            assert!(q.iter().any(|q| q.unsigned_abs() == 127) || amax == 0.0);
            let mut sum = 0;
            for (i, &v) in xs.iter().enumerate() {
                let mut int = i32::from(q[i]);
                if two {
                    int = int * 256 + i32::from(a.q2[b * QK + i]);
                }
                sum += int;
                let back = int as f32 * a.scale[b];
                // Half a step (a hair more for the float steps); with two limbs a residual
                // of half the first step is clamped to 127/256 of it: one step at most.
                let steps = if two { 1.0001 } else { 0.5001 };
                assert!(
                    (back - v).abs() <= a.scale[b] * steps + 1e-7,
                    "{two}: {back} vs {v}"
                );
            }
            assert_eq!(a.qsum[b], sum);
            assert_eq!(a.sx[b], a.scale[b] * sum as f32);
        }
    }
}
