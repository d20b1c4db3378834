//! The HTTP contract, against a real server with the real default model.

use crate::common::{self, base, chat, get_json, metrics, post, stream_events};
use serde_json::{json, Value};

#[tokio::test]
async fn chat_non_stream_reports_usage_of_the_reference_prompt() {
    let _turn = common::together().await;
    let url = base().await;
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .header("x-request-id", "test-request-42")
        .json(&chat(
            "What is the capital of France?",
            json!({"max_tokens": 12, "temperature": 0}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-request-id"], "test-request-42");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "smollm2-135m-instruct");
    assert_eq!(v["usage"]["prompt_tokens"], 37);
    let choice = &v["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let content = choice["message"]["content"].as_str().unwrap();
    assert!(content.contains("Paris"), "answer: {content:?}");
    let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    assert_eq!(v["usage"]["total_tokens"], 37 + completion);
}

#[tokio::test]
async fn stream_with_usage_follows_the_openai_shape() {
    let _turn = common::together().await;
    let url = base().await;
    let body = chat(
        "Count from one to ten.",
        json!({"stream": true, "max_tokens": 10, "ignore_eos": true, "stream_options": {"include_usage": true}}),
    );
    let events = stream_events(&url, "/v1/chat/completions", &body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.as_object().unwrap().contains_key("usage"),
            "usage key missing: {c}"
        );
    }
    // First: the role. Then content only. Then `delta: {}` with the finish reason.
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_chunk, rest) = chunks.split_last().unwrap();
    let (finish, content) = rest.split_last().unwrap();
    assert_eq!(finish["choices"][0]["delta"], json!({}));
    assert_eq!(finish["choices"][0]["finish_reason"], "length");
    assert!(finish["usage"].is_null());
    let mut text = String::new();
    for c in &content[1..] {
        assert!(c["choices"][0]["delta"].get("role").is_none());
        assert!(c["choices"][0]["finish_reason"].is_null());
        assert!(c["usage"].is_null());
        text.push_str(c["choices"][0]["delta"]["content"].as_str().unwrap());
    }
    assert!(!text.is_empty());
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 10);
}

#[tokio::test]
async fn stream_without_usage_has_no_usage_key() {
    let _turn = common::together().await;
    let url = base().await;
    let body = chat("Hi!", json!({"stream": true, "max_tokens": 4}));
    let events = stream_events(&url, "/v1/chat/completions", &body).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    for e in &events[..events.len() - 1] {
        let c: Value = serde_json::from_str(e).unwrap();
        assert!(c.get("usage").is_none(), "unexpected usage: {c}");
        assert_eq!(c["choices"].as_array().unwrap().len(), 1);
    }
}

#[tokio::test]
async fn completions_stop_string_is_not_returned() {
    let _turn = common::together().await;
    let url = base().await;
    let body =
        json!({"prompt": "1, 2, 3, 4, 5,", "max_tokens": 20, "temperature": 0, "stop": [" 8"]});
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "text: {text:?}");
    assert!(text.starts_with(" 6, 7,"), "text: {text:?}");
    assert!(!text.contains('8'), "text: {text:?}");
}

#[tokio::test]
async fn same_seed_same_text() {
    let _turn = common::together().await;
    let url = base().await;
    let body = chat(
        "Tell me a story.",
        json!({"max_tokens": 24, "temperature": 1.0, "seed": 1234}),
    );
    let (_, a) = post(&url, "/v1/chat/completions", &body).await;
    let (_, b) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(
        a["choices"][0]["message"]["content"],
        b["choices"][0]["message"]["content"]
    );
    let other = chat(
        "Tell me a story.",
        json!({"max_tokens": 24, "temperature": 1.0, "seed": 99}),
    );
    let (_, c) = post(&url, "/v1/chat/completions", &other).await;
    assert_ne!(
        a["choices"][0]["message"]["content"],
        c["choices"][0]["message"]["content"]
    );
}

#[tokio::test]
async fn bad_requests_get_the_error_envelope_and_the_server_carries_on() {
    let _turn = common::together().await;
    let url = base().await;
    let client = reqwest::Client::new();
    let long = "word ".repeat(9000);
    // (body, content type, status, param)
    let cases: Vec<(String, &str, u16, Option<&str>)> = vec![
        ("{not json".into(), "application/json", 400, None),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]"#.into(),
            "application/json",
            400,
            None,
        ),
        (
            r#"{"model": "smollm2-135m-instruct"}"#.into(),
            "application/json",
            400,
            Some("messages"),
        ),
        (
            r#"{"messages": "hello"}"#.into(),
            "application/json",
            400,
            Some("messages"),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "hi"}]}"#.into(),
            "text/plain",
            400,
            None,
        ),
        (
            r#"{"messages": []}"#.into(),
            "application/json",
            400,
            Some("messages"),
        ),
        (
            r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#.into(),
            "application/json",
            400,
            Some("messages"),
        ),
        (
            chat("hi", json!({"temperature": -1})).to_string(),
            "application/json",
            400,
            Some("temperature"),
        ),
        (
            chat("hi", json!({"temperature": "hot"})).to_string(),
            "application/json",
            400,
            Some("temperature"),
        ),
        // Sampling fields are read flattened, where serde's message loses their names.
        (
            chat("hi", json!({"max_tokens": "4"})).to_string(),
            "application/json",
            400,
            Some("max_tokens"),
        ),
        (
            chat("hi", json!({"seed": 1e30})).to_string(),
            "application/json",
            400,
            Some("seed"),
        ),
        (
            chat("hi", json!({"stream": "yes"})).to_string(),
            "application/json",
            400,
            Some("stream"),
        ),
        (
            chat("hi", json!({"top_p": 1.5})).to_string(),
            "application/json",
            400,
            Some("top_p"),
        ),
        (
            chat("hi", json!({"top_p": 0})).to_string(),
            "application/json",
            400,
            Some("top_p"),
        ),
        (
            chat("hi", json!({"max_tokens": 0})).to_string(),
            "application/json",
            400,
            Some("max_tokens"),
        ),
        (
            chat("hi", json!({"max_tokens": -5})).to_string(),
            "application/json",
            400,
            Some("max_tokens"),
        ),
        (
            chat("hi", json!({"max_completion_tokens": 0})).to_string(),
            "application/json",
            400,
            Some("max_completion_tokens"),
        ),
        (
            chat("hi", json!({"n": 99})).to_string(),
            "application/json",
            400,
            Some("n"),
        ),
        (
            chat("hi", json!({"stop": vec!["x"; 100]})).to_string(),
            "application/json",
            400,
            Some("stop"),
        ),
        (
            chat(&long, json!({})).to_string(),
            "application/json",
            400,
            Some("messages"),
        ),
        (
            chat("hi", json!({"model": "gpt-4"})).to_string(),
            "application/json",
            404,
            Some("model"),
        ),
    ];
    for (body, content_type, status, param) in cases {
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", content_type)
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let got = r.status().as_u16();
        let v: Value = r
            .json()
            .await
            .unwrap_or_else(|e| panic!("non-JSON error for {body:.80}: {e}"));
        assert_eq!(got, status, "status for {body:.80}: {v}");
        let err = &v["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{v}"
        );
        assert!(err["type"].is_string(), "{v}");
        assert!(
            err.as_object().unwrap().contains_key("param")
                && err.as_object().unwrap().contains_key("code")
        );
        if let Some(p) = param {
            assert_eq!(err["param"], p, "param for {body:.80}: {v}");
        }
    }
    // The unknown-model error names what is served.
    let (_, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("hi", json!({"model": "gpt-4"})),
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("smollm2-135m-instruct"));
    // Unknown routes get the envelope too.
    let r = client
        .get(format!("{url}/v1/nothing"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let v: Value = r.json().await.unwrap();
    assert!(v["error"]["message"].is_string());
    // And a good request still works.
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("Hello", json!({"max_tokens": 3})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

#[tokio::test]
async fn null_and_unknown_fields_are_tolerated() {
    let _turn = common::together().await;
    let url = base().await;
    let body = json!({
        "model": null, "messages": [{"role": "system", "content": null}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "temperature": null, "top_p": null, "max_tokens": null, "max_completion_tokens": 3, "stop": "\n\n\n",
        "seed": null, "user": "someone", "n": 1, "logprobs": false, "top_logprobs": null, "presence_penalty": 0,
        "frequency_penalty": null, "ignore_eos": true, "stream": false, "stream_options": null, "some_future_field": {"x": 1}
    });
    let (status, v) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
}

/// A `min_tokens` over its bound says which bound: the client's own `max_tokens`, or
/// the context left when it set none (it named a `max_tokens` the client never sent).
#[tokio::test]
async fn min_tokens_over_its_bound_names_the_bound() {
    let _turn = common::together().await;
    let url = base().await;
    let cases = [
        (json!({"max_tokens": 5, "min_tokens": 9}), "`max_tokens` 5"),
        (
            json!({"max_completion_tokens": 5, "min_tokens": 9}),
            "`max_completion_tokens` 5",
        ),
        (
            json!({"min_tokens": 1_000_000}),
            "the context left after the prompt",
        ),
        (
            json!({"max_tokens": 1_000_000, "min_tokens": 1_000_000}),
            "the context left after the prompt",
        ),
    ];
    for (fields, bound) in cases {
        let (status, v) = post(&url, "/v1/chat/completions", &chat("Hi", fields)).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["param"], "min_tokens", "{v}");
        let message = v["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(bound), "{message}");
    }
}

#[tokio::test]
async fn fields_asking_for_what_is_not_served_are_refused_by_name() {
    let _turn = common::together().await;
    let url = base().await;
    let refused = [
        (json!({"modalities": ["text", "audio"]}), "modalities"),
        (
            json!({"audio": {"voice": "alloy", "format": "wav"}}),
            "audio",
        ),
        (json!({"web_search_options": {}}), "web_search_options"),
        (json!({"reasoning_effort": "high"}), "reasoning_effort"),
        (
            json!({"functions": [{"name": "f", "parameters": {}}]}),
            "functions",
        ),
        (json!({"function_call": "auto"}), "function_call"),
        // vLLM's chat echo: silently dropped, the answer lacked the text it promised.
        (json!({"echo": true}), "echo"),
    ];
    for (fields, param) in refused {
        let (status, v) = post(&url, "/v1/chat/completions", &chat("Hi", fields)).await;
        assert_eq!(status, 400, "{param}: {v}");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
    // What asks for nothing beyond text is served.
    let fields = json!({"modalities": ["text"], "reasoning_effort": "none", "audio": null,
        "web_search_options": null, "functions": null, "tool_choice": "auto", "max_tokens": 2,
        "guided_json": null, "grammar": null, "echo": false});
    let (status, v) = post(&url, "/v1/chat/completions", &chat("Hi", fields)).await;
    assert_eq!(status, 200, "{v}");
}

/// Other servers' constrained output is enforced as they enforce it: vLLM's `guided_*`
/// and `structured_outputs`, llama.cpp's `json_schema`, SGLang's `regex`, on either
/// endpoint; a grammar, two constraints at once, or a text rule beside tools are a 400
/// naming the field, as are chat's constraints sent to completions.
#[tokio::test]
async fn other_servers_constraint_fields_are_enforced_or_refused_by_name() {
    let _turn = common::together().await;
    let url = base().await;
    let question = "Is the sky blue? Answer in a word.";
    let schema = json!({"type": "object", "properties": {"n": {"type": "integer"}},
        "required": ["n"], "additionalProperties": false});
    let choices = json!(["yes / sure", "no"]);
    for seed in 0..3 {
        // The answer's text when `field` is `value`.
        let answer = |field: &'static str, value: Value| {
            let mut body = json!({"max_tokens": 24, "temperature": 1.0, "seed": seed});
            body[field] = value;
            let url = url.clone();
            async move {
                let (status, v) = post(&url, "/v1/chat/completions", &chat(question, body)).await;
                assert_eq!(status, 200, "{field}: {v}");
                let text = v["choices"][0]["message"]["content"].as_str();
                (text.unwrap_or_default().to_string(), v)
            }
        };
        for (field, value) in [
            ("guided_choice", choices.clone()),
            ("structured_outputs", json!({"choice": choices})),
        ] {
            let (text, v) = answer(field, value).await;
            assert!(text == "yes / sure" || text == "no", "{field}: {v}");
            assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
        }
        for field in ["guided_regex", "regex"] {
            let (text, v) = answer(field, json!("[0-9]{3}-[a-z]{2}")).await;
            let b = text.as_bytes();
            let shape = b.len() == 6
                && b[..3].iter().all(u8::is_ascii_digit)
                && b[3] == b'-'
                && b[4..].iter().all(u8::is_ascii_lowercase);
            assert!(shape, "{field}: {v}");
        }
        for (field, value) in [
            ("guided_json", schema.clone()),
            ("json_schema", json!(schema.to_string())),
            ("structured_outputs", json!({"json": schema})),
        ] {
            let (text, v) = answer(field, value).await;
            let parsed: Value =
                serde_json::from_str(&text).unwrap_or_else(|_| panic!("{field}: {v}"));
            let keys = parsed.as_object().map(|o| o.len());
            assert!(parsed["n"].is_i64() && keys == Some(1), "{v}");
        }
    }
    // Completions: every prompt of a batch is held to it.
    let body = json!({"prompt": ["The sky is", "Grass is"], "max_tokens": 5,
        "guided_choice": ["blue", "green"]});
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    for c in v["choices"].as_array().expect("choices") {
        assert!(c["text"] == "blue" || c["text"] == "green", "{v}");
    }
    let refused = [
        (
            "guided_grammar",
            json!({"guided_grammar": "root ::= \"a\""}),
        ),
        ("grammar", json!({"grammar": "root ::= \"a\""})),
        (
            "structured_outputs",
            json!({"structured_outputs": {"grammar": "root ::= \"a\""}}),
        ),
        ("guided_choice", json!({"guided_choice": []})),
        ("regex", json!({"guided_choice": ["a"], "regex": "a"})),
        (
            "guided_json",
            json!({"guided_json": schema, "response_format": {"type": "json_object"}}),
        ),
        (
            "guided_regex",
            json!({"guided_regex": "a+", "tools": [{"type": "function", "function": {"name": "f"}}]}),
        ),
    ];
    for (param, fields) in refused {
        let mut body = fields.clone();
        body["max_tokens"] = json!(2);
        let (status, v) = post(&url, "/v1/chat/completions", &chat("Hi", body)).await;
        assert_eq!((status, &v["error"]["param"]), (400, &json!(param)), "{v}");
    }
    for (field, value) in [
        ("response_format", json!({"type": "json_object"})),
        (
            "tools",
            json!([{"type": "function", "function": {"name": "f"}}]),
        ),
        ("grammar", json!("root ::= \"a\"")),
    ] {
        let mut body = json!({"prompt": "Hi", "max_tokens": 2});
        body[field] = value;
        let (status, v) = post(&url, "/v1/completions", &body).await;
        assert_eq!((status, &v["error"]["param"]), (400, &json!(field)), "{v}");
    }
    let body = json!({"prompt": "Hi", "max_tokens": 2, "response_format": {"type": "text"}});
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
}

/// `/tokenize` with `messages` counts what chat runs, whatever the fields that change how
/// the offered tools are shown (hidden by `"none"`, described with a JSON answer beside).
#[tokio::test]
async fn tokenize_counts_what_chat_runs_with_tools() {
    let _turn = common::together().await;
    let url = base().await;
    let tool = json!({"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}});
    let variants = [
        json!({}),
        json!({"tool_choice": "none"}),
        json!({"tool_choice": "required"}),
        json!({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}),
        json!({"response_format": {"type": "json_object"}}),
    ];
    let mut counts = Vec::new();
    for extra in variants {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, tokenized) = post(&url, "/tokenize", &body).await;
        assert_eq!(status, 200, "{extra}: {tokenized}");
        body["max_tokens"] = json!(1);
        let (status, chat) = post(&url, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{extra}: {chat}");
        assert_eq!(
            tokenized["count"], chat["usage"]["prompt_tokens"],
            "{extra}"
        );
        counts.push(tokenized["count"].as_u64().unwrap());
    }
    // The variants do render differently: the test compares something.
    assert!(
        counts[1] < counts[0] && counts[2] != counts[0] && counts[4] != counts[0],
        "{counts:?}"
    );
}

/// A key given twice is read at its last value, as Python's and JavaScript's JSON readers
/// (and so vLLM) read it; a value the sampler's 32-bit floats cannot hold is refused with
/// the value as sent.
#[tokio::test]
async fn a_key_given_twice_takes_its_last_value() {
    let _turn = common::together().await;
    let url = base().await;
    let client = reqwest::Client::new();
    let send = |body: &'static str| {
        client
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let r = send(r#"{"messages": [{"role": "user", "content": "hi"}], "ignore_eos": true, "max_tokens": 0, "max_tokens": 3}"#).await.unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    let r = send(
        r#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "max_tokens": 0}"#,
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 400);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["param"], "max_tokens", "{v}");
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("hi", json!({"top_p": 1e-300})),
    )
    .await;
    assert_eq!(status, 400);
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("got 1e-300, which is 0 as the sampler's 32-bit float"),
        "{message}"
    );
}

#[tokio::test]
async fn models_tokenize_and_health() {
    let _turn = common::together().await;
    let url = base().await;
    let v = get_json(&url, "/v1/models").await;
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["id"], "smollm2-135m-instruct");
    let r = reqwest::get(format!("{url}/v1/models/smollm2-135m-instruct"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("{url}/v1/models/nope")).await.unwrap();
    assert_eq!(r.status(), 404);

    let (status, v) = post(&url, "/tokenize", &json!({"prompt": "Hello, world!"})).await;
    assert_eq!(status, 200);
    assert_eq!(v["tokens"], json!([19556, 28, 905, 17]));
    assert_eq!(v["count"], 4);
    assert!(v.get("token_strs").is_none(), "{v}");
    // vLLM's options: each id's vocabulary entry; no BOS to add or leave out here.
    let (status, v) = post(
        &url,
        "/tokenize",
        &json!({"prompt": "Hello, world!", "return_token_strs": true, "add_special_tokens": false}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["tokens"], json!([19556, 28, 905, 17]));
    assert_eq!(v["token_strs"], json!(["Hello", ",", "Ġworld", "!"]));
    let (_, v) = post(
        &url,
        "/tokenize",
        &json!({"messages": [{"role": "user", "content": "What is the capital of France?"}]}),
    )
    .await;
    assert_eq!(v["count"], 37);
    let (status, v) = post(
        &url,
        "/detokenize",
        &json!({"tokens": [19556, 28, 905, 17]}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["prompt"], "Hello, world!");
    let (status, _) = post(&url, "/detokenize", &json!({"tokens": [99999999]})).await;
    assert_eq!(status, 400);
    // No messages: what the chat endpoint refuses, so does this.
    let (status, v) = post(&url, "/tokenize", &json!({"messages": []})).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");

    let h = common::health(&url).await;
    assert_eq!(h["status"], "ok");
    // A build without the `cuda` feature runs `--device auto` on the packed CPU path.
    #[cfg(not(feature = "cuda"))]
    assert_eq!(h["device"], "cpu", "{h}");
    let page = reqwest::get(format!("{url}/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.text().await.unwrap().contains("<html"));
}

/// The second turn of a conversation resends the first: its prefix comes from the cache,
/// usage says how much, and the answer is the one computed from scratch.
#[tokio::test]
async fn a_resent_prefix_is_served_from_the_cache() {
    let _turn = common::together().await;
    let url = base().await;
    let long_system = "You are a careful assistant. ".repeat(12);
    let body = json!({
        "model": "smollm2-135m-instruct",
        "messages": [
            {"role": "system", "content": long_system},
            {"role": "user", "content": "Name three colours of the rainbow."}
        ],
        "max_tokens": 12,
        "temperature": 0,
    });
    let (status, first) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{first}");
    let (status, second) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{second}");
    let prompt = second["usage"]["prompt_tokens"].as_u64().unwrap();
    let cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(prompt > 64, "the prompt spans several blocks: {prompt}");
    // Everything but the last (partial) block is reused.
    assert!(
        cached >= prompt - 16 && cached < prompt,
        "{cached} of {prompt}"
    );
    assert_eq!(
        first["choices"][0]["message"]["content"],
        second["choices"][0]["message"]["content"]
    );
}

/// The shared server's URL, after it answered one chat of 3 tokens.
async fn served_one_chat() -> String {
    let url = base().await;
    let (status, _) = post(
        &url,
        "/v1/chat/completions",
        &chat("Say hi.", json!({"max_tokens": 3})),
    )
    .await;
    assert_eq!(status, 200);
    url
}

/// `/metrics` speaks Prometheus' text format with every metric DESIGN.md names, and
/// counts what just happened.
#[tokio::test]
async fn metrics_expose_the_designed_names_and_count_requests() {
    let _turn = common::together().await;
    let url = served_one_chat().await;
    // OpenMetrics to a scraper that asks for it, as Prometheus does.
    let r = reqwest::Client::new()
        .get(format!("{url}/metrics"))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0;q=0.5,text/plain;version=0.0.4;q=0.3",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    assert!(r.text().await.unwrap().ends_with("# EOF\n"));
    // Else the classic text format, as vLLM serves it.
    let r = reqwest::get(format!("{url}/metrics")).await.unwrap();
    assert_eq!(r.status(), 200);
    let ctype = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    let text = r.text().await.unwrap();
    assert!(
        text.contains("# TYPE chorus_requests_total counter"),
        "{text}"
    );
    for name in [
        "chorus_requests_total",
        "chorus_request_queue_depth",
        "chorus_running_sequences",
        "chorus_kv_blocks_used",
        "chorus_kv_blocks_total",
        "chorus_prompt_tokens_total",
        "chorus_generation_tokens_total",
        "chorus_prefix_cache_hits_total",
        "chorus_preemptions_total",
        "chorus_time_to_first_token_seconds_bucket",
        "chorus_inter_token_latency_seconds_bucket",
        "chorus_request_duration_seconds_bucket",
        "chorus_batch_tokens_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let value = |prefix: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
    };
    assert!(
        value("chorus_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}") >= 1.0
    );
    assert!(value("chorus_generation_tokens_total") >= 3.0);
    assert!(value("chorus_time_to_first_token_seconds_count") >= 1.0);
    assert!(value("chorus_kv_blocks_total") > 0.0);
}

/// The vLLM names routers and autoscalers read are there too, labelled with the served
/// model, and carry the same values as chorus's own (one counter, two names).
#[tokio::test]
async fn metrics_also_speak_vllm_names() {
    let _turn = common::together().await;
    let url = served_one_chat().await;
    let models = get_json(&url, "/v1/models").await;
    let model = models["data"][0]["id"]
        .as_str()
        .expect("model id")
        .to_string();
    assert!(
        models["data"][0]["max_model_len"].as_u64().unwrap_or(0) > 0,
        "{models}"
    );
    let text = metrics(&url).await;
    let sample = |name: &str| -> f64 {
        let prefix = match name.starts_with("vllm:") {
            true => format!("{name}{{model_name=\"{model}\"}} "),
            false => format!("{name} "),
        };
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no sample {prefix} in:\n{text}"))
    };
    for name in [
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:time_to_first_token_seconds_count",
    ] {
        sample(name);
    }
    let usage = sample("vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    assert_eq!(usage, sample("vllm:gpu_cache_usage_perc"));
    // Read in one scrape, so both names of one counter show the same value.
    let queries = sample("vllm:prefix_cache_queries_total");
    assert!(queries > 0.0);
    assert_eq!(queries, sample("chorus_prompt_tokens_total"));
    assert_eq!(
        sample("vllm:prefix_cache_hits_total"),
        sample("chorus_prefix_cache_hits_total")
    );
    assert!(sample("vllm:generation_tokens_total") >= 2.0);
}

/// `/v1/loads` reports load in the schema routers poll (SGLang's, read by smg).
#[tokio::test]
async fn loads_report_the_pool_and_the_queue() {
    let _turn = common::together().await;
    let url = served_one_chat().await;
    let r = reqwest::get(format!("{url}/v1/loads?include=core"))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["dp_rank_count"], 1, "{v}");
    assert!(
        v["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{v}"
    );
    let load = &v["loads"][0];
    for field in [
        "num_running_reqs",
        "num_waiting_reqs",
        "num_total_reqs",
        "num_used_tokens",
    ] {
        assert!(load[field].is_u64(), "{field} in {v}");
    }
    assert!(
        load["max_total_num_tokens"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    assert!(
        load["max_running_requests"].as_u64().unwrap_or(0) > 0,
        "{v}"
    );
    let usage = load["token_usage"].as_f64().expect("token_usage");
    assert!((0.0..=1.0).contains(&usage), "{v}");
    let hit_rate = load["cache_hit_rate"].as_f64().expect("cache_hit_rate");
    assert!((0.0..=1.0).contains(&hit_rate), "{v}");
}

/// Tokens that never form a character (a lone invalid byte, forced with logit_bias) are
/// returned as replacement characters, one per byte, none lost at the end (before the
/// fix the decoder held them all, re-decoding its growing window every token, and
/// dropped them when generation ended).
#[tokio::test]
async fn forced_invalid_bytes_come_back_whole() {
    let _turn = common::together().await;
    let url = base().await;
    let mut byte = None;
    for id in 0..400u32 {
        let (_, v) = post(&url, "/detokenize", &json!({"tokens": [id, id]})).await;
        if v["prompt"] == "\u{fffd}\u{fffd}" {
            byte = Some(id);
            break;
        }
    }
    let byte = byte.expect("a token for a lone invalid byte");
    let n = 300;
    let body = chat(
        "Hi",
        json!({"max_tokens": n, "ignore_eos": true, "temperature": 0,
               "logit_bias": {byte.to_string(): 100}}),
    );
    let (status, v) = post(&url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("text");
    assert_eq!(text.chars().count(), n, "{text:?}");
    assert!(text.chars().all(|c| c == '\u{fffd}'));
    // Streamed, the same text.
    let events = common::stream_events(
        &url,
        "/v1/chat/completions",
        &chat(
            "Hi",
            json!({"max_tokens": n, "ignore_eos": true, "temperature": 0, "stream": true,
                   "logit_bias": {byte.to_string(): 100}}),
        ),
    )
    .await;
    assert_eq!(common::streamed_content(&events), text);
}

/// A character cut by `max_tokens` (its first bytes drawn, its last never) is left out
/// of the text, streamed or not, as vLLM leaves it; its token is still counted and its
/// log-probability still gives its bytes.
#[tokio::test]
async fn a_character_cut_by_the_end_is_left_out() {
    let _turn = common::together().await;
    let url = base().await;
    // The first token of "🦀" (F0 9F A6 80) holds only some of its bytes.
    let (_, v) = post(
        &url,
        "/tokenize",
        &json!({"prompt": "🦀", "add_special_tokens": false}),
    )
    .await;
    let first = v["tokens"][0].as_u64().expect("a token");
    let (_, v) = post(&url, "/detokenize", &json!({"tokens": [first]})).await;
    assert_eq!(v["prompt"], "\u{fffd}", "not a piece of a character: {v}");
    let body = |stream: bool| {
        chat(
            "Hi",
            json!({"max_tokens": 1, "temperature": 0, "logprobs": true, "stream": stream,
                   "logit_bias": {first.to_string(): 100}}),
        )
    };
    let (status, v) = post(&url, "/v1/chat/completions", &body(false)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["message"]["content"], "", "{v}");
    assert_eq!(v["usage"]["completion_tokens"], 1);
    let bytes = &v["choices"][0]["logprobs"]["content"][0]["bytes"];
    assert_eq!(bytes[0], 0xF0, "{v}");
    let events = common::stream_events(&url, "/v1/chat/completions", &body(true)).await;
    assert_eq!(common::streamed_content(&events), "", "{events:?}");
}

/// A list of prompts is a batch: prompt i's choices are numbered from i·n, each echoes its
/// own prompt with its own log-probabilities, and usage counts every prompt once.
#[tokio::test]
async fn completions_batch_echoes_each_prompt_and_sums_usage() {
    let _turn = common::together().await;
    let url = base().await;
    let prompts = ["The capital of France is", "1, 2, 3,"];
    let extra = json!({"max_tokens": 4, "temperature": 0, "echo": true, "logprobs": 1});
    let mut alone = Vec::new();
    for p in prompts {
        let mut body = extra.clone();
        body["prompt"] = json!(p);
        let (status, v) = post(&url, "/v1/completions", &body).await;
        assert_eq!(status, 200, "{v}");
        alone.push(v);
    }
    let mut body = extra.clone();
    body["prompt"] = json!(prompts);
    body["n"] = json!(2);
    let (status, v) = post(&url, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{v}");
    for (i, c) in choices.iter().enumerate() {
        let one = &alone[i / 2]["choices"][0];
        assert_eq!(c["index"], i, "{v}");
        assert_eq!(c["text"], one["text"], "{v}");
        assert!(
            c["text"].as_str().unwrap().starts_with(prompts[i / 2]),
            "{v}"
        );
        assert_eq!(c["logprobs"]["tokens"], one["logprobs"]["tokens"], "{v}");
        assert_eq!(
            c["logprobs"]["text_offset"], one["logprobs"]["text_offset"],
            "{v}"
        );
    }
    let sum = |field: &str| -> u64 {
        alone
            .iter()
            .map(|a| a["usage"][field].as_u64().unwrap())
            .sum()
    };
    assert_eq!(v["usage"]["prompt_tokens"], sum("prompt_tokens"), "{v}");
    assert_eq!(
        v["usage"]["completion_tokens"],
        2 * sum("completion_tokens"),
        "{v}"
    );

    // Streamed: the same choices, then one usage chunk that sums them.
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let events = stream_events(&url, "/v1/completions", &body).await;
    let mut texts = vec![String::new(); 4];
    let mut usage = Value::Null;
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(e).unwrap();
        for c in chunk["choices"].as_array().unwrap() {
            texts[c["index"].as_u64().unwrap() as usize] += c["text"].as_str().unwrap();
        }
        if !chunk["usage"].is_null() {
            usage = chunk["usage"].clone();
        }
    }
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(json!(text), choices[i]["text"], "{events:?}");
    }
    assert_eq!(usage, v["usage"], "{events:?}");
}

#[tokio::test]
async fn completions_batch_limits_are_400s_naming_the_prompt() {
    let _turn = common::together().await;
    let url = base().await;
    let cases = [
        (json!([]), "prompt"),
        (json!(vec!["a"; 65]), "prompt"),
        (json!(["a", "word ".repeat(10_000)]), "prompt[1]"),
        (json!([[1, 2], [1, 1_000_000_000u32]]), "prompt[1]"),
    ];
    for (prompt, param) in cases {
        let (status, v) = post(
            &url,
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 2}),
        )
        .await;
        assert_eq!(status, 400, "{prompt}: {v}");
        assert_eq!(v["error"]["param"], param, "{prompt}: {v}");
    }
}
