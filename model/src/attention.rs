//! Causal attention over a ragged batch, reading each sequence's keys and values in
//! place from its KV blocks (no gather, no padding, no per-sequence tensor ops).
//!
//! Every (token, head) pair is computed by the same code in the same order whatever else
//! is in the batch and however a prompt was split into chunks, so a sequence's result
//! never depends on its neighbours. Work is spread over the cores by rayon.

use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::kv::{offset, KvShape, LayerKv, BLOCK_SIZE};
use crate::math::{exp, lanes_max, lanes_sum};

/// Where one sequence's rows sit in the batch.
#[derive(Debug, Clone, Copy)]
pub struct RowSpan<'a> {
    /// First row of this sequence in the batch.
    pub first_row: usize,
    pub rows: usize,
    /// Position of the first row in the sequence.
    pub start_pos: usize,
    pub blocks: &'a [u32],
}

pub struct AttnShape {
    pub heads: usize,
    pub kv: KvShape,
    /// Multiplies `q · k` before the softmax.
    pub scale: f32,
    /// Attend only to the last `window` positions (sliding-window layers).
    pub window: Option<usize>,
}

/// `q`: `[rows, heads * head_dim]` (rope applied). Returns `[rows, heads * head_dim]`.
/// The KV of every row's position must already be written.
pub fn paged_attention(shape: &AttnShape, q: &[f32], kv: &LayerKv, spans: &[RowSpan]) -> Vec<f32> {
    let hd = shape.kv.head_dim;
    let (heads, kv_heads) = (shape.heads, shape.kv.kv_heads);
    let group = heads / kv_heads;
    let total_rows: usize = spans.iter().map(|s| s.rows).sum();
    // (span index, position) of every row.
    let mut row_info = Vec::with_capacity(total_rows);
    for (i, s) in spans.iter().enumerate() {
        debug_assert_eq!(s.first_row, row_info.len());
        row_info.extend((0..s.rows).map(|r| (i, s.start_pos + r)));
    }
    // One task per (row, KV head): the query heads sharing a KV head read it once.
    let mut out = vec![0.0f32; total_rows * heads * hd];
    out.par_chunks_mut(group * hd)
        .enumerate()
        .with_min_len(2)
        .for_each_init(Scratch::default, |scratch, (i, o)| {
            let (row, kv_head) = (i / kv_heads, i % kv_heads);
            let (span, pos) = row_info[row];
            let q_rows = &q[(row * heads + kv_head * group) * hd..][..group * hd];
            let task = Task {
                s: shape.kv,
                kv,
                blocks: spans[span].blocks,
                kv_head,
                lo: shape.window.map_or(0, |w| (pos + 1).saturating_sub(w)),
                n: pos + 1,
                scale: shape.scale,
            };
            task.attend(q_rows, scratch, o);
        });
    out
}

/// A compute thread's buffers, reused across tasks: scores, one key block and one value
/// block in f32.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// The query heads of one row that share `kv_head`, against positions `lo..n`.
struct Task<'a> {
    s: KvShape,
    kv: &'a LayerKv,
    blocks: &'a [u32],
    kv_head: usize,
    lo: usize,
    n: usize,
    scale: f32,
}

impl Task<'_> {
    /// `q`: `[group][head_dim]`; `out` the same shape.
    fn attend(&self, q: &[f32], scratch: &mut Scratch, out: &mut [f32]) {
        let hd = self.s.head_dim;
        let Scratch {
            scores,
            keys: k,
            values,
        } = scratch;
        let group = q.len() / hd;
        let (first, last) = self.block_range();
        let stride = (last - first) * BLOCK_SIZE;
        // Score slots count from the first block read.
        let (lo, n) = (self.lo - first * BLOCK_SIZE, self.n - first * BLOCK_SIZE);
        // [group][stride]: raw scores, then probabilities. Slots outside `lo..n` in the
        // first and last blocks hold whatever was there; they end up with probability 0.
        scores.clear();
        scores.resize(group * stride, 0.0);
        k.resize(hd * BLOCK_SIZE, 0.0);
        for (b, &block) in self.blocks[first..last].iter().enumerate() {
            let base = offset(self.s, block as usize, self.kv_head, 0);
            // Keys are stored `[head_dim][slot]`: one pass gives all 16 slots' scores.
            self.kv.k[base..][..hd * BLOCK_SIZE].convert_to_f32_slice(k);
            for (h, qh) in q.chunks_exact(hd).enumerate() {
                let s = block_scores(qh, k);
                scores[h * stride + b * BLOCK_SIZE..][..BLOCK_SIZE].copy_from_slice(&s);
            }
        }
        for row in scores.chunks_exact_mut(stride) {
            row[..lo].fill(0.0);
            let valid = &mut row[lo..n];
            let max = lanes_max(valid);
            for x in valid.iter_mut() {
                *x = exp((*x - max) * self.scale);
            }
            let inv = 1.0 / lanes_sum(valid);
            valid.iter_mut().for_each(|x| *x *= inv);
        }
        for (h, o) in out.chunks_exact_mut(hd).enumerate() {
            let p = &scores[h * stride..][..stride];
            match hd {
                64 => self.weighted_values::<64>(p, values, o),
                128 => self.weighted_values::<128>(p, values, o),
                256 => self.weighted_values::<256>(p, values, o),
                _ => self.weighted_values_any(p, values, o),
            }
        }
    }

    /// `out = Σ_slot p[slot] · v[slot]`, accumulating in registers for a known head size.
    fn weighted_values<const D: usize>(&self, p: &[f32], buf: &mut Vec<f32>, out: &mut [f32]) {
        let mut acc = [0.0f32; D];
        self.for_each_value(buf, |slot, v| {
            if let Ok(v) = <&[f32; D]>::try_from(v) {
                for (a, &v) in acc.iter_mut().zip(v) {
                    *a = p[slot].mul_add(v, *a);
                }
            }
        });
        out.copy_from_slice(&acc);
    }

    fn weighted_values_any(&self, p: &[f32], buf: &mut Vec<f32>, out: &mut [f32]) {
        out.fill(0.0);
        self.for_each_value(buf, |slot, v| {
            for (o, &v) in out.iter_mut().zip(v) {
                *o = p[slot].mul_add(v, *o);
            }
        });
    }

    /// The blocks holding positions `lo..n`: `first..last` of the block table.
    fn block_range(&self) -> (usize, usize) {
        (self.lo / BLOCK_SIZE, self.n.div_ceil(BLOCK_SIZE))
    }

    /// Calls `f(slot, value row)` for the slots of the blocks holding `lo..n` (slots
    /// counted from the first of those blocks, ending at `n`), in order, each block's
    /// values converted from f16 into `rows` in one pass.
    #[inline(always)]
    fn for_each_value(&self, rows: &mut Vec<f32>, mut f: impl FnMut(usize, &[f32])) {
        let hd = self.s.head_dim;
        let (first, last) = self.block_range();
        rows.resize(hd * BLOCK_SIZE, 0.0);
        for (b, &block) in self.blocks[first..last].iter().enumerate() {
            let base = offset(self.s, block as usize, self.kv_head, 0);
            let in_block = (self.n - (first + b) * BLOCK_SIZE).min(BLOCK_SIZE);
            let rows = &mut rows[..in_block * hd];
            self.kv.v[base..][..in_block * hd].convert_to_f32_slice(rows);
            for (slot, row) in rows.chunks_exact(hd).enumerate() {
                f(b * BLOCK_SIZE + slot, row);
            }
        }
    }
}

/// `q · k[:, slot]` for the 16 slots of a key block stored `[head_dim][slot]`: one
/// 16-lane multiply-add per head dimension, no horizontal sums.
#[inline]
fn block_scores(q: &[f32], k: &[f32]) -> [f32; BLOCK_SIZE] {
    let mut acc = [0.0f32; BLOCK_SIZE];
    for (row, &qd) in k.chunks_exact(BLOCK_SIZE).zip(q) {
        for (a, &k) in acc.iter_mut().zip(row) {
            *a = qd.mul_add(k, *a);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCache;

    /// Attention computed the plain way, for one sequence, from contiguous K and V.
    fn reference(
        q: &[f32],
        k: &[Vec<f32>],
        v: &[Vec<f32>],
        heads: usize,
        kv_heads: usize,
        hd: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let rows = q.len() / (heads * hd);
        let start = k.len() - rows;
        let mut out = vec![0.0; q.len()];
        for r in 0..rows {
            let pos = start + r;
            let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qv = &q[(r * heads + h) * hd..][..hd];
                let s: Vec<f32> = (lo..=pos)
                    .map(|j| {
                        qv.iter()
                            .zip(&k[j][g * hd..][..hd])
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            / (hd as f32).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for d in 0..hd {
                    out[(r * heads + h) * hd + d] =
                        (lo..=pos).map(|j| e[j - lo] / z * v[j][g * hd + d]).sum();
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32
                    / 500.0
                    - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_reference_across_scattered_blocks() {
        check_against_reference(None);
    }

    #[test]
    fn sliding_window_matches_reference() {
        // 7 starts inside a block; 16 and 33 span whole blocks and a partial one.
        for w in [1, 7, 16, 33] {
            check_against_reference(Some(w));
        }
    }

    fn check_against_reference(window: Option<usize>) {
        let (heads, kv_heads, hd) = (4, 2, 16);
        let shape = KvShape {
            layers: 1,
            kv_heads,
            head_dim: hd,
        };
        let mut cache = KvCache::new(shape, 8).unwrap();
        // Two sequences with interleaved, out-of-order blocks.
        let blocks_a = [5u32, 1, 6];
        let blocks_b = [2u32, 7];
        let (len_a, len_b) = (40, 20);
        let ka: Vec<Vec<f32>> = (0..len_a).map(|t| pseudo(kv_heads * hd, t)).collect();
        let va: Vec<Vec<f32>> = (0..len_a).map(|t| pseudo(kv_heads * hd, 100 + t)).collect();
        let kb: Vec<Vec<f32>> = (0..len_b).map(|t| pseudo(kv_heads * hd, 200 + t)).collect();
        let vb: Vec<Vec<f32>> = (0..len_b).map(|t| pseudo(kv_heads * hd, 300 + t)).collect();
        for t in 0..len_a as usize {
            cache.write(0, &blocks_a, t, &ka[t], &va[t]);
        }
        for t in 0..len_b as usize {
            cache.write(0, &blocks_b, t, &kb[t], &vb[t]);
        }
        // Seq a decodes its last token; seq b prefills its last 5.
        let qa = pseudo(heads * hd, 400);
        let qb = pseudo(5 * heads * hd, 500);
        let q: Vec<f32> = qa.iter().chain(&qb).copied().collect();
        let spans = [
            RowSpan {
                first_row: 0,
                rows: 1,
                start_pos: 39,
                blocks: &blocks_a,
            },
            RowSpan {
                first_row: 1,
                rows: 5,
                start_pos: 15,
                blocks: &blocks_b,
            },
        ];
        let attn = AttnShape {
            heads,
            kv: shape,
            scale: 1.0 / (hd as f32).sqrt(),
            window,
        };
        let out = paged_attention(&attn, &q, cache.layer(0), &spans);
        // The cache stores f16: the reference gets the same rounded keys and values.
        let round = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
            rows.iter()
                .map(|r| r.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect())
                .collect()
        };
        let (ka, va, kb, vb) = (round(&ka), round(&va), round(&kb), round(&vb));
        let want_a = reference(&qa, &ka, &va, heads, kv_heads, hd, window);
        let want_b = reference(&qb, &kb, &vb, heads, kv_heads, hd, window);
        let want: Vec<f32> = want_a.iter().chain(&want_b).copied().collect();
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() < 1e-5,
                "window {window:?}, element {i}: {g} vs {w}"
            );
        }
    }
}
