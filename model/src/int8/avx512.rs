//! AVX-512 VNNI: `vpdpbusd` multiplies 64 unsigned weight bytes by four broadcast
//! activation bytes and adds each lane's four products into 16 column sums.

use std::arch::x86_64::*;

use super::acts::LIMB_SHIFT;
use super::{check, Acts, Format, Strip, GROUP, GROUPS, STRIP};

pub fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
}

/// See [`super::run_tile`]; `rows` is 1 to 4.
pub fn tile(strip: &Strip, x: &Acts, first: usize, rows: usize, out: &mut [f32]) {
    assert!(supported(), "AVX-512 VNNI kernel on a machine without it");
    assert!((1..=4).contains(&rows));
    check(strip, x, first, rows, out);
    let q8 = strip.format == Format::Q8;
    macro_rules! by_rows {
        ($q8:literal, $two:literal) => {
            match rows {
                1 => groups::<1, 4, $q8, $two>(strip, x, first, out),
                2 => groups::<2, 2, $q8, $two>(strip, x, first, out),
                3 => groups::<3, 2, $q8, $two>(strip, x, first, out),
                _ => groups::<4, 2, $q8, $two>(strip, x, first, out),
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

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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

/// Rows `first..first + R`, columns of groups `g0..g0 + G`; `TWO`: activations carry
/// a residual limb, summed apart and combined as `(Σ u·q << 8) + Σ u·q2`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
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
    let vectors = if Q8 { 8 } else { 4 };
    let mask = _mm512_set1_epi8(0x0F);
    let mut acc = [[_mm512_setzero_ps(); G]; R];
    for b in 0..kb {
        let (mut quads, mut quads2) = ([[0i32; 8]; R], [[0i32; 8]; R]);
        let (mut scale, mut sx) = ([0.0f32; R], [0.0f32; R]);
        for r in 0..R {
            for j in 0..8 {
                quads[r][j] = x.quad(false, first + r, b, j);
                if TWO {
                    quads2[r][j] = x.quad(true, first + r, b, j);
                }
            }
            let at = x.block(first + r, b);
            (scale[r], sx[r]) = (x.scale[at], x.sx[at]);
        }
        let mut isum = [[_mm512_setzero_si512(); G]; R];
        let mut isum2 = [[_mm512_setzero_si512(); G]; R];
        // `isum[r][g] += w · quad j` (and the residual limb's sum likewise). A macro, not
        // a closure, so that it is compiled with this function's target features.
        macro_rules! dot {
            ($g:expr, $w:expr, $j:expr) => {
                for r in 0..R {
                    let xb = _mm512_set1_epi32(quads[r][$j]);
                    isum[r][$g] = _mm512_dpbusd_epi32(isum[r][$g], $w, xb);
                    if TWO {
                        let xb = _mm512_set1_epi32(quads2[r][$j]);
                        isum2[r][$g] = _mm512_dpbusd_epi32(isum2[r][$g], $w, xb);
                    }
                }
            };
        }
        for v in 0..vectors {
            for g in 0..G {
                // SAFETY: group `b * GROUPS + g0 + g` lies within `strip.q` (checked:
                // kb * GROUPS groups of `gb` bytes), and vector `v` within its group.
                let w = unsafe {
                    let at = (b * GROUPS + g0 + g) * gb + v * 64;
                    _mm512_loadu_si512(strip.q.as_ptr().add(at).cast())
                };
                if Q8 {
                    dot!(g, w, v);
                } else {
                    let lo = _mm512_and_si512(w, mask);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(w), mask);
                    dot!(g, lo, v);
                    dot!(g, hi, v + 4);
                }
            }
        }
        for g in 0..G {
            let col = b * STRIP + (g0 + g) * GROUP;
            // SAFETY: `col + 16 <= kb * STRIP`, the checked length of `d` (and of `m`
            // for Q4); f16 is a plain 16-bit value.
            let (d, m) = unsafe {
                let d = _mm512_cvtph_ps(_mm256_loadu_si256(strip.d.as_ptr().add(col).cast()));
                let m = if Q8 {
                    _mm512_mul_ps(d, _mm512_set1_ps(-128.0))
                } else {
                    _mm512_cvtph_ps(_mm256_loadu_si256(strip.m.as_ptr().add(col).cast()))
                };
                (d, m)
            };
            for r in 0..R {
                let mut s = isum[r][g];
                if TWO {
                    s = _mm512_add_epi32(_mm512_slli_epi32::<LIMB_SHIFT>(s), isum2[r][g]);
                }
                let t = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(scale[r]));
                acc[r][g] = _mm512_fmadd_ps(d, t, acc[r][g]);
                acc[r][g] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r]), acc[r][g]);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (g, &v) in row.iter().enumerate() {
            let at = r * STRIP + (g0 + g) * GROUP;
            // SAFETY: `at + 16 <= R * STRIP <= out.len()` (checked).
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), v) };
        }
    }
}
