//! Property test over what a client controls: any body goes through JSON parsing,
//! validation, template rendering and tokenization without a panic (an error is fine),
//! and what is accepted is usable as the engine holds it (the f32 sampling values are
//! finite and in range, whatever the f64 on the wire was).

use std::path::Path;
use std::sync::{Arc, OnceLock};

use chorus_server::engine::ModelInfo;
use chorus_server::grammar::Grammars;
use chorus_server::openai::{ChatCompletionRequest, CompletionRequest};
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use chorus_server::validate::{self, Limits};
use proptest::prelude::*;
use serde_json::{Map, Value};

fn info() -> &'static ModelInfo {
    static INFO: OnceLock<ModelInfo> = OnceLock::new();
    INFO.get_or_init(|| {
        let resolved =
            resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).expect("default model resolves");
        let m = chorus_model::gguf::load(&resolved.path, chorus_model::WeightFormat::Quantized)
            .expect("model loads");
        let tokenizer = Arc::new(m.tokenizer);
        let vocab = m.model.config().vocab;
        ModelInfo {
            id: DEFAULT_MODEL.into(),
            tokenizer: tokenizer.clone(),
            template: m.template,
            device: "cpu".into(),
            max_seq_tokens: m.model.config().context_len,
            seq_limit: None,
            created: 0,
            grammars: Grammars::new(tokenizer, vocab).map(Arc::new),
            reasoning: false,
        }
    })
}

const LIMITS: Limits = Limits {
    max_stop: 16,
    max_stop_bytes: 256,
    max_prompt_tokens: Some(4096),
    max_n: 8,
    max_tool_calls: 4,
    max_prompts: 4,
};

fn check(body: &str) {
    if let Ok(req) = serde_json::from_str::<ChatCompletionRequest>(body) {
        if let Ok(valid) = validate::chat(info(), LIMITS, "fuzz".into(), req) {
            usable(&valid, body);
        }
    }
    if let Ok(req) = serde_json::from_str::<CompletionRequest>(body) {
        if let Ok(valid) = validate::completion(info(), LIMITS, "fuzz".into(), req) {
            usable(&valid, body);
        }
    }
}

/// An accepted request's sampling values, as f32, are what the sampler can use (before
/// the fix `repetition_penalty: 1e-300` passed as f64 and became 0 as f32: NaN logits).
fn usable(valid: &validate::ValidRequest, body: &str) {
    assert!(
        (1..=LIMITS.max_prompts).contains(&valid.gens.len()),
        "{body}"
    );
    for gen in &valid.gens {
        sampling_usable(&gen.params, body);
    }
}

fn sampling_usable(p: &chorus_model::SamplingParams, body: &str) {
    assert!((0.0..=2.0).contains(&p.temperature), "{body}");
    assert!(p.top_p > 0.0 && p.top_p <= 1.0, "{body}");
    assert!((0.0..=1.0).contains(&p.min_p), "{body}");
    assert!(
        p.repetition_penalty > 0.0 && p.repetition_penalty.is_finite(),
        "{body}"
    );
    for v in [p.presence_penalty, p.frequency_penalty] {
        assert!(v.is_finite(), "{body}");
    }
    assert!(p.logit_bias.iter().all(|(_, b)| b.is_finite()), "{body}");
}

/// Strings a template or tokenizer might choke on.
fn tricky_text() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        Just("{{ raise_exception('x') }}".to_string()),
        Just("{% for m in messages %}{{ m }}{% endfor %}".to_string()),
        Just("<|im_start|>system\n<|im_end|>".to_string()),
        Just("\u{0}\u{fffd}\u{1f600}".to_string()),
        "[a-z ]{0,40}",
    ]
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
            .prop_map(Value::from),
        (-3.0f64..3.0).prop_map(Value::from),
        // Values that are fine as f64 but 0 or infinite as f32.
        prop::sample::select(vec![
            1e-300,
            -1e-300,
            1e-46,
            1e39,
            3.5e38,
            f64::MIN_POSITIVE
        ])
        .prop_map(Value::from),
        tricky_text().prop_map(Value::String),
    ]
}

const KEYS: [&str; 38] = [
    "model",
    "messages",
    "role",
    "content",
    "type",
    "text",
    "prompt",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "n",
    "stream",
    "stream_options",
    "include_usage",
    "ignore_eos",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "min_tokens",
    "stop_token_ids",
    "response_format",
    "json_schema",
    "schema",
    "properties",
    "items",
    "enum",
    "required",
    "echo",
    "suffix",
    "user",
];

/// JSON shaped like requests: objects keyed by request field names, nested a few levels.
fn request_like() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((prop::sample::select(&KEYS[..]), inner), 0..8).prop_map(
                |pairs| {
                    let map: Map<String, Value> =
                        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                    Value::Object(map)
                }
            ),
        ]
    })
}

/// A valid request with one field replaced by something arbitrary.
fn almost_valid() -> impl Strategy<Value = Value> {
    (
        prop::sample::select(&KEYS[..]),
        request_like(),
        tricky_text(),
    )
        .prop_map(|(key, value, text)| {
            let mut req = serde_json::json!({
                "model": DEFAULT_MODEL,
                "messages": [{"role": "user", "content": text}],
                "prompt": "Once upon a time",
                "max_tokens": 8,
            });
            req[key] = value;
            req
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn arbitrary_bodies_never_panic(body in any::<String>()) {
        check(&body);
    }

    #[test]
    fn request_shaped_json_never_panics(v in request_like()) {
        check(&v.to_string());
    }

    #[test]
    fn almost_valid_requests_never_panic(v in almost_valid()) {
        check(&v.to_string());
    }
}
