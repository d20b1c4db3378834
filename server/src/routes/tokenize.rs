//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes): the model's own tokenizer
//! and chat template, for clients that count or inspect tokens.

use axum::extract::State;
use axum::Json;
use chorus_model::ChatMessage;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::openai::{MessageContent, WireMessage};
use crate::routes::ApiJson;
use crate::validate::check_model;
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<WireMessage>>,
    #[serde(default)]
    add_generation_prompt: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
}

pub async fn tokenize(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let engine = app.engine()?;
    let info = &engine.info;
    check_model(info, req.model.as_deref())?;
    // A raw prompt is tokenized as /v1/completions does (BOS added where the model
    // wants it); a conversation as its rendered template, which writes its own.
    let (text, raw) = match (req.prompt, req.messages) {
        (Some(p), None) => (p, true),
        (None, Some(messages)) => {
            let messages: Vec<ChatMessage> = messages
                .into_iter()
                .map(|m| ChatMessage {
                    role: m.role,
                    content: match m.content {
                        Some(MessageContent::Text(t)) => t,
                        Some(MessageContent::Parts(parts)) => {
                            parts.into_iter().filter_map(|p| p.text).collect()
                        }
                        None => String::new(),
                    },
                })
                .collect();
            let text = info
                .template
                .render(&messages, req.add_generation_prompt.unwrap_or(true))
                .map_err(|e| {
                    ApiError::bad(
                        "messages",
                        format!("the chat template rejected the conversation: {e}"),
                    )
                })?;
            (text, false)
        }
        _ => {
            return Err(ApiError::bad(
                "prompt",
                "give exactly one of `prompt` or `messages`",
            ))
        }
    };
    let tokens = match raw {
        true => info.tokenizer.encode_prompt(&text),
        false => info.tokenizer.encode(&text),
    }
    .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: info.context_len,
        tokens,
    }))
}

#[derive(Debug, Deserialize)]
pub struct DetokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Debug, Serialize)]
pub struct DetokenizeResponse {
    prompt: String,
}

pub async fn detokenize(
    State(app): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let engine = app.engine()?;
    let info = &engine.info;
    check_model(info, req.model.as_deref())?;
    let vocab = info.tokenizer.vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::bad(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    let prompt = info
        .tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::Internal(format!("detokenization failed: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
