//! Attention of a ragged batch on a device, by gathering each sequence's keys and
//! values from the paged cache into contiguous tensors and multiplying them as dense
//! batched matrices (a first version: a kernel reading blocks in place would skip the
//! gather's copy).
//!
//! Rows that decode (one row each) are computed together, padded to the longest context
//! among them and masked; each prefill chunk is computed on its own against its whole
//! history, with a causal mask. The indices and masks are built once per step on the
//! host and uploaded once; every layer reuses them.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};

use super::kv::{slot, DeviceKv};
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};

/// A step's attention plan: where every row's keys and values are, and what it sees.
pub(crate) struct StepAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    /// The decoding rows (sequences with one row this step), if any.
    decode: Option<DecodeRows>,
    prefills: Vec<PrefillRows>,
    /// Batch row order from the order results are produced in (decode rows first, then
    /// each prefill chunk); `None` when the two agree.
    order: Option<Tensor>,
}

struct DecodeRows {
    /// `[n]` u32: their rows in the batch.
    rows: Tensor,
    n: usize,
    /// The longest context among them.
    len: usize,
    /// `[n * len]` u32: each row's slots, padded with its first slot.
    slots: Tensor,
    /// Each row's context length and position, for the masks.
    ctx: Vec<usize>,
    masks: HashMap<Option<usize>, Tensor>,
}

struct PrefillRows {
    first_row: usize,
    rows: usize,
    start_pos: usize,
    /// `[start_pos + rows]` u32.
    slots: Tensor,
    masks: HashMap<Option<usize>, Tensor>,
}

/// The shape of attention in one model.
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

impl StepAttention {
    /// `windows`: the sliding windows some layers use (`None` is full attention).
    pub(crate) fn new(
        h: &Heads,
        spans: &[RowSpan],
        windows: &[Option<usize>],
        device: &Device,
    ) -> Result<Self> {
        let rows: usize = spans.iter().map(|s| s.rows).sum();
        let decoding: Vec<&RowSpan> = spans.iter().filter(|s| s.rows == 1).collect();
        let decode = match decoding.is_empty() {
            true => None,
            false => Some(DecodeRows::new(&decoding, windows, device)?),
        };
        let mut prefills = Vec::new();
        for s in spans.iter().filter(|s| s.rows > 1) {
            prefills.push(PrefillRows::new(s, windows, device)?);
        }
        // Position of each batch row in the produced order.
        let mut produced = Vec::with_capacity(rows);
        produced.extend(decoding.iter().map(|s| s.first_row));
        for p in &prefills {
            produced.extend(p.first_row..p.first_row + p.rows);
        }
        let mut order = vec![0u32; rows];
        for (at, &row) in produced.iter().enumerate() {
            order[row] = at as u32;
        }
        let identity = order.iter().enumerate().all(|(i, &o)| i as u32 == o);
        Ok(Self {
            heads: h.heads,
            kv_heads: h.kv_heads,
            head_dim: h.head_dim,
            scale: f64::from(h.scale),
            decode,
            prefills,
            order: match identity {
                true => None,
                false => Some(Tensor::from_vec(order, rows, device)?),
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
        let (kvh, hd) = (self.kv_heads, self.head_dim);
        let group = self.heads / kvh;
        let q_dim = self.heads * hd;
        let mut parts = Vec::with_capacity(1 + self.prefills.len());
        if let Some(d) = &self.decode {
            let (n, len) = (d.n, d.len);
            // [n, kvh, group, hd]
            let qd = q.index_select(&d.rows, 0)?.reshape((n, kvh, group, hd))?;
            let (k, v) = kv.gather(layer, &d.slots)?;
            // [n, kvh, len, hd]
            let k = k
                .reshape((n, len, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let v = v
                .reshape((n, len, kvh, hd))?
                .transpose(1, 2)?
                .contiguous()?;
            let mask = mask_of(&d.masks, window)?;
            let o = self.softmax_attend(&qd, &k, &v, mask, dtype)?;
            parts.push(o.reshape((n, q_dim))?);
        }
        for p in &self.prefills {
            let (rows, ctx) = (p.rows, p.start_pos + p.rows);
            // [kvh, group * rows, hd]
            let qp = q
                .narrow(0, p.first_row, rows)?
                .reshape((rows, kvh, group, hd))?
                .permute((1, 2, 0, 3))?
                .contiguous()?
                .reshape((kvh, group * rows, hd))?;
            let (k, v) = kv.gather(layer, &p.slots)?;
            // [kvh, ctx, hd]
            let k = k.reshape((ctx, kvh, hd))?.transpose(0, 1)?.contiguous()?;
            let v = v.reshape((ctx, kvh, hd))?.transpose(0, 1)?.contiguous()?;
            let mask = mask_of(&p.masks, window)?;
            // [kvh, group * rows, hd] → [rows, kvh, group, hd]
            let o = self
                .softmax_attend_rows(&qp, &k, &v, mask, group, rows, dtype)?
                .reshape((kvh, group, rows, hd))?
                .permute((2, 0, 1, 3))?
                .contiguous()?;
            parts.push(o.reshape((rows, q_dim))?);
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

    /// `softmax(q · kᵀ · scale + mask) · v` over the last two dims, the scores in f32.
    /// `q`: `[.., m, hd]`, `k`/`v`: `[.., len, hd]`, `mask` broadcast to `[.., m, len]`.
    fn softmax_attend(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        dtype: DType,
    ) -> Result<Tensor> {
        let scores = self.scores(q, k, dtype)?.broadcast_add(mask)?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(p.to_dtype(dtype)?
            .matmul(&v.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?)
    }

    /// As [`Self::softmax_attend`] for one prefill chunk, whose `group * rows` query rows
    /// share a `[rows, len]` mask.
    #[allow(clippy::too_many_arguments)]
    fn softmax_attend_rows(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        group: usize,
        rows: usize,
        dtype: DType,
    ) -> Result<Tensor> {
        let scores = self.scores(q, k, dtype)?;
        let (kvh, _, len) = scores.dims3()?;
        let scores = scores
            .reshape((kvh, group, rows, len))?
            .broadcast_add(mask)?
            .reshape((kvh, group * rows, len))?;
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        Ok(p.to_dtype(dtype)?
            .matmul(&v.to_dtype(dtype)?)?
            .to_dtype(DType::F32)?)
    }

    /// `q · kᵀ · scale` in f32.
    fn scores(&self, q: &Tensor, k: &Tensor, dtype: DType) -> Result<Tensor> {
        let k = k.to_dtype(dtype)?;
        Ok((q
            .to_dtype(dtype)?
            .matmul(&k.transpose(D::Minus2, D::Minus1)?)?
            .to_dtype(DType::F32)?
            * self.scale)?)
    }
}

impl DecodeRows {
    fn new(spans: &[&RowSpan], windows: &[Option<usize>], device: &Device) -> Result<Self> {
        let n = spans.len();
        let ctx: Vec<usize> = spans.iter().map(|s| s.start_pos + 1).collect();
        let len = ctx.iter().copied().max().unwrap_or(1);
        let mut slots = Vec::with_capacity(n * len);
        for s in spans {
            let c = s.start_pos + 1;
            slots.extend((0..c).map(|p| slot(s.blocks, p)));
            slots.extend(std::iter::repeat_n(slot(s.blocks, 0), len - c));
        }
        let rows: Vec<u32> = spans.iter().map(|s| s.first_row as u32).collect();
        let mut me = Self {
            rows: Tensor::from_vec(rows, n, device)?,
            n,
            len,
            slots: Tensor::from_vec(slots, n * len, device)?,
            ctx,
            masks: HashMap::new(),
        };
        for &w in windows {
            if !me.masks.contains_key(&w) {
                let m = me.build_mask(w, device)?;
                me.masks.insert(w, m);
            }
        }
        Ok(me)
    }

    /// `[n, 1, 1, len]`: 0 where the row sees the position, -inf elsewhere.
    fn build_mask(&self, window: Option<usize>, device: &Device) -> Result<Tensor> {
        let mut m = Vec::with_capacity(self.n * self.len);
        for &c in &self.ctx {
            m.extend((0..self.len).map(|p| visible(p, c - 1, window)));
        }
        Ok(Tensor::from_vec(m, (self.n, 1, 1, self.len), device)?)
    }
}

impl PrefillRows {
    fn new(s: &RowSpan, windows: &[Option<usize>], device: &Device) -> Result<Self> {
        let ctx = s.start_pos + s.rows;
        let slots: Vec<u32> = (0..ctx).map(|p| slot(s.blocks, p)).collect();
        let mut masks = HashMap::new();
        for &w in windows {
            if !masks.contains_key(&w) {
                let mut m = Vec::with_capacity(s.rows * ctx);
                for r in 0..s.rows {
                    m.extend((0..ctx).map(|p| visible(p, s.start_pos + r, w)));
                }
                masks.insert(w, Tensor::from_vec(m, (s.rows, ctx), device)?);
            }
        }
        Ok(Self {
            first_row: s.first_row,
            rows: s.rows,
            start_pos: s.start_pos,
            slots: Tensor::from_vec(slots, ctx, device)?,
            masks,
        })
    }
}

/// The mask built for `window` when the step was planned.
fn mask_of(masks: &HashMap<Option<usize>, Tensor>, window: Option<usize>) -> Result<&Tensor> {
    masks
        .get(&window)
        .ok_or_else(|| ModelError::Kv(format!("no mask was planned for window {window:?}")))
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
