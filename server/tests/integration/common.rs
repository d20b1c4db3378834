//! A real chorus server with the real default model, on a free loopback port, shared by
//! the tests of one test binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use chorus_server::config::Config;
use chorus_server::resolve::{resolve_at, DEFAULT_MODEL};
use serde_json::{json, Value};

static SERVER: OnceLock<Server> = OnceLock::new();

/// Base URL of the shared server, once it answers `/health` with 200.
pub async fn base() -> String {
    let url = SERVER.get_or_init(|| start(Config::defaults())).url.clone();
    wait_ready(&url).await;
    url
}

/// A server of one test: it derefs to its base URL, and is shut down when dropped, so
/// that the servers of a test binary do not pile up their weights and KV caches (written
/// through at start) until the machine's memory runs out.
pub struct Server {
    url: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::ops::Deref for Server {
    type Target = String;

    fn deref(&self) -> &String {
        &self.url
    }
}

impl std::fmt::Display for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url)
    }
}

impl Drop for Server {
    /// Shuts the server down as SIGTERM would and waits until `run` has returned.
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A server that failed has said so in its own panic; this one is a test's end.
            let _ = thread.join();
        }
    }
}

/// A server's configuration from its command-line flags.
pub fn config(args: &[&str]) -> Config {
    use clap::Parser;
    Config::parse_from(std::iter::once("chorus").chain(args.iter().copied()))
}

/// Starts a server with `config` (its `--model`, the default one unless set) on its own
/// thread and runtime; it serves until the returned [`Server`] is dropped.
pub fn start(mut config: Config) -> Server {
    // Stored responses go to a directory of this test run, not the user's state.
    if config.state_dir == Config::defaults().state_dir {
        config.state_dir = state_root().join(format!("{:x}", rand_suffix()));
    }
    // Requests a test leaves running when it ends are not waited on for long.
    if config.shutdown_grace == Config::defaults().shutdown_grace {
        config.shutdown_grace = 1;
    }
    let resolved = resolve_at(&config.model, &config.models_dir, &config.revision)
        .expect("the model resolves");
    let name = config.served_model_name.clone().unwrap_or(resolved.name);
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            tx.send(listener.local_addr().expect("addr"))
                .expect("send addr");
            chorus_server::run(listener, config, resolved.path, name, async move {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
    });
    let addr = rx.recv().expect("server thread started");
    Server {
        url: format!("http://{addr}"),
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// This test process's folder for its servers' state. The servers run until the process
/// exits, so nothing can remove it then: each process removes the folders of test
/// processes that are gone instead.
fn state_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let all = std::env::temp_dir().join("chorus-test-state");
        if let Ok(entries) = std::fs::read_dir(&all) {
            for entry in entries.flatten() {
                let pid = entry.file_name().to_string_lossy().parse::<u32>();
                if pid.is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists()) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        all.join(std::process::id().to_string())
    })
}

fn rand_suffix() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    u128::from(h.finish())
}

pub async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = reqwest::get(format!("{url}/health")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {url} did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn health(url: &str) -> Value {
    get_json(url, "/health").await
}

/// `/metrics` as text.
pub async fn metrics(url: &str) -> String {
    let r = reqwest::get(format!("{url}/metrics"))
        .await
        .expect("/metrics");
    r.text().await.expect("the metrics' text")
}

/// `/health` once nothing runs and no KV block is held, or after 10 s as it is then. A
/// request's last event reaches its client before the worker retires it and publishes
/// what it freed.
pub async fn settled(url: &str) -> Value {
    let mut h = health(url).await;
    for _ in 0..100 {
        if h["running"] == 0 && h["kv_blocks_used"] == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        h = health(url).await;
    }
    h
}

/// `GET path` as JSON, whatever the status.
pub async fn get_json(url: &str, path: &str) -> Value {
    reqwest::get(format!("{url}{path}"))
        .await
        .expect(path)
        .json()
        .await
        .expect("json")
}

pub async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = send(url, path, body).await;
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let value =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON ({status}): {text}"));
    (status, value)
}

/// Asserts that the server at `url` still answers a short chat (after something that
/// might have hurt it).
#[allow(dead_code)]
pub async fn assert_serves(url: &str) {
    let body = chat("Say hi.", serde_json::json!({"max_tokens": 2}));
    let (status, v) = post(url, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{v}");
}

/// POSTs `body` as JSON and returns the response as it starts (for reading a stream).
pub async fn send(url: &str, path: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .expect("request sent")
}

/// [`send`] to the chat endpoint.
pub async fn send_chat(url: &str, body: &Value) -> reqwest::Response {
    send(url, "/v1/chat/completions", body).await
}

/// The SSE events (without the `data: ` prefix) of a complete streamed response.
pub async fn stream_events(url: &str, path: &str, body: &Value) -> Vec<String> {
    let r = send(url, path, body).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("body");
    parse_sse(&text)
}

/// The text a streamed chat completion's events carry: every chunk's `delta.content`
/// joined (the role chunk, the finish chunk and `[DONE]` add nothing).
pub fn streamed_content(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|e| {
            e["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect()
}

/// Splits an SSE body into event payloads, asserting the framing on the way.
pub fn parse_sse(text: &str) -> Vec<String> {
    assert!(
        text.ends_with("\n\n"),
        "stream does not end with a blank line"
    );
    text.strip_suffix("\n\n")
        .unwrap_or(text)
        .split("\n\n")
        .map(|event| {
            assert!(
                !event.contains('\n'),
                "event spans several lines: {event:?}"
            );
            event
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("event without `data: ` prefix: {event:?}"))
                .to_string()
        })
        .collect()
}

pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": DEFAULT_MODEL,
        "messages": [{"role": "user", "content": content}],
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body
}

/// Turns in this test binary: a test that times streams or counts the server's requests
/// and connections holds it alone, the others share it.
static TURNS: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// This test's turn, with no other test running beside it.
pub async fn alone() -> tokio::sync::RwLockWriteGuard<'static, ()> {
    TURNS.write().await
}

/// This test's turn, beside others that share theirs.
pub async fn together() -> tokio::sync::RwLockReadGuard<'static, ()> {
    TURNS.read().await
}

/// [`together`] for a test outside a runtime.
pub fn together_blocking() -> tokio::sync::RwLockReadGuard<'static, ()> {
    TURNS.blocking_read()
}
