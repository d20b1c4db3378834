//! Each architecture on a tiny random model read through its HF `config.json`: a
//! sequence's logits are the same whether it runs alone or batched with others (and
//! prefilled in chunks), which exercises every per-family switch (bias, q/k norms,
//! sandwich norms, sliding windows, rope variants) under ragged batching. The same
//! weights written as a GGUF file the way llama.cpp's converter writes them load to the
//! same config and the same logits, so both readers of every family agree. Plus the
//! load-time errors for settings chorus does not implement.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use crate::common::run;
use crate::tiny::{config, tiny, weights, MODEL_TYPES, VOCAB};
use candle_core::{Device, Tensor};
use chorus_model::arch::{self, hf_tensor_name};
use chorus_model::hf::HfWeights;
use chorus_model::{load, Dtype};
use serde_json::{json, Value};

#[test]
fn every_architecture_gives_the_same_logits_alone_and_batched() {
    let prompts: Vec<Vec<u32>> = vec![
        (1..12).collect(),
        vec![5, 9, 3],
        (20..45).map(|t| t % VOCAB as u32).collect(),
        vec![42],
    ];
    for model_type in MODEL_TYPES {
        let m = tiny(model_type, false);
        let together = run(&m, &prompts, 7, 6);
        for (i, p) in prompts.iter().enumerate() {
            let alone = run(&m, std::slice::from_ref(p), 64, 6);
            assert_eq!(alone[0], together[i], "{model_type}: prompt {i}");
        }
        // The logits are a real distribution, not a constant.
        let first = &together[0][0];
        assert!(first.iter().all(|x| x.is_finite()), "{model_type}");
        assert!(first.iter().any(|&x| x != first[0]), "{model_type}");
    }
}

#[test]
fn sliding_window_changes_what_far_tokens_see() {
    // The same weights with and without the window (and one rope base throughout):
    // equal while a sequence fits in the window, different once it does not.
    let build = |layer_type: &str| {
        let mut c = config("gemma3_text");
        c["rope_local_base_freq"] = json!(10000.0);
        c["layer_types"] = json!([layer_type, layer_type, "full_attention"]);
        let cfg = arch::from_hf(&c).unwrap();
        let tensors = weights(&cfg);
        load::build(
            cfg.clone(),
            &mut HfWeights {
                tensors,
                arch: cfg.arch,
                dtype: Dtype::F32,
                for_device: false,
            },
        )
        .unwrap()
    };
    let (windowed, full) = (build("sliding_attention"), build("full_attention"));
    let short = vec![(1..6).collect::<Vec<u32>>()];
    assert_eq!(run(&windowed, &short, 64, 1), run(&full, &short, 64, 1));
    let long = vec![(1..30).collect::<Vec<u32>>()];
    assert_ne!(run(&windowed, &long, 64, 1), run(&full, &long, 64, 1));
}

#[test]
fn bf16_weights_track_f32() {
    let cfg = arch::from_hf(&config("qwen3")).unwrap();
    let build = |dtype| {
        load::build(
            cfg.clone(),
            &mut HfWeights {
                tensors: weights(&cfg),
                arch: cfg.arch,
                dtype,
                for_device: false,
            },
        )
        .unwrap()
    };
    let prompt = vec![(1..20).collect::<Vec<u32>>()];
    let a = run(&build(Dtype::F32), &prompt, 64, 1);
    let b = run(&build(Dtype::Bf16), &prompt, 64, 1);
    let diff = a[0][0]
        .iter()
        .zip(&b[0][0])
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "bf16 logits differ by {diff}");
    assert!(diff > 0.0, "bf16 weights were not used");
}

fn load_error(c: Value) -> String {
    match arch::from_hf(&c) {
        Ok(_) => panic!("config loaded: {c}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_settings_are_load_errors_that_name_them() {
    let msg = load_error(config("mamba"));
    assert!(msg.contains("`mamba`"), "{msg}");

    let mut c = config("llama");
    c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
    let msg = load_error(c);
    assert!(
        msg.contains("yarn") && msg.contains("rope_scaling"),
        "{msg}"
    );

    let mut c = config("qwen2");
    c["use_sliding_window"] = json!(true);
    assert!(load_error(c).contains("use_sliding_window"));

    let mut c = config("gemma3_text");
    c["final_logit_softcapping"] = json!(30.0);
    assert!(load_error(c).contains("final_logit_softcapping"));

    let mut c = config("llama");
    c["hidden_act"] = json!("gelu");
    assert!(load_error(c).contains("hidden_act"));

    let mut c = config("qwen3");
    c.as_object_mut().unwrap().remove("hidden_size");
    assert!(load_error(c).contains("hidden_size"));
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let cfg = arch::from_hf(&config("llama")).unwrap();
    let mut tensors = weights(&cfg);
    let name = hf_tensor_name(cfg.arch, "blk.1.ffn_down.weight");
    tensors.insert(
        name.clone(),
        Tensor::zeros((32, 40), candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    let err = load::build(
        cfg.clone(),
        &mut HfWeights {
            tensors,
            arch: cfg.arch,
            dtype: Dtype::F32,
            for_device: false,
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("ffn_down"), "{err}");
}

/// The tiny model of `model_type` written as a GGUF file the way llama.cpp's converter
/// writes one (GGUF names, llama's q/k rows permuted for interleaved rope, Gemma's norms
/// with the 1 added), next to the same weights read as an HF checkpoint.
fn gguf_twin(
    model_type: &str,
    hf: &Value,
    path: &std::path::Path,
    edit: impl FnOnce(&mut Vec<(String, candle_core::quantized::gguf_file::Value)>),
) {
    use candle_core::quantized::gguf_file::{self, Value as G};
    use candle_core::quantized::{GgmlDType, QTensor};

    let cfg = arch::from_hf(hf).unwrap();
    let tensors = weights(&cfg);
    let arch_name = match model_type {
        "gemma3_text" => "gemma3",
        other => other,
    };
    let key = |k: &str| format!("{arch_name}.{k}");
    let u = |v: usize| G::U32(v as u32);
    let mut tokens = vec![G::String("<eos>".into())];
    tokens.extend((1..VOCAB).map(|i| G::String(format!("t{i}"))));
    let mut types = vec![G::I32(3)];
    types.extend((1..VOCAB).map(|_| G::I32(1)));
    let mut meta: Vec<(String, G)> = vec![
        ("general.architecture".into(), G::String(arch_name.into())),
        (key("block_count"), u(cfg.layers)),
        (key("embedding_length"), u(cfg.hidden)),
        (key("feed_forward_length"), u(cfg.ffn)),
        (key("attention.head_count"), u(cfg.heads)),
        (key("attention.head_count_kv"), u(cfg.kv_heads)),
        (key("attention.key_length"), u(cfg.head_dim)),
        (key("attention.layer_norm_rms_epsilon"), G::F32(cfg.rms_eps)),
        (key("context_length"), u(cfg.context_len)),
        (key("rope.freq_base"), G::F32(cfg.rope.theta)),
        ("tokenizer.ggml.model".into(), G::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), G::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), G::Array(types)),
        ("tokenizer.ggml.eos_token_id".into(), G::U32(0)),
    ];
    if let Some(w) = cfg.window(0) {
        meta.push((key("attention.sliding_window"), u(w)));
    }
    edit(&mut meta);
    let offset = arch::hf_norm_offset(cfg.arch);
    let mut qtensors = Vec::new();
    for (hf_name, t) in &tensors {
        let name = gguf_name(cfg.arch, hf_name, cfg.layers);
        let t = match name.as_str() {
            n if cfg.arch == chorus_model::Arch::Llama && n.ends_with("attn_q.weight") => {
                permute(t, cfg.heads)
            }
            n if cfg.arch == chorus_model::Arch::Llama && n.ends_with("attn_k.weight") => {
                permute(t, cfg.kv_heads)
            }
            n if n.ends_with("norm.weight") => (t + f64::from(offset)).unwrap(),
            _ => t.clone(),
        };
        qtensors.push((name, QTensor::quantize(&t, GgmlDType::F32).unwrap()));
    }
    let meta_refs: Vec<(&str, &G)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> =
        qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut file = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut file, &meta_refs, &tensor_refs).unwrap();
}

/// The GGUF name whose HF name is `hf_name`.
fn gguf_name(arch: chorus_model::Arch, hf_name: &str, layers: usize) -> String {
    let mut candidates = vec![
        "token_embd.weight".to_string(),
        "output.weight".into(),
        "output_norm.weight".into(),
    ];
    for i in 0..layers {
        for part in [
            "attn_norm.weight",
            "attn_q.weight",
            "attn_k.weight",
            "attn_v.weight",
            "attn_output.weight",
            "attn_q.bias",
            "attn_k.bias",
            "attn_v.bias",
            "attn_q_norm.weight",
            "attn_k_norm.weight",
            "post_attention_norm.weight",
            "ffn_norm.weight",
            "ffn_gate.weight",
            "ffn_up.weight",
            "ffn_down.weight",
            "post_ffw_norm.weight",
        ] {
            candidates.push(format!("blk.{i}.{part}"));
        }
    }
    candidates
        .into_iter()
        .find(|c| hf_tensor_name(arch, c) == hf_name)
        .unwrap_or_else(|| panic!("no GGUF name for {hf_name}"))
}

/// llama.cpp's permutation of llama q/k rows (HF order → GGUF order).
fn permute(t: &Tensor, heads: usize) -> Tensor {
    let (rows, cols) = t.dims2().unwrap();
    t.reshape((heads, 2, rows / heads / 2, cols))
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((rows, cols))
        .unwrap()
}

#[test]
fn gguf_and_hf_files_of_the_same_weights_agree() {
    let dir = std::env::temp_dir().join(format!("chorus-twins-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prompts: Vec<Vec<u32>> = vec![(1..12).collect(), vec![5, 9, 3]];
    for model_type in MODEL_TYPES {
        let mut hf = config(model_type);
        let obj = hf.as_object_mut().unwrap();
        // What GGUF files do not record: llama's scaling comes as a tensor there, and
        // Gemma's layer pattern, local rope base and attention scale are fixed.
        obj.remove("rope_scaling");
        obj.remove("layer_types");
        if model_type == "gemma3_text" {
            obj.insert("rope_local_base_freq".into(), json!(10000.0));
            obj.insert("query_pre_attn_scalar".into(), json!(16));
        }
        let path = dir.join(format!("{model_type}.gguf"));
        gguf_twin(model_type, &hf, &path, |_| {});
        let from_gguf =
            chorus_model::gguf::load(&path, chorus_model::WeightFormat::Packed).unwrap();
        let cfg = arch::from_hf(&hf).unwrap();
        let mut source = HfWeights {
            tensors: weights(&cfg),
            arch: cfg.arch,
            dtype: Dtype::F32,
            for_device: false,
        };
        let from_hf = load::build(cfg.clone(), &mut source).unwrap();
        let mut gguf_cfg = from_gguf.model.config().clone();
        gguf_cfg.rope_style = cfg.rope_style;
        assert_eq!(gguf_cfg, cfg, "{model_type}: configs differ");
        let a = run(&from_gguf.model, &prompts, 64, 3);
        let b = run(&from_hf, &prompts, 64, 3);
        // Identical arithmetic except for llama, whose permuted head dimensions are
        // summed in another order in attention (and then rounded to f16 in the KV cache).
        let tolerance = match model_type {
            "llama" => 1e-3,
            _ => 0.0,
        };
        for (sa, sb) in a.iter().flatten().zip(b.iter().flatten()) {
            let d = sa
                .iter()
                .zip(sb)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max);
            assert!(d <= tolerance, "{model_type}: logits differ by {d}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A GGUF header whose known keys have another type, say what no module implements, or
/// size things absurdly is a load error naming the key: never a default in its place
/// (a silently different model), nor an allocation that aborts the process.
#[test]
fn bad_gguf_metadata_is_a_load_error_naming_the_key() {
    use candle_core::quantized::gguf_file::Value as G;
    let dir = std::env::temp_dir().join(format!("chorus-bad-gguf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut hf = config("llama");
    hf.as_object_mut().unwrap().remove("rope_scaling");
    let cases: Vec<(&str, G)> = vec![
        ("llama.rope.freq_base", G::String("100000".into())),
        ("llama.rope.scaling.type", G::U32(2)),
        ("tokenizer.ggml.add_bos_token", G::String("true".into())),
        ("tokenizer.chat_template", G::U32(1)),
        ("llama.final_logit_softcapping", G::F32(30.0)),
        ("llama.block_count", G::U64(1 << 40)),
        ("llama.attention.key_length", G::U64(1 << 40)),
        // Fewer layers than the file's tensors hold: they would be dropped unread.
        ("llama.block_count", G::U32(1)),
    ];
    for (i, (key, value)) in cases.into_iter().enumerate() {
        let path = dir.join(format!("bad-{i}.gguf"));
        gguf_twin("llama", &hf, &path, |meta| {
            meta.retain(|(k, _)| k != key);
            meta.push((key.to_string(), value));
        });
        let err = match chorus_model::gguf::load(&path, chorus_model::WeightFormat::Packed) {
            Ok(_) => panic!("{key}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(key), "{key}: {err}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where a tensor's name sits in the tensor table, and where its offset field does.
fn info_at(file: &[u8], name: &[u8]) -> (usize, usize) {
    let at = file
        .windows(name.len())
        .position(|w| w == name)
        .expect("name in the table");
    let dims_at = at + name.len();
    let dims = u32::from_le_bytes(file[dims_at..dims_at + 4].try_into().unwrap()) as usize;
    (at, dims_at + 4 + 8 * dims + 4)
}

/// A tensor table that names a tensor twice, or lays two over the same bytes, is a load
/// error (candle keeps one tensor per name, and reads whatever bytes an offset says).
#[test]
fn a_tensor_table_with_a_twice_named_or_overlapping_tensor_is_a_load_error() {
    let dir = std::env::temp_dir().join(format!("chorus-bad-table-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut hf = config("llama");
    hf.as_object_mut().unwrap().remove("rope_scaling");
    let good = dir.join("good.gguf");
    gguf_twin("llama", &hf, &good, |_| {});
    let file = std::fs::read(&good).unwrap();
    let (_, q_offset) = info_at(&file, b"blk.0.attn_q.weight");
    let (k, k_offset) = info_at(&file, b"blk.0.attn_k.weight");

    let mut twice = file.clone();
    twice[k..k + 19].copy_from_slice(b"blk.0.attn_q.weight");
    let mut overlap = file.clone();
    overlap.copy_within(q_offset..q_offset + 8, k_offset);
    for (what, bytes, expected) in [
        ("twice", twice, "given twice"),
        ("overlap", overlap, "overlap"),
    ] {
        let path = dir.join(format!("{what}.gguf"));
        std::fs::write(&path, bytes).unwrap();
        let err = match chorus_model::gguf::load(&path, chorus_model::WeightFormat::Packed) {
            Ok(_) => panic!("{what}: loaded"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(expected), "{what}: {err}");
    }
    assert!(chorus_model::gguf::load(&good, chorus_model::WeightFormat::Packed).is_ok());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn all_logits_gives_every_position_what_decoding_gives_the_last() {
    let m = tiny("qwen3", false);
    let prompt: Vec<u32> = (3..14).collect();
    let blocks: Vec<u32> = (0..4).collect();
    let mut kv = chorus_model::KvCache::new(m.config().kv_shape(), 4).unwrap();
    let all = m
        .forward(
            &mut kv,
            &[chorus_model::SeqInput {
                tokens: &prompt,
                start_pos: 0,
                blocks: &blocks,
                wants_logits: true,
                all_logits: true,
            }],
        )
        .unwrap();
    assert_eq!(all.len(), prompt.len());
    for (i, row) in all.iter().enumerate() {
        let alone = run(&m, &[prompt[..=i].to_vec()], 64, 1);
        assert_eq!(&alone[0][0], row, "position {i}");
    }
}
