//! Drives the load: levels of closed-loop concurrency or open-loop Poisson arrivals,
//! each run against every target in turn (level by level, so drift of a shared machine
//! hits all targets alike).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;

use crate::client::{chat, respond, Api, RequestShape};
use crate::stats::{by_turn, RequestRecord, Slo, Summary, TurnTtft};
use crate::workload::Workload;

/// One server under test.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub url: String,
    pub model: String,
}

/// How load is offered in a level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Closed loop: this many streams, each sending its next request when the last ends.
    Concurrency(usize),
    /// Open loop: requests arrive as a Poisson process with this mean rate (per second).
    RequestRate(f64),
}

impl Load {
    pub fn label(&self) -> String {
        match self {
            Load::Concurrency(c) => format!("c={c}"),
            Load::RequestRate(r) => format!("{r} req/s"),
        }
    }

    /// The x coordinate of this level in charts.
    pub fn x(&self) -> f64 {
        match *self {
            Load::Concurrency(c) => c as f64,
            Load::RequestRate(r) => r,
        }
    }
}

/// Everything a level needs besides its load and target.
#[derive(Debug, Clone)]
pub struct Plan {
    pub workload: Workload,
    pub max_tokens: usize,
    pub ignore_eos: bool,
    pub temperature: f64,
    /// Every request requires a function call (`--tool-call`).
    pub tool_call: bool,
    /// The endpoint that carries conversations.
    pub api: Api,
    /// Turns per conversation (1: every request is a fresh conversation).
    pub turns: usize,
    /// Requests per level; `None` derives it from the load (see [`Plan::requests_for`]).
    pub requests: Option<usize>,
    /// Run each level for this long instead of a request count.
    pub duration: Option<Duration>,
    pub slo: Slo,
}

impl Plan {
    /// Requests in a level: as given, else enough for every stream to finish two
    /// requests (or one whole conversation), at least 8.
    pub fn requests_for(&self, load: Load) -> usize {
        self.requests.unwrap_or(match load {
            Load::Concurrency(c) if self.turns > 1 => c * self.turns,
            Load::Concurrency(c) => (2 * c).max(8),
            Load::RequestRate(_) => 32,
        })
    }
}

/// The outcome of one level against one target.
#[derive(Debug, Clone, Serialize)]
pub struct LevelResult {
    pub target: Target,
    pub load: Load,
    pub summary: Summary,
    /// TTFT per conversation turn, for multi-turn runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turns: Option<Vec<TurnTtft>>,
}

/// Runs one level against one target.
pub async fn run_level(
    http: &reqwest::Client,
    target: &Target,
    load: Load,
    plan: &Plan,
    seed: u64,
) -> LevelResult {
    let total = plan.requests_for(load);
    let bar = progress(target, load, plan, total);
    let started = Instant::now();
    let records = match load {
        Load::Concurrency(c) => closed_loop(http, target, plan, c, total, started, &bar).await,
        Load::RequestRate(r) => open_loop(http, target, plan, r, total, seed, started, &bar).await,
    };
    let duration = started.elapsed().as_secs_f64();
    bar.finish_and_clear();
    LevelResult {
        target: target.clone(),
        load,
        summary: Summary::new(&records, duration, plan.slo),
        turns: (plan.turns > 1).then(|| by_turn(&records)),
    }
}

fn shape(target: &Target, plan: &Plan) -> RequestShape {
    RequestShape {
        model: target.model.clone(),
        max_tokens: plan.max_tokens,
        ignore_eos: plan.ignore_eos,
        temperature: plan.temperature,
        tool_call: plan.tool_call,
        api: plan.api,
    }
}

async fn closed_loop(
    http: &reqwest::Client,
    target: &Target,
    plan: &Plan,
    streams: usize,
    total: usize,
    started: Instant,
    bar: &ProgressBar,
) -> Vec<RequestRecord> {
    let tickets = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for stream in 0..streams {
        let (http, base, shape) = (http.clone(), target.url.clone(), shape(target, plan));
        let (plan, tickets, bar) = (plan.clone(), tickets.clone(), bar.clone());
        tasks.spawn(async move {
            let mut records = Vec::new();
            let mut history = plan.workload.conversation();
            let instructions = history
                .first()
                .and_then(|m| m["content"].as_str())
                .map(str::to_string);
            let mut previous: Option<String> = None;
            let mut turn = 0;
            for index in 0.. {
                let more = match plan.duration {
                    Some(d) => started.elapsed() < d,
                    None => tickets.fetch_add(1, Ordering::Relaxed) < total,
                };
                if !more {
                    break;
                }
                if turn == plan.turns {
                    (history, turn, previous) = (plan.workload.conversation(), 0, None);
                }
                let user = plan.workload.user_message(stream, index);
                history.push(json!({"role": "user", "content": user}));
                let at = started.elapsed().as_secs_f64();
                let reply = match shape.api {
                    Api::Chat => chat(&http, &base, &shape, &history).await,
                    Api::Responses => {
                        let previous = previous.as_deref().filter(|_| plan.turns > 1);
                        respond(
                            &http,
                            &base,
                            &shape,
                            instructions.as_deref(),
                            &user,
                            previous,
                        )
                        .await
                    }
                };
                previous = reply.response_id.clone();
                history.push(json!({"role": "assistant", "content": reply.text}));
                let mut record = reply.record;
                (record.start, record.turn) = (at, turn);
                turn += 1;
                if plan.turns == 1 {
                    history.truncate(history.len() - 2);
                }
                // No answer at all (the server is down or refusing connections): wait a
                // little before the next try rather than spin on connection errors.
                let unanswered = record.status.is_none();
                records.push(record);
                bar.inc(1);
                if unanswered {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            records
        });
    }
    tasks.join_all().await.into_iter().flatten().collect()
}

#[allow(clippy::too_many_arguments)]
async fn open_loop(
    http: &reqwest::Client,
    target: &Target,
    plan: &Plan,
    rate: f64,
    total: usize,
    seed: u64,
    started: Instant,
    bar: &ProgressBar,
) -> Vec<RequestRecord> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tasks = JoinSet::new();
    let mut next = 0.0;
    for index in 0..total {
        if plan.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        // Exponential inter-arrival gaps make a Poisson process.
        let u: f64 = rng.random_range(f64::EPSILON..1.0);
        next += -u.ln() / rate;
        tokio::time::sleep_until((started + Duration::from_secs_f64(next)).into()).await;
        let (http, base, shape) = (http.clone(), target.url.clone(), shape(target, plan));
        let mut messages: Vec<Value> = plan.workload.conversation();
        messages.push(json!({"role": "user", "content": plan.workload.user_message(0, index)}));
        let bar = bar.clone();
        tasks.spawn(async move {
            let at = started.elapsed().as_secs_f64();
            let mut record = chat(&http, &base, &shape, &messages).await.record;
            record.start = at;
            bar.inc(1);
            record
        });
    }
    tasks.join_all().await
}

fn progress(target: &Target, load: Load, plan: &Plan, total: usize) -> ProgressBar {
    let bar = match plan.duration {
        Some(d) => ProgressBar::new_spinner().with_message(format!("for {d:?}")),
        None => ProgressBar::new(total as u64),
    };
    let template = "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {msg}";
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style);
    }
    bar.set_prefix(format!("{} {}", target.url, load.label()));
    bar
}
