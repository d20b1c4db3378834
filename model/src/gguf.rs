//! Loading a model from one GGUF file: hyper-parameters and tokenizer from the metadata
//! ([`crate::arch`] reads each family's keys), projection weights in the format
//! `--weights` asks for ([`crate::linear`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use crate::arch;
use crate::error::{ModelError, Result};
use crate::linear::{Linear, WeightFormat};
use crate::load::{build, LoadedModel, WeightSource};
use crate::template::{fallback_template, ChatTemplate};
use crate::tokenizer::{GgufVocab, Tokenizer};

pub fn load(path: &Path, format: WeightFormat) -> Result<LoadedModel> {
    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io)?);
    let content = Content::read(&mut reader)?;
    let declared = declared_tensors(&mut reader).map_err(io)?;
    let meta = Meta(&content.metadata);

    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    let mut cfg = arch::from_gguf(&meta, tokens.len())?;
    check_layout(
        &content,
        declared,
        cfg.layers,
        &meta.string("general.architecture")?,
    )?;
    let tokenizer = Tokenizer::from_gguf_vocab(GgufVocab {
        model: meta.string("tokenizer.ggml.model")?,
        merges: meta
            .opt("tokenizer.ggml.merges", Meta::strings)?
            .unwrap_or_default(),
        scores: meta
            .opt("tokenizer.ggml.scores", |m, key| {
                m.array(key)?
                    .iter()
                    .map(|v| v.to_f32().map_err(|_| ModelError::Metadata(key.into())))
                    .collect::<Result<Vec<f32>>>()
            })?
            .unwrap_or_default(),
        tokens,
        token_types: meta
            .array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().map_err(ModelError::from))
            .collect::<Result<_>>()?,
        bos_id: meta.opt("tokenizer.ggml.bos_token_id", Meta::u32)?,
        eos_id: meta.u32("tokenizer.ggml.eos_token_id")?,
        add_bos: meta
            .opt("tokenizer.ggml.add_bos_token", Meta::bool)?
            .unwrap_or(false),
        add_space_prefix: meta
            .opt("tokenizer.ggml.add_space_prefix", Meta::bool)?
            .unwrap_or(true),
    })?;
    let template_src = meta
        .opt("tokenizer.chat_template", Meta::string)?
        .unwrap_or_else(|| fallback_template(cfg.arch).to_string());
    let template = ChatTemplate::new(template_src, tokenizer.bos_token(), tokenizer.eos_token())?;
    let name = meta.opt("general.name", Meta::string)?;

    let mut weights = GgufWeights {
        content: &content,
        reader,
        format,
    };
    // Llama 3.1+ files carry their rope scaling as per-frequency divisors.
    if weights.contains("rope_freqs.weight") {
        let divisors = weights.vector("rope_freqs.weight")?;
        if divisors.len() != cfg.head_dim / 2 {
            return Err(ModelError::Files(format!(
                "tensor `rope_freqs.weight` has {} values; the head dim {} needs {}",
                divisors.len(),
                cfg.head_dim,
                cfg.head_dim / 2
            )));
        }
        cfg.rope.freq_divisors = divisors;
    }
    let model = build(cfg, &mut weights)?;
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        name,
    })
}

/// How many tensors the file's header declares (candle keeps them by name, so a name
/// given twice would leave one silently unread).
fn declared_tensors(reader: &mut BufReader<File>) -> std::io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    let mut head = [0u8; 16];
    reader.seek(SeekFrom::Start(0))?;
    reader.read_exact(&mut head)?;
    let version = u32::from_le_bytes([head[4], head[5], head[6], head[7]]);
    Ok(match version {
        // Version 1 counted in 32 bits.
        1 => u64::from(u32::from_le_bytes([head[8], head[9], head[10], head[11]])),
        _ => u64::from_le_bytes([
            head[8], head[9], head[10], head[11], head[12], head[13], head[14], head[15],
        ]),
    })
}

/// The tensor table is one the model can be read from: each name once, no two tensors'
/// bytes overlapping (one would be read as part of another), no layer past the model's
/// `block_count` (those layers would be dropped without a word).
fn check_layout(content: &Content, declared: u64, layers: usize, arch: &str) -> Result<()> {
    let bad = |m: String| Err(ModelError::Files(m));
    if declared != content.tensor_infos.len() as u64 {
        return bad(format!(
            "the file declares {declared} tensors but holds {} distinct names: a name is given twice",
            content.tensor_infos.len()
        ));
    }
    let mut spans = Vec::with_capacity(content.tensor_infos.len());
    for (name, info) in &content.tensor_infos {
        let dtype = info.ggml_dtype;
        let bytes =
            (info.shape.elem_count() / dtype.block_size()) as u64 * dtype.type_size() as u64;
        spans.push((info.offset, info.offset.saturating_add(bytes), name));
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|n| n.parse::<usize>().ok());
        if let Some(layer) = layer.filter(|&l| l >= layers) {
            return bad(format!(
                "tensor `{name}` is of layer {layer}, but `{arch}.block_count` is {layers}"
            ));
        }
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        if end > start {
            return bad(format!("tensors `{a}` and `{b}` overlap in the file"));
        }
    }
    Ok(())
}

struct GgufWeights<'a> {
    content: &'a Content,
    reader: BufReader<File>,
    format: WeightFormat,
}

impl GgufWeights<'_> {
    fn tensor(&mut self, name: &str) -> Result<QTensor> {
        if !self.contains(name) {
            return Err(ModelError::Files(format!("tensor `{name}` is missing")));
        }
        Ok(self.content.tensor(&mut self.reader, name, &Device::Cpu)?)
    }
}

impl WeightSource for GgufWeights<'_> {
    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        Ok(self
            .tensor(name)?
            .dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    fn linear(&mut self, names: &[String]) -> Result<Linear> {
        let parts = names
            .iter()
            .map(|n| self.tensor(n))
            .collect::<Result<Vec<_>>>()?;
        Linear::new(parts, self.format)
    }
}

/// Typed access to GGUF metadata with errors that name the key.
pub(crate) struct Meta<'a>(&'a HashMap<String, Value>);

impl Meta<'_> {
    /// `key` read by `read` when the file has it: absent is `None`; present with another
    /// type is an error naming it, never taken for absent (a default in its place would
    /// be a silently different model).
    pub(crate) fn opt<T>(
        &self,
        key: &str,
        read: impl Fn(&Self, &str) -> Result<T>,
    ) -> Result<Option<T>> {
        match self.0.contains_key(key) {
            true => read(self, key).map(Some),
            false => Ok(None),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<bool> {
        self.get(key)?
            .to_bool()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn get(&self, key: &str) -> Result<&Value> {
        self.0
            .get(key)
            .ok_or_else(|| ModelError::Metadata(key.into()))
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        v.to_u32()
            .map(|x| x as usize)
            .or_else(|_| v.to_u64().map(|x| x as usize))
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn u32(&self, key: &str) -> Result<u32> {
        self.get(key)?
            .to_u32()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn f32(&self, key: &str) -> Result<f32> {
        self.get(key)?
            .to_f32()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn string(&self, key: &str) -> Result<String> {
        self.get(key)?
            .to_string()
            .cloned()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn array(&self, key: &str) -> Result<&Vec<Value>> {
        self.get(key)?
            .to_vec()
            .map_err(|_| ModelError::Metadata(key.into()))
    }

    pub(crate) fn strings(&self, key: &str) -> Result<Vec<String>> {
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
