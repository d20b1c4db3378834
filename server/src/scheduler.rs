//! The continuous-batching scheduler: which sequences run this step, with how many tokens
//! each. Pure bookkeeping over its own state (queues, per-sequence progress, KV block
//! tables), so every decision is unit-tested without a model.
//!
//! Each step, in this order, within `max_batch_tokens`:
//! 1. every running sequence that is decoding gets its one token (even beyond the budget:
//!    no running stream is ever starved);
//! 2. prompts get chunks (chunked prefill): running sequences still prefilling, and the
//!    waiting ones that free slots (`max_running`) admit first-come-first-served, while
//!    there is budget and KV blocks. Half the budget goes to the oldest prompts first,
//!    the rest to the least left to compute first: a short prompt's first token does not
//!    wait out a long one's prefill, and short ones arriving without pause at most halve
//!    the pace of those queued before them. A waiting oldest keeps the blocks its chunk
//!    needs.
//!
//! When a running sequence needs a block and none is free, the newest running sequence is
//! preempted: its blocks are freed and it goes back to the head of the queue, to be
//! recomputed from its tokens later. Nothing is dropped.
//!
//! Prefix caching: every full, computed block is registered under the hash of all tokens
//! up to its end. A sequence being admitted first takes every leading block of its
//! tokens that is registered (shared, reference-counted) and computes only the rest; a
//! finished conversation's blocks stay cached until their space is needed (LRU), so the
//! next turn, which resends the whole history, recomputes only the new message.

use std::collections::{HashMap, VecDeque};

use chorus_model::kv::{block_hash, blocks_for, BlockAllocator, BlockHash, BLOCK_SIZE};

pub type SeqId = u64;

/// Step budget taken by one prompt position whose logits are scored.
pub const SCORED_TOKEN_COST: usize = 2;

/// Under a tight step budget, the most steps within which a prompt is computed after it
/// was queued, when `--max-batch-tokens` allows (see [`Scheduler::schedule_within`]): the
/// default of `--prefill-horizon`.
pub const PREFILL_HORIZON: usize = 12;

/// Under a tight step budget, a prompt is spread over this many times the steps its
/// prefill would fill alone (up to the horizon): a short fresh prompt's first
/// token comes a step or two later than without a target, a long chat's new turn is
/// spread thin enough to leave the decoders' steps near it.
pub const PREFILL_STRETCH: usize = 4;

/// The oldest prompts get this fraction (one over it) of a step's prefill budget first
/// (all of it that the oldest needs, when it finishes in the step), the rest goes to the
/// least left to compute: short prompts arriving without pause at most halve a long
/// one's pace, and each prompt in turn becomes the oldest.
pub const OLDEST_SHARE: usize = 2;

/// The allowance that asks [`Scheduler::chunk`] for one token of a prompt whatever it
/// costs: what a step gives the oldest prompt whose next token costs more than any step
/// holds. (A prompt's allowance is otherwise never 0: one of 0 gets no chunk.)
const ONE_TOKEN: usize = 0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_running: usize,
    /// The step budget, in tokens of a fresh prompt.
    pub max_batch_tokens: usize,
    pub num_blocks: usize,
    /// Context positions whose attention costs as much as computing one token (0: a
    /// token costs 1 wherever it is).
    pub context_cost: usize,
    /// Under a step-time target, the most steps within which a queued prompt is
    /// computed ([`PREFILL_HORIZON`] by default).
    pub prefill_horizon: usize,
}

/// One sequence's share of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// Position of the first token to run (tokens before it are in the KV cache).
    pub start: usize,
    pub len: usize,
    /// After this step every known token is in the cache: the sequence samples.
    pub samples: bool,
}

/// The attention part of the cost of positions `start..start + len`: each position `p`
/// costs `p / per_token` (rounded up over the chunk); nothing when `per_token` is 0.
fn context_cost(start: usize, len: usize, per_token: usize) -> usize {
    if per_token == 0 || len == 0 {
        return 0;
    }
    positions(start, len).div_ceil(per_token)
}

/// The hashes of the leading full blocks of `ids` that registered blocks hold, found
/// without taking them. The last token is never among them: the step that computes it
/// yields logits.
fn cached_prefix(alloc: &BlockAllocator, ids: &[u32]) -> Vec<BlockHash> {
    let reusable = ids.len().saturating_sub(1) / BLOCK_SIZE;
    let mut found: Vec<BlockHash> = Vec::new();
    for chunk in ids.chunks_exact(BLOCK_SIZE).take(reusable) {
        let hash = block_hash(found.last(), chunk);
        if !alloc.holds(&hash) {
            break;
        }
        found.push(hash);
    }
    found
}

/// `Σ p` over positions `p` in `start..start + len`, the history before each: what a
/// chunk's attention work grows with.
pub fn positions(start: usize, len: usize) -> usize {
    len * start + len * len.saturating_sub(1) / 2
}

/// Where a sequence is, for the live view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SeqState {
    /// Running, computing its prompt (or recomputing after preemption).
    Prefill,
    /// Running, one token per step.
    Decode,
    /// Pushed back to the queue for lack of KV blocks; will be recomputed.
    Preempted,
    /// Queued, not started yet.
    Waiting,
}

/// One sequence's share of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqView {
    pub id: SeqId,
    pub state: SeqState,
    /// Tokens whose keys and values are in the cache.
    pub computed: usize,
    /// Tokens known (prompt and generated).
    pub tokens: usize,
    pub blocks: usize,
    /// Blocks also held by another sequence (the prefix cache, `n` forks).
    pub shared_blocks: usize,
}

/// The KV block pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PoolView {
    pub total: usize,
    pub used: usize,
    /// Holding a finished prompt's blocks for reuse; taken when space is needed.
    pub cached_free: usize,
    pub free: usize,
    /// One character per block: `u` used, `s` shared, `c` cached, `f` free.
    pub map: String,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub batch: Vec<Scheduled>,
    /// What the batch costs in budget units (decode tokens included, even beyond the
    /// budget): what a step-time model is fitted against.
    pub cost: usize,
    /// The part of `cost` that decoding sequences' tokens took.
    pub decode_cost: usize,
    /// Sequences pushed back to the queue this step.
    pub preempted: Vec<SeqId>,
    /// Sequences that were running for the first time this step (left the queue).
    pub started: Vec<SeqId>,
}

#[derive(Debug)]
struct Entry {
    /// Tokens known: prompt plus generated.
    ids: Vec<u32>,
    /// Of `ids`, the prompt's: those after it were generated.
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Hashes of `blocks[..hashes.len()]`, the full blocks registered in the prefix cache.
    hashes: Vec<BlockHash>,
    /// Prompt tokens found in the prefix cache at the first admission.
    cached: usize,
    /// Has run at least once (a preempted sequence is not "new" again).
    started: bool,
    /// When it was queued, in requests: the first in line is the lowest.
    arrival: u64,
    /// May take its prefix from the prefix cache (not when every prompt position's
    /// logits are wanted).
    reuse: bool,
    /// Steps planned since this prompt was queued or restarted, while it has prompt
    /// tokens to compute (the prefill floor's deadline counts them).
    queued_steps: usize,
    /// Prompt tokens found in the prefix cache by a look that took no blocks (while
    /// waiting, to price what its admission will cost).
    probed: Option<usize>,
    /// The steps its prompt is spread over under a tight budget, set when first counted.
    horizon: Option<usize>,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    entries: HashMap<SeqId, Entry>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the newest is last.
    running: Vec<SeqId>,
    /// Sequences queued so far.
    arrivals: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    #[error("the request needs {needed} KV blocks but the whole cache has {total}; raise --kv-cache-mb or lower max_tokens")]
    TooLarge { needed: usize, total: usize },
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        Self {
            cfg,
            alloc: BlockAllocator::new(cfg.num_blocks),
            entries: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            arrivals: 0,
        }
    }

    /// Queues a sequence with `prompt` tokens that may grow to `max_len`.
    pub fn add(&mut self, id: SeqId, prompt: &[u32], max_len: usize) -> Result<(), AddError> {
        self.enqueue(id, prompt, max_len, false)
    }

    /// As [`Self::add`], computing every prompt position even where the prefix cache
    /// holds it (the caller wants the logits of each).
    pub fn add_uncached(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        max_len: usize,
    ) -> Result<(), AddError> {
        self.enqueue(id, prompt, max_len, false)?;
        if let Some(e) = self.entries.get_mut(&id) {
            e.reuse = false;
        }
        Ok(())
    }

    /// As [`Self::add`], at the head of the queue: a choice of a request that is
    /// already running, which could not be forked.
    pub fn add_first(&mut self, id: SeqId, prompt: &[u32], max_len: usize) -> Result<(), AddError> {
        self.enqueue(id, prompt, max_len, true)
    }

    fn enqueue(
        &mut self,
        id: SeqId,
        prompt: &[u32],
        max_len: usize,
        first: bool,
    ) -> Result<(), AddError> {
        let needed = blocks_for(max_len);
        if needed > self.alloc.total() {
            return Err(AddError::TooLarge {
                needed,
                total: self.alloc.total(),
            });
        }
        self.entries.insert(
            id,
            Entry {
                ids: prompt.to_vec(),
                prompt_len: prompt.len(),
                computed: 0,
                blocks: Vec::new(),
                hashes: Vec::new(),
                cached: 0,
                started: false,
                arrival: self.arrivals,
                queued_steps: 0,
                probed: None,
                horizon: None,
                reuse: true,
            },
        );
        self.arrivals += 1;
        match first {
            true => self.waiting.push_front(id),
            false => self.waiting.push_back(id),
        }
        Ok(())
    }

    /// Starts `child` as a copy of `parent`, whose known tokens must all be computed (it
    /// just finished its prefill): the child shares the parent's full blocks and gets a
    /// copy of the partly filled last one, so a prompt is prefilled once for several
    /// choices. Returns the `(from, to)` block whose keys and values the caller copies,
    /// if any; `None` (nothing changed) when the parent is not in that state, all
    /// `max_running` slots are taken, or no block is free for the copy. The child runs at
    /// once, right after its parent (as old as it, for preemption).
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Option<Option<(u32, u32)>> {
        let p = self.entries.get(&parent)?;
        let at = self.running.iter().position(|&r| r == parent)?;
        if p.computed != p.ids.len() || self.running.len() >= self.cfg.max_running {
            return None;
        }
        let full = p.computed / BLOCK_SIZE;
        let partial = p
            .blocks
            .get(full)
            .copied()
            .filter(|_| p.computed % BLOCK_SIZE != 0);
        let copy = match partial {
            Some(from) => Some((from, self.alloc.allocate()?)),
            None => None,
        };
        let p = &self.entries[&parent];
        let mut blocks = p.blocks[..full].to_vec();
        let entry = Entry {
            ids: p.ids.clone(),
            prompt_len: p.prompt_len,
            computed: p.computed,
            blocks: Vec::new(),
            hashes: p.hashes.iter().take(full).copied().collect(),
            cached: p.cached,
            started: true,
            arrival: p.arrival,
            reuse: p.reuse,
            queued_steps: p.queued_steps,
            probed: None,
            horizon: p.horizon,
        };
        for &b in &blocks {
            self.alloc.share(b);
        }
        blocks.extend(copy.map(|(_, to)| to));
        self.entries.insert(child, Entry { blocks, ..entry });
        self.running.insert(at + 1, child);
        Some(copy)
    }

    /// Records a sampled token: the sequence now knows one more token.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.ids.push(token);
        }
    }

    /// Prompt tokens of `id` whose keys and values came from the prefix cache.
    pub fn cached_tokens(&self, id: SeqId) -> usize {
        self.entries.get(&id).map_or(0, |e| e.cached)
    }

    /// Blocks holding reusable prefixes that no sequence references.
    pub fn blocks_cached(&self) -> usize {
        self.alloc.cached()
    }

    /// Removes a finished or cancelled sequence and frees its blocks; its computed full
    /// blocks stay in the prefix cache.
    pub fn finish(&mut self, id: SeqId) {
        self.register_full_blocks(id);
        self.discard(id);
    }

    /// Removes a sequence whose last step failed: nothing it computed is trusted.
    pub fn discard(&mut self, id: SeqId) {
        if let Some(e) = self.entries.remove(&id) {
            self.alloc.release_all(&e.blocks);
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
    }

    /// Every token `id` knows: its prompt, then what it generated.
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        self.entries.get(&id).map_or(&[], |e| &e.ids)
    }

    pub fn blocks(&self, id: SeqId) -> &[u32] {
        self.entries.get(&id).map_or(&[], |e| &e.blocks)
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn waiting_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.waiting.iter().copied()
    }

    pub fn blocks_used(&self) -> usize {
        self.alloc.used()
    }

    pub fn blocks_total(&self) -> usize {
        self.alloc.total()
    }

    /// What the live view shows: every running and waiting sequence's progress and
    /// blocks, and the pool's state. Read-only, and computed only when asked for.
    pub fn view(&self) -> (Vec<SeqView>, PoolView) {
        let seq = |id: SeqId, running: bool| {
            let e = &self.entries[&id];
            let generated = e.ids.len() > e.prompt_len;
            let state = match (running, e.started, e.ids.len() - e.computed) {
                // 0: its token of this step is being drawn; 1: its last sampled token is
                // next, unless that one is the prompt's last (the rest found cached).
                (true, _, 0) => SeqState::Decode,
                (true, _, 1) if generated => SeqState::Decode,
                (true, _, _) => SeqState::Prefill,
                (false, true, _) => SeqState::Preempted,
                (false, false, _) => SeqState::Waiting,
            };
            SeqView {
                id,
                state,
                computed: e.computed,
                tokens: e.ids.len(),
                blocks: e.blocks.len(),
                shared_blocks: e.blocks.iter().filter(|&&b| self.alloc.refs(b) > 1).count(),
            }
        };
        let mut seqs: Vec<SeqView> = self.running.iter().map(|&id| seq(id, true)).collect();
        seqs.extend(self.waiting.iter().map(|&id| seq(id, false)));
        let pool = PoolView {
            total: self.alloc.total(),
            used: self.alloc.used(),
            cached_free: self.alloc.cached(),
            free: self.alloc.free_count() - self.alloc.cached(),
            map: self.alloc.map(),
        };
        (seqs, pool)
    }

    /// This step's plan within `--max-batch-tokens` (prefill chunks get what decoders
    /// leave, at least an eighth of it).
    pub fn schedule(&mut self) -> Plan {
        self.plan(self.cfg.max_batch_tokens, None)
    }

    /// This step's plan within `budget` units (at most `--max-batch-tokens`): a
    /// step-time target's, [`Self::decode_cost`] plus what it leaves prefill. Decoding
    /// sequences get their token whatever it costs; prefill chunks get what is left, but
    /// never less than the prefill floor, so a tight budget slows prompts down and never
    /// stops them: a thirty-second of `--max-batch-tokens`, or if that is more, what every
    /// queued prompt (running or waiting for a slot) still costs, each spread over the
    /// steps left of its horizon from when it was queued. Each is then computed within
    /// its horizon when `--max-batch-tokens` allows: a burst of prompts is worked off
    /// together rather than one horizon after another. A prompt's horizon is
    /// [`PREFILL_STRETCH`] times the steps it would fill alone, when `step_units` (the
    /// prefill units one target-long step holds) is known, and at most `prefill_horizon`.
    pub fn schedule_within(&mut self, budget: usize, step_units: Option<usize>) -> Plan {
        let owed = self.owed(step_units);
        self.plan(budget, Some(owed))
    }

    /// What the queued prompts must get this step to meet their deadlines (each one's
    /// horizon from when it was queued), for the running prompts and the waiting ones
    /// that a free slot would admit. Counts the step.
    fn owed(&mut self, step_units: Option<usize>) -> usize {
        // Chunks go to the queued prompts in this order, so the i-th is done when all
        // before it are: the rate that meets every deadline is the largest of their
        // cumulative costs over the steps each has left.
        let (mut owed, mut queued_cost) = (0, 0);
        let most = self.cfg.prefill_horizon.max(1);
        for (id, start, cost) in self.prompts() {
            let e = &self.entries[&id];
            let horizon = e.horizon.unwrap_or_else(|| match step_units {
                Some(units) => (PREFILL_STRETCH * cost.div_ceil(units.max(1))).min(most),
                None => most,
            });
            let steps_left = horizon.saturating_sub(e.queued_steps).max(1);
            queued_cost += cost;
            owed = owed.max(queued_cost.div_ceil(steps_left));
            let e = self
                .entries
                .get_mut(&id)
                .expect("queued sequence has an entry");
            e.queued_steps += 1;
            e.horizon = Some(horizon);
            if e.computed == 0 {
                e.probed = Some(start);
            }
        }
        owed
    }

    /// The prompts that may get a chunk this step, with where each starts computing and
    /// what the rest of it costs: running prompts and the waiting ones that a free slot
    /// would admit (slots go first-come, first-served), the least left to compute first,
    /// ties oldest first. [`Self::plan`] gives the oldest their part first, then the rest
    /// in this order: a short prompt is not queued behind a long one's whole prefill (its
    /// first token came 30 s late beside two 6,000-word prompts here).
    fn prompts(&self) -> Vec<(SeqId, usize, usize)> {
        let slots = self.cfg.max_running.saturating_sub(self.running.len());
        let mut prompts: Vec<(SeqId, usize, usize)> = (self.running.iter())
            .copied()
            .filter(|&id| self.remaining(id) > 1)
            .chain(self.waiting.iter().copied().take(slots))
            .map(|id| {
                let e = &self.entries[&id];
                // A waiting prompt starts where the prefix cache will let it.
                let start = match (e.computed, e.probed) {
                    (0, Some(cached)) => cached,
                    (0, None) if e.reuse => cached_prefix(&self.alloc, &e.ids).len() * BLOCK_SIZE,
                    (computed, _) => computed,
                };
                (id, start, self.cost_from(e, start, e.ids.len() - start))
            })
            .collect();
        prompts.sort_by_key(|&(id, _, cost)| (cost, self.entries[&id].arrival));
        prompts
    }

    /// What the running sequences that decode next step cost of its budget.
    pub fn decode_cost(&self) -> usize {
        self.running
            .iter()
            .filter(|&&id| self.remaining(id) == 1)
            .map(|&id| self.cost(id, 1))
            .sum()
    }

    /// `owed`: under a step-time target, what the queued prompts' deadlines need.
    fn plan(&mut self, budget: usize, owed: Option<usize>) -> Plan {
        let mut plan = Plan::default();
        let mut budget = budget.clamp(1, self.cfg.max_batch_tokens);
        // Under a target the floor only has to keep prompts moving (the target's budget
        // leaves them a share); without one it is what decoders must leave them.
        let share = match owed {
            Some(_) => 32,
            None => 8,
        };
        let least = (self.cfg.max_batch_tokens / share).max(1);
        let floor = least.max(owed.unwrap_or(0)).min(self.cfg.max_batch_tokens);
        // Last step's tokens are computed now: offer its newly full blocks for reuse.
        for id in self.running.clone() {
            self.register_full_blocks(id);
        }
        let mut taken = Vec::new();

        // 1: every decoding sequence gets its token, oldest first, whatever the budget (a
        // budget below the running count must not starve the newest streams).
        let decoding: Vec<SeqId> = (self.running.iter())
            .copied()
            .filter(|&id| self.remaining(id) == 1)
            .collect();
        for id in decoding {
            if self.running.contains(&id) {
                self.run(id, budget, &mut budget, &mut plan, &mut taken);
            }
        }

        // 2: prompts share what is left, at least the floor: a part goes to the oldest
        // first, the rest (and what they leave) to the least left to compute first.
        budget = budget.max(floor);
        let prompts = self.prompts();
        let mut by_age: Vec<(SeqId, usize)> = prompts.iter().map(|&(id, _, c)| (id, c)).collect();
        by_age.sort_by_key(|(id, _)| self.entries[id].arrival);
        let mut allot: HashMap<SeqId, usize> = HashMap::new();
        // An oldest prompt that this step finishes gets all it needs, as first-come,
        // first-served would give it: prompts that each fit in a step keep their order.
        let mut share = match by_age.first() {
            Some(&(_, cost)) if cost <= budget => cost.max(budget / OLDEST_SHARE),
            _ => budget / OLDEST_SHARE,
        };
        let mut rest = budget - share;
        for &(id, cost) in &by_age {
            let given = cost.min(share);
            allot.insert(id, given);
            share -= given;
        }
        rest += share;
        for &(id, _, cost) in &prompts {
            let given = allot.entry(id).or_default();
            let more = cost.saturating_sub(*given).min(rest);
            *given += more;
            rest -= more;
        }
        // A waiting oldest also keeps the blocks its part needs: a shorter prompt is
        // admitted before it only when the KV cache holds both.
        let oldest = by_age.first().map(|&(id, _)| id);
        let mut held = oldest
            .filter(|id| self.waiting.contains(id))
            .map_or(0, |id| blocks_for(allot[&id].min(self.remaining(id))));
        let mut beyond_any_step: Vec<SeqId> = (prompts.iter())
            .filter(|&&(id, start, _)| {
                self.cost_from(&self.entries[&id], start, 1) > self.cfg.max_batch_tokens
            })
            .map(|&(id, ..)| id)
            .collect();
        beyond_any_step.sort_by_key(|id| self.entries[id].arrival);
        let mut admitting = true;
        let mut carry = 0;
        for (id, ..) in prompts {
            let avail = (allot[&id] + carry).min(budget);
            // Each as it was when the step began: one preempted by an older sequence's
            // reservation this step waits for the next.
            let waiting = self.waiting.contains(&id);
            let is_oldest = oldest == Some(id);
            let cost = match waiting {
                _ if avail == 0 => 0,
                false if self.running.contains(&id) => {
                    self.run(id, avail, &mut budget, &mut plan, &mut taken)
                }
                true if (admitting || is_oldest) && self.running.len() < self.cfg.max_running => {
                    let spare = if is_oldest { 0 } else { held };
                    let (more, cost) =
                        self.admit(id, avail, spare, &mut budget, &mut plan, &mut taken);
                    admitting &= more;
                    cost
                }
                _ => 0,
            };
            if is_oldest {
                held = 0;
            }
            // What a chunk leaves of its part (it ends on a whole token) goes on.
            carry = avail.saturating_sub(cost);
        }
        // 3: a prompt whose next token costs more than any step holds (deep in a long
        // prompt, under a small `--max-batch-tokens` or `--context-cost`) would never
        // move again, holding its slot: the oldest such that got nothing gets one token.
        let stuck = beyond_any_step
            .into_iter()
            .find(|id| !plan.batch.iter().any(|b| b.id == *id) && !plan.preempted.contains(id));
        if let Some(id) = stuck {
            match self.waiting.contains(&id) {
                false => {
                    self.run(id, ONE_TOKEN, &mut budget, &mut plan, &mut taken);
                }
                true if self.running.len() < self.cfg.max_running => {
                    self.admit(id, ONE_TOKEN, 0, &mut budget, &mut plan, &mut taken);
                }
                true => {}
            }
        }
        plan
    }

    /// Schedules running `id`'s next chunk within `avail` of the step's `budget`, making
    /// room in the KV cache by preempting the newest sequences, and returns its cost. One
    /// preempted after it was scheduled this step leaves the batch and gives its share of
    /// the budget back.
    fn run(
        &mut self,
        id: SeqId,
        avail: usize,
        budget: &mut usize,
        plan: &mut Plan,
        taken: &mut Vec<(SeqId, usize, bool)>,
    ) -> usize {
        let decodes = self.remaining(id) == 1;
        let (len, cost) = self.chunk(id, avail);
        if len == 0 {
            return 0;
        }
        let before = plan.preempted.len();
        let reserved = self.reserve(id, len, &mut plan.preempted);
        for &victim in &plan.preempted[before..] {
            if let Some(pos) = plan.batch.iter().position(|b| b.id == victim) {
                plan.batch.remove(pos);
                if let Some(t) = taken.iter().position(|t| t.0 == victim) {
                    let (_, cost, decodes) = taken.remove(t);
                    *budget += cost;
                    plan.cost -= cost;
                    if decodes {
                        plan.decode_cost -= cost;
                    }
                }
            }
        }
        if !reserved {
            return 0;
        }
        *budget = budget.saturating_sub(cost);
        plan.cost += cost;
        if decodes {
            plan.decode_cost += cost;
        }
        taken.push((id, cost, decodes));
        plan.batch.push(self.advance(id, len));
        cost
    }

    /// Admits waiting `id` with a first chunk within `avail` of the step's `budget`,
    /// taking what the prefix cache holds of it; returns whether later waiting sequences
    /// may be admitted, and the chunk's cost. Not when the free blocks, less `held`,
    /// cannot hold the chunk (waiting ones hold no blocks, and could otherwise hold them
    /// all).
    fn admit(
        &mut self,
        id: SeqId,
        avail: usize,
        held: usize,
        budget: &mut usize,
        plan: &mut Plan,
        taken: &mut Vec<(SeqId, usize, bool)>,
    ) -> (bool, usize) {
        self.reuse_prefix(id);
        let (len, cost) = self.chunk(id, avail);
        let e = &self.entries[&id];
        let needed = blocks_for(e.computed + len).saturating_sub(e.blocks.len());
        if len == 0 || needed + held > self.alloc.free_count() {
            self.return_prefix(id);
            return (len == 0, 0);
        }
        self.waiting.retain(|&w| w != id);
        self.running.push(id);
        self.grow(id, len);
        let e = self
            .entries
            .get_mut(&id)
            .expect("admitted sequence has an entry");
        if !e.started {
            e.started = true;
            plan.started.push(id);
        }
        *budget = budget.saturating_sub(cost);
        plan.cost += cost;
        taken.push((id, cost, false));
        plan.batch.push(self.advance(id, len));
        (true, cost)
    }

    /// How many of `id`'s tokens run this step within `budget`, and what they cost of it.
    /// A decoding sequence always gets its one token. A token's cost is 1, plus its
    /// position over `context_cost` (attention over a long history is work too: a chunk
    /// of a long conversation's new turn costs more than the same chunk of a fresh
    /// prompt), times [`SCORED_TOKEN_COST`] for a prompt position whose logits are
    /// scored (`add_uncached`: the full-vocabulary projection, log-softmax and top-k).
    /// A `budget` of [`ONE_TOKEN`] asks for one token whatever it costs.
    fn chunk(&self, id: SeqId, budget: usize) -> (usize, usize) {
        let remaining = self.remaining(id);
        let cost = |len: usize| self.cost(id, len);
        if remaining <= 1 || budget == ONE_TOKEN {
            let len = remaining.min(1);
            return (len, cost(len));
        }
        // The longest chunk that fits: cost grows with length.
        let (mut lo, mut hi) = (0, remaining);
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            match cost(mid) <= budget {
                true => lo = mid,
                false => hi = mid - 1,
            }
        }
        (lo, cost(lo))
    }

    /// `id`'s tokens not in the KV cache yet: 1 for a decoding sequence.
    fn remaining(&self, id: SeqId) -> usize {
        let e = &self.entries[&id];
        e.ids.len() - e.computed
    }

    /// What `id`'s next `len` tokens cost of a step's budget (see [`Self::chunk`]).
    fn cost(&self, id: SeqId, len: usize) -> usize {
        let e = &self.entries[&id];
        self.cost_from(e, e.computed, len)
    }

    /// What `len` tokens of `e` from position `start` cost of a step's budget.
    fn cost_from(&self, e: &Entry, start: usize, len: usize) -> usize {
        let weight = match !e.reuse && e.ids.len() - start > 1 {
            true => SCORED_TOKEN_COST,
            false => 1,
        };
        weight * len + context_cost(start, len, self.cfg.context_cost)
    }

    /// Makes sure `id` has blocks for `len` more tokens, preempting the newest running
    /// sequences if needed. False if `id` itself had to be preempted.
    fn reserve(&mut self, id: SeqId, len: usize, preempted: &mut Vec<SeqId>) -> bool {
        loop {
            let e = &self.entries[&id];
            let needed = blocks_for(e.computed + len).saturating_sub(e.blocks.len());
            if needed <= self.alloc.free_count() {
                self.grow(id, len);
                return true;
            }
            let Some(&victim) = self.running.last() else {
                return false;
            };
            self.preempt(victim);
            preempted.push(victim);
            if victim == id {
                return false;
            }
        }
    }

    fn grow(&mut self, id: SeqId, len: usize) {
        let e = self
            .entries
            .get_mut(&id)
            .expect("scheduled sequence has an entry");
        while e.blocks.len() < blocks_for(e.computed + len) {
            match self.alloc.allocate() {
                Some(b) => e.blocks.push(b),
                None => unreachable!("blocks were counted before growing"),
            }
        }
    }

    fn preempt(&mut self, id: SeqId) {
        self.running.retain(|&r| r != id);
        self.release_blocks(id);
        self.waiting.push_front(id);
    }

    /// Gives back every block of `id` (registered ones stay cached); it will start over.
    fn release_blocks(&mut self, id: SeqId) {
        self.return_prefix(id);
        if let Some(e) = self.entries.get_mut(&id) {
            e.queued_steps = 0;
            e.probed = None;
            e.horizon = None;
        }
    }

    /// Gives back the blocks a waiting `id` took from the prefix cache to be admitted,
    /// when it was not: it keeps its place and its deadline.
    fn return_prefix(&mut self, id: SeqId) {
        if let Some(e) = self.entries.get_mut(&id) {
            self.alloc.release_all(&e.blocks);
            e.blocks.clear();
            e.hashes.clear();
            e.computed = 0;
        }
    }

    /// A sequence about to be admitted with nothing computed takes the registered blocks
    /// matching its leading tokens. At least one token is left to compute, so the step
    /// still yields its logits.
    fn reuse_prefix(&mut self, id: SeqId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        if e.computed > 0 || !e.blocks.is_empty() || !e.reuse {
            return;
        }
        for hash in cached_prefix(&self.alloc, &e.ids) {
            let Some(block) = self.alloc.lookup(&hash) else {
                break;
            };
            e.blocks.push(block);
            e.hashes.push(hash);
        }
        e.computed = e.blocks.len() * BLOCK_SIZE;
        if !e.started {
            e.cached = e.computed;
        }
    }

    /// Registers the blocks of `id` that are full of computed tokens.
    fn register_full_blocks(&mut self, id: SeqId) {
        let Some(e) = self.entries.get_mut(&id) else {
            return;
        };
        while (e.hashes.len() + 1) * BLOCK_SIZE <= e.computed {
            let i = e.hashes.len();
            let hash = block_hash(
                e.hashes.last(),
                &e.ids[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE],
            );
            self.alloc.register(e.blocks[i], hash);
            e.hashes.push(hash);
        }
    }

    fn advance(&mut self, id: SeqId, len: usize) -> Scheduled {
        let e = self
            .entries
            .get_mut(&id)
            .expect("scheduled sequence has an entry");
        let start = e.computed;
        e.computed += len;
        Scheduled {
            id,
            start,
            len,
            samples: e.computed == e.ids.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::kv::BLOCK_SIZE;

    impl Scheduler {
        /// `schedule`, asserting that every scheduled sequence holds its blocks.
        fn schedule_checked(&mut self) -> Vec<Scheduled> {
            let plan = self.schedule();
            assert_batch_has_blocks(self, &plan);
            plan.batch
        }
    }

    /// Every scheduled sequence holds the blocks for the positions it runs.
    fn assert_batch_has_blocks(s: &Scheduler, plan: &Plan) {
        for b in &plan.batch {
            assert!(
                s.blocks(b.id).len() * BLOCK_SIZE >= b.start + b.len,
                "{b:?} has {} blocks",
                s.blocks(b.id).len()
            );
        }
    }

    #[test]
    fn forks_stay_beside_their_parent_and_a_preempted_sequence_leaves_the_batch() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_running: 8,
            max_batch_tokens: 32,
            num_blocks: 5,
            context_cost: 0,
            prefill_horizon: PREFILL_HORIZON,
        });
        let p: Vec<u32> = (0..20).collect();
        let q: Vec<u32> = (1000..1060).collect();
        s.add(1, &p, 40).unwrap();
        s.add(2, &q, 70).unwrap();
        let plan = s.schedule();
        assert_eq!(plan.batch.len(), 2, "{plan:?}");
        s.fork(1, 3).expect("forks").expect("copies");
        s.append_token(1, 7);
        s.append_token(3, 8);
        // 4 of 5 blocks held; the prefilling request needs 2 more: it is the newest, so
        // it gives way (and starts over), while the forked choice, as old as its parent,
        // keeps decoding.
        let plan = s.schedule();
        assert_batch_has_blocks(&s, &plan);
        let ids: Vec<SeqId> = plan.batch.iter().map(|b| b.id).collect();
        assert_eq!(ids[..2], [1, 3], "{plan:?}");
        assert_eq!(plan.preempted, [2]);
        // No slot left: a fork is refused.
        let mut full = Scheduler::new(SchedulerConfig {
            max_running: 1,
            max_batch_tokens: 32,
            num_blocks: 5,
            context_cost: 0,
            prefill_horizon: PREFILL_HORIZON,
        });
        full.add(1, &p, 40).unwrap();
        full.schedule();
        assert_eq!(full.fork(1, 2), None);
    }

    #[test]
    fn a_sequence_preempted_after_it_was_scheduled_is_not_run() {
        // Decoders are scheduled before prefill chunks. Should a later reservation have
        // to preempt one already scheduled (which admission order prevents today), it
        // leaves the batch rather than run without blocks.
        let mut s = Scheduler::new(SchedulerConfig {
            max_running: 8,
            max_batch_tokens: 9,
            num_blocks: 3,
            context_cost: 0,
            prefill_horizon: PREFILL_HORIZON,
        });
        s.add(1, &(0..16).collect::<Vec<u32>>(), 24).unwrap();
        s.schedule();
        s.schedule();
        s.append_token(1, 5);
        s.add(2, &(100..140).collect::<Vec<u32>>(), 48).unwrap();
        s.schedule();
        s.append_token(1, 6);
        // Make the decoder the newest running sequence.
        s.running = vec![2, 1];
        let mut saw = false;
        for _ in 0..4 {
            for b in s.schedule_checked() {
                if b.samples {
                    s.append_token(b.id, 1);
                }
            }
            saw |= s.waiting.contains(&1);
        }
        assert!(saw, "the decoder was never preempted");
    }

    #[test]
    fn a_fork_shares_full_blocks_and_copies_the_partial_one() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_running: 4,
            max_batch_tokens: 64,
            num_blocks: 8,
            context_cost: 0,
            prefill_horizon: PREFILL_HORIZON,
        });
        let prompt: Vec<u32> = (0..20).collect();
        s.add(1, &prompt, 40).unwrap();
        // Not computed yet: nothing to fork from.
        assert_eq!(s.fork(1, 2), None);
        let plan = s.schedule();
        assert_eq!(plan.batch[0].len, 20);
        assert_eq!(s.blocks_used(), 2);
        let copy = s
            .fork(1, 2)
            .expect("forks")
            .expect("copies the partial block");
        assert_eq!(copy.0, s.blocks(1)[1]);
        assert_eq!(s.blocks(2), [s.blocks(1)[0], copy.1]);
        assert_eq!(s.blocks_used(), 3, "the full block is shared, not copied");
        assert_eq!(s.tokens(2), prompt.as_slice());
        // Both decode on: each appends its own token and runs one position.
        s.append_token(1, 100);
        s.append_token(2, 200);
        let plan = s.schedule();
        let runs: Vec<(SeqId, usize, usize)> =
            plan.batch.iter().map(|b| (b.id, b.start, b.len)).collect();
        assert_eq!(runs, [(1, 20, 1), (2, 20, 1)]);
        // Finishing one keeps the shared block for the other.
        s.finish(1);
        assert_eq!(s.blocks_used(), 2);
        s.finish(2);
        assert_eq!(s.blocks_used(), 0);
    }

    /// `n` prompt tokens unique to sequence `id`, so no two tests' sequences share a prefix
    /// unless they ask to.
    fn toks(id: SeqId, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| id as u32 * 10_000 + i).collect()
    }

    fn sched(max_running: usize, max_batch_tokens: usize, num_blocks: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_running,
            max_batch_tokens,
            num_blocks,
            context_cost: 0,
            prefill_horizon: PREFILL_HORIZON,
        })
    }

    fn lens(plan: &Plan) -> Vec<(SeqId, usize)> {
        plan.batch.iter().map(|s| (s.id, s.len)).collect()
    }

    /// Runs a step and records one sampled token for each sequence that samples.
    fn step(s: &mut Scheduler) -> Plan {
        let plan = s.schedule();
        sampled(s, plan)
    }

    /// As [`step`], within `budget` (a step-time target's).
    fn step_within(s: &mut Scheduler, budget: usize) -> Plan {
        let plan = s.schedule_within(budget, None);
        sampled(s, plan)
    }

    fn sampled(s: &mut Scheduler, plan: Plan) -> Plan {
        for x in &plan.batch {
            if x.samples {
                s.append_token(x.id, 0);
            }
        }
        plan
    }

    /// A token that costs more than a whole step (deep in a prompt, under a small
    /// `--max-batch-tokens` or `--context-cost`) still runs, one a step: the prompt stalled
    /// for good, holding its slot, before.
    #[test]
    fn a_prompt_moves_when_one_token_costs_more_than_a_step() {
        for within in [false, true] {
            let mut s = Scheduler::new(SchedulerConfig {
                max_running: 1,
                max_batch_tokens: 4,
                num_blocks: 100,
                context_cost: 1,
                prefill_horizon: PREFILL_HORIZON,
            });
            s.add(1, &toks(1, 12), 50).unwrap();
            let mut computed = 0;
            for steps in 1.. {
                let plan = match within {
                    false => step(&mut s),
                    true => step_within(&mut s, 4),
                };
                computed += plan.batch.iter().map(|x| x.len).sum::<usize>();
                if plan.batch.iter().any(|x| x.samples) {
                    break;
                }
                assert!(steps < 20, "stalled at {computed} of 12 (within: {within})");
            }
            assert_eq!(computed, 12);
        }
    }

    #[test]
    fn admits_fcfs_up_to_max_running() {
        let mut s = sched(2, 1000, 100);
        for id in 1..=3 {
            s.add(id, &toks(id, 10), 50).unwrap();
        }
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 10), (2, 10)]);
        assert_eq!(plan.started, vec![1, 2]);
        assert!(plan.batch.iter().all(|x| x.samples));
        assert_eq!((s.running(), s.waiting()), (2, 1));
    }

    #[test]
    fn long_prompt_is_chunked_and_decoders_go_first() {
        let mut s = sched(8, 16, 100);
        s.add(1, &toks(1, 4), 100).unwrap();
        step(&mut s); // 1 prefilled, sampled its first token
        s.add(2, &toks(2, 40), 100).unwrap();
        let plan = step(&mut s);
        // 1 decodes; 2 gets the rest of the budget as its first chunk.
        assert_eq!(lens(&plan), vec![(1, 1), (2, 15)]);
        assert!(plan.batch[0].samples && !plan.batch[1].samples);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 15)]);
        assert_eq!(plan.batch[1].start, 15);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 10)]);
        assert!(plan.batch[1].samples);
    }

    #[test]
    fn arrival_joins_a_running_batch_at_the_next_step() {
        let mut s = sched(8, 512, 100);
        s.add(1, &toks(1, 5), 100).unwrap();
        step(&mut s);
        step(&mut s);
        s.add(2, &toks(2, 7), 100).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 7)]);
    }

    #[test]
    fn budget_limits_admission() {
        let mut s = sched(8, 10, 100);
        s.add(1, &toks(1, 6), 100).unwrap();
        s.add(2, &toks(2, 6), 100).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 6), (2, 4)]);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 2)]);
    }

    /// A budget below the number of running streams starves none of them: every
    /// decoder gets its token each step (failed before: with a request's four choices
    /// forked under a budget of 2, the two newest got none). The server also refuses
    /// such a budget at start, as vLLM does; forks are how it arises here.
    #[test]
    fn every_decoder_gets_its_token_when_the_budget_is_smaller_than_the_batch() {
        let mut s = sched(8, 2, 100);
        s.add(1, &toks(1, 2), 100).unwrap();
        let plan = s.schedule();
        assert!(plan.batch[0].samples);
        for child in 2..=4 {
            s.fork(1, child).expect("a free slot");
        }
        for id in 1..=4 {
            s.append_token(id, 0);
        }
        for _ in 0..5 {
            let plan = step(&mut s);
            let mut ids: Vec<SeqId> = plan.batch.iter().map(|x| x.id).collect();
            ids.sort_unstable();
            assert_eq!(ids, vec![1, 2, 3, 4], "{plan:?}");
            assert!(plan.batch.iter().all(|x| x.len == 1 && x.samples));
        }
    }

    /// Under a budget smaller than the decoders take (a step-time target), decoders
    /// still all run and a waiting prompt still gets a chunk: its cost spread over the
    /// horizon (40 over 12 steps: 4), a thirty-second of `--max-batch-tokens` (2) if that
    /// were more; the plan's cost is what it charged, the decoders' part apart.
    #[test]
    fn a_tight_budget_slows_prefill_but_never_stops_it() {
        // Four decoding sequences and a 40-token prompt waiting.
        let setup = || {
            let mut s = sched(8, 64, 100);
            for id in 1..=4 {
                s.add(id, &toks(id, 2), 100).unwrap();
            }
            step(&mut s);
            s.add(9, &toks(9, 40), 100).unwrap();
            s
        };
        let mut s = setup();
        assert_eq!(s.decode_cost(), 4);
        let plan = s.schedule_within(3, None);
        assert_eq!(
            lens(&plan),
            vec![(1, 1), (2, 1), (3, 1), (4, 1), (9, 4)],
            "{plan:?}"
        );
        assert_eq!((plan.cost, plan.decode_cost), (8, 4));
        // What the budget leaves beyond the decoders goes to the prompt.
        let plan = setup().schedule_within(4 + 10, None);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 1), (3, 1), (4, 1), (9, 10)]);
        // A budget over --max-batch-tokens is capped at it.
        let mut wide = sched(8, 16, 100);
        wide.add(1, &toks(1, 100), 200).unwrap();
        let plan = wide.schedule_within(1_000, None);
        assert_eq!((lens(&plan), plan.cost), (vec![(1, 16)], 16));
    }

    /// Under a tight budget a long prompt is computed within `PREFILL_HORIZON` steps of
    /// being queued: its remaining cost over the steps it has left, more than the
    /// thirty-second of the budget a short one gets.
    #[test]
    fn a_long_prompt_is_worked_off_within_the_horizon() {
        let mut s = sched(8, 64, 100);
        s.add(1, &toks(1, 2), 100).unwrap();
        step(&mut s);
        s.add(2, &toks(2, 400), 500).unwrap();
        // 400 tokens owed over 12 steps, then 366 over 11.
        assert_eq!(lens(&step_within(&mut s, 2)), vec![(1, 1), (2, 34)]);
        assert_eq!(lens(&step_within(&mut s, 2)), vec![(1, 1), (2, 34)]);
        let mut steps = 2;
        while s.entries[&2].ids.len() - s.entries[&2].computed > 1 {
            step_within(&mut s, 2);
            steps += 1;
        }
        assert_eq!(steps, PREFILL_HORIZON, "{steps} steps");
    }

    /// `--prefill-horizon` spreads the same prompt over its steps instead: thinner
    /// chunks, steps nearer the target, a later first token.
    #[test]
    fn a_longer_horizon_spreads_a_prompt_thinner() {
        let mut s = Scheduler::new(SchedulerConfig {
            prefill_horizon: 3 * PREFILL_HORIZON,
            ..sched(8, 64, 100).cfg
        });
        s.add(1, &toks(1, 2), 100).unwrap();
        step(&mut s);
        s.add(2, &toks(2, 400), 500).unwrap();
        // 400 tokens owed over 36 steps.
        assert_eq!(lens(&step_within(&mut s, 2)), vec![(1, 1), (2, 12)]);
        let mut steps = 1;
        while s.entries[&2].ids.len() - s.entries[&2].computed > 1 {
            step_within(&mut s, 2);
            steps += 1;
        }
        assert_eq!(steps, 3 * PREFILL_HORIZON, "{steps} steps");
    }

    /// Under a tight budget a burst of prompts is worked off together, each within
    /// `PREFILL_HORIZON` steps of arriving, not one horizon after another (32 streams
    /// under a step-time target queued first tokens for seconds that way).
    #[test]
    fn a_burst_of_prompts_meets_one_horizon() {
        let mut s = sched(8, 512, 200);
        s.add(1, &toks(1, 2), 100).unwrap();
        step(&mut s);
        for id in 2..=5 {
            s.add(id, &toks(id, 120), 200).unwrap();
        }
        let mut steps = 0;
        while (2..=5).any(|id| !s.entries[&id].started || s.remaining(id) > 1) {
            step_within(&mut s, 2);
            steps += 1;
            assert!(
                steps <= PREFILL_HORIZON,
                "prompts still queued after {steps} steps"
            );
        }
    }

    /// A prompt is spread over `PREFILL_STRETCH` times the target-long steps its prefill
    /// would fill alone: a short one over a few steps, a long one over the horizon.
    #[test]
    fn a_prompt_is_stretched_by_its_own_size() {
        let mut s = sched(8, 512, 200);
        s.add(1, &toks(1, 2), 100).unwrap();
        step(&mut s);
        // 100 tokens where a target-long step holds 50: spread over 2 × stretch steps.
        s.add(2, &toks(2, 100), 200).unwrap();
        assert_eq!(s.owed(Some(50)), 100usize.div_ceil(2 * PREFILL_STRETCH));
        assert_eq!(s.entries[&2].horizon, Some(2 * PREFILL_STRETCH));
        // 1,000 tokens: 20 × stretch steps, at most the horizon.
        let mut s = sched(8, 512, 200);
        s.add(3, &toks(3, 1000), 1100).unwrap();
        assert_eq!(s.owed(Some(50)), 1000usize.div_ceil(PREFILL_HORIZON));
        let mut steps = 0;
        while !s.entries[&3].started || s.remaining(3) > 1 {
            s.schedule_within(2, Some(50));
            steps += 1;
        }
        assert_eq!(steps, PREFILL_HORIZON - 1, "counted once before");
    }

    /// A short prompt that arrives while a long one is prefilling gets its chunk first
    /// and its first token at the next step; the long one gets what it leaves (failed
    /// before: the long prompt took every step's budget until its last chunk, so a short
    /// one's first token waited out the whole prefill), with and without a step target.
    #[test]
    fn a_short_prompt_goes_before_a_long_ones_prefill() {
        for target in [false, true] {
            let mut s = sched(8, 64, 400);
            s.add(1, &toks(1, 2000), 2100).unwrap();
            for _ in 0..3 {
                match target {
                    true => step_within(&mut s, 64),
                    false => step(&mut s),
                };
            }
            s.add(2, &toks(2, 20), 100).unwrap();
            let plan = match target {
                true => step_within(&mut s, 64),
                false => step(&mut s),
            };
            assert_eq!(lens(&plan), vec![(2, 20), (1, 44)], "target {target}");
            assert!(plan.batch[0].samples);
            let plan = step(&mut s);
            assert_eq!(lens(&plan), vec![(2, 1), (1, 63)], "target {target}");
        }
    }

    /// Short prompts arriving one after another, each as large as a step's budget, at
    /// most halve the pace of the prompts queued before them: the oldest gets half of
    /// every step, and the next oldest in turn (failed with only a small share for the
    /// single oldest: a long prompt was 57× slower beside a stream of short ones, and the
    /// next prompt after it got nothing until it was done).
    #[test]
    fn prompts_queued_first_keep_half_of_each_step_beside_a_stream_of_short_ones() {
        let mut s = sched(64, 64, 1000);
        s.add(1, &toks(1, 400), 500).unwrap();
        s.add(2, &toks(2, 200), 300).unwrap();
        let mut steps = 0;
        let prefilling = |s: &Scheduler, id| !s.entries[&id].started || s.remaining(id) > 1;
        let mut first_done = None;
        while prefilling(&s, 1) || prefilling(&s, 2) {
            let short = 100 + steps as SeqId;
            s.add(short, &toks(short, 64), 70).unwrap();
            let left = (s.entries[&1].ids.len() - s.entries[&1].computed).min(64 / OLDEST_SHARE);
            let was_prefilling = prefilling(&s, 1);
            let plan = step(&mut s);
            let len = |id| plan.batch.iter().find(|x| x.id == id).map_or(0, |x| x.len);
            match was_prefilling {
                true => assert!(len(1) >= left, "step {steps}: {plan:?}"),
                false => {
                    first_done.get_or_insert(steps);
                }
            }
            // Finished shorts leave, as a client's request does.
            for x in plan.batch.iter().filter(|x| x.id >= 100 && x.samples) {
                s.finish(x.id);
            }
            steps += 1;
            assert!(
                steps <= (400 + 200) / 32 + 2,
                "still prefilling after {steps} steps"
            );
        }
        assert!(
            first_done.is_some_and(|at| at <= 400 / 32 + 1),
            "{first_done:?}"
        );
    }

    /// An oldest prompt that the step can finish gets all it needs first, as without the
    /// reordering: prompts that each fit in a step are served in their order.
    #[test]
    fn an_oldest_prompt_that_fits_in_the_step_goes_first_whole() {
        let mut s = sched(8, 64, 100);
        s.add(1, &toks(1, 50), 100).unwrap();
        s.add(2, &toks(2, 20), 100).unwrap();
        let plan = step(&mut s);
        let mut lens = lens(&plan);
        lens.sort_unstable();
        assert_eq!(lens, vec![(1, 50), (2, 14)]);
    }

    /// Under KV pressure a short waiting prompt is not admitted with blocks that the
    /// longer, older waiting prompt needs: it waits behind it, as without the reordering.
    #[test]
    fn a_short_prompt_does_not_take_the_blocks_of_an_older_waiting_one() {
        let mut s = sched(8, 64, 4);
        s.add(1, &toks(1, 3 * BLOCK_SIZE), 4 * BLOCK_SIZE).unwrap();
        s.add(2, &toks(2, 4), 4 * BLOCK_SIZE).unwrap();
        // Both fit: the short one first.
        assert_eq!(lens(&s.schedule()), vec![(2, 4), (1, 3 * BLOCK_SIZE)]);
        let mut s = sched(8, 64, 3);
        s.add(1, &toks(1, 3 * BLOCK_SIZE), 3 * BLOCK_SIZE).unwrap();
        s.add(2, &toks(2, 4), 2 * BLOCK_SIZE).unwrap();
        // Only the older one fits: it alone.
        assert_eq!(lens(&s.schedule()), vec![(1, 3 * BLOCK_SIZE)]);
    }

    /// A waiting prompt whose history is in the prefix cache is priced by what it has
    /// left to compute, found without taking the cached blocks.
    #[test]
    fn a_waiting_turn_is_priced_past_its_cached_history() {
        let mut s = sched(8, 512, 200);
        s.add(1, &toks(1, 2), 100).unwrap();
        s.add(2, &toks(2, 320), 400).unwrap();
        while s.remaining(2) > 1 {
            step(&mut s);
        }
        s.finish(2);
        let used = s.blocks_used();
        // The next turn: the same 320 tokens and 40 new ones.
        let mut turn = toks(2, 320);
        turn.extend(toks(3, 40));
        s.add(3, &turn, 400).unwrap();
        // 320 is a whole number of blocks, all cached: 40 tokens owed over 12 steps.
        assert_eq!(s.owed(None), 40usize.div_ceil(PREFILL_HORIZON));
        assert_eq!(s.blocks_used(), used, "the look took no blocks");
    }

    /// A prompt whose positions are all scored (echo with log-probabilities) takes two
    /// budget tokens per position: its chunks are half as long.
    #[test]
    fn scored_prompt_positions_count_double_in_the_budget() {
        let mut s = sched(8, 16, 100);
        s.add_uncached(1, &toks(1, 40), 100).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 8)]);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 8)]);
        let mut s = sched(8, 16, 100);
        s.add(2, &toks(2, 40), 100).unwrap();
        assert_eq!(lens(&step(&mut s)), vec![(2, 16)]);
    }

    /// The view reports what the scheduler holds: states, progress, blocks, sharing.
    #[test]
    fn the_view_agrees_with_the_scheduler() {
        let mut s = sched(4, 64, 20);
        s.add(1, &toks(1, 40), 100).unwrap();
        s.add(2, &toks(2, 10), 100).unwrap();
        s.add(3, &toks(3, 10), 100).unwrap();
        s.schedule();
        // A fork shares its parent's full blocks (and copies the partly filled one).
        s.fork(1, 4).expect("a free slot");
        for id in 1..=4 {
            s.append_token(id, 0);
        }
        s.add(9, &toks(9, 10), 100).unwrap();
        let (seqs, pool) = s.view();
        let find = |seqs: &[SeqView], id| seqs.iter().find(|v| v.id == id).cloned();
        let one = find(&seqs, 1).expect("listed");
        assert_eq!(one.state, SeqState::Decode);
        assert_eq!(
            (one.computed, one.tokens, one.blocks),
            (40, 41, blocks_for(40))
        );
        assert_eq!(one.shared_blocks, 2);
        assert_eq!(find(&seqs, 4).expect("listed").shared_blocks, 2);
        assert_eq!(find(&seqs, 2).expect("listed").shared_blocks, 0);
        assert_eq!(find(&seqs, 9).expect("listed").state, SeqState::Waiting);
        assert_eq!(pool.used, blocks_for(40) + 1 + 2 * blocks_for(10));
        assert_eq!(pool.free + pool.cached_free + pool.used, pool.total);
        assert_eq!(pool.map.len(), 20);
        assert_eq!(pool.map.matches('s').count(), 2);
        assert_eq!(pool.map.matches('u').count(), pool.used - 2);

        // Finished prompts' registered blocks stay cached for reuse.
        step(&mut s);
        s.finish(1);
        s.finish(4);
        let (seqs, pool) = s.view();
        assert!(pool.cached_free >= 2, "{pool:?}");
        assert_eq!(pool.map.matches('c').count(), pool.cached_free);
        assert!(find(&seqs, 1).is_none());
    }

    /// A prompt whose chunks leave its last token for the next step is still in
    /// prefill: one token left is a decoder's only once it has sampled one.
    #[test]
    fn one_prompt_token_left_is_prefill() {
        let mut s = sched(4, 40, 20);
        s.add(1, &toks(1, 41), 100).unwrap();
        let state = |s: &Scheduler| s.view().0[0].state;
        assert_eq!(lens(&s.schedule()), vec![(1, 40)]);
        assert_eq!(state(&s), SeqState::Prefill);
        assert_eq!(lens(&s.schedule()), vec![(1, 1)]);
        assert_eq!(state(&s), SeqState::Decode);
        s.append_token(1, 0);
        assert_eq!(state(&s), SeqState::Decode);
    }

    /// With a context cost, a new turn after a long history is prefilled in smaller
    /// chunks than a fresh prompt of the same length, within the same budget.
    #[test]
    fn chunks_shrink_with_the_history_they_attend_to() {
        let mut s = Scheduler::new(SchedulerConfig {
            max_running: 8,
            max_batch_tokens: 128,
            num_blocks: 400,
            context_cost: 1024,
            prefill_horizon: PREFILL_HORIZON,
        });
        // A 2,048-token history, all computed: the next turn's 100 tokens start there.
        let history = toks(1, 2048);
        s.add(1, &history, 4096).unwrap();
        while s.entries[&1].computed < 2048 {
            s.schedule();
        }
        s.schedule(); // registers the last blocks for reuse
        s.finish(1);
        let mut turn = history.clone();
        turn.extend(toks(3, 100));
        s.add(2, &turn, 4096).unwrap();
        let plan = s.schedule();
        // The turn found its history in the prefix cache and pays ~3 per token there.
        let long = plan.batch[0].len;
        assert_eq!(s.cached_tokens(2), 2048);
        assert!((38..=44).contains(&long), "chunk of {long}");
        assert!(plan.cost <= 128, "within the budget: {plan:?}");
        // Alone, a fresh prompt gets the whole budget minus its small context cost.
        let mut fresh = sched(8, 128, 400);
        fresh.cfg.context_cost = 1024;
        fresh.add(5, &toks(5, 200), 4096).unwrap();
        let plan = fresh.schedule();
        assert!(plan.batch[0].len >= 118, "{plan:?}");
    }

    #[test]
    fn context_cost_sums_positions() {
        assert_eq!(context_cost(0, 10, 0), 0);
        assert_eq!(context_cost(0, 4, 2), 3); // (0 + 1 + 2 + 3) / 2
        assert_eq!(context_cost(2048, 1, 1024), 2);
        assert_eq!(context_cost(1000, 10, 1024), 10); // 10045 / 1024, rounded up
    }

    #[test]
    fn finish_frees_blocks_and_slot() {
        let mut s = sched(1, 512, 10);
        s.add(1, &toks(1, 40), 64).unwrap();
        s.add(2, &toks(2, 10), 64).unwrap();
        step(&mut s);
        assert_eq!(s.blocks_used(), blocks_for(40));
        s.finish(1); // e.g. the client went away
        assert_eq!(s.blocks_used(), 0);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(2, 10)]);
    }

    #[test]
    fn cancelling_a_waiting_sequence_removes_it() {
        let mut s = sched(1, 512, 10);
        s.add(1, &toks(1, 4), 64).unwrap();
        s.add(2, &toks(2, 4), 64).unwrap();
        step(&mut s);
        s.finish(2);
        assert_eq!(s.waiting(), 0);
        assert!(!s.is_empty());
        s.finish(1);
        assert!(s.is_empty());
    }

    #[test]
    fn out_of_blocks_preempts_the_newest_and_recomputes_it() {
        // 4 blocks: two sequences of exactly 2 blocks each.
        let mut s = sched(8, 512, 4);
        s.add(1, &toks(1, 2 * BLOCK_SIZE), 4 * BLOCK_SIZE).unwrap();
        s.add(2, &toks(2, 2 * BLOCK_SIZE), 4 * BLOCK_SIZE).unwrap();
        step(&mut s);
        assert_eq!(s.blocks_used(), 4);
        // Both now need a third block: 2 is newest and gives way.
        let plan = step(&mut s);
        assert_eq!(plan.preempted, vec![2]);
        assert_eq!(lens(&plan), vec![(1, 1)]);
        assert_eq!(s.waiting(), 1);
        // Once 1 finishes, 2 is recomputed from all its tokens (prompt + 1 generated).
        s.finish(1);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(2, 2 * BLOCK_SIZE + 1)]);
        assert!(plan.started.is_empty(), "a preempted sequence is not new");
        assert!(plan.batch[0].samples);
    }

    #[test]
    fn request_larger_than_the_cache_is_refused() {
        let mut s = sched(8, 512, 2);
        assert_eq!(
            s.add(1, &toks(1, 10), 3 * BLOCK_SIZE),
            Err(AddError::TooLarge {
                needed: 3,
                total: 2
            })
        );
        assert!(s.is_empty());
    }

    #[test]
    fn no_admission_without_blocks() {
        let mut s = sched(8, 512, 2);
        s.add(1, &toks(1, 2 * BLOCK_SIZE), 2 * BLOCK_SIZE).unwrap();
        s.add(2, &toks(2, 4), 2 * BLOCK_SIZE).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 2 * BLOCK_SIZE)]);
        assert_eq!(s.waiting(), 1);
    }

    /// Runs `s` until `id` has computed every known token, appending one sampled token.
    fn run_to_first_token(s: &mut Scheduler, id: SeqId) {
        loop {
            let plan = s.schedule();
            let mine = plan.batch.iter().find(|x| x.id == id).copied();
            if let Some(x) = mine.filter(|x| x.samples) {
                s.append_token(x.id, 7);
                return;
            }
        }
    }

    #[test]
    fn a_finished_prompt_is_reused_by_the_next_turn() {
        let mut s = sched(4, 512, 16);
        let turn1 = toks(1, 40);
        s.add(1, &turn1, 64).unwrap();
        run_to_first_token(&mut s, 1);
        assert_eq!(s.cached_tokens(1), 0);
        s.finish(1);
        assert_eq!(
            s.blocks_cached(),
            2,
            "the two full blocks of the prompt stay cached"
        );

        // The next turn resends the history plus a new message.
        let mut turn2 = turn1.clone();
        turn2.extend([7, 8, 9, 10]);
        s.add(2, &turn2, 64).unwrap();
        let plan = s.schedule();
        assert_eq!(plan.batch[0].start, 2 * BLOCK_SIZE);
        assert_eq!(plan.batch[0].len, turn2.len() - 2 * BLOCK_SIZE);
        assert_eq!(s.cached_tokens(2), 2 * BLOCK_SIZE);
        assert_eq!(s.blocks_cached(), 0);
    }

    #[test]
    fn at_least_one_token_is_always_computed() {
        let mut s = sched(4, 512, 16);
        let p = toks(1, 2 * BLOCK_SIZE);
        s.add(1, &p, 64).unwrap();
        run_to_first_token(&mut s, 1);
        s.finish(1);
        s.add(2, &p, 64).unwrap();
        let plan = s.schedule();
        // Both blocks are cached, but the second is recomputed to get logits.
        assert_eq!(
            (plan.batch[0].start, plan.batch[0].len),
            (BLOCK_SIZE, BLOCK_SIZE)
        );
        assert!(plan.batch[0].samples);
    }

    #[test]
    fn running_sequences_share_a_common_prefix() {
        let mut s = sched(4, 512, 16);
        let system = toks(9, 2 * BLOCK_SIZE);
        let (mut a, mut b) = (system.clone(), system.clone());
        a.extend(toks(1, 5));
        b.extend(toks(2, 5));
        s.add(1, &a, 64).unwrap();
        run_to_first_token(&mut s, 1);
        let used = s.blocks_used();
        s.add(2, &b, 64).unwrap();
        let plan = s.schedule();
        let x = plan.batch.iter().find(|x| x.id == 2).unwrap();
        assert_eq!(x.start, 2 * BLOCK_SIZE);
        assert_eq!(s.blocks_used(), used + 1, "only b's own last block is new");
        assert_eq!(s.blocks(1)[..2], s.blocks(2)[..2]);
    }

    #[test]
    fn a_different_prefix_is_not_reused() {
        let mut s = sched(4, 512, 16);
        s.add(1, &toks(1, 40), 64).unwrap();
        run_to_first_token(&mut s, 1);
        s.finish(1);
        let mut other = toks(1, 40);
        other[3] += 1;
        s.add(2, &other, 64).unwrap();
        assert_eq!(s.schedule().batch[0].start, 0);
        assert_eq!(s.cached_tokens(2), 0);
    }

    #[test]
    fn discarded_sequences_leave_nothing_cached() {
        let mut s = sched(4, 512, 16);
        s.add(1, &toks(1, 40), 64).unwrap();
        s.schedule();
        s.discard(1);
        assert_eq!((s.blocks_cached(), s.blocks_used()), (0, 0));
    }

    /// Many conversations sharing prefixes, in a cache too small for all of them: every
    /// request finishes, steps never stall while work is left, and at the end no block is
    /// referenced.
    #[test]
    fn shared_prefixes_under_pressure_always_make_progress() {
        let mut s = sched(4, 48, 24);
        let system = toks(99, 40);
        let mut next = 1;
        let mut live: HashMap<SeqId, usize> = HashMap::new();
        let mut history = system.clone();
        for step in 0..5000 {
            if live.len() < 6 && step % 7 == 0 && next < 40 {
                // Alternate between a growing conversation and fresh prompts.
                let prompt = if next % 2 == 0 {
                    history.extend(toks(next, 9));
                    history.clone()
                } else {
                    let mut p = system.clone();
                    p.extend(toks(next, 20));
                    p
                };
                if prompt.len() + 8 <= 24 * BLOCK_SIZE {
                    s.add(next, &prompt, prompt.len() + 8).unwrap();
                    live.insert(next, 0);
                }
                next += 1;
            }
            let plan = s.schedule();
            assert!(
                !plan.batch.is_empty() || s.is_empty(),
                "step {step}: stalled with {} waiting",
                s.waiting()
            );
            for x in plan.batch.iter().filter(|x| x.samples) {
                s.append_token(x.id, 5);
                let made = live.get_mut(&x.id).unwrap();
                *made += 1;
                if *made == 8 {
                    s.finish(x.id);
                    live.remove(&x.id);
                }
            }
            if next >= 40 && live.is_empty() {
                break;
            }
        }
        assert!(live.is_empty(), "unfinished: {live:?}");
        assert_eq!(s.blocks_used(), 0);
        assert!(s.blocks_cached() > 0);
    }

    /// A sequence that picks up cached blocks but then does not fit gives them back:
    /// waiting sequences holding blocks could hold them all, with nothing running.
    #[test]
    fn a_waiting_sequence_holds_no_blocks() {
        let mut s = sched(4, 512, 8);
        let a = toks(1, 3 * BLOCK_SIZE);
        s.add(1, &a, 3 * BLOCK_SIZE + 4).unwrap();
        run_to_first_token(&mut s, 1);
        s.finish(1);
        assert_eq!(s.blocks_cached(), 3);

        s.add(2, &toks(2, 40), 48).unwrap();
        let mut x = a.clone();
        x.extend(toks(3, 40));
        s.add(3, &x, x.len() + 8).unwrap();
        let plan = s.schedule();
        assert_eq!(lens(&plan), vec![(2, 40)], "x does not fit yet");
        assert!(s.blocks(3).is_empty());
        assert_eq!(s.blocks_used(), 3, "only the running sequence holds blocks");
        assert_eq!(s.blocks_cached(), 3, "x's prefix is still cached for later");
    }
}
