//! A thinking model's reasoning, returned apart from its answer, end to end: the real
//! default model behind a thinking model's template (`tests/sdk/templates/thinking.jinja`,
//! Qwen3's form). The model reasons only as it was shown to: earlier assistant turns
//! carry the reasoning "abc" (sent as `reasoning_content`, which the template renders in
//! a `<think>` block), and greedy decoding copies the pattern, `<think>\nabc\n</think>\n\n`
//! then the answer, as a thinking model writes it.

use std::path::PathBuf;

use crate::common::{self, post, start, stream_events, wait_ready, Server};
use chorus_server::config::{Config, ReasoningFormat};
use serde_json::{json, Value};

fn template() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk/templates/thinking.jinja")
}

async fn thinking_server(format: ReasoningFormat) -> Server {
    let server = start(Config {
        chat_template: Some(template()),
        reasoning_format: format,
        kv_cache_mb: 256,
        ..Config::defaults()
    });
    wait_ready(&server).await;
    server
}

/// Two turns that reasoned "abc" and answered "Done.", then the question again.
fn history() -> Value {
    let turn = json!({"role": "assistant", "reasoning_content": "abc", "content": "Done."});
    let ask = json!({"role": "user", "content": "Say done."});
    json!([ask, turn, ask, turn, ask])
}

fn body(extra: Value) -> Value {
    let mut body = json!({"messages": history(), "max_tokens": 60, "temperature": 0});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    body
}

async fn message(url: &str, extra: Value) -> Value {
    let (status, reply) = post(url, "/v1/chat/completions", &body(extra)).await;
    assert_eq!(status, 200, "{reply}");
    reply["choices"][0]["message"].clone()
}

#[tokio::test]
async fn reasoning_is_returned_apart_from_the_answer_streamed_or_not() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    // The model opens the block itself, or the template opened it (DeepSeek-R1's way).
    for extra in [
        json!({}),
        json!({"chat_template_kwargs": {"open_think": true}}),
    ] {
        let m = message(&server, extra.clone()).await;
        assert_eq!(m["reasoning_content"], "abc", "{extra}: {m}");
        assert_eq!(m["content"], "Done.", "{extra}: {m}");

        let mut streamed = extra.clone();
        streamed["stream"] = json!(true);
        let events = stream_events(&server, "/v1/chat/completions", &body(streamed)).await;
        let (mut reasoning, mut content) = (String::new(), String::new());
        for e in events.iter().filter(|e| *e != "[DONE]") {
            let chunk: Value = serde_json::from_str(e).expect("a JSON chunk");
            let delta = &chunk["choices"][0]["delta"];
            reasoning.push_str(delta["reasoning_content"].as_str().unwrap_or_default());
            content.push_str(delta["content"].as_str().unwrap_or_default());
            // No piece of a tag ever reaches the client, in either part.
            for part in [&delta["reasoning_content"], &delta["content"]] {
                let text = part.as_str().unwrap_or_default();
                assert!(!text.contains('<') && !text.contains('>'), "{extra}: {e}");
            }
        }
        assert_eq!((reasoning.as_str(), content.as_str()), ("abc", "Done."));
    }
    // A model told not to think (Qwen3's `enable_thinking: false`) has no reasoning.
    let m = message(
        &server,
        json!({"chat_template_kwargs": {"enable_thinking": false}}),
    )
    .await;
    assert!(m.get("reasoning_content").is_none(), "{m}");
    // An effort is no switch for it: the refusal says what is.
    for (path, field) in [
        ("/v1/chat/completions", json!({"reasoning_effort": "none"})),
        (
            "/v1/responses",
            json!({"input": "Hi", "reasoning": {"effort": "low"}}),
        ),
    ] {
        let request = match path {
            "/v1/responses" => field,
            _ => body(field),
        };
        let (status, e) = post(&server, path, &request).await;
        assert_eq!(status, 400, "{e}");
        let said = e["error"]["message"].as_str().unwrap_or_default();
        assert!(said.contains("enable_thinking"), "{e}");
    }
}

/// Structured output and forced calls hold the answer after the block, not the
/// reasoning: held from the first token, the model could not have reasoned.
#[tokio::test]
async fn a_constraint_holds_the_answer_after_the_reasoning() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    let schema = json!({"type": "object", "properties": {"word": {"type": "string", "maxLength": 8}},
                        "required": ["word"], "additionalProperties": false});
    let format = json!({"type": "json_schema", "json_schema": {"name": "w", "schema": schema}});
    for open in [false, true] {
        let kwargs = json!({"open_think": open});
        let m = message(
            &server,
            json!({"response_format": format, "chat_template_kwargs": kwargs}),
        )
        .await;
        assert_eq!(m["reasoning_content"], "abc", "{m}");
        let answer: Value =
            serde_json::from_str(m["content"].as_str().unwrap_or_default()).expect("JSON");
        assert!(answer["word"].is_string(), "{m}");
        assert_eq!(answer.as_object().map(|o| o.len()), Some(1), "{m}");
    }
    let tool = json!({"type": "function", "function": {"name": "say", "parameters": schema}});
    let m = message(
        &server,
        json!({"tools": [tool], "tool_choice": "required", "parallel_tool_calls": false}),
    )
    .await;
    assert_eq!(m["reasoning_content"], "abc", "{m}");
    assert_eq!(m["content"], Value::Null, "{m}");
    assert_eq!(m["tool_calls"][0]["function"]["name"], "say", "{m}");
    let args = m["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap_or_default();
    let args: Value = serde_json::from_str(args).expect("JSON arguments");
    assert!(args["word"].is_string(), "{m}");
}

/// With `tool_choice: "auto"` too: an answer that reasons, then calls, has its calls held
/// (free text could otherwise have taken the block and the calls with it). The history
/// calls with other arguments than the schema's, and the model would copy them.
#[tokio::test]
async fn calls_after_reasoning_are_held_with_tool_choice_auto() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}},
                        "required": ["city"]});
    let tools: Vec<Value> = ["get_weather", "get_time"]
        .iter()
        .map(|name| json!({"type": "function", "function": {"name": name, "parameters": schema}}))
        .collect();
    let mut messages = Vec::new();
    for (i, city) in ["Paris", "Rome", "Oslo"].iter().enumerate() {
        let calls: Vec<Value> = (0..2)
            .map(|j| {
                let arguments = json!({"town": city, "units": 7}).to_string();
                json!({"id": format!("c{i}{j}"), "type": "function",
                       "function": {"name": "get_weather", "arguments": arguments}})
            })
            .collect();
        messages.push(json!({"role": "user", "content": format!("Weather in {city}?")}));
        messages.push(json!({"role": "assistant", "content": "",
                             "reasoning_content": "I need the tools.", "tool_calls": calls}));
        for j in 0..2 {
            messages.push(json!({"role": "tool", "tool_call_id": format!("c{i}{j}"),
                                 "content": "Sunny."}));
        }
    }
    messages.push(json!({"role": "user", "content": "Weather in Berlin?"}));
    let request = json!({"messages": messages, "tools": tools, "tool_choice": "auto",
                         "parallel_tool_calls": false, "max_tokens": 150, "temperature": 0});
    let (status, reply) = post(&server, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{reply}");
    let m = &reply["choices"][0]["message"];
    assert_eq!(m["reasoning_content"], "I need the tools.", "{m}");
    let calls = m["tool_calls"].as_array().cloned().unwrap_or_default();
    assert_eq!(calls.len(), 1, "one call without parallel_tool_calls: {m}");
    let args = calls[0]["function"]["arguments"]
        .as_str()
        .unwrap_or_default();
    let args: Value = serde_json::from_str(args).expect("JSON arguments");
    let keys: Vec<&String> = args
        .as_object()
        .map(|o| o.keys().collect())
        .unwrap_or_default();
    assert_eq!(keys, ["city"], "{m}");
}

/// Every token's log-probability is reported once, streamed as unstreamed, also those
/// of a tag the answer ended in (held by the splitter, then dropped as text). The usage
/// counts as reasoning the tokens up to the one that closes the block (all of them when
/// the answer ends inside it), streamed as unstreamed.
#[tokio::test]
async fn streamed_logprobs_count_every_token_also_of_a_held_tag() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    for extra in [
        json!({"stop": ["Done"]}),
        json!({"max_tokens": 4}),
        json!({"max_tokens": 10}),
    ] {
        let mut request = body(json!({"logprobs": true}));
        if let Some(b) = request.as_object_mut() {
            b.extend(extra.as_object().cloned().unwrap_or_default());
        }
        let (status, reply) = post(&server, "/v1/chat/completions", &request).await;
        assert_eq!(status, 200, "{reply}");
        let whole: Vec<Value> = reply["choices"][0]["logprobs"]["content"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let mut text = String::new();
        let closed_at = whole.iter().position(|t| {
            text.push_str(t["token"].as_str().unwrap_or_default());
            text.contains("</think>")
        });
        let usage = &reply["usage"];
        let reasoning_tokens = match closed_at {
            Some(at) => at as u64 + 1,
            None => usage["completion_tokens"].as_u64().unwrap_or_default(),
        };
        assert_eq!(
            usage["completion_tokens_details"]["reasoning_tokens"], reasoning_tokens,
            "{extra}: {reply}"
        );
        assert!(reasoning_tokens > 0, "{extra}: {reply}");

        request["stream"] = json!(true);
        request["stream_options"] = json!({"include_usage": true});
        let chunks: Vec<Value> = stream_events(&server, "/v1/chat/completions", &request)
            .await
            .iter()
            .filter(|e| *e != "[DONE]")
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .collect();
        let streamed: Vec<Value> = (chunks.iter())
            .flat_map(|c| {
                c["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(streamed, whole, "{extra}");
        assert!(!whole.is_empty(), "{extra}");
        let last = chunks.last().cloned().unwrap_or_default();
        for field in ["completion_tokens", "completion_tokens_details"] {
            assert_eq!(last["usage"][field], usage[field], "{extra}: {last}");
        }
    }
}

/// `reasoning` is taken as `reasoning_content` (given both, `reasoning_content`); a
/// continued answer that has begun after its block opens no new one.
#[tokio::test]
async fn reasoning_fields_and_continued_answers() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    let tokens = |messages: Value| {
        let url = server.to_string();
        async move { post(&url, "/tokenize", &json!({"messages": messages})).await }
    };
    let ask = json!({"role": "user", "content": "Say done."});
    let said = |fields: Value| {
        let mut m = json!({"role": "assistant", "content": "Done."});
        if let Some(o) = m.as_object_mut() {
            o.extend(fields.as_object().cloned().unwrap_or_default());
        }
        json!([ask, m, ask])
    };
    let (status, named) = tokens(said(json!({"reasoning_content": "abc"}))).await;
    assert_eq!(status, 200, "{named}");
    for other in [
        json!({"reasoning": "abc"}),
        json!({"reasoning_content": "abc", "reasoning": "xyz"}),
    ] {
        let (status, got) = tokens(said(other.clone())).await;
        assert_eq!(status, 200, "{other}: {got}");
        assert_eq!(got["tokens"], named["tokens"], "{other}");
    }
    // Continued after its block: the rest is answer, and a constraint holds all of it
    // (no new block may open: the model, shown blocks, would write one).
    let mut history = history().as_array().cloned().unwrap_or_default();
    history.push(json!({"role": "assistant", "reasoning_content": "abc", "content": "{"}));
    let request = json!({"messages": history, "continue_final_message": true,
                         "add_generation_prompt": false, "max_tokens": 30, "temperature": 0,
                         "response_format": {"type": "json_object"}});
    let (status, reply) = post(&server, "/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{reply}");
    let m = &reply["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{m}");
    assert!(
        m["content"].as_str().is_some_and(|c| !c.contains("think")),
        "{m}"
    );
}

#[tokio::test]
async fn responses_give_reasoning_its_own_item_and_take_it_back() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::Auto).await;
    let input: Vec<Value> = history()
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|m| match m["role"].as_str() {
            // As a Responses client sends it back: a reasoning item, then the message.
            Some("assistant") => vec![
                json!({"type": "reasoning", "summary": [],
                       "content": [{"type": "reasoning_text", "text": m["reasoning_content"]}]}),
                json!({"role": "assistant", "content": m["content"]}),
            ],
            _ => vec![m.clone()],
        })
        .collect();
    let request = json!({"input": input, "max_output_tokens": 60, "temperature": 0});
    let (status, r) = post(&server, "/v1/responses", &request).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["output"][0]["type"], "reasoning", "{r}");
    assert_eq!(r["output"][0]["content"][0]["text"], "abc", "{r}");
    assert_eq!(r["output"][1]["type"], "message", "{r}");
    assert_eq!(r["output"][1]["content"][0]["text"], "Done.", "{r}");
    // The same conversation in chat reasons the same tokens.
    let (_, chat) = post(&server, "/v1/chat/completions", &body(json!({}))).await;
    let reasoning_tokens = &chat["usage"]["completion_tokens_details"]["reasoning_tokens"];
    assert!(reasoning_tokens.as_u64().is_some_and(|n| n > 0), "{chat}");
    assert_eq!(
        &r["usage"]["output_tokens_details"]["reasoning_tokens"], reasoning_tokens,
        "{r}"
    );

    // The stored reasoning item goes back into the next turn as that turn's reasoning.
    let next = json!({"previous_response_id": r["id"], "input": "Say done.",
                      "max_output_tokens": 60, "temperature": 0});
    let (status, r2) = post(&server, "/v1/responses", &next).await;
    assert_eq!(status, 200, "{r2}");
    assert_eq!(r2["output"][0]["content"][0]["text"], "abc", "{r2}");
    let mut chat = history().as_array().cloned().unwrap_or_default();
    chat.extend([
        json!({"role": "assistant", "reasoning_content": "abc", "content": "Done."}),
        json!({"role": "user", "content": "Say done."}),
    ]);
    let count = |path: &'static str, body: Value| {
        let url = server.to_string();
        async move { post(&url, path, &body).await.1 }
    };
    let tokens = count("/tokenize", json!({"messages": chat})).await;
    let counted = count(
        "/v1/responses/input_tokens",
        json!({"previous_response_id": r["id"], "input": "Say done."}),
    )
    .await;
    assert_eq!(
        counted["input_tokens"], tokens["count"],
        "{counted} {tokens}"
    );

    // Streamed: the reasoning item's events, then the message's at output index 1.
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let r = common::send(&server, "/v1/responses", &streamed).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("a body");
    let events: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    let kinds: Vec<(String, Value)> = events
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).expect("a JSON event"))
        .map(|e| {
            (
                e["type"].as_str().unwrap_or("").to_string(),
                e["output_index"].clone(),
            )
        })
        .collect();
    let reasoning: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter(|e| e["type"] == "response.reasoning_text.delta")
        .filter_map(|e| e["delta"].as_str().map(str::to_string))
        .collect();
    assert_eq!(reasoning, "abc");
    let at = |kind: &str| kinds.iter().position(|(k, _)| k == kind);
    let (Some(reasoning_done), Some(text)) = (
        at("response.reasoning_text.done"),
        at("response.output_text.delta"),
    ) else {
        panic!("{kinds:?}")
    };
    assert!(reasoning_done < text, "{kinds:?}");
    assert_eq!(kinds[text].1, 1, "{kinds:?}");
    let completed = (events.iter())
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .find(|e| e["type"] == "response.completed")
        .unwrap_or_default();
    assert_eq!(
        &completed["response"]["usage"]["output_tokens_details"]["reasoning_tokens"],
        reasoning_tokens,
        "{completed}"
    );
}

/// `--reasoning-format none`: the block is text like any other, in the answer.
#[tokio::test]
async fn with_reasoning_format_none_the_block_stays_in_the_answer() {
    let _turn = common::together().await;
    let server = thinking_server(ReasoningFormat::None).await;
    let (status, reply) = post(&server, "/v1/chat/completions", &body(json!({}))).await;
    assert_eq!(status, 200, "{reply}");
    let m = &reply["choices"][0]["message"];
    assert!(m.get("reasoning_content").is_none(), "{m}");
    assert_eq!(m["content"], "<think>\nabc\n</think>\n\nDone.", "{m}");
    // No reasoning is counted where none is told apart.
    let usage = &reply["usage"];
    assert!(usage.get("completion_tokens_details").is_none(), "{usage}");
}
