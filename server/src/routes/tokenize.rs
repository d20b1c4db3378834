//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes): the model's own tokenizer
//! and chat template, for clients that count or inspect tokens. A `prompt` is tokenized
//! as `/v1/completions` does (special tokens written in it are parsed); `messages` as
//! `/v1/chat/completions` does (what the messages say is plain text), so the ids are
//! exactly what the model would see.

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::engine::ModelInfo;
use crate::error::ApiError;
use crate::openai::{WireMessage, WireTemplateOptions, WireTool};
use crate::routes::JsonBody;
use crate::validate::{self, check_model};
use crate::AppState;

#[derive(Debug, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<WireMessage>>,
    /// `add_generation_prompt`, `continue_final_message`, `chat_template_kwargs`.
    #[serde(flatten)]
    template: WireTemplateOptions,
    /// Functions offered, with the fields that change how chat shows them to the model
    /// (`tool_choice: "none"` hides them; structured output beside them is described).
    #[serde(default)]
    tools: Option<Vec<WireTool>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    response_format: Option<Value>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
}

pub async fn tokenize(
    State(app): State<AppState>,
    body: JsonBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let info = app.engine()?.info.clone();
    let limits = app.limits();
    let tokens = app
        .prep()
        .run(move || {
            let req: TokenizeRequest = body.parse()?;
            check_model(&info, req.model.as_deref())?;
            let tokens = match (req.prompt, req.messages) {
                (Some(p), None) => info
                    .tokenizer
                    .encode_prompt(&p)
                    .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?,
                (None, Some(messages)) => {
                    let tools = validate::tool_request(
                        req.tools,
                        req.tool_choice.as_ref(),
                        req.parallel_tool_calls,
                        limits.max_tool_calls,
                    )?;
                    let json_answer =
                        validate::response_format(req.response_format.as_ref())?.is_some();
                    validate::chat_prompt(
                        &info,
                        limits,
                        messages,
                        tools.as_ref(),
                        json_answer,
                        &validate::rendering(req.template)?,
                        "messages",
                    )?
                    .ids
                }
                _ => {
                    return Err(ApiError::bad(
                        "prompt",
                        "give exactly one of `prompt` or `messages`",
                    ))
                }
            };
            Ok((tokens, info.max_seq_tokens))
        })
        .await?;
    Ok(Json(TokenizeResponse {
        count: tokens.0.len(),
        max_model_len: tokens.1,
        tokens: tokens.0,
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
    body: JsonBody,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let info = app.engine()?.info.clone();
    let prompt = app
        .prep()
        .run(move || detokenize_ids(&info, body.parse()?))
        .await?;
    Ok(Json(DetokenizeResponse { prompt }))
}

fn detokenize_ids(info: &ModelInfo, req: DetokenizeRequest) -> Result<String, ApiError> {
    check_model(info, req.model.as_deref())?;
    let vocab = info.tokenizer.vocab_size() as u32;
    if let Some(bad) = req.tokens.iter().find(|&&t| t >= vocab) {
        return Err(ApiError::bad(
            "tokens",
            format!("token id {bad} is outside the vocabulary (size {vocab})"),
        ));
    }
    info.tokenizer
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::Internal(format!("detokenization failed: {e}")))
}
