//! Prometheus metrics, served at `/metrics` in the OpenMetrics text format. Names follow
//! DESIGN.md (prefix `chorus_`). Counters and histograms are updated where things happen
//! (the HTTP middleware, the inference thread); gauges are read from the engine's live
//! [`Stats`](crate::engine::Stats) at scrape time.
//!
//! The same values are also exposed under vLLM's names (`vllm:num_requests_running`, ...,
//! labelled `model_name`), the ones routers and autoscalers read to balance load across
//! replicas (smg, vLLM's production stack, the Gateway API Inference Extension, KEDA
//! rules written for vLLM). They are the same counters, not copies: one value, two names.

use std::borrow::Cow;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

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
    /// Fraction of the KV pool held by sequences, 0 to 1 (vLLM's `kv_cache_usage_perc`).
    kv_usage: Gauge<f64, AtomicU64>,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Prompt tokens whose keys and values came from the prefix cache.
    pub prefix_cache_hits: Counter,
    pub preemptions: Counter,
    /// Function calls returned to clients.
    pub tool_calls: Counter,
    /// Connections answered 503 and closed at `--max-connections`, before any request
    /// on them was read far enough to be routed (so not in `requests`).
    pub connections_refused: Counter,
    pub ttft: Histogram,
    pub inter_token: Histogram,
    pub request_duration: Histogram,
    pub batch_tokens: Histogram,
}

impl Metrics {
    /// Metrics for a server of the model `model_name` (the vLLM names' label).
    pub fn new(model_name: &str) -> Self {
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("chorus");
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
            registry,
            "request_queue_depth",
            "Requests and sequences waiting for a slot (preempted ones and choices included)",
        );
        let running = gauge(
            registry,
            "running_sequences",
            "Sequences in the running batch",
        );
        let kv_blocks_used = gauge(registry, "kv_blocks_used", "KV blocks held by sequences");
        let kv_blocks_total = gauge(registry, "kv_blocks_total", "KV blocks in the pool");
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let prompt_tokens = counter(
            registry,
            "prompt_tokens",
            "Prompt tokens of started requests",
        );
        let generation_tokens = counter(registry, "generation_tokens", "Tokens generated");
        let prefix_cache_hits = counter(
            registry,
            "prefix_cache_hits",
            "Prompt tokens served from the prefix cache",
        );
        let preemptions = counter(
            registry,
            "preemptions",
            "Sequences preempted for lack of KV blocks (recomputed later)",
        );
        let tool_calls = counter(registry, "tool_calls", "Function calls returned to clients");
        let connections_refused = counter(
            registry,
            "connections_refused",
            "Connections answered 503 at --max-connections",
        );
        let histogram = |registry: &mut Registry, name: &str, help: &str, start: f64| {
            let h = Histogram::new(exponential_buckets(start, 2.0, 16));
            registry.register(name, help, h.clone());
            h
        };
        let ttft = histogram(
            registry,
            "time_to_first_token_seconds",
            "From arrival to the first generated token",
            0.005,
        );
        let inter_token = histogram(
            registry,
            "inter_token_latency_seconds",
            "Between consecutive tokens of one request",
            0.001,
        );
        let request_duration = histogram(
            registry,
            "request_duration_seconds",
            "From arrival to the end: the last token, an error, or the client leaving",
            0.01,
        );
        let batch_tokens = histogram(registry, "batch_tokens", "Tokens in one forward step", 1.0);
        let kv_usage = Gauge::<f64, AtomicU64>::default();
        let vllm = root.sub_registry_with_label((
            Cow::Borrowed("model_name"),
            Cow::Owned(label_value(model_name)),
        ));
        fn alias(vllm: &mut Registry, name: &str, help: &str, metric: impl Metric) {
            vllm.register(format!("vllm:{name}"), help, metric);
        }
        alias(
            vllm,
            "num_requests_running",
            "Requests in the running batch",
            running.clone(),
        );
        alias(
            vllm,
            "num_requests_waiting",
            "Requests and sequences waiting for a slot (preempted ones and choices included)",
            queue_depth.clone(),
        );
        alias(
            vllm,
            "kv_cache_usage_perc",
            "KV cache usage, 1 is full",
            kv_usage.clone(),
        );
        alias(
            vllm,
            "gpu_cache_usage_perc",
            "KV cache usage (older name)",
            kv_usage.clone(),
        );
        let queries = "Prompt tokens looked up in the prefix cache";
        alias(vllm, "prefix_cache_queries", queries, prompt_tokens.clone());
        let hits = "Prompt tokens found in the prefix cache";
        alias(vllm, "prefix_cache_hits", hits, prefix_cache_hits.clone());
        let prompt = "Prompt tokens of started requests";
        alias(vllm, "prompt_tokens", prompt, prompt_tokens.clone());
        alias(
            vllm,
            "generation_tokens",
            "Tokens generated",
            generation_tokens.clone(),
        );
        let preempted = "Sequences preempted for lack of KV blocks";
        alias(vllm, "num_preemptions", preempted, preemptions.clone());
        let first = "From arrival to the first generated token";
        alias(vllm, "time_to_first_token_seconds", first, ttft.clone());
        let between = "Between consecutive tokens of one request";
        alias(
            vllm,
            "inter_token_latency_seconds",
            between,
            inter_token.clone(),
        );
        let e2e = "From arrival to the end: the last token, an error, or the client leaving";
        alias(
            vllm,
            "e2e_request_latency_seconds",
            e2e,
            request_duration.clone(),
        );
        Self {
            registry: root,
            kv_usage,
            requests,
            queue_depth,
            running,
            kv_blocks_used,
            kv_blocks_total,
            prompt_tokens,
            generation_tokens,
            tool_calls,
            connections_refused,
            prefix_cache_hits,
            preemptions,
            ttft,
            inter_token,
            request_duration,
            batch_tokens,
        }
    }

    /// Prompt tokens served from the prefix cache over all prompt tokens since start.
    pub fn prefix_cache_hit_rate(&self) -> f64 {
        let prompt = self.prompt_tokens.get();
        self.prefix_cache_hits.get() as f64 / prompt.max(1) as f64
    }

    /// The exposition text, with gauges read from `stats` (absent while loading);
    /// `preprocessing`: requests waiting for a preprocessing thread, waiting too.
    pub fn render(&self, stats: Option<&Stats>, preprocessing: usize) -> String {
        use std::sync::atomic::Ordering::Acquire;
        if let Some(s) = stats {
            let set = |g: &Gauge, v: usize| g.set(i64::try_from(v).unwrap_or(i64::MAX));
            set(&self.queue_depth, s.waiting() + preprocessing);
            set(&self.running, s.running.load(Acquire));
            set(&self.kv_blocks_used, s.kv_blocks_used.load(Acquire));
            set(&self.kv_blocks_total, s.kv_blocks_total.load(Acquire));
            let (used, total) = (
                s.kv_blocks_used.load(Acquire),
                s.kv_blocks_total.load(Acquire),
            );
            self.kv_usage.set(used as f64 / total.max(1) as f64);
        }
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// An OpenMetrics page in Prometheus' classic text format (0.0.4): a counter's `# TYPE`
/// and `# HELP` name its samples (`x_total`, where OpenMetrics names the family `x`), and
/// the lines 0.0.4 does not have (`# UNIT`, `# EOF`) go. Samples are the same in both.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let described = ["# TYPE ", "# HELP "].into_iter().find_map(|kind| {
            let rest = line.strip_prefix(kind)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{kind}{name}_total {tail}"))
        });
        match described {
            Some(renamed) => out.push_str(&renamed),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `value` as an OpenMetrics label value: the encoder writes label values as given, and
/// a `"`, `\` or line feed left bare would end the label early and break the whole page
/// for its scraper.
fn label_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_name_is_escaped_in_its_label() {
        let metrics = Metrics::new(r#"my"model\v2"#);
        let text = metrics.render(None, 0);
        assert!(
            text.contains(r#"vllm:num_requests_running{model_name="my\"model\\v2"} 0"#),
            "{text}"
        );
        assert_eq!(label_value("a\nb"), r"a\nb");
    }

    /// In the classic format every sample's family is typed under the sample's own name
    /// (a counter's `_total`, a histogram's base name), and nothing 0.0.4 lacks is left.
    #[test]
    fn the_classic_text_types_every_sample_by_its_name() {
        let metrics = Metrics::new("m");
        metrics.prompt_tokens.inc_by(3);
        metrics.ttft.observe(0.2);
        let text = classic_text(&metrics.render(None, 0));
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE chorus_prompt_tokens_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP chorus_prompt_tokens_total "),
            "{text}"
        );
        assert!(text.contains("\nchorus_prompt_tokens_total 3\n"), "{text}");
        assert!(
            text.contains("# TYPE vllm:prompt_tokens_total counter\n"),
            "{text}"
        );
        assert!(text.contains("# TYPE chorus_time_to_first_token_seconds histogram\n"));
        let typed: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .into_iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| typed.contains(f)))
                .unwrap_or(name);
            assert!(typed.contains(&family), "{sample} has no # TYPE line");
        }
    }
}
