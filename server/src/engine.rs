//! The handle the HTTP side holds on the inference thread: submit a validated request,
//! get back a channel of [`Event`]s. Admission (`--max-queue`) is decided here so that an
//! overloaded server answers 429 at once without touching the worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use chorus_model::{ChatTemplate, SamplingParams, Tokenizer};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::error::ApiError;
use crate::grammar::{Constraint, Grammars};
use crate::openai::Usage;

/// A request the worker can run: already tokenized and checked.
#[derive(Debug, Default)]
pub struct GenRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    /// At least 1; prompt plus this fits the context.
    pub max_tokens: usize,
    pub stop: Vec<String>,
    /// The stop string found ends the answer's text (vLLM's `include_stop_str_in_output`).
    pub include_stop: bool,
    pub ignore_eos: bool,
    /// Choices to generate from the one prompt (at least 1).
    pub n: usize,
    /// Report each token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Also score the prompt's tokens (completions with `echo`), with this many
    /// alternatives each.
    pub prompt_logprobs: Option<usize>,
    /// End-of-sequence and `stop_token_ids` cannot be drawn before this many tokens.
    pub min_tokens: usize,
    /// Tokens that end the choice (besides the model's own end tokens).
    pub stop_token_ids: Vec<u32>,
    /// Structured output: what the tokens must spell.
    pub constraint: Option<Constraint>,
}

/// One generated token's log-probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// What the worker sends back for one request; `index` is the choice.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Final text (never half a character, never part of a stop string), with the
    /// log-probabilities of the tokens since the last event when they were asked for,
    /// and how many tokens that is (tokens whose text is never sent, a stop string's or
    /// a character cut by the end, are counted only in the usage).
    Text {
        index: usize,
        text: String,
        logprobs: Vec<TokenLogprob>,
        tokens: usize,
    },
    /// The prompt's log-probabilities (asked for with `prompt_logprobs`), before the
    /// choice's first text: `tokens` is the prompt, `logprobs` scores `tokens[1..]`.
    Prompt {
        index: usize,
        tokens: Vec<u32>,
        logprobs: Vec<TokenLogprob>,
    },
    /// One choice ended; its usage counts the prompt and this choice's tokens.
    Done {
        index: usize,
        finish: FinishReason,
        usage: Usage,
    },
    /// The whole request ended.
    Error(Failure),
}

impl Event {
    /// The same event with its choice numbered `offset` later (a batch's later prompts).
    pub fn reindexed(mut self, offset: usize) -> Event {
        match &mut self {
            Event::Text { index, .. } | Event::Prompt { index, .. } | Event::Done { index, .. } => {
                *index += offset
            }
            Event::Error(_) => {}
        }
        self
    }
}

/// Why the engine ended a request early.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// The engine failed on this request (500).
    Internal(String),
    /// Not the request's fault: shutting down, waited too long (503, retry later).
    Unavailable(String),
    /// The request's: the grammar engine gave up on its schema mid-answer (400 naming
    /// the field).
    Invalid {
        param: &'static str,
        message: String,
    },
}

impl From<Failure> for ApiError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::Internal(m) => ApiError::Internal(m),
            Failure::Unavailable(m) => ApiError::Unavailable(m),
            Failure::Invalid { param, message } => ApiError::bad(param, message),
        }
    }
}

pub(crate) struct Submission {
    pub req: GenRequest,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    /// Set once any prompt of the request has started (a completions batch has several):
    /// on shutdown, queued prompts are refused unless their request is already answering.
    pub answering: Arc<AtomicBool>,
}

/// Live figures the worker publishes after every step.
#[derive(Debug, Default)]
pub struct Stats {
    /// Submitted requests that have not started running yet (what `--max-queue` bounds).
    pub queued: AtomicUsize,
    /// Sequences that started and wait for a slot again: preempted for KV blocks, or
    /// choices (`n`) forked when no slot was free.
    pub requeued: AtomicUsize,
    pub running: AtomicUsize,
    pub kv_blocks_used: AtomicUsize,
    pub kv_blocks_total: AtomicUsize,
    /// False once the inference thread has exited (panicked or stopped).
    pub alive: AtomicBool,
    /// Shutting down: new requests are refused.
    pub draining: AtomicBool,
    /// The shutdown grace period is over: the worker ends every request still running.
    pub abort: AtomicBool,
}

impl Stats {
    /// Work waiting for a slot: requests not started and sequences waiting again, as
    /// vLLM's waiting queue holds its preempted and `n`'s child requests.
    pub fn waiting(&self) -> usize {
        self.queued.load(Ordering::Acquire) + self.requeued.load(Ordering::Acquire)
    }
}

/// What the HTTP side needs to know about the served model.
pub struct ModelInfo {
    pub id: String,
    pub tokenizer: Arc<Tokenizer>,
    pub template: ChatTemplate,
    /// Where the forward pass runs (`cpu`, `cuda:0`, `candle-cpu`).
    pub device: String,
    /// Most tokens one sequence can hold: the context, or less when `--kv-cache-mb` is
    /// smaller than one full context or `--max-model-len` asks for less.
    pub max_seq_tokens: usize,
    /// The flag that set `max_seq_tokens` under the model's context (None: the context).
    pub seq_limit: Option<&'static str>,
    pub created: u64,
    /// Structured output for this vocabulary, or why it is unavailable.
    pub grammars: Result<Arc<Grammars>, String>,
    /// The model thinks in `<think>` blocks, returned apart from its answers
    /// ([`crate::reasoning`]).
    pub reasoning: bool,
}

#[derive(Clone)]
pub struct Engine {
    pub(crate) tx: mpsc::Sender<Submission>,
    /// The live scheduler view.
    pub live: Arc<crate::live::Live>,
    pub stats: Arc<Stats>,
    pub info: Arc<ModelInfo>,
    pub max_queue: usize,
    /// Most sequences in the running batch (`--max-running`).
    pub max_running: usize,
}

impl Engine {
    pub fn submit(&self, req: GenRequest) -> Result<UnboundedReceiver<Event>, ApiError> {
        let mut rxs = self.submit_all(vec![req])?;
        rxs.pop()
            .ok_or_else(|| ApiError::Internal("no request was submitted".into()))
    }

    /// Submits a batch's requests (a completions request's prompts) all or none: their
    /// places in the queue are taken at once, so a batch is refused before any of it runs.
    pub fn submit_all(
        &self,
        reqs: Vec<GenRequest>,
    ) -> Result<Vec<UnboundedReceiver<Event>>, ApiError> {
        if !self.stats.alive.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable(
                "the inference thread has stopped".into(),
            ));
        }
        if self.stats.draining.load(Ordering::Acquire) {
            return Err(ApiError::Unavailable("the server is shutting down".into()));
        }
        // The scheduler admits in order, and a prompt of no tokens would never be
        // admitted: it would hold up every request behind it.
        if reqs.iter().any(|r| r.prompt.is_empty()) {
            return Err(ApiError::bad("messages", "the prompt has no tokens"));
        }
        // A request that finds a free slot does not wait for one: only those beyond the
        // free slots count against --max-queue.
        let free = self
            .max_running
            .saturating_sub(self.stats.running.load(Ordering::Acquire));
        let count = reqs.len();
        let queued = self.stats.queued.fetch_add(count, Ordering::AcqRel);
        if queued + count > self.max_queue.saturating_add(free) {
            self.stats.queued.fetch_sub(count, Ordering::AcqRel);
            return Err(ApiError::Overloaded {
                queued,
                asked: count,
                retry_after_s: 1,
            });
        }
        let mut rxs = Vec::with_capacity(count);
        let answering = Arc::new(AtomicBool::new(false));
        for (i, req) in reqs.into_iter().enumerate() {
            let (events, rx) = unbounded_channel();
            let submission = Submission {
                req,
                events,
                arrived: Instant::now(),
                answering: answering.clone(),
            };
            if self.tx.send(submission).is_err() {
                // Those sent end with their dropped channels; the rest never counted.
                self.stats.queued.fetch_sub(count - i, Ordering::AcqRel);
                return Err(ApiError::Unavailable(
                    "the inference thread has stopped".into(),
                ));
            }
            rxs.push(rx);
        }
        Ok(rxs)
    }

    pub fn is_alive(&self) -> bool {
        self.stats.alive.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::tokenizer::GgufVocab;

    /// An engine handle over a tiny tokenizer; the worker side is the returned receiver.
    fn engine() -> (Engine, mpsc::Receiver<Submission>) {
        let tokenizer = Tokenizer::from_gguf_vocab(GgufVocab {
            model: "gpt2".into(),
            tokens: vec!["<|im_end|>".into(), "a".into(), "b".into()],
            merges: Vec::new(),
            scores: Vec::new(),
            token_types: vec![3, 1, 1],
            bos_id: None,
            eos_id: 0,
            add_bos: false,
            add_space_prefix: false,
        })
        .expect("tiny tokenizer");
        let template =
            ChatTemplate::new("{{ messages }}".into(), "", "<|im_end|>").expect("template");
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Stats::default());
        stats.alive.store(true, Ordering::Release);
        let engine = Engine {
            tx,
            live: Arc::default(),
            stats,
            info: Arc::new(ModelInfo {
                id: "tiny".into(),
                tokenizer: Arc::new(tokenizer),
                template,
                device: "cpu".into(),
                max_seq_tokens: 16,
                seq_limit: None,
                created: 0,
                grammars: Err("not in this test".into()),
                reasoning: false,
            }),
            max_queue: 2,
            max_running: 4,
        };
        (engine, rx)
    }

    fn request() -> GenRequest {
        GenRequest {
            request_id: "r".into(),
            prompt: vec![1, 2],
            max_tokens: 4,
            n: 1,
            ..GenRequest::default()
        }
    }

    fn unavailable(r: Result<UnboundedReceiver<Event>, ApiError>) -> bool {
        matches!(r, Err(ApiError::Unavailable(_)))
    }

    #[test]
    fn a_dead_inference_thread_is_a_503_not_a_hang() {
        let (engine, rx) = engine();
        // The thread has exited (its guard cleared `alive`).
        engine.stats.alive.store(false, Ordering::Release);
        assert!(unavailable(engine.submit(request())));
        // Or it is gone without a word: its end of the channel is closed.
        engine.stats.alive.store(true, Ordering::Release);
        drop(rx);
        assert!(unavailable(engine.submit(request())));
        assert_eq!(engine.stats.queued.load(Ordering::Acquire), 0);
    }

    #[test]
    fn the_queue_bound_is_a_429_and_shutdown_a_503() {
        let (engine, _rx) = engine();
        // Every slot busy: two may wait (--max-queue 2), the third is refused.
        engine.stats.running.store(4, Ordering::Release);
        assert!(engine.submit(request()).is_ok());
        assert!(engine.submit(request()).is_ok());
        assert!(matches!(
            engine.submit(request()),
            Err(ApiError::Overloaded { .. })
        ));
        engine.stats.draining.store(true, Ordering::Release);
        assert!(unavailable(engine.submit(request())));
    }

    /// A batch takes its places in the queue all at once, or none of them.
    #[test]
    fn a_batch_is_queued_whole_or_refused_whole() {
        let (engine, rx) = engine();
        // Every slot busy, two may wait: a batch of three is refused before any is sent.
        engine.stats.running.store(4, Ordering::Release);
        let refused = engine.submit_all(vec![request(), request(), request()]);
        assert!(matches!(
            refused,
            Err(ApiError::Overloaded { asked: 3, .. })
        ));
        // Said so: no request waits, yet it is refused.
        let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(message.contains("batch of 3 prompts"), "{message}");
        assert_eq!(engine.stats.queued.load(Ordering::Acquire), 0);
        assert!(rx.try_recv().is_err());
        let events = engine
            .submit_all(vec![request(), request()])
            .expect("queued");
        assert_eq!(events.len(), 2);
        assert_eq!(engine.stats.queued.load(Ordering::Acquire), 2);
        assert!(matches!(
            engine.submit(request()),
            Err(ApiError::Overloaded { .. })
        ));
    }

    #[test]
    fn an_empty_prompt_is_refused_not_queued() {
        let (engine, _rx) = engine();
        let empty = GenRequest {
            prompt: Vec::new(),
            ..request()
        };
        assert!(matches!(
            engine.submit(empty),
            Err(ApiError::BadRequest { .. })
        ));
        assert_eq!(engine.stats.queued.load(Ordering::Acquire), 0);
    }

    /// Requests that find free slots are not waiting for one, even before the worker has
    /// started them: with no queue allowed, an idle server takes as many as it has slots.
    #[test]
    fn requests_for_free_slots_do_not_count_as_queued() {
        let (mut engine, _rx) = engine();
        engine.max_queue = 0;
        for _ in 0..4 {
            assert!(engine.submit(request()).is_ok());
        }
        assert!(matches!(
            engine.submit(request()),
            Err(ApiError::Overloaded { .. })
        ));
    }

    /// A request whose worker dies mid-way ends with an error instead of waiting forever.
    #[tokio::test]
    async fn a_request_whose_worker_dies_ends_with_an_error() {
        let (engine, rx) = engine();
        let events = engine.submit(request()).expect("admitted");
        let submission = rx.recv().expect("submitted");
        submission
            .events
            .send(Event::Text {
                index: 0,
                text: "a".into(),
                logprobs: Vec::new(),
                tokens: 1,
            })
            .expect("open");
        drop(submission);
        assert!(matches!(
            crate::stream::collect(events, 1, 1).await,
            Err(ApiError::Unavailable(_))
        ));
    }
}
