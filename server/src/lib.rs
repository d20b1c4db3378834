//! chorus-server: the HTTP face of chorus and the thread that runs the model.
//!
//! A request's path through the code, in order:
//! - [`routes`]: axum handlers; [`routes::JsonBody`] reads a body within its deadline, and
//!   bad JSON gets our error envelope.
//! - [`prep`]: the preprocessing pool, where parsing, templating and tokenizing run.
//! - [`openai`]: the wire types, tolerant of what real clients send.
//! - [`validate`]: wire request → [`validate::ValidRequest`] (template, tokens, checked fields).
//! - [`engine`]: the handle that admits a request (or answers 429) and returns its channel.
//! - [`worker`]: the inference thread, sole owner of the model and KV cache.
//! - [`scheduler`]: the pure decision of which sequences run each step.
//! - [`stream`] and [`sse`]: events back to the client as OpenAI chunks over SSE;
//!   [`logprobs`] writes log-probabilities in both endpoints' shapes.
//! - [`grammar`]: structured output (`response_format`) through llguidance, behind
//!   [`schema_check`] (what a schema must not hold before llguidance compiles it).
//! - [`tools`]: function calling (what is offered, how it is prompted, the constraint that
//!   holds calls to their schemas, reading calls back), shared by every endpoint.
//! - [`responses`]: the Responses API (`/v1/responses`): items in, typed events out,
//!   conversations continued by `previous_response_id` from the [`store`] (SQLite, with
//!   its migrations).
//! - [`metrics`]: Prometheus counters, gauges and histograms for `/metrics`.
//! - [`live`]: the live scheduler view's snapshots (`/scheduler/stream`, `/scheduler`).
//! - `serve`: the accept loop (idle-connection timeout, graceful shutdown).
//! - [`error`]: every client-visible failure, mapped once to status + envelope.
//! - [`auth`]: `--api-key` and CORS.
//! - [`config`] and [`resolve`]: flags, and which model file to load; [`hub`] fetches
//!   `hf:` models, [`models_cmd`] is `chorus models [pull]`.

pub mod auth;
pub mod config;
mod device;
pub mod engine;
pub mod error;
pub mod grammar;
pub mod hub;
pub mod live;
pub mod logprobs;
pub mod metrics;
pub mod models_cmd;
pub mod openai;
pub mod prep;
pub mod reasoning;
pub mod resolve;
pub mod responses;
pub mod routes;
pub mod scheduler;
pub mod schema_check;
mod serve;
pub mod sse;
pub mod step_budget;
pub mod store;
pub mod stream;
pub mod tools;
pub mod validate;
mod worker;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{mpsc, Arc, OnceLock};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use chorus_model::Backend;
use tokio::net::TcpListener;
use tracing::Instrument;

use crate::config::Config;
use crate::engine::{Engine, ModelInfo, Stats};
use crate::error::{ApiError, CLIENT_CLOSED};
use crate::metrics::{Metrics, RequestLabels};
use crate::prep::Prep;
use crate::routes::RequestId;
use crate::scheduler::{Scheduler, SchedulerConfig};
use crate::step_budget::StepBudget;
use crate::validate::Limits;
use crate::worker::Worker;

/// Shared by every handler.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    /// Set once the model has loaded.
    engine: OnceLock<Engine>,
    limits: Limits,
    http: HttpLimits,
    prep: Prep,
    metrics: Arc<Metrics>,
    /// SHA-256 of `--api-key`, when one is required.
    api_key: Option<[u8; 32]>,
    /// Stored responses (`None` with `--no-store`).
    store: Option<Arc<store::Store>>,
}

/// How much a client may send, and how slowly.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub max_request_bytes: usize,
    pub body_timeout: std::time::Duration,
}

impl AppState {
    fn new(config: &Config, served_name: &str) -> Result<Self, ServerError> {
        let limits = Limits {
            max_stop: config.max_stop,
            max_stop_bytes: config.max_stop_bytes,
            max_prompt_tokens: config.max_prompt_tokens,
            max_n: config.max_n,
            // A batch is queued whole: one larger than the queue could never be.
            max_prompts: (config.max_prompts)
                .min(config.max_running.saturating_add(config.max_queue)),
            max_tool_calls: config.max_tool_calls,
        };
        let threads = config
            .preprocess_threads
            .unwrap_or_else(Prep::default_threads);
        let store = match config.no_store {
            true => None,
            false => {
                let retention = store::Retention {
                    max_age: (config.store_max_age > 0)
                        .then(|| std::time::Duration::from_secs(config.store_max_age * 3600)),
                    // 0: no limit, as with the age and byte limits.
                    max_rows: match config.store_max_responses {
                        0 => usize::MAX,
                        n => n,
                    },
                    max_bytes: (config.store_max_mb > 0)
                        .then(|| config.store_max_mb.saturating_mul(1 << 20)),
                };
                let store = store::Store::open(&config.state_dir, retention)
                    .map_err(|e| ServerError::Config(format!("--state-dir: {e}")))?;
                tracing::info!(path = %store.path().display(), "stored responses");
                Some(Arc::new(store))
            }
        };
        Ok(Self {
            inner: Arc::new(Inner {
                engine: OnceLock::new(),
                limits,
                http: HttpLimits {
                    max_request_bytes: config.max_request_bytes,
                    body_timeout: std::time::Duration::from_secs(config.body_timeout.max(1)),
                },
                prep: Prep::new(
                    threads,
                    config.max_running.saturating_add(config.max_queue),
                    std::time::Duration::from_secs(config.request_timeout),
                ),
                metrics: Arc::new(Metrics::new(served_name)),
                api_key: auth::configured_key(config.api_key.as_deref()).map(auth::digest),
                store,
            }),
        })
    }

    /// Stored responses, unless `--no-store`.
    pub fn store(&self) -> Option<Arc<store::Store>> {
        self.inner.store.clone()
    }

    /// The store, or the 404 a lookup gets when nothing is stored.
    pub fn store_or_404(&self) -> Result<Arc<store::Store>, ApiError> {
        self.store().ok_or_else(|| ApiError::NotFound {
            message: "responses are not stored on this server (--no-store)".into(),
            param: None,
            code: "not_found",
        })
    }

    pub fn http_limits(&self) -> HttpLimits {
        self.inner.http
    }

    /// Where a request's CPU-heavy preprocessing runs.
    pub fn prep(&self) -> &Prep {
        &self.inner.prep
    }

    pub fn api_key_digest(&self) -> Option<&[u8; 32]> {
        self.inner.api_key.as_ref()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The metrics, for work that outlives the handler (a streamed response).
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    pub fn engine(&self) -> Result<&Engine, ApiError> {
        self.inner
            .engine
            .get()
            .ok_or_else(|| ApiError::Unavailable("the model is still loading".into()))
    }

    pub fn limits(&self) -> Limits {
        self.inner.limits
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("could not load the model: {0}")]
    Load(String),
    #[error("server error: {0}")]
    Io(#[from] std::io::Error),
}

pub fn router(state: AppState, config: &Config) -> Router {
    // The API proper: behind `--api-key` when one is set.
    let api = Router::new()
        .route("/v1/models", get(routes::models::list))
        .route("/v1/models/{*id}", get(routes::models::get))
        .route("/v1/chat/completions", post(routes::chat::chat_completions))
        .route("/v1/completions", post(routes::chat::completions))
        .route("/v1/responses", post(routes::responses::create))
        .route(
            "/v1/responses/input_tokens",
            post(routes::responses::input_tokens),
        )
        .route(
            "/v1/responses/{id}",
            get(routes::responses::get).delete(routes::responses::delete),
        )
        .route(
            "/v1/responses/{id}/input_items",
            get(routes::responses::input_items),
        )
        .route("/v1/responses/{id}/cancel", post(routes::responses::cancel))
        .route("/tokenize", post(routes::tokenize::tokenize))
        .route("/detokenize", post(routes::tokenize::detokenize))
        .route("/scheduler/stream", get(routes::scheduler::stream))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let app = Router::new()
        .route("/", get(routes::web::index))
        .route("/scheduler", get(routes::web::scheduler))
        .route("/health", get(routes::health::health))
        .route("/metrics", get(routes::health::metrics))
        .route("/v1/loads", get(routes::health::loads))
        .merge(api)
        .fallback(|req: Request| async move {
            ApiError::RouteNotFound(format!(
                "no route for {} {}",
                req.method(),
                req.uri().path()
            ))
        })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::MethodNotAllowed(format!(
                "{} is not allowed on {}",
                req.method(),
                req.uri().path()
            ))
        })
        .layer(DefaultBodyLimit::max(config.max_request_bytes))
        .layer(axum::middleware::from_fn_with_state(
            config.max_request_bytes,
            refuse_oversized,
        ))
        .layer(axum::middleware::from_fn(refuse_over_limit));
    // Inside the request-id layer, so a preflight CORS answers is counted and echoed too.
    let app = match auth::cors(config.cors_origin.as_deref()) {
        Some(cors) => app.layer(cors),
        None => app,
    };
    app.layer(axum::middleware::from_fn_with_state(
        state.clone(),
        request_id,
    ))
    .with_state(state)
}

/// Echoes `x-request-id` (or makes one), puts it in the request's extensions, runs the
/// request inside a span that carries it, and counts it by endpoint and status.
async fn request_id(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("other", MatchedPath::as_str)
        .to_string();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128)
        .map_or_else(new_request_id, str::to_string);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path());
    let mut count = Count {
        metrics: state.metrics_handle(),
        endpoint: Some(endpoint),
    };
    let mut response = next.run(req).instrument(span).await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert("x-request-id", v);
    }
    count.status(response.status().as_u16());
    response
}

/// Counts a request once by endpoint and status: the status of its response, or 499
/// (nginx's "client closed request") when the client left before the response was made
/// and the handler was dropped with it, so that requests left behind are counted too.
struct Count {
    metrics: Arc<Metrics>,
    endpoint: Option<String>,
}

impl Count {
    fn status(&mut self, status: u16) {
        if let Some(endpoint) = self.endpoint.take() {
            self.metrics
                .requests
                .get_or_create(&RequestLabels { endpoint, status })
                .inc();
        }
    }
}

impl Drop for Count {
    fn drop(&mut self) {
        self.status(CLIENT_CLOSED);
    }
}

/// A body whose declared length is over `--max-request-bytes` is refused before it is
/// read (the body limit still catches bodies without a length).
async fn refuse_oversized(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit as u64 => ApiError::PayloadTooLarge.into_response(),
        _ => next.run(req).await,
    }
}

/// A request that came on a connection over `--max-connections` (not a probe) is refused
/// here, inside the request-id and CORS layers, so that its 503 carries their headers.
async fn refuse_over_limit(req: Request, next: Next) -> Response {
    match req.extensions().get::<serve::OverLimit>() {
        Some(over) => {
            over.refused.inc();
            tracing::debug!(
                max = over.max,
                "connection refused: --max-connections reached"
            );
            serve::refusal_error(over.max).into_response()
        }
        None => next.run(req).await,
    }
}

fn new_request_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Serves on `listener` until `shutdown` resolves. The model at `model_path` is loaded on
/// the inference thread while the server already answers (`/health` is 503 until then).
pub async fn run(
    listener: TcpListener,
    config: Config,
    model_path: PathBuf,
    served_name: String,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    config.check().map_err(ServerError::Config)?;
    let state = AppState::new(&config, &served_name)?;
    let (load_tx, load_rx) = tokio::sync::oneshot::channel::<Result<(), String>>();
    let loader_state = state.clone();
    let metrics = state.inner.metrics.clone();
    let loader_config = config.clone();
    std::thread::Builder::new()
        .name("chorus-inference".into())
        .spawn(move || {
            let threads = loader_config
                .threads
                .unwrap_or_else(chorus_model::threads::default_threads);
            let pool = match chorus_model::threads::compute_pool(threads) {
                Ok(pool) => pool,
                Err(e) => {
                    let _ = load_tx.send(Err(e.to_string()));
                    return;
                }
            };
            // This thread is one of the pool's: the model's parallel sections share the
            // cores with it instead of competing for them.
            pool.install(move || {
                match start_engine(&loader_config, &model_path, served_name, metrics) {
                    Ok((engine, worker)) => {
                        let _ = loader_state.inner.engine.set(engine);
                        let _ = load_tx.send(Ok(()));
                        drop(loader_state);
                        worker.run();
                    }
                    Err(e) => {
                        let _ = load_tx.send(Err(e));
                    }
                }
            })
        })?;

    let drain_state = state.clone();
    let refused = state.metrics().connections_refused.clone();
    let app = router(state, &config);
    let (failed_tx, failed_rx) = tokio::sync::oneshot::channel::<String>();
    tokio::spawn(async move {
        let failed = match load_rx.await {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            // The loader panicked (its message is in the log): the server would answer
            // "still loading" for ever.
            Err(_) => "loading the model failed: the loader stopped (see the panic above)".into(),
        };
        let _ = failed_tx.send(failed);
    });
    let failure = Arc::new(OnceLock::<String>::new());
    let failure_slot = failure.clone();
    let grace = std::time::Duration::from_secs(config.shutdown_grace);
    let stop = async move {
        tokio::select! {
            () = shutdown => {
                // Refuse new requests now (503, `/health` too), still accepting, so that
                // a router's pooled connection or a readiness probe is told, not cut
                // off; once the running requests are done, or the grace period is over
                // and they are ended, stop accepting and close the connections.
                if let Ok(engine) = drain_state.engine() {
                    use std::sync::atomic::Ordering;
                    tracing::info!(grace_s = grace.as_secs(), "shutting down: draining");
                    let stats = engine.stats.clone();
                    stats.draining.store(true, Ordering::Release);
                    let deadline = tokio::time::Instant::now() + grace;
                    while tokio::time::Instant::now() < deadline
                        && stats.running.load(Ordering::Acquire)
                            + stats.queued.load(Ordering::Acquire)
                            > 0
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                    }
                    stats.abort.store(true, Ordering::Release);
                }
            }
            Ok(e) = failed_rx => { let _ = failure_slot.set(e); }
        }
    };
    let limits = serve::ConnLimits {
        idle: std::time::Duration::from_secs(config.idle_timeout),
        send: std::time::Duration::from_secs(config.send_timeout),
        max_connections: serve::fit_open_files(config.max_connections.max(1)),
        // The grace period is over when accepting stops (streams still running get an
        // error event then); a connection still open a few seconds later (a client not
        // reading) is dropped.
        drain: std::time::Duration::from_secs(5),
    };
    serve::serve(listener, app, limits, refused, stop).await;
    match failure.get() {
        Some(e) => Err(ServerError::Load(e.clone())),
        None => Ok(()),
    }
}

/// Loads the model and builds the engine handle and its worker (on the calling thread).
fn start_engine(
    config: &Config,
    path: &std::path::Path,
    served_name: String,
    metrics: Arc<Metrics>,
) -> Result<(Engine, Worker), String> {
    let started = std::time::Instant::now();
    tracing::info!(path = %path.display(), "loading model");
    let device = device::resolve(config)?;
    // The device path moves candle tensors: GGUF blocks as shipped, HF tensors unpacked.
    let loaded = match (path.is_dir(), &device) {
        (true, _) => chorus_model::hf::load_dir(path, config.dtype.into(), device.is_some()),
        (false, None) => chorus_model::gguf::load(path, config.weights.into()),
        (false, Some(_)) => chorus_model::gguf::load(path, chorus_model::WeightFormat::Quantized),
    }
    .map_err(|e| e.to_string())?;
    let mut loaded = loaded;
    if let Some(file) = &config.chat_template {
        let source = std::fs::read_to_string(file)
            .map_err(|e| format!("--chat-template {}: {e}", file.display()))?;
        loaded.template = chorus_model::ChatTemplate::new(
            source,
            loaded.tokenizer.bos_token(),
            loaded.tokenizer.eos_token(),
        )
        .map_err(|e| format!("--chat-template {}: {e}", file.display()))?;
    }
    let cfg = loaded.model.config().clone();
    let shape = cfg.kv_shape();
    // On the host the cache is written through at start: more than the memory there is
    // would be the kernel's OOM kill, not an error.
    if device.as_ref().is_none_or(|d| d.device.is_cpu()) {
        if let Some(available) = available_memory_mb().filter(|&a| config.kv_cache_mb > a) {
            return Err(format!(
                "--kv-cache-mb {} is more than the memory available ({available} MiB)",
                config.kv_cache_mb
            ));
        }
    }
    let num_blocks = shape.blocks_in(config.kv_cache_mb * 1024 * 1024);
    let backend = Backend::new(loaded.model, device.as_ref(), num_blocks)
        .map_err(|e| format!("{e} (--kv-cache-mb {})", config.kv_cache_mb))?;
    let device_name = backend.device_name();
    // The fewest tokens any bound allows; on a tie, the model's own context names it.
    let (max_seq_tokens, seq_limit) = [
        (cfg.context_len, None),
        (
            num_blocks * chorus_model::kv::BLOCK_SIZE,
            Some("--kv-cache-mb"),
        ),
        (
            config.max_model_len.unwrap_or(usize::MAX),
            Some("--max-model-len"),
        ),
    ]
    .into_iter()
    .min_by_key(|&(tokens, _)| tokens)
    .unwrap_or((cfg.context_len, None));
    // A length asked for and not given is refused, as vLLM does, rather than quietly
    // lowered: the operator learns at start what the server can hold.
    if let Some(asked) = config.max_model_len.filter(|&l| l > max_seq_tokens) {
        let bound = match seq_limit {
            Some(flag) => format!("what {flag} {} holds", config.kv_cache_mb),
            None => "the model's context".to_string(),
        };
        return Err(format!(
            "--max-model-len {asked} is more than {bound}: {max_seq_tokens} tokens"
        ));
    }
    tracing::info!(
        model = %served_name,
        arch = cfg.arch.name(),
        device = %device_name,
        device_attention = ?backend.device_attention(),
        fixed_steps = ?backend.fixed_steps(),
        layers = cfg.layers,
        context = cfg.context_len,
        max_seq_tokens,
        kv_blocks = num_blocks,
        kv_tokens = num_blocks * chorus_model::kv::BLOCK_SIZE,
        secs = started.elapsed().as_secs_f64(),
        "model loaded"
    );
    let tokenizer = Arc::new(loaded.tokenizer);
    let grammars = grammar::Grammars::new(tokenizer.clone(), cfg.vocab).map(Arc::new);
    if let Err(e) = &grammars {
        tracing::warn!(error = %e, "structured output is unavailable for this tokenizer");
    }
    let reasoning = config.reasoning_format == config::ReasoningFormat::Auto
        && reasoning::detect(loaded.template.source());
    if reasoning {
        tracing::info!("the chat template thinks in <think> blocks: returned apart from answers");
    }
    // A step-time target needs to know what long histories cost.
    let context_cost = match config.context_cost {
        0 if config.max_step_ms > 0 => cfg.attention_positions_per_token(),
        c => c,
    };
    let stats = Arc::new(Stats::default());
    stats
        .alive
        .store(true, std::sync::atomic::Ordering::Release);
    let (tx, rx) = mpsc::channel();
    let stats_live = Arc::new(live::Live::default());
    let engine = Engine {
        tx,
        live: stats_live.clone(),
        stats: stats.clone(),
        info: Arc::new(ModelInfo {
            id: served_name,
            tokenizer: tokenizer.clone(),
            template: loaded.template,
            device: device_name,
            max_seq_tokens,
            seq_limit,
            created: openai::unix_now(),
            grammars: grammars.clone(),
            reasoning,
        }),
        max_queue: config.max_queue,
        max_running: config.max_running,
    };
    let worker = Worker {
        metrics,
        live: stats_live.clone(),
        step_log: live::StepLog::default(),
        last_publish: std::time::Instant::now(),
        started_at: std::time::Instant::now(),
        queue_timeout: std::time::Duration::from_secs(config.request_timeout),
        backend,
        argmax_on_device: !config.no_device_argmax,
        tokenizer,
        grammars: grammars.ok(),
        scheduler: Scheduler::new(SchedulerConfig {
            max_running: config.max_running.max(1),
            max_batch_tokens: config.max_batch_tokens,
            num_blocks,
            context_cost,
            prefill_horizon: config.prefill_horizon,
        }),
        step_budget: (config.max_step_ms > 0).then(|| {
            StepBudget::new(config.max_step_ms, config.max_batch_tokens)
                .with_ratio(config.max_step_ratio)
        }),
        stats,
        rx,
        next_id: 0,
    };
    Ok((engine, worker))
}

/// The memory the system can still give, in MiB: Linux's `MemAvailable`, or less when
/// the process's cgroup (a container's memory limit) leaves less; `None` where neither
/// says.
fn available_memory_mb() -> Option<usize> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let system = read("/proc/meminfo").and_then(|m| {
        let kib: usize = m
            .lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()?;
        Some(kib / 1024)
    });
    // cgroup v2: `memory.max` is "max" when unlimited.
    let bytes = |path: &str| read(path).and_then(|v| v.trim().parse::<usize>().ok());
    let container = bytes("/sys/fs/cgroup/memory.max")
        .map(|max| max.saturating_sub(bytes("/sys/fs/cgroup/memory.current").unwrap_or(0)) >> 20);
    match (system, container) {
        (Some(s), Some(c)) => Some(s.min(c)),
        (s, c) => s.or(c),
    }
}
