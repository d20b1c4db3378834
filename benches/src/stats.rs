//! The serving metrics, with the definitions of vLLM's serving benchmark:
//! TTFT is the time to the first chunk that carries content; ITL the gaps between
//! consecutive content chunks; TPOT `(e2e - ttft) / (output_tokens - 1)`; E2E the whole
//! request. Throughput is over the level's wall time. Percentiles interpolate linearly
//! between order statistics (numpy's default), so they agree with vLLM's numbers.

use std::collections::BTreeMap;

use serde::Serialize;

/// What one request did, as seen by the client. Times are seconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    /// Start, relative to the start of the level.
    pub start: f64,
    /// Conversation turn (0 for single-turn workloads).
    pub turn: usize,
    /// HTTP status, or `None` when no response came (connection error).
    pub status: Option<u16>,
    /// Why the request failed; `None` when it succeeded.
    pub error: Option<String>,
    /// Arrival of each content-carrying chunk, relative to the request's start.
    pub chunk_times: Vec<f64>,
    pub e2e: f64,
    /// From the final `usage` chunk.
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub cached_tokens: usize,
    /// Size of the request body sent.
    pub request_bytes: usize,
    /// Function calls whose deltas arrived (`--tool-call`).
    pub calls: usize,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    pub fn ttft(&self) -> Option<f64> {
        self.chunk_times.first().copied()
    }

    /// Gaps between consecutive content chunks.
    pub fn itls(&self) -> impl Iterator<Item = f64> + '_ {
        self.chunk_times.windows(2).map(|w| w[1] - w[0])
    }

    /// Time per output token after the first; `None` with fewer than two tokens.
    pub fn tpot(&self) -> Option<f64> {
        let ttft = self.ttft()?;
        (self.output_tokens > 1).then(|| (self.e2e - ttft) / (self.output_tokens - 1) as f64)
    }
}

/// Mean and percentiles of one metric, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Dist {
    /// Values summarised (0: none, and every figure is 0).
    pub samples: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Dist {
    /// Summary of `seconds` reported in milliseconds; all zero when empty.
    pub fn of_seconds(seconds: &[f64]) -> Self {
        let mut ms: Vec<f64> = seconds.iter().map(|s| s * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        if ms.is_empty() {
            return Self::default();
        }
        Self {
            samples: ms.len(),
            mean: ms.iter().sum::<f64>() / ms.len() as f64,
            p50: percentile(&ms, 50.0),
            p90: percentile(&ms, 90.0),
            p99: percentile(&ms, 99.0),
            max: ms[ms.len() - 1],
        }
    }
}

/// The `p`th percentile of sorted values, linearly interpolated between order statistics.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let rank = p / 100.0 * (n - 1) as f64;
            let lo = rank.floor() as usize;
            let hi = (lo + 1).min(n - 1);
            sorted[lo] + (sorted[hi] - sorted[lo]) * (rank - lo as f64)
        }
    }
}

/// Service-level objectives for goodput; a request meets them if it meets every one given.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    pub tpot_ms: Option<f64>,
}

impl Slo {
    pub fn met_by(&self, r: &RequestRecord) -> bool {
        let within = |limit: Option<f64>, value: Option<f64>| match limit {
            None => true,
            Some(limit) => value.is_some_and(|v| v * 1e3 <= limit),
        };
        r.ok() && within(self.ttft_ms, r.ttft()) && within(self.tpot_ms, r.tpot().or(Some(0.0)))
    }
}

/// Every figure of one level against one target.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub completed: usize,
    pub failed: usize,
    /// Failures by status code (`"connection"` when no response came).
    pub failures: BTreeMap<String, usize>,
    /// Wall time of the level, seconds.
    pub duration: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    pub cached_tokens: usize,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Requests per second that met every SLO given (equal to `requests_per_s` without SLOs).
    pub goodput: f64,
    pub ttft_ms: Dist,
    pub tpot_ms: Dist,
    pub itl_ms: Dist,
    pub e2e_ms: Dist,
}

impl Summary {
    pub fn new(records: &[RequestRecord], duration: f64, slo: Slo) -> Self {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let mut failures = BTreeMap::new();
        for r in records.iter().filter(|r| !r.ok()) {
            let key = r.status.map_or("connection".into(), |s| s.to_string());
            *failures.entry(key).or_insert(0) += 1;
        }
        let per_s = |n: f64| if duration > 0.0 { n / duration } else { 0.0 };
        let output_tokens = ok.iter().map(|r| r.output_tokens).sum::<usize>();
        let ttfts: Vec<f64> = ok.iter().filter_map(|r| r.ttft()).collect();
        let tpots: Vec<f64> = ok.iter().filter_map(|r| r.tpot()).collect();
        let itls: Vec<f64> = ok.iter().flat_map(|r| r.itls()).collect();
        let e2es: Vec<f64> = ok.iter().map(|r| r.e2e).collect();
        Self {
            completed: ok.len(),
            failed: records.len() - ok.len(),
            failures,
            duration,
            prompt_tokens: ok.iter().map(|r| r.prompt_tokens).sum(),
            output_tokens,
            cached_tokens: ok.iter().map(|r| r.cached_tokens).sum(),
            output_tokens_per_s: per_s(output_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            goodput: per_s(ok.iter().filter(|r| slo.met_by(r)).count() as f64),
            ttft_ms: Dist::of_seconds(&ttfts),
            tpot_ms: Dist::of_seconds(&tpots),
            itl_ms: Dist::of_seconds(&itls),
            e2e_ms: Dist::of_seconds(&e2es),
        }
    }
}

/// TTFT by conversation turn (multi-turn workloads): the figure prefix caching moves.
#[derive(Debug, Clone, Serialize)]
pub struct TurnTtft {
    pub turn: usize,
    pub requests: usize,
    pub prompt_tokens_mean: f64,
    pub cached_tokens_mean: f64,
    pub request_bytes_mean: f64,
    pub ttft_ms: Dist,
}

pub fn by_turn(records: &[RequestRecord]) -> Vec<TurnTtft> {
    let mut turns: BTreeMap<usize, Vec<&RequestRecord>> = BTreeMap::new();
    for r in records.iter().filter(|r| r.ok()) {
        turns.entry(r.turn).or_default().push(r);
    }
    turns
        .into_iter()
        .map(|(turn, rs)| {
            let n = rs.len() as f64;
            let ttfts: Vec<f64> = rs.iter().filter_map(|r| r.ttft()).collect();
            TurnTtft {
                turn,
                requests: rs.len(),
                prompt_tokens_mean: rs.iter().map(|r| r.prompt_tokens as f64).sum::<f64>() / n,
                cached_tokens_mean: rs.iter().map(|r| r.cached_tokens as f64).sum::<f64>() / n,
                request_bytes_mean: rs.iter().map(|r| r.request_bytes as f64).sum::<f64>() / n,
                ttft_ms: Dist::of_seconds(&ttfts),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(chunks: &[f64], e2e: f64, tokens: usize) -> RequestRecord {
        RequestRecord {
            chunk_times: chunks.to_vec(),
            e2e,
            output_tokens: tokens,
            status: Some(200),
            ..Default::default()
        }
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn ttft_itl_tpot_of_one_request() {
        let r = record(&[0.5, 0.6, 0.8, 0.9], 1.1, 5);
        assert_eq!(r.ttft(), Some(0.5));
        let itls: Vec<f64> = r.itls().collect();
        assert!(itls.iter().zip([0.1, 0.2, 0.1]).all(|(a, b)| close(*a, b)));
        // (1.1 - 0.5) / 4
        assert!(close(r.tpot().unwrap(), 0.15));
        assert_eq!(record(&[0.5], 0.5, 1).tpot(), None);
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert!(close(percentile(&v, 50.0), 2.5));
        assert!(close(percentile(&v, 90.0), 3.7));
        assert!(close(percentile(&v, 99.0), 3.97));
        assert!(close(percentile(&v, 0.0), 1.0));
        assert!(close(percentile(&v, 100.0), 4.0));
        assert!(close(percentile(&[7.0], 99.0), 7.0));
        assert_eq!(percentile(&[], 50.0), 0.0);
    }

    #[test]
    fn dist_reports_milliseconds_sorted() {
        let d = Dist::of_seconds(&[0.3, 0.1, 0.2]);
        assert!(close(d.p50, 200.0));
        assert!(close(d.mean, 200.0));
        assert!(close(d.max, 300.0));
    }

    #[test]
    fn summary_counts_throughput_failures_and_goodput() {
        let fast = record(&[0.1, 0.2], 0.3, 3);
        let slow = record(&[0.9, 1.0], 1.5, 3);
        let failed = RequestRecord {
            status: Some(429),
            error: Some("overloaded".into()),
            ..Default::default()
        };
        let refused = RequestRecord {
            error: Some("connection refused".into()),
            ..Default::default()
        };
        let records = [fast, slow, failed, refused];
        let slo = Slo {
            ttft_ms: Some(500.0),
            tpot_ms: None,
        };
        let s = Summary::new(&records, 2.0, slo);
        assert_eq!((s.completed, s.failed), (2, 2));
        assert_eq!(s.failures.get("429"), Some(&1));
        assert_eq!(s.failures.get("connection"), Some(&1));
        assert_eq!(s.output_tokens, 6);
        assert!(close(s.output_tokens_per_s, 3.0));
        assert!(close(s.requests_per_s, 1.0));
        // Only the fast request has TTFT within 500 ms.
        assert!(close(s.goodput, 0.5));
        assert!(close(s.ttft_ms.p50, 500.0));
        // ITLs are 0.1 and 0.1.
        assert!(close(s.itl_ms.p99, 100.0));
        // TPOTs: (0.3-0.1)/2 = 0.1, (1.5-0.9)/2 = 0.3.
        assert!(close(s.tpot_ms.mean, 200.0));
    }

    #[test]
    fn tpot_slo_rejects_slow_decoders() {
        let r = record(&[0.1, 0.2], 0.9, 3); // tpot 0.4 s
        let slo = Slo {
            ttft_ms: None,
            tpot_ms: Some(100.0),
        };
        assert!(!slo.met_by(&r));
        assert!(Slo::default().met_by(&r));
    }

    #[test]
    fn ttft_by_turn_groups_requests() {
        let mut a = record(&[0.1], 0.2, 1);
        let mut b = record(&[0.3], 0.4, 1);
        b.turn = 1;
        b.cached_tokens = 10;
        a.prompt_tokens = 20;
        let turns = by_turn(&[a, b]);
        assert_eq!(turns.len(), 2);
        assert!(close(turns[0].ttft_ms.p50, 100.0));
        assert!(close(turns[1].cached_tokens_mean, 10.0));
        assert!(close(turns[0].prompt_tokens_mean, 20.0));
    }
}
