//! The tokenizer: rebuilt from GGUF metadata, or read from an HF `tokenizer.json`.
//!
//! From GGUF, for `tokenizer.ggml.model = "gpt2"` vocabularies (SmolLM2, Llama 3, Qwen):
//! a byte-level BPE over `tokenizer.ggml.tokens` + `merges`, pre-tokenized by individual
//! digits then the GPT-2 byte-level regex, decoded by the byte-level decoder; this gives
//! exactly the reference implementation's ids (`model/tests/reference/tokenize.json`).
//! For `"llama"` vocabularies (SentencePiece BPE: Gemma, Llama 2): a BPE whose merges are
//! derived from the piece scores, spaces written as `▁`, and byte fallback for characters
//! outside the vocabulary. Either way, control tokens (`token_type` 3) are special added
//! tokens, so `<|im_start|>` is one id.
//!
//! Two ways to encode: [`Tokenizer::encode`] parses special tokens written in the text
//! (raw prompts, where they are the caller's intent), while a rendered chat goes through
//! [`Tokenizer::escape_content`] and [`Tokenizer::encode_chat`]: what a client wrote in a
//! message is always plain text, and only the template's own markers become control
//! tokens, so no message can forge a turn.

use std::path::Path;

use aho_corasick::{AhoCorasick, MatchKind};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::Vocab;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use crate::error::{ModelError, Result};

/// GGUF `token_type` values.
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Media markers that GGUF conversions mark user-defined (Gemma 3's), where the
/// checkpoint's own tokenizer flags them special: they are control tokens here too, so
/// that a message's text cannot place one (a text-only model never saw them there).
const MEDIA_MARKERS: [&str; 7] = [
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "[multimodal]",
    "<start_of_audio>",
    "<end_of_audio>",
    "<audio_soft_token>",
];

/// End-of-turn tokens of the chat formats in use; each present as a special token also
/// ends generation.
const END_OF_TURN: [&str; 4] = ["<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<end_of_turn>"];

/// The vocabulary part of GGUF metadata.
pub struct GgufVocab {
    /// `tokenizer.ggml.model`
    pub model: String,
    pub tokens: Vec<String>,
    /// BPE merges (`gpt2` vocabularies).
    pub merges: Vec<String>,
    /// Piece scores (`llama` vocabularies).
    pub scores: Vec<f32>,
    pub token_types: Vec<i32>,
    pub bos_id: Option<u32>,
    pub eos_id: u32,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
    /// `tokenizer.ggml.add_space_prefix` (SentencePiece: a `▁` before the text).
    pub add_space_prefix: bool,
}

/// Starts an escape in message content: the next character says what it stands for
/// (a private-use character, which no vocabulary gives a meaning and no template filter
/// changes).
const ESCAPE: char = '\u{F0000}';
/// After [`ESCAPE`]: the escape character itself.
const ESCAPED_ESCAPE: u32 = 0xF0001;
/// After [`ESCAPE`]: special token `k` of [`Specials`] written as text, as this + `k`.
const ESCAPED_SPECIAL: u32 = 0xF0002;

/// The special (control) tokens of a vocabulary and a matcher that finds them.
struct Specials {
    texts: Vec<String>,
    ids: Vec<u32>,
    /// Leftmost-longest, as the tokenizer's own added-token matcher.
    matcher: AhoCorasick,
}

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// `inner`, reading special tokens' text as plain text.
    plain: tokenizers::Tokenizer,
    specials: Specials,
    /// Most bytes of text one token can stand for (an upper bound).
    max_token_bytes: usize,
    /// Ids that end generation (the model's EOS plus end-of-turn/end-of-text controls).
    stop_ids: Vec<u32>,
    bos_token: String,
    eos_token: String,
    /// Prepend BOS to raw prompts (`tokenizer.ggml.add_bos_token`, or what an HF
    /// tokenizer's post-processor does).
    add_bos: Option<u32>,
}

impl Tokenizer {
    pub fn from_gguf_vocab(vocab: GgufVocab) -> Result<Self> {
        let mut inner = match vocab.model.as_str() {
            "gpt2" => byte_level_bpe(&vocab)?,
            "llama" => sentencepiece_bpe(&vocab)?,
            other => {
                return Err(ModelError::Unsupported(format!(
                    "tokenizer model `{other}` (supported: `gpt2` byte-level BPE, `llama` SentencePiece BPE)"
                )))
            }
        };
        let of_type = |ty: i32| {
            vocab
                .tokens
                .iter()
                .zip(&vocab.token_types)
                .filter(move |(_, &t)| t == ty)
                .map(|(t, _)| t.clone())
        };
        let is_marker = |t: &String| MEDIA_MARKERS.contains(&t.as_str());
        let specials: Vec<AddedToken> = of_type(TOKEN_TYPE_CONTROL)
            .chain(of_type(TOKEN_TYPE_USER_DEFINED).filter(is_marker))
            .map(|t| AddedToken::from(t, true))
            .collect();
        inner.add_special_tokens(&specials);
        // User-defined pieces (runs of spaces or newlines, markup) match verbatim.
        let user: Vec<AddedToken> = of_type(TOKEN_TYPE_USER_DEFINED)
            .filter(|t| !is_marker(t))
            .map(|t| AddedToken::from(t, false).normalized(false))
            .collect();
        inner.add_tokens(&user);

        let token = |id: u32| vocab.tokens.get(id as usize).cloned();
        let eos_token = token(vocab.eos_id).ok_or_else(|| {
            ModelError::Tokenizer(format!("eos id {} is outside the vocabulary", vocab.eos_id))
        })?;
        let bos_token = vocab.bos_id.and_then(token).unwrap_or_default();
        let is_control = |id: u32| vocab.token_types.get(id as usize) == Some(&TOKEN_TYPE_CONTROL);
        let mut tokenizer =
            Self::finish(inner, bos_token, eos_token, &[vocab.eos_id], is_control, 1)?;
        tokenizer.add_bos = vocab.bos_id.filter(|_| vocab.add_bos);
        if let Some(bos) = tokenizer.add_bos.filter(|&id| token(id).is_none()) {
            // Every raw prompt would start with it, and be refused as the client's fault.
            return Err(ModelError::Tokenizer(format!(
                "bos id {bos} is outside the vocabulary, and `add_bos_token` asks for it"
            )));
        }
        Ok(tokenizer)
    }

    /// An HF tokenizer: `tokenizer.json`, with the BOS/EOS tokens named in
    /// `tokenizer_config.json` and the EOS ids of `generation_config.json`.
    pub fn from_hf_files(
        tokenizer_json: &Path,
        bos_token: Option<String>,
        eos_token: Option<String>,
        eos_ids: &[u32],
    ) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(tokenizer_json)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tokenizer_json.display())))?;
        let mut stops = eos_ids.to_vec();
        let eos_token = match eos_token {
            Some(t) => t,
            None => eos_ids
                .first()
                .and_then(|&id| inner.id_to_token(id))
                .ok_or_else(|| {
                    ModelError::Tokenizer(
                        "no EOS token: neither tokenizer_config.json nor generation_config.json names one".into(),
                    )
                })?,
        };
        match inner.token_to_id(&eos_token) {
            Some(id) => stops.insert(0, id),
            None => {
                return Err(ModelError::Tokenizer(format!(
                    "EOS token `{eos_token}` is not in the vocabulary"
                )))
            }
        }
        let specials = inner.get_added_tokens_decoder();
        let is_special = |id: u32| specials.get(&id).is_some_and(|t| t.special);
        let bos_id = bos_token.as_deref().and_then(|t| inner.token_to_id(t));
        // Whether the post-processor puts BOS in front of a plain encode.
        let adds_bos = inner
            .encode_fast("a", true)
            .is_ok_and(|e| e.get_ids().first().copied() == bos_id && bos_id.is_some());
        // A normalizer (NFKC and the like) may shrink text up to threefold before it is
        // split into tokens.
        let shrink = if inner.get_normalizer().is_some() {
            3
        } else {
            1
        };
        let mut tokenizer = Self::finish(
            inner,
            bos_token.unwrap_or_default(),
            eos_token,
            &stops,
            is_special,
            shrink,
        )?;
        tokenizer.add_bos = bos_id.filter(|_| adds_bos);
        Ok(tokenizer)
    }

    fn finish(
        inner: tokenizers::Tokenizer,
        bos_token: String,
        eos_token: String,
        eos_ids: &[u32],
        is_special: impl Fn(u32) -> bool,
        shrink: usize,
    ) -> Result<Self> {
        let mut stop_ids = Vec::new();
        let end_of_turn = END_OF_TURN
            .iter()
            .filter_map(|name| inner.token_to_id(name))
            .filter(|&id| is_special(id));
        for id in eos_ids.iter().copied().chain(end_of_turn) {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        let mut specials: Vec<(String, u32)> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        specials.sort_by_key(|s| s.1);
        let (texts, ids): (Vec<String>, Vec<u32>) = specials.into_iter().unzip();
        let matcher = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&texts)
            .map_err(|e| ModelError::Tokenizer(format!("special tokens: {e}")))?;
        // Stored pieces are at least as long as the bytes they stand for (byte-level
        // characters, `▁`, `<0xNN>`).
        let longest = inner
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1);
        let mut plain = inner.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            inner,
            plain,
            specials: Specials {
                texts,
                ids,
                matcher,
            },
            max_token_bytes: longest * shrink,
            stop_ids,
            bos_token,
            eos_token,
            add_bos: None,
        })
    }

    /// The `tokenizer.json` equivalent of this tokenizer (what an HF checkpoint ships).
    pub fn save(&self, path: &Path) -> Result<()> {
        Ok(self.inner.save(path, false)?)
    }

    /// Token ids of `text`; special tokens written in the text are parsed as single ids,
    /// nothing is added at the start or end.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.inner.encode_fast(text, false)?.get_ids().to_vec())
    }

    /// A raw prompt's ids: as [`Self::encode`], with BOS in front where the model wants
    /// one and the text does not already start with it.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_prompt_marked(text)?.0)
    }

    /// `ids` with BOS in front where the model wants one and they do not start with it.
    pub fn with_bos(&self, mut ids: Vec<u32>) -> Vec<u32> {
        if let Some(bos) = self.add_bos.filter(|&bos| ids.first() != Some(&bos)) {
            ids.insert(0, bos);
        }
        ids
    }

    /// As [`Self::encode_prompt`], and whether BOS was put in front (it is not part of
    /// the text).
    pub fn encode_prompt_marked(&self, text: &str) -> Result<(Vec<u32>, bool)> {
        let ids = self.encode(text)?;
        let plain = ids.len();
        let ids = self.with_bos(ids);
        let added = ids.len() > plain;
        Ok((ids, added))
    }

    /// Text a client wrote, made safe to place in a chat template: special tokens' text
    /// in it is escaped, so that [`Self::encode_chat`] reads it as plain text.
    pub fn escape_content(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut last = 0;
        for m in self.specials.matcher.find_iter(text) {
            push_escaping(&mut out, &text[last..m.start()]);
            out.push(ESCAPE);
            out.push(escaped(ESCAPED_SPECIAL + m.pattern().as_u32()));
            last = m.end();
        }
        push_escaping(&mut out, &text[last..]);
        out
    }

    /// Ids of a chat rendered from [`Self::escape_content`]ed messages: the special
    /// tokens the template wrote are control tokens; everything else, escaped special
    /// tokens included, is plain text.
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        let mut last = 0;
        for m in self.specials.matcher.find_iter(rendered) {
            self.encode_plain(&rendered[last..m.start()], &mut ids)?;
            ids.push(self.specials.ids[m.pattern().as_usize()]);
            last = m.end();
        }
        self.encode_plain(&rendered[last..], &mut ids)?;
        Ok(ids)
    }

    /// Ids of `text` as plain text: special tokens' text in it is spelled in ordinary
    /// pieces, never a control token (what a constrained answer forces is text).
    pub fn encode_text(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.plain.encode_fast(text, false)?.get_ids().to_vec())
    }

    /// Fewest tokens `bytes` of text can become: prompts that are provably too long are
    /// refused without tokenizing them.
    pub fn min_tokens(&self, bytes: usize) -> usize {
        // An escape (8 bytes) or a special token may be longer than any vocabulary piece.
        bytes / self.max_token_bytes.max(2 * ESCAPE.len_utf8())
    }

    /// Appends the plain-text ids of `text`, undoing [`Self::escape_content`].
    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let unescaped = match text.contains(ESCAPE) {
            true => self.unescape(text),
            false => text.to_string(),
        };
        ids.extend_from_slice(self.plain.encode_fast(unescaped, false)?.get_ids());
        Ok(())
    }

    fn unescape(&self, text: &str) -> String {
        let mut out = String::with_capacity(text.len());
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if c != ESCAPE {
                out.push(c);
                continue;
            }
            // A template that cut an escape in two leaves the escape character as it is.
            let meaning = chars.peek().map(|&n| n as u32);
            match meaning {
                Some(ESCAPED_ESCAPE) => out.push(ESCAPE),
                Some(n) if n >= ESCAPED_SPECIAL => {
                    match self.specials.texts.get((n - ESCAPED_SPECIAL) as usize) {
                        Some(t) => out.push_str(t),
                        None => {
                            out.push(ESCAPE);
                            continue;
                        }
                    }
                }
                _ => {
                    out.push(ESCAPE);
                    continue;
                }
            }
            chars.next();
        }
        out
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

fn push_escaping(out: &mut String, text: &str) {
    for c in text.chars() {
        out.push(c);
        if c == ESCAPE {
            out.push(escaped(ESCAPED_ESCAPE));
        }
    }
}

fn escaped(code: u32) -> char {
    // Supplementary Private Use Area-A and -B hold 130k code points; vocabularies have far
    // fewer special tokens.
    char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
}

/// Byte-level BPE over the GGUF merges.
fn byte_level_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
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
        .vocab_and_merges(ids(&vocab.tokens), merges)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let pre = Sequence::new(vec![
        PreTokenizerWrapper::Digits(Digits::new(true)),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
    ]);
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    Ok(inner)
}

/// SentencePiece BPE: the merges are every split of a normal piece into two pieces of
/// the vocabulary, ranked by the merged piece's score (SentencePiece merges the
/// highest-scoring pair first); spaces are `▁`; unknown characters fall back to bytes.
fn sentencepiece_bpe(vocab: &GgufVocab) -> Result<tokenizers::Tokenizer> {
    let ids = ids(&vocab.tokens);
    let mut ranked = Vec::new();
    for (id, piece) in vocab.tokens.iter().enumerate() {
        if vocab.token_types.get(id) != Some(&TOKEN_TYPE_NORMAL) {
            continue;
        }
        let score = vocab.scores.get(id).copied().unwrap_or(0.0);
        for (at, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(at);
            if let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) {
                ranked.push((score, ia, ib));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let piece = |id: u32| vocab.tokens[id as usize].clone();
    let merges = ranked
        .iter()
        .map(|&(_, a, b)| (piece(a), piece(b)))
        .collect();
    // An unknown token only where the vocabulary has one: naming one it lacks makes every
    // encode fail.
    let mut builder = BPE::builder().vocab_and_merges(ids, merges);
    if vocab.tokens.iter().any(|t| t == "<unk>") {
        builder = builder.unk_token("<unk>".into());
    }
    let bpe = builder
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    let space = Replace::new(" ", "▁").map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    let unspace = DecoderWrapper::Replace(
        Replace::new("▁", " ").map_err(|e| ModelError::Tokenizer(e.to_string()))?,
    );
    let mut decoders = vec![
        unspace,
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if vocab.add_space_prefix {
        inner.with_normalizer(Some(tokenizers::normalizers::Sequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new("▁".into())),
            NormalizerWrapper::Replace(space),
        ])));
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    } else {
        inner.with_normalizer(Some(space));
    }
    inner.with_decoder(Some(DecoderSequence::new(decoders)));
    Ok(inner)
}

fn ids(tokens: &[String]) -> Vocab {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}
