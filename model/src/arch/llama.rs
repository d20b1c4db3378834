//! Llama (SmolLM2, Llama 3.x): the baseline every other family is expressed against.

use super::{base, gguf_shape, hf_shape, HfConfig};
use crate::config::{Arch, ModelConfig, RopeStyle};
use crate::error::Result;
use crate::gguf::Meta;

pub(super) fn from_gguf(m: &Meta, vocab: usize) -> Result<ModelConfig> {
    let mut cfg = base(Arch::Llama, gguf_shape(m, "llama", vocab)?);
    // GGUF llama files permute q/k rows so that rope pairs adjacent dimensions.
    cfg.rope_style = RopeStyle::Interleaved;
    Ok(cfg)
}

pub(super) fn from_hf(c: &HfConfig) -> Result<ModelConfig> {
    c.expect_absent_or("hidden_act", &["silu".into()])?;
    c.expect_absent_or("attention_bias", &[false.into()])?;
    c.expect_absent_or("mlp_bias", &[false.into()])?;
    Ok(base(Arch::Llama, hf_shape(c)?))
}
