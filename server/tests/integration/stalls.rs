//! No request may stall the others: while clients send prompts that are expensive to
//! template and tokenize, a running stream keeps getting its tokens. The largest gap
//! between two of its events is measured and bounded (generously: the machines are
//! noisy; the figures go to benches/RESULTS.md, not into this bound).

use std::time::{Duration, Instant};

use crate::common::{self, chat, config, get_json, start, wait_ready};
use futures_util::StreamExt;
use serde_json::json;

/// A stream's events may be this far apart at most while the others' prompts are
/// processed (a step of the 135M model is ~10-50 ms on 2 cores; the stalls this guards
/// against were 2.6-3.8 s, and a slow minute of a CI machine once made a 1,008 ms gap
/// with the fix in place, against an earlier bound of 1 s).
const MAX_GAP: Duration = Duration::from_millis(1500);

/// Streams a long answer and returns the largest gap between two events after the
/// first, once `go` has fired (the heavy clients start then).
async fn watch_stream(url: String, go: tokio::sync::oneshot::Sender<()>) -> Duration {
    let body = chat(
        "Tell me a very long story about a lighthouse.",
        json!({"stream": true, "max_tokens": 400, "ignore_eos": true}),
    );
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&body)
        .send()
        .await
        .expect("stream starts");
    assert_eq!(r.status(), 200);
    let mut events = r.bytes_stream();
    let mut go = Some(go);
    let mut last = Instant::now();
    let mut worst = Duration::ZERO;
    let mut seen = 0;
    while let Some(piece) = events.next().await {
        let piece = piece.expect("stream alive");
        let now = Instant::now();
        seen += 1;
        if seen == 3 {
            if let Some(go) = go.take() {
                let _ = go.send(());
            }
        } else if seen > 3 {
            worst = worst.max(now - last);
        }
        last = now;
        if String::from_utf8_lossy(&piece).contains("[DONE]") {
            break;
        }
    }
    assert!(seen > 100, "the stream ended early after {seen} pieces");
    worst
}

/// Runs `heavy` clients each sending `body` while a stream runs; returns the stream's
/// largest gap and the heavy clients' statuses.
async fn gap_while(url: &str, heavy: usize, body: Vec<u8>) -> (Duration, Vec<u16>) {
    let sent = Instant::now();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(watch_stream(url.to_string(), go_tx));
    go_rx.await.expect("stream started");
    let body = std::sync::Arc::new(body);
    let mut clients = Vec::new();
    for _ in 0..heavy {
        let url = url.to_string();
        let body = body.clone();
        clients.push(tokio::spawn(async move {
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(body.as_ref().clone())
                .send()
                .await
                .expect("heavy request sent");
            r.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for c in clients {
        statuses.push(c.await.expect("client"));
    }
    println!("{heavy} heavy requests answered after {:?}", sent.elapsed());
    (watcher.await.expect("watcher"), statuses)
}

#[tokio::test]
async fn big_prompts_do_not_stall_running_streams() {
    let _turn = common::alone().await;
    // Prompts over 2048 tokens are refused: the near-context prompts below are really
    // tokenized, then refused, so the test measures preprocessing, not their prefill.
    let url = start(config(&["--max-prompt-tokens", "2048"]));
    wait_ready(&url).await;

    // 8 prompts of ~3.5 MB: far over the context.
    let huge = chat(
        &"lorem ipsum dolor sit amet ".repeat(130_000),
        json!({"max_tokens": 4}),
    );
    let huge = serde_json::to_vec(&huge).expect("json");
    assert!(huge.len() > 3_400_000 && huge.len() < 4_000_000);
    // Meanwhile /health counts those waiting for a preprocessing thread as queued.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poller = {
        let (url, done) = (url.clone(), done.clone());
        tokio::spawn(async move {
            let mut most = 0;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                let h = get_json(&url, "/health").await;
                most = most.max(h["queued"].as_u64().unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            most
        })
    };
    let (gap, statuses) = gap_while(&url, 8, huge).await;
    done.store(true, std::sync::atomic::Ordering::Release);
    println!("8 x 3.5 MB prompts: largest gap {gap:?}");
    assert!(statuses.iter().all(|&s| s == 400), "{statuses:?}");
    assert!(gap < MAX_GAP, "the stream stalled for {gap:?}");
    let most = poller.await.expect("poller");
    assert!(most >= 1, "no request was seen waiting for preprocessing");

    // 8 prompts of ~8,000 tokens (just under the 8,192-token context): real work for
    // the template and the tokenizer.
    let words: Vec<String> = (0..1700).map(|i| format!("w{i}")).collect();
    let near = chat(&words.join(" "), json!({"max_tokens": 4}));
    let near = serde_json::to_vec(&near).expect("json");
    let (gap, statuses) = gap_while(&url, 8, near).await;
    println!("8 x ~8k-token prompts: largest gap {gap:?}");
    assert!(statuses.iter().all(|&s| s == 400), "{statuses:?}");
    assert!(gap < MAX_GAP, "the stream stalled for {gap:?}");
}

/// 1,000 idle keep-alive connections (each after one answered request) beside 32
/// streaming clients: every stream completes. (Their effect on throughput is measured
/// with `chorus-bench --idle-connections 1000`, in benches/RESULTS.md.)
#[tokio::test]
async fn a_thousand_idle_connections_leave_streams_alone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _turn = common::alone().await;
    let url = start(config(&["--idle-timeout", "600"]));
    wait_ready(&url).await;
    let authority = url.trim_start_matches("http://").to_string();
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut s = tokio::net::TcpStream::connect(&authority)
            .await
            .expect("connect");
        let request = format!("GET /health HTTP/1.1\r\nHost: {authority}\r\n\r\n");
        s.write_all(request.as_bytes()).await.expect("request");
        let mut answer = [0u8; 1024];
        let n = s.read(&mut answer).await.expect("answer");
        assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
        idle.push(s);
    }
    let mut streams = Vec::new();
    for i in 0..32 {
        let url = url.clone();
        streams.push(tokio::spawn(async move {
            let body = chat(
                &format!("Stream {i}: tell me about rivers."),
                json!({"stream": true, "max_tokens": 32, "ignore_eos": true}),
            );
            let r = reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .json(&body)
                .send()
                .await
                .expect("stream starts");
            assert_eq!(r.status(), 200);
            r.text().await.expect("stream body")
        }));
    }
    for s in streams {
        let text = s.await.expect("client");
        assert!(text.trim_end().ends_with("data: [DONE]"), "{text}");
        assert_eq!(text.matches("\"finish_reason\":\"length\"").count(), 1);
    }
    // The idle connections are still open and served.
    let s = idle.last_mut().expect("held");
    let request = format!("GET /health HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(request.as_bytes()).await.expect("request");
    let mut answer = [0u8; 1024];
    let n = s.read(&mut answer).await.expect("answer");
    assert!(answer[..n].starts_with(b"HTTP/1.1 200"));
}
