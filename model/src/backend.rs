//! The one seam the engine drives a model through: the packed CPU kernels over the f16
//! block pool in host memory, or the candle-tensor forward on a device ([`crate::device`]).
//! Both take the same ragged batch over the same block tables and return the same logits.

use crate::config::ModelConfig;
use crate::device::{DeviceModel, DeviceOptions};
use crate::error::Result;
use crate::kv::KvCache;
use crate::transformer::{SeqInput, Transformer};

/// What a step gives back for a row whose logits were wanted.
#[derive(Debug, Clone, PartialEq)]
pub enum StepRow {
    /// The row's logits over the vocabulary.
    Logits(Vec<f32>),
    /// Only the row's argmax (the lowest id among equal maxima), found where the logits
    /// are, for a caller that asked for nothing else ([`Backend::forward_rows`]).
    Argmax(u32),
}

impl StepRow {
    pub fn into_logits(self) -> Option<Vec<f32>> {
        match self {
            Self::Logits(row) => Some(row),
            Self::Argmax(_) => None,
        }
    }

    pub fn logits(&self) -> Option<&[f32]> {
        match self {
            Self::Logits(row) => Some(row),
            Self::Argmax(_) => None,
        }
    }
}

pub enum Backend {
    /// [`Transformer`] and its [`KvCache`]: the CPU path.
    Packed {
        model: Box<Transformer>,
        kv: KvCache,
    },
    Device(Box<DeviceModel>),
}

impl Backend {
    /// `model` with a cache of `num_blocks` blocks: on `device` when given, else on the
    /// packed CPU path.
    pub fn new(
        model: Transformer,
        device: Option<&DeviceOptions>,
        num_blocks: usize,
    ) -> Result<Self> {
        Ok(match device {
            None => {
                let kv = KvCache::new(model.config().kv_shape(), num_blocks)?;
                Self::Packed {
                    model: Box::new(model),
                    kv,
                }
            }
            Some(opts) => Self::Device(Box::new(DeviceModel::new(model, opts, num_blocks)?)),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Self::Packed { model, .. } => model.config(),
            Self::Device(m) => m.config(),
        }
    }

    /// Runs one step; see [`Transformer::forward`].
    pub fn forward(&mut self, batch: &[SeqInput]) -> Result<Vec<Vec<f32>>> {
        match self {
            Self::Packed { model, kv } => model.forward(kv, batch),
            Self::Device(m) => m.forward(batch),
        }
    }

    /// How long the last step's logits took to reach the host once the device was done
    /// with the step (for greedy rows, the argmax's kernels and the ids' copy instead), in
    /// ms; 0 on the packed path, which has nothing to copy.
    pub fn copy_ms(&self) -> f64 {
        match self {
            Self::Packed { .. } => 0.0,
            Self::Device(m) => m.copy_ms(),
        }
    }

    /// Runs one step like [`Self::forward`], where `argmax_only[i]` says that sequence
    /// `i`'s caller needs only the argmax of its last row's logits (it samples greedily
    /// and nothing adjusts them). On a device that row comes back as its argmax, found
    /// there, instead of as logits copied to the host; the packed path, whose logits are
    /// on the host already, returns logits throughout. Rows of a sequence that wants
    /// every row's logits are logits.
    pub fn forward_rows(
        &mut self,
        batch: &[SeqInput],
        argmax_only: &[bool],
    ) -> Result<Vec<StepRow>> {
        match self {
            Self::Packed { model, kv } => Ok((model.forward(kv, batch)?.into_iter())
                .map(StepRow::Logits)
                .collect()),
            Self::Device(m) => m.forward_rows(batch, argmax_only),
        }
    }

    /// Copies every layer's keys and values of block `src` into block `dst`.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        match self {
            Self::Packed { kv, .. } => {
                kv.copy_block(src, dst);
                Ok(())
            }
            Self::Device(m) => m.copy_block(src, dst),
        }
    }

    /// Where the forward runs, for logs and `/health`: `cpu`, `cuda:0`, or `candle-cpu`
    /// (the device path on candle's CPU device).
    /// How decoding rows attend on a device; `None` on the packed path.
    pub fn device_attention(&self) -> Option<crate::DeviceAttention> {
        match self {
            Self::Packed { .. } => None,
            Self::Device(m) => Some(m.attention()),
        }
    }

    /// On a device: the largest step run at a fixed shape, in rows, and whether such steps
    /// are captured as CUDA graphs ([`DeviceModel::fixed_steps`]).
    pub fn fixed_steps(&self) -> Option<(usize, bool)> {
        match self {
            Self::Packed { .. } => None,
            Self::Device(m) => m.fixed_steps(),
        }
    }

    pub fn device_name(&self) -> String {
        match self {
            Self::Packed { .. } => "cpu".into(),
            Self::Device(m) => match m.device().location() {
                candle_core::DeviceLocation::Cpu => "candle-cpu".into(),
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
            },
        }
    }
}
