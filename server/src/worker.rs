//! The inference thread: the only owner of the model and the KV cache.
//!
//! Loop: take new arrivals, drop sequences whose client went away, ask the scheduler for
//! this step's batch, run one batched forward, sample one token per sequence that samples,
//! send the text to its channel, retire finished sequences. With nothing to do it blocks
//! on the arrivals channel.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use chorus_model::logits::{self, TokenHistory};
use chorus_model::{
    Backend, IncrementalDecoder, Sampler, SamplingParams, SeqInput, StepRow, StopMatcher, Tokenizer,
};
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use crate::engine::{Event, Failure, FinishReason, Stats, Submission, TokenLogprob};
use crate::grammar::{Constraint, Grammars, Rejection};
use crate::live::{
    self, Live, QueueSnapshot, SeqSnapshot, Snapshot, StepLog, StepSnapshot, Totals,
};
use crate::metrics::Metrics;
use crate::openai::Usage;
use crate::scheduler::{self, Scheduled, Scheduler, SeqId, SeqState};
use crate::step_budget::StepBudget;

/// How often an idle worker wakes to refresh the live view (when someone watches).
const IDLE_WAKE: Duration = Duration::from_millis(250);

/// A sequence's generation state, beside the scheduler's bookkeeping. Each choice of a
/// request is one sequence; they share the request's event channel.
struct Seq {
    request_id: String,
    /// Which choice of its request this is.
    index: usize,
    /// Choices still to fork from this one when its prompt is computed (the first).
    unforked: usize,
    /// Tokens generated so far (the token ids themselves live in the scheduler).
    generated: usize,
    prompt_len: usize,
    max_tokens: usize,
    ignore_eos: bool,
    min_tokens: usize,
    stop_token_ids: Vec<u32>,
    stop_strings: Vec<String>,
    include_stop: bool,
    logprobs: Option<usize>,
    /// Scoring the prompt: alternatives per token, the scores so far (position `p`
    /// scores token `p`; position 0 has none), and whether they were sent.
    prompt_scores: Option<PromptScores>,
    sampler: Sampler,
    /// Present when the sampling parameters penalise or bias tokens.
    history: Option<TokenHistory>,
    constraint: Option<Constraint>,
    /// The grammar engine failed on this sequence's last step.
    constraint_error: Option<String>,
    decoder: IncrementalDecoder,
    stop: StopMatcher,
    /// Log-probabilities of tokens whose text has not been sent yet.
    unsent_logprobs: Vec<TokenLogprob>,
    /// How many tokens' text has not been sent yet.
    unsent_tokens: usize,
    events: UnboundedSender<Event>,
    arrived: Instant,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// Has left the queue (counts against `queued` until then).
    started: bool,
    /// Whether any sequence of the request has started (shared by a batch's prompts).
    answering: Arc<AtomicBool>,
}

impl Seq {
    /// Whether this step's pick is the argmax of the raw logits and nothing else reads
    /// them: greedy, no penalty or bias, no grammar, no banned stop tokens yet, no
    /// log-probabilities, and no choices to fork from them. (The conditions under which
    /// [`pick`] does nothing but [`Sampler::sample`]'s greedy path.)
    fn needs_only_argmax(&self) -> bool {
        let p = self.sampler.params();
        (p.temperature <= 0.0 || p.top_k == 1)
            && self.history.is_none()
            && self.constraint.is_none()
            && self.generated >= self.min_tokens
            && self.logprobs.is_none()
            && self.unforked == 0
    }

    /// Choice `index` of the same request, in the state this one is in before its first
    /// token: its own sampler (seeded `seed + index` when the request is seeded).
    fn choice(&self, index: usize) -> Seq {
        let mut params = self.sampler.params().clone();
        params.seed = params.seed.map(|s| s.wrapping_add(index as u64));
        Seq {
            request_id: self.request_id.clone(),
            index,
            unforked: 0,
            generated: 0,
            prompt_len: self.prompt_len,
            max_tokens: self.max_tokens,
            ignore_eos: self.ignore_eos,
            min_tokens: self.min_tokens,
            stop_token_ids: self.stop_token_ids.clone(),
            stop_strings: self.stop_strings.clone(),
            include_stop: self.include_stop,
            logprobs: self.logprobs,
            prompt_scores: self
                .prompt_scores
                .clone()
                .map(|p| PromptScores { sent: false, ..p }),
            sampler: Sampler::new(params),
            history: self.history.clone(),
            constraint: self.constraint.as_ref().map(Constraint::fork),
            constraint_error: None,
            decoder: IncrementalDecoder::new(),
            stop: StopMatcher::new(self.stop_strings.clone()).including(self.include_stop),
            unsent_logprobs: Vec::new(),
            unsent_tokens: 0,
            events: self.events.clone(),
            arrived: self.arrived,
            first_token: None,
            last_token: None,
            started: true,
            answering: self.answering.clone(),
        }
    }
}

/// The prompt's log-probabilities, filled in as its positions are computed.
#[derive(Clone)]
struct PromptScores {
    top: usize,
    scores: Vec<Option<TokenLogprob>>,
    sent: bool,
}

/// One sequence's draw.
struct Pick {
    token: u32,
    logprob: Option<TokenLogprob>,
}

pub(crate) struct Worker {
    pub metrics: Arc<Metrics>,
    /// The live scheduler view: snapshots while someone watches.
    pub live: Arc<Live>,
    pub step_log: StepLog,
    pub last_publish: Instant,
    pub started_at: Instant,
    /// How long a request may wait in the queue before it is refused.
    pub queue_timeout: Duration,
    /// The model and its KV cache, on the CPU or a device.
    pub backend: Backend,
    /// Greedy rows whose logits nothing else reads take their argmax where the logits
    /// are (on a device; `--no-device-argmax` turns it off).
    pub argmax_on_device: bool,
    pub tokenizer: Arc<Tokenizer>,
    /// Each token's bytes (from the grammar engine's vocabulary, where it loaded): what
    /// tells a character cut by the end from invalid bytes.
    pub grammars: Option<Arc<Grammars>>,
    pub scheduler: Scheduler,
    /// `--max-step-ms`: the budget of each step from the time steps take.
    pub step_budget: Option<StepBudget>,
    pub stats: Arc<Stats>,
    pub rx: mpsc::Receiver<Submission>,
    pub next_id: SeqId,
}

/// Marks the engine dead when the thread ends, however it ends (a panic included).
struct AliveGuard(Arc<Stats>);

impl Drop for AliveGuard {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

impl Worker {
    pub fn run(mut self) {
        let _alive = AliveGuard(self.stats.clone());
        self.stats.alive.store(true, Ordering::Release);
        let mut seqs: HashMap<SeqId, Seq> = HashMap::new();
        self.publish(&seqs);
        loop {
            // Idle: block until something arrives (waking now and then to show a watcher
            // the idle engine); the channel closing means shutdown.
            while seqs.is_empty() {
                match self.rx.recv_timeout(IDLE_WAKE) {
                    Ok(s) => self.admit(s, &mut seqs),
                    Err(mpsc::RecvTimeoutError::Timeout) => self.publish_view(&seqs),
                    Err(mpsc::RecvTimeoutError::Disconnected) => return,
                }
            }
            while let Ok(s) = self.rx.try_recv() {
                self.admit(s, &mut seqs);
            }
            self.drop_cancelled(&mut seqs);
            self.drop_expired(&mut seqs);
            if self.stats.draining.load(Ordering::Acquire) {
                self.refuse_queued(&mut seqs);
            }
            if self.stats.abort.load(Ordering::Acquire) {
                self.end_all(&mut seqs, "the server is shutting down");
            }
            self.step(&mut seqs);
            self.publish(&seqs);
            self.publish_view(&seqs);
        }
    }

    /// Publishes the live view's snapshot if someone watches and the last one is old
    /// enough. Built from state the worker holds; costs nothing when nobody watches.
    fn publish_view(&mut self, seqs: &HashMap<SeqId, Seq>) {
        if !self.live.watched() || self.last_publish.elapsed() < live::PUBLISH_EVERY {
            return;
        }
        self.last_publish = Instant::now();
        let (views, kv) = self.scheduler.view();
        let mut oldest_wait = Duration::ZERO;
        let mut queued = 0;
        let sequences = views
            .into_iter()
            .filter_map(|v| {
                let seq = seqs.get(&v.id)?;
                if v.state == SeqState::Waiting {
                    queued += 1;
                    oldest_wait = oldest_wait.max(seq.arrived.elapsed());
                }
                Some(SeqSnapshot {
                    request_id: seq.request_id.clone(),
                    choice: seq.index,
                    state: v.state,
                    prompt_computed: v.computed.min(seq.prompt_len),
                    prompt_tokens: seq.prompt_len,
                    generated: seq.generated,
                    max_tokens: seq.max_tokens,
                    blocks: v.blocks,
                    shared_blocks: v.shared_blocks,
                })
            })
            .collect();
        let (tokens_in_per_s, tokens_out_per_s) = self.step_log.rates(std::time::Instant::now());
        self.live.publish(Snapshot {
            at_ms: self.started_at.elapsed().as_millis() as u64,
            sequences,
            queue: QueueSnapshot {
                length: queued,
                oldest_wait_ms: oldest_wait.as_millis() as u64,
            },
            kv,
            steps: self.step_log.steps(),
            totals: Totals {
                tokens_in_per_s,
                tokens_out_per_s,
                preemptions: self.metrics.preemptions.get(),
                cache_hit_rate: self.metrics.prefix_cache_hit_rate(),
            },
        });
    }

    fn admit(&mut self, s: Submission, seqs: &mut HashMap<SeqId, Seq>) {
        let id = self.next_id;
        self.next_id += 1;
        let req = s.req;
        let max_len = req.prompt.len() + req.max_tokens;
        let added = match req.prompt_logprobs {
            Some(_) => self.scheduler.add_uncached(id, &req.prompt, max_len),
            None => self.scheduler.add(id, &req.prompt, max_len),
        };
        if let Err(e) = added {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
            let _ = s
                .events
                .send(Event::Error(Failure::Internal(e.to_string())));
            return;
        }
        tracing::debug!(request_id = %req.request_id, seq = id, prompt_tokens = req.prompt.len(), "queued");
        let history =
            logits::adjusts(&req.params).then(|| TokenHistory::new(&req.prompt, &req.params));
        seqs.insert(
            id,
            Seq {
                request_id: req.request_id,
                index: 0,
                unforked: req.n.saturating_sub(1),
                prompt_len: req.prompt.len(),
                generated: 0,
                max_tokens: req.max_tokens,
                ignore_eos: req.ignore_eos,
                min_tokens: req.min_tokens,
                stop_token_ids: req.stop_token_ids,
                stop_strings: req.stop.clone(),
                include_stop: req.include_stop,
                logprobs: req.logprobs,
                prompt_scores: req.prompt_logprobs.map(|top| PromptScores {
                    top,
                    scores: vec![None; req.prompt.len()],
                    sent: false,
                }),
                sampler: Sampler::new(req.params),
                history,
                constraint: req.constraint,
                constraint_error: None,
                decoder: IncrementalDecoder::new(),
                stop: StopMatcher::new(req.stop).including(req.include_stop),
                unsent_logprobs: Vec::new(),
                unsent_tokens: 0,
                events: s.events,
                arrived: s.arrived,
                first_token: None,
                last_token: None,
                started: false,
                answering: s.answering,
            },
        );
    }

    /// A closed channel means the client went away: free the sequence now.
    fn drop_cancelled(&mut self, seqs: &mut HashMap<SeqId, Seq>) {
        let gone: Vec<SeqId> = seqs
            .iter()
            .filter(|(_, s)| s.events.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            if let Some(seq) = seqs.remove(&id) {
                tracing::info!(request_id = %seq.request_id, choice = seq.index, generated = seq.generated, "client went away; sequence freed");
                self.retire(id, &seq);
            }
        }
    }

    /// Frees an ended sequence, however it ended (finished, failed, cancelled, timed out,
    /// refused at shutdown): each counts in the request-duration histogram, so a client
    /// that gives up on a slow answer is seen there too. Each choice counts once, those
    /// it had yet to fork included.
    fn retire(&mut self, id: SeqId, seq: &Seq) {
        let took = seq.arrived.elapsed().as_secs_f64();
        for _ in 0..=seq.unforked {
            self.metrics.request_duration.observe(took);
        }
        if !seq.started {
            self.stats.queued.fetch_sub(1, Ordering::AcqRel);
        }
        self.scheduler.finish(id);
    }

    /// Ends requests that waited in the queue longer than `--request-timeout`.
    fn drop_expired(&mut self, seqs: &mut HashMap<SeqId, Seq>) {
        let limit = self.queue_timeout;
        let expired: Vec<SeqId> = seqs
            .iter()
            .filter(|(_, s)| !s.started && s.arrived.elapsed() > limit)
            .map(|(&id, _)| id)
            .collect();
        for id in expired {
            if let Some(seq) = seqs.remove(&id) {
                let message = format!(
                    "the request waited longer than --request-timeout ({} s) for a slot; retry later",
                    limit.as_secs()
                );
                let _ = seq.events.send(Event::Error(Failure::Unavailable(message)));
                tracing::warn!(request_id = %seq.request_id, "queue timeout");
                self.retire(id, &seq);
            }
        }
    }

    /// Shutting down: requests still queued are refused (a 503, before any token, which
    /// a router retries on another replica) rather than started in the grace period and
    /// cut off at its end; the grace period is for requests already answering (a batch
    /// whose first prompts stream keeps its queued ones).
    fn refuse_queued(&mut self, seqs: &mut HashMap<SeqId, Seq>) {
        let queued: Vec<SeqId> = seqs
            .iter()
            .filter(|(_, s)| !s.started && !s.answering.load(Ordering::Acquire))
            .map(|(&id, _)| id)
            .collect();
        for id in queued {
            if let Some(seq) = seqs.remove(&id) {
                let why = "the server is shutting down; retry on another replica";
                let _ = seq
                    .events
                    .send(Event::Error(Failure::Unavailable(why.into())));
                tracing::info!(request_id = %seq.request_id, "queued at shutdown; refused");
                self.retire(id, &seq);
            }
        }
    }

    /// Ends every request with an error event (shutdown after the grace period).
    fn end_all(&mut self, seqs: &mut HashMap<SeqId, Seq>, why: &str) {
        for (id, seq) in std::mem::take(seqs) {
            let _ = seq
                .events
                .send(Event::Error(Failure::Unavailable(why.into())));
            self.retire(id, &seq);
        }
    }

    fn step(&mut self, seqs: &mut HashMap<SeqId, Seq>) {
        let budget = (self.step_budget.as_ref())
            .map(|b| (b.units(self.scheduler.decode_cost()), b.prefill_units()));
        let plan = match budget {
            Some((units, step_units)) => self.scheduler.schedule_within(units, step_units),
            None => self.scheduler.schedule(),
        };
        let budget = budget.map(|(units, _)| units);
        self.publish(seqs);
        for id in &plan.started {
            // A choice forked from its first sequence has started already.
            if let Some(seq) = seqs.get_mut(id).filter(|s| !s.started) {
                seq.started = true;
                seq.answering.store(true, Ordering::Release);
                self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                self.metrics.prompt_tokens.inc_by(seq.prompt_len as u64);
                let cached = self.scheduler.cached_tokens(*id);
                self.metrics.prefix_cache_hits.inc_by(cached as u64);
            }
        }
        for id in &plan.preempted {
            self.metrics.preemptions.inc();
            if let Some(seq) = seqs.get(id) {
                tracing::debug!(request_id = %seq.request_id, "preempted: KV blocks ran out");
            }
        }
        let tokens: usize = plan.batch.iter().map(|s| s.len).sum();
        if tokens > 0 {
            self.metrics.batch_tokens.observe(tokens as f64);
        }
        if plan.batch.is_empty() {
            // Nothing fits right now: wait briefly for a change instead of spinning.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let began = Instant::now();
        let decode_tokens = plan
            .batch
            .iter()
            .filter(|b| b.len == 1 && b.samples)
            .count();
        let step = StepSnapshot {
            ms: 0.0,
            decode_tokens,
            prefill_tokens: tokens - decode_tokens,
            sequences: plan.batch.len(),
        };

        // Sequences scoring their prompt want every prompt position's logits.
        let scoring: Vec<bool> = plan
            .batch
            .iter()
            .map(|s| {
                seqs.get(&s.id)
                    .is_some_and(|q| q.prompt_scores.is_some() && s.start < q.prompt_len)
            })
            .collect();
        let inputs: Vec<SeqInput> = plan
            .batch
            .iter()
            .zip(&scoring)
            .map(|(s, &all)| SeqInput {
                tokens: &self.scheduler.tokens(s.id)[s.start..s.start + s.len],
                start_pos: s.start,
                blocks: self.scheduler.blocks(s.id),
                wants_logits: s.samples,
                all_logits: all,
            })
            .collect();
        // Greedy rows whose logits nothing adjusts need only their argmax, which a
        // device finds where the logits are instead of copying them back.
        let argmax_only: Vec<bool> = plan
            .batch
            .iter()
            .map(|s| {
                self.argmax_on_device
                    && s.samples
                    && seqs.get(&s.id).is_some_and(Seq::needs_only_argmax)
            })
            .collect();
        let rows_of = |s: &Scheduled, all: bool| match (all, s.samples) {
            (true, _) => s.len,
            (false, true) => 1,
            (false, false) => 0,
        };
        // The rows each scheduled sequence got back, or why it failed.
        let mut per_seq: Vec<Result<Vec<StepRow>, String>> = Vec::new();
        let forward = self.backend.forward_rows(&inputs, &argmax_only);
        let forward_ms = began.elapsed().as_secs_f64() * 1e3;
        let copy_ms = self.backend.copy_ms();
        match forward {
            Ok(logits) => {
                let mut rows = logits.into_iter();
                for (s, &all) in plan.batch.iter().zip(&scoring) {
                    per_seq.push(Ok(rows.by_ref().take(rows_of(s, all)).collect()));
                }
            }
            Err(e) => {
                // One sequence's failure must not end its neighbours': run each alone (this
                // rewrites the same KV positions), keep the ones that succeed.
                tracing::warn!(error = %e, "batched forward failed; isolating the failing sequences");
                for (input, only) in inputs.iter().zip(&argmax_only) {
                    per_seq.push(
                        self.backend
                            .forward_rows(std::slice::from_ref(input), &[*only])
                            .map_err(|e| e.to_string()),
                    );
                }
            }
        }
        drop(inputs);
        let (mut sampling, mut logits, mut failed) = (Vec::new(), Vec::new(), Vec::new());
        for ((s, &all), rows) in plan.batch.iter().zip(&scoring).zip(per_seq) {
            match rows {
                Ok(mut rows) => {
                    if all {
                        if let Some(seq) = seqs.get_mut(&s.id) {
                            score_prompt(seq, s, &rows, self.scheduler.tokens(s.id));
                        }
                    }
                    if let Some(row) = rows.pop().filter(|_| s.samples) {
                        sampling.push(s.id);
                        logits.push(row);
                    }
                }
                Err(e) => failed.push((s.id, e)),
            }
        }
        for (id, error) in failed {
            if let Some(seq) = seqs.remove(&id) {
                tracing::error!(request_id = %seq.request_id, %error, "inference failed");
                let message = format!("inference failed: {error}");
                let _ = seq.events.send(Event::Error(Failure::Internal(message)));
                if !seq.started {
                    self.stats.queued.fetch_sub(1, Ordering::AcqRel);
                }
                self.scheduler.discard(id);
            }
        }

        self.fork_choices(seqs, &mut sampling, &mut logits);
        for id in &sampling {
            if let Some(seq) = seqs.get_mut(id) {
                send_prompt_scores(seq, self.scheduler.tokens(*id));
            }
        }
        // Scoring a prompt alone (`max_tokens: 0`): the choice ends before any draw.
        let mut i = 0;
        while i < sampling.len() {
            let id = sampling[i];
            match seqs.get(&id).is_some_and(|s| s.max_tokens == 0) {
                true => {
                    sampling.remove(i);
                    logits.remove(i);
                    if let Some(seq) = seqs.remove(&id) {
                        self.complete(id, seq, FinishReason::Length);
                    }
                }
                false => i += 1,
            }
        }
        for (id, pick) in sample_all(seqs, &sampling, logits, &self.tokenizer) {
            let Some(seq) = seqs.get_mut(&id) else {
                continue;
            };
            let token = pick.token;
            match self.accept(seq, pick) {
                Ok(None) => self.scheduler.append_token(id, token),
                Ok(Some(finish)) => {
                    if let Some(seq) = seqs.remove(&id) {
                        self.complete(id, seq, finish);
                    }
                }
                Err(failure) => {
                    if let Some(seq) = seqs.remove(&id) {
                        let _ = seq.events.send(Event::Error(failure));
                        self.retire(id, &seq);
                    }
                }
            }
        }
        let ms = began.elapsed().as_secs_f64() * 1e3;
        // One line per step for profiling (`RUST_LOG=chorus::step=debug`): what the step
        // held and what it took, split into the forward pass and the rest.
        tracing::debug!(
            target: "chorus::step",
            ms,
            forward_ms,
            // Of forward_ms, the logits' way back from a device (their copy; for greedy
            // rows the argmax's kernels and the ids' copy).
            copy_ms,
            decode = decode_tokens,
            prefill = tokens - decode_tokens,
            // Positions the prefill rows attend to, summed (what long histories cost).
            prefill_context = plan.batch.iter().filter(|b| b.len > 1 || !b.samples)
                .map(|b| scheduler::positions(b.start, b.len)).sum::<usize>(),
            decode_context = plan.batch.iter().filter(|b| b.len == 1 && b.samples)
                .map(|b| b.start).sum::<usize>(),
            cost = plan.cost,
            decode_cost = plan.decode_cost,
            budget,
        );
        if let Some(b) = &mut self.step_budget {
            b.observe(plan.decode_cost, plan.cost - plan.decode_cost, ms);
        }
        self.step_log.push(StepSnapshot { ms, ..step });
    }

    /// A request for several choices prefills its prompt once: when its first sequence
    /// is about to draw its first token, the other choices are forked from it (sharing
    /// its KV blocks) and draw from the same logits. Should no block be free for the
    /// copy, a choice is queued on its own instead (and finds the prompt's full blocks in
    /// the prefix cache).
    fn fork_choices(
        &mut self,
        seqs: &mut HashMap<SeqId, Seq>,
        sampling: &mut Vec<SeqId>,
        logits: &mut Vec<StepRow>,
    ) {
        for i in 0..sampling.len() {
            let parent = sampling[i];
            let Some(seq) = seqs.get_mut(&parent).filter(|s| s.unforked > 0) else {
                continue;
            };
            let choices = std::mem::take(&mut seq.unforked);
            for index in 1..=choices {
                let child = self.next_id;
                self.next_id += 1;
                let Some(seq) = seqs.get(&parent) else { break };
                let choice = seq.choice(index);
                match self.scheduler.fork(parent, child) {
                    Some(copy) => {
                        let copied = match copy {
                            Some((from, to)) => self.backend.copy_block(from, to),
                            None => Ok(()),
                        };
                        if let Err(e) = copied {
                            self.scheduler.discard(child);
                            let _ = choice
                                .events
                                .send(Event::Error(Failure::Internal(e.to_string())));
                            continue;
                        }
                        sampling.push(child);
                        logits.push(logits[i].clone());
                    }
                    None => {
                        let prompt = self.scheduler.tokens(parent).to_vec();
                        let max_len = prompt.len() + choice.max_tokens;
                        if let Err(e) = self.scheduler.add_first(child, &prompt, max_len) {
                            let _ = choice
                                .events
                                .send(Event::Error(Failure::Internal(e.to_string())));
                            continue;
                        }
                    }
                }
                seqs.insert(child, choice);
            }
        }
    }

    /// Takes one sampled token; returns why the sequence ends, if it does, or why it
    /// cannot go on (the structured-output engine gave up on the request's schema).
    fn accept(&self, seq: &mut Seq, pick: Pick) -> Result<Option<FinishReason>, Failure> {
        let token = pick.token;
        seq.generated += 1;
        let now = Instant::now();
        match seq.last_token.replace(now) {
            Some(last) => self.metrics.inter_token.observe((now - last).as_secs_f64()),
            None => self.metrics.ttft.observe((now - seq.arrived).as_secs_f64()),
        }
        seq.first_token.get_or_insert(now);
        self.metrics.generation_tokens.inc();
        if let Some(h) = &mut seq.history {
            h.push(token);
        }
        // The grammar engine gives up on what a schema makes it do (its limits on the
        // alternatives open at once: a schema of thousands of `anyOf` branches passes
        // them on its first token): then the schema's field is to blame. A token its
        // mask did not allow is ours. Its errors carry its whole state: the client gets
        // the start of the first line (the log keeps the rest).
        let mut grammar_done = false;
        if let Some(c) = &mut seq.constraint {
            let error = match seq.constraint_error.take() {
                Some(e) => Err(Rejection::GaveUp(e)),
                None => c.consume(token),
            };
            let short = |e: &str| -> String {
                let line = e.lines().next().unwrap_or_default();
                line.chars().take(200).collect()
            };
            match error {
                Ok(()) => grammar_done = c.is_done(),
                Err(Rejection::GaveUp(e)) => {
                    tracing::warn!(request_id = %seq.request_id, error = %e, "structured output: the grammar engine gave up");
                    return Err(Failure::Invalid {
                        param: c.param(),
                        message: format!(
                            "{} cannot be enforced: the grammar engine gave up on it ({})",
                            c.enforces(),
                            short(&e)
                        ),
                    });
                }
                Err(Rejection::NotAllowed(e)) => {
                    tracing::error!(request_id = %seq.request_id, error = %e, "structured output rejected a token");
                    return Err(Failure::Internal(format!(
                        "structured output rejected a token: {}",
                        short(&e)
                    )));
                }
            }
        }
        let stop_token = seq.stop_token_ids.contains(&token)
            || (!seq.ignore_eos && self.tokenizer.is_stop(token));
        if stop_token {
            // Its text is not returned, so neither is its log-probability.
            return Ok(Some(FinishReason::Stop));
        }
        seq.unsent_logprobs.extend(pick.logprob);
        seq.unsent_tokens += 1;
        let text = match seq.decoder.step(&self.tokenizer, token) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(request_id = %seq.request_id, error = %e, "detokenization failed");
                String::new()
            }
        };
        // Up to `min_tokens`, stop strings do not end the answer; one begun there may
        // once it is passed (as in vLLM, which checks them from token `min_tokens + 1`,
        // when a stop token may come too).
        let out = match seq.generated <= seq.min_tokens {
            true => chorus_model::stop::StopOutcome {
                text: seq.stop.observe(&text),
                stopped: false,
            },
            false => seq.stop.push(&text),
        };
        if !out.text.is_empty() {
            let _ = seq.events.send(Event::Text {
                index: seq.index,
                text: out.text,
                logprobs: std::mem::take(&mut seq.unsent_logprobs),
                tokens: std::mem::take(&mut seq.unsent_tokens),
            });
        }
        if out.stopped || grammar_done {
            return Ok(Some(FinishReason::Stop));
        }
        Ok((seq.generated >= seq.max_tokens).then_some(FinishReason::Length))
    }

    fn complete(&mut self, id: SeqId, mut seq: Seq, finish: FinishReason) {
        // Ids the decoder still holds are text too, less a character the end cut short.
        let flushed = match &self.grammars {
            Some(g) => seq
                .decoder
                .flush_whole(&self.tokenizer, |id| g.token_bytes(id).to_vec()),
            None => seq.decoder.flush(&self.tokenizer),
        };
        let held = match flushed {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(request_id = %seq.request_id, error = %e, "detokenization failed");
                String::new()
            }
        };
        let mut rest = String::new();
        if !held.is_empty() {
            let out = seq.stop.push(&held);
            rest = out.text;
        }
        rest.push_str(&seq.stop.flush());
        if !rest.is_empty() || !seq.unsent_logprobs.is_empty() {
            let _ = seq.events.send(Event::Text {
                index: seq.index,
                text: rest,
                logprobs: std::mem::take(&mut seq.unsent_logprobs),
                tokens: std::mem::take(&mut seq.unsent_tokens),
            });
        }
        let cached = self.scheduler.cached_tokens(id);
        let usage = Usage::new(seq.prompt_len, seq.generated, cached);
        let _ = seq.events.send(Event::Done {
            index: seq.index,
            finish,
            usage,
        });
        let ttft_ms = seq
            .first_token
            .map(|t| t.duration_since(seq.arrived).as_secs_f64() * 1e3);
        // One line per choice: a request for `n` choices logs `n`, each with its prompt.
        tracing::info!(
            request_id = %seq.request_id,
            choice = seq.index,
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            cached_tokens = cached,
            finish_reason = finish.as_str(),
            ttft_ms,
            duration_ms = seq.arrived.elapsed().as_secs_f64() * 1e3,
            "request finished"
        );
        self.retire(id, &seq);
    }

    fn publish(&self, seqs: &HashMap<SeqId, Seq>) {
        let s = &self.stats;
        s.running.store(self.scheduler.running(), Ordering::Release);
        let requeued = (self.scheduler.waiting_ids())
            .filter(|id| seqs.get(id).is_some_and(|seq| seq.started))
            .count();
        s.requeued.store(requeued, Ordering::Release);
        s.kv_blocks_used
            .store(self.scheduler.blocks_used(), Ordering::Release);
        s.kv_blocks_total
            .store(self.scheduler.blocks_total(), Ordering::Release);
    }
}

/// Scores the prompt tokens whose preceding position this step computed: the logits at
/// position `p` give token `p + 1` its log-probability.
/// Each row is a full-vocabulary log-softmax and top-k, so the rows are spread over the
/// cores as sampling is.
fn score_prompt(seq: &mut Seq, s: &Scheduled, rows: &[StepRow], tokens: &[u32]) {
    let temperature = seq.sampler.params().temperature;
    let prompt_len = seq.prompt_len;
    let Some(p) = &mut seq.prompt_scores else {
        return;
    };
    let top = p.top;
    let scored: Vec<(usize, TokenLogprob)> = rows
        .par_iter()
        .enumerate()
        .filter_map(|(r, row)| {
            let next = s.start + r + 1;
            let token = *tokens.get(next).filter(|_| next < prompt_len)?;
            // A scored sequence's rows are all logits (it never asks for an argmax).
            let (logprob, top) = logits::logprobs(row.logits()?, temperature, token, top);
            Some((
                next,
                TokenLogprob {
                    token,
                    logprob,
                    top,
                },
            ))
        })
        .collect();
    for (next, score) in scored {
        p.scores[next] = Some(score);
    }
}

/// Once the prompt is computed (the sequence draws its first token), its scores go to
/// the client ahead of any text.
fn send_prompt_scores(seq: &mut Seq, tokens: &[u32]) {
    let Some(p) = &mut seq.prompt_scores else {
        return;
    };
    if p.sent || seq.generated > 0 {
        return;
    }
    p.sent = true;
    let _ = seq.events.send(Event::Prompt {
        index: seq.index,
        tokens: tokens[..seq.prompt_len.min(tokens.len())].to_vec(),
        logprobs: p.scores.iter().skip(1).flatten().cloned().collect(),
    });
}

/// Draws the next token of every sampling sequence (`ids[i]` owns `logits[i]`), spread
/// over the cores: each sequence has its own sampler and RNG, so the draws are
/// independent of each other and of the order they run in. Returns `(id, pick)` in `ids`
/// order.
fn sample_all(
    seqs: &mut HashMap<SeqId, Seq>,
    ids: &[SeqId],
    logits: Vec<StepRow>,
    tokenizer: &Tokenizer,
) -> Vec<(SeqId, Pick)> {
    let mut rows: HashMap<SeqId, (usize, StepRow)> = ids
        .iter()
        .zip(logits)
        .enumerate()
        .map(|(i, (&id, row))| (id, (i, row)))
        .collect();
    let mut work: Vec<(usize, SeqId, &mut Seq, StepRow)> = seqs
        .iter_mut()
        .filter_map(|(&id, seq)| rows.remove(&id).map(|(i, row)| (i, id, seq, row)))
        .collect();
    work.sort_unstable_by_key(|w| w.0);
    work.par_iter_mut()
        .map(|(_, id, seq, row)| (*id, pick(seq, row, tokenizer)))
        .collect()
}

/// Adjusts `row` for the request (bias, penalties, `min_tokens`, structured output),
/// draws a token, and measures its log-probability when asked.
fn pick(seq: &mut Seq, row: &mut StepRow, tokenizer: &Tokenizer) -> Pick {
    let row = match row {
        // Found on the device for a sequence that needs nothing else
        // ([`Seq::needs_only_argmax`]).
        StepRow::Argmax(token) => {
            return Pick {
                token: *token,
                logprob: None,
            }
        }
        StepRow::Logits(row) => row,
    };
    let params: &SamplingParams = seq.sampler.params();
    let temperature = params.temperature;
    if let Some(h) = &seq.history {
        logits::adjust(row, params, h);
    }
    if let Some(c) = &mut seq.constraint {
        if let Err(e) = c.mask(row) {
            seq.constraint_error = Some(e);
        }
    }
    if seq.generated < seq.min_tokens {
        // Unless that bans everything the grammar still allows (it is complete).
        let banned: Vec<u32> = tokenizer
            .stop_ids()
            .iter()
            .chain(&seq.stop_token_ids)
            .copied()
            .collect();
        let kept: Vec<(u32, f32)> = banned
            .iter()
            .filter_map(|&t| row.get(t as usize).map(|&l| (t, l)))
            .collect();
        logits::ban(row, &banned);
        if row.iter().all(|l| *l == f32::NEG_INFINITY) {
            for (t, l) in kept {
                row[t as usize] = l;
            }
        }
    }
    let token = seq.sampler.sample(row);
    let logprob = seq.logprobs.map(|top| {
        let (logprob, top) = logits::logprobs(row, temperature, token, top);
        TokenLogprob {
            token,
            logprob,
            top,
        }
    });
    Pick { token, logprob }
}
