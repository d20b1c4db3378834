//! Whose fault a failure of the grammar engine is, on the real default model's
//! vocabulary: a token its mask allowed that it then gives up on is the schema's (a 400
//! naming the field), a token its mask did not allow is the server's (a 500).

use crate::common;

use std::path::Path;
use std::sync::Arc;

use chorus_server::grammar::{Grammars, Rejection};
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use serde_json::{json, Value};

/// The default model's grammars, and its vocabulary's size.
fn grammars() -> (Grammars, usize) {
    let resolved =
        resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).expect("default model resolves");
    let m = chorus_model::gguf::load(&resolved.path, chorus_model::WeightFormat::Quantized)
        .expect("model loads");
    let vocab = m.model.config().vocab;
    let g = Grammars::new(Arc::new(m.tokenizer), vocab).expect("grammars");
    (g, vocab)
}

/// The id of a token whose text is `text`.
fn token(g: &Grammars, vocab: usize, text: &str) -> u32 {
    (0..vocab as u32)
        .find(|&id| g.token_bytes(id) == text.as_bytes())
        .expect("the token exists")
}

#[test]
fn whose_fault_a_grammar_failure_is() {
    let _turn = common::together_blocking();
    let (g, vocab) = grammars();
    // Every branch opens with `{`: once it is taken, 3,000 alternatives are open in one
    // parser row, past llguidance's limit of 2,000.
    let branches: Vec<Value> = (0..3000)
        .map(|i| {
            json!({"type": "object", "properties": {format!("k{i}"): {"type": "integer"}},
            "required": [format!("k{i}")]})
        })
        .collect();
    let mut c = g
        .json_schema("response_format", json!({"anyOf": branches}), None)
        .expect("compiles");
    assert_eq!(c.param(), "response_format");
    let mut logits = vec![0.0f32; vocab];
    c.mask(&mut logits).expect("the first mask is computed");
    // Whatever token opens the object.
    let open = (0..vocab)
        .find(|&id| logits[id].is_finite())
        .expect("a token is allowed") as u32;
    match c.consume(open) {
        Err(Rejection::GaveUp(e)) => assert!(e.contains("max is 2000"), "{e}"),
        other => panic!("expected the engine to give up, got {other:?}"),
    }

    // A token the mask ruled out is not the schema's fault.
    let mut c = g
        .json_schema("response_format", json!({"type": "object"}), None)
        .expect("compiles");
    let mut logits = vec![0.0f32; vocab];
    c.mask(&mut logits).expect("masked");
    let word = token(&g, vocab, "hello");
    assert!(logits[word as usize].is_infinite());
    assert!(matches!(c.consume(word), Err(Rejection::NotAllowed(_))));
}

/// An object may leave `MAX_OPTIONAL_PROPERTIES` open, which the engine holds once the
/// object opens (one more is refused before it compiles). And the first mask comes with
/// the compiled grammar (computed on the preprocessing pool), from the cache alike.
#[test]
fn the_optional_properties_let_through_are_what_the_engine_holds() {
    let _turn = common::together_blocking();
    let (g, vocab) = grammars();
    let most = chorus_server::schema_check::MAX_OPTIONAL_PROPERTIES;
    let schema = |n: usize| {
        let properties: serde_json::Map<String, Value> = (0..n)
            .map(|i| (format!("p{i}"), json!({"type": "integer"})))
            .collect();
        json!({"type": "object", "properties": properties})
    };
    let e = g
        .json_schema("response_format", schema(most + 1), None)
        .expect_err("one optional property too many");
    assert!(e.contains("optional properties"), "{e}");
    for _ in 0..2 {
        let mut c = g
            .json_schema("response_format", schema(most), None)
            .expect("compiles");
        let mut logits = vec![0.0f32; vocab];
        c.mask(&mut logits).expect("masked");
        let open = token(&g, vocab, "{");
        assert!(logits[open as usize].is_finite());
        assert!(logits[token(&g, vocab, "hello") as usize].is_infinite());
        c.consume(open).expect("the object opens");
        let mut logits = vec![0.0f32; vocab];
        c.mask(&mut logits)
            .expect("every optional property is held open");
        assert!(logits[token(&g, vocab, "\"") as usize].is_finite());
        c.consume(token(&g, vocab, "\""))
            .expect("a property's name begins");
    }
}
