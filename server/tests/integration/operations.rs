//! Operating the server: access control, queue limits and timeouts, disconnect storms,
//! overload and shutdown, each on its own real server with the real default model.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{
    self, assert_serves, chat, config, get_json, health, metrics, parse_sse, post, send_chat,
    settled, start, wait_ready,
};
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn max_prompt_tokens_is_a_400_naming_the_limit() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-prompt-tokens", "50"]));
    wait_ready(&url).await;
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat(&"word ".repeat(100), json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-prompt-tokens 50"));
    assert_serves(&url).await;
}

/// A conversation the chat template renders to no tokens is a 400, not a request that
/// waits at the head of the queue (the scheduler admits in order) and holds up every
/// one behind it until `--request-timeout`.
#[tokio::test]
async fn a_conversation_rendered_to_nothing_is_refused_and_holds_up_nobody() {
    let _turn = common::alone().await;
    let dir = std::env::temp_dir().join(format!("chorus-empty-template-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let template = dir.join("users-only.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}{% endfor %}",
    )
    .unwrap();
    // Were it queued, it would wait this long (a 503), and the next request after it.
    let url = start(config(&[
        "--chat-template",
        template.to_str().unwrap(),
        "--request-timeout",
        "20",
    ]));
    wait_ready(&url).await;
    let system_only = json!({
        "messages": [{"role": "system", "content": "Be brief."}],
        "max_tokens": 2,
    });
    let (status, v) = post(&url, "/v1/chat/completions", &system_only).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "messages");
    // The Responses API names its own field.
    let system_only = json!({
        "input": [{"role": "system", "content": "Be brief."}],
        "max_output_tokens": 2,
    });
    let (status, v) = post(&url, "/v1/responses", &system_only).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "input");
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    std::fs::remove_dir_all(&dir).ok();
}

/// A connection that sends nothing is closed after `--idle-timeout`; a request that
/// takes longer than that to answer is not cut.
#[tokio::test]
async fn idle_connections_are_dropped_but_slow_answers_are_not() {
    use std::io::Read;
    let _turn = common::alone().await;
    let url = start(config(&["--idle-timeout", "1"]));
    wait_ready(&url).await;
    let addr = url.trim_start_matches("http://").to_string();
    let closed_after = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let n = s.read(&mut buf).unwrap_or(0);
        (n, started.elapsed())
    })
    .await
    .unwrap();
    assert_eq!(
        closed_after.0, 0,
        "the server sent something to an idle client"
    );
    assert!(
        closed_after.1 < Duration::from_secs(10),
        "an idle connection stayed open {:?}",
        closed_after.1
    );

    // A non-streamed answer sends nothing until it is done: longer answers until one
    // takes well past the 1 s idle timeout, however fast the machine decodes.
    let mut max_tokens = 200;
    loop {
        let started = Instant::now();
        let (status, v) = post(
            &url,
            "/v1/chat/completions",
            &chat(
                "Tell me a story.",
                json!({"max_tokens": max_tokens, "ignore_eos": true}),
            ),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        if started.elapsed() > Duration::from_millis(1500) {
            break;
        }
        assert!(
            max_tokens < 6400,
            "even {max_tokens} tokens took under 1.5 s: nothing was shown"
        );
        max_tokens *= 2;
    }
}

/// With a KV cache smaller than one context, a prompt that cannot fit is a 400 naming
/// the flag, and `max_tokens` is clamped to what fits instead of failing.
#[tokio::test]
async fn a_small_kv_cache_bounds_requests_with_a_clear_error() {
    let _turn = common::alone().await;
    let url = start(config(&["--kv-cache-mb", "4"]));
    wait_ready(&url).await;
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat(&"word ".repeat(200), json!({})),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--kv-cache-mb"),
        "{v}"
    );
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("Hi", json!({"ignore_eos": true})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    // What a router reads as the longest sequence is what the cache holds, not the
    // model's 8,192-token context.
    let models = get_json(&url, "/v1/models").await;
    let len = models["data"][0]["max_model_len"].as_u64().unwrap();
    assert!(len > 0 && len < 8192, "{models}");
}

/// `--max-model-len` bounds a sequence under the model's context, as vLLM's flag does:
/// routers read it as `max_model_len`, and a longer prompt is a 400 naming the flag, with
/// OpenAI's `context_length_exceeded` code.
#[tokio::test]
async fn max_model_len_bounds_sequences_under_the_context() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-model-len", "48"]));
    wait_ready(&url).await;
    let models = get_json(&url, "/v1/models").await;
    assert_eq!(models["data"][0]["max_model_len"], 48, "{models}");
    let (status, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": vec![28; 49], "max_tokens": 0,
                "echo": true, "logprobs": 0}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--max-model-len"), "{v}");
    // OpenAI's code, which clients read to trim a conversation; in a batch, which prompt.
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "prompt", "{v}");
    let (status, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": [vec![28; 5], vec![28; 48]], "max_tokens": 1}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");
    assert_eq!(v["error"]["param"], "prompt[1]", "{v}");
    let (status, v) = post(
        &url,
        "/v1/completions",
        &json!({"model": DEFAULT_MODEL, "prompt": vec![28; 40], "max_tokens": 100}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["usage"]["completion_tokens"].as_u64() <= Some(8), "{v}");
}

/// A `--max-model-len` beyond the model's context or the KV cache is a start-up error,
/// as vLLM's is, not a smaller length given quietly.
#[test]
fn a_max_model_len_beyond_what_is_held_is_refused_at_start() {
    let state = std::env::temp_dir().join(format!("chorus-long-len-{}", std::process::id()));
    for (flags, said) in [
        (
            &["--max-model-len", "100000"][..],
            "--max-model-len 100000 is more than the model's context: 8192 tokens",
        ),
        (
            &["--max-model-len", "1000", "--kv-cache-mb", "8"][..],
            "--max-model-len 1000 is more than what --kv-cache-mb 8 holds: ",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
            .args(["--port", "0", "--state-dir"])
            .arg(&state)
            .args(flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{stderr}");
        assert!(stderr.contains(said), "{stderr}");
    }
    std::fs::remove_dir_all(&state).ok();
}

/// A KV cache larger than the host's free memory is a start-up error naming the flag,
/// not the kernel's OOM kill once its pages are written.
#[test]
fn a_kv_cache_beyond_the_memory_is_refused_at_start() {
    let state = std::env::temp_dir().join(format!("chorus-kv-oom-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_chorus"))
        .args(["--port", "0", "--kv-cache-mb", "1048576", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--kv-cache-mb 1048576 is more than the memory available"),
        "{stderr}"
    );
    std::fs::remove_dir_all(&state).ok();
}

#[tokio::test]
async fn api_key_guards_the_api_but_not_health_or_metrics() {
    let _turn = common::alone().await;
    let url = start(config(&["--api-key", "sekrit"]));
    wait_ready(&url).await;
    let client = reqwest::Client::new();
    let models = format!("{url}/v1/models");

    let r = client.get(&models).send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_api_key");

    let r = client
        .get(&models)
        .bearer_auth("wrong")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = client
        .get(&models)
        .bearer_auth("sekrit")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .post(format!("{url}/tokenize"))
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    for open in ["/health", "/metrics", "/"] {
        let r = client.get(format!("{url}{open}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }
}

/// With one slot taken by a long request, a second one waits in the queue; past
/// `--request-timeout` it is refused with a 503 instead of running late.
#[tokio::test]
async fn a_request_that_waits_too_long_is_refused() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-running", "1", "--request-timeout", "1"]));
    wait_ready(&url).await;
    // Streamed and long enough to outlast both refusals on any machine; read as it
    // goes, then dropped.
    let mut long = send_chat(
        &url,
        &chat(
            "Write a long story.",
            json!({"max_tokens": 4000, "ignore_eos": true, "stream": true}),
        ),
    )
    .await;
    assert_eq!(long.status(), 200);
    assert!(
        long.chunk().await.ok().flatten().is_some(),
        "the long request streams"
    );
    let started = Instant::now();
    let (status, v) = post(
        &url,
        "/v1/chat/completions",
        &chat("Hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(status, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--request-timeout"),
        "{v}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    // Streamed, the same refusal is an HTTP 503 too, not a 200 with an error event:
    // nothing was sent before the first token.
    let r = send_chat(&url, &chat("Hi", json!({"max_tokens": 2, "stream": true}))).await;
    assert_eq!(r.status(), 503);
    let v: Value = r.json().await.expect("the error envelope, not a stream");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("--request-timeout"),
        "{v}"
    );
    // The running request is unaffected: it is still streaming tokens.
    let mut more = String::new();
    while !more.contains("\"content\"") {
        let chunk = long.chunk().await.ok().flatten();
        let chunk = chunk.expect("the running request is unaffected, still streaming");
        more.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(!more.contains("\"error\""), "{more}");
}

/// 200 clients connect, read a few tokens and vanish: nothing stays behind.
#[tokio::test]
async fn a_disconnect_storm_leaves_nothing_running() {
    let _turn = common::alone().await;
    let url = start(config(&[]));
    wait_ready(&url).await;
    let mut clients = Vec::new();
    for i in 0..200 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            // Some ask for several choices, structured output, or log-probabilities
            // and penalties: every kind of sequence must be freed.
            let extra = match i % 4 {
                0 => json!({"n": 4, "seed": i}),
                1 => json!({"response_format": {"type": "json_object"}}),
                2 => json!({"logprobs": true, "top_logprobs": 5, "frequency_penalty": 0.5}),
                _ => json!({}),
            };
            let mut body = chat(
                &format!("Client {i}, tell me a story."),
                json!({"stream": true, "max_tokens": 500, "ignore_eos": true}),
            );
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            let r = send_chat(&url, &body).await;
            let status = r.status().as_u16();
            if status == 200 {
                let mut s = r.bytes_stream();
                // Two pieces: the role chunk and the first text.
                for _ in 0..2 {
                    let _ = tokio::time::timeout(Duration::from_secs(60), s.next()).await;
                }
            }
            status
        }));
    }
    for c in clients {
        let status = c.await.unwrap();
        assert!(status == 200 || status == 429, "{status}");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let h = health(&url).await;
        if h["running"] == 0 && h["queued"] == 0 && h["kv_blocks_used"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "still busy: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client that leaves a batch of prompts frees every prompt's sequences, streamed or
/// not, and one that leaves while the batch waits for a slot frees the waiting ones.
#[tokio::test]
async fn a_batch_whose_client_leaves_leaves_nothing_running() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-running", "4"]));
    wait_ready(&url).await;
    let client = reqwest::Client::new();
    for stream in [true, false] {
        let body = json!({
            "prompt": (0..8).map(|i| format!("Story {i}: once upon a time")).collect::<Vec<_>>(),
            "max_tokens": 2000, "ignore_eos": true, "stream": stream, "n": 2,
        });
        let request = client
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send();
        // Gone after a second: some prompts decode, the rest wait for a slot.
        let _ = tokio::time::timeout(Duration::from_secs(1), request).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let h = health(&url).await;
            if h["running"] == 0 && h["queued"] == 0 && h["kv_blocks_used"] == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "still busy (stream: {stream}): {h}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // The request left before its response (the one not streamed, at least) is
    // counted, as 499.
    let text = metrics(&url).await;
    let left = r#"chorus_requests_total{endpoint="/v1/completions",status="499"} "#;
    let counted = text
        .lines()
        .find_map(|l| l.strip_prefix(left))
        .and_then(|v| v.parse::<f64>().ok());
    assert!(counted >= Some(1.0), "no {left} in:\n{text}");
    // Every sequence left behind (8 prompts, 2 choices, twice) counts in the
    // request-duration histogram, as a finished one does.
    let ended = text
        .lines()
        .find_map(|l| l.strip_prefix("chorus_request_duration_seconds_count "))
        .and_then(|v| v.parse::<f64>().ok());
    assert_eq!(ended, Some(32.0), "{text}");
    assert_serves(&url).await;
}

/// A batch is queued whole, so one larger than `--max-running` + `--max-queue` is a 400
/// that says so (it could never be queued), whatever `--max-prompts` says.
#[tokio::test]
async fn a_batch_larger_than_the_queue_is_a_400() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-running", "2", "--max-queue", "1"]));
    wait_ready(&url).await;
    let batch = |k: usize| json!({"prompt": vec!["Once upon a time"; k], "max_tokens": 2});
    let (status, v) = post(&url, "/v1/completions", &batch(4)).await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["error"]["param"], "prompt", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-queue"),
        "{v}"
    );
    let (status, v) = post(&url, "/v1/completions", &batch(3)).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 3, "{v}");
}

/// The device path (`--device candle-cpu`: the code a GPU runs, on candle's CPU device)
/// serves through the same engine: concurrent requests, forked choices (whose partial
/// last block is copied on the device), greedy picks on the device as on the host, and a
/// stream; and decoding through the paged op
/// in fixed-shape steps (the defaults: what CUDA graphs replay on a GPU) answers as the
/// gather does.
#[tokio::test]
async fn the_device_path_serves_on_candle_cpu() {
    let _turn = common::alone().await;
    let url = start(config(&["--device", "candle-cpu"]));
    wait_ready(&url).await;
    let h = health(&url).await;
    assert_eq!(h["device"], "candle-cpu", "{h}");
    let greedy = chat(
        "Question 0: what is a river?",
        json!({"max_tokens": 24, "ignore_eos": true, "temperature": 0}),
    );
    let (status, paged) = post(&url, "/v1/chat/completions", &greedy).await;
    assert_eq!(status, 200, "{paged}");
    // Greedy rows take their argmax on the device; asking for log-probabilities brings
    // the logits back to the host, whose argmax must agree.
    let mut scored = greedy.clone();
    scored["logprobs"] = json!(true);
    let (status, on_host) = post(&url, "/v1/chat/completions", &scored).await;
    assert_eq!(status, 200, "{on_host}");
    assert_eq!(
        paged["choices"][0]["message"]["content"],
        on_host["choices"][0]["message"]["content"]
    );
    let mut clients = Vec::new();
    for i in 0..3 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let body = chat(
                &format!("Question {i}: what is a river?"),
                json!({"n": 2, "max_tokens": 24, "ignore_eos": true, "temperature": 0}),
            );
            post(&url, "/v1/chat/completions", &body).await
        }));
    }
    for c in clients {
        let (status, v) = c.await.unwrap();
        assert_eq!(status, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 2, "{v}");
        let text = |c: &Value| c["message"]["content"].as_str().unwrap().to_string();
        // Greedy choices agree only if the fork's copied block holds the parent's keys.
        assert!(!text(&choices[0]).trim().is_empty(), "{v}");
        assert_eq!(text(&choices[0]), text(&choices[1]), "{v}");
    }
    let events = common::stream_events(
        &url,
        "/v1/chat/completions",
        &chat("Name a colour.", json!({"max_tokens": 8, "stream": true})),
    )
    .await;
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    assert_eq!(settled(&url).await["kv_blocks_used"], 0);
    drop(url);

    let url = start(config(&[
        "--device",
        "candle-cpu",
        "--device-attention",
        "gather",
    ]));
    wait_ready(&url).await;
    let (status, gathered) = post(&url, "/v1/chat/completions", &greedy).await;
    assert_eq!(status, 200, "{gathered}");
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_string()
    };
    assert!(!text(&paged).trim().is_empty(), "{paged}");
    assert_eq!(text(&paged), text(&gathered));
}

/// Requests for several choices under a KV cache too small for all of them: forked
/// choices are preempted and recomputed, every request still ends with all its choices,
/// and every block comes back.
#[tokio::test]
async fn forked_choices_under_kv_pressure_all_complete() {
    let _turn = common::alone().await;
    let url = start(config(&["--kv-cache-mb", "8"]));
    wait_ready(&url).await;
    let mut clients = Vec::new();
    for i in 0..12 {
        let url = url.clone();
        clients.push(tokio::spawn(async move {
            let body = chat(
                &format!("Request {i}: describe the weather."),
                json!({"n": 4, "max_tokens": 48, "ignore_eos": true, "seed": i}),
            );
            post(&url, "/v1/chat/completions", &body).await
        }));
    }
    for c in clients {
        let (status, v) = tokio::time::timeout(Duration::from_secs(300), c)
            .await
            .expect("a request hung")
            .unwrap();
        assert_eq!(status, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        assert_eq!(choices.len(), 4, "{v}");
        assert!(
            choices.iter().all(|c| c["finish_reason"] == "length"),
            "{v}"
        );
        assert_eq!(v["usage"]["completion_tokens"], 4 * 48, "{v}");
    }
    let h = settled(&url).await;
    assert_eq!(h["running"], 0, "{h}");
    assert_eq!(h["kv_blocks_used"], 0, "{h}");
    let preemptions = metrics(&url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("chorus_preemptions_total "))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        preemptions > 0.0,
        "the cache was never short: {preemptions}"
    );
}

/// A request's further choices waiting for a slot are waiting work: `/health`'s
/// `queued`, `/v1/loads`' `num_waiting_reqs` and `vllm:num_requests_waiting` count them
/// (they read 0 while three choices of four waited, and a router saw an idle replica).
#[tokio::test]
async fn choices_waiting_for_a_slot_are_counted_as_waiting() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-running", "1"]));
    wait_ready(&url).await;
    let request = {
        let url = url.clone();
        tokio::spawn(async move {
            let body = chat(
                "Describe the sea.",
                json!({"n": 4, "max_tokens": 48, "ignore_eos": true}),
            );
            post(&url, "/v1/chat/completions", &body).await
        })
    };
    let mut most = (0, 0, 0.0);
    while !request.is_finished() {
        let h = health(&url).await;
        let loads = get_json(&url, "/v1/loads").await;
        let gauge = metrics(&url)
            .await
            .lines()
            .find_map(|l| l.strip_prefix("vllm:num_requests_waiting{"))
            .and_then(|l| l.split_once("} "))
            .and_then(|(_, v)| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        let queued = h["queued"].as_u64().unwrap_or(0);
        let waiting = loads["loads"][0]["num_waiting_reqs"].as_u64().unwrap_or(0);
        most = (most.0.max(queued), most.1.max(waiting), gauge.max(most.2));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, v) = request.await.unwrap();
    assert_eq!(status, 200, "{v}");
    assert_eq!(most, (3, 3, 3.0), "three choices waited for the one slot");
    let h = settled(&url).await;
    assert_eq!(h["queued"], 0, "{h}");
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// `--max-queue 0` means no waiting, not no serving: requests that find free slots run,
/// a burst of them included (the preprocessing line refused every request).
#[tokio::test]
async fn no_queue_still_serves_the_free_slots() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-queue", "0", "--max-running", "4"]));
    wait_ready(&url).await;
    let burst = (0..4).map(|i| {
        let url = url.clone();
        tokio::spawn(async move {
            let body = chat(&format!("Say {i}."), json!({"max_tokens": 2}));
            post(&url, "/v1/chat/completions", &body).await
        })
    });
    for r in futures_util::future::join_all(burst).await {
        let (status, v) = r.unwrap();
        assert_eq!(status, 200, "{v}");
    }
}

/// 256 concurrent streams against `--max-queue 64`: each gets a complete stream or a 429,
/// none hangs, none gets a 5xx, and memory comes back to where it was.
#[tokio::test]
async fn overload_answers_429_and_never_hangs() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-queue", "64", "--max-running", "32"]));
    wait_ready(&url).await;
    // Warm up once, so allocations that stay (pools, caches) happen before the baseline.
    let wave = |n: usize| {
        let url = url.clone();
        async move {
            let mut tasks = Vec::new();
            for i in 0..n {
                let url = url.clone();
                tasks.push(tokio::spawn(async move {
                    let body = chat(
                        &format!("Request {i}: count to ten."),
                        json!({"stream": true, "max_tokens": 16, "ignore_eos": true}),
                    );
                    let r = send_chat(&url, &body).await;
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap();
                    (status, text)
                }));
            }
            let mut ok = 0;
            let mut refused = 0;
            for t in tasks {
                let (status, text) = tokio::time::timeout(Duration::from_secs(300), t)
                    .await
                    .expect("a request hung")
                    .unwrap();
                match status {
                    200 => {
                        let events = parse_sse(&text);
                        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
                        // Parsed, not searched: the model may well write the word "error".
                        for event in &events[..events.len() - 1] {
                            let event: Value = serde_json::from_str(event).unwrap();
                            assert!(event.get("error").is_none(), "{text}");
                        }
                        ok += 1;
                    }
                    429 => refused += 1,
                    other => panic!("status {other}: {text}"),
                }
            }
            (ok, refused)
        }
    };
    let (ok, _) = wave(64).await;
    assert_eq!(ok, 64);
    let before = rss_kib();
    let (ok, refused) = wave(256).await;
    assert_eq!(ok + refused, 256);
    assert!(refused > 0, "256 at once should overflow a queue of 64");
    assert!(ok >= 64, "{ok} served");
    let after = rss_kib();
    assert!(
        after <= before + before / 10,
        "memory grew from {before} KiB to {after} KiB"
    );
}

/// SIGTERM/ctrl-c: new requests are refused (`/health` says draining), a running stream
/// may finish within the grace period, and one that does not is ended with an error
/// event; `run` returns.
#[tokio::test]
async fn shutdown_drains_then_ends_streams_with_an_error_event() {
    let _turn = common::alone().await;
    let resolved =
        resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).expect("default model resolves");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(chorus_server::run(
        listener,
        config(&["--shutdown-grace", "3", "--no-store", "--max-running", "1"]),
        resolved.path,
        resolved.name,
        async move {
            let _ = stop_rx.await;
        },
    ));
    wait_ready(&url).await;

    let body = chat(
        "Write a very long story.",
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    let r = send_chat(&url, &body).await;
    assert_eq!(r.status(), 200);
    let mut stream = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("\"content\":\"") {
        let piece = stream.next().await.expect("stream alive").unwrap();
        text.push_str(&String::from_utf8_lossy(&piece));
    }

    // A request queued behind it (one slot): at shutdown it is refused at once with a
    // 503 a router retries elsewhere, not started in the grace period and cut off.
    let queued = tokio::spawn({
        let url = url.clone();
        let body = chat("Hi", json!({"stream": true, "max_tokens": 4}));
        async move {
            let r = send_chat(&url, &body).await;
            (r.status().as_u16(), Instant::now())
        }
    });
    while health(&url).await["queued"] != 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let stopped = Instant::now();
    stop_tx.send(()).unwrap();
    // While the stream drains, the server still answers: a router or a readiness probe
    // is told it is draining (new connections too), not cut off.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::get(format!("{url}/health"))
        .await
        .expect("answered");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "draining");
    let r = send_chat(&url, &chat("Hi", json!({}))).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    // The scheduler view says so too (it answered 200 with an empty stream, and its page
    // showed "live" with frozen rows for the whole drain).
    let r = reqwest::get(format!("{url}/scheduler/stream"))
        .await
        .expect("answered");
    assert_eq!(r.status(), 503);
    let (status, refused) = queued.await.unwrap();
    assert_eq!(status, 503);
    assert!(
        refused - stopped < Duration::from_secs(2),
        "the queued request waited out the grace period"
    );
    while let Some(piece) = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the stream ended after the grace period")
    {
        text.push_str(&String::from_utf8_lossy(&piece.unwrap()));
    }
    let waited = stopped.elapsed();
    assert!(
        waited >= Duration::from_millis(2900),
        "ended before the grace period: {waited:?}"
    );
    assert!(text.contains("shutting down"), "no error event: {text}");
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("run returned")
        .unwrap()
        .expect("clean exit");
}
