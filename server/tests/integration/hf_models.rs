//! HF checkpoints end to end, offline. The hub is not reachable from the test machines,
//! so the test makes a real checkpoint from the default GGUF (dequantized weights in
//! HF's layout and names, written as safetensors; `config.json`; the tokenizer saved as
//! `tokenizer.json`; the template in `tokenizer_config.json`), lays it out as an HF hub
//! cache, and has the `chorus` binary find it through hf-hub with `HF_HUB_OFFLINE=1`.
//! Loaded that way, the model must answer exactly as the GGUF it came from.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{self, chat, get_json, post, start, wait_ready};
use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use chorus_model::arch::hf_tensor_name;
use chorus_model::kv::{blocks_for, BlockAllocator};
use chorus_model::{
    gguf, hf, Arch, ChatMessage, Dtype, KvCache, LoadedModel, SeqInput, WeightFormat,
};
use chorus_server::config::Config;
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use serde_json::json;

const REPO: &str = "chorus-test/smollm2-hf";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn default_gguf() -> PathBuf {
    resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR))
        .unwrap()
        .path
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("chorus-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// GGUF llama files permute each head's q/k rows so that rope pairs adjacent
/// dimensions; HF checkpoints keep the original order (rope pairs `i` and `i + d/2`).
fn unpermute(t: Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    let hd = rows / heads;
    t.reshape((heads, hd / 2, 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

/// Writes the default model as an HF checkpoint into an HF cache under `home`
/// (`$HF_HOME/hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/…}`); returns the
/// snapshot directory.
fn write_hf_cache(home: &Path) -> PathBuf {
    let path = default_gguf();
    let mut file = File::open(&path).unwrap();
    let content = Content::read(&mut file).unwrap();
    let m = gguf::load(&path, WeightFormat::F32).unwrap();
    let cfg = m.model.config().clone();

    let repo_dir = home.join(format!("hub/models--{}", REPO.replace('/', "--")));
    let snapshot = repo_dir.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), COMMIT).unwrap();

    let mut tensors = HashMap::new();
    for name in content.tensor_infos.keys() {
        let t = content
            .tensor(&mut file, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        let t = match name {
            n if n.ends_with("attn_q.weight") => unpermute(t, cfg.heads),
            n if n.ends_with("attn_k.weight") => unpermute(t, cfg.kv_heads),
            _ => t,
        };
        tensors.insert(hf_tensor_name(Arch::Llama, name), t);
    }
    candle_core::safetensors::save(&tensors, snapshot.join("model.safetensors")).unwrap();

    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden,
        "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "intermediate_size": cfg.ffn,
        "vocab_size": cfg.vocab,
        "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.context_len,
        "rope_theta": cfg.rope.theta,
        "rope_scaling": null,
        "hidden_act": "silu",
        "tie_word_embeddings": true,
        "torch_dtype": "float32",
    });
    std::fs::write(snapshot.join("config.json"), config.to_string()).unwrap();
    m.tokenizer.save(&snapshot.join("tokenizer.json")).unwrap();
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .unwrap()
        .to_string()
        .unwrap()
        .clone();
    let tokenizer_config = json!({
        "bos_token": m.tokenizer.bos_token(),
        "eos_token": m.tokenizer.eos_token(),
        "chat_template": template,
    });
    std::fs::write(
        snapshot.join("tokenizer_config.json"),
        tokenizer_config.to_string(),
    )
    .unwrap();
    snapshot
}

/// `chorus --download-only` with the given environment: (success, stdout, stderr).
fn chorus_download(model: &str, env: &[(&str, &Path)], offline: bool) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_chorus"));
    cmd.args(["--model", model, "--download-only"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if offline {
        cmd.env("HF_HUB_OFFLINE", "1");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Greedy continuation of a one-message chat, up to `max` tokens or a stop token.
fn greedy(m: &LoadedModel, question: &str, max: usize) -> (Vec<u32>, Vec<u32>) {
    let text = m
        .template
        .render(
            &[ChatMessage {
                role: "user".into(),
                content: question.into(),
                ..Default::default()
            }],
            true,
        )
        .unwrap();
    let prompt = m.tokenizer.encode(&text).unwrap();
    let cfg = m.model.config();
    let n_blocks = blocks_for(prompt.len() + max);
    let mut alloc = BlockAllocator::new(n_blocks);
    let blocks: Vec<u32> = (0..n_blocks).map(|_| alloc.allocate().unwrap()).collect();
    let mut kv = KvCache::new(cfg.kv_shape(), n_blocks).unwrap();
    let mut tokens = prompt.clone();
    let mut start = 0;
    let mut out = Vec::new();
    while out.len() < max {
        let logits = m
            .model
            .forward(
                &mut kv,
                &[SeqInput {
                    tokens: &tokens[start..],
                    start_pos: start,
                    blocks: &blocks,
                    wants_logits: true,
                    all_logits: false,
                }],
            )
            .unwrap();
        let next = chorus_model::sampling::argmax(&logits[0]);
        start = tokens.len();
        tokens.push(next);
        out.push(next);
        if m.tokenizer.is_stop(next) {
            break;
        }
    }
    (prompt, out)
}

#[test]
fn an_hf_checkpoint_found_offline_through_hf_hub_answers_as_its_gguf() {
    let _turn = common::together_blocking();
    let home = TempDir::new("hf-home");
    let snapshot = write_hf_cache(&home.0);

    let (ok, stdout, stderr) = chorus_download(
        &format!("hf:{REPO}"),
        &[("HF_HOME", home.0.as_path())],
        true,
    );
    assert!(
        ok,
        "chorus could not resolve the cached checkpoint:\n{stderr}"
    );
    assert_eq!(Path::new(&stdout), snapshot.as_path());

    let from_gguf = gguf::load(&default_gguf(), WeightFormat::F32).unwrap();
    let from_hf = hf::load_dir(Path::new(&stdout), Dtype::F32, false).unwrap();
    assert_eq!(from_hf.model.config().arch, Arch::Llama);
    assert_eq!(from_hf.tokenizer.stop_ids(), from_gguf.tokenizer.stop_ids());
    for question in [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "List three primary colours.",
        "What is 12 plus 30?",
        "Translate 'good morning' into Spanish.",
    ] {
        let (prompt_gguf, gguf_out) = greedy(&from_gguf, question, 24);
        let (prompt_hf, hf_out) = greedy(&from_hf, question, 24);
        assert_eq!(prompt_hf, prompt_gguf, "prompt of {question:?}");
        assert_eq!(
            hf_out,
            gguf_out,
            "{question:?}: HF {:?} vs GGUF {:?}",
            from_hf.tokenizer.decode(&hf_out, true).unwrap(),
            from_gguf.tokenizer.decode(&gguf_out, true).unwrap()
        );
    }
}

#[test]
fn offline_without_the_files_is_an_error_naming_the_repository() {
    let _turn = common::together_blocking();
    let home = TempDir::new("hf-empty");
    let (ok, _, stderr) = chorus_download(
        "hf:chorus-test/not-cached",
        &[("HF_HOME", home.0.as_path())],
        true,
    );
    assert!(!ok);
    assert!(
        stderr.contains("HF_HUB_OFFLINE") && stderr.contains("chorus-test/not-cached"),
        "{stderr}"
    );
    let (ok, _, stderr) = chorus_download(
        "hf:chorus-test/smollm2-hf:model.gguf",
        &[("HF_HOME", home.0.as_path())],
        true,
    );
    assert!(!ok);
    assert!(stderr.contains("model.gguf"), "{stderr}");
}

#[tokio::test]
async fn a_local_hf_directory_is_served_under_its_given_name() {
    let _turn = common::together().await;
    let home = TempDir::new("hf-dir");
    let snapshot = write_hf_cache(&home.0);
    let dir = snapshot.display().to_string();
    let config = <Config as clap::Parser>::parse_from([
        "chorus",
        "--model",
        &dir,
        "--served-model-name",
        "smollm2-hf",
    ]);
    let url = start(config);
    wait_ready(&url).await;
    let models = get_json(&url, "/v1/models").await;
    assert_eq!(models["data"][0]["id"], "smollm2-hf", "{models}");
    let mut body = chat(
        "What is the capital of France?",
        json!({"max_tokens": 12, "temperature": 0}),
    );
    body["model"] = json!("smollm2-hf");
    let (status, v) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Paris"), "{answer}");
}
