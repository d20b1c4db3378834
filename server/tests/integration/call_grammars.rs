//! The grammars that hold function calls, on the real tokenizer: which answers they
//! admit token by token. With `tool_choice: "auto"` a call may follow blank space (models
//! write a newline first) and, for a thinking model, a `<think>` block; free text never
//! takes a call with it, so every call is held to its schema.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use crate::common;

use chorus_server::grammar::Grammars;
use chorus_server::reasoning::Start;
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use chorus_server::tools::{CallFormat, FunctionSpec, Shape, ToolRequest};
use serde_json::json;
use std::path::Path;
use std::sync::Arc;

#[test]
fn calls_after_blank_space_or_a_thinking_block_are_held_to_their_schema() {
    let _turn = common::together_blocking();
    let resolved = resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).unwrap();
    let m =
        chorus_model::gguf::load(&resolved.path, chorus_model::WeightFormat::Quantized).unwrap();
    let tokenizer = Arc::new(m.tokenizer);
    let vocab = m.model.config().vocab;
    let g = Grammars::new(tokenizer.clone(), vocab).unwrap();
    let f = FunctionSpec {
        name: "get_weather".into(),
        description: None,
        parameters: json!({"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}),
    };
    let t = ToolRequest::new(Shape::Chat, vec![f], Some(&json!("auto")), None, 4)
        .unwrap()
        .unwrap();
    let good = r#"{"name": "get_weather", "arguments": {"city": "Berlin"}}"#;
    let bad = r#"{"name": "get_weather", "arguments": {"town": "Berlin"}}"#;
    let hc = |s: &str| format!("<tool_call>\n{s}\n</tool_call>");
    let gen = |s: &str| format!(r#"{{"tool_calls": [{s}]}}"#);
    let cases: Vec<(CallFormat, Option<Start>, String, bool)> = vec![
        (CallFormat::Hermes, None, format!("\n{}", hc(good)), true),
        (CallFormat::Hermes, None, "Hello <tool_call> x".into(), true),
        (CallFormat::Hermes, None, format!("\n{}", hc(bad)), false),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            format!("<think>\nabc\n</think>\n\n{}", hc(good)),
            true,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            format!("<think>\nabc\n</think>\n\n\n{}", hc(bad)),
            false,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            format!("<think>\nabc\n</think>{}", hc(good)),
            true,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            "<think>\nabc\n</think>\n\nHello".into(),
            true,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            "<think>\nabc\n</think>\n\n<think>x".into(),
            false,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Free),
            "\n<think>\nabc\n</think>\n\nHi".into(),
            true,
        ),
        (CallFormat::Hermes, Some(Start::Free), "Hello".into(), true),
        (CallFormat::Hermes, Some(Start::Free), hc(good), true),
        (
            CallFormat::Hermes,
            Some(Start::Thinking),
            format!("abc\n</think>\n\n{}", hc(good)),
            true,
        ),
        (
            CallFormat::Hermes,
            Some(Start::Thinking),
            "abc\n</think>\n\nHi".into(),
            true,
        ),
        (
            CallFormat::Generic,
            Some(Start::Free),
            format!("<think>\nabc\n</think>\n\n{}", gen(good)),
            true,
        ),
        (
            CallFormat::Generic,
            Some(Start::Free),
            format!("<think>\nabc\n</think>\n\n{}", gen(bad)),
            false,
        ),
        (
            CallFormat::Generic,
            Some(Start::Free),
            "<think>\nabc\n</think>\n\nHi there".into(),
            true,
        ),
        (
            CallFormat::Generic,
            Some(Start::Thinking),
            format!("abc\n</think>\n\n{}", gen(good)),
            true,
        ),
        (CallFormat::Generic, None, gen(good), true),
        (CallFormat::Generic, None, "Hi {x}".into(), true),
    ];
    let mut fails = Vec::new();
    for (i, (format, start, text, want)) in cases.into_iter().enumerate() {
        let grammar = match start {
            Some(s) => s.grammar(&format.rules(&t, None, "answer", true)),
            None => format.grammar(&t, None),
        };
        let got = run(&g, &tokenizer, vocab, grammar, &text);
        if got != want {
            fails.push(format!(
                "case {i} ({format:?}, {start:?}) {text:?}: admitted {got}"
            ));
        }
    }
    assert!(fails.is_empty(), "{fails:#?}");
}

fn run(
    g: &Grammars,
    tokenizer: &chorus_model::Tokenizer,
    vocab: usize,
    grammar: String,
    text: &str,
) -> bool {
    let mut c = g.lark("tools", grammar).unwrap();
    let ids = tokenizer.encode_text(text).unwrap();
    let mut logits = vec![0f32; vocab];
    let mut done = String::new();
    for id in ids {
        logits.iter_mut().for_each(|l| *l = 0.0);
        c.mask(&mut logits).unwrap();
        let piece = tokenizer.decode(&[id], false).unwrap_or_default();
        if logits[id as usize] == f32::NEG_INFINITY {
            eprintln!("refused {piece:?} after {done:?}");
            return false;
        }
        c.consume(id).unwrap();
        done.push_str(&piece);
    }
    true
}
