//! `POST /tokenize` and `POST /detokenize` (vLLM's shapes): the model's own tokenizer
//! and chat template, for clients that count or inspect tokens. A `prompt` is tokenized
//! as `/v1/completions` does (special tokens written in it are parsed); `messages` as
//! `/v1/chat/completions` does (what the messages say is plain text), so the ids are
//! exactly what the model would see. As in vLLM, `add_special_tokens` (a prompt's
//! default true, messages' false: their template writes them) says whether BOS goes in
//! front where the model wants one (never twice), and `return_token_strs` adds each
//! id's vocabulary entry.

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
    #[serde(default)]
    add_special_tokens: Option<bool>,
    #[serde(default)]
    return_token_strs: Option<bool>,
}

#[derive(Debug, Serialize)]
pub struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_strs: Option<Vec<String>>,
}

pub async fn tokenize(
    State(app): State<AppState>,
    body: JsonBody,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let info = app.engine()?.info.clone();
    let limits = app.limits();
    let response = app
        .prep()
        .run(move || {
            let req: TokenizeRequest = body.parse()?;
            check_model(&info, req.model.as_deref())?;
            let special = req.add_special_tokens;
            let tokens = match (req.prompt, req.messages) {
                (Some(p), None) => {
                    let ids = info
                        .tokenizer
                        .encode(&p)
                        .map_err(|e| ApiError::Internal(format!("tokenization failed: {e}")))?;
                    match special.unwrap_or(true) {
                        true => info.tokenizer.with_bos(ids),
                        false => ids,
                    }
                }
                (None, Some(messages)) => {
                    let tools = validate::tool_request(
                        req.tools,
                        req.tool_choice.as_ref(),
                        req.parallel_tool_calls,
                        limits.max_tool_calls,
                    )?;
                    let json_answer =
                        validate::response_format(req.response_format.as_ref())?.is_some();
                    let ids = validate::chat_prompt(
                        &info,
                        limits,
                        messages,
                        tools.as_ref(),
                        json_answer,
                        &validate::rendering(req.template)?,
                        "messages",
                    )?
                    .ids;
                    match special.unwrap_or(false) {
                        true => info.tokenizer.with_bos(ids),
                        false => ids,
                    }
                }
                _ => {
                    return Err(ApiError::bad(
                        "prompt",
                        "give exactly one of `prompt` or `messages`",
                    ))
                }
            };
            let token_strs = req.return_token_strs.unwrap_or(false).then(|| {
                let piece = |&id: &u32| info.tokenizer.id_to_token(id).unwrap_or_default();
                tokens.iter().map(piece).collect()
            });
            Ok(TokenizeResponse {
                count: tokens.len(),
                max_model_len: info.max_seq_tokens,
                tokens,
                token_strs,
            })
        })
        .await?;
    Ok(Json(response))
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
