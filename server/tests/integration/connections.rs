//! What a client can do with a connection: trickle or withhold a body, open too many,
//! hold one through a shutdown, preflight from a browser, present a key. Each test on
//! its own real server with the real default model, over raw sockets where the HTTP
//! client would hide what is being tested.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::common::{self, config, start, wait_ready};
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use serde_json::Value;

fn addr(url: &str) -> String {
    url.trim_start_matches("http://").to_string()
}

/// The head of a chat POST to `addr` whose body is `length` bytes.
fn chat_head(addr: &str, length: usize) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    )
}

/// Sends a POST whose headers promise `declared` body bytes and then only `sent` of
/// them; returns the stream, still open on our side.
fn withhold_body(addr: &str, declared: usize, sent: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(chat_head(addr, declared).as_bytes())
        .expect("headers");
    s.write_all(&vec![b' '; sent]).expect("some body");
    s
}

/// A body that never completes is answered 408 after `--body-timeout`, and the
/// connection is closed, as the answer says (before the fix it stayed open: the request in flight kept
/// resetting the idle deadline).
#[tokio::test]
async fn a_withheld_body_is_cut_by_the_body_timeout() {
    let _turn = common::alone().await;
    let url = start(config(&["--body-timeout", "2", "--idle-timeout", "2"]));
    wait_ready(&url).await;
    let addr = addr(&url);
    let (reply, took) = tokio::task::spawn_blocking(move || {
        let mut s = withhold_body(&addr, 100, 6);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        (
            String::from_utf8_lossy(&reply).into_owned(),
            started.elapsed(),
        )
    })
    .await
    .unwrap();
    assert!(
        reply.starts_with("HTTP/1.1 408"),
        "{reply:?} after {took:?}"
    );
    assert!(reply.contains("--body-timeout"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{reply}"
    );
    assert!(took < Duration::from_secs(10), "closed after {took:?}");
}

/// A client that stops reading its stream but keeps the connection open is cut after
/// `--send-timeout`: its generation stops and its slot is freed. Before, it ran on to
/// `max_tokens`, every event kept for a reader that never came.
#[tokio::test]
async fn a_client_that_stops_reading_is_cut_by_the_send_timeout() {
    let _turn = common::alone().await;
    let url = start(config(&["--send-timeout", "2"]));
    wait_ready(&url).await;
    let addr = addr(&url);
    // Large events (eight choices, twenty alternatives a token) fill the socket's
    // buffers (megabytes on Linux) soon.
    let (n, max_tokens) = (8, 2000);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": "Count to a million."}],
        "stream": true, "max_tokens": max_tokens, "ignore_eos": true, "n": n,
        "logprobs": true, "top_logprobs": 20,
    })
    .to_string();
    // A small receive window, so that the sender's buffers stay small too and fill soon.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("receive buffer");
    let s = socket
        .connect(addr.parse().expect("address"))
        .await
        .expect("connect");
    let mut s = s.into_std().expect("std stream");
    s.set_nonblocking(false).expect("blocking");
    let mut held = tokio::task::spawn_blocking(move || {
        s.write_all(chat_head(&addr, body.len()).as_bytes())
            .expect("headers");
        s.write_all(body.as_bytes()).expect("body");
        let mut first = [0u8; 12];
        s.read_exact(&mut first).expect("the answer starts");
        assert_eq!(&first, b"HTTP/1.1 200");
        s
    })
    .await
    .unwrap();
    let started = Instant::now();
    loop {
        let h = common::health(&url).await;
        if h["running"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "still running {:?} after the client stopped reading: {h}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let text = metrics(&url).await;
    let generated: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("chorus_generation_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the generated-tokens counter");
    assert!(
        generated < f64::from(n * max_tokens / 2),
        "{generated} tokens generated for a client that stopped reading"
    );
    // The connection was closed: what was sent can still be read, then the end.
    tokio::task::spawn_blocking(move || {
        held.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut rest = Vec::new();
        let read = held.read_to_end(&mut rest);
        let still_open = read.as_ref().is_err_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            )
        });
        assert!(!still_open, "the connection is still open: {read:?}");
    })
    .await
    .unwrap();
}

/// The server speaks HTTP/1.1 only: an HTTP/2 preface (h2c with prior knowledge) is
/// closed at once. Before the fix it was served as h2, where neither the header nor the
/// idle timeout applies, so a few clients trickling a HEADERS frame held every slot.
#[tokio::test]
async fn an_http2_preface_is_closed_at_once() {
    let _turn = common::alone().await;
    let url = start(config(&["--idle-timeout", "30"]));
    wait_ready(&url).await;
    let addr = addr(&url);
    let (reply, took) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).expect("connect");
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .expect("preface");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let started = Instant::now();
        let mut reply = Vec::new();
        let _ = s.read_to_end(&mut reply);
        (reply, started.elapsed())
    })
    .await
    .unwrap();
    assert!(took < Duration::from_secs(5), "open for {took:?}");
    assert!(
        !reply.windows(8).any(|w| w == b"HTTP/2.0") && !reply.starts_with(&[0, 0]),
        "answered as h2: {reply:?}"
    );
}

/// A compressed body is refused with 415, not misread as malformed JSON (or, for an
/// unknown coding, taken as plain text); a client that leaves mid-body is counted as one
/// that left (499), not as a bad request.
#[tokio::test]
async fn a_coded_body_is_415_and_a_body_left_half_sent_is_499() {
    let _turn = common::alone().await;
    let url = start(config(&[]));
    wait_ready(&url).await;
    let client = reqwest::Client::new();
    for coding in ["gzip", "br", "x-made-up"] {
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .header("content-type", "application/json")
            .header("content-encoding", coding)
            .body(r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}"#)
            .send()
            .await
            .expect("answered");
        assert_eq!(r.status(), 415, "{coding}");
        let v: Value = r.json().await.expect("envelope");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(coding),
            "{v}"
        );
    }
    let addr = addr(&url);
    tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            drop(withhold_body(&addr, 1000, 11));
        }
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = metrics(&url).await;
        let count = |status: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(&format!(
                        r#"chorus_requests_total{{endpoint="/v1/chat/completions",status="{status}"}} "#
                    ))
                })
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        assert_eq!(count("400"), 0, "{text}");
        if count("499") == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One connection over `--max-connections` is answered 503 in the error envelope, with
/// the request id and CORS headers of any answer, but a probe over the limit is
/// answered; once a connection closes, a new one is served.
#[tokio::test]
async fn the_connection_over_the_limit_is_refused_with_503() {
    let _turn = common::alone().await;
    let url = start(config(&["--max-connections", "2", "--cors-origin", "*"]));
    wait_ready(&url).await;
    // `wait_ready` used pooled connections of its own: let them go.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let addr = addr(&url);
    let held: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(&addr).expect("connect"))
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = reqwest::Client::new()
        .get(format!("{url}/v1/models"))
        .header("x-request-id", "over-the-limit")
        .header("origin", "http://page.example")
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    // A browser reads the refusal only with the CORS header; a client or a log
    // correlates it by its request id.
    assert_eq!(r.headers()["access-control-allow-origin"], "*");
    assert_eq!(r.headers()["x-request-id"], "over-the-limit");
    // And may read when to try again.
    let exposed = r.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    assert!(exposed.contains("retry-after"), "{exposed}");
    let v: Value = r.json().await.expect("envelope");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("--max-connections 2"), "{v}");
    // Probes are still answered, by the app and with its status: a router or an
    // orchestrator must not take a server whose slots are all held for a dead one.
    let r = reqwest::Client::new()
        .get(format!("{url}/health"))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.expect("health");
    assert_eq!(v["status"], "ok", "{v}");
    // `HEAD` too (a probe's cheapest form): the status and headers, no body.
    let r = reqwest::Client::new()
        .head(format!("{url}/health"))
        .send()
        .await
        .expect("answered");
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.expect("no body").len(), 0);
    let loads = reqwest::get(format!("{url}/v1/loads?include=all"))
        .await
        .expect("answered");
    assert_eq!(loads.status(), 200);
    let served = metrics(&url).await;
    assert!(served.contains("vllm:num_requests_running"), "{served}");

    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = reqwest::Client::new()
            .get(format!("{url}/v1/models"))
            .send()
            .await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "slots were not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Refused without being routed, and counted as refused connections (the one above,
    // and any the loop met before the slots came back).
    let metrics = metrics(&url).await;
    let refused = metrics
        .lines()
        .find_map(|l| l.strip_prefix("chorus_connections_refused_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(refused.is_some_and(|n| n >= 1), "{metrics}");
}

/// SIGTERM with a client withholding its body: `run` still returns, within the grace
/// period and the drain margin (before the fix it waited for that client forever).
#[tokio::test]
async fn shutdown_is_bounded_even_with_a_withheld_body() {
    let _turn = common::alone().await;
    let resolved =
        resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).expect("default model resolves");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(chorus_server::run(
        listener,
        config(&[
            "--shutdown-grace",
            "1",
            "--body-timeout",
            "600",
            "--no-store",
        ]),
        resolved.path,
        resolved.name,
        async move {
            let _ = stop_rx.await;
        },
    ));
    wait_ready(&url).await;
    let addr = addr(&url);
    let stuck = tokio::task::spawn_blocking(move || withhold_body(&addr, 1000, 10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = Instant::now();
    stop_tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), server)
        .await
        .expect("run returned despite the withheld body")
        .unwrap()
        .expect("clean exit");
    assert!(stopped.elapsed() < Duration::from_secs(15));
    drop(stuck);
}

/// A browser's preflight for the official JS SDK, which sends `x-stainless-*` headers,
/// is allowed for the configured origin (before the fix only `content-type` and
/// `authorization` were).
#[tokio::test]
async fn cors_preflight_allows_the_headers_browser_sdks_send() {
    let _turn = common::alone().await;
    let url = start(config(&["--cors-origin", "http://app.example"]));
    wait_ready(&url).await;
    let asked =
        "authorization, content-type, x-stainless-os, x-stainless-lang, x-stainless-retry-count";
    let r = reqwest::Client::new()
        .request(
            reqwest::Method::OPTIONS,
            format!("{url}/v1/chat/completions"),
        )
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", asked)
        .send()
        .await
        .expect("preflight answered");
    assert!(r.status().is_success(), "{}", r.status());
    let h = r.headers();
    assert_eq!(h["access-control-allow-origin"], "http://app.example");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in asked.split(", ") {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }
    // A preflight is a request like any other: echoed an id, and counted.
    assert!(h.contains_key("x-request-id"), "{h:?}");
    let metrics = metrics(&url).await;
    assert!(
        metrics
            .contains(r#"chorus_requests_total{endpoint="/v1/chat/completions",status="200"} 1"#),
        "{metrics}"
    );
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .expect("metrics answered")
        .text()
        .await
        .expect("metrics text")
}

/// A key configured with a trailing newline (read from a file) is the key without it
/// (before the fix every request was a 401).
#[tokio::test]
async fn an_api_key_with_a_trailing_newline_still_opens_the_api() {
    let _turn = common::alone().await;
    let url = start(config(&["--api-key", "sekrit\n"]));
    wait_ready(&url).await;
    let client = reqwest::Client::new();
    for (key, want) in [("sekrit", 200), ("wrong", 401)] {
        let r = client
            .get(format!("{url}/v1/models"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), want, "{key:?}");
    }
}
