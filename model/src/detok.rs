//! Incremental detokenization for streaming.
//!
//! Byte-level BPE tokens can end inside a multi-byte UTF-8 character, and decoding a
//! single token can lose the space a neighbour implies. [`IncrementalDecoder`] keeps a
//! short window of ids and emits only text that is final: never half a character, never
//! a dropped space.
//!
//! The window is bounded: ids that still decode to an incomplete character after
//! [`MAX_HELD`] tokens can never complete one (a UTF-8 character is at most four bytes),
//! so they are released as replacement characters, and ids that decode to nothing
//! (special tokens, which are skipped) are let go at once. Each step therefore decodes
//! a handful of ids whatever was generated before, and [`IncrementalDecoder::flush`]
//! returns whatever is still held when generation ends ([`IncrementalDecoder::flush_whole`]
//! less a character the end cut short).

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

/// Most ids held back waiting for a character to complete.
pub const MAX_HELD: usize = 4;

/// Ids kept before the held ones, so a token's leading space decodes as it would in
/// context.
const CONTEXT: usize = 2;

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    /// `CONTEXT` ids already emitted, then the held ones.
    ids: Vec<u32>,
    /// How many of `ids` were already emitted.
    emitted: usize,
    /// The text of `ids[..emitted]`.
    prefix: String,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one generated id; returns the text it completes (possibly empty).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = decode(tokenizer, &self.ids)?;
        let held = self.ids.len() - self.emitted;
        let complete = !text.ends_with('\u{fffd}');
        if complete && text.len() > self.prefix.len() || held > MAX_HELD || text == self.prefix {
            return self.release(tokenizer, text);
        }
        Ok(String::new())
    }

    /// The text of every id still held (generation ended): incomplete characters become
    /// replacement characters.
    pub fn flush(&mut self, tokenizer: &Tokenizer) -> Result<String> {
        if self.ids.len() == self.emitted {
            return Ok(String::new());
        }
        let text = decode(tokenizer, &self.ids)?;
        self.release(tokenizer, text)
    }

    /// [`Self::flush`], less a character the end cut short (its first bytes came, its
    /// last never will): the text holds whole characters only, as vLLM's does. `bytes`
    /// gives an id's bytes, which tell such a character from bytes that are invalid
    /// wherever they stand (those stay, as replacement characters).
    pub fn flush_whole(
        &mut self,
        tokenizer: &Tokenizer,
        bytes: impl Fn(u32) -> Vec<u8>,
    ) -> Result<String> {
        let held: Vec<u8> = self.ids[self.emitted..]
            .iter()
            .flat_map(|&id| bytes(id))
            .collect();
        // The bytes after the last invalid ones that start a character but end early.
        let mut rest = held.as_slice();
        let cut = loop {
            match std::str::from_utf8(rest) {
                Ok(_) => break 0,
                Err(e) => match e.error_len() {
                    None => break rest.len() - e.valid_up_to(),
                    Some(n) => rest = &rest[e.valid_up_to() + n..],
                },
            }
        };
        // The ids that hold just those bytes are dropped. Where an id holds some of them
        // and bytes before them (a byte-level piece such as " \xF0"), it is kept and the
        // one replacement character a byte-level decoder makes of the cut bytes is cut.
        let mut tail_bytes = 0;
        let mut tail_ids = 0;
        for &id in self.ids[self.emitted..].iter().rev() {
            if tail_bytes >= cut {
                break;
            }
            tail_bytes += bytes(id).len();
            tail_ids += 1;
        }
        if cut > 0 && tail_bytes == cut {
            self.ids.truncate(self.ids.len() - tail_ids);
            return self.flush(tokenizer);
        }
        let text = self.flush(tokenizer)?;
        Ok(match cut {
            0 => text,
            _ => text.strip_suffix('\u{fffd}').unwrap_or(&text).to_string(),
        })
    }

    /// Ids not yet emitted (bounded by [`MAX_HELD`]).
    pub fn held(&self) -> usize {
        self.ids.len() - self.emitted
    }

    /// Emits `text` (the decoding of all of `ids`) past the prefix, and keeps the last
    /// ids as the next step's context.
    fn release(&mut self, tokenizer: &Tokenizer, text: String) -> Result<String> {
        let new = match text.strip_prefix(self.prefix.as_str()) {
            Some(new) => new.to_string(),
            None => {
                // Context changed how earlier ids decode (rare): emit the new ids' own text.
                let own = &self.ids[self.emitted..];
                decode(tokenizer, own)?
            }
        };
        let (keep, prefix) = self.context(tokenizer)?;
        self.ids.drain(..self.ids.len() - keep);
        self.emitted = self.ids.len();
        self.prefix = prefix;
        Ok(new)
    }

    /// How many of the last ids to keep as context, and their text: at least
    /// [`CONTEXT`] (where there are), and as many more as it takes to hold whole
    /// characters. Byte tokens (SentencePiece's byte fallback) of a character cut in two
    /// decode, with the bytes after them, as one invalid run, a replacement character
    /// per byte: the next character would never decode whole. Without such a suffix,
    /// no context.
    fn context(&self, tokenizer: &Tokenizer) -> Result<(usize, String)> {
        for keep in self.ids.len().min(CONTEXT)..=self.ids.len() {
            let text = decode(tokenizer, &self.ids[self.ids.len() - keep..])?;
            if !text.contains('\u{fffd}') {
                return Ok((keep, text));
            }
        }
        Ok((0, String::new()))
    }
}

fn decode(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    tokenizer
        .inner()
        .decode(ids, true)
        .map_err(|e| ModelError::Tokenizer(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::GgufVocab;

    /// A byte-level vocabulary: every byte (as GPT-2's printable stand-ins), a few
    /// multi-byte tokens and one control token.
    fn tokenizer() -> Tokenizer {
        let mut tokens: Vec<String> = byte_chars().into_iter().map(String::from).collect();
        tokens.extend(["<|im_start|>", "Ġhello", "Ġworld"].map(String::from));
        let mut token_types = vec![1; tokens.len()];
        token_types[256] = 3;
        Tokenizer::from_gguf_vocab(GgufVocab {
            model: "gpt2".into(),
            tokens,
            merges: Vec::new(),
            scores: Vec::new(),
            token_types,
            bos_id: None,
            eos_id: 256,
            add_bos: false,
            add_space_prefix: false,
        })
        .expect("tiny tokenizer")
    }

    /// GPT-2's byte-to-character table, in byte order.
    fn byte_chars() -> Vec<char> {
        let printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
            .chain(0xA1..=0xAC)
            .chain(0xAE..=0xFF)
            .collect();
        let mut chars = vec!['\0'; 256];
        for &b in &printable {
            chars[b as usize] = char::from_u32(b).expect("latin-1");
        }
        let mut extra = 0;
        for b in 0..256u32 {
            if !printable.contains(&b) {
                chars[b as usize] = char::from_u32(256 + extra).expect("shifted");
                extra += 1;
            }
        }
        chars
    }

    fn run(t: &Tokenizer, ids: &[u32]) -> (String, usize) {
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        let mut most_held = 0;
        for &id in ids {
            out.push_str(&d.step(t, id).expect("step"));
            most_held = most_held.max(d.held());
        }
        out.push_str(&d.flush(t).expect("flush"));
        (out, most_held)
    }

    #[test]
    fn multi_byte_characters_wait_for_their_last_byte() {
        let t = tokenizer();
        // "é" is C3 A9; "日" is E6 97 A5.
        let ids = [0xC3, 0xA9, 257, 0xE6, 0x97, 0xA5];
        let mut d = IncrementalDecoder::new();
        assert_eq!(d.step(&t, ids[0]).unwrap(), "");
        assert_eq!(d.step(&t, ids[1]).unwrap(), "é");
        assert_eq!(d.step(&t, ids[2]).unwrap(), " hello");
        assert_eq!(d.step(&t, ids[3]).unwrap(), "");
        assert_eq!(d.step(&t, ids[4]).unwrap(), "");
        assert_eq!(d.step(&t, ids[5]).unwrap(), "日");
    }

    /// Bytes that never form a character (as `logit_bias` can force) are released as
    /// replacement characters instead of growing the window: each step decodes a few
    /// ids, and no byte is lost.
    #[test]
    fn bytes_that_never_complete_a_character_are_released() {
        let t = tokenizer();
        let (text, most_held) = run(&t, &[0xFF; 4000]);
        assert!(most_held <= MAX_HELD + 1, "held {most_held}");
        assert_eq!(text.chars().count(), 4000);
        assert!(text.chars().all(|c| c == '\u{fffd}'));
    }

    #[test]
    fn skipped_special_tokens_are_let_go() {
        let t = tokenizer();
        let mut ids = vec![256; 3000];
        ids.push(258);
        let (text, most_held) = run(&t, &ids);
        assert!(most_held <= 1, "held {most_held}");
        assert_eq!(text, " world");
    }

    #[test]
    fn a_character_cut_by_the_end_is_flushed() {
        let t = tokenizer();
        assert_eq!(run(&t, &[257, 0xE6, 0x97]).0, " hello\u{fffd}");
    }

    /// This vocabulary's bytes: ids 0..256 are the bytes, then the named pieces.
    fn bytes_of(id: u32) -> Vec<u8> {
        match id {
            0..=255 => vec![id as u8],
            257 => b" hello".to_vec(),
            258 => b" world".to_vec(),
            _ => Vec::new(),
        }
    }

    fn run_whole(t: &Tokenizer, ids: &[u32]) -> String {
        let mut d = IncrementalDecoder::new();
        let mut out = String::new();
        for &id in ids {
            out.push_str(&d.step(t, id).expect("step"));
        }
        out + &d.flush_whole(t, bytes_of).expect("flush")
    }

    #[test]
    fn flushed_whole_a_cut_character_is_left_out_and_invalid_bytes_stay() {
        let t = tokenizer();
        // "日" is E6 97 A5: cut after two of its bytes, after one, or not at all.
        assert_eq!(run_whole(&t, &[257, 0xE6, 0x97]), " hello");
        assert_eq!(run_whole(&t, &[257, 0xE6]), " hello");
        assert_eq!(run_whole(&t, &[257, 0xE6, 0x97, 0xA5]), " hello日");
        // Bytes that no character starts with are not a cut character.
        assert_eq!(run_whole(&t, &[257, 0xFF]), " hello\u{fffd}");
        assert_eq!(run_whole(&t, &[257, 0x97]), " hello\u{fffd}");
        // Invalid bytes, then a cut character: the invalid ones stay.
        assert_eq!(run_whole(&t, &[257, 0xFF, 0xE6, 0x97]), " hello\u{fffd}");
        assert_eq!(run_whole(&t, &[0xE6, 0xE6, 0xE6]), "\u{fffd}\u{fffd}");
    }
}
