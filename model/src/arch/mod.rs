//! The supported architectures, one small module each. An architecture says how to read
//! its hyper-parameters (from a GGUF header or an HF `config.json`) into a
//! [`ModelConfig`] and what its tensors are called in HF checkpoints; the forward pass
//! is the shared [`crate::transformer`]. A setting the code does not implement is an error
//! that names it, never a silently different model.

mod gemma3;
mod llama;
mod qwen2;
mod qwen3;

use serde_json::Value;

use crate::config::{Activation, Arch, ModelConfig, Rope, RopeStyle};
use crate::error::{ModelError, Result};
use crate::gguf::Meta;

/// The hyper-parameters of a GGUF file, by `general.architecture`.
pub(crate) fn from_gguf(meta: &Meta, vocab: usize) -> Result<ModelConfig> {
    let arch = meta.string("general.architecture")?;
    let cfg = match arch.as_str() {
        "llama" => llama::from_gguf(meta, vocab)?,
        "qwen2" => qwen2::from_gguf(meta, vocab)?,
        "qwen3" => qwen3::from_gguf(meta, vocab)?,
        "gemma3" => gemma3::from_gguf(meta, vocab)?,
        other => {
            return Err(ModelError::Unsupported(format!(
                "GGUF architecture `{other}` (supported: llama, qwen2, qwen3, gemma3)"
            )))
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The hyper-parameters of an HF `config.json`, by `model_type`.
pub fn from_hf(config: &Value) -> Result<ModelConfig> {
    let c = HfConfig(config);
    let model_type = c.string("model_type")?;
    let cfg = match model_type.as_str() {
        "llama" => llama::from_hf(&c)?,
        "qwen2" => qwen2::from_hf(&c)?,
        "qwen3" => qwen3::from_hf(&c)?,
        "gemma3_text" => gemma3::from_hf(&c)?,
        "gemma3" => {
            return Err(ModelError::Unsupported(
                "model_type `gemma3` is the multimodal Gemma 3; chorus serves the text-only \
                 checkpoints (`gemma3_text`)"
                    .into(),
            ))
        }
        other => {
            return Err(ModelError::Unsupported(format!(
                "config.json model_type `{other}` (supported: llama, qwen2, qwen3, gemma3_text)"
            )))
        }
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The HF checkpoint name of a tensor, given its GGUF name (the names the loader asks for).
pub fn hf_tensor_name(arch: Arch, gguf: &str) -> String {
    let Some(rest) = gguf.strip_prefix("blk.") else {
        return match gguf {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output.weight" => "lm_head.weight",
            "output_norm.weight" => "model.norm.weight",
            other => other,
        }
        .to_string();
    };
    let (layer, part) = rest.split_once('.').unwrap_or((rest, ""));
    let (stem, suffix) = part.rsplit_once('.').unwrap_or((part, ""));
    let stem = match (arch, stem) {
        (_, "attn_norm") => "input_layernorm",
        (_, "attn_q") => "self_attn.q_proj",
        (_, "attn_k") => "self_attn.k_proj",
        (_, "attn_v") => "self_attn.v_proj",
        (_, "attn_output") => "self_attn.o_proj",
        (_, "attn_q_norm") => "self_attn.q_norm",
        (_, "attn_k_norm") => "self_attn.k_norm",
        (_, "ffn_gate") => "mlp.gate_proj",
        (_, "ffn_up") => "mlp.up_proj",
        (_, "ffn_down") => "mlp.down_proj",
        (Arch::Gemma3, "ffn_norm") => "pre_feedforward_layernorm",
        (Arch::Gemma3, "post_attention_norm") => "post_attention_layernorm",
        (Arch::Gemma3, "post_ffw_norm") => "post_feedforward_layernorm",
        (_, "ffn_norm") => "post_attention_layernorm",
        (_, other) => other,
    };
    format!("model.layers.{layer}.{stem}.{suffix}")
}

/// What HF checkpoints of `arch` store for an RMS norm weight `w`, subtracted: Gemma
/// normalises with `1 + w`, which GGUF files store already added.
pub fn hf_norm_offset(arch: Arch) -> f32 {
    match arch {
        Arch::Gemma3 => 1.0,
        _ => 0.0,
    }
}

/// The llama-shaped defaults every family starts from (silu MLP, no extras).
fn base(arch: Arch, shape: Shape) -> ModelConfig {
    ModelConfig {
        arch,
        layers: shape.layers,
        hidden: shape.hidden,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        ffn: shape.ffn,
        vocab: shape.vocab,
        rms_eps: shape.rms_eps,
        context_len: shape.context_len,
        rope_style: RopeStyle::Half,
        rope: shape.rope.clone(),
        rope_local: shape.rope,
        activation: Activation::Silu,
        embed_scale: 1.0,
        attn_scale: 1.0 / (shape.head_dim as f32).sqrt(),
        windows: vec![None; shape.layers],
        qkv_bias: false,
        qk_norm: false,
        sandwich_norms: false,
    }
}

struct Shape {
    layers: usize,
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    vocab: usize,
    rms_eps: f32,
    context_len: usize,
    rope: Rope,
}

/// Bounds far above any model of these families (the largest have ~130 layers and heads
/// of 256), checked before anything is sized by them: a file's absurd value is an error
/// naming it, not an allocation that aborts the process.
const MAX_LAYERS: usize = 4096;
const MAX_HEAD_DIM: usize = 8192;

fn bounded(key: &str, value: usize, max: usize) -> Result<usize> {
    match value <= max {
        true => Ok(value),
        false => Err(ModelError::Unsupported(format!(
            "`{key}` {value} (at most {max})"
        ))),
    }
}

/// The shape fields of a GGUF header (`{arch}.…` keys).
fn gguf_shape(m: &Meta, arch: &str, vocab: usize) -> Result<Shape> {
    let key = |k: &str| format!("{arch}.{k}");
    for cap in ["final_logit_softcapping", "attn_logit_softcapping"] {
        if let Some(value) = m.opt(&key(cap), Meta::f32)? {
            return Err(ModelError::Unsupported(format!(
                "logit soft-capping (`{}` {value})",
                key(cap)
            )));
        }
    }
    let heads = m.usize(&key("attention.head_count"))?;
    let hidden = m.usize(&key("embedding_length"))?;
    let head_dim = m
        .opt(&key("attention.key_length"), Meta::usize)?
        .unwrap_or(hidden / heads.max(1));
    let head_dim = bounded(&key("attention.key_length"), head_dim, MAX_HEAD_DIM)?;
    if let Some(rot) = m.opt(&key("rope.dimension_count"), Meta::usize)? {
        if rot != head_dim {
            return Err(ModelError::Unsupported(format!(
                "`{arch}.rope.dimension_count` {rot} (partial rotary embedding; head dim is {head_dim})"
            )));
        }
    }
    let theta = m
        .opt(&key("rope.freq_base"), Meta::f32)?
        .unwrap_or(10_000.0);
    let rope = match m.opt(&key("rope.scaling.type"), Meta::string)?.as_deref() {
        None | Some("none") => Rope::plain(theta),
        Some("linear") => {
            let factor = m.f32(&key("rope.scaling.factor"))?;
            Rope {
                theta,
                freq_divisors: vec![factor; head_dim / 2],
            }
        }
        Some(other) => {
            return Err(ModelError::Unsupported(format!(
                "rope scaling `{other}` (`{arch}.rope.scaling.type`; supported: none, linear)"
            )))
        }
    };
    Ok(Shape {
        layers: bounded(
            &key("block_count"),
            m.usize(&key("block_count"))?,
            MAX_LAYERS,
        )?,
        hidden,
        heads,
        kv_heads: m
            .opt(&key("attention.head_count_kv"), Meta::usize)?
            .unwrap_or(heads),
        head_dim,
        ffn: m.usize(&key("feed_forward_length"))?,
        vocab,
        rms_eps: m.f32(&key("attention.layer_norm_rms_epsilon"))?,
        context_len: m.usize(&key("context_length"))?,
        rope,
    })
}

/// The shape fields of an HF `config.json`, checking the settings every family shares.
fn hf_shape(c: &HfConfig) -> Result<Shape> {
    let heads = c.usize("num_attention_heads")?;
    let hidden = c.usize("hidden_size")?;
    let head_dim = c.opt_usize("head_dim")?.unwrap_or(hidden / heads.max(1));
    let head_dim = bounded("head_dim", head_dim, MAX_HEAD_DIM)?;
    let theta = c.opt_f32("rope_theta")?.unwrap_or(10_000.0);
    c.expect_absent_or("partial_rotary_factor", &[Value::from(1.0)])?;
    Ok(Shape {
        layers: bounded(
            "num_hidden_layers",
            c.usize("num_hidden_layers")?,
            MAX_LAYERS,
        )?,
        hidden,
        heads,
        kv_heads: c.opt_usize("num_key_value_heads")?.unwrap_or(heads),
        head_dim,
        ffn: c.usize("intermediate_size")?,
        vocab: c.usize("vocab_size")?,
        rms_eps: c.opt_f32("rms_norm_eps")?.unwrap_or(1e-6),
        context_len: c.usize("max_position_embeddings")?,
        rope: hf_rope(c, theta, head_dim)?,
    })
}

/// `rope_scaling`: absent, `default`, `linear` or `llama3`; anything else is named.
fn hf_rope(c: &HfConfig, theta: f32, head_dim: usize) -> Result<Rope> {
    let Some(scaling) = c.0.get("rope_scaling").filter(|v| !v.is_null()) else {
        return Ok(Rope::plain(theta));
    };
    let s = HfConfig(scaling);
    let kind = s
        .opt_string("rope_type")?
        .or(s.opt_string("type")?)
        .unwrap_or_default();
    match kind.as_str() {
        "default" => Ok(Rope::plain(theta)),
        "linear" => Ok(Rope {
            theta,
            freq_divisors: vec![s.f32("factor")?; head_dim / 2],
        }),
        "llama3" => {
            let factor = s.f32("factor")?;
            let low = s.f32("low_freq_factor")?;
            let high = s.f32("high_freq_factor")?;
            let original = s.f32("original_max_position_embeddings")?;
            let plain = Rope::plain(theta).inv_freqs(head_dim);
            let freq_divisors = plain
                .iter()
                .map(|&f| llama3_divisor(f, factor, low, high, original))
                .collect();
            Ok(Rope {
                theta,
                freq_divisors,
            })
        }
        other => Err(ModelError::Unsupported(format!(
            "rope_scaling type `{other}` in config.json (supported: default, linear, llama3)"
        ))),
    }
}

/// Llama 3.1's frequency-dependent rope scaling, as the divisor of one frequency: long
/// wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
pub(crate) fn llama3_divisor(freq: f32, factor: f32, low: f32, high: f32, original: f32) -> f32 {
    let wavelen = 2.0 * std::f32::consts::PI / freq;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    if wavelen < high_wavelen {
        1.0
    } else if wavelen > low_wavelen {
        factor
    } else {
        let smooth = (original / wavelen - low) / (high - low);
        1.0 / ((1.0 - smooth) / factor + smooth)
    }
}

/// Typed access to an HF `config.json`, with errors that name the field.
pub(crate) struct HfConfig<'a>(pub(crate) &'a Value);

impl HfConfig<'_> {
    fn field(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, want: &str) -> ModelError {
        ModelError::Config(format!("`{key}` is missing or not {want}"))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?
            .ok_or_else(|| self.bad(key, "an integer"))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.field(key)
            .map(|v| {
                v.as_u64()
                    .map(|x| x as usize)
                    .ok_or_else(|| self.bad(key, "an integer"))
            })
            .transpose()
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.bad(key, "a number"))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.field(key)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.bad(key, "a number"))
            })
            .transpose()
    }

    fn string(&self, key: &str) -> Result<String> {
        self.opt_string(key)?
            .ok_or_else(|| self.bad(key, "a string"))
    }

    fn opt_string(&self, key: &str) -> Result<Option<String>> {
        self.field(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "a string"))
            })
            .transpose()
    }

    /// A setting the code implements only at the listed values (or absent/null).
    fn expect_absent_or(&self, key: &str, allowed: &[Value]) -> Result<()> {
        match self.field(key) {
            None => Ok(()),
            Some(v)
                if allowed
                    .iter()
                    .any(|a| a == v || a.as_f64().is_some() && a.as_f64() == v.as_f64()) =>
            {
                Ok(())
            }
            Some(v) => Err(ModelError::Unsupported(format!(
                "config.json `{key}`: {v} (chorus implements {})",
                allowed
                    .iter()
                    .map(Value::to_string)
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))),
        }
    }
}
