//! Structured output: `response_format` compiled by llguidance into a token-level
//! constraint. The worker masks each step's logits with it and feeds it the chosen token,
//! so the output always parses (and follows the schema). Also the byte string of every
//! token, which log-probabilities report.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use chorus_model::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::Value;

use crate::reasoning::Start;

/// JSON written compactly (`, ` and `: `, no free whitespace), unless the schema's
/// `x-guidance` says otherwise: a small model left free to indent can spend its tokens
/// on spaces. Structured output and function calls both write it so.
pub fn compact(mut schema: Value) -> Value {
    if let Some(obj) = schema.as_object_mut() {
        obj.entry("x-guidance").or_insert_with(|| {
            serde_json::json!({
                "whitespace_flexible": false,
                "item_separator": ", ",
                "key_separator": ": ",
            })
        });
    }
    schema
}

/// A request's constraint, advanced token by token on the inference thread.
pub struct Constraint {
    matcher: Matcher,
    /// The request field it enforces: the grammar engine's failures are blamed on it.
    param: &'static str,
    /// Another field whose schema the grammar embeds (`response_format` beside `tools`):
    /// a give-up is blamed on both.
    beside: Option<&'static str>,
    /// The tokens the last mask allowed.
    allowed: Option<SimpleVob>,
    /// The first mask, computed where the grammar was compiled (the pool, not the
    /// inference thread), until a token is consumed.
    first: Option<SimpleVob>,
}

/// Why the grammar engine did not take a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// A token the mask allowed: the engine gave up on the schema (its limits on what is
    /// open at once), the request's fault.
    GaveUp(String),
    /// A token the mask did not allow (or no mask was computed): the server's fault.
    NotAllowed(String),
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

impl Constraint {
    /// Sets every token the grammar does not allow next to minus infinity. An error in
    /// the grammar engine leaves the logits alone (and is returned).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        self.allowed = None;
        let allowed = match self.first.take() {
            Some(first) => first,
            None => self.matcher.compute_mask().map_err(|e| e.to_string())?,
        };
        for (id, l) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *l = f32::NEG_INFINITY;
            }
        }
        self.allowed = Some(allowed);
        Ok(())
    }

    pub fn consume(&mut self, token: u32) -> Result<(), Rejection> {
        self.first = None;
        let masked = self.allowed.take().is_some_and(|a| a.is_allowed(token));
        self.matcher.consume_token(token).map_err(|e| match masked {
            true => Rejection::GaveUp(e.to_string()),
            false => Rejection::NotAllowed(e.to_string()),
        })
    }

    /// The request field it enforces (`response_format`, `text` (Responses), `tools`).
    pub fn param(&self) -> &'static str {
        self.param
    }

    /// Notes the other field whose schema the grammar also embeds, if any.
    pub fn beside(mut self, other: Option<&'static str>) -> Self {
        self.beside = other;
        self
    }

    /// What it enforces, for messages: "`tools`", or "`tools` with `response_format`".
    pub fn enforces(&self) -> String {
        match self.beside {
            Some(other) => format!("`{}` with `{other}`", self.param),
            None => format!("`{}`", self.param),
        }
    }

    /// The grammar is complete and allows nothing more.
    pub fn is_done(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// A copy in the same state, for another choice of the same request.
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            param: self.param,
            beside: self.beside,
            allowed: self.allowed.clone(),
            first: self.first.clone(),
        }
    }
}

/// The model's vocabulary as llguidance sees it, built once per model.
pub struct Grammars {
    factory: ParserFactory,
    /// The bytes of every token (special tokens: their text).
    token_bytes: Vec<Vec<u8>>,
    /// Recently compiled grammars, most recent last: agents send the same tools every
    /// turn, and compiling one can take a second; a hit is a copy of the compiled state.
    compiled: Mutex<VecDeque<(String, Matcher, SimpleVob)>>,
}

/// Compiled grammars kept.
const COMPILED_KEPT: usize = 64;

/// The compile thread's stack: [`crate::schema_check::MAX_NESTING`] levels took at most
/// ~2.6 KiB each in the engine, so 64 MiB is six times what the check lets through
/// (reserved, not used: pages are taken as the stack grows).
const COMPILE_STACK: usize = 64 << 20;

struct Env {
    trie: TokTrie,
    tokenizer: Arc<Tokenizer>,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    /// Bytes the grammar forces, as plain text: a schema's `"<|im_end|>"` is those
    /// characters, not the control token (which would end the answer in the middle).
    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie
            .tokenize_with_greedy_fallback(s, |s| self.tokenizer.encode_text(s).unwrap_or_default())
    }
}

impl Grammars {
    /// `vocab` is the model's (its logits' width), which may exceed the tokenizer's.
    pub fn new(tokenizer: Arc<Tokenizer>, vocab: usize) -> Result<Self, String> {
        let json: Value = serde_json::from_str(
            &tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let mut words =
            llguidance::token_bytes_from_tokenizer_json(&json).map_err(|e| e.to_string())?;
        while words.len() < vocab {
            let mut name = format!(".<[{}]>", words.len()).into_bytes();
            name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
            words.push(name);
        }
        let stops = tokenizer.stop_ids();
        let info = TokRxInfo::new(words.len() as u32, stops.first().copied().unwrap_or(0));
        let mut trie = TokTrie::from(&info, &words);
        if stops.len() > 1 {
            trie = trie.with_eos_tokens(stops);
        }
        let token_bytes = words
            .into_iter()
            .map(|w| match w.first() {
                Some(&TokTrie::SPECIAL_TOKEN_MARKER) => w[1..].to_vec(),
                _ => w,
            })
            .collect();
        let env: TokEnv = Arc::new(Env { trie, tokenizer });
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory,
            token_bytes,
            compiled: Mutex::new(VecDeque::new()),
        })
    }

    /// A constraint that admits exactly the JSON documents `schema` (request field
    /// `param`) describes. A schema llguidance cannot compile (or a feature it does not
    /// support) is an error naming it.
    /// With `thinking`, the document comes after a thinking block (free text).
    pub fn json_schema(
        &self,
        param: &'static str,
        schema: Value,
        thinking: Option<Start>,
    ) -> Result<Constraint, String> {
        crate::schema_check::check(&schema)?;
        let schema = compact(schema);
        match thinking {
            Some(start) => self.lark(param, start.grammar(&format!("answer: %json {schema}\n"))),
            None => {
                let key = format!("json:{schema}");
                self.compile(param, Some(key), || {
                    TopLevelGrammar::from_json_schema(schema)
                })
            }
        }
    }

    /// A constraint that admits exactly the texts the regular expression `rx` matches
    /// whole (after a thinking block when `thinking` says where the answer starts).
    pub fn regex(
        &self,
        param: &'static str,
        rx: &str,
        thinking: Option<Start>,
    ) -> Result<Constraint, String> {
        match thinking {
            // Lark's `/.../` ends at an unescaped slash.
            Some(start) => {
                let rx = rx.replace('/', "\\/");
                self.lark(param, start.grammar(&format!("answer: /{rx}/\n")))
            }
            None => {
                let key = format!("regex:{rx}");
                self.compile(param, Some(key), || TopLevelGrammar::from_regex(rx))
            }
        }
    }

    /// A constraint from a grammar in llguidance's Lark dialect (which embeds JSON
    /// schemas with `%json`): function calls use it.
    pub fn lark(&self, param: &'static str, grammar: String) -> Result<Constraint, String> {
        let key = format!("lark:{grammar}");
        self.compile(param, Some(key), || TopLevelGrammar::from_lark(grammar))
    }

    /// Whether `schema` compiles, without keeping it: a diagnosis (which of a request's
    /// functions the engine refuses) must not push other requests' grammars out of the
    /// cache.
    pub fn check_json_schema(&self, schema: Value) -> Result<(), String> {
        crate::schema_check::check(&schema)?;
        let schema = compact(schema);
        self.compile("", None, || TopLevelGrammar::from_json_schema(schema))
            .map(|_| ())
    }

    /// Compiles the grammar, or copies the compiled one kept under `key` (and keeps it
    /// there); without a key, compiles it and keeps nothing.
    fn compile(
        &self,
        param: &'static str,
        key: Option<String>,
        grammar: impl FnOnce() -> TopLevelGrammar + Send,
    ) -> Result<Constraint, String> {
        let (matcher, first) = match key.as_deref().and_then(|key| self.kept(key)) {
            Some(hit) => hit,
            None => {
                let (matcher, first) = self.compile_now(grammar)?;
                if let Some(key) = key {
                    self.keep(key, &matcher, &first);
                }
                (matcher, first)
            }
        };
        Ok(Constraint {
            matcher,
            param,
            beside: None,
            allowed: None,
            first: Some(first),
        })
    }

    /// A copy of the grammar compiled under `key`, which becomes the most recently used.
    fn kept(&self, key: &str) -> Option<(Matcher, SimpleVob)> {
        let mut kept = self.compiled.lock().ok()?;
        let at = kept.iter().position(|(k, _, _)| k == key)?;
        let hit = kept.remove(at)?;
        let copy = (hit.1.deep_clone(), hit.2.clone());
        kept.push_back(hit);
        Some(copy)
    }

    /// Keeps a copy of a compiled grammar under `key`, forgetting the least recently
    /// used beyond [`COMPILED_KEPT`].
    fn keep(&self, key: String, matcher: &Matcher, first: &SimpleVob) {
        let Ok(mut kept) = self.compiled.lock() else {
            return;
        };
        if kept.len() == COMPILED_KEPT {
            kept.pop_front();
        }
        kept.push_back((key, matcher.deep_clone(), first.clone()));
    }

    /// Compiles `grammar` and computes its first mask.
    fn compile_now(
        &self,
        grammar: impl FnOnce() -> TopLevelGrammar + Send,
    ) -> Result<(Matcher, SimpleVob), String> {
        // The engine compiles references recursively: on a thread of its own whose stack
        // holds many times the nesting `schema_check` lets through (a pool thread's
        // 2 MiB overflowed at about 800 levels, which aborts the process).
        let factory = &self.factory;
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("chorus-grammar".into())
                .stack_size(COMPILE_STACK)
                .spawn_scoped(scope, move || {
                    let parser = factory
                        .create_parser(grammar())
                        .map_err(|e| e.to_string())?;
                    let mut matcher = Matcher::new(Ok(parser));
                    if let Some(e) = matcher.get_error() {
                        return Err(e);
                    }
                    // The first mask is where the engine meets what a schema leaves open
                    // at once (hundreds of optional properties): its failure is the
                    // request's 400 here, not a stall of every stream at its first step.
                    let first = matcher
                        .compute_mask()
                        .map_err(|e| format!("the grammar engine gave up on it ({e})"))?;
                    Ok((matcher, first))
                })
                .map_err(|e| format!("could not start the grammar compile: {e}"))?
                .join()
                .map_err(|_| "the grammar compile panicked".to_string())?
        })
    }

    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.token_bytes.get(id as usize).map_or(&[], Vec::as_slice)
    }
}
