//! Building the shared transformer from any weight source. Sources answer to GGUF tensor
//! names (`blk.3.attn_q.weight`); the HF source translates them ([`crate::arch`]).
//! Every tensor's shape is checked against the config here, so a file that disagrees
//! with its own header is a load error naming the tensor, never a panic mid-request.

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};
use crate::linear::Linear;
use crate::template::ChatTemplate;
use crate::tokenizer::Tokenizer;
use crate::transformer::{LayerWeights, Transformer};

/// Everything a server needs from a model.
pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// The model's own name (GGUF `general.name`, or the HF directory), if known.
    pub name: Option<String>,
}

/// Where weights come from.
pub trait WeightSource {
    fn contains(&self, name: &str) -> bool;
    /// A tensor as f32 values (norms, biases, the embedding table).
    fn vector(&mut self, name: &str) -> Result<Vec<f32>>;
    /// The row-wise stack of the named `[n_i, k]` matrices as one projection.
    fn linear(&mut self, names: &[String]) -> Result<Linear>;
}

pub fn build(cfg: ModelConfig, w: &mut dyn WeightSource) -> Result<Transformer> {
    let (hidden, q_dim, kv_dim) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
    let embed = sized(w, "token_embd.weight", cfg.vocab * hidden)?;
    // Tied embeddings (SmolLM2, Gemma, small Qwens): the head is the embedding matrix.
    let head = match w.contains("output.weight") {
        true => "output.weight",
        false => "token_embd.weight",
    };
    let lm_head = shaped(w, &[head.to_string()], (cfg.vocab, hidden))?;
    let norm = sized(w, "output_norm.weight", hidden)?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        let qkv_names = [n("attn_q.weight"), n("attn_k.weight"), n("attn_v.weight")];
        let qkv_bias = match cfg.qkv_bias {
            true => {
                let mut b = sized(w, &n("attn_q.bias"), q_dim)?;
                b.extend(sized(w, &n("attn_k.bias"), kv_dim)?);
                b.extend(sized(w, &n("attn_v.bias"), kv_dim)?);
                Some(b)
            }
            false => None,
        };
        let (q_norm, k_norm) = match cfg.qk_norm {
            true => (
                Some(sized(w, &n("attn_q_norm.weight"), cfg.head_dim)?),
                Some(sized(w, &n("attn_k_norm.weight"), cfg.head_dim)?),
            ),
            false => (None, None),
        };
        let mut sandwich = |name: &str| -> Result<Option<Vec<f32>>> {
            match cfg.sandwich_norms {
                true => Ok(Some(sized(w, &n(name), hidden)?)),
                false => Ok(None),
            }
        };
        let post_attn_norm = sandwich("post_attention_norm.weight")?;
        let post_ffn_norm = sandwich("post_ffw_norm.weight")?;
        layers.push(LayerWeights {
            attn_norm: sized(w, &n("attn_norm.weight"), hidden)?,
            qkv: shaped(w, &qkv_names, (q_dim + 2 * kv_dim, hidden))?,
            qkv_bias,
            q_norm,
            k_norm,
            out: shaped(w, &[n("attn_output.weight")], (hidden, q_dim))?,
            post_attn_norm,
            ffn_norm: sized(w, &n("ffn_norm.weight"), hidden)?,
            gate_up: shaped(
                w,
                &[n("ffn_gate.weight"), n("ffn_up.weight")],
                (2 * cfg.ffn, hidden),
            )?,
            down: shaped(w, &[n("ffn_down.weight")], (hidden, cfg.ffn))?,
            post_ffn_norm,
        });
    }
    Ok(Transformer::new(cfg, embed, layers, norm, lm_head))
}

fn sized(w: &mut dyn WeightSource, name: &str, len: usize) -> Result<Vec<f32>> {
    let v = w.vector(name)?;
    if v.len() != len {
        return Err(ModelError::Files(format!(
            "tensor `{name}` has {} values, the config implies {len}",
            v.len()
        )));
    }
    Ok(v)
}

fn shaped(w: &mut dyn WeightSource, names: &[String], want: (usize, usize)) -> Result<Linear> {
    let linear = w.linear(names)?;
    let got = linear.shape()?;
    if got != want {
        return Err(ModelError::Files(format!(
            "`{}` is {got:?} (rows, cols), the config implies {want:?}",
            names.join("` + `")
        )));
    }
    Ok(linear)
}
