//! The compute threads. The forward pass and the sampler split their work with rayon;
//! the thread that drives the model should be one of those threads, not a third party
//! that waits while they work: on a 2-core machine, two rayon workers plus a driver thread
//! are three threads on two cores, and every parallel section pays for the wake-ups.

use rayon::ThreadPool;

use crate::error::{ModelError, Result};

/// A pool of `threads` compute threads in which the calling thread is one (index 0).
/// Run the model inside `pool.install(..)` from the thread that built it.
pub fn compute_pool(threads: usize) -> Result<ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .use_current_thread()
        .thread_name(|i| format!("chorus-compute-{i}"))
        .build()
        .map_err(|e| ModelError::Unsupported(format!("cannot start the compute threads: {e}")))
}

/// The default number of compute threads: one per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}
