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

/// Completions' name of a token: its text, or where its bytes are not whole UTF-8
/// characters (a byte-level vocabulary splits them), `bytes:` and their escapes, as
/// OpenAI writes them, so that the pieces of different characters stay apart as
/// `top_logprobs` keys.
fn completion_token(info: &ModelInfo, id: u32) -> (String, Vec<u8>) {
    let (text, bytes) = token(info, id);
    match std::str::from_utf8(&bytes) {
        Ok(_) => (text, bytes),
        Err(_) => {
            let escaped: String = bytes.iter().map(|b| format!("\\x{b:02x}")).collect();
            (format!("bytes:{escaped}"), bytes)
        }
    }
}

/// Where each token starts in a completion's text, in characters, as tokens are
/// appended. The text holds a character once its last byte has come, so a token that
/// starts inside a character (a byte-level vocabulary splits them) starts where that
/// character does; an invalid byte sequence is one replacement character, as the text
/// shows it. Offsets never decrease.
#[derive(Debug, Default, Clone)]
pub struct TextOffsets {
    chars: usize,
    /// The bytes of an incomplete character.
    pending: Vec<u8>,
}

impl TextOffsets {
    /// Offsets of tokens that follow `chars` characters of text.
    pub fn after(chars: usize) -> Self {
        Self {
            chars,
            pending: Vec::new(),
        }
    }

    /// The offset of a token of these bytes; moves past it.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let start = self.chars;
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.chars += s.chars().count();
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    let whole = std::str::from_utf8(&self.pending[..valid]).unwrap_or_default();
                    self.chars += whole.chars().count();
                    match e.error_len() {
                        Some(bad) => {
                            self.chars += 1;
                            self.pending.drain(..valid + bad);
                        }
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                    }
                }
            }
        }
        start
    }
}

/// The scores of a completion's `entries`, placed by `offsets` (kept across a stream's
/// chunks).
pub fn completion(info: &ModelInfo, entries: &[TokenLogprob], offsets: &mut TextOffsets) -> Value {
    let mut out = CompletionLogprobs::default();
    for e in entries {
        push_scored(info, e, offsets, Text::Generated, &mut out);
    }
    serde_json::to_value(out).unwrap_or(Value::Null)
}

/// Whose text a scored token's offset counts in: an echoed prompt is the caller's text
/// as written, special tokens and all; generated text leaves special tokens out.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Text {
    Prompt,
    Generated,
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
    let mut out = CompletionLogprobs::default();
    let mut offsets = TextOffsets::default();
    if let Some(id) = first {
        let (text, bytes) = completion_token(info, id);
        out.text_offset.push(offsets.push(&bytes));
        out.tokens.push(text);
        out.token_logprobs.push(None);
        out.top_logprobs.push(None);
    }
    for e in prompt {
        push_scored(info, e, &mut offsets, Text::Prompt, &mut out);
    }
    let mut offsets = TextOffsets::after(offset);
    for e in entries {
        push_scored(info, e, &mut offsets, Text::Generated, &mut out);
    }
    serde_json::to_value(out).unwrap_or(Value::Null)
}

/// One scored token: its alternatives always include itself, as OpenAI's do ("up to
/// logprobs + 1 elements"), so `top_logprobs[i][tokens[i]]` is always there.
fn push_scored(
    info: &ModelInfo,
    e: &TokenLogprob,
    offsets: &mut TextOffsets,
    whose: Text,
    out: &mut CompletionLogprobs,
) {
    let (text, bytes) = completion_token(info, e.token);
    // A special token drawn is left out of the generated text: it takes no place there.
    let skipped = whose == Text::Generated
        && !bytes.is_empty()
        && info
            .tokenizer
            .decode(&[e.token], true)
            .is_ok_and(|t| t.is_empty());
    out.text_offset
        .push(offsets.push(if skipped { &[] } else { &bytes }));
    let mut top = Map::new();
    for &(id, lp) in &e.top {
        top.insert(completion_token(info, id).0, Value::from(lp));
    }
    top.entry(text.clone()).or_insert(Value::from(e.logprob));
    out.tokens.push(text);
    out.token_logprobs.push(Some(e.logprob));
    out.top_logprobs.push(Some(top));
}

#[cfg(test)]
mod tests {
    use super::TextOffsets;

    #[test]
    fn offsets_count_whole_characters() {
        // "é" is 2 bytes, "你" 3, split across tokens as a byte-level vocabulary does.
        let mut o = TextOffsets::default();
        let tokens: [&[u8]; 6] = [b"h", b"\xc3", b"\xa9l", b"\xe4\xbd", b"\xa0!", b"\xff."];
        let got: Vec<usize> = tokens.iter().map(|t| o.push(t)).collect();
        // h at 0; both pieces of é at 1 (the second brings `l` too); both of 你 at 3
        // (the second brings `!`); an invalid byte, one replacement character, at 5.
        assert_eq!(got, [0, 1, 1, 3, 3, 5]);
        assert_eq!(o.push(b"x"), 7);
        let mut o = TextOffsets::after(10);
        assert_eq!(o.push("ab".as_bytes()), 10);
        assert_eq!(o.push(b"c"), 12);
    }
}
