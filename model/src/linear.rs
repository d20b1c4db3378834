//! A projection weight `[n, k]` (`y = x · wᵀ`) in one of the in-memory formats, chosen by
//! `--weights`, behind one `forward`.

use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use crate::error::{ModelError, Result};
use crate::int8::Int8Linear;
use crate::packed::PackedLinear;

/// How projection weights are held in memory and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightFormat {
    /// The file's 4/8-bit blocks, repacked, dequantized on the fly, f32 activations
    /// ([`crate::packed`]): f32 accuracy at ~0.63 bytes per weight.
    Packed,
    /// The same blocks multiplied by integer SIMD kernels ([`crate::int8`]) with
    /// activations rounded to 8 bits per block, as llama.cpp does: the fastest; perplexity
    /// +0.2%, and knife-edge greedy choices flip (benches/RESULTS.md).
    PackedInt8,
    /// As `PackedInt8` with a second 8-bit limb per activation (~15 bits): greedy answers
    /// stay the f32 path's, at twice the integer work. Float weights stay on `Packed`.
    #[default]
    PackedInt16,
    /// Dequantized to f32, multiplied by candle's f32 gemm. 4 bytes per weight.
    F32,
    /// As shipped, multiplied by candle's quantized kernels, which round activations to
    /// 8 bits (visibly worse answers from small models).
    Quantized,
}

/// How safetensors projection weights are held (`--dtype`); activations stay f32 and are
/// cast to this type for each matmul.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Dtype {
    fn candle(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }
}

pub enum Linear {
    Packed(PackedLinear),
    Int8(Int8Linear),
    Candle(QMatMul),
}

impl Linear {
    /// The row-wise stack of `parts` (q/k/v, gate/up) as one weight in `format`.
    pub fn new(parts: Vec<QTensor>, format: WeightFormat) -> Result<Self> {
        Ok(match format {
            WeightFormat::Packed => Self::Packed(PackedLinear::from_parts(&parts)?),
            WeightFormat::PackedInt8 | WeightFormat::PackedInt16 => {
                let two_limbs = format == WeightFormat::PackedInt16;
                match Int8Linear::from_parts(&parts, two_limbs)? {
                    Some(w) => Self::Int8(w),
                    None => Self::Packed(PackedLinear::from_parts(&parts)?),
                }
            }
            WeightFormat::Quantized => Self::Candle(stack_rows(parts)?),
            WeightFormat::F32 => {
                let dense = parts
                    .iter()
                    .map(|p| p.dequantize(&Device::Cpu))
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Self::Candle(QMatMul::Tensor(Tensor::cat(&dense, 0)?.contiguous()?))
            }
        })
    }

    /// The row-wise stack of dense `parts` (`[n_i, k]` each), held as `dtype`. f32 goes
    /// to the packed kernels (row-invariant, fastest here) unless the weight is bound for
    /// a device; bf16/f16 to candle's gemm.
    pub fn dense(parts: &[Tensor], dtype: Dtype, for_device: bool) -> Result<Self> {
        let parts = parts
            .iter()
            .map(|p| p.to_dtype(dtype.candle()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let w = Tensor::cat(&parts, 0)?.contiguous()?;
        Ok(match dtype {
            Dtype::F32 if !for_device => {
                let (n, k) = w.dims2()?;
                Self::Packed(PackedLinear::from_dense(
                    &w.flatten_all()?.to_vec1::<f32>()?,
                    n,
                    k,
                ))
            }
            _ => Self::Candle(QMatMul::Tensor(w)),
        })
    }

    /// `(n, k)`: output and input widths.
    pub fn shape(&self) -> Result<(usize, usize)> {
        Ok(match self {
            Self::Packed(p) => p.shape(),
            Self::Int8(p) => p.shape(),
            Self::Candle(QMatMul::QTensor(t)) => t.shape().dims2()?,
            Self::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.shape().dims2()?,
        })
    }

    /// `x · wᵀ` for `x`: `[rows, k]`. Returns `[rows, n]`.
    pub fn forward(&self, x: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
        match self {
            Self::Packed(p) => Ok(p.forward(&x, rows)),
            Self::Int8(p) => Ok(p.forward(&x, rows)),
            Self::Candle(w) => candle_matmul(w, x, rows),
        }
    }
}

/// `x · wᵀ` for `x`: `[rows, cols]`.
///
/// gemm computes a single row on another path than several rows (results differ in the
/// last bits), so a lone row is padded to two: a row's result then never depends on how
/// many rows share the step, and a request's output not on what else is running.
fn candle_matmul(w: &QMatMul, mut x: Vec<f32>, rows: usize) -> Result<Vec<f32>> {
    let cols = x.len() / rows.max(1);
    let pad = rows == 1 && matches!(w, QMatMul::Tensor(_));
    if pad {
        x.extend_from_within(..cols);
    }
    let t = Tensor::from_vec(x, (rows + usize::from(pad), cols), &Device::Cpu)?;
    let y = match w {
        QMatMul::Tensor(w) if w.dtype() != DType::F32 => t
            .to_dtype(w.dtype())?
            .matmul(&w.t()?)?
            .to_dtype(DType::F32)?,
        _ => w.forward(&t)?,
    };
    let mut out = y.flatten_all()?.to_vec1::<f32>()?;
    if pad {
        out.truncate(out.len() / 2);
    }
    Ok(out)
}

/// Stacks quantized matrices of one type by rows (`[n_i, k]` → `[Σ n_i, k]`). Quantized
/// blocks run along rows, so the stacked bytes are the parts' bytes one after another.
fn stack_rows(mut parts: Vec<QTensor>) -> Result<QMatMul> {
    if parts.len() == 1 {
        return Ok(QMatMul::from_qtensor(parts.remove(0))?);
    }
    let first = parts
        .first()
        .ok_or_else(|| ModelError::Unsupported("nothing to stack".into()))?;
    let (dtype, k) = (first.dtype(), first.shape().dims2()?.1);
    let mut bytes = Vec::new();
    let mut n = 0;
    for p in &parts {
        let (pn, pk) = p.shape().dims2()?;
        if p.dtype() != dtype || pk != k {
            // Mixed types cannot share one matmul: fall back to a dense f32 stack.
            return stack_dense(&parts);
        }
        bytes.extend_from_slice(&p.data()?);
        n += pn;
    }
    let storage = QStorage::from_data(bytes.into(), &Device::Cpu, dtype)?;
    Ok(QMatMul::from_qtensor(QTensor::new(storage, (n, k))?)?)
}

fn stack_dense(parts: &[QTensor]) -> Result<QMatMul> {
    let dense = parts
        .iter()
        .map(|p| p.dequantize(&Device::Cpu))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let t = Tensor::cat(&dense, 0)?;
    Ok(QMatMul::from_qtensor(QTensor::quantize(
        &t,
        GgmlDType::F32,
    )?)?)
}
