//! The tokenizer, rebuilt from GGUF metadata so that it gives exactly the ids the
//! reference implementation gives (checked against `model/tests/reference/tokenize.json`).
//!
//! For `tokenizer.ggml.model = "gpt2"` vocabularies (SmolLM2, Llama 3, Qwen2): a byte-level
//! BPE over `tokenizer.ggml.tokens` + `merges`, pre-tokenized by individual digits then the
//! GPT-2 byte-level regex, decoded by the byte-level decoder; every token whose
//! `token_type` is 3 (control) is an added special token, so `<|im_start|>` is one id.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{ModelError, Result};

/// GGUF `token_type` of control tokens.
const TOKEN_TYPE_CONTROL: i32 = 3;

/// The vocabulary part of GGUF metadata.
pub struct GgufVocab {
    /// `tokenizer.ggml.model`
    pub model: String,
    pub tokens: Vec<String>,
    pub merges: Vec<String>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Ids that end generation (the model's EOS plus end-of-turn/end-of-text controls).
    stop_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
}

impl Tokenizer {
    pub fn from_gguf_vocab(vocab: GgufVocab) -> Result<Self> {
        if vocab.model != "gpt2" {
            return Err(ModelError::Unsupported(format!(
                "tokenizer model `{}` (only byte-level BPE, `gpt2`, is supported)",
                vocab.model
            )));
        }
        let ids: tokenizers::models::bpe::Vocab = vocab
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let merges = vocab
            .merges
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| ModelError::Tokenizer(format!("malformed merge `{m}`")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(ids, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;

        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevelDecoder::default()));

        let specials: Vec<AddedToken> = vocab
            .tokens
            .iter()
            .zip(&vocab.token_types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL)
            .map(|(t, _)| AddedToken::from(t.clone(), true))
            .collect();
        inner.add_special_tokens(&specials);

        let token = |id: u32| vocab.tokens.get(id as usize).cloned();
        let eos_token = token(vocab.eos_id).ok_or_else(|| {
            ModelError::Tokenizer(format!("eos id {} is outside the vocabulary", vocab.eos_id))
        })?;
        let bos_token = vocab.bos_id.and_then(token).unwrap_or_default();

        let mut stop_ids = vec![vocab.eos_id];
        for name in ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"] {
            if let Some(id) = inner.token_to_id(name) {
                let is_control = vocab.token_types.get(id as usize) == Some(&TOKEN_TYPE_CONTROL);
                if is_control && !stop_ids.contains(&id) {
                    stop_ids.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            stop_ids,
            bos_token,
            eos_token,
        })
    }

    /// Token ids of `text`; special tokens written in the text are parsed as single ids,
    /// nothing is added at the start or end.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode_fast(text, false)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    /// The vocabulary entry of one id, as stored (byte-level form).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.contains(&id)
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
