//! Command-line configuration: one clap struct, every flag also an environment variable.

use std::path::PathBuf;

use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "chorus",
    version,
    about = "A concurrent, OpenAI-compatible LLM chat inference server"
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address to listen on.
    #[arg(long, env = "CHORUS_HOST", default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on.
    #[arg(long, env = "CHORUS_PORT", default_value_t = 8080)]
    pub port: u16,

    /// Model to serve: a catalog name (`chorus models` lists them), a .gguf file, an
    /// HF-layout directory, `hf:ORG/REPO` (safetensors) or `hf:ORG/REPO:FILE.gguf`.
    /// HF downloads honour HF_HOME, HF_TOKEN and HF_HUB_OFFLINE.
    #[arg(long, env = "CHORUS_MODEL", default_value = crate::resolve::DEFAULT_MODEL)]
    pub model: String,

    /// Branch, tag or commit of an `hf:` model.
    #[arg(long, env = "CHORUS_REVISION", default_value = "main")]
    pub revision: String,

    /// How safetensors weights are held: auto (f32 on CPU, the fastest there), f32, bf16
    /// or f16. GGUF weights follow --weights instead.
    #[arg(long, env = "CHORUS_DTYPE", value_enum, default_value_t = DtypeArg::Auto)]
    pub dtype: DtypeArg,

    /// Where fetched model files are cached.
    #[arg(long, env = "CHORUS_MODELS_DIR", default_value = crate::resolve::DEFAULT_CACHE_DIR)]
    pub models_dir: PathBuf,

    /// A Jinja chat template file to use instead of the model's own (as
    /// `apply_chat_template` renders it; `tools` included).
    #[arg(long, env = "CHORUS_CHAT_TEMPLATE")]
    pub chat_template: Option<PathBuf>,

    /// A thinking model's `<think>` blocks: auto (where the chat template writes them,
    /// returned apart as `reasoning_content` / `reasoning` items, and a constraint holds
    /// only the answer after them) or none (left in the answer's text, as any text).
    #[arg(long, env = "CHORUS_REASONING_FORMAT", value_enum, default_value_t = ReasoningFormat::Auto)]
    pub reasoning_format: ReasoningFormat,

    /// Name the model is served under; defaults to the catalog name or the file's stem.
    #[arg(long, env = "CHORUS_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// How projection weights are held and multiplied: packed-int16 (the file's 4/8-bit
    /// blocks times activations as two 8-bit limbs, ~15 bits, by integer SIMD kernels),
    /// packed-int8 (one limb, as llama.cpp: fastest, knife-edge greedy choices flip),
    /// packed (the blocks dequantized on the fly, f32 activations), f32 (dequantized,
    /// candle's gemm) or quantized (candle's kernels).
    #[arg(long, env = "CHORUS_WEIGHTS", value_enum, default_value_t = Weights::PackedInt16)]
    pub weights: Weights,

    /// Where the forward pass runs: auto (the first CUDA GPU when this binary was built
    /// with the `cuda` feature and one answers, else the CPU), cpu (the packed CPU
    /// kernels), cuda or cuda:N, or candle-cpu (the GPU's code on candle's CPU device:
    /// slow; it exists to check that code without a GPU).
    #[arg(long, env = "CHORUS_DEVICE", default_value = "auto")]
    pub device: DeviceArg,

    /// Type of weights and matrix products on a device: auto (bf16 on a GPU, f32 on
    /// candle-cpu), bf16, f16 (more precise, but its range ends at 65504: Gemma 3's
    /// activations overflow it) or f32. The KV cache is bf16 with bf16, else f16.
    #[arg(long, env = "CHORUS_DEVICE_DTYPE", value_enum, default_value_t = DtypeArg::Auto)]
    pub device_dtype: DtypeArg,

    /// How projection weights are held on a device: dense (dequantized to
    /// --device-dtype, multiplied by the device's gemm), quantized (the GGUF file's
    /// blocks, candle's quantized kernels: a quarter of the memory, activations rounded to
    /// 8 bits), or auto (both; at start the device times a step of each at 1, 2, 4, ...
    /// rows up to --max-batch-tokens, and each step uses the faster for its size).
    #[arg(long, env = "CHORUS_DEVICE_WEIGHTS", value_enum, default_value_t = DeviceWeightsArg::Dense)]
    pub device_weights: DeviceWeightsArg,

    /// How decoding rows attend on a device: paged (a kernel of ours reads each
    /// conversation's KV blocks in place; on candle-cpu its reference) or gather (the
    /// blocks copied into padded tensors, candle's own ops). Prefill chunks always gather.
    #[arg(long, env = "CHORUS_DEVICE_ATTENTION", value_enum, default_value_t = DeviceAttentionArg::Paged)]
    pub device_attention: DeviceAttentionArg,

    /// Steps of up to this many rows (decoding rows and short prompt chunks) run at fixed
    /// shapes (padded to 1, 2, 3, 4, 6, 8, 12, ... rows), every row attending through
    /// the paged kernel, each shape captured once as a CUDA graph and then replayed with
    /// one launch; on candle-cpu the same fixed shapes run without capture. 0 runs every
    /// step eagerly. Needs --device-attention paged.
    #[arg(long, env = "CHORUS_CUDA_GRAPH_MAX_BATCH", default_value_t = 512)]
    pub cuda_graph_max_batch: usize,

    /// The most step shapes (row count and sampling-row count) kept with their buffers
    /// and CUDA graph; the least recently used is dropped for a new one. Each holds
    /// about its rows' activations and its sampling rows' logits in GPU memory.
    #[arg(long, env = "CHORUS_CUDA_GRAPH_MAX_SHAPES", default_value_t = 32)]
    pub cuda_graph_max_shapes: usize,

    /// Copy every sampling row's logits back from the device, greedy rows' too (to
    /// compare). By default a greedy row whose logits nothing adjusts or reports (no
    /// penalty, bias, grammar or log-probabilities) takes its argmax on the device and
    /// copies back one id instead of the vocabulary's logits.
    #[arg(long, env = "CHORUS_NO_DEVICE_ARGMAX", value_parser = BoolishValueParser::new())]
    pub no_device_argmax: bool,

    /// Most sequences decoding at once (continuous-batching slots).
    #[arg(long, env = "CHORUS_MAX_RUNNING", default_value_t = 64, value_parser = count(1))]
    pub max_running: usize,

    /// Most requests waiting for a slot; beyond it requests get 429 with Retry-After.
    #[arg(long, env = "CHORUS_MAX_QUEUE", default_value_t = 256, value_parser = count(0))]
    pub max_queue: usize,

    /// Most tokens in one forward step (decode tokens plus prefill chunks).
    #[arg(long, env = "CHORUS_MAX_BATCH_TOKENS", default_value_t = 128, value_parser = count(1))]
    pub max_batch_tokens: usize,

    /// Context positions whose attention costs as much as computing one token: a step's
    /// --max-batch-tokens budget counts a token at position p as 1 + p / this, so a long
    /// conversation's new turn is prefilled in smaller chunks and decoding streams keep
    /// their pace, at the cost of later first tokens (0, the default: from the model's
    /// shape under --max-step-ms, else every token counts 1; 1024 halved the p99
    /// inter-token latency of a 10-turn chat, benches/RESULTS.md).
    #[arg(long, env = "CHORUS_CONTEXT_COST", default_value_t = 0, value_parser = count(0))]
    pub context_cost: usize,

    /// Target duration of one forward step in milliseconds, so that a long
    /// conversation's new turn does not pause every stream (0: off, every step may take
    /// all of --max-batch-tokens). While streams decode, a step's durations are fitted
    /// as fixed + per decode unit + per prefill unit, and prefill chunks get what fits in
    /// the target beside the decoders (at least a thirty-second of --max-batch-tokens,
    /// more to compute every queued prompt within --prefill-horizon steps); while
    /// nothing decodes, a step is budgeted as without it. A token's cost then counts the
    /// history it attends to (--context-cost, from the model's shape when 0).
    #[arg(long, env = "CHORUS_MAX_STEP_MS", default_value_t = 150, value_parser = seconds())]
    pub max_step_ms: u64,

    /// With --max-step-ms: a step may also take this many times what its decoding
    /// streams alone take, when that is more than --max-step-ms (many streams, a slow
    /// machine), so prompts always get at least (ratio - 1) times the decoders' time and
    /// do not queue. At 1 or less, a step whose decoders alone exceed the target is
    /// budgeted as without one.
    #[arg(long, env = "CHORUS_MAX_STEP_RATIO", default_value_t = 3.0)]
    pub max_step_ratio: f64,

    /// With --max-step-ms: the most steps within which a queued prompt is computed when
    /// --max-batch-tokens allows, however long that makes a step. Higher keeps steps
    /// nearer the target under a burst of prompts (a slower machine's inter-token tail)
    /// and delays first tokens; lower does the opposite (benches/RESULTS.md).
    #[arg(long, env = "CHORUS_PREFILL_HORIZON", default_value_t = crate::scheduler::PREFILL_HORIZON, value_parser = count(1))]
    pub prefill_horizon: usize,

    /// Memory for the KV cache, in MiB; fixes how many tokens can be held at once (the
    /// default model: 69,904, so that 16 conversations of 2,000+ tokens keep their
    /// histories cached; 768 MiB held 34,944 and evicted them).
    #[arg(long, env = "CHORUS_KV_CACHE_MB", default_value_t = 1536, value_parser = count(1))]
    pub kv_cache_mb: usize,

    /// Most tokens one sequence may hold, prompt and answer together, as vLLM's flag of
    /// that name (default: the model's context, or what --kv-cache-mb holds if less).
    #[arg(long, env = "CHORUS_MAX_MODEL_LEN", value_parser = count(1))]
    pub max_model_len: Option<usize>,

    /// Compute threads for the forward pass (default: one per core). The inference
    /// thread is one of them.
    #[arg(long, env = "CHORUS_THREADS", value_parser = count(1))]
    pub threads: Option<usize>,

    /// Seconds a request may wait in the queue for a slot (or for a preprocessing thread)
    /// before it is refused (503).
    #[arg(long, env = "CHORUS_REQUEST_TIMEOUT", default_value_t = 300, value_parser = seconds_from(1))]
    pub request_timeout: u64,

    /// Seconds a client connection may stay without sending a complete request's headers
    /// (idle keep-alive included) before it is closed.
    #[arg(long, env = "CHORUS_IDLE_TIMEOUT", default_value_t = 30, value_parser = seconds_from(1))]
    pub idle_timeout: u64,

    /// Seconds a client may take to send a whole request body once its headers arrived
    /// (408 beyond): a trickled or withheld body cannot hold a connection open.
    #[arg(long, env = "CHORUS_BODY_TIMEOUT", default_value_t = 30, value_parser = seconds_from(1))]
    pub body_timeout: u64,

    /// Seconds a response may wait for its client to take any of its bytes (a client that
    /// stopped reading) before the connection is closed and its generation stopped.
    #[arg(long, env = "CHORUS_SEND_TIMEOUT", default_value_t = 60, value_parser = seconds_from(1))]
    pub send_timeout: u64,

    /// Most client connections open at once; one more is answered 503 and closed.
    #[arg(long, env = "CHORUS_MAX_CONNECTIONS", default_value_t = 2048, value_parser = count(1))]
    pub max_connections: usize,

    /// Threads that render chat templates, tokenize prompts and compile grammars
    /// (default: one per core but one, left to the inference thread; at least 1). Requests
    /// beyond --max-queue waiting for one get 429.
    #[arg(long, env = "CHORUS_PREPROCESS_THREADS", value_parser = count(1))]
    pub preprocess_threads: Option<usize>,

    /// On SIGTERM or ctrl-c: seconds running streams may take to finish before they are
    /// ended with an error event.
    #[arg(long, env = "CHORUS_SHUTDOWN_GRACE", default_value_t = 30, value_parser = seconds())]
    pub shutdown_grace: u64,

    /// Require `Authorization: Bearer <key>` on /v1/* and /tokenize, /detokenize.
    #[arg(long, env = "CHORUS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,

    /// Allow browsers on this origin to call the API (CORS); `*` for any. Off by default.
    #[arg(long, env = "CHORUS_CORS_ORIGIN")]
    pub cors_origin: Option<String>,

    /// Largest request body accepted, in bytes (413 beyond; at least 1024).
    #[arg(long, env = "CHORUS_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..))]
    pub max_request_bytes: usize,

    /// Most prompt tokens one request may send (default: the model's context).
    #[arg(long, env = "CHORUS_MAX_PROMPT_TOKENS", value_parser = count(1))]
    pub max_prompt_tokens: Option<usize>,

    /// Most stop strings one request may give.
    #[arg(long, env = "CHORUS_MAX_STOP", default_value_t = 16, value_parser = count(0))]
    pub max_stop: usize,

    /// Longest stop string, in bytes.
    #[arg(long, env = "CHORUS_MAX_STOP_BYTES", default_value_t = 256, value_parser = count(1))]
    pub max_stop_bytes: usize,

    /// Most function calls in one answer when `parallel_tool_calls` allows several.
    #[arg(long, env = "CHORUS_MAX_TOOL_CALLS", default_value_t = 4, value_parser = count(1))]
    pub max_tool_calls: usize,

    /// Most choices (`n`) one request may ask for (for each of its prompts).
    #[arg(long, env = "CHORUS_MAX_N", default_value_t = 8, value_parser = count(1))]
    pub max_n: usize,

    /// Most prompts one completions request may list (a batch: each prompt is served as
    /// its own sequence, and all are queued at once, so at most --max-running +
    /// --max-queue).
    #[arg(long, env = "CHORUS_MAX_PROMPTS", default_value_t = 64, value_parser = count(1))]
    pub max_prompts: usize,

    /// Directory of the server's state: stored responses (`chorus.sqlite3`). Default:
    /// $XDG_STATE_HOME/chorus, else ~/.local/state/chorus, else ./chorus-state.
    #[arg(long, env = "CHORUS_STATE_DIR", default_value_os_t = default_state_dir())]
    pub state_dir: PathBuf,

    /// Store no responses: `store: true` is ignored (responses say `store: false`) and
    /// `previous_response_id` is refused.
    #[arg(long, env = "CHORUS_NO_STORE", value_parser = BoolishValueParser::new())]
    pub no_store: bool,

    /// Hours a stored response is kept after it was created or last continued (0: no
    /// age limit).
    #[arg(long, env = "CHORUS_STORE_MAX_AGE", default_value_t = 30 * 24, value_parser = clap::value_parser!(u64).range(..=MAX_HOURS))]
    pub store_max_age: u64,

    /// Most stored responses; beyond it the least recently used are deleted (0: no
    /// limit).
    #[arg(long, env = "CHORUS_STORE_MAX_RESPONSES", default_value_t = 100_000, value_parser = count(0))]
    pub store_max_responses: usize,

    /// Most MiB of stored responses (their input items and response objects; 0: no
    /// budget); beyond it the least recently used are deleted. A response's echoed
    /// request fields are stored with it, so a row's size is not bounded by the prompt.
    #[arg(long, env = "CHORUS_STORE_MAX_MB", default_value_t = 4096)]
    pub store_max_mb: u64,

    /// Fetch the model into the cache (if needed) and exit without serving.
    #[arg(long, env = "CHORUS_DOWNLOAD_ONLY", value_parser = BoolishValueParser::new())]
    pub download_only: bool,

    /// Log format.
    #[arg(long, env = "CHORUS_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// $XDG_STATE_HOME/chorus, else ~/.local/state/chorus, else ./chorus-state.
fn default_state_dir() -> PathBuf {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    match (from("XDG_STATE_HOME"), from("HOME")) {
        (Some(state), _) => state.join("chorus"),
        (None, Some(home)) => home.join(".local/state/chorus"),
        (None, None) => PathBuf::from("chorus-state"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Weights {
    Packed,
    PackedInt8,
    PackedInt16,
    F32,
    Quantized,
}

impl From<Weights> for chorus_model::WeightFormat {
    fn from(w: Weights) -> Self {
        match w {
            Weights::Packed => chorus_model::WeightFormat::Packed,
            Weights::PackedInt8 => chorus_model::WeightFormat::PackedInt8,
            Weights::PackedInt16 => chorus_model::WeightFormat::PackedInt16,
            Weights::F32 => chorus_model::WeightFormat::F32,
            Weights::Quantized => chorus_model::WeightFormat::Quantized,
        }
    }
}

/// `--device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    CandleCpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "candle-cpu" => Self::CandleCpu,
            "cuda" => Self::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Self::Cuda(n),
                _ => {
                    return Err(format!(
                        "`{other}` is not a device (auto, cpu, cuda, cuda:N or candle-cpu)"
                    ))
                }
            },
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceAttentionArg {
    Paged,
    Gather,
}

impl From<DeviceAttentionArg> for chorus_model::DeviceAttention {
    fn from(a: DeviceAttentionArg) -> Self {
        match a {
            DeviceAttentionArg::Paged => chorus_model::DeviceAttention::Paged,
            DeviceAttentionArg::Gather => chorus_model::DeviceAttention::Gather,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceWeightsArg {
    Dense,
    Quantized,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Auto,
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for chorus_model::Dtype {
    fn from(d: DtypeArg) -> Self {
        match d {
            // candle's CPU gemm is fastest in f32; bf16/f16 halve memory at a speed cost.
            DtypeArg::Auto | DtypeArg::F32 => chorus_model::Dtype::F32,
            DtypeArg::Bf16 => chorus_model::Dtype::Bf16,
            DtypeArg::F16 => chorus_model::Dtype::F16,
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum Command {
    /// List the model catalog and what is cached, or fetch a catalog model.
    Models {
        #[command(subcommand)]
        action: Option<ModelsAction>,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum ModelsAction {
    /// List the catalog (the default).
    List,
    /// Fetch a catalog model (or any --model form) into the cache, with progress.
    Pull { name: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReasoningFormat {
    Auto,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The longest duration a flag may give, in seconds (about 11 days): beyond it, adding
/// it to a time could overflow.
const MAX_SECONDS: u64 = 1_000_000;
/// The longest age a flag may give, in hours (about 114 years).
const MAX_HOURS: u64 = 1_000_000;
/// The largest count a flag may give (threads, slots, connections).
const MAX_COUNT: u64 = 1 << 20;

/// A duration flag in seconds, at most [`MAX_SECONDS`].
fn seconds() -> clap::builder::RangedU64ValueParser<u64> {
    seconds_from(0)
}

/// A duration flag in seconds from `lo` (where 0 would refuse everything) to
/// [`MAX_SECONDS`].
fn seconds_from(lo: u64) -> clap::builder::RangedU64ValueParser<u64> {
    clap::value_parser!(u64).range(lo..=MAX_SECONDS)
}

/// A count flag from `lo` to [`MAX_COUNT`].
fn count(lo: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(lo..=MAX_COUNT)
}

impl Config {
    /// Settings that cannot work together.
    pub fn check(&self) -> Result<(), String> {
        if self.max_batch_tokens < self.max_running {
            // Each running sequence needs its decode token every step (vLLM refuses the
            // same).
            return Err(format!(
                "--max-batch-tokens ({}) must be at least --max-running ({})",
                self.max_batch_tokens, self.max_running
            ));
        }
        // A key read from an empty secret would otherwise leave the server open.
        if self.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(
                "--api-key (CHORUS_API_KEY) is empty: give a key, or leave it unset \
                        to serve without one"
                    .into(),
            );
        }
        if let Some(name) = &self.served_model_name {
            if name.trim().is_empty() || name.chars().any(char::is_control) {
                return Err(format!(
                    "--served-model-name ({name:?}) must be a name: not blank, no control \
                     characters"
                ));
            }
        }
        if let Some(origin) = &self.cors_origin {
            if crate::auth::cors(Some(origin)).is_none() {
                return Err(format!(
                    "--cors-origin ({origin:?}) must be `*` or an origin such as \
                     https://app.example"
                ));
            }
        }
        if !self.max_step_ratio.is_finite() || self.max_step_ratio < 0.0 {
            return Err(format!(
                "--max-step-ratio ({}) must be a number of at least 0",
                self.max_step_ratio
            ));
        }
        Ok(())
    }

    /// Defaults for everything, as if run with no arguments (used by tests).
    pub fn defaults() -> Self {
        Self::parse_from(["chorus"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that would overflow what the server computes from them, or mean nothing,
    /// are refused by name at start, never a panic later.
    #[test]
    fn out_of_range_values_are_refused_by_flag() {
        for (flag, value) in [
            ("--max-running", "0"),
            ("--max-connections", "0"),
            ("--max-connections", "18446744073709551615"),
            ("--preprocess-threads", "18446744073709551615"),
            ("--shutdown-grace", "18446744073709551615"),
            ("--idle-timeout", "18446744073709551615"),
            ("--request-timeout", "1000001"),
            // Values that would refuse every request, or spawn a million threads.
            ("--request-timeout", "0"),
            ("--body-timeout", "0"),
            ("--max-request-bytes", "0"),
            ("--max-prompt-tokens", "0"),
            ("--threads", "0"),
            ("--threads", "3000000"),
            ("--store-max-age", "18446744073709551615"),
            // Values that were quietly taken as 1 or as no limit at all.
            ("--idle-timeout", "0"),
            ("--max-n", "0"),
            ("--max-tool-calls", "0"),
            ("--max-prompts", "0"),
            ("--max-stop-bytes", "0"),
            ("--max-queue", "18446744073709551615"),
            ("--max-batch-tokens", "18446744073709551615"),
            ("--context-cost", "18446744073709551615"),
            ("--max-step-ms", "18446744073709551615"),
            ("--store-max-responses", "18446744073709551615"),
        ] {
            let e = Config::try_parse_from(["chorus", flag, value]).expect_err(flag);
            assert!(e.to_string().contains(flag), "{flag} {value}: {e}");
        }
        assert!(Config::try_parse_from(["chorus", "--idle-timeout", "1000000"]).is_ok());
    }

    #[test]
    fn a_model_name_or_origin_that_cannot_be_served_is_refused() {
        for (flag, value) in [
            ("--served-model-name", ""),
            ("--served-model-name", "two\nlines"),
            ("--cors-origin", ""),
            ("--cors-origin", "http://app.example\n"),
        ] {
            let e = Config::parse_from(["chorus", flag, value])
                .check()
                .expect_err(flag);
            assert!(e.contains(flag), "{e}");
        }
        for (flag, value) in [
            ("--served-model-name", "my\"model\\v2"),
            ("--cors-origin", "*"),
            ("--cors-origin", "https://app.example"),
        ] {
            assert!(Config::parse_from(["chorus", flag, value]).check().is_ok());
        }
    }

    #[test]
    fn a_blank_api_key_is_refused_not_read_as_none() {
        for key in ["", "  ", "\n"] {
            let e = Config::parse_from(["chorus", "--api-key", key])
                .check()
                .expect_err("refused");
            assert!(e.contains("--api-key"), "{e}");
        }
        assert!(Config::parse_from(["chorus", "--api-key", "k"])
            .check()
            .is_ok());
    }

    #[test]
    fn a_batch_budget_below_the_running_limit_is_refused() {
        let config =
            Config::parse_from(["chorus", "--max-running", "8", "--max-batch-tokens", "4"]);
        let e = config.check().expect_err("refused");
        assert!(e.contains("--max-batch-tokens (4)"), "{e}");
        assert!(Config::defaults().check().is_ok());
    }
}
