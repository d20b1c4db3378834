//! Attention of a ragged batch on a device. Decoding rows go to the paged decode op
//! ([`super::paged`]), which reads each row's blocks in place, unless
//! `--device-attention gather` or the model's shape rules it out. Prefill chunks, and
//! decoding rows without it, gather each sequence's keys and values from the paged cache
//! into contiguous tensors and multiply them as dense batched matrices. A fixed-shape
//! step ([`super::graphs`]) sends every row, a chunk's too, through the paged op
//! ([`StepAttention::paged`]).
//!
//! The step's sequences fall into two groups: those decoding (one row each) and those
//! prefilling (a chunk each, usually of similar sizes). A gathered group is one batch
//! padded to its longest chunk and longest context and masked, so that neither group
//! pads to the other's shape and the number of operations per layer does not grow with
//! the batch. The plans (block tables, slots, masks) are built once per step on the host
//! and uploaded once; every layer reuses them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::kv::{slot, DeviceKv};
use super::paged::{PagedDecoder, RowPlans};
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};

/// The most attention scores (f32) a gathered group computes at once: a long prompt's
/// chunk beside a long context takes its query rows a tile at a time, so that its scores
/// stay within 512 MiB and within the 32-bit element indices candle's CUDA kernels use
/// (its softmax's among them), which a `[n, heads, rows, len]` tensor of a 4,096-token
/// chunk over a 16,384-token context with 32 heads would pass. A tile is one row at
/// least: decoding rows under `--device-attention gather` (one row each) are not split,
/// and hundreds of them over tens of thousands of positions can still pass the bound.
const MAX_SCORES: usize = 1 << 27;

/// The shape of attention in one model.
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// A step's attention plan: where every row's keys and values are, and what it sees.
pub(crate) struct StepAttention<'a> {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// The most f32 scores a gathered group computes at once ([`MAX_SCORES`]).
    max_scores: usize,
    groups: Vec<Group<'a>>,
    /// For each batch row, its place among the groups' padded output rows; `None` when
    /// that is the identity.
    order: Option<Tensor>,
}

/// Sequences computed together: `n` sequences of at most `rows` rows attending to at
/// most `len` positions.
struct Group<'a> {
    n: usize,
    rows: usize,
    len: usize,
    /// Each padded row's batch row (padding repeats a real row).
    q_rows: QueryRows,
    how: Plan<'a>,
}

/// Where a group's query rows are in the batch.
enum QueryRows {
    /// The batch rows from this one on, in order (every decode-only step): a view.
    Run(usize),
    /// `[n * rows]` u32 batch rows, gathered.
    Select(Tensor),
}

impl QueryRows {
    fn new(rows: Vec<u32>, device: &Device) -> Result<Self> {
        let first = rows.first().copied().unwrap_or(0);
        let run = rows.iter().zip(first..).all(|(&r, i)| r == i);
        Ok(match run {
            true => Self::Run(first as usize),
            false => {
                let n = rows.len();
                Self::Select(Tensor::from_vec(rows, n, device)?)
            }
        })
    }

    /// The group's `count` query rows of `q`.
    fn of(&self, q: &Tensor, count: usize) -> Result<Tensor> {
        Ok(match self {
            Self::Run(first) => q.narrow(0, *first, count)?,
            Self::Select(rows) => q.index_select(rows, 0)?,
        })
    }
}

enum Plan<'a> {
    /// One padded batch over gathered keys and values.
    Gather {
        /// `[n * len]` u32: each sequence's slots, padded with its first slot.
        slots: Tensor,
        /// `[n, 1, 1, rows, len]` per window: 0 where a row sees a position, -inf
        /// elsewhere.
        masks: HashMap<Option<usize>, Tensor>,
    },
    /// Decoding rows through the paged op, one plan per window.
    Paged {
        op: &'a PagedDecoder,
        metas: HashMap<Option<usize>, RowPlans>,
    },
}

impl<'a> StepAttention<'a> {
    /// `windows`: the distinct sliding windows of the layers (`None` is full attention).
    /// `paged`: the decode op, when decoding rows go through it.
    pub(crate) fn new(
        h: &Heads,
        spans: &[RowSpan],
        windows: &[Option<usize>],
        device: &Device,
        paged: Option<&'a PagedDecoder>,
    ) -> Result<Self> {
        let total: usize = spans.iter().map(|s| s.rows).sum();
        let mut order = vec![0u32; total];
        let mut groups = Vec::with_capacity(2);
        let mut produced = 0;
        for decoding in [true, false] {
            let members: Vec<&RowSpan> = spans
                .iter()
                .filter(|s| s.rows > 0 && (s.rows == 1) == decoding)
                .collect();
            if members.is_empty() {
                continue;
            }
            let group = Group::new(&members, windows, device, paged.filter(|_| decoding))?;
            for (j, s) in members.iter().enumerate() {
                for r in 0..s.rows {
                    order[s.first_row + r] = (produced + j * group.rows + r) as u32;
                }
            }
            produced += group.n * group.rows;
            groups.push(group);
        }
        let identity = produced == total && order.iter().enumerate().all(|(i, &o)| i as u32 == o);
        Ok(Self {
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            scale: f64::from(h.scale),
            max_scores: MAX_SCORES,
            groups,
            order: match identity {
                true => None,
                false => Some(Tensor::from_vec(order, total, device)?),
            },
        })
    }

    /// The plan of a step whose `rows` rows all attend through `op`, each a query of its
    /// own, with `metas` (one per window) already on the device: what a fixed-shape step
    /// reuses ([`super::graphs`]).
    pub(crate) fn paged(
        h: &Heads,
        op: &'a PagedDecoder,
        rows: usize,
        metas: HashMap<Option<usize>, RowPlans>,
    ) -> Self {
        Self {
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            scale: f64::from(h.scale),
            max_scores: MAX_SCORES,
            groups: vec![Group {
                n: rows,
                rows: 1,
                len: 1,
                q_rows: QueryRows::Run(0),
                how: Plan::Paged { op, metas },
            }],
            order: None,
        }
    }

    /// `q`: `[rows, heads * head_dim]` f32, rope applied, the step's keys and values
    /// already written. Returns `[rows, heads * head_dim]` f32.
    pub(crate) fn forward(
        &self,
        q: &Tensor,
        kv: &DeviceKv,
        layer: usize,
        window: Option<usize>,
        dtype: DType,
    ) -> Result<Tensor> {
        let mut parts = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let part = match &g.how {
                Plan::Gather { slots, masks } => {
                    let mask = masks.get(&window).ok_or_else(|| no_plan(window))?;
                    self.gathered(g, q, kv.gather(layer, slots)?, mask, dtype)?
                }
                Plan::Paged { op, metas } => {
                    let meta = metas.get(&window).ok_or_else(|| no_plan(window))?;
                    let (keys, values) = kv.layer(layer);
                    let q = g.q_rows.of(q, g.n)?;
                    op.forward(&q, keys, values, meta, self.kv_heads, self.scale as f32)?
                }
            };
            parts.push(part);
        }
        let out = match parts.len() {
            1 => parts.remove(0),
            _ => Tensor::cat(&parts, 0)?,
        };
        Ok(match &self.order {
            Some(order) => out.index_select(order, 0)?,
            None => out,
        })
    }

    /// `softmax(q · kᵀ · scale + mask) · v` for one group over its gathered keys and
    /// values (`[n * len, kv_dim]` each), the scores in f32, a tile of query rows at a
    /// time (see [`MAX_SCORES`]). Returns `[n * rows, heads * head_dim]` f32, padding
    /// rows included.
    fn gathered(
        &self,
        g: &Group,
        q: &Tensor,
        (k, v): (Tensor, Tensor),
        mask: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        let (kvh, hd) = (self.kv_heads, self.head_dim);
        let group = self.heads / kvh;
        let (n, rows, len) = (g.n, g.rows, g.len);
        // [n, kvh, group, rows, hd]: the query heads sharing a KV head, row by row,
        // scaled in f32 before the cast, so that the scores' products stay as small as
        // they end (f16's range ends at 65504).
        let q = (g.q_rows.of(q, n * rows)? * self.scale)?
            .reshape((n, rows, kvh, group, hd))?
            .permute((0, 2, 3, 1, 4))?
            .to_dtype(dtype)?;
        // [n, kvh, len, hd]
        let heads_first = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(dtype)?)
        };
        let (k, v) = (heads_first(k)?, heads_first(v)?);
        let kt = k.t()?;
        let tile = (self.max_scores / (n * self.heads * len).max(1)).clamp(1, rows);
        let mut tiles = Vec::with_capacity(rows.div_ceil(tile));
        for first in (0..rows).step_by(tile) {
            let m = tile.min(rows - first);
            let q = q
                .narrow(3, first, m)?
                .contiguous()?
                .reshape((n, kvh, group * m, hd))?;
            let scores = q
                .matmul(&kt)?
                .to_dtype(DType::F32)?
                .reshape((n, kvh, group, m, len))?
                .broadcast_add(&mask.narrow(3, first, m)?)?;
            let p = candle_nn::ops::softmax_last_dim(&scores)?
                .reshape((n, kvh, group * m, len))?
                .to_dtype(dtype)?;
            tiles.push(p.matmul(&v)?.reshape((n, kvh, group, m, hd))?);
        }
        let out = match tiles.len() {
            1 => tiles.remove(0),
            _ => Tensor::cat(&tiles, 3)?,
        };
        // [n, kvh, group, rows, hd] → [n * rows, heads * hd]
        Ok(out
            .to_dtype(DType::F32)?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?
            .reshape((n * rows, self.heads * hd))?)
    }
}

fn no_plan(window: Option<usize>) -> ModelError {
    ModelError::Kv(format!("no attention was planned for window {window:?}"))
}

impl<'a> Group<'a> {
    /// `paged`: the op, when the sequences are decoding rows for it.
    fn new(
        spans: &[&RowSpan],
        windows: &[Option<usize>],
        device: &Device,
        paged: Option<&'a PagedDecoder>,
    ) -> Result<Self> {
        let n = spans.len();
        let rows = spans.iter().map(|s| s.rows).max().unwrap_or(1);
        let len = spans
            .iter()
            .map(|s| s.start_pos + s.rows)
            .max()
            .unwrap_or(1);
        let mut q_rows = Vec::with_capacity(n * rows);
        for s in spans {
            q_rows.extend((0..rows).map(|r| (s.first_row + r.min(s.rows - 1)) as u32));
        }
        let q_rows = QueryRows::new(q_rows, device)?;
        if let Some(op) = paged {
            let metas = windows
                .iter()
                .map(|&w| Ok((w, RowPlans::new(spans, w, device)?)))
                .collect::<Result<_>>()?;
            return Ok(Self {
                n,
                rows,
                len,
                q_rows,
                how: Plan::Paged { op, metas },
            });
        }
        let mut slots = Vec::with_capacity(n * len);
        for s in spans {
            let ctx = s.start_pos + s.rows;
            slots.extend((0..ctx).map(|p| slot(s.blocks, p)));
            slots.extend(std::iter::repeat_n(slot(s.blocks, 0), len - ctx));
        }
        let mut masks = HashMap::new();
        for &w in windows {
            let mut m = Vec::with_capacity(n * rows * len);
            for s in spans {
                for r in 0..rows {
                    match r < s.rows {
                        true => m.extend((0..len).map(|p| visible(p, s.start_pos + r, w))),
                        // A padding row sees position 0 only, so that its softmax has a
                        // term; its result is dropped.
                        false => m.extend((0..len).map(|p| visible(p, 0, None))),
                    }
                }
            }
            masks.insert(w, Tensor::from_vec(m, (n, 1, 1, rows, len), device)?);
        }
        Ok(Self {
            n,
            rows,
            len,
            q_rows,
            how: Plan::Gather {
                slots: Tensor::from_vec(slots, n * len, device)?,
                masks,
            },
        })
    }
}

/// 0 if a row at `pos` attends to position `p`, else -inf: causal, and within the last
/// `window` positions on sliding-window layers.
fn visible(p: usize, pos: usize, window: Option<usize>) -> f32 {
    let lo = window.map_or(0, |w| (pos + 1).saturating_sub(w));
    match (lo..=pos).contains(&p) {
        true => 0.0,
        false => f32::NEG_INFINITY,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code: a failure here is a test failure

    use super::*;
    use crate::kv::{KvShape, BLOCK_SIZE};

    /// A gathered group's rows in tiles of any size give what they give at once: two
    /// prompt chunks of different lengths (one after a cached history) beside a decoding
    /// row, full attention and a sliding window.
    #[test]
    fn row_tiles_give_what_the_whole_group_gives() {
        let dev = Device::Cpu;
        let h = Heads {
            heads: 4,
            kv_heads: 2,
            head_dim: 8,
            scale: 0.35,
        };
        let kv_dim = h.kv_heads * h.head_dim;
        let blocks = 8;
        let kv = DeviceKv::new(
            KvShape {
                layers: 1,
                kv_heads: h.kv_heads,
                head_dim: h.head_dim,
            },
            blocks,
            DType::F16,
            &dev,
        )
        .unwrap();
        let slots = blocks * BLOCK_SIZE;
        let ids = Tensor::arange(0, slots as u32, &dev)
            .unwrap()
            .reshape((slots, 1))
            .unwrap();
        let random = || Tensor::randn(0f32, 1., (slots, kv_dim), &dev).unwrap();
        kv.write(0, &ids, &random(), &random()).unwrap();
        let tables: [&[u32]; 3] = [&[0, 1, 2], &[3, 4], &[5]];
        let spans = [
            RowSpan {
                first_row: 0,
                rows: 13,
                start_pos: 10,
                blocks: tables[0],
            },
            RowSpan {
                first_row: 13,
                rows: 1,
                start_pos: 4,
                blocks: tables[2],
            },
            RowSpan {
                first_row: 14,
                rows: 7,
                start_pos: 0,
                blocks: tables[1],
            },
        ];
        let windows = [None, Some(6)];
        let mut att = StepAttention::new(&h, &spans, &windows, &dev, None).unwrap();
        let q = Tensor::randn(0f32, 1., (21, h.heads * h.head_dim), &dev).unwrap();
        for window in windows {
            att.max_scores = usize::MAX;
            let whole: Vec<Vec<f32>> = att
                .forward(&q, &kv, 0, window, DType::F32)
                .unwrap()
                .to_vec2()
                .unwrap();
            // The prompt group: 2 sequences, 4 heads, 23 positions; tiles of 1, 3 and 5
            // rows (the last one short).
            for tile in [1, 3, 5] {
                att.max_scores = 2 * 4 * 23 * tile;
                let tiled: Vec<Vec<f32>> = att
                    .forward(&q, &kv, 0, window, DType::F32)
                    .unwrap()
                    .to_vec2()
                    .unwrap();
                for (r, (a, b)) in whole.iter().zip(&tiled).enumerate() {
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 1e-5,
                            "window {window:?}, tiles of {tile}: row {r}: {x} against {y}"
                        );
                    }
                }
            }
        }
    }
}
