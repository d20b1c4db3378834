//! chorus-bench: the load generator that measures an OpenAI-compatible server under
//! concurrent streaming load (chorus or any other), and the engine microbenchmarks.
//!
//! - [`sse`]: server-sent-events parsing over arbitrary network pieces.
//! - [`client`]: one streamed chat completion, timed.
//! - [`idle`]: idle keep-alive connections held beside the load.
//! - [`workload`]: seeded synthetic prompts and conversations.
//! - [`runner`]: closed-loop and Poisson open-loop levels, targets interleaved.
//! - [`stats`]: TTFT / ITL / TPOT / E2E with vLLM's definitions, percentiles, goodput.
//! - [`report`] and [`chart`]: the table, the JSON and the SVG.

pub mod chart;
pub mod client;
pub mod idle;
pub mod report;
pub mod runner;
pub mod sse;
pub mod stats;
pub mod workload;
