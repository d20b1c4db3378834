//! `POST /v1/chat/completions` and `POST /v1/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::de::DeserializeOwned;

use crate::engine::{FinishReason, ModelInfo};
use crate::error::ApiError;
use crate::logprobs;
use crate::openai::{
    unix_now, AssistantMessage, ChatChoice, ChatCompletion, Completion, CompletionChoice,
};
use crate::reasoning::Splitter;
use crate::routes::{JsonBody, RequestId};
use crate::stream::{self, ChoiceOut, ChunkMeta, Shape};
use crate::validate::{self, Limits, ValidRequest};
use crate::{sse, AppState};

pub async fn chat_completions(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let valid = prepare(&app, &rid, body, validate::chat).await?;
    respond(app, Shape::Chat, format!("chatcmpl-{rid}"), valid).await
}

pub async fn completions(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    body: JsonBody,
) -> Result<Response, ApiError> {
    let valid = prepare(&app, &rid, body, validate::completion).await?;
    respond(app, Shape::Completion, format!("cmpl-{rid}"), valid).await
}

/// Parses and validates the body on the preprocessing pool (template, tokenizer,
/// grammar: never on the async runtime).
async fn prepare<R: DeserializeOwned + 'static>(
    app: &AppState,
    rid: &str,
    body: JsonBody,
    validate: fn(&ModelInfo, Limits, String, R) -> Result<ValidRequest, ApiError>,
) -> Result<ValidRequest, ApiError> {
    let info = app.engine()?.info.clone();
    let (limits, request_id) = (app.limits(), rid.to_string());
    app.prep()
        .run(move || validate(&info, limits, request_id, body.parse()?))
        .await
}

/// Submits the request and answers it. A stream's headers wait for its first event, so
/// that an error known before the first token (a queue timeout, a request that cannot
/// fit, a stopped inference thread) is an HTTP status that clients can retry on; only
/// errors after it are events in the stream.
async fn respond(
    app: AppState,
    shape: Shape,
    id: String,
    valid: ValidRequest,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    let info = engine.info.clone();
    let model = info.id.clone();
    let created = unix_now();
    // A batch of prompts is answered as one request: prompt i's choices are i·n … .
    let per_prompt = valid.gens.first().map_or(1, |g| g.n);
    let n = per_prompt * valid.gens.len();
    let prompt_tokens: Vec<usize> = valid.gens.iter().map(|g| g.prompt.len()).collect();
    let mut rxs = engine.submit_all(valid.gens)?;
    let mut rx = match rxs.len() {
        1 => rxs.pop().expect("one prompt"),
        _ => stream::merge(rxs, per_prompt),
    };
    if valid.stream {
        let first = stream::first_event(&mut rx).await?;
        let meta = ChunkMeta {
            shape,
            id,
            model,
            created,
            include_usage: valid.include_usage,
            continuous_usage: valid
                .continuous_usage
                .then(|| stream::Continuous::new(prompt_tokens)),
            n,
            per_prompt,
            logprobs: valid.logprobs,
            echo: valid.echo,
            tools: valid.tools.clone(),
            thinking: valid.thinking,
            metrics: app.metrics_handle(),
            info,
        };
        return Ok(sse::response(stream::events(meta, first, rx)));
    }
    let done = stream::collect(rx, n, per_prompt).await?;
    let finish = |c: &ChoiceOut| c.finish.map_or("stop", FinishReason::as_str);
    let mut usage = done.usage;
    Ok(match shape {
        Shape::Chat => Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: done
                .choices
                .into_iter()
                .enumerate()
                .map(|(i, mut c)| {
                    let logprobs = valid.logprobs.then(|| logprobs::chat(&info, &c.logprobs));
                    // A thinking model's block is its reasoning; the rest is the answer.
                    let reasoning_content = valid.thinking.map(|start| {
                        let (parts, tokens) =
                            Splitter::split_counted(start, &c.text, &c.pieces, c.tokens);
                        usage = usage.with_reasoning(tokens);
                        c.text = parts.content;
                        parts.reasoning
                    });
                    let reasoning_content = reasoning_content.filter(|r| !r.is_empty());
                    let calls =
                        (valid.tools.as_ref()).and_then(|r| r.chat_calls(&c.text, finish(&c)));
                    let (finish_reason, message) = match calls {
                        Some((finish_reason, calls)) => {
                            app.metrics().tool_calls.inc_by(calls.len() as u64);
                            let message = AssistantMessage {
                                role: "assistant",
                                content: None,
                                reasoning_content,
                                tool_calls: calls.into_iter().map(Into::into).collect(),
                            };
                            (finish_reason, message)
                        }
                        None => (
                            finish(&c),
                            AssistantMessage {
                                role: "assistant",
                                content: match &valid.tools {
                                    Some(reader) => reader.text_of(c.text),
                                    None => Some(c.text),
                                },
                                reasoning_content,
                                tool_calls: Vec::new(),
                            },
                        ),
                    };
                    ChatChoice {
                        index: i as u32,
                        finish_reason,
                        logprobs,
                        message,
                    }
                })
                .collect(),
            usage,
        })
        .into_response(),
        Shape::Completion => {
            let echo = |i: usize| valid.echo.get(i / per_prompt);
            Json(Completion {
                id,
                object: "text_completion",
                created,
                model,
                choices: done
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| {
                        let echo = echo(i);
                        let prompt = echo.map_or("", |e| e.text.as_str());
                        let offset = prompt.chars().count();
                        CompletionChoice {
                            index: i as u32,
                            finish_reason: Some(finish(&c)),
                            logprobs: valid.logprobs.then(|| match &c.prompt {
                                // Echoed: the prompt's tokens lead, then the completion's.
                                Some((first, scores)) => {
                                    let first =
                                        first.filter(|_| !echo.is_some_and(|e| e.skips_bos));
                                    logprobs::completion_with_prompt(
                                        &info,
                                        first,
                                        scores,
                                        &c.logprobs,
                                        offset,
                                    )
                                }
                                None => logprobs::completion(
                                    &info,
                                    &c.logprobs,
                                    &mut logprobs::TextOffsets::after(offset),
                                ),
                            }),
                            text: format!("{prompt}{}", c.text),
                        }
                    })
                    .collect(),
                usage: Some(Some(done.usage)),
            })
            .into_response()
        }
    })
}
