//! The Responses API (`/v1/responses`): a request read into a conversation, answered by
//! the same engine and tools layer as chat, and kept in the [`crate::store`] so that the
//! next turn can name it (`previous_response_id`) instead of resending the history.
//!
//! - [`wire`]: the request, the response object and its items (also the stored form).
//! - [`input`]: `input` read into items; items into the chat messages the template renders.
//! - [`events`]: a streamed response as OpenAI's typed events.
//! - [`pages`]: a stored response's input items, a page at a time.
//!
//! A turn's prompt is the whole conversation rendered again: the chain's stored items, then
//! this request's. It shares its start with the previous turn's prompt and answer, whose
//! keys and values the prefix cache still holds, so only the new turn is computed.

pub mod events;
pub mod input;
pub mod pages;
pub mod wire;

use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::engine::{FinishReason, GenRequest, ModelInfo};
use crate::error::{quoted_id, ApiError};
use crate::metrics::Metrics;
use crate::openai::{given, Usage, WireSampling};
use crate::reasoning::Start;
use crate::store::{Row, Store, StoreError};
use crate::tools::{CallReader, FunctionSpec, ToolRequest};
use crate::validate::{self, Limits};
use wire::{IncompleteDetails, Item, ResponseObject, ResponsesRequest};

/// Most `metadata` pairs, and the longest key and value, as OpenAI limits them.
const METADATA_PAIRS: usize = 16;
const METADATA_KEY_CHARS: usize = 64;
const METADATA_VALUE_CHARS: usize = 512;

/// A request that passed every check, ready to run.
pub struct Prepared {
    pub gen: GenRequest,
    pub reader: Option<CallReader>,
    /// A thinking model's: where the answer starts relative to its block.
    pub thinking: Option<Start>,
    pub stream: bool,
    /// The response as it starts: `in_progress`, no output yet.
    pub response: ResponseObject,
    /// Where it will be stored when it ends (`None`: not stored).
    pub keep: Option<Keep>,
}

/// What storing a finished response needs.
pub struct Keep {
    pub store: Arc<Store>,
    /// This request's own input items.
    pub input: Vec<Item>,
    /// The responses it continues, first turn first.
    pub chain: Vec<String>,
}

/// Reads and checks a request, rebuilds its conversation from the store, renders and
/// tokenizes it. Runs on the preprocessing pool (it reads the database).
pub fn prepare(
    info: &ModelInfo,
    limits: Limits,
    store: Option<Arc<Store>>,
    request_id: String,
    req: ResponsesRequest,
) -> Result<Prepared, ApiError> {
    validate::check_model(info, req.model.as_deref())?;
    refuse_unsupported(&req, info.reasoning)?;
    let max_output_tokens = at_least_one("max_output_tokens", req.max_output_tokens)?;
    let max_tool_calls = at_least_one("max_tool_calls", req.max_tool_calls)?;
    let metadata = metadata(req.metadata)?;
    let wire_tools = req.tools.unwrap_or_default();
    let tools = ToolRequest::new(
        crate::tools::Shape::Responses,
        functions(&wire_tools)?,
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
        max_tool_calls.map_or(limits.max_tool_calls, |n| {
            limits
                .max_tool_calls
                .min(usize::try_from(n).unwrap_or(usize::MAX))
        }),
    )?;
    let text = req
        .text
        .filter(|t| !t.is_null())
        .unwrap_or_else(|| json!({"format": {"type": "text"}}));
    let answer = text_format(&text)?.map(|schema| ("text", schema));

    let items = input::read(req.input)?;
    let (history, chain, last_output) =
        match (&req.previous_response_id, &store) {
            (None, _) => (Vec::new(), Vec::new(), 0),
            (Some(_), None) => return Err(ApiError::bad(
                "previous_response_id",
                "responses are not stored on this server (--no-store), so none can be continued",
            )),
            (Some(id), Some(store)) => history(store, id)?,
        };
    if items.is_empty() {
        return Err(ApiError::bad(
            "input",
            "`input` must be a string or a non-empty list of items",
        ));
    }
    input::check_items(&history, &history[last_output..], &items)?;
    let wire = input::messages(
        req.instructions.as_deref(),
        history.iter().chain(items.iter()),
    );
    let sampling = WireSampling {
        temperature: req.temperature,
        top_p: req.top_p,
        max_tokens: req.max_output_tokens,
        ..WireSampling::default()
    };
    let (gen, reader, thinking) = validate::conversation(
        info,
        limits,
        request_id.clone(),
        wire,
        tools.as_ref(),
        answer,
        &sampling,
        &validate::Rendering::default(),
        "input",
    )?;
    let parallel = req.parallel_tool_calls.unwrap_or(true);
    // `store` defaults to true; with --no-store nothing is kept, as if it were false.
    let keep = store
        .filter(|_| req.store.unwrap_or(true))
        .map(|store| Keep {
            store,
            input: items,
            chain,
        });
    let response = ResponseObject {
        id: wire::new_id("resp"),
        object: "response".into(),
        created_at: crate::openai::unix_now(),
        completed_at: None,
        status: "in_progress".into(),
        error: None,
        incomplete_details: None,
        instructions: req.instructions,
        max_output_tokens,
        max_tool_calls,
        model: info.id.clone(),
        output: Vec::new(),
        parallel_tool_calls: parallel,
        previous_response_id: req.previous_response_id,
        store: keep.is_some(),
        // What the draw uses: OpenAI reports its defaults, not null.
        temperature: req.temperature.or(Some(1.0)),
        top_p: req.top_p.or(Some(1.0)),
        text,
        tool_choice: req.tool_choice.unwrap_or_else(|| json!("auto")),
        tools: wire_tools,
        truncation: req.truncation.unwrap_or_else(|| "disabled".into()),
        usage: None,
        metadata,
        user: req.user,
    };
    Ok(Prepared {
        gen,
        reader,
        thinking,
        stream: req.stream.unwrap_or(false),
        response,
        keep,
    })
}

/// An optional count that must be at least 1 when given.
fn at_least_one(field: &'static str, n: Option<i64>) -> Result<Option<u64>, ApiError> {
    match n {
        Some(n) if n < 1 => Err(ApiError::bad(
            field,
            format!("`{field}` must be at least 1, got {n}"),
        )),
        n => Ok(n.map(|n| n as u64)),
    }
}

/// Fields this server does not support, refused by name rather than ignored.
/// `thinking`: the model thinks in `<think>` blocks.
fn refuse_unsupported(req: &ResponsesRequest, thinking: bool) -> Result<(), ApiError> {
    if req.background == Some(true) {
        return Err(ApiError::bad(
            "background",
            "`background` responses are not supported; stream instead",
        ));
    }
    // `{"effort": "none"}` (or an empty object) asks a model that does not think for no
    // reasoning, which is what it gets.
    let no_reasoning = |r: &Value| {
        r.as_object().is_some_and(|o| {
            o.iter().all(|(k, v)| {
                v.is_null() || (!thinking && k == "effort" && v.as_str() == Some("none"))
            })
        })
    };
    if req
        .reasoning
        .as_ref()
        .is_some_and(|r| !r.is_null() && !no_reasoning(r))
    {
        return Err(ApiError::bad(
            "reasoning",
            format!(
                "`reasoning` is not supported: {}",
                crate::reasoning::effort_refused(thinking)
            ),
        ));
    }
    if given(&req.conversation) {
        return Err(ApiError::bad(
            "conversation",
            "`conversation` objects are not supported; chain turns with `previous_response_id`",
        ));
    }
    if given(&req.prompt) {
        return Err(ApiError::bad(
            "prompt",
            "stored prompt templates (`prompt`) are not supported",
        ));
    }
    if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(ApiError::bad(
            "top_logprobs",
            "`top_logprobs` is not supported on /v1/responses; use /v1/chat/completions",
        ));
    }
    if let Some(first) = req.include.iter().flatten().next() {
        return Err(ApiError::bad(
            "include",
            format!("`include` value {first:?} is not supported (nothing extra can be included)"),
        ));
    }
    if let Some(t) = req
        .truncation
        .as_deref()
        .filter(|t| !["disabled", "auto"].contains(t))
    {
        return Err(ApiError::bad(
            "truncation",
            format!("`truncation` must be \"disabled\" or \"auto\", got {t:?}"),
        ));
    }
    Ok(())
}

/// The flat function tools of `tools`; any other tool type is refused by name.
fn functions(tools: &[Value]) -> Result<Vec<FunctionSpec>, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let kind = t.get("type").and_then(Value::as_str).unwrap_or("nothing");
            if kind != "function" {
                return Err(ApiError::bad(
                    "tools",
                    format!("`tools[{i}]` has type {kind:?}: only \"function\" tools are supported (no built-in tools)"),
                ));
            }
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| {
                let hint = match t.get("function") {
                    Some(_) => " (Responses tools are flat, `{\"type\": \"function\", \"name\": ..., \"parameters\": ...}`, not Chat Completions' `function` object)",
                    None => "",
                };
                ApiError::bad("tools", format!("`tools[{i}].name` is required{hint}"))
            })?;
            if t.get("strict").is_some_and(|s| !s.is_null() && !s.is_boolean()) {
                return Err(ApiError::bad(
                    "tools",
                    format!("`tools[{i}].strict` must be a boolean"),
                ));
            }
            Ok(FunctionSpec {
                name: name.to_string(),
                description: t
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                parameters: t
                    .get("parameters")
                    .filter(|p| !p.is_null())
                    .cloned()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
            })
        })
        .collect()
}

/// `text.format`: `text`, `json_object`, or `json_schema` with its `schema` inline.
fn text_format(text: &Value) -> Result<Option<Value>, ApiError> {
    if !text.is_object() {
        return Err(ApiError::bad(
            "text",
            format!("`text` must be an object such as {{\"format\": {{\"type\": \"text\"}}}}, got {text}"),
        ));
    }
    if let Some(v) = text.get("verbosity").filter(|v| !v.is_null()) {
        if !matches!(v.as_str(), Some("low" | "medium" | "high")) {
            return Err(ApiError::bad(
                "text",
                format!("`text.verbosity` must be \"low\", \"medium\" or \"high\", got {v}"),
            ));
        }
    }
    let Some(format) = text.get("format").filter(|f| !f.is_null()) else {
        return Ok(None);
    };
    let schema = match format.get("type").and_then(Value::as_str) {
        Some("text") => return Ok(None),
        Some("json_object") => json!({"type": "object"}),
        Some("json_schema") => match (format.get("schema"), format.get("name")) {
            (_, name) if !name.is_some_and(Value::is_string) => {
                return Err(ApiError::bad(
                    "text",
                    "`text.format.name` is required (a string) with a json_schema format",
                ))
            }
            (_, _)
                if format
                    .get("strict")
                    .is_some_and(|s| !s.is_null() && !s.is_boolean()) =>
            {
                return Err(ApiError::bad(
                    "text",
                    "`text.format.strict` must be a boolean",
                ))
            }
            (Some(s), _) if s.is_object() => s.clone(),
            _ => {
                return Err(ApiError::bad(
                    "text",
                    "`text.format.schema` must be a JSON schema object",
                ))
            }
        },
        other => {
            return Err(ApiError::bad(
                "text",
                format!(
                "`text.format.type` must be \"text\", \"json_object\" or \"json_schema\", got {}",
                other.map_or_else(|| "nothing".to_string(), |t| format!("{t:?}"))
            ),
            ))
        }
    };
    Ok(Some(schema))
}

fn metadata(metadata: Option<Map<String, Value>>) -> Result<Map<String, Value>, ApiError> {
    let metadata = metadata.unwrap_or_default();
    let bad = |m: String| ApiError::bad("metadata", m);
    if metadata.len() > METADATA_PAIRS {
        return Err(bad(format!(
            "`metadata` holds at most {METADATA_PAIRS} pairs, got {}",
            metadata.len()
        )));
    }
    for (key, value) in &metadata {
        if key.chars().count() > METADATA_KEY_CHARS {
            return Err(bad(format!(
                "`metadata` keys are at most {METADATA_KEY_CHARS} characters"
            )));
        }
        match value.as_str() {
            Some(v) if v.chars().count() <= METADATA_VALUE_CHARS => {}
            _ => {
                return Err(bad(format!(
                "`metadata[{key:?}]` must be a string of at most {METADATA_VALUE_CHARS} characters"
            )))
            }
        }
    }
    Ok(metadata)
}

/// The stored conversation up to and including response `id`: its items, the chain's
/// ids, and where the last response's output starts among the items.
fn history(store: &Store, id: &str) -> Result<(Vec<Item>, Vec<String>, usize), ApiError> {
    let rows = store.chain(id).map_err(|e| match e {
        StoreError::NotFound(_) | StoreError::BrokenChain { .. } => ApiError::NotFound {
            message: match e {
                StoreError::NotFound(_) => {
                    format!("Previous response with id {} not found.", quoted_id(id))
                }
                e => format!(
                    "Previous response with id {} cannot be continued: {e}.",
                    quoted_id(id)
                ),
            },
            param: Some("previous_response_id"),
            code: "previous_response_not_found",
        },
        e => e.into(),
    })?;
    let mut items = Vec::new();
    let mut chain = Vec::with_capacity(rows.len());
    let mut last_output = 0;
    for row in rows {
        let corrupt = |e: serde_json::Error| {
            ApiError::Internal(format!("stored response {:?} is unreadable: {e}", row.id))
        };
        let input: Vec<Item> = serde_json::from_str(&row.input).map_err(corrupt)?;
        let output: Vec<Item> = serde_json::from_str(&row.output).map_err(corrupt)?;
        items.extend(input);
        last_output = items.len();
        items.extend(output);
        chain.push(row.id);
    }
    Ok((items, chain, last_output))
}

/// A whole answer as output items, and whether `max_output_tokens` cut it short: the
/// calls the reader finds in it (those finished before one cut short), or one message,
/// or nothing when it began a call that did not finish. Calls that parsed whole are
/// not cut, even where the limit came with their last token.
/// `message_id` is the id a stream already announced for the message. A thinking
/// model's `reasoning` item comes first.
pub fn output(
    reader: Option<&CallReader>,
    reasoning: Option<Item>,
    text: String,
    finish: FinishReason,
    message_id: Option<String>,
) -> (Vec<Item>, bool) {
    // An answer that ended while thinking has its reasoning and nothing else (as
    // OpenAI's does), not an empty message.
    if reasoning.is_some() && text.is_empty() {
        return (
            reasoning.into_iter().collect(),
            finish == FinishReason::Length,
        );
    }
    let (answer, cut) = answer_items(reader, text, finish, message_id);
    (reasoning.into_iter().chain(answer).collect(), cut)
}

/// [`output`]'s items after the reasoning.
fn answer_items(
    reader: Option<&CallReader>,
    text: String,
    finish: FinishReason,
    message_id: Option<String>,
) -> (Vec<Item>, bool) {
    let limited = finish == FinishReason::Length;
    if let Some((calls, whole)) = reader.and_then(|r| r.made_calls(&text)) {
        let cut = limited && !whole;
        let items = calls
            .into_iter()
            .map(|c| Item::FunctionCall {
                id: wire::new_id("fc"),
                call_id: c.id,
                name: c.name,
                arguments: c.arguments,
                status: "completed".into(),
            })
            .collect();
        return (items, cut);
    }
    let text = match reader {
        Some(reader) => reader.text_of(text),
        None => Some(text),
    };
    let Some(text) = text else {
        return (Vec::new(), limited);
    };
    let status = match finish {
        FinishReason::Length => "incomplete",
        FinishReason::Stop => "completed",
    };
    let mut item = Item::answer(text, status);
    if let (Item::Message { id, .. }, Some(given)) = (&mut item, message_id) {
        *id = given;
    }
    (vec![item], limited)
}

/// Fills in the end of `response` (its output, usage and status) and counts its calls.
pub fn finish(
    response: &mut ResponseObject,
    (output, cut): (Vec<Item>, bool),
    usage: Usage,
    metrics: &Metrics,
) {
    let calls = output
        .iter()
        .filter(|i| matches!(i, Item::FunctionCall { .. }))
        .count();
    metrics.tool_calls.inc_by(calls as u64);
    response.status = if cut { "incomplete" } else { "completed" }.into();
    response.completed_at = (!cut).then(crate::openai::unix_now);
    response.incomplete_details = cut.then(|| IncompleteDetails {
        reason: "max_output_tokens".into(),
    });
    response.output = output;
    response.usage = Some(usage.into());
}

/// Writes a finished response to the store (durably, before the client hears it ended).
/// A write that fails (a full disk, a database another process holds locked) loses only
/// the stored copy: the answer is still the client's, marked `store: false` (as a
/// `--no-store` server marks it), and the failure is logged.
pub async fn keep(keep: &Keep, response: &mut ResponseObject) {
    if let Err(e) = write(keep, response).await {
        tracing::error!(response_id = %response.id, error = %e, "the response could not be stored; answered as not stored");
        response.store = false;
    }
}

async fn write(keep: &Keep, response: &ResponseObject) -> Result<(), ApiError> {
    let unwritable = |e: serde_json::Error| ApiError::Internal(format!("cannot store: {e}"));
    let row = Row {
        id: response.id.clone(),
        previous_response_id: response.previous_response_id.clone(),
        created_at: response.created_at,
        input: serde_json::to_string(&keep.input).map_err(unwritable)?,
        response: serde_json::to_string(response).map_err(unwritable)?,
    };
    let store = keep.store.clone();
    let chain = keep.chain.clone();
    tokio::task::spawn_blocking(move || store.insert(&row, &chain))
        .await
        .map_err(|e| ApiError::Internal(format!("store write panicked: {e}")))?
        .map_err(ApiError::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer that ended while thinking is its reasoning alone, not beside an empty
    /// message; once the answer has text, the message follows the reasoning.
    #[test]
    fn an_answer_cut_while_thinking_is_its_reasoning_alone() {
        let thought = || Some(Item::reasoning("rs_1".into(), "hmm".into()));
        let (items, cut) = output(None, thought(), String::new(), FinishReason::Length, None);
        assert!(matches!(&items[..], [Item::Reasoning { .. }]), "{items:?}");
        assert!(cut);
        let (items, cut) = output(None, thought(), String::new(), FinishReason::Stop, None);
        assert!(matches!(&items[..], [Item::Reasoning { .. }]), "{items:?}");
        assert!(!cut);
        let (items, _) = output(None, thought(), "hi".into(), FinishReason::Stop, None);
        assert!(
            matches!(&items[..], [Item::Reasoning { .. }, Item::Message { .. }]),
            "{items:?}"
        );
        // Without reasoning, an empty answer is still a message.
        let (items, _) = output(None, None, String::new(), FinishReason::Stop, None);
        assert!(matches!(&items[..], [Item::Message { .. }]), "{items:?}");
    }
}
