//! AVX2: `vpmaddubsw` multiplies 32 unsigned weight bytes by broadcast activation bytes
//! into 16-bit pair sums, `vpmaddwd` by ones widens them to 8 column sums. Q8 weights
//! go through the sign trick (`|w|` times `x · sign(w)`), as the unsigned `q + 128`
//! would overflow the 16-bit pair sums; `128 · Σ x` then restores `Σ (q + 128) x` (with two
//! limbs, `Σ x` is the combined sum, added after the limbs are combined).

use std::arch::x86_64::*;

use super::acts::LIMB_SHIFT;
use super::{check, Acts, Format, Strip, GROUP, GROUPS, STRIP};

pub fn supported() -> bool {
    is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// See [`super::run_tile`]; `rows` is 1 or 2.
pub fn tile(strip: &Strip, x: &Acts, first: usize, rows: usize, out: &mut [f32]) {
    assert!(supported(), "AVX2 kernel on a machine without it");
    assert!((1..=2).contains(&rows));
    check(strip, x, first, rows, out);
    let q8 = strip.format == Format::Q8;
    macro_rules! by_rows {
        ($q8:literal, $two:literal) => {
            match rows {
                1 => groups::<1, 2, $q8, $two>(strip, x, first, out),
                _ => groups::<2, 1, $q8, $two>(strip, x, first, out),
            }
        };
    }
    // SAFETY: the CPU has the features `groups` is compiled for (asserted above), and
    // `check` verified every length the kernel's pointer arithmetic relies on.
    unsafe {
        match (q8, x.two_limbs()) {
            (false, false) => by_rows!(false, false),
            (false, true) => by_rows!(false, true),
            (true, false) => by_rows!(true, false),
            (true, true) => by_rows!(true, true),
        }
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn groups<const R: usize, const G: usize, const Q8: bool, const TWO: bool>(
    strip: &Strip,
    x: &Acts,
    first: usize,
    out: &mut [f32],
) {
    for g0 in (0..GROUPS).step_by(G) {
        // SAFETY: forwarded from `tile`: features present, lengths checked.
        unsafe { kernel::<R, G, Q8, TWO>(strip, x, first, g0, out) };
    }
}

/// Rows `first..first + R`, columns of groups `g0..g0 + G` (each group two 8-column
/// halves: bytes 0..32 of a 64-byte vector are columns 0-7, bytes 32..64 columns 8-15);
/// `TWO`: activations carry a residual limb, combined as `(Σ w·q << 8) + Σ w·q2`.
#[target_feature(enable = "avx2,fma,f16c")]
#[inline]
unsafe fn kernel<const R: usize, const G: usize, const Q8: bool, const TWO: bool>(
    strip: &Strip,
    x: &Acts,
    first: usize,
    g0: usize,
    out: &mut [f32],
) {
    let kb = strip.d.len() / STRIP;
    let gb = strip.format.group_bytes();
    let mask = _mm256_set1_epi8(0x0F);
    let flip = _mm256_set1_epi8(-128);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[[_mm256_setzero_ps(); 2]; G]; R];
    for b in 0..kb {
        let (mut quads, mut quads2) = ([[0i32; 8]; R], [[0i32; 8]; R]);
        let (mut scale, mut sx, mut offset) = ([0.0f32; R], [0.0f32; R], [0i32; R]);
        for r in 0..R {
            for j in 0..8 {
                quads[r][j] = x.quad(false, first + r, b, j);
                if TWO {
                    quads2[r][j] = x.quad(true, first + r, b, j);
                }
            }
            let at = x.block(first + r, b);
            (scale[r], sx[r]) = (x.scale[at], x.sx[at]);
            offset[r] = if Q8 { 128 * x.qsum[at] } else { 0 };
        }
        let mut isum = [[[_mm256_setzero_si256(); 2]; G]; R];
        let mut isum2 = [[[_mm256_setzero_si256(); 2]; G]; R];
        for g in 0..G {
            for h in 0..2 {
                let base = (b * GROUPS + g0 + g) * gb + h * 32;
                // Vector `v`'s half `h`. A macro, not a closure, so that it is compiled
                // with this function's target features.
                macro_rules! load {
                    ($v:expr) => {
                        // SAFETY: group `b * GROUPS + g0 + g` lies within `strip.q`
                        // (checked: kb * GROUPS groups of `gb` bytes), and vector `v`'s
                        // half `h` within its group.
                        unsafe { _mm256_loadu_si256(strip.q.as_ptr().add(base + $v * 64).cast()) }
                    };
                }
                if Q8 {
                    for v in 0..8 {
                        let w = _mm256_xor_si256(load!(v), flip);
                        let aw = _mm256_abs_epi8(w);
                        for r in 0..R {
                            let xs = _mm256_sign_epi8(_mm256_set1_epi32(quads[r][v]), w);
                            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                            isum[r][g][h] = _mm256_add_epi32(isum[r][g][h], p);
                            if TWO {
                                let xs = _mm256_sign_epi8(_mm256_set1_epi32(quads2[r][v]), w);
                                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones);
                                isum2[r][g][h] = _mm256_add_epi32(isum2[r][g][h], p);
                            }
                        }
                    }
                } else {
                    for v in 0..4 {
                        let w = load!(v);
                        let lo = _mm256_and_si256(w, mask);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(w), mask);
                        // Pair sums are at most 2 · 15 · 127 each, so two add up without
                        // 16-bit overflow.
                        macro_rules! dot {
                            ($quads:expr, $isum:expr) => {
                                for r in 0..R {
                                    let pl =
                                        _mm256_maddubs_epi16(lo, _mm256_set1_epi32($quads[r][v]));
                                    let ph = _mm256_maddubs_epi16(
                                        hi,
                                        _mm256_set1_epi32($quads[r][v + 4]),
                                    );
                                    let p = _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones);
                                    $isum[r][g][h] = _mm256_add_epi32($isum[r][g][h], p);
                                }
                            };
                        }
                        dot!(quads, isum);
                        if TWO {
                            dot!(quads2, isum2);
                        }
                    }
                }
            }
        }
        for g in 0..G {
            for h in 0..2 {
                let col = b * STRIP + (g0 + g) * GROUP + h * 8;
                // SAFETY: `col + 8 <= kb * STRIP`, the checked length of `d` (and of `m`
                // for Q4); f16 is a plain 16-bit value.
                let (d, m) = unsafe {
                    let d = _mm256_cvtph_ps(_mm_loadu_si128(strip.d.as_ptr().add(col).cast()));
                    let m = if Q8 {
                        _mm256_mul_ps(d, _mm256_set1_ps(-128.0))
                    } else {
                        _mm256_cvtph_ps(_mm_loadu_si128(strip.m.as_ptr().add(col).cast()))
                    };
                    (d, m)
                };
                for r in 0..R {
                    let mut s = isum[r][g][h];
                    if TWO {
                        s = _mm256_slli_epi32::<{ LIMB_SHIFT as i32 }>(s);
                        s = _mm256_add_epi32(s, isum2[r][g][h]);
                    }
                    s = _mm256_add_epi32(s, _mm256_set1_epi32(offset[r]));
                    let t = _mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(scale[r]));
                    acc[r][g][h] = _mm256_fmadd_ps(d, t, acc[r][g][h]);
                    acc[r][g][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r]), acc[r][g][h]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (g, halves) in row.iter().enumerate() {
            for (h, &v) in halves.iter().enumerate() {
                let at = r * STRIP + (g0 + g) * GROUP + h * 8;
                // SAFETY: `at + 8 <= R * STRIP <= out.len()` (checked).
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(at), v) };
            }
        }
    }
}
