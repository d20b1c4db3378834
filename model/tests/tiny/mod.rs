//! Tiny random models of every architecture, read through their HF `config.json`, for
//! the tests that check each family's switches.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use chorus_model::arch::{self, hf_tensor_name};
use chorus_model::hf::HfWeights;
use chorus_model::{load, Dtype, ModelConfig, Transformer};
use serde_json::{json, Value};

/// The architectures, by HF `model_type`.
pub const MODEL_TYPES: [&str; 4] = ["llama", "qwen2", "qwen3", "gemma3_text"];

pub const VOCAB: usize = 97;

pub fn config(model_type: &str) -> Value {
    let mut c = json!({
        "model_type": model_type,
        "hidden_size": 32,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 48,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
    });
    let extra = match model_type {
        "llama" => json!({"rope_scaling": {"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}}),
        "gemma3_text" => json!({"sliding_window": 5, "layer_types":
            ["sliding_attention", "sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 24, "rope_local_base_freq": 500.0,
            "hidden_activation": "gelu_pytorch_tanh"}),
        _ => json!({}),
    };
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

/// Deterministic values in [-0.5, 0.5).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

/// Random weights under the HF names of `cfg`'s architecture.
pub fn weights(cfg: &ModelConfig) -> HashMap<String, Tensor> {
    let (h, q, kv, f) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim(), cfg.ffn);
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("token_embd.weight".into(), vec![VOCAB, h]),
        ("output_norm.weight".into(), vec![h]),
    ];
    for i in 0..cfg.layers {
        let n = |s: &str| format!("blk.{i}.{s}");
        shapes.extend([
            (n("attn_norm.weight"), vec![h]),
            (n("attn_q.weight"), vec![q, h]),
            (n("attn_k.weight"), vec![kv, h]),
            (n("attn_v.weight"), vec![kv, h]),
            (n("attn_output.weight"), vec![h, q]),
            (n("ffn_norm.weight"), vec![h]),
            (n("ffn_gate.weight"), vec![f, h]),
            (n("ffn_up.weight"), vec![f, h]),
            (n("ffn_down.weight"), vec![h, f]),
        ]);
        if cfg.qkv_bias {
            shapes.extend([
                (n("attn_q.bias"), vec![q]),
                (n("attn_k.bias"), vec![kv]),
                (n("attn_v.bias"), vec![kv]),
            ]);
        }
        if cfg.qk_norm {
            shapes.extend([
                (n("attn_q_norm.weight"), vec![cfg.head_dim]),
                (n("attn_k_norm.weight"), vec![cfg.head_dim]),
            ]);
        }
        if cfg.sandwich_norms {
            shapes.extend([
                (n("post_attention_norm.weight"), vec![h]),
                (n("post_ffw_norm.weight"), vec![h]),
            ]);
        }
    }
    shapes
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n = shape.iter().product();
            let mut v = values(n, i as u64 + 1);
            if name.ends_with("norm.weight") {
                v.iter_mut().for_each(|x| *x += 1.0);
            }
            let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
            (hf_tensor_name(cfg.arch, &name), t)
        })
        .collect()
}

/// The tiny model of `model_type`; `for_device` keeps its projections candle tensors.
pub fn tiny(model_type: &str, for_device: bool) -> Transformer {
    let cfg = arch::from_hf(&config(model_type)).unwrap();
    let tensors = weights(&cfg);
    let mut source = HfWeights {
        tensors,
        arch: cfg.arch,
        dtype: Dtype::F32,
        for_device,
    };
    load::build(cfg, &mut source).unwrap()
}
