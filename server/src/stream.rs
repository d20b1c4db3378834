//! Turns a request's event channel into OpenAI's streamed chunks (chat or completion
//! shape), or collects it into one reply. A request with `n` choices ends when every
//! choice has; its usage counts each prompt once and every choice's tokens. A batch of
//! prompts is one channel too ([`merge`]).

use std::sync::Arc;

use futures_util::Stream;
use serde_json::Value;
use tokio::sync::mpsc::{self, UnboundedReceiver};

use crate::engine::{Event, FinishReason, ModelInfo, TokenLogprob};
use crate::error::ApiError;
use crate::logprobs::{self, TextOffsets};
use crate::metrics::Metrics;
use crate::openai::{
    ChatChunk, ChunkChoice, Completion, CompletionChoice, Delta, FunctionDelta, ToolCallDelta,
    Usage,
};
use crate::reasoning::{Parts, Splitter, Start};
use crate::sse::{frame, DONE};
use crate::tools::{CallReader, Decision, ToolCall};
use crate::validate::Echo;

/// Which endpoint's chunk shape to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Chat,
    Completion,
}

/// Fields every chunk of one response shares.
pub struct ChunkMeta {
    pub shape: Shape,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    /// vLLM's `continuous_usage_stats`: every chunk carries the usage so far.
    pub continuous_usage: Option<Continuous>,
    /// Choices in the response: `per_prompt` for each prompt.
    pub n: usize,
    pub per_prompt: usize,
    /// Log-probabilities were asked for.
    pub logprobs: bool,
    /// Completions with `echo`: each prompt, sent first in each of its choices.
    pub echo: Vec<Echo>,
    /// Chat with functions to call: how answers are read.
    pub tools: Option<CallReader>,
    /// A thinking model's chat: where each answer starts relative to its block.
    pub thinking: Option<Start>,
    pub metrics: Arc<Metrics>,
    pub info: Arc<ModelInfo>,
}

impl ChunkMeta {
    /// The echoed prompt of choice `index`.
    fn echo(&self, index: usize) -> Option<&Echo> {
        self.echo.get(index / self.per_prompt.max(1))
    }

    /// A choice chunk's `usage`: absent without `include_usage`, `null` but with
    /// continuous usage, where it is the choice's so far.
    fn usage_field(&self) -> Option<Option<Usage>> {
        let now = self.continuous_usage.as_ref().and_then(|c| c.now);
        self.include_usage.then_some(now)
    }

    /// A chunk with one choice.
    fn chunk(
        &self,
        index: usize,
        role: bool,
        text: Option<&str>,
        logprobs: Option<Value>,
        finish_reason: Option<&'static str>,
    ) -> String {
        match self.shape {
            Shape::Chat => {
                let delta = Delta {
                    role: role.then_some("assistant"),
                    content: text,
                    ..Delta::default()
                };
                self.chat_chunk(index, delta, logprobs, finish_reason)
            }
            Shape::Completion => frame(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: index as u32,
                    text: text.unwrap_or_default().to_string(),
                    logprobs,
                    finish_reason,
                }],
                usage: self.usage_field(),
            }),
        }
    }

    /// A chat chunk with one choice's `delta`.
    fn chat_chunk(
        &self,
        index: usize,
        delta: Delta,
        logprobs: Option<Value>,
        finish_reason: Option<&'static str>,
    ) -> String {
        frame(&ChatChunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index: index as u32,
                delta,
                logprobs,
                finish_reason,
            }],
            usage: self.usage_field(),
        })
    }

    /// A chat chunk with one choice's reasoning.
    fn reasoning_chunk(&self, index: usize, text: &str, logprobs: Option<Value>) -> String {
        let delta = Delta {
            reasoning_content: Some(text),
            ..Delta::default()
        };
        self.chat_chunk(index, delta, logprobs, None)
    }

    /// A chat chunk with one choice's call deltas (and `logprobs`, the answer's, on the
    /// first, as the unstreamed message carries them).
    fn tool_chunk(&self, index: usize, delta: ToolCallDelta, logprobs: Option<Value>) -> String {
        let delta = Delta {
            tool_calls: Some(vec![delta]),
            ..Delta::default()
        };
        self.chat_chunk(index, delta, logprobs, None)
    }

    /// The extra chunk with no choices and the usage.
    fn usage_chunk(&self, usage: Usage) -> String {
        match self.shape {
            Shape::Chat => frame(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: vec![],
                usage: Some(Some(usage)),
            }),
            Shape::Completion => frame(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![],
                usage: Some(Some(usage)),
            }),
        }
    }

    /// The wire form of `entries` (chat: `{content: [...]}`; completions: the arrays,
    /// placed by the choice's `offsets`).
    fn logprobs_value(&self, entries: &[TokenLogprob], offsets: &mut TextOffsets) -> Option<Value> {
        if !self.logprobs {
            return None;
        }
        Some(match self.shape {
            Shape::Chat => logprobs::chat(&self.info, entries),
            Shape::Completion => logprobs::completion(&self.info, entries, offsets),
        })
    }
}

/// vLLM's continuous usage: per choice, its prompt and its tokens so far, as every chunk
/// of that choice reports them (as vLLM does, without the cached tokens' detail, known
/// only at the end).
pub struct Continuous {
    /// Per prompt.
    prompt_tokens: Vec<usize>,
    /// Per choice, its tokens so far.
    generated: Vec<usize>,
    /// The usage the chunks now being built carry.
    now: Option<Usage>,
}

impl Continuous {
    pub fn new(prompt_tokens: Vec<usize>) -> Self {
        Self {
            prompt_tokens,
            generated: Vec::new(),
            now: None,
        }
    }

    /// Choice `index` (of `per_prompt` a prompt) has `tokens` more: the chunks built
    /// next carry its usage so far.
    fn count(&mut self, index: usize, per_prompt: usize, tokens: usize) {
        if self.generated.len() <= index {
            self.generated.resize(index + 1, 0);
        }
        self.generated[index] += tokens;
        let prompt = (self.prompt_tokens.get(index / per_prompt.max(1))).map_or(0, |&p| p);
        self.now = Some(Usage::running(prompt, self.generated[index]));
    }

    fn so_far(&self, index: usize) -> usize {
        self.generated.get(index).copied().unwrap_or(0)
    }
}

/// Usage of a whole request from its choices': each prompt once (as its first choice
/// counted it), every choice's tokens.
#[derive(Debug, Clone, Copy)]
struct UsageSum {
    per_prompt: usize,
    sum: Usage,
}

impl UsageSum {
    fn new(per_prompt: usize) -> Self {
        UsageSum {
            per_prompt: per_prompt.max(1),
            sum: Usage::new(0, 0, 0),
        }
    }

    fn add(&mut self, index: usize, u: Usage) {
        let first = index.is_multiple_of(self.per_prompt);
        let (prompt, cached) = match first {
            true => (u.prompt_tokens, u.cached_tokens()),
            false => (0, 0),
        };
        let sum = self.sum;
        let mut next = Usage::new(
            sum.prompt_tokens + prompt,
            sum.completion_tokens + u.completion_tokens,
            sum.cached_tokens() + cached,
        );
        for d in [sum.completion_tokens_details, u.completion_tokens_details]
            .into_iter()
            .flatten()
        {
            next = next.with_reasoning(d.reasoning_tokens);
        }
        self.sum = next;
    }

    fn total(self) -> Usage {
        self.sum
    }
}

struct State {
    meta: ChunkMeta,
    /// The event that opened the response (read before its headers were sent).
    first: Option<Event>,
    rx: UnboundedReceiver<Event>,
    started: bool,
    ended: bool,
    done: usize,
    usage: UsageSum,
    /// Per choice, where the next token starts in the text sent (completion
    /// log-probability offsets).
    offsets: Vec<TextOffsets>,
    /// Per choice, with functions to call: the answer held back until it is known to be
    /// text (then sent as it comes) or calls (sent as call deltas when complete).
    held: Vec<Held>,
    /// Per choice, a thinking model's: its reasoning told from its answer (empty for
    /// other models).
    thinking: Vec<Thinking>,
}

/// A choice's reasoning split off, and the log-probabilities of text held back while
/// it could still be a tag.
struct Thinking {
    splitter: Splitter,
    logprobs: Vec<TokenLogprob>,
}

#[derive(Default)]
struct Held {
    decision: Option<Decision>,
    text: String,
    logprobs: Vec<TokenLogprob>,
}

/// The SSE events of one streamed response, starting with `first`, ending with `[DONE]`
/// (or one error event).
pub fn events(
    meta: ChunkMeta,
    first: Event,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = String> {
    let state = State {
        usage: UsageSum::new(meta.per_prompt),
        offsets: vec![TextOffsets::default(); meta.n],
        held: (0..meta.n).map(|_| Held::default()).collect(),
        thinking: (meta.thinking.iter())
            .flat_map(|&start| {
                (0..meta.n).map(move |_| Thinking {
                    splitter: Splitter::new(start),
                    logprobs: Vec::new(),
                })
            })
            .collect(),
        meta,
        first: Some(first),
        rx,
        started: false,
        ended: false,
        done: 0,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        if st.ended {
            return None;
        }
        if !st.started {
            st.started = true;
            let first = opening(&mut st);
            if !first.is_empty() {
                return Some((first, st));
            }
        }
        let out = next_event(&mut st).await;
        Some((out, st))
    })
}

/// Chat: each choice's role chunk. Completions with `echo`: each choice's prompt.
fn opening(st: &mut State) -> String {
    let mut out = String::new();
    for index in 0..st.meta.n {
        let per_prompt = st.meta.per_prompt;
        if let Some(c) = &mut st.meta.continuous_usage {
            c.count(index, per_prompt, 0);
        }
        let meta = &st.meta;
        match (meta.shape, meta.echo(index)) {
            // An answer that can only be calls has no content (`null`, as its
            // unstreamed message says); any other may be text.
            (Shape::Chat, _) => {
                let forced = meta.tools.as_ref().is_some_and(CallReader::forced);
                let content = (!forced).then_some("");
                out.push_str(&meta.chunk(index, true, content, None, None));
            }
            // With log-probabilities the prompt waits for its scores (`Event::Prompt`).
            (Shape::Completion, Some(prompt)) if !meta.logprobs => {
                out.push_str(&meta.chunk(index, false, Some(&prompt.text), None, None));
                st.offsets[index] = TextOffsets::after(prompt.text.chars().count());
            }
            (Shape::Completion, Some(_)) => {}
            (Shape::Completion, None) => {}
        }
    }
    out
}

async fn next_event(st: &mut State) -> String {
    let event = match st.first.take() {
        Some(event) => Some(event),
        None => st.rx.recv().await,
    };
    let per_prompt = st.meta.per_prompt;
    if let (Some(c), Some(event)) = (&mut st.meta.continuous_usage, &event) {
        match *event {
            Event::Text { index, tokens, .. } => c.count(index, per_prompt, tokens),
            Event::Prompt { index, .. } => c.count(index, per_prompt, 0),
            // Tokens whose text is never sent (a stop string's) count from here on.
            Event::Done { index, usage, .. } => {
                let more = usage.completion_tokens.saturating_sub(c.so_far(index));
                c.count(index, per_prompt, more)
            }
            Event::Error(_) => {}
        }
    }
    let meta = &st.meta;
    match event {
        Some(Event::Text {
            index,
            text,
            logprobs,
            tokens,
        }) => match st.thinking.get_mut(index) {
            Some(thinking) => {
                let parts = thinking.splitter.push_counted(&text, tokens);
                thinking.logprobs.extend(logprobs);
                split_text(st, index, parts)
            }
            None => answer_text(st, index, text, logprobs),
        },
        Some(Event::Prompt {
            index,
            tokens,
            logprobs,
        }) => match meta.echo(index) {
            Some(prompt) if meta.logprobs => {
                let first = tokens.first().copied().filter(|_| !prompt.skips_bos);
                let lp = logprobs::completion_with_prompt(&meta.info, first, &logprobs, &[], 0);
                if let Some(offsets) = st.offsets.get_mut(index) {
                    *offsets = TextOffsets::after(prompt.text.chars().count());
                }
                meta.chunk(index, false, Some(&prompt.text), Some(lp), None)
            }
            _ => String::new(),
        },
        Some(Event::Done {
            index,
            finish,
            usage,
        }) => {
            let usage = match st.thinking.get(index) {
                Some(t) => {
                    usage.with_reasoning(t.splitter.reasoning_tokens(usage.completion_tokens))
                }
                None => usage,
            };
            st.usage.add(index, usage);
            st.done += 1;
            // What a thinking model's splitter held goes first, and the log-probabilities
            // of tokens whose text was a tag (held, then dropped) with it or alone.
            let mut out = match st.thinking.get_mut(index) {
                Some(thinking) => {
                    let parts = thinking.splitter.finish();
                    let mut out = split_text(st, index, parts);
                    let left = (st.thinking.get_mut(index))
                        .map(|t| std::mem::take(&mut t.logprobs))
                        .unwrap_or_default();
                    if !left.is_empty() {
                        let meta = &st.meta;
                        let lp = meta.logprobs_value(&left, &mut TextOffsets::default());
                        out.push_str(&meta.chunk(index, false, None, lp, None));
                    }
                    out
                }
                None => String::new(),
            };
            let meta = &st.meta;
            let mut finish = finish.as_str();
            if let (Some(reader), Some(held)) = (&meta.tools, st.held.get_mut(index)) {
                let text = std::mem::take(&mut held.text);
                match reader.chat_calls(&text, finish) {
                    Some((reason, calls)) => {
                        meta.metrics.tool_calls.inc_by(calls.len() as u64);
                        let held_lp = std::mem::take(&mut held.logprobs);
                        let mut lp = meta.logprobs_value(&held_lp, &mut TextOffsets::default());
                        for (i, call) in calls.into_iter().enumerate() {
                            for delta in call_deltas(i, call) {
                                out.push_str(&meta.tool_chunk(index, delta, lp.take()));
                            }
                        }
                        finish = reason;
                    }
                    None => {
                        // Only chat answers hold text back: no offsets to keep. A dropped
                        // call's tokens keep their logprobs, as the unstreamed answer does.
                        let held_lp = std::mem::take(&mut held.logprobs);
                        let lp = meta.logprobs_value(&held_lp, &mut TextOffsets::default());
                        let text = reader.text_of(text).filter(|t| !t.is_empty());
                        if text.is_some() || !held_lp.is_empty() {
                            out.push_str(&meta.chunk(index, false, text.as_deref(), lp, None));
                        }
                    }
                }
            }
            out.push_str(&match meta.shape {
                Shape::Chat => meta.chunk(index, false, None, None, Some(finish)),
                Shape::Completion => meta.chunk(index, false, Some(""), None, Some(finish)),
            });
            if st.done >= meta.n {
                if meta.include_usage {
                    out.push_str(&meta.usage_chunk(st.usage.total()));
                }
                out.push_str(DONE);
                st.ended = true;
            }
            out
        }
        Some(Event::Error(failure)) => {
            st.ended = true;
            frame(&ApiError::from(failure).body())
        }
        None => {
            st.ended = true;
            frame(&inference_stopped().body())
        }
    }
}

/// A choice's text once split: its reasoning sent as it comes, its answer as any
/// answer's text. The log-probabilities go with the answer's part when there is one.
fn split_text(st: &mut State, index: usize, parts: Parts) -> String {
    let Some(thinking) = st.thinking.get_mut(index) else {
        return String::new();
    };
    if parts.reasoning.is_empty() && parts.content.is_empty() {
        return String::new();
    }
    let logprobs = std::mem::take(&mut thinking.logprobs);
    let mut out = String::new();
    if !parts.reasoning.is_empty() {
        let (mine, rest) = match parts.content.is_empty() {
            true => (logprobs, Vec::new()),
            false => (Vec::new(), logprobs),
        };
        let lp = st
            .offsets
            .get_mut(index)
            .and_then(|offsets| st.meta.logprobs_value(&mine, offsets));
        out.push_str(&st.meta.reasoning_chunk(index, &parts.reasoning, lp));
        if !parts.content.is_empty() {
            out.push_str(&answer_text(st, index, parts.content, rest));
        }
        return out;
    }
    answer_text(st, index, parts.content, logprobs)
}

/// A piece of a choice's answer: sent, or held while it may be a call.
fn answer_text(st: &mut State, index: usize, text: String, logprobs: Vec<TokenLogprob>) -> String {
    let meta = &st.meta;
    let (text, logprobs) = match (&meta.tools, st.held.get_mut(index)) {
        (Some(reader), Some(held)) if held.decision != Some(Decision::Text) => {
            held.text.push_str(&text);
            held.logprobs.extend(logprobs);
            let decision = reader.decide(&held.text);
            held.decision = Some(decision);
            if decision != Decision::Text {
                return String::new();
            }
            (
                std::mem::take(&mut held.text),
                std::mem::take(&mut held.logprobs),
            )
        }
        _ => (text, logprobs),
    };
    let lp = match st.offsets.get_mut(index) {
        Some(offsets) => meta.logprobs_value(&logprobs, offsets),
        None => None,
    };
    meta.chunk(index, false, Some(&text), lp, None)
}

/// A call as two deltas, each sent in a chunk of its own: its name (with `id`, `type` and
/// empty arguments), then its arguments.
fn call_deltas(index: usize, call: ToolCall) -> [ToolCallDelta; 2] {
    let index = index as u32;
    [
        ToolCallDelta {
            index,
            id: Some(call.id),
            kind: Some("function"),
            function: FunctionDelta {
                name: Some(call.name),
                arguments: String::new(),
            },
        },
        ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: FunctionDelta {
                name: None,
                arguments: call.arguments,
            },
        },
    ]
}

/// What a request's channel closing early means: the engine is gone.
pub fn inference_stopped() -> ApiError {
    ApiError::Unavailable("the inference thread stopped".into())
}

/// A stream's first event, read before its headers are sent: an error known before the
/// first token (a queue timeout, a request that cannot fit, a stopped inference thread)
/// is then an HTTP status that clients can retry on; only later errors are events.
pub async fn first_event(rx: &mut UnboundedReceiver<Event>) -> Result<Event, ApiError> {
    match rx.recv().await {
        Some(Event::Error(failure)) => Err(failure.into()),
        Some(event) => Ok(event),
        None => Err(inference_stopped()),
    }
}

/// One choice of a non-streamed reply.
#[derive(Debug, Default)]
pub struct ChoiceOut {
    pub text: String,
    /// Where each piece of `text` ends, and its tokens (a thinking model's reasoning
    /// tokens are counted from them).
    pub pieces: Vec<(usize, usize)>,
    /// The choice's completion tokens.
    pub tokens: usize,
    pub finish: Option<FinishReason>,
    pub logprobs: Vec<TokenLogprob>,
    /// The prompt's first token and the scores of the rest, when asked for.
    pub prompt: Option<(Option<u32>, Vec<TokenLogprob>)>,
}

/// The whole reply of a non-streamed request.
pub struct Collected {
    pub choices: Vec<ChoiceOut>,
    pub usage: Usage,
}

/// Collects `n` choices, `per_prompt` for each prompt.
pub async fn collect(
    mut rx: UnboundedReceiver<Event>,
    n: usize,
    per_prompt: usize,
) -> Result<Collected, ApiError> {
    let mut choices: Vec<ChoiceOut> = (0..n).map(|_| ChoiceOut::default()).collect();
    let mut usage = UsageSum::new(per_prompt);
    let mut done = 0;
    while done < n {
        match rx.recv().await {
            Some(Event::Text {
                index,
                text,
                logprobs,
                tokens,
            }) => {
                if let Some(c) = choices.get_mut(index) {
                    c.text.push_str(&text);
                    c.pieces.push((c.text.len(), tokens));
                    c.logprobs.extend(logprobs);
                }
            }
            Some(Event::Prompt {
                index,
                tokens,
                logprobs,
            }) => {
                if let Some(c) = choices.get_mut(index) {
                    c.prompt = Some((tokens.first().copied(), logprobs));
                }
            }
            Some(Event::Done {
                index,
                finish,
                usage: u,
            }) => {
                usage.add(index, u);
                if let Some(c) = choices.get_mut(index) {
                    c.finish = Some(finish);
                    c.tokens = u.completion_tokens;
                }
                done += 1;
            }
            Some(Event::Error(failure)) => return Err(failure.into()),
            None => return Err(inference_stopped()),
        }
    }
    Ok(Collected {
        choices,
        usage: usage.total(),
    })
}

/// The events of a batch's requests (one per prompt, `per_prompt` choices each) as one
/// request's: prompt `i`'s choices become `i · per_prompt …`, as OpenAI numbers a batch's
/// choices. A request's channel closes when the merged one does (its client went away
/// or another prompt failed), which frees its sequences.
pub fn merge(rxs: Vec<UnboundedReceiver<Event>>, per_prompt: usize) -> UnboundedReceiver<Event> {
    let (tx, merged) = mpsc::unbounded_channel();
    for (i, mut rx) in rxs.into_iter().enumerate() {
        let (tx, offset) = (tx.clone(), i * per_prompt);
        tokio::spawn(async move {
            loop {
                let event = tokio::select! {
                    event = rx.recv() => event,
                    () = tx.closed() => None,
                };
                let Some(event) = event else { break };
                if tx.send(event.reindexed(offset)).is_err() {
                    break;
                }
            }
        });
    }
    merged
}
