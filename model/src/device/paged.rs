//! Attention that reads each sequence's keys and values where they lie in the paged
//! cache, a query row at a time, as one candle op: on CUDA our kernel
//! ([`super::cuda`]), on candle's CPU device a plain reference of the same computation
//! (what CI checks the device forward with, and what the kernel's host tests compare
//! against). Decoding rows always come here; a prompt chunk's rows too in a fixed-shape
//! step ([`super::graphs`]), each row a query of its own.
//!
//! A row's plan is one row of [`RowPlans`]: the positions it sees (its own included),
//! the first one it sees (after a sliding window), then its block table.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::cuda::KernelShape;
use super::kv::slot;
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};
use crate::kv::BLOCK_SIZE;

/// How a step's decoding rows attend on a device (`--device-attention`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceAttention {
    /// Our kernel reads each row's blocks in place (CUDA), or its reference (CPU). Shapes
    /// the kernel does not serve fall back to the gather.
    #[default]
    Paged,
    /// Each row's keys and values are gathered into padded tensors and multiplied as
    /// dense batched matrices (candle's own ops only).
    Gather,
}

/// The paged decode attention of one model on one device.
pub(crate) struct PagedDecoder {
    shape: KernelShape,
    #[cfg(feature = "cuda")]
    kernel: Option<super::cuda::PagedKernel>,
}

impl PagedDecoder {
    /// `None` when the kernel does not serve this shape or this device. On a CUDA
    /// device the kernel is compiled and loaded here, at start; if NVRTC or the driver
    /// fails (NVRTC's builtins library missing, say), the gather serves decoding rows and
    /// the log says why.
    pub(crate) fn new(shape: KernelShape, device: &Device) -> Option<Self> {
        if !shape.supported() {
            return None;
        }
        #[cfg(feature = "cuda")]
        let kernel = match device {
            // Loaded here too, not at the first step's launch: a driver that rejects the
            // module (one older than the CUDA it was compiled by) must leave decoding
            // rows to the gather, not fail every step.
            Device::Cuda(d) => {
                match super::cuda::PagedKernel::compile(shape).and_then(|k| k.load(d).map(|()| k)) {
                    Ok(k) => Some(k),
                    Err(e) => {
                        tracing::warn!(error = %e, "no paged attention kernel: decoding rows gather instead");
                        return None;
                    }
                }
            }
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        if !device.is_cpu() {
            return None;
        }
        Some(Self {
            shape,
            #[cfg(feature = "cuda")]
            kernel,
        })
    }

    /// `q`: `[n, heads * head_dim]` f32 (the rows, in the order of `meta`'s
    /// rows); `keys`, `values`: the layer's cache. Returns `[n, heads * head_dim]` f32.
    pub(crate) fn forward(
        &self,
        q: &Tensor,
        keys: &Tensor,
        values: &Tensor,
        meta: &RowPlans,
        kv_heads: usize,
        scale: f32,
    ) -> Result<Tensor> {
        let op = PagedDecode {
            decoder: self,
            meta,
            kv_heads,
            scale,
        };
        Ok(q.contiguous()?.apply_op3_no_bwd(keys, values, &op)?)
    }
}

/// The plans of the rows a paged op attends for, for one attention window, on the
/// device: `[rows, stride]` u32, a row per query row (see [`write_plans`]). The kernel
/// and the CPU reference both read this tensor, so a fixed-shape step that refills it in
/// place ([`super::graphs`]) is checked on the CPU as it runs on the GPU.
pub(crate) struct RowPlans {
    plan: Tensor,
}

impl RowPlans {
    /// The plans of every row of `spans`.
    pub(crate) fn new(spans: &[&RowSpan], window: Option<usize>, device: &Device) -> Result<Self> {
        let stride = 2 + spans.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        let rows: usize = spans.iter().map(|s| s.rows).sum();
        let mut host = Vec::with_capacity(rows * stride);
        write_plans(spans, window, stride, &mut host)?;
        Ok(Self {
            plan: Tensor::from_vec(host, (rows, stride), device)?,
        })
    }

    /// Plans already on the device, `[rows, stride]` u32.
    pub(crate) fn on_device(plan: Tensor) -> Self {
        Self { plan }
    }

    /// How many rows.
    fn rows(&self) -> usize {
        self.plan.dims().first().copied().unwrap_or(0)
    }

    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn device(&self) -> &Tensor {
        &self.plan
    }

    pub(crate) fn stride(&self) -> usize {
        self.plan.dims().get(1).copied().unwrap_or(0)
    }
}

/// Appends the plan of each row of `spans` to `out`, `stride` values each: the positions
/// the row sees (its own included: the keys and values of a step's rows are written
/// before it attends, and a prompt chunk's row sees those before it), the first one it
/// sees (after a sliding `window`), then its sequence's block table, padded with zeros.
pub(crate) fn write_plans(
    spans: &[&RowSpan],
    window: Option<usize>,
    stride: usize,
    out: &mut Vec<u32>,
) -> Result<()> {
    for s in spans {
        let end = s.start_pos + s.rows;
        if end > s.blocks.len() * BLOCK_SIZE || 2 + s.blocks.len() > stride {
            return Err(ModelError::Kv(format!(
                "rows up to position {end} have {} blocks",
                s.blocks.len()
            )));
        }
        for ctx in s.start_pos + 1..=end {
            let lo = window.map_or(0, |w| ctx.saturating_sub(w));
            out.extend([ctx as u32, lo as u32]);
            out.extend_from_slice(s.blocks);
            out.resize(out.len() + stride - 2 - s.blocks.len(), 0);
        }
    }
    Ok(())
}

struct PagedDecode<'a> {
    decoder: &'a PagedDecoder,
    meta: &'a RowPlans,
    kv_heads: usize,
    scale: f32,
}

/// Checks that the buffers an op's launch reads hold what its rows' plans say: `q` a row
/// of `kv_heads * group * head_dim` values per plan row, the plans `stride` values each,
/// the keys and values whole slots of `kv_heads * head_dim`. The kernel reads them
/// unchecked, and a read past a buffer's end on a GPU poisons the whole context. (The
/// plans' block ids are checked against the cache before the step:
/// `DeviceModel::forward`.)
pub(crate) fn check_sizes(
    shape: KernelShape,
    kv_heads: usize,
    meta: &RowPlans,
    (q, plan, keys, values): (usize, usize, usize, usize),
) -> candle_core::Result<()> {
    let (rows, stride) = (meta.rows(), meta.stride());
    let kv_dim = kv_heads * shape.head_dim;
    let q_dim = kv_dim * shape.group;
    if q != rows * q_dim {
        candle_core::bail!("paged attention: q holds {q} values, not {rows} rows of {q_dim}");
    }
    if stride < 2 || plan != rows * stride {
        candle_core::bail!(
            "paged attention: the plan holds {plan} values, not {rows} rows of {stride}"
        );
    }
    if keys != values || kv_dim == 0 || !keys.is_multiple_of(kv_dim) {
        candle_core::bail!(
            "paged attention: the cache's keys ({keys}) and values ({values}) are not whole slots of {kv_dim}"
        );
    }
    Ok(())
}

/// `storage`'s values under `layout`, which must be contiguous.
fn contiguous<'a, T>(values: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&values[a..b]),
        None => candle_core::bail!("paged attention: {what} is not contiguous"),
    }
}

impl CustomOp3 for PagedDecode<'_> {
    fn name(&self) -> &'static str {
        "paged-decode-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        keys: &CpuStorage,
        kl: &Layout,
        values: &CpuStorage,
        vl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(q) = q else {
            candle_core::bail!("paged attention: queries must be f32");
        };
        let q = contiguous(q, ql, "q")?;
        let out = match (keys, values) {
            (CpuStorage::F16(k), CpuStorage::F16(v)) => self.reference(
                q,
                contiguous(k, kl, "keys")?,
                contiguous(v, vl, "values")?,
                half::f16::to_f32,
            )?,
            (CpuStorage::BF16(k), CpuStorage::BF16(v)) => self.reference(
                q,
                contiguous(k, kl, "keys")?,
                contiguous(v, vl, "values")?,
                half::bf16::to_f32,
            )?,
            _ => candle_core::bail!("paged attention: the cache must be f16 or bf16"),
        };
        let n = self.meta.rows();
        let dims = (n, out.len() / n.max(1));
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        keys: &candle_core::CudaStorage,
        kl: &Layout,
        values: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let Some(kernel) = &self.decoder.kernel else {
            candle_core::bail!("paged attention: the kernel was not compiled for this device");
        };
        kernel.launch(
            (q, ql),
            (keys, kl),
            (values, vl),
            self.meta,
            self.kv_heads,
            self.scale,
        )
    }
}

impl PagedDecode<'_> {
    /// Plain softmax attention of every decoding row over the positions its plan
    /// names, in f32: the semantics the kernel implements. Rows in parallel.
    fn reference<T: Copy + Sync>(
        &self,
        q: &[f32],
        keys: &[T],
        values: &[T],
        to_f32: fn(T) -> f32,
    ) -> candle_core::Result<Vec<f32>> {
        let (hd, group, kvh) = (
            self.decoder.shape.head_dim,
            self.decoder.shape.group,
            self.kv_heads,
        );
        let (q_dim, kv_dim) = (kvh * group * hd, kvh * hd);
        let (plan, plan_layout) = self.meta.plan.storage_and_layout();
        let Storage::Cpu(CpuStorage::U32(plan)) = &*plan else {
            candle_core::bail!("paged attention: the plan is not u32 on the CPU");
        };
        let plan = contiguous(plan, plan_layout, "the plan")?;
        check_sizes(
            self.decoder.shape,
            kvh,
            self.meta,
            (q.len(), plan.len(), keys.len(), values.len()),
        )?;
        let (n, stride) = (self.meta.rows(), self.meta.stride());
        let mut out = vec![0f32; n * q_dim];
        out.par_chunks_mut(q_dim)
            .zip(q.par_chunks(q_dim))
            .zip(plan.par_chunks(stride.max(1)))
            .try_for_each(|((out, q), plan)| {
                let (ctx, lo, table) = (plan[0] as usize, plan[1] as usize, &plan[2..]);
                // Where position `p`'s values of KV head `h` start in the cache.
                let at = |p: usize, h: usize| slot(table, p) as usize * kv_dim + h * hd;
                let mut scores = Vec::with_capacity(ctx - lo);
                for h in 0..kvh * group {
                    let kv_head = h / group;
                    let qh = &q[h * hd..][..hd];
                    scores.clear();
                    for p in lo..ctx {
                        let k = cache_row(keys, at(p, kv_head), hd)?;
                        let s: f32 = qh.iter().zip(k).map(|(a, &b)| a * to_f32(b)).sum();
                        scores.push(s * self.scale);
                    }
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut sum = 0.0;
                    for s in &mut scores {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let o = &mut out[h * hd..][..hd];
                    for (p, w) in (lo..ctx).zip(&scores) {
                        let v = cache_row(values, at(p, kv_head), hd)?;
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += w / sum * to_f32(v);
                        }
                    }
                }
                Ok::<(), candle_core::Error>(())
            })?;
        Ok(out)
    }
}

/// `len` cache values from `at`, or an error if they are outside the cache.
fn cache_row<T>(cache: &[T], at: usize, len: usize) -> candle_core::Result<&[T]> {
    match cache.get(at..at + len) {
        Some(row) => Ok(row),
        None => candle_core::bail!("paged attention: a position is outside the cache"),
    }
}

/// The cache type a compute type keeps: two bytes a value, as the CPU's cache does.
pub(crate) fn cache_dtype(compute: DType) -> DType {
    match compute {
        DType::BF16 => DType::BF16,
        _ => DType::F16,
    }
}
