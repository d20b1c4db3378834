//! `POST /v1/chat/completions` and `POST /v1/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::error::ApiError;
use crate::openai::{
    unix_now, AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionRequest, Completion,
    CompletionChoice, CompletionRequest,
};
use crate::routes::{ApiJson, RequestId};
use crate::stream::{self, ChunkMeta, Shape};
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
    let model = engine.info.id.clone();
    let created = unix_now();
    let rx = engine.submit(valid.gen)?;
    if valid.stream {
        let meta = ChunkMeta {
            shape,
            id,
            model,
            created,
            include_usage: valid.include_usage,
        };
        return Ok(sse::response(stream::events(meta, rx)));
    }
    let done = stream::collect(rx).await?;
    let finish_reason = done.finish.as_str();
    Ok(match shape {
        Shape::Chat => Json(ChatCompletion {
            id,
            object: "chat.completion",
            created,
            model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: done.text,
                },
                logprobs: None,
                finish_reason,
            }],
            usage: done.usage,
        })
        .into_response(),
        Shape::Completion => Json(Completion {
            id,
            object: "text_completion",
            created,
            model,
            choices: vec![CompletionChoice {
                index: 0,
                text: done.text,
                logprobs: None,
                finish_reason: Some(finish_reason),
            }],
            usage: Some(Some(done.usage)),
        })
        .into_response(),
    })
}
