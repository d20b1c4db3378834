//! The preprocessing pool: CPU-heavy work a request causes before it reaches the
//! inference thread (parsing a large JSON body, rendering the chat template, tokenizing,
//! compiling a grammar, checking `logit_bias` and stop strings) runs here, on tokio's
//! blocking threads behind a semaphore, never on the async runtime's workers, so one
//! client's big prompt cannot freeze the other clients' streams.
//!
//! At most `threads` jobs run at once (by default one per core but one, which is left to
//! the inference thread). A request that finds a thread free takes it; at most
//! `max_waiting` wait for one (the server passes `--max-running` + `--max-queue`, what the
//! engine could still take), beyond that they get the same 429 as a full `--max-queue`;
//! one that waits longer than `--request-timeout` gets the 503 of a queued request that
//! waits too long. A request whose client goes away while it waits leaves the line (its
//! future is dropped with the semaphore's queue entry).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::error::ApiError;

pub struct Prep {
    permits: Arc<Semaphore>,
    waiting: AtomicUsize,
    max_waiting: usize,
    max_wait: Duration,
}

/// Counts a request as waiting until it has a thread (or its client left).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Prep {
    pub fn new(threads: usize, max_waiting: usize, max_wait: Duration) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(threads.max(1))),
            waiting: AtomicUsize::new(0),
            max_waiting,
            max_wait,
        }
    }

    /// The default size: every core but the inference thread's, at least one.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    }

    /// Runs `job` on a pool thread once one is free.
    pub async fn run<T, F>(&self, job: F) -> Result<T, ApiError>
    where
        F: FnOnce() -> Result<T, ApiError> + Send + 'static,
        T: Send + 'static,
    {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let queued = self.waiting.fetch_add(1, Ordering::AcqRel);
                let _waiting = Waiting(&self.waiting);
                if queued >= self.max_waiting {
                    return Err(ApiError::Overloaded {
                        queued,
                        asked: 1,
                        retry_after_s: 1,
                    });
                }
                tokio::time::timeout(self.max_wait, self.permits.clone().acquire_owned())
                    .await
                    .map_err(|_| {
                        ApiError::Unavailable(format!(
                            "the request waited {} s for preprocessing (--request-timeout)",
                            self.max_wait.as_secs()
                        ))
                    })?
                    .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?
            }
        };
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job()
        })
        .await
        .map_err(|e| ApiError::Internal(format!("request preprocessing failed: {e}")))?
    }

    /// Requests waiting for a thread now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Takes `prep`'s one thread with a job that returns `value` once `release` is sent.
    fn occupy<T: Send + 'static>(
        prep: &Arc<Prep>,
        value: T,
    ) -> (
        std::sync::mpsc::Sender<()>,
        tokio::task::JoinHandle<Result<T, ApiError>>,
    ) {
        let (release, wait) = std::sync::mpsc::channel::<()>();
        let prep = prep.clone();
        let busy = tokio::spawn(async move {
            prep.run(move || {
                let _ = wait.recv();
                Ok(value)
            })
            .await
        });
        (release, busy)
    }

    #[tokio::test]
    async fn at_most_threads_jobs_run_and_the_line_is_bounded() {
        let prep = Arc::new(Prep::new(1, 2, Duration::from_secs(60)));
        let (release_tx, busy) = occupy(&prep, 1);
        // The one thread is taken: two wait, the third is turned away.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiters: Vec<_> = (0..2)
            .map(|i| {
                let prep = prep.clone();
                tokio::spawn(async move { prep.run(move || Ok(10 + i)).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(prep.waiting(), 2);
        assert!(matches!(
            prep.run(|| Ok(0)).await,
            Err(ApiError::Overloaded { .. })
        ));
        release_tx.send(()).expect("job waits");
        assert_eq!(busy.await.expect("joined").expect("ran"), 1);
        for (i, w) in waiters.into_iter().enumerate() {
            assert_eq!(w.await.expect("joined").expect("ran"), 10 + i);
        }
        assert_eq!(prep.waiting(), 0);
    }

    /// With no line at all, a request that finds a thread free still runs: only waiting
    /// for one is bounded (`--max-queue 0` refused every request).
    #[tokio::test]
    async fn a_free_thread_is_taken_even_with_no_line() {
        let prep = Prep::new(1, 0, Duration::from_secs(60));
        assert_eq!(prep.run(|| Ok(7)).await.expect("ran"), 7);
        assert_eq!(prep.run(|| Ok(8)).await.expect("ran"), 8);
        assert_eq!(prep.waiting(), 0);
    }

    /// A request that cannot get a thread within the wait limit is refused with a 503.
    #[tokio::test]
    async fn a_wait_past_the_limit_is_refused() {
        let prep = Arc::new(Prep::new(1, 8, Duration::from_millis(100)));
        let (release_tx, busy) = occupy(&prep, ());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waited = prep.run(|| Ok(())).await;
        assert!(
            matches!(&waited, Err(ApiError::Unavailable(m)) if m.contains("--request-timeout")),
            "{waited:?}"
        );
        assert_eq!(prep.waiting(), 0);
        release_tx.send(()).expect("job waits");
        busy.await.expect("joined").expect("ran");
    }

    /// A request whose client left while it waited does not count any more.
    #[tokio::test]
    async fn a_cancelled_wait_leaves_the_line() {
        let prep = Arc::new(Prep::new(1, 8, Duration::from_secs(60)));
        let (release_tx, busy) = occupy(&prep, ());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = {
            let prep = prep.clone();
            tokio::spawn(async move { prep.run(|| Ok(())).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(prep.waiting(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(prep.waiting(), 0);
        release_tx.send(()).expect("job waits");
        busy.await.expect("joined").expect("ran");
    }
}
