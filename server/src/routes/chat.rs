//! `POST /v1/chat/completions` and `POST /v1/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::engine::FinishReason;
use crate::error::ApiError;
use crate::logprobs;
use crate::openai::{
    unix_now, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest,
};
use crate::routes::{ApiJson, RequestId};
use crate::stream::{self, ChoiceOut, ChunkMeta, Shape};
use crate::validate::{self, ValidRequest};
use crate::{sse, AppState};

pub async fn chat_completions(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    let valid = validate::chat(&engine.info, app.limits(), rid.clone(), req)?;
    respond(app, Shape::Chat, format!("chatcmpl-{rid}"), valid).await
}

pub async fn completions(
    State(app): State<AppState>,
    Extension(RequestId(rid)): Extension<RequestId>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let engine = app.engine()?;
    let valid = validate::completion(&engine.info, app.limits(), rid.clone(), req)?;
    respond(app, Shape::Completion, format!("cmpl-{rid}"), valid).await
}

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
    let n = valid.gen.n;
    let rx = engine.submit(valid.gen)?;
    if valid.stream {
        let meta = ChunkMeta {
            shape,
            id,
            model,
            created,
            include_usage: valid.include_usage,
            n,
            logprobs: valid.logprobs,
            echo: valid.echo,
            info,
        };
        return Ok(sse::response(stream::events(meta, rx)));
    }
    let done = stream::collect(rx, n).await?;
    let finish = |c: &ChoiceOut| c.finish.map_or("stop", FinishReason::as_str);
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
                .map(|(i, c)| ChatChoice {
                    index: i as u32,
                    finish_reason: finish(&c),
                    logprobs: valid.logprobs.then(|| logprobs::chat(&info, &c.logprobs)),
                    message: AssistantMessage {
                        role: "assistant",
                        content: c.text,
                    },
                })
                .collect(),
            usage: done.usage,
        })
        .into_response(),
        Shape::Completion => {
            let echo = valid.echo.unwrap_or_default();
            let offset = echo.chars().count();
            Json(Completion {
                id,
                object: "text_completion",
                created,
                model,
                choices: done
                    .choices
                    .into_iter()
                    .enumerate()
                    .map(|(i, c)| CompletionChoice {
                        index: i as u32,
                        finish_reason: Some(finish(&c)),
                        logprobs: valid.logprobs.then(|| match &c.prompt {
                            // Echoed: the prompt's tokens lead, then the completion's.
                            Some((first, scores)) => {
                                let all: Vec<_> =
                                    scores.iter().chain(&c.logprobs).cloned().collect();
                                logprobs::completion_with_prompt(&info, *first, &all, 0)
                            }
                            None => logprobs::completion(&info, &c.logprobs, offset),
                        }),
                        text: format!("{echo}{}", c.text),
                    })
                    .collect(),
                usage: Some(Some(done.usage)),
            })
            .into_response()
        }
    })
}
