//! `GET /scheduler/stream` on a real server: while requests run, snapshots name them by
//! request id only (never their text), their numbers are consistent, and each client
//! gets at most ten snapshots a second.

use std::time::{Duration, Instant};

use crate::common::{self, base, chat};
use futures_util::StreamExt;
use serde_json::{json, Value};

#[tokio::test]
async fn snapshots_show_requests_by_id_and_are_rate_limited() {
    // Alone: what a watcher arriving later is shown is checked against what ran.
    let _turn = common::alone().await;
    let url = base().await;
    let secret = "zanzibar-periwinkle";
    let mut running = Vec::new();
    for i in 0..4 {
        let url = url.clone();
        running.push(tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/v1/chat/completions"))
                .header("x-request-id", format!("view-test-{i}"))
                .json(&chat(
                    &format!("{secret} {i}: tell me a long story."),
                    json!({"max_tokens": 200, "ignore_eos": true}),
                ))
                .send()
                .await
                .expect("sent")
                .text()
                .await
                .expect("answered")
        }));
    }
    let r = reqwest::get(format!("{url}/scheduler/stream"))
        .await
        .expect("view opens");
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let mut body = r.bytes_stream();
    let mut text = String::new();
    let started = Instant::now();
    let window = Duration::from_secs(3);
    while started.elapsed() < window {
        match tokio::time::timeout(window - started.elapsed(), body.next()).await {
            Ok(Some(piece)) => text.push_str(&String::from_utf8_lossy(&piece.expect("alive"))),
            _ => break,
        }
    }
    drop(body);
    let snapshots: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|e| serde_json::from_str(e).expect("a JSON snapshot"))
        .collect();
    // At most ten a second (and the first at once): 31 in three seconds at the very most.
    assert!(
        (5..=31).contains(&snapshots.len()),
        "{} snapshots in {window:?}",
        snapshots.len()
    );
    assert!(!text.contains(secret), "request text leaked into the view");
    let seen: Vec<&Value> = snapshots
        .iter()
        .flat_map(|s| s["sequences"].as_array().into_iter().flatten())
        .collect();
    assert!(
        seen.iter().any(|q| q["request_id"]
            .as_str()
            .is_some_and(|r| r.starts_with("view-test-"))),
        "no running request seen: {text}"
    );
    for s in &snapshots {
        let kv = &s["kv"];
        let total = kv["total"].as_u64().expect("total");
        let parts = ["used", "cached_free", "free"].map(|k| kv[k].as_u64().expect("count"));
        assert_eq!(parts.iter().sum::<u64>(), total, "{kv}");
        assert_eq!(kv["map"].as_str().expect("map").len() as u64, total);
        for q in s["sequences"].as_array().expect("sequences") {
            assert!(
                q["prompt_computed"].as_u64() <= q["prompt_tokens"].as_u64(),
                "{q}"
            );
            assert!(q["generated"].as_u64() <= q["max_tokens"].as_u64(), "{q}");
        }
    }
    for r in running {
        r.await.expect("request");
    }

    // Watched by no one, the engine finishes those and serves one more (its prompt in
    // one prefill step, a single token). A watcher arriving now is shown the engine as
    // it is, and the steps taken while no one watched: not the snapshot and the steps
    // left behind when the last watcher went.
    let r = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat("One word, please.", json!({"max_tokens": 1})))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 200);
    let r = reqwest::get(format!("{url}/scheduler/stream"))
        .await
        .expect("view opens");
    let mut body = r.bytes_stream();
    let mut text = String::new();
    while !text.contains("\n\n") {
        let piece = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("a snapshot within the idle wake")
            .expect("open")
            .expect("alive");
        text.push_str(&String::from_utf8_lossy(&piece));
    }
    let first: Value = text
        .split("\n\n")
        .next()
        .and_then(|e| e.strip_prefix("data: "))
        .map(|e| serde_json::from_str(e).expect("a JSON snapshot"))
        .expect("an event");
    assert_eq!(first["sequences"], json!([]), "a stale snapshot: {first}");
    let last = first["steps"]
        .as_array()
        .and_then(|s| s.last())
        .expect("steps");
    assert_eq!(last["sequences"], 1, "the steps left behind: {last}");
    assert!(last["prefill_tokens"].as_u64() > Some(0), "{last}");
}
