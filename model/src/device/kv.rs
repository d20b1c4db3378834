//! The paged KV cache as device memory: per layer, keys and values of every slot
//! (`block * BLOCK_SIZE + offset`) as `[slots, kv_heads * head_dim]`. The block ids are
//! the scheduler's, the same as the CPU cache's; only the storage differs. One block past
//! the scheduler's, the scratch block, is written and read by the padding rows of
//! fixed-shape steps ([`super::graphs`]) and by no sequence.

use candle_core::{DType, Device, Tensor};

use super::kv_write::{KvWrite, KvWriteKernel};
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};
use crate::kv::{KvShape, BLOCK_SIZE};

pub(crate) struct DeviceKv {
    /// The scheduler's blocks; the scratch block is the next id.
    num_blocks: usize,
    /// `(keys, values)` of each layer.
    layers: Vec<(Tensor, Tensor)>,
    /// Our write kernel on a CUDA device; `None` on the CPU (the op's reference writes)
    /// and on a GPU whose NVRTC or driver refused it (candle's `scatter_set` writes).
    kernel: Option<KvWriteKernel>,
}

impl DeviceKv {
    /// `dtype` is f16 or bf16: two bytes a value, as [`KvShape::block_bytes`] counts.
    pub(crate) fn new(
        shape: KvShape,
        num_blocks: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if num_blocks == 0 {
            return Err(ModelError::Kv("the KV budget holds no block".into()));
        }
        let dims = (
            (num_blocks + 1) * BLOCK_SIZE,
            shape.kv_heads * shape.head_dim,
        );
        let layers = (0..shape.layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(dims, dtype, device)?,
                    Tensor::zeros(dims, dtype, device)?,
                ))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            num_blocks,
            layers,
            kernel: write_kernel(device),
        })
    }

    pub(crate) fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The block no sequence owns.
    pub(crate) fn scratch_block(&self) -> u32 {
        self.num_blocks as u32
    }

    /// Writes `k` and `v` (`[rows, kv_dim]`, f32; a row's values side by side, the rows
    /// any distance apart) into layer `layer` at `slots` (`[rows, 1]` u32).
    pub(crate) fn write(&self, layer: usize, slots: &Tensor, k: &Tensor, v: &Tensor) -> Result<()> {
        let (keys, values) = &self.layers[layer];
        let op = KvWrite {
            kernel: self.kernel.as_ref(),
        };
        for (cache, new) in [(keys, k), (values, v)] {
            if op.kernel.is_some() || cache.device().is_cpu() {
                let new = new.to_dtype(DType::F32)?;
                let new = match new.stride().last() {
                    Some(1) => new,
                    _ => new.contiguous()?,
                };
                cache.inplace_op3(&new, slots, &op)?;
            } else {
                let slots = slots.broadcast_as(new.shape())?.contiguous()?;
                cache.scatter_set(&slots, &new.to_dtype(cache.dtype())?.contiguous()?, 0)?;
            }
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values, every slot.
    pub(crate) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (keys, values) = &self.layers[layer];
        (keys, values)
    }

    /// Keys and values of layer `layer` at `slots` (`[n]` u32): `[n, kv_dim]` each.
    pub(crate) fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let (keys, values) = &self.layers[layer];
        Ok((keys.index_select(slots, 0)?, values.index_select(slots, 0)?))
    }

    /// Copies every layer's keys and values of block `src` into block `dst`.
    pub(crate) fn copy_block(&self, src: u32, dst: u32) -> Result<()> {
        if src.max(dst) as usize >= self.num_blocks {
            return Err(ModelError::Kv("a block id is outside the cache".into()));
        }
        let (src, dst) = (src as usize * BLOCK_SIZE, dst as usize * BLOCK_SIZE);
        for (keys, values) in &self.layers {
            for t in [keys, values] {
                // A copy of the block alone (`copy` would clone the whole layer's
                // storage): `slice_set` refuses a source sharing the target's.
                let block = t.narrow(0, src, BLOCK_SIZE)?.force_contiguous()?;
                t.slice_set(&block, 0, dst)?;
            }
        }
        Ok(())
    }
}

/// Our KV write kernel, compiled and loaded at start on a CUDA device; if NVRTC or the
/// driver refuses it, candle's `scatter_set` writes instead and the log says why.
fn write_kernel(device: &Device) -> Option<KvWriteKernel> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        return match KvWriteKernel::compile().and_then(|k| k.load(d).map(|()| k)) {
            Ok(k) => Some(k),
            Err(e) => {
                tracing::warn!(error = %e, "no KV write kernel: candle's scatter writes the cache instead");
                None
            }
        };
    }
    let _ = device;
    None
}

/// The cache slot of position `pos` of a sequence with block table `blocks`.
pub(crate) fn slot(blocks: &[u32], pos: usize) -> u32 {
    blocks[pos / BLOCK_SIZE] * BLOCK_SIZE as u32 + (pos % BLOCK_SIZE) as u32
}

/// The cache slot of every row of `spans`, in batch order.
pub(crate) fn row_slots<'a>(spans: &'a [RowSpan<'a>]) -> impl Iterator<Item = u32> + 'a {
    spans
        .iter()
        .flat_map(|s| (0..s.rows).map(move |r| slot(s.blocks, s.start_pos + r)))
}
