//! Qwen3 (dense): llama with a per-head RMS norm on q and k before rope.

use super::{base, gguf_shape, hf_shape, HfConfig};
use crate::config::{Arch, ModelConfig};
use crate::error::Result;
use crate::gguf::Meta;

pub(super) fn from_gguf(m: &Meta, vocab: usize) -> Result<ModelConfig> {
    let mut cfg = base(Arch::Qwen3, gguf_shape(m, "qwen3", vocab)?);
    cfg.qk_norm = true;
    Ok(cfg)
}

pub(super) fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    c.expect_absent_or("hidden_act", &["silu".into()])?;
    c.expect_absent_or("attention_bias", &[false.into()])?;
    c.expect_absent_or("use_sliding_window", &[false.into()])?;
    let mut cfg = base(Arch::Qwen3, hf_shape(c)?);
    cfg.qk_norm = true;
    Ok(cfg)
}
