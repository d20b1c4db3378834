//! Incremental detokenization for streaming.
//!
//! Byte-level BPE tokens can end inside a multi-byte UTF-8 character, and decoding a
//! single token can lose the space a neighbour implies. [`IncrementalDecoder`] keeps a
//! short window of ids and emits only text that is final: never half a character, never
//! a dropped space. It uses the tokenizers crate's decode-stream step.

use tokenizers::tokenizer::step_decode_stream;

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;

#[derive(Debug, Default, Clone)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feed one generated id; returns the text it completes (possibly empty).
    pub fn step(&mut self, tokenizer: &Tokenizer, id: u32) -> Result<String> {
        let text = step_decode_stream(
            tokenizer.inner(),
            vec![id],
            true,
            &mut self.ids,
            &mut self.prefix,
            &mut self.prefix_index,
        )
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(text.unwrap_or_default())
    }
}
