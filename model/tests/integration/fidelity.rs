//! The tokenizer and chat template against the reference implementation's own output
//! (`tests/reference/`, from the project's `shared/reference/`).

use crate::common;
use chorus_model::{gguf, ChatMessage, WeightFormat};

#[test]
fn tokenizer_and_template_match_the_reference() {
    let loaded =
        gguf::load(&common::model_path(), WeightFormat::Quantized).expect("default model loads");

    let cases = common::reference("tokenize.json");
    let cases = cases["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = case["ids"]
            .as_array()
            .expect("ids")
            .iter()
            .map(|v| v.as_u64().expect("id") as u32)
            .collect();
        let got = loaded.tokenizer.encode(text).expect("encode");
        assert_eq!(got, want, "token ids of {text:?}");
        // And back: decoding the ids gives the text again.
        assert_eq!(loaded.tokenizer.decode(&got, false).expect("decode"), text);
    }

    let template = common::reference("chat_template.json");
    for case in template["cases"].as_array().expect("cases") {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| ChatMessage {
                role: m["role"].as_str().expect("role").into(),
                content: m["content"].as_str().expect("content").into(),
                ..Default::default()
            })
            .collect();
        let prompt = loaded.template.render(&messages, true).expect("render");
        assert_eq!(prompt, case["prompt"].as_str().expect("prompt"));
        // The chat path (message text escaped, then only the template's markers read as
        // control tokens) gives the same ids for text without control tokens in it.
        let escaped: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: m.role.clone(),
                content: loaded.tokenizer.escape_content(&m.content),
                ..Default::default()
            })
            .collect();
        let rendered = loaded.template.render(&escaped, true).expect("render");
        assert_eq!(
            loaded.tokenizer.encode_chat(&rendered).expect("encode"),
            loaded.tokenizer.encode(&prompt).expect("encode")
        );
        if messages.len() == 1 && messages[0].content == "What is the capital of France?" {
            assert_eq!(loaded.tokenizer.encode(&prompt).expect("encode").len(), 37);
        }
    }
}
