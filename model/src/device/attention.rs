//! Attention of a ragged batch on a device, by gathering each sequence's keys and
//! values from the paged cache into contiguous tensors and multiplying them as dense
//! batched matrices (a first version: a kernel reading blocks in place would skip the
//! gather's copy).
//!
//! The step's sequences fall into two groups, each computed as one batch padded to its
//! longest chunk and longest context and masked: those decoding (one row each) and those
//! prefilling (a chunk each, usually of similar sizes), so that neither pads to the
//! other's shape and the number of operations per layer does not grow with the batch.
//! The indices and masks are built once per step on the host and uploaded once; every
//! layer reuses them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::kv::{slot, DeviceKv};
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};

/// The shape of attention in one model.
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// A step's attention plan: where every row's keys and values are, and what it sees.
pub(crate) struct StepAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    groups: Vec<Group>,
    /// For each batch row, its place among the groups' padded output rows; `None` when
    /// that is the identity.
    order: Option<Tensor>,
}

/// Sequences computed as one padded batch: `n` sequences of at most `rows` rows
/// attending to at most `len` positions.
struct Group {
    n: usize,
    rows: usize,
    len: usize,
    /// `[n * rows]` u32: each padded row's batch row (padding repeats a real row).
    q_rows: Tensor,
    /// `[n * len]` u32: each sequence's slots, padded with its first slot.
    slots: Tensor,
    /// `[n, 1, 1, rows, len]` per window: 0 where a row sees a position, -inf elsewhere.
    masks: HashMap<Option<usize>, Tensor>,
}

impl StepAttention {
    /// `windows`: the sliding windows some layers use (`None` is full attention).
    pub(crate) fn new(
        h: &Heads,
        spans: &[RowSpan],
        windows: &[Option<usize>],
        device: &Device,
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
            let group = Group::new(&members, windows, device)?;
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
            groups,
            order: match identity {
                true => None,
                false => Some(Tensor::from_vec(order, total, device)?),
            },
        })
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
            parts.push(self.group(g, q, kv, layer, window, dtype)?);
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

    /// `softmax(q · kᵀ · scale + mask) · v` for one group, the scores in f32. Returns
    /// `[n * rows, heads * head_dim]` f32, padding rows included.
    fn group(
        &self,
        g: &Group,
        q: &Tensor,
        kv: &DeviceKv,
        layer: usize,
        window: Option<usize>,
        dtype: DType,
    ) -> Result<Tensor> {
        let (kvh, hd) = (self.kv_heads, self.head_dim);
        let group = self.heads / kvh;
        let (n, rows, len) = (g.n, g.rows, g.len);
        // [n, kvh, group * rows, hd]: the query heads sharing a KV head, row by row.
        let q = q
            .index_select(&g.q_rows, 0)?
            .reshape((n, rows, kvh, group, hd))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((n, kvh, group * rows, hd))?
            .to_dtype(dtype)?;
        let (k, v) = kv.gather(layer, &g.slots)?;
        // [n, kvh, len, hd]
        let heads_first = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((n, len, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?
                .to_dtype(dtype)?)
        };
        let (k, v) = (heads_first(k)?, heads_first(v)?);
        let mask = g
            .masks
            .get(&window)
            .ok_or_else(|| ModelError::Kv(format!("no mask was planned for window {window:?}")))?;
        let scores = (q
            .matmul(&k.transpose(D::Minus2, D::Minus1)?)?
            .to_dtype(DType::F32)?
            * self.scale)?
            .reshape((n, kvh, group, rows, len))?
            .broadcast_add(mask)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?
            .reshape((n, kvh, group * rows, len))?
            .to_dtype(dtype)?;
        // [n, kvh, group, rows, hd] → [n * rows, heads * hd]
        Ok(p.matmul(&v)?
            .to_dtype(DType::F32)?
            .reshape((n, kvh, group, rows, hd))?
            .permute((0, 3, 1, 2, 4))?
            .contiguous()?
            .reshape((n * rows, self.heads * hd))?)
    }
}

impl Group {
    fn new(spans: &[&RowSpan], windows: &[Option<usize>], device: &Device) -> Result<Self> {
        let n = spans.len();
        let rows = spans.iter().map(|s| s.rows).max().unwrap_or(1);
        let len = spans
            .iter()
            .map(|s| s.start_pos + s.rows)
            .max()
            .unwrap_or(1);
        let mut q_rows = Vec::with_capacity(n * rows);
        let mut slots = Vec::with_capacity(n * len);
        for s in spans {
            let ctx = s.start_pos + s.rows;
            q_rows.extend((0..rows).map(|r| (s.first_row + r.min(s.rows - 1)) as u32));
            slots.extend((0..ctx).map(|p| slot(s.blocks, p)));
            slots.extend(std::iter::repeat_n(slot(s.blocks, 0), len - ctx));
        }
        let mut masks = HashMap::new();
        for &w in windows {
            if masks.contains_key(&w) {
                continue;
            }
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
            q_rows: Tensor::from_vec(q_rows, n * rows, device)?,
            slots: Tensor::from_vec(slots, n * len, device)?,
            masks,
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
