//! One streamed chat completion or response, timed from the client's side.

use std::time::Instant;

use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::sse::SseParser;
use crate::stats::RequestRecord;

/// What every request of a run asks for.
#[derive(Debug, Clone)]
pub struct RequestShape {
    pub model: String,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub temperature: f64,
    /// Offer a weather-lookup function and require a call (`--tool-call`).
    pub tool_call: bool,
    pub api: Api,
}

/// Which endpoint carries the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `/v1/chat/completions`: each turn resends the whole history.
    Chat,
    /// `/v1/responses`: each turn sends its new message and `previous_response_id`.
    Responses,
}

/// The function `--tool-call` offers.
pub fn weather_tool() -> Value {
    json!([{"type": "function", "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                // Bounded, so a small model's call ends well inside --max-tokens.
                "city": {"type": "string", "maxLength": 40},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    }}])
}

/// The outcome of one request: its timings and, for multi-turn runs, the reply text
/// (and with `--api responses`, the id the next turn continues).
pub struct Reply {
    pub record: RequestRecord,
    pub text: String,
    pub response_id: Option<String>,
}

/// Sends `messages` to `{base}/v1/chat/completions` with streaming and usage on.
pub async fn chat(
    http: &reqwest::Client,
    base: &str,
    shape: &RequestShape,
    messages: &[Value],
) -> Reply {
    let mut body = json!({
        "model": shape.model,
        "messages": messages,
        "max_tokens": shape.max_tokens,
        "temperature": shape.temperature,
        "ignore_eos": shape.ignore_eos,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if shape.tool_call {
        body["tools"] = weather_tool();
        body["tool_choice"] = json!("required");
        body["parallel_tool_calls"] = json!(false);
    }
    let started = Instant::now();
    let mut record = RequestRecord::default();
    let mut text = String::new();
    let result = stream(http, base, &body, started, &mut record, &mut text).await;
    finish(record, text, None, started, result, shape.tool_call)
}

/// Sends one turn to `{base}/v1/responses` with streaming: `user`'s message, continuing
/// `previous` (stored responses), with `instructions` as the system prompt.
pub async fn respond(
    http: &reqwest::Client,
    base: &str,
    shape: &RequestShape,
    instructions: Option<&str>,
    user: &str,
    previous: Option<&str>,
) -> Reply {
    let mut body = json!({
        "model": shape.model,
        "input": user,
        "max_output_tokens": shape.max_tokens,
        "temperature": shape.temperature,
        "stream": true,
    });
    if let Some(i) = instructions {
        body["instructions"] = json!(i);
    }
    if let Some(p) = previous {
        body["previous_response_id"] = json!(p);
    }
    if shape.tool_call {
        body["tools"] = json!([{"type": "function", "name": "get_weather",
            "parameters": weather_tool()[0]["function"]["parameters"]}]);
        body["tool_choice"] = json!("required");
        body["parallel_tool_calls"] = json!(false);
    }
    let started = Instant::now();
    let mut record = RequestRecord::default();
    let mut text = String::new();
    let mut id = None;
    let result = stream_events(http, base, &body, started, &mut record, &mut text, &mut id).await;
    finish(record, text, id, started, result, shape.tool_call)
}

fn finish(
    mut record: RequestRecord,
    text: String,
    response_id: Option<String>,
    started: Instant,
    result: Result<(), String>,
    want_call: bool,
) -> Reply {
    record.e2e = started.elapsed().as_secs_f64();
    if let Err(e) = result {
        record.error = Some(e);
    } else if record.output_tokens == 0 {
        record.error = Some("the stream ended without usage".into());
    } else if want_call && record.calls == 0 {
        // The server drops a call cut short, so an answer without one is a failure.
        record.error = Some("no function call in the answer (cut by --max-tokens?)".into());
    }
    Reply {
        record,
        text,
        response_id,
    }
}

/// Posts `body` to `path`, recording its size and status; the response when it is a
/// success.
async fn post(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    body: &Value,
    record: &mut RequestRecord,
) -> Result<reqwest::Response, String> {
    let bytes = serde_json::to_vec(body).map_err(|e| e.to_string())?;
    record.request_bytes = bytes.len();
    let response = http
        .post(format!("{}{path}", base.trim_end_matches('/')))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(bytes)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    record.status = Some(status.as_u16());
    if !status.is_success() {
        let detail = response.text().await.unwrap_or_default();
        return Err(format!("HTTP {status}: {}", detail.trim()));
    }
    Ok(response)
}

/// Hands each SSE data payload of `response`, with its arrival time (seconds since
/// `started`), to `on_data` until the body ends or `on_data` says the stream is complete
/// (`Ok(true)`); whether it said so.
async fn read_sse(
    response: reqwest::Response,
    started: Instant,
    mut on_data: impl FnMut(f64, &str) -> Result<bool, String>,
) -> Result<bool, String> {
    let mut parser = SseParser::new();
    let mut bytes = response.bytes_stream();
    while let Some(piece) = bytes.next().await {
        let piece = piece.map_err(|e| e.to_string())?;
        let at = started.elapsed().as_secs_f64();
        for data in parser.push(&piece) {
            if on_data(at, &data)? {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// The typed events of a streamed response.
async fn stream_events(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    started: Instant,
    record: &mut RequestRecord,
    text: &mut String,
    id: &mut Option<String>,
) -> Result<(), String> {
    let response = post(http, base, "/v1/responses", body, record).await?;
    let ended = read_sse(response, started, |at, data| {
        let event: Value = serde_json::from_str(data).map_err(|e| format!("bad event: {e}"))?;
        match event["type"].as_str().unwrap_or_default() {
            "response.output_text.delta" => {
                let delta = event["delta"].as_str().unwrap_or_default();
                if !delta.is_empty() {
                    record.chunk_times.push(at);
                    text.push_str(delta);
                }
            }
            "response.function_call_arguments.delta" => record.chunk_times.push(at),
            "response.output_item.added" if event["item"]["type"] == "function_call" => {
                record.calls += 1
            }
            "response.failed" => {
                return Err(format!("response.failed: {}", event["response"]["error"]))
            }
            "response.completed" | "response.incomplete" => {
                let r = &event["response"];
                let usage = &r["usage"];
                let count = |v: &Value| v.as_u64().unwrap_or(0) as usize;
                record.output_tokens = count(&usage["output_tokens"]);
                record.prompt_tokens = count(&usage["input_tokens"]);
                record.cached_tokens = count(&usage["input_tokens_details"]["cached_tokens"]);
                *id = r["id"].as_str().map(str::to_string);
                return Ok(true);
            }
            _ => {}
        }
        Ok(false)
    })
    .await?;
    match ended {
        true => Ok(()),
        false => Err("the stream ended before response.completed".into()),
    }
}

async fn stream(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    started: Instant,
    record: &mut RequestRecord,
    text: &mut String,
) -> Result<(), String> {
    let response = post(http, base, "/v1/chat/completions", body, record).await?;
    let done = read_sse(response, started, |at, data| {
        if data == "[DONE]" {
            return Ok(true);
        }
        let chunk: Value = serde_json::from_str(data).map_err(|e| format!("bad chunk: {e}"))?;
        if let Some(err) = chunk.get("error") {
            return Err(format!("error event: {err}"));
        }
        let delta = &chunk["choices"][0]["delta"];
        if let Some(content) = delta["content"].as_str() {
            if !content.is_empty() {
                record.chunk_times.push(at);
                text.push_str(content);
            }
        }
        // A function call's deltas count as output arriving too.
        if let Some(calls) = delta["tool_calls"].as_array().filter(|c| !c.is_empty()) {
            record.chunk_times.push(at);
            record.calls += calls.iter().filter(|c| c["id"].is_string()).count();
        }
        if let Some(usage) = chunk.get("usage").filter(|u| !u.is_null()) {
            let count = |v: &Value| v.as_u64().unwrap_or(0) as usize;
            record.output_tokens = count(&usage["completion_tokens"]);
            record.prompt_tokens = count(&usage["prompt_tokens"]);
            record.cached_tokens = count(&usage["prompt_tokens_details"]["cached_tokens"]);
        }
        Ok(false)
    })
    .await?;
    match done {
        true => Ok(()),
        false => Err("the stream ended before [DONE]".into()),
    }
}

/// The served model ids of `{base}/v1/models`.
pub async fn models(http: &reqwest::Client, base: &str) -> Result<Vec<String>, String> {
    let url = format!("{}/v1/models", base.trim_end_matches('/'));
    let list: Value = http
        .get(&url)
        .send()
        .await
        .and_then(reqwest::Response::error_for_status)
        .map_err(|e| format!("{url}: {e}"))?
        .json()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(list["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["id"].as_str().map(str::to_string))
        .collect())
}
