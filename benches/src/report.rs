//! The run's figures as a table for people and as JSON for tools.

use std::fmt::Write;

use serde::Serialize;

use crate::runner::LevelResult;
use crate::stats::Dist;

/// Everything a run measured, with the settings that produced it.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The command line, so a JSON file says how to reproduce it.
    pub command: String,
    /// Seconds since the Unix epoch when the run started.
    pub started_unix: u64,
    pub settings: serde_json::Value,
    pub levels: Vec<LevelResult>,
}

/// One row per level and target: requests, mean prompt tokens, throughput, then latency
/// percentiles in ms.
pub fn table(levels: &[LevelResult]) -> String {
    let multi = levels
        .iter()
        .map(|l| &l.target.url)
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<10} {}{:>5} {:>5} {:>7} {:>9} {:>7} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "load",
        if multi {
            format!("{:<28} ", "target")
        } else {
            String::new()
        },
        "ok",
        "fail",
        "prompt",
        "out tok/s",
        "req/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "TPOT p50",
        "E2E p50",
        "E2E p99",
    );
    for l in levels {
        let s = &l.summary;
        let target = if multi {
            format!("{:<28} ", truncate(&l.target.url, 28))
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "{:<10} {target}{:>5} {:>5} {:>7.0} {:>9.1} {:>7.2} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            l.load.label(),
            s.completed,
            s.failed,
            s.prompt_tokens as f64 / s.completed.max(1) as f64,
            s.output_tokens_per_s,
            s.requests_per_s,
            ms(s.ttft_ms.p50, &s.ttft_ms, 0),
            ms(s.ttft_ms.p99, &s.ttft_ms, 0),
            ms(s.itl_ms.p50, &s.itl_ms, 1),
            ms(s.itl_ms.p99, &s.itl_ms, 1),
            ms(s.tpot_ms.p50, &s.tpot_ms, 1),
            ms(s.e2e_ms.p50, &s.e2e_ms, 0),
            ms(s.e2e_ms.p99, &s.e2e_ms, 0),
        );
        for (status, n) in &s.failures {
            let _ = writeln!(out, "           {n} failed with {status}");
        }
        for t in l.turns.iter().flatten() {
            let _ = writeln!(
                out,
                "           turn {:>2}: {:>3} req, {:>6.0} B sent, prompt {:>6.0} tok ({:>6.0} cached), TTFT p50 {:>7.0} ms p99 {:>7.0} ms",
                t.turn + 1,
                t.requests,
                t.request_bytes_mean,
                t.prompt_tokens_mean,
                t.cached_tokens_mean,
                t.ttft_ms.p50,
                t.ttft_ms.p99,
            );
        }
    }
    out
}

/// A figure of `dist` with `decimals`, or `n/a` when nothing was measured.
fn ms(value: f64, dist: &Dist, decimals: usize) -> String {
    match dist.samples {
        0 => "n/a".into(),
        _ => format!("{value:.decimals$}"),
    }
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
