//! `--device`: where the forward pass runs, resolved once at start.

use candle_core::{DType, Device};
use chorus_model::{DeviceOptions, DeviceWeights};

use crate::config::{Config, DeviceArg, DeviceWeightsArg, DtypeArg};

/// The device options for `config`, or `None` for the packed CPU path.
pub fn resolve(config: &Config) -> Result<Option<DeviceOptions>, String> {
    let device = match config.device {
        DeviceArg::Cpu => return Ok(None),
        DeviceArg::Auto => match cuda(0) {
            Ok(d) => d,
            Err(why) => {
                if cfg!(feature = "cuda") {
                    tracing::warn!(%why, "no CUDA device answered; running on the CPU");
                }
                return Ok(None);
            }
        },
        DeviceArg::Cuda(n) => cuda(n).map_err(|e| format!("--device cuda:{n}: {e}"))?,
        DeviceArg::CandleCpu => Device::Cpu,
    };
    let dtype = match (config.device_dtype, device.is_cpu()) {
        (DtypeArg::Auto, true) | (DtypeArg::F32, _) => DType::F32,
        // bf16, as vLLM's `auto` for today's models: f16's range ends at 65504, which
        // Gemma 3's MLP outputs pass (a projection's output is stored in the compute type).
        (DtypeArg::Auto, false) | (DtypeArg::Bf16, _) => DType::BF16,
        (DtypeArg::F16, _) => DType::F16,
    };
    Ok(Some(DeviceOptions {
        device,
        dtype,
        weights: match config.device_weights {
            DeviceWeightsArg::Dense => DeviceWeights::Dense,
            DeviceWeightsArg::Quantized => DeviceWeights::Quantized,
            DeviceWeightsArg::Auto => DeviceWeights::Auto {
                up_to: config.max_batch_tokens,
            },
        },
        attention: config.device_attention.into(),
        graph_rows: config.cuda_graph_max_batch,
        graph_shapes: config.cuda_graph_max_shapes,
    }))
}

fn cuda(ordinal: usize) -> Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("this binary was built without the `cuda` feature \
                    (cargo build --release --features cuda)"
            .into());
    }
    Device::new_cuda(ordinal).map_err(|e| e.to_string())
}
