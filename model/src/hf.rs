//! Loading a model from an HF-layout directory: `config.json`, `*.safetensors` (one file,
//! or shards listed in `model.safetensors.index.json`), `tokenizer.json`, and the chat
//! template from `chat_template.jinja` or `tokenizer_config.json`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::arch;
use crate::config::Arch;
use crate::error::{ModelError, Result};
use crate::linear::{Dtype, Linear};
use crate::load::{build, LoadedModel, WeightSource};
use crate::template::{fallback_template, ChatTemplate};
use crate::tokenizer::Tokenizer;

/// Reads an HF checkpoint; `for_device` keeps every projection a candle tensor, for
/// [`crate::DeviceModel`].
pub fn load_dir(dir: &Path, dtype: Dtype, for_device: bool) -> Result<LoadedModel> {
    let config = read_json(&dir.join("config.json"))?;
    let cfg = arch::from_hf(&config)?;
    let tokenizer_config = read_json_if_present(&dir.join("tokenizer_config.json"))?;
    let generation_config = read_json_if_present(&dir.join("generation_config.json"))?;
    let token = |key: &str| {
        let v = tokenizer_config.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
            .map(str::to_string)
    };
    let eos_ids = ids(generation_config.get("eos_token_id"))
        .into_iter()
        .chain(ids(config.get("eos_token_id")))
        .collect::<Vec<_>>();
    let tokenizer = Tokenizer::from_hf_files(
        &dir.join("tokenizer.json"),
        token("bos_token"),
        token("eos_token"),
        &eos_ids,
    )?;
    let template_src = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
        Ok(src) => src,
        Err(_) => chat_template(&tokenizer_config)
            .unwrap_or_else(|| fallback_template(cfg.arch).to_string()),
    };
    let template = ChatTemplate::new(template_src, tokenizer.bos_token(), tokenizer.eos_token())?;

    let tensors = read_safetensors(dir)?;
    let model = build(
        cfg.clone(),
        &mut HfWeights {
            tensors,
            arch: cfg.arch,
            dtype,
            for_device,
        },
    )?;
    Ok(LoadedModel {
        model,
        tokenizer,
        template,
        name: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
    })
}

/// Tensors named as the HF checkpoint names them, converted on the way out.
pub struct HfWeights {
    pub tensors: HashMap<String, Tensor>,
    pub arch: Arch,
    pub dtype: Dtype,
    /// Projections stay candle tensors, whatever `dtype` (the device path).
    pub for_device: bool,
}

impl HfWeights {
    fn get(&self, name: &str) -> Result<&Tensor> {
        let hf = arch::hf_tensor_name(self.arch, name);
        self.tensors
            .get(&hf)
            .ok_or_else(|| ModelError::Files(format!("tensor `{hf}` is missing")))
    }
}

impl WeightSource for HfWeights {
    fn contains(&self, name: &str) -> bool {
        self.tensors
            .contains_key(&arch::hf_tensor_name(self.arch, name))
    }

    fn vector(&mut self, name: &str) -> Result<Vec<f32>> {
        let mut v = self
            .get(name)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let offset = arch::hf_norm_offset(self.arch);
        if name.ends_with("norm.weight") && offset != 0.0 {
            v.iter_mut().for_each(|x| *x += offset);
        }
        Ok(v)
    }

    fn linear(&mut self, names: &[String]) -> Result<Linear> {
        let parts = names
            .iter()
            .map(|n| self.get(n).cloned())
            .collect::<Result<Vec<_>>>()?;
        Linear::dense(&parts, self.dtype, self.for_device)
    }
}

/// Every tensor of the checkpoint: `model.safetensors`, or the shards its index lists.
fn read_safetensors(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let index = dir.join("model.safetensors.index.json");
    let files: Vec<String> = if index.is_file() {
        index_shards(&read_json(&index)?)
            .ok_or_else(|| ModelError::Files("the safetensors index has no `weight_map`".into()))?
    } else {
        vec!["model.safetensors".to_string()]
    };
    let mut tensors = HashMap::new();
    for file in files {
        let path = dir.join(&file);
        if !path.is_file() {
            return Err(ModelError::Files(format!("{} is missing", path.display())));
        }
        tensors.extend(candle_core::safetensors::load(&path, &Device::Cpu)?);
    }
    Ok(tensors)
}

/// The shard files a `model.safetensors.index.json` names (each once, sorted), if it
/// has a `weight_map`.
pub fn index_shards(index: &Value) -> Option<Vec<String>> {
    let mut shards: Vec<String> = index
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    shards.sort();
    shards.dedup();
    Some(shards)
}

/// `chat_template` of `tokenizer_config.json`: a string, or named templates of which
/// `default` is the chat one.
fn chat_template(tokenizer_config: &Value) -> Option<String> {
    match tokenizer_config.get("chat_template")? {
        Value::String(s) => Some(s.clone()),
        Value::Array(named) => named
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// A token id or a list of them.
fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| n as u32).into_iter().collect(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|n| n.as_u64().map(|n| n as u32))
            .collect(),
        _ => Vec::new(),
    }
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text)
        .map_err(|e| ModelError::Files(format!("{} is not valid JSON: {e}", path.display())))
}

fn read_json_if_present(path: &Path) -> Result<Value> {
    match path.is_file() {
        true => read_json(path),
        false => Ok(Value::Null),
    }
}
