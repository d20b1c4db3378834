//! Turns a request's event channel into OpenAI's streamed chunks (chat or completion
//! shape), or collects it into one reply.

use futures_util::Stream;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::engine::{Event, FinishReason};
use crate::error::ApiError;
use crate::openai::{ChatChunk, ChunkChoice, Completion, CompletionChoice, Delta, Usage};
use crate::sse::{frame, DONE};

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
}

impl ChunkMeta {
    fn usage_field(&self, usage: Option<Usage>) -> Option<Option<Usage>> {
        self.include_usage.then_some(usage)
    }

    /// A chunk with one choice.
    fn chunk(&self, role: bool, text: Option<&str>, finish: Option<FinishReason>) -> String {
        let finish_reason = finish.map(FinishReason::as_str);
        match self.shape {
            Shape::Chat => frame(&ChatChunk {
                id: &self.id,
                object: "chat.completion.chunk",
                created: self.created,
                model: &self.model,
                choices: vec![ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role: role.then_some("assistant"),
                        content: text,
                    },
                    logprobs: None,
                    finish_reason,
                }],
                usage: self.usage_field(None),
            }),
            Shape::Completion => frame(&Completion {
                id: self.id.clone(),
                object: "text_completion",
                created: self.created,
                model: self.model.clone(),
                choices: vec![CompletionChoice {
                    index: 0,
                    text: text.unwrap_or_default().to_string(),
                    logprobs: None,
                    finish_reason,
                }],
                usage: self.usage_field(None),
            }),
        }
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
}

enum Phase {
    Start,
    Streaming,
    Ended,
}

/// The SSE events of one streamed response, ending with `[DONE]` (or one error event).
pub fn events(meta: ChunkMeta, rx: UnboundedReceiver<Event>) -> impl Stream<Item = String> {
    futures_util::stream::unfold((meta, rx, Phase::Start), |(meta, rx, phase)| async move {
        match phase {
            Phase::Ended => None,
            Phase::Start => {
                let first = match meta.shape {
                    Shape::Chat => meta.chunk(true, Some(""), None),
                    Shape::Completion => {
                        // Completions have no role chunk: go straight to the first event.
                        return next_event(meta, rx).await;
                    }
                };
                Some((first, (meta, rx, Phase::Streaming)))
            }
            Phase::Streaming => next_event(meta, rx).await,
        }
    })
}

async fn next_event(
    meta: ChunkMeta,
    mut rx: UnboundedReceiver<Event>,
) -> Option<(String, (ChunkMeta, UnboundedReceiver<Event>, Phase))> {
    let out = match rx.recv().await {
        Some(Event::Text(t)) => {
            let c = meta.chunk(false, Some(&t), None);
            return Some((c, (meta, rx, Phase::Streaming)));
        }
        Some(Event::Done { finish, usage }) => {
            let mut out = match meta.shape {
                Shape::Chat => meta.chunk(false, None, Some(finish)),
                Shape::Completion => meta.chunk(false, Some(""), Some(finish)),
            };
            if meta.include_usage {
                out.push_str(&meta.usage_chunk(usage));
            }
            out.push_str(DONE);
            out
        }
        Some(Event::Error(failure)) => frame(&ApiError::from(failure).body()),
        None => frame(&ApiError::Unavailable("the inference thread stopped".into()).body()),
    };
    Some((out, (meta, rx, Phase::Ended)))
}

/// The whole reply of a non-streamed request.
pub struct Collected {
    pub text: String,
    pub finish: FinishReason,
    pub usage: Usage,
}

pub async fn collect(mut rx: UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, usage }) => {
                return Ok(Collected {
                    text,
                    finish,
                    usage,
                })
            }
            Some(Event::Error(failure)) => return Err(failure.into()),
            None => return Err(ApiError::Unavailable("the inference thread stopped".into())),
        }
    }
}
