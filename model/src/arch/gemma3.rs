//! Gemma 3 (text): GELU MLP, embeddings scaled by `sqrt(hidden)`, q/k norms, a norm
//! after attention and after the MLP, and sliding-window attention (with its own rope
//! base) on all but every sixth layer.

use serde_json::Value;

use super::{base, gguf_shape, hf_shape, HfConfig};
use crate::config::{Activation, Arch, ModelConfig, Rope};
use crate::error::{ModelError, Result};
use crate::gguf::Meta;

/// Every sixth layer attends globally (what the released checkpoints use, and what
/// GGUF files assume since they do not record it).
const DEFAULT_PATTERN: usize = 6;
const LOCAL_ROPE_THETA: f32 = 10_000.0;

fn gemma(mut cfg: ModelConfig, local_theta: f32, window: usize, sliding: &[bool]) -> ModelConfig {
    cfg.activation = Activation::GeluTanh;
    cfg.embed_scale = (cfg.hidden as f32).sqrt();
    cfg.qk_norm = true;
    cfg.sandwich_norms = true;
    cfg.rope_local = Rope::plain(local_theta);
    cfg.windows = sliding.iter().map(|&s| s.then_some(window)).collect();
    cfg
}

fn pattern(layers: usize, every: usize) -> Vec<bool> {
    (0..layers)
        .map(|i| every == 0 || (i + 1) % every != 0)
        .collect()
}

pub(super) fn from_gguf(m: &Meta, vocab: usize) -> Result<ModelConfig> {
    let shape = gguf_shape(m, "gemma3", vocab)?;
    let window = m.usize("gemma3.attention.sliding_window")?;
    if window == 0 {
        return Err(ModelError::Unsupported(
            "`gemma3.attention.sliding_window` 0".into(),
        ));
    }
    let sliding = pattern(shape.layers, DEFAULT_PATTERN);
    Ok(gemma(
        base(Arch::Gemma3, shape),
        LOCAL_ROPE_THETA,
        window,
        &sliding,
    ))
}

pub(super) fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    c.expect_absent_or("hidden_activation", &["gelu_pytorch_tanh".into()])?;
    c.expect_absent_or("final_logit_softcapping", &[])?;
    c.expect_absent_or("attn_logit_softcapping", &[])?;
    c.expect_absent_or("use_bidirectional_attention", &[false.into()])?;
    let shape = hf_shape(c)?;
    let layers = shape.layers;
    let sliding = match c.0.get("layer_types").and_then(Value::as_array) {
        Some(types) => types
            .iter()
            .map(|t| match t.as_str() {
                Some("sliding_attention") => Ok(true),
                Some("full_attention") => Ok(false),
                _ => Err(ModelError::Unsupported(format!(
                    "config.json layer type {t}"
                ))),
            })
            .collect::<Result<Vec<_>>>()?,
        None => pattern(
            layers,
            c.opt_usize("sliding_window_pattern")?
                .unwrap_or(DEFAULT_PATTERN),
        ),
    };
    if sliding.len() != layers {
        return Err(ModelError::Config(format!(
            "`layer_types` has {} entries for {layers} layers",
            sliding.len()
        )));
    }
    let window = c.usize("sliding_window")?;
    let local_theta = c
        .opt_f32("rope_local_base_freq")?
        .unwrap_or(LOCAL_ROPE_THETA);
    let mut cfg = gemma(base(Arch::Gemma3, shape), local_theta, window, &sliding);
    if let Some(scalar) = c.opt_f32("query_pre_attn_scalar")? {
        cfg.attn_scale = 1.0 / scalar.sqrt();
    }
    Ok(cfg)
}
