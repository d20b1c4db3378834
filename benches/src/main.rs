//! `chorus-bench`: streaming load against one or more OpenAI-compatible servers.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use chorus_bench::client::{self, RequestShape};
use chorus_bench::report::{table, Report};
use chorus_bench::runner::{run_level, Load, Plan, Target};
use chorus_bench::stats::Slo;
use chorus_bench::workload::Workload;
use clap::Parser;
use serde_json::json;

#[derive(Debug, Parser)]
#[command(
    name = "chorus-bench",
    about = "Measure an OpenAI-compatible chat server under concurrent streaming load"
)]
struct Args {
    /// Base URL of a server (repeat to compare servers level by level in one run).
    #[arg(long = "url", required = true)]
    urls: Vec<String>,

    /// Model to request; default: the first id each server lists at /v1/models.
    #[arg(long)]
    model: Option<String>,

    /// Closed-loop levels: streams that each send requests back to back.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,

    /// Open-loop levels instead: mean request rates (req/s) with Poisson arrivals.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    request_rate: Vec<f64>,

    /// Requests per level (default: 2 per stream, at least 8; one conversation per stream
    /// with --multi-turn; 32 per open-loop level).
    #[arg(long, conflicts_with = "duration")]
    requests_per_level: Option<usize>,

    /// Run each level for this many seconds instead of a request count.
    #[arg(long)]
    duration: Option<f64>,

    /// Prompt length in words (about one token each for common English words).
    #[arg(long, default_value_t = 80)]
    prompt_tokens: usize,

    /// Output tokens per request.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,

    /// Ask the server to ignore end-of-sequence, so every request yields exactly
    /// --max-tokens tokens (pass `--ignore-eos false` for natural lengths).
    #[arg(long, default_value_t = true, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    ignore_eos: bool,

    /// Sampling temperature of every request.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,

    /// Seed for prompts and arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Turns per conversation: each stream resends its growing history, as chat clients do.
    #[arg(long, default_value_t = 1)]
    multi_turn: usize,

    /// Words of a system prompt shared by every request (0: none).
    #[arg(long, default_value_t = 0)]
    shared_prefix_tokens: usize,

    /// Requests sent to each target before measuring (not counted).
    #[arg(long, default_value_t = 1)]
    warmup: usize,

    /// Goodput SLO: time to first token, ms.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,

    /// Goodput SLO: time per output token, ms.
    #[arg(long)]
    slo_tpot_ms: Option<f64>,

    /// Give up on a request after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout: f64,

    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,

    /// Write a chart (tokens/s and TTFT against load) here.
    #[arg(long)]
    svg: Option<PathBuf>,

    /// Offer a weather-lookup function with every request and require a call (measures
    /// constrained function calling; a call ends when its JSON closes, whatever
    /// --max-tokens).
    #[arg(long)]
    tool_call: bool,

    /// Endpoint: chat (`/v1/chat/completions`, each turn resends the history) or
    /// responses (`/v1/responses`, each turn sends its message and
    /// `previous_response_id`; needs --ignore-eos false and closed-loop levels).
    #[arg(long, value_enum, default_value_t = client::Api::Chat)]
    api: client::Api,

    /// Hold this many idle keep-alive connections open to each target during the run
    /// (each after one answered `GET /health`). The server's idle timeout must outlast
    /// the run for them to stay open.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    let result = match runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(format!("cannot start the runtime: {e}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chorus-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), String> {
    if args.multi_turn == 0 || args.max_tokens == 0 {
        return Err("--multi-turn and --max-tokens must be at least 1".into());
    }
    if args.concurrency.contains(&0) {
        return Err("--concurrency values must be at least 1".into());
    }
    if args.duration.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        return Err("--duration must be a positive number of seconds".into());
    }
    for url in &args.urls {
        match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {}
            _ => return Err(format!("--url {url:?} is not an http:// or https:// URL")),
        }
    }
    if args.multi_turn > 1 && !args.request_rate.is_empty() {
        return Err("--multi-turn needs closed-loop --concurrency levels".into());
    }
    if args.api == client::Api::Responses && (args.ignore_eos || !args.request_rate.is_empty()) {
        return Err(
            "--api responses needs --ignore-eos false (the Responses API has no ignore_eos) and closed-loop --concurrency levels".into(),
        );
    }
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs_f64(args.timeout))
        .build()
        .map_err(|e| e.to_string())?;
    let mut targets = Vec::new();
    for url in &args.urls {
        let model = match &args.model {
            Some(m) => m.clone(),
            None => client::models(&http, url)
                .await?
                .into_iter()
                .next()
                .ok_or_else(|| format!("{url} lists no models; pass --model"))?,
        };
        targets.push(Target {
            url: url.trim_end_matches('/').to_string(),
            model,
        });
    }
    let plan = Plan {
        workload: Workload::new(args.seed, args.prompt_tokens, args.shared_prefix_tokens),
        max_tokens: args.max_tokens,
        ignore_eos: args.ignore_eos,
        temperature: args.temperature,
        tool_call: args.tool_call,
        api: args.api,
        turns: args.multi_turn,
        requests: args.requests_per_level,
        duration: args.duration.map(Duration::from_secs_f64),
        slo: Slo {
            ttft_ms: args.slo_ttft_ms,
            tpot_ms: args.slo_tpot_ms,
        },
    };
    let loads: Vec<Load> = if args.request_rate.is_empty() {
        args.concurrency
            .iter()
            .map(|&c| Load::Concurrency(c))
            .collect()
    } else {
        args.request_rate
            .iter()
            .map(|&r| Load::RequestRate(r))
            .collect()
    };
    if loads
        .iter()
        .any(|l| matches!(l, Load::RequestRate(r) if *r <= 0.0))
    {
        return Err("--request-rate values must be positive".into());
    }

    for target in &targets {
        warm_up(&http, target, &plan, args.warmup).await?;
    }
    let mut idle = Vec::new();
    for target in &targets {
        idle.extend(chorus_bench::idle::open(&target.url, args.idle_connections).await?);
    }
    if !idle.is_empty() {
        eprintln!("holding {} idle connections", idle.len());
    }
    let started_unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let begun = Instant::now();
    let mut levels = Vec::new();
    for (i, &load) in loads.iter().enumerate() {
        for target in &targets {
            let seed = args.seed.wrapping_add(i as u64);
            let level = run_level(&http, target, load, &plan, seed).await;
            eprintln!(
                "{} {}: {:.1} output tok/s, TTFT p50 {:.0} ms, {} ok, {} failed",
                target.url,
                load.label(),
                level.summary.output_tokens_per_s,
                level.summary.ttft_ms.p50,
                level.summary.completed,
                level.summary.failed
            );
            levels.push(level);
        }
    }
    eprintln!("done in {:.0} s", begun.elapsed().as_secs_f64());
    drop(idle);
    print!("{}", table(&levels));

    if let Some(path) = &args.json {
        let report = Report {
            command: std::env::args().collect::<Vec<_>>().join(" "),
            started_unix,
            settings: json!({
                "targets": targets,
                "prompt_words": args.prompt_tokens,
                "max_tokens": args.max_tokens,
                "ignore_eos": args.ignore_eos,
                "temperature": args.temperature,
                "seed": args.seed,
                "multi_turn": args.multi_turn,
                "api": args.api,
                "shared_prefix_words": args.shared_prefix_tokens,
                "requests_per_level": args.requests_per_level,
                "duration_s": args.duration,
                "slo": plan.slo,
            }),
            levels: levels.clone(),
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.svg {
        chorus_bench::chart::write_svg(path, &levels)?;
    }
    // A level where nothing succeeded measured nothing: say so in the exit status.
    let empty: Vec<String> = levels
        .iter()
        .filter(|l| l.summary.completed == 0)
        .map(|l| format!("{} {}", l.target.url, l.load.label()))
        .collect();
    if !empty.is_empty() {
        return Err(format!("no request succeeded at {}", empty.join(", ")));
    }
    Ok(())
}

/// Sends `n` short requests so that first-request costs (connections, page faults) stay
/// out of the measurements; fails early if the target does not answer at all.
async fn warm_up(
    http: &reqwest::Client,
    target: &Target,
    plan: &Plan,
    n: usize,
) -> Result<(), String> {
    let shape = RequestShape {
        model: target.model.clone(),
        // A call needs room to finish: only a text answer is cut short.
        max_tokens: match plan.tool_call {
            true => plan.max_tokens,
            false => plan.max_tokens.min(8),
        },
        ignore_eos: plan.ignore_eos,
        temperature: plan.temperature,
        tool_call: plan.tool_call,
        api: plan.api,
    };
    for i in 0..n {
        let messages =
            vec![json!({"role": "user", "content": plan.workload.user_message(usize::MAX, i)})];
        let reply = client::chat(http, &target.url, &shape, &messages).await;
        if let Some(e) = reply.record.error {
            return Err(format!("{} failed its warm-up request: {e}", target.url));
        }
    }
    Ok(())
}
