//! The load generator against a real chorus (real default model) on a free port: the JSON
//! report is complete, the chart is written, and every request produced `max_tokens`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chorus_server::config::Config;
use chorus_server::resolve::{resolve, DEFAULT_CACHE_DIR, DEFAULT_MODEL};
use serde_json::Value;

fn start_server() -> String {
    let resolved =
        resolve(DEFAULT_MODEL, Path::new(DEFAULT_CACHE_DIR)).expect("default model resolves");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            // Nothing here is stored: keep the user's state directory untouched.
            let config = Config {
                no_store: true,
                ..Config::defaults()
            };
            chorus_server::run(
                listener,
                config,
                resolved.path,
                resolved.name,
                std::future::pending(),
            )
            .await
            .expect("server runs");
        });
    });
    let url = format!("http://{addr}");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !health_ok(&addr) {
        assert!(Instant::now() < deadline, "chorus did not become ready");
        std::thread::sleep(Duration::from_millis(100));
    }
    url
}

/// A bare HTTP/1.1 health probe, so the test needs no async client of its own.
fn health_ok(addr: &std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.starts_with("HTTP/1.1 200")
}

fn out_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("chorus-bench-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_chorus-bench"))
        .args(args)
        .output()
        .expect("chorus-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "chorus-bench failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn report_is_complete_and_counts_match_max_tokens() {
    let url = start_server();
    let dir = out_dir("levels");
    let (json, svg) = (dir.join("r.json"), dir.join("r.svg"));
    let table = bench(&[
        "--url",
        &url,
        "--concurrency",
        "1,3",
        "--requests-per-level",
        "3",
        "--max-tokens",
        "8",
        "--prompt-tokens",
        "20",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    assert!(table.contains("c=1") && table.contains("c=3"), "{table}");
    // Each figure sits under its name: the table's `out tok/s` column ends where the
    // JSON's figure does (the header was one column short).
    let header = table
        .lines()
        .find(|l| l.starts_with("load"))
        .expect("header");
    let row = table
        .lines()
        .find(|l| l.starts_with("c=1 "))
        .expect("c=1 row");
    assert_eq!(header.len(), row.len(), "{table}");

    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).unwrap();
    assert_eq!(report["settings"]["targets"][0]["model"], DEFAULT_MODEL);
    let levels = report["levels"].as_array().expect("levels");
    assert_eq!(levels.len(), 2);
    for (level, streams) in levels.iter().zip([1, 3]) {
        assert_eq!(level["load"]["concurrency"], streams);
        let s = &level["summary"];
        assert_eq!(s["completed"], 3, "{s}");
        assert_eq!(s["failed"], 0, "{s}");
        assert_eq!(
            s["output_tokens"],
            3 * 8,
            "every request yields max_tokens: {s}"
        );
        assert!(s["prompt_tokens"].as_u64().unwrap() >= 3 * 20);
        for metric in ["ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"] {
            for stat in ["mean", "p50", "p90", "p99", "max"] {
                let v = s[metric][stat].as_f64().unwrap_or(-1.0);
                assert!(v > 0.0, "{metric}.{stat} = {v}");
            }
        }
        assert!(s["ttft_ms"]["p50"].as_f64() <= s["e2e_ms"]["p50"].as_f64());
        assert!(s["output_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert_eq!(s["goodput"], s["requests_per_s"]);
    }
    let out_end = header.find("out tok/s").expect("column") + "out tok/s".len();
    let figure = format!(
        "{:.1}",
        levels[0]["summary"]["output_tokens_per_s"]
            .as_f64()
            .unwrap()
    );
    assert!(
        row[..out_end].ends_with(&figure),
        "{figure} not under out tok/s:\n{table}"
    );
    let chart = std::fs::read_to_string(&svg).expect("svg written");
    assert!(chart.starts_with("<svg") && chart.contains("output tokens/s"));

    // Multi-turn: each stream resends its history, so later turns carry longer prompts.
    let json2 = dir.join("turns.json");
    bench(&[
        "--url",
        &url,
        "--concurrency",
        "2",
        "--multi-turn",
        "3",
        "--max-tokens",
        "4",
        "--prompt-tokens",
        "10",
        "--json",
        json2.to_str().unwrap(),
    ]);
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json2).expect("json written")).unwrap();
    let turns = report["levels"][0]["turns"]
        .as_array()
        .expect("per-turn figures");
    assert_eq!(turns.len(), 3);
    let prompt = |t: usize| turns[t]["prompt_tokens_mean"].as_f64().unwrap();
    assert!(prompt(0) < prompt(1) && prompt(1) < prompt(2), "{turns:?}");
    assert_eq!(report["levels"][0]["summary"]["completed"], 6);
    let _ = std::fs::remove_dir_all(dir);
}

/// `--tool-call` counts a request only when a call came back: with room for one, every
/// request makes one; cut short by --max-tokens (the server drops a cut call), none
/// succeed, and the run says so in its exit status. A URL that is not one is refused.
#[test]
fn tool_call_runs_count_only_answers_with_a_call() {
    let url = start_server();
    let dir = out_dir("tools");
    let json = dir.join("t.json");
    let common = [
        "--url",
        &url,
        "--concurrency",
        "1",
        "--requests-per-level",
        "2",
    ];
    let table = bench(
        &[
            &common[..],
            &[
                "--tool-call",
                "--max-tokens",
                "128",
                "--json",
                json.to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).unwrap();
    let s = &report["levels"][0]["summary"];
    assert_eq!(
        (s["completed"].as_u64(), s["failed"].as_u64()),
        (Some(2), Some(0)),
        "{table}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_chorus-bench"))
        .args(
            [
                &common[..],
                &["--tool-call", "--max-tokens", "8", "--warmup", "0"],
            ]
            .concat(),
        )
        .output()
        .expect("chorus-bench runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}\n{stderr}");
    // Nothing measured is shown as such, not as 0 ms.
    assert!(
        stdout.contains("n/a") && stdout.contains("2 failed"),
        "{stdout}"
    );
    assert!(stderr.contains("no request succeeded"), "{stderr}");

    let out = Command::new(env!("CARGO_BIN_EXE_chorus-bench"))
        .args(["--url", "notaurl"])
        .output()
        .expect("chorus-bench runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an http"));
    let _ = std::fs::remove_dir_all(dir);
}
