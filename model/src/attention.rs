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
use crate::prefetch::prefetch;

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

/// Rows of one sequence computed together: each key and value block is converted from
/// f16 once per tile and read by all its rows, instead of once per row (a long prompt's
/// chunk attends to the same history with every row).
const TILE_ROWS: usize = 16;

/// Blocks ahead of the one being read whose keys (or values) are prefetched: enough for
/// the memory's latency to pass while four blocks are computed on (`decode_long` was
/// best at 4 of 1, 2, 4, 6 and 8).
const PREFETCH_AHEAD: usize = 4;

/// `q`: `[rows, heads * head_dim]` (rope applied). Returns `[rows, heads * head_dim]`.
/// The KV of every row's position must already be written.
pub fn paged_attention(shape: &AttnShape, q: &[f32], kv: &LayerKv, spans: &[RowSpan]) -> Vec<f32> {
    let hd = shape.kv.head_dim;
    let (heads, kv_heads) = (shape.heads, shape.kv.kv_heads);
    let group = heads / kv_heads;
    let width = group * hd;
    let total_rows: usize = spans.iter().map(|s| s.rows).sum();
    // (span, first row within it, rows) of every tile.
    let mut tiles = Vec::with_capacity(spans.len());
    for (i, s) in spans.iter().enumerate() {
        let mut r = 0;
        while r < s.rows {
            let n = TILE_ROWS.min(s.rows - r);
            tiles.push((i, r, n));
            r += n;
        }
    }
    // One task per (tile, KV head): the query heads sharing a KV head read it once. Its
    // results land KV head first (`[kv_head][row][group * head_dim]`), so that each task
    // owns one contiguous slice; they are put in row order at the end.
    let mut by_head = vec![0.0f32; kv_heads * total_rows * width];
    let mut parts = Vec::with_capacity(kv_heads * tiles.len());
    let mut rest = by_head.as_mut_slice();
    for kv_head in 0..kv_heads {
        for &(span, r0, rows) in &tiles {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(rows * width);
            rest = tail;
            parts.push((kv_head, span, r0, rows, part));
        }
    }
    parts.into_par_iter().for_each_init(
        Scratch::default,
        |scratch, (kv_head, span, r0, rows, o)| {
            let s = &spans[span];
            let first_row = s.first_row + r0;
            let tile = Tile {
                s: shape.kv,
                kv,
                blocks: s.blocks,
                kv_head,
                first_pos: s.start_pos + r0,
                rows,
                window: shape.window,
                scale: shape.scale,
            };
            let q_of = |j: usize| &q[((first_row + j) * heads + kv_head * group) * hd..][..width];
            tile.attend(q_of, scratch, o);
        },
    );
    let mut out = vec![0.0f32; total_rows * heads * hd];
    for (row, o) in out.chunks_exact_mut(heads * hd).enumerate() {
        for (h, o) in o.chunks_exact_mut(width).enumerate() {
            o.copy_from_slice(&by_head[(h * total_rows + row) * width..][..width]);
        }
    }
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

/// Consecutive rows of one sequence, with the query heads that share `kv_head`.
///
/// Every row is computed with the same operations in the same order as if it were alone
/// (its scores block by block, its softmax over its own positions, its values summed slot
/// by slot from its own first block): tiling changes what is shared, never a result.
struct Tile<'a> {
    s: KvShape,
    kv: &'a LayerKv,
    blocks: &'a [u32],
    kv_head: usize,
    /// Position of the first row.
    first_pos: usize,
    rows: usize,
    window: Option<usize>,
    scale: f32,
}

impl Tile<'_> {
    /// The positions row `j` attends to: `lo..n`.
    fn range(&self, j: usize) -> (usize, usize) {
        let n = self.first_pos + j + 1;
        (self.window.map_or(0, |w| n.saturating_sub(w)), n)
    }

    /// Whether row `j` reads block `b` of the block table.
    fn reads(&self, j: usize, b: usize) -> bool {
        let (from, to) = self.blocks_of(j);
        (from..to).contains(&b)
    }

    /// The blocks row `j` reads: `first..last` of the block table.
    fn blocks_of(&self, j: usize) -> (usize, usize) {
        let (lo, n) = self.range(j);
        (lo / BLOCK_SIZE, n.div_ceil(BLOCK_SIZE))
    }

    /// Where this tile's KV head starts in the block [`PREFETCH_AHEAD`] after `b`, if
    /// the tile reads it (`last`: the end of its blocks).
    fn block_ahead(&self, b: usize, last: usize) -> Option<usize> {
        let ahead = b + PREFETCH_AHEAD;
        (ahead < last).then(|| offset(self.s, self.blocks[ahead] as usize, self.kv_head, 0))
    }

    /// `q_of(j)`: row `j`'s query heads, `[group][head_dim]`; `out`: `[rows][group][head_dim]`.
    fn attend<'q>(
        &self,
        q_of: impl Fn(usize) -> &'q [f32],
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let hd = self.s.head_dim;
        let Scratch {
            scores,
            keys: k,
            values,
        } = scratch;
        let group = out.len() / (self.rows * hd);
        let first = self.blocks_of(0).0;
        let (_, n_last) = self.range(self.rows - 1);
        let last = self.blocks_of(self.rows - 1).1;
        let stride = (last - first) * BLOCK_SIZE;
        // [row][group][stride]: raw scores, then probabilities. Slots outside a row's
        // `lo..n` in its first and last blocks end up with probability 0 or are never read.
        scores.clear();
        scores.resize(self.rows * group * stride, 0.0);
        k.resize(hd * BLOCK_SIZE, 0.0);
        for b in first..last {
            let base = offset(self.s, self.blocks[b] as usize, self.kv_head, 0);
            if let Some(ahead) = self.block_ahead(b, last) {
                prefetch(&self.kv.k[ahead..][..hd * BLOCK_SIZE]);
            }
            // Keys are stored `[head_dim][slot]`: one pass gives all 16 slots' scores.
            self.kv.k[base..][..hd * BLOCK_SIZE].convert_to_f32_slice(k);
            // The rows reading block `b` are consecutive; their (row, head) query vectors
            // `p = row * group + head` are scored `SCORED_TOGETHER` at a time.
            let Some(j0) = (0..self.rows).find(|&j| self.reads(j, b)) else {
                continue;
            };
            let j1 = (j0..self.rows)
                .find(|&j| !self.reads(j, b))
                .unwrap_or(self.rows);
            let (mut p, end) = (j0 * group, j1 * group);
            let column = (b - first) * BLOCK_SIZE;
            let q_at = |p: usize| &q_of(p / group)[(p % group) * hd..][..hd];
            while p < end {
                let n = (end - p).min(SCORED_TOGETHER);
                match n {
                    4 => score_vectors::<4>(p, &q_at, k, scores, stride, column),
                    3 => score_vectors::<3>(p, &q_at, k, scores, stride, column),
                    2 => score_vectors::<2>(p, &q_at, k, scores, stride, column),
                    _ => score_vectors::<1>(p, &q_at, k, scores, stride, column),
                }
                p += n;
            }
        }
        for j in 0..self.rows {
            let (lo, n) = self.range(j);
            let own = (lo / BLOCK_SIZE - first) * BLOCK_SIZE;
            let (lo, n) = (lo - first * BLOCK_SIZE, n - first * BLOCK_SIZE);
            for h in 0..group {
                let row = &mut scores[(j * group + h) * stride..][..stride];
                row[own..lo].fill(0.0);
                let valid = &mut row[lo..n];
                let max = lanes_max(valid);
                for x in valid.iter_mut() {
                    *x = exp((*x - max) * self.scale);
                }
                let inv = 1.0 / lanes_sum(valid);
                valid.iter_mut().for_each(|x| *x *= inv);
            }
        }
        // out = Σ_slot p[slot] · v[slot], block by block, each row from its first block.
        out.fill(0.0);
        values.resize(hd * BLOCK_SIZE, 0.0);
        for b in first..last {
            let base = offset(self.s, self.blocks[b] as usize, self.kv_head, 0);
            let start = b * BLOCK_SIZE;
            let filled = (n_last - start).min(BLOCK_SIZE);
            if let Some(ahead) = self.block_ahead(b, last) {
                prefetch(&self.kv.v[ahead..][..hd * BLOCK_SIZE]);
            }
            self.kv.v[base..][..filled * hd].convert_to_f32_slice(&mut values[..filled * hd]);
            for j in 0..self.rows {
                let (from, to) = self.blocks_of(j);
                if b < from || b >= to {
                    continue;
                }
                let slots = (self.range(j).1 - start).min(BLOCK_SIZE);
                let v = &values[..slots * hd];
                for h in 0..group {
                    let p = &scores[(j * group + h) * stride + (b - first) * BLOCK_SIZE..][..slots];
                    let o = &mut out[(j * group + h) * hd..][..hd];
                    match hd {
                        64 => accumulate::<64>(p, v, o),
                        128 => accumulate::<128>(p, v, o),
                        256 => accumulate::<256>(p, v, o),
                        _ => accumulate_any(p, v, o),
                    }
                }
            }
        }
    }
}

/// `out += Σ_slot p[slot] · v[slot]` in slot order, in registers for a known head size.
#[inline]
fn accumulate<const D: usize>(p: &[f32], v: &[f32], out: &mut [f32]) {
    let Ok(out) = <&mut [f32; D]>::try_from(out) else {
        return;
    };
    let mut acc = *out;
    for (&p, v) in p.iter().zip(v.chunks_exact(D)) {
        if let Ok(v) = <&[f32; D]>::try_from(v) {
            for (a, &v) in acc.iter_mut().zip(v) {
                *a = p.mul_add(v, *a);
            }
        }
    }
    *out = acc;
}

fn accumulate_any(p: &[f32], v: &[f32], out: &mut [f32]) {
    for (&p, v) in p.iter().zip(v.chunks_exact(out.len())) {
        for (o, &v) in out.iter_mut().zip(v) {
            *o = p.mul_add(v, *o);
        }
    }
}

/// Query vectors scored against a key block in one pass: each is an independent chain of
/// multiply-adds, so several keep the FMA units busy where one waits on its own latency.
const SCORED_TOGETHER: usize = 4;

/// Scores query vectors `p..p + N` (`q_at(p)`: `[head_dim]`) against one key block into
/// `scores[p * stride + column..][..BLOCK_SIZE]`.
#[inline]
fn score_vectors<'q, const N: usize>(
    p: usize,
    q_at: &impl Fn(usize) -> &'q [f32],
    k: &[f32],
    scores: &mut [f32],
    stride: usize,
    column: usize,
) {
    let qs: [&[f32]; N] = std::array::from_fn(|i| q_at(p + i));
    for (i, s) in block_scores(qs, k).iter().enumerate() {
        scores[(p + i) * stride + column..][..BLOCK_SIZE].copy_from_slice(s);
    }
}

/// `q · k[:, slot]` for the 16 slots of a key block stored `[head_dim][slot]`, for `N`
/// query vectors: one 16-lane multiply-add per head dimension and vector, no horizontal
/// sums. Each vector's sums run over the head dimension in order, whatever `N` is.
#[inline(always)]
fn block_scores<const N: usize>(qs: [&[f32]; N], k: &[f32]) -> [[f32; BLOCK_SIZE]; N] {
    let mut acc = [[0.0f32; BLOCK_SIZE]; N];
    for (d, row) in k.chunks_exact(BLOCK_SIZE).enumerate() {
        let Ok(row) = <&[f32; BLOCK_SIZE]>::try_from(row) else {
            continue;
        };
        for (acc, q) in acc.iter_mut().zip(&qs) {
            let qd = q[d];
            for (a, &k) in acc.iter_mut().zip(row) {
                *a = qd.mul_add(k, *a);
            }
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

    /// A long chunk computed in tiles gives every row exactly (bit for bit) what the row
    /// gets computed alone, and matches the plain computation; with and without a window.
    #[test]
    fn tiles_give_each_row_what_it_gets_alone() {
        let (heads, kv_heads, hd) = (6, 2, 64);
        let shape = KvShape {
            layers: 1,
            kv_heads,
            head_dim: hd,
        };
        let len = 70;
        let mut cache = KvCache::new(shape, 8).unwrap();
        let blocks = [3u32, 0, 7, 1, 5];
        let k: Vec<Vec<f32>> = (0..len).map(|t| pseudo(kv_heads * hd, t)).collect();
        let v: Vec<Vec<f32>> = (0..len).map(|t| pseudo(kv_heads * hd, 900 + t)).collect();
        for t in 0..len as usize {
            cache.write(0, &blocks, t, &k[t], &v[t]);
        }
        // The last 37 positions as one chunk: tiles of 16, 16 and 5 rows.
        let (start, rows) = (33, 37);
        let q = pseudo(rows * heads * hd, 77);
        for window in [None, Some(20), Some(40)] {
            let attn = AttnShape {
                heads,
                kv: shape,
                scale: 1.0 / (hd as f32).sqrt(),
                window,
            };
            let chunk = [RowSpan {
                first_row: 0,
                rows,
                start_pos: start,
                blocks: &blocks,
            }];
            let together = paged_attention(&attn, &q, cache.layer(0), &chunk);
            let alone: Vec<RowSpan> = (0..rows)
                .map(|r| RowSpan {
                    first_row: r,
                    rows: 1,
                    start_pos: start + r,
                    blocks: &blocks,
                })
                .collect();
            let apart = paged_attention(&attn, &q, cache.layer(0), &alone);
            assert!(
                together
                    .iter()
                    .zip(&apart)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "window {window:?}: a row's result depends on its tile"
            );
            let round = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> {
                rows.iter()
                    .map(|r| r.iter().map(|&x| half::f16::from_f32(x).to_f32()).collect())
                    .collect()
            };
            let want = reference(&q, &round(&k), &round(&v), heads, kv_heads, hd, window);
            for (i, (g, w)) in together.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() < 1e-5,
                    "window {window:?}, element {i}: {g} vs {w}"
                );
            }
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
