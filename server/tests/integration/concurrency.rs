//! Continuous batching and cancellation, against a real server with the real model.
//! These tests watch the server's running count, so they take turns.

use std::time::{Duration, Instant};

use crate::common::{self, base, chat, health, send_chat};
use futures_util::StreamExt;
use serde_json::json;

#[tokio::test]
async fn short_request_started_later_finishes_first() {
    let _turn = common::alone().await;
    let url = base().await;
    let long_body = chat(
        "Write a long essay about the ocean.",
        json!({"stream": true, "max_tokens": 300, "ignore_eos": true}),
    );
    let long = send_chat(&url, &long_body).await;
    let mut long_stream = long.bytes_stream();
    // Wait until the long one is decoding.
    let mut seen = String::new();
    while !seen.contains("\"content\":\"") || seen.matches("data: ").count() < 3 {
        let chunk = long_stream
            .next()
            .await
            .expect("long stream alive")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
    let long_task = tokio::spawn(async move {
        while let Some(chunk) = long_stream.next().await {
            chunk.unwrap();
        }
        Instant::now()
    });
    let short_body = chat("Say hi.", json!({"max_tokens": 5, "ignore_eos": true}));
    let short = send_chat(&url, &short_body).await;
    assert_eq!(short.status(), 200);
    let short_done = Instant::now();
    let long_done = long_task.await.unwrap();
    assert!(
        short_done < long_done,
        "the short request waited for the long one"
    );
}

#[tokio::test]
async fn dropped_streams_are_freed_within_a_second() {
    let _turn = common::alone().await;
    let url = base().await;
    let mut streams = Vec::new();
    for i in 0..16 {
        let body = chat(
            &format!("Story number {i}:"),
            json!({"stream": true, "max_tokens": 2000, "ignore_eos": true}),
        );
        let r = send_chat(&url, &body).await;
        assert_eq!(r.status(), 200);
        streams.push(r.bytes_stream());
    }
    // Every stream has produced something, so every sequence is in the engine.
    for s in &mut streams {
        s.next().await.expect("first chunk").unwrap();
    }
    let h = health(&url).await;
    let busy = h["running"].as_u64().unwrap() + h["queued"].as_u64().unwrap();
    assert_eq!(busy, 16, "{h}");
    drop(streams);
    let dropped = Instant::now();
    loop {
        let h = health(&url).await;
        if h["running"] == 0 && h["queued"] == 0 && h["kv_blocks_used"] == 0 {
            break;
        }
        assert!(
            dropped.elapsed() < Duration::from_secs(1),
            "still busy after 1 s: {h}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A seeded, sampled request gives the same text alone and among 31 other streams: each
/// request has its own RNG and every kernel computes a row the same way at any batch size.
#[tokio::test]
async fn seeded_sample_is_the_same_alone_and_under_load() {
    let _turn = common::alone().await;
    let url = base().await;
    let probe = chat(
        "Tell me a short story about a lighthouse.",
        json!({"max_tokens": 40, "temperature": 0.9, "top_p": 0.95, "seed": 1234}),
    );
    let (status, alone) = common::post(&url, "/v1/chat/completions", &probe).await;
    assert_eq!(status, 200, "{alone}");

    let mut others = Vec::new();
    for i in 0..31 {
        let body = chat(
            &format!("Count from {i} to {}.", i + 40),
            json!({"max_tokens": 60, "temperature": 0.7, "ignore_eos": true}),
        );
        let url = url.clone();
        others.push(tokio::spawn(async move {
            common::post(&url, "/v1/chat/completions", &body).await
        }));
    }
    // Let the others start decoding, so the probe joins a full batch mid-flight.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, loaded) = common::post(&url, "/v1/chat/completions", &probe).await;
    assert_eq!(status, 200, "{loaded}");
    for o in others {
        assert_eq!(o.await.unwrap().0, 200);
    }
    assert_eq!(
        loaded["choices"][0]["message"]["content"],
        alone["choices"][0]["message"]["content"]
    );
}
