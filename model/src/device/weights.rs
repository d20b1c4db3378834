//! Weights on a candle device: projections dense in the compute type or in the file's
//! quantized blocks, vectors (norms, biases, the embedding) in f32.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::transformer::LayerWeights;

/// How projection weights are held on the device (`--device-weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceWeights {
    /// Dequantized once to the compute type and multiplied by the device's dense gemm
    /// (cuBLAS on CUDA): 2 bytes per weight in f16/bf16, the fastest for large batches.
    #[default]
    Dense,
    /// The file's 4/8-bit blocks, multiplied by candle's quantized kernels, which round
    /// activations to 8 bits: a quarter of the memory and of the bytes a small batch
    /// reads per step.
    Quantized,
    /// Both, and each step multiplies with the one measured faster for its number of
    /// rows: at start the device times a step of each at every power of two up to
    /// `up_to` rows. The memory of both.
    Auto { up_to: usize },
}

/// A `[n, k]` projection on the device (`y = x · wᵀ`).
pub(crate) enum DeviceLinear {
    /// `[n, k]` in the compute type.
    Dense(Tensor),
    Quantized(QMatMul),
    /// Both forms of a quantized projection (`DeviceWeights::Auto`).
    Both {
        dense: Tensor,
        quantized: QMatMul,
    },
}

impl DeviceLinear {
    /// Moves a loaded projection onto `device`. It must have been loaded as candle
    /// tensors ([`crate::WeightFormat::Quantized`] for GGUF files, unpacked for HF
    /// checkpoints): the packed CPU formats keep no tensor to move.
    pub(crate) fn new(
        linear: Linear,
        device: &Device,
        dtype: DType,
        how: DeviceWeights,
    ) -> Result<Self> {
        let Linear::Candle(w) = linear else {
            return Err(ModelError::Unsupported(
                "a projection packed for the CPU kernels cannot move to a device".into(),
            ));
        };
        let quantized = |q: &QTensor| -> Result<QMatMul> {
            let storage = QStorage::from_data(q.data()?, device, q.dtype())?;
            Ok(QMatMul::from_qtensor(QTensor::new(
                storage,
                q.shape().clone(),
            )?)?)
        };
        let dense = |q: &QTensor| on(&q.dequantize(&Device::Cpu)?, device, dtype);
        Ok(match (w, how) {
            (QMatMul::QTensor(q), DeviceWeights::Quantized | DeviceWeights::Auto { .. })
                if !multiplied_in_blocks(device, q.dtype()) =>
            {
                tracing::warn!(
                    dtype = ?q.dtype(),
                    "no quantized kernel for these blocks on this device: dense instead"
                );
                Self::Dense(dense(&q)?)
            }
            (QMatMul::QTensor(q), DeviceWeights::Quantized) => Self::Quantized(quantized(&q)?),
            (QMatMul::QTensor(q), DeviceWeights::Dense) => Self::Dense(dense(&q)?),
            (QMatMul::QTensor(q), DeviceWeights::Auto { .. }) => Self::Both {
                dense: dense(&q)?,
                quantized: quantized(&q)?,
            },
            (QMatMul::Tensor(t) | QMatMul::TensorF16(t), _) => Self::Dense(on(&t, device, dtype)?),
        })
    }

    /// `x · wᵀ` for `x`: `[rows, k]` f32, with the quantized form where there are both
    /// and `quantized` says so. Returns `[rows, n]` f32.
    pub(crate) fn forward(&self, x: &Tensor, quantized: bool) -> Result<Tensor> {
        let dense = |w: &Tensor| -> Result<Tensor> {
            Ok(x.to_dtype(w.dtype())?
                .matmul(&w.t()?)?
                .to_dtype(DType::F32)?)
        };
        Ok(match self {
            Self::Dense(w) => dense(w)?,
            Self::Quantized(w) => w.forward(x)?,
            Self::Both { quantized: w, .. } if quantized => w.forward(x)?,
            Self::Both { dense: w, .. } => dense(w)?,
        })
    }

    /// Whether [`Self::forward`] with `quantized` goes through the quantized kernels.
    pub(crate) fn multiplies_quantized(&self, quantized: bool) -> bool {
        match self {
            Self::Dense(_) => false,
            Self::Quantized(_) => true,
            Self::Both { .. } => quantized,
        }
    }

    pub(crate) fn has_both(&self) -> bool {
        matches!(self, Self::Both { .. })
    }
}

/// Whether candle multiplies blocks of type `t` on `device` without dequantizing them:
/// on CUDA, the types of its quantized kernels (any other fails at the first product).
fn multiplied_in_blocks(device: &Device, t: GgmlDType) -> bool {
    use GgmlDType::*;
    !device.is_cuda()
        || matches!(
            t,
            Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q2K | Q3K | Q4K | Q5K | Q6K
        )
}

/// One decoder layer's weights on the device; see [`LayerWeights`].
pub(crate) struct DeviceLayer {
    pub attn_norm: Tensor,
    pub qkv: DeviceLinear,
    pub qkv_bias: Option<Tensor>,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
    pub out: DeviceLinear,
    pub post_attn_norm: Option<Tensor>,
    pub ffn_norm: Tensor,
    pub gate_up: DeviceLinear,
    pub down: DeviceLinear,
    pub post_ffn_norm: Option<Tensor>,
}

impl DeviceLayer {
    pub(crate) fn new(
        w: LayerWeights,
        device: &Device,
        dtype: DType,
        how: DeviceWeights,
    ) -> Result<Self> {
        let linear = |l| DeviceLinear::new(l, device, dtype, how);
        let opt = |v: Option<Vec<f32>>| v.map(|v| vector(v, device)).transpose();
        Ok(Self {
            attn_norm: vector(w.attn_norm, device)?,
            qkv: linear(w.qkv)?,
            qkv_bias: opt(w.qkv_bias)?,
            q_norm: opt(w.q_norm)?,
            k_norm: opt(w.k_norm)?,
            out: linear(w.out)?,
            post_attn_norm: opt(w.post_attn_norm)?,
            ffn_norm: vector(w.ffn_norm, device)?,
            gate_up: linear(w.gate_up)?,
            down: linear(w.down)?,
            post_ffn_norm: opt(w.post_ffn_norm)?,
        })
    }
}

/// An f32 vector on the device.
pub(crate) fn vector(v: Vec<f32>, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?)
}

/// `t` in `dtype` on `device`, contiguous (converted on the host, where it is cheap to
/// hold both copies).
fn on(t: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.contiguous()?.to_device(device)?)
}
