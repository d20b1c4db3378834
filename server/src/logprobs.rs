//! Log-probabilities in the two response shapes: chat's `logprobs.content[]` (token,
//! logprob, UTF-8 bytes, top alternatives) and completions' parallel arrays.

use serde_json::{Map, Value};

use crate::engine::{ModelInfo, TokenLogprob};
use crate::openai::{ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob};

/// The bytes of a token, and its text (invalid UTF-8, a piece of a character, shown
/// with replacement characters as OpenAI does).
fn token(info: &ModelInfo, id: u32) -> (String, Vec<u8>) {
    let bytes = match &info.grammars {
        Ok(g) => g.token_bytes(id).to_vec(),
        Err(_) => info
            .tokenizer
            .decode(&[id], false)
            .unwrap_or_default()
            .into_bytes(),
    };
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

pub fn chat(info: &ModelInfo, entries: &[TokenLogprob]) -> Value {
    let content = entries
        .iter()
        .map(|e| {
            let (token_text, bytes) = token(info, e.token);
            ChatTokenLogprob {
                token: token_text,
                logprob: e.logprob,
                bytes,
                top_logprobs: e
                    .top
                    .iter()
                    .map(|&(id, logprob)| {
                        let (token, bytes) = token(info, id);
                        TopLogprob {
                            token,
                            logprob,
                            bytes,
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    serde_json::to_value(ChatLogprobs { content }).unwrap_or(Value::Null)
}

/// `offset`: characters of text before the first of `entries` (in this response).
pub fn completion(info: &ModelInfo, entries: &[TokenLogprob], offset: usize) -> Value {
    completion_with_prompt(info, None, &[], entries, offset)
}

/// As [`completion`], led by an echoed prompt whose text starts at offset 0: its first
/// token (which has no log-probability: nothing precedes it; `None` when the first
/// scored token is the first of the text, after a BOS the server added) and the scores
/// of the rest. `entries`, the completion's, start at character `offset`, where the
/// echoed text ends.
pub fn completion_with_prompt(
    info: &ModelInfo,
    first: Option<u32>,
    prompt: &[TokenLogprob],
    entries: &[TokenLogprob],
    offset: usize,
) -> Value {
    let mut out = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    let mut at = 0;
    if let Some(id) = first {
        let (text, _) = token(info, id);
        out.text_offset.push(at);
        at += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(None);
        out.top_logprobs.push(None);
    }
    for (i, e) in prompt.iter().chain(entries).enumerate() {
        if i == prompt.len() {
            at = offset;
        }
        let (text, _) = token(info, e.token);
        out.text_offset.push(at);
        at += text.chars().count();
        out.tokens.push(text);
        out.token_logprobs.push(Some(e.logprob));
        let mut top = Map::new();
        for &(id, lp) in &e.top {
            top.insert(token(info, id).0, Value::from(lp));
        }
        out.top_logprobs.push(Some(top));
    }
    serde_json::to_value(out).unwrap_or(Value::Null)
}
