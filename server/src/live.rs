//! The live scheduler view's data: what the inference thread publishes for
//! `GET /scheduler/stream` (and the page at `/scheduler`).
//!
//! The worker builds a [`Snapshot`] from state it already holds, at most every
//! [`PUBLISH_EVERY`], and only while someone watches; it hands it over through a `watch`
//! channel (which keeps only the latest) and goes on. Everything else (serializing,
//! pacing each client to at most one snapshot per [`PUBLISH_EVERY`]) happens on the HTTP
//! side. No request's text is ever in a snapshot: sequences are named by request id.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::watch;

use crate::scheduler::{PoolView, SeqState};

/// Most snapshots per second: the worker publishes no more often, and each client is
/// sent no more often.
pub const PUBLISH_EVERY: Duration = Duration::from_millis(100);

/// Steps kept for the step-time and tokens-per-step history.
pub const STEPS_KEPT: usize = 120;

/// How far back the view's token rates look (within the kept steps).
pub const RATE_WINDOW: Duration = Duration::from_secs(10);

/// The worker's side and the watchers' side of the view.
pub struct Live {
    watchers: AtomicUsize,
    /// Held while a watcher arrives, so that the first of several arriving together
    /// drops the kept snapshot before any of them can be handed it.
    arriving: Mutex<()>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            watchers: AtomicUsize::new(0),
            arriving: Mutex::new(()),
            tx: watch::channel(None).0,
        }
    }
}

impl Live {
    /// Someone is watching: snapshots are worth building.
    pub fn watched(&self) -> bool {
        self.watchers.load(Ordering::Acquire) > 0
    }

    pub fn publish(&self, snapshot: Snapshot) {
        self.tx.send_replace(Some(Arc::new(snapshot)));
    }

    /// A new watcher; it counts until dropped. Its first `next` returns the latest
    /// snapshot at once, if someone else was watching when it came; else the next one the
    /// worker builds: the last one kept was left when the last watcher went, and may be
    /// minutes old.
    pub fn subscribe(self: &Arc<Self>) -> Watcher {
        let arriving = self.arriving.lock().unwrap_or_else(|e| e.into_inner());
        if self.watchers.fetch_add(1, Ordering::AcqRel) == 0 {
            self.tx.send_replace(None);
        }
        let mut rx = self.tx.subscribe();
        rx.mark_changed();
        drop(arriving);
        Watcher {
            live: self.clone(),
            rx,
        }
    }
}

pub struct Watcher {
    live: Arc<Live>,
    rx: watch::Receiver<Option<Arc<Snapshot>>>,
}

impl Watcher {
    /// The next snapshot newer than the last one returned; `None` once the worker is
    /// gone.
    pub async fn next(&mut self) -> Option<Arc<Snapshot>> {
        loop {
            self.rx.changed().await.ok()?;
            if let Some(s) = self.rx.borrow_and_update().clone() {
                return Some(s);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.live.watchers.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the engine is doing now.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Milliseconds since the server started.
    pub at_ms: u64,
    /// Running sequences first (oldest first), then the queue.
    pub sequences: Vec<SeqSnapshot>,
    pub queue: QueueSnapshot,
    pub kv: PoolView,
    /// The last steps, oldest first.
    pub steps: Vec<StepSnapshot>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize)]
pub struct SeqSnapshot {
    pub request_id: String,
    /// Which of the request's `n` choices.
    pub choice: usize,
    pub state: SeqState,
    pub prompt_computed: usize,
    pub prompt_tokens: usize,
    pub generated: usize,
    pub max_tokens: usize,
    pub blocks: usize,
    pub shared_blocks: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct QueueSnapshot {
    /// Sequences waiting to start (not preempted ones).
    pub length: usize,
    pub oldest_wait_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct StepSnapshot {
    pub ms: f64,
    pub decode_tokens: usize,
    pub prefill_tokens: usize,
    pub sequences: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Totals {
    /// Prompt tokens computed per second over the kept steps.
    pub tokens_in_per_s: f64,
    /// Tokens generated per second over the kept steps.
    pub tokens_out_per_s: f64,
    pub preemptions: u64,
    /// Share of prompt tokens served from the prefix cache, since the start.
    pub cache_hit_rate: f64,
}

/// The recent steps, recorded whether watched or not (one push per step), so that a
/// watcher who arrives sees the steps and rates of the last seconds.
#[derive(Debug, Default)]
pub struct StepLog {
    steps: VecDeque<(Instant, StepSnapshot)>,
}

impl StepLog {
    pub fn push(&mut self, step: StepSnapshot) {
        if self.steps.len() == STEPS_KEPT {
            self.steps.pop_front();
        }
        self.steps.push_back((Instant::now(), step));
    }

    pub fn steps(&self) -> Vec<StepSnapshot> {
        self.steps.iter().map(|(_, s)| *s).collect()
    }

    /// Prompt and generated tokens per second over the kept steps of the last
    /// [`RATE_WINDOW`], up to `now`: an engine gone idle reads 0, not its last figures.
    pub fn rates(&self, now: Instant) -> (f64, f64) {
        let recent = || {
            self.steps
                .iter()
                .filter(move |(at, _)| now.saturating_duration_since(*at) <= RATE_WINDOW)
        };
        let Some((first, s)) = recent().next() else {
            return (0.0, 0.0);
        };
        // The window runs from the first step's start to now.
        let secs = now.saturating_duration_since(*first).as_secs_f64() + s.ms / 1e3;
        if secs <= 0.0 {
            return (0.0, 0.0);
        }
        let sum = |f: fn(&StepSnapshot) -> usize| -> f64 {
            recent().map(|(_, s)| f(s) as f64).sum::<f64>() / secs
        };
        (sum(|s| s.prefill_tokens), sum(|s| s.decode_tokens))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn watchers_count_while_they_live_and_see_the_latest() {
        let live = Arc::new(Live::default());
        assert!(!live.watched());
        let mut w = live.subscribe();
        assert!(live.watched());
        let snapshot = |at_ms| Snapshot {
            at_ms,
            sequences: Vec::new(),
            queue: QueueSnapshot {
                length: 0,
                oldest_wait_ms: 0,
            },
            kv: PoolView {
                total: 0,
                used: 0,
                cached_free: 0,
                free: 0,
                map: String::new(),
            },
            steps: Vec::new(),
            totals: Totals {
                tokens_in_per_s: 0.0,
                tokens_out_per_s: 0.0,
                preemptions: 0,
                cache_hit_rate: 0.0,
            },
        };
        // Coalesced: only the latest is seen.
        live.publish(snapshot(1));
        live.publish(snapshot(2));
        assert_eq!(w.next().await.expect("a snapshot").at_ms, 2);
        // A second watcher arriving sees the latest at once.
        let mut second = live.subscribe();
        assert_eq!(second.next().await.expect("the latest").at_ms, 2);
        drop(w);
        drop(second);
        assert!(!live.watched());
        // One arriving after everyone left is not shown what was left behind: it waits
        // for the worker's next snapshot.
        let mut late = live.subscribe();
        let waited = tokio::time::timeout(Duration::from_millis(50), late.next()).await;
        assert!(waited.is_err(), "a stale snapshot was handed out");
        live.publish(snapshot(3));
        assert_eq!(late.next().await.expect("a fresh snapshot").at_ms, 3);
    }

    #[test]
    fn the_step_log_is_bounded() {
        let mut log = StepLog::default();
        for _ in 0..(STEPS_KEPT + 10) {
            log.push(StepSnapshot {
                ms: 10.0,
                decode_tokens: 4,
                prefill_tokens: 60,
                sequences: 5,
            });
        }
        assert_eq!(log.steps().len(), STEPS_KEPT);
        let now = Instant::now();
        let (input, output) = log.rates(now);
        assert!(input > output && output > 0.0);
        // Idle for longer than the window: nothing is flowing.
        assert_eq!(log.rates(now + RATE_WINDOW * 2), (0.0, 0.0));
    }
}
