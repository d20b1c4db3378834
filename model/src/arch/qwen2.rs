//! Qwen2 / Qwen2.5: llama with a bias on the q, k and v projections.

use super::{base, gguf_shape, hf_shape, HfConfig};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::gguf::Meta;

pub(super) fn from_gguf(m: &Meta, vocab: usize) -> Result<ModelConfig> {
    let mut cfg = base(Arch::Qwen2, gguf_shape(m, "qwen2", vocab)?);
    cfg.qkv_bias = true;
    Ok(cfg)
}

pub(super) fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    c.expect_absent_or("hidden_act", &["silu".into()])?;
    c.expect_absent_or("use_sliding_window", &[false.into()])?;
    let mut cfg = base(Arch::Qwen2, hf_shape(c)?);
    cfg.qkv_bias = true;
    Ok(cfg)
}
