//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format. Names follow
//! DESIGN.md (prefix `chorus_`). Counters and histograms are updated where things happen
//! (the HTTP middleware, the inference thread); gauges are read from the engine's live
//! [`Stats`](crate::engine::Stats) at scrape time.

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::engine::Stats;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route's pattern (`/v1/chat/completions`), or `other` for unknown paths, so a
    /// client cannot create unbounded label values.
    pub endpoint: String,
    pub status: u16,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    queue_depth: Gauge,
    running: Gauge,
    kv_blocks_used: Gauge,
    kv_blocks_total: Gauge,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_cache_hits: Counter,
    pub preemptions: Counter,
    /// Function calls returned to clients.
    pub tool_calls: Counter,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
    pub batch_tokens: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chorus");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let queue_depth = gauge(
            &mut registry,
            "request_queue_depth",
            "Requests waiting to start",
        );
        let running = gauge(
            &mut registry,
            "running_sequences",
            "Sequences in the running batch",
        );
        let kv_blocks_used = gauge(
            &mut registry,
            "kv_blocks_used",
            "KV blocks held by sequences",
        );
        let kv_blocks_total = gauge(&mut registry, "kv_blocks_total", "KV blocks in the pool");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let prompt_tokens = counter(
            &mut registry,
            "prompt_tokens",
            "Prompt tokens of started requests",
        );
        let generation_tokens = counter(&mut registry, "generation_tokens", "Tokens generated");
        let prefix_cache_hits = counter(
            &mut registry,
            "prefix_cache_hits",
            "Prompt tokens served from the prefix cache",
        );
        let preemptions = counter(
            &mut registry,
            "preemptions",
            "Sequences preempted for lack of KV blocks (recomputed later)",
        );
        let tool_calls = counter(
            &mut registry,
            "tool_calls",
            "Function calls returned to clients",
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str, start: f64| {
            let h = Histogram::new(exponential_buckets(start, 2.0, 16));
            registry.register(name, help, h.clone());
            h
        };
        let ttft = histogram(
            &mut registry,
            "time_to_first_token_seconds",
            "From arrival to the first generated token",
            0.005,
        );
        let inter_token = histogram(
            &mut registry,
            "inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            0.001,
        );
        let request_duration = histogram(
            &mut registry,
            "request_duration_seconds",
            "From arrival to the last token",
            0.01,
        );
        let batch_tokens = histogram(
            &mut registry,
            "batch_tokens",
            "Tokens in one forward step",
            1.0,
        );
        Self {
            registry,
            requests,
            queue_depth,
            running,
            kv_blocks_used,
            kv_blocks_total,
            prompt_tokens,
            generation_tokens,
            tool_calls,
            prefix_cache_hits,
            preemptions,
            ttft,
            inter_token,
            request_duration,
            batch_tokens,
        }
    }

    /// The exposition text, with gauges read from `stats` (absent while loading).
    pub fn render(&self, stats: Option<&Stats>) -> String {
        use std::sync::atomic::Ordering::Acquire;
        if let Some(s) = stats {
            let set = |g: &Gauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
            set(&self.queue_depth, s.queued.load(Acquire));
            set(&self.running, s.running.load(Acquire));
            set(&self.kv_blocks_used, s.kv_blocks_used.load(Acquire));
            set(&self.kv_blocks_total, s.kv_blocks_total.load(Acquire));
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
