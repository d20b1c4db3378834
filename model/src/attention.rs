//! Causal attention over a ragged batch, reading each sequence's keys and values in
//! place from its KV blocks (no gather, no padding, no per-sequence tensor ops).
//!
//! Every (token, head) pair is computed by the same code in the same order whatever else
//! is in the batch and however a prompt was split into chunks, so a sequence's result
//! never depends on its neighbours. Work is spread over the cores by rayon.

use rayon::prelude::*;

use crate::kv::{offset, KvShape, LayerKv, BLOCK_SIZE};

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
}

/// `q`: `[rows, heads * head_dim]` (rope applied). Returns `[rows, heads * head_dim]`.
/// The KV of every row's position must already be written.
pub fn paged_attention(shape: &AttnShape, q: &[f32], kv: &LayerKv, spans: &[RowSpan]) -> Vec<f32> {
    let hd = shape.kv.head_dim;
    let heads = shape.heads;
    let group = heads / shape.kv.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let total_rows: usize = spans.iter().map(|s| s.rows).sum();
    // (span index, position) of every row.
    let mut row_info = Vec::with_capacity(total_rows);
    for (i, s) in spans.iter().enumerate() {
        debug_assert_eq!(s.first_row, row_info.len());
        row_info.extend((0..s.rows).map(|r| (i, s.start_pos + r)));
    }
    let mut out = vec![0.0f32; total_rows * heads * hd];
    out.par_chunks_mut(hd)
        .enumerate()
        .with_min_len(4)
        .for_each_init(Vec::new, |scores, (i, o)| {
            let (row, head) = (i / heads, i % heads);
            let (span, pos) = row_info[row];
            let q_row = &q[(row * heads + head) * hd..][..hd];
            attend(
                shape.kv,
                kv,
                spans[span].blocks,
                head / group,
                pos,
                q_row,
                scale,
                scores,
                o,
            );
        });
    out
}

/// One query vector against positions `0..=pos` of one KV head.
#[allow(clippy::too_many_arguments)]
fn attend(
    s: KvShape,
    kv: &LayerKv,
    blocks: &[u32],
    kv_head: usize,
    pos: usize,
    q: &[f32],
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let hd = s.head_dim;
    let n = pos + 1;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for (b, &block) in blocks.iter().enumerate().take(n.div_ceil(BLOCK_SIZE)) {
        let base = offset(s, block as usize, kv_head, 0);
        let in_block = (n - b * BLOCK_SIZE).min(BLOCK_SIZE);
        for slot in 0..in_block {
            let k = &kv.k[base + slot * hd..][..hd];
            let x = dot(q, k) * scale;
            max = max.max(x);
            scores.push(x);
        }
    }
    let mut sum = 0.0;
    for x in scores.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    let inv = 1.0 / sum;
    out.fill(0.0);
    for (b, &block) in blocks.iter().enumerate().take(n.div_ceil(BLOCK_SIZE)) {
        let base = offset(s, block as usize, kv_head, 0);
        let in_block = (n - b * BLOCK_SIZE).min(BLOCK_SIZE);
        for slot in 0..in_block {
            let p = scores[b * BLOCK_SIZE + slot] * inv;
            let v = &kv.v[base + slot * hd..][..hd];
            for (o, &vv) in out.iter_mut().zip(v) {
                *o += p * vv;
            }
        }
    }
}

/// Dot product with 16 independent accumulators, so the compiler vectorizes it while the
/// summation order stays fixed.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
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
    ) -> Vec<f32> {
        let rows = q.len() / (heads * hd);
        let start = k.len() - rows;
        let mut out = vec![0.0; q.len()];
        for r in 0..rows {
            let pos = start + r;
            for h in 0..heads {
                let g = h / (heads / kv_heads);
                let qv = &q[(r * heads + h) * hd..][..hd];
                let s: Vec<f32> = (0..=pos)
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
                        (0..=pos).map(|j| e[j] / z * v[j][g * hd + d]).sum();
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
        let out = paged_attention(&AttnShape { heads, kv: shape }, &q, cache.layer(0), &spans);
        let want_a = reference(&qa, &ka, &va, heads, kv_heads, hd);
        let want_b = reference(&qb, &kb, &vb, heads, kv_heads, hd);
        let want: Vec<f32> = want_a.iter().chain(&want_b).copied().collect();
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-5, "element {i}: {g} vs {w}");
        }
    }
}
