//! Loading a llama-family model from one GGUF file: hyper-parameters and tokenizer from
//! the metadata, projection weights in the format `--weights` asks for ([`crate::linear`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::error::{ModelError, Result};
use crate::linear::{Linear, WeightFormat};
use crate::llama::{LayerWeights, Llama, LlamaConfig};
use crate::template::ChatTemplate;
use crate::tokenizer::{GgufVocab, Tokenizer};

/// Everything a server needs from a model file.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub template: ChatTemplate,
    /// `general.name` from the metadata, if any.
    pub name: Option<String>,
}

/// Used when a GGUF carries no `tokenizer.chat_template` (ChatML, as most chat models use).
const FALLBACK_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let content = Content::read(&mut reader)?;
    let meta = Meta(&content.metadata);

    let arch = meta.string("general.architecture")?;
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "architecture `{arch}` (this build serves `llama`)"
        )));
    }
    let heads = meta.usize("llama.attention.head_count")?;
    let hidden = meta.usize("llama.embedding_length")?;
    let head_dim = meta
        .usize("llama.rope.dimension_count")
        .unwrap_or(hidden / heads);
    let cfg = LlamaConfig {
        layers: meta.usize("llama.block_count")?,
        hidden,
        heads,
        kv_heads: meta.usize("llama.attention.head_count_kv").unwrap_or(heads),
        head_dim,
        ffn: meta.usize("llama.feed_forward_length")?,
        vocab: meta.array("tokenizer.ggml.tokens")?.len(),
        rope_theta: meta.f32("llama.rope.freq_base").unwrap_or(10_000.0),
        rms_eps: meta.f32("llama.attention.layer_norm_rms_epsilon")?,
        context_len: meta.usize("llama.context_length")?,
    };
    if meta.0.contains_key("llama.rope.scaling.type") {
        return Err(ModelError::Unsupported(
            "rope scaling (`llama.rope.scaling.type`) is not implemented".into(),
        ));
    }
    if !cfg.heads.is_multiple_of(cfg.kv_heads) || cfg.head_dim * cfg.heads != cfg.hidden {
        return Err(ModelError::Unsupported(format!(
            "attention shape: {} heads, {} kv heads, head dim {}, hidden {}",
            cfg.heads, cfg.kv_heads, cfg.head_dim, cfg.hidden
        )));
    }

    let tokenizer = Tokenizer::from_gguf_vocab(GgufVocab {
        model: meta.string("tokenizer.ggml.model")?,
        tokens: meta.strings("tokenizer.ggml.tokens")?,
        merges: meta.strings("tokenizer.ggml.merges")?,
        token_types: meta
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map_err(ModelError::from))
            .collect::<Result<_>>()?,
        bos_id: meta.u32("tokenizer.ggml.bos_token_id").ok(),
        eos_id: meta.u32("tokenizer.ggml.eos_token_id")?,
    })?;
    let template_src = meta
        .string("tokenizer.chat_template")
        .unwrap_or_else(|_| FALLBACK_TEMPLATE.to_string());
    let template = ChatTemplate::new(template_src, tokenizer.bos_token(), tokenizer.eos_token())?;
    let name = meta.string("general.name").ok();

    let mut tensor =
        |name: &str| -> Result<QTensor> { Ok(content.tensor(&mut reader, name, &Device::Cpu)?) };
    let dense = |t: QTensor| -> Result<Vec<f32>> {
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    };

    let embed = dense(tensor("token_embd.weight")?)?;
    // Tied embeddings (SmolLM2): the head is the embedding matrix.
    let head_name = match content.tensor_infos.contains_key("output.weight") {
        true => "output.weight",
        false => "token_embd.weight",
    };
    let lm_head = Linear::new(vec![tensor(head_name)?], format)?;
    let norm = dense(tensor("output_norm.weight")?)?;
    let mut layers = Vec::with_capacity(cfg.layers);
    for i in 0..cfg.layers {
        let p = format!("blk.{i}");
        let qkv = Linear::new(
            vec![
                tensor(&format!("{p}.attn_q.weight"))?,
                tensor(&format!("{p}.attn_k.weight"))?,
                tensor(&format!("{p}.attn_v.weight"))?,
            ],
            format,
        )?;
        let gate_up = Linear::new(
            vec![
                tensor(&format!("{p}.ffn_gate.weight"))?,
                tensor(&format!("{p}.ffn_up.weight"))?,
            ],
            format,
        )?;
        layers.push(LayerWeights {
            attn_norm: dense(tensor(&format!("{p}.attn_norm.weight"))?)?,
            qkv,
            out: Linear::new(vec![tensor(&format!("{p}.attn_output.weight"))?], format)?,
            ffn_norm: dense(tensor(&format!("{p}.ffn_norm.weight"))?)?,
            gate_up,
            down: Linear::new(vec![tensor(&format!("{p}.ffn_down.weight"))?], format)?,
        });
    }
    Ok(LoadedModel {
        model: Llama::new(cfg, embed, layers, norm, lm_head),
        tokenizer,
        template,
        name,
    })
}

/// Typed access to GGUF metadata with errors that name the key.
struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| ModelError::Metadata(key.into()))
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    fn u32(&self, key: &str) -> Result<u32> {
        self.get(key)?
            .to_u32()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .to_f32()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?
            .to_vec()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        self.array(key)?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| ModelError::Metadata(key.into()))
            })
            .collect()
    }
}
