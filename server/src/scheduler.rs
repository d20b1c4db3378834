//! The continuous-batching scheduler: which sequences run this step, with how many tokens
//! each. Pure bookkeeping over its own state (queues, per-sequence progress, KV block
//! tables), so every decision is unit-tested without a model.
//!
//! Each step, in this order, within `max_batch_tokens`:
//! 1. every running sequence that is decoding gets its one token;
//! 2. running sequences still prefilling get a chunk of their prompt (chunked prefill);
//! 3. waiting sequences are admitted first-come-first-served while there are slots
//!    (`max_running`), budget and KV blocks, and get a prefill chunk.
//!
//! When a running sequence needs a block and none is free, the newest running sequence is
//! preempted: its blocks are freed and it goes back to the head of the queue, to be
//! recomputed from its tokens later. Nothing is dropped.

use std::collections::{HashMap, VecDeque};

use chorus_model::kv::{blocks_for, BlockAllocator};

pub type SeqId = u64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    pub max_running: usize,
    pub max_batch_tokens: usize,
    pub num_blocks: usize,
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

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub batch: Vec<Scheduled>,
    /// Sequences pushed back to the queue this step.
    pub preempted: Vec<SeqId>,
    /// Sequences that were running for the first time this step (left the queue).
    pub started: Vec<SeqId>,
}

#[derive(Debug)]
struct Entry {
    /// Tokens known: prompt plus generated.
    tokens: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Has run at least once (a preempted sequence is not "new" again).
    started: bool,
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    entries: HashMap<SeqId, Entry>,
    waiting: VecDeque<SeqId>,
    /// In admission order: the newest is last.
    running: Vec<SeqId>,
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
        }
    }

    /// Queues a sequence of `prompt_len` tokens that may grow to `max_len`.
    pub fn add(&mut self, id: SeqId, prompt_len: usize, max_len: usize) -> Result<(), AddError> {
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
                tokens: prompt_len,
                computed: 0,
                blocks: Vec::new(),
                started: false,
            },
        );
        self.waiting.push_back(id);
        Ok(())
    }

    /// Records a sampled token: the sequence now knows one more token.
    pub fn append_token(&mut self, id: SeqId) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.tokens += 1;
        }
    }

    /// Removes a finished or cancelled sequence and frees its blocks.
    pub fn finish(&mut self, id: SeqId) {
        if let Some(e) = self.entries.remove(&id) {
            self.alloc.release_all(&e.blocks);
            self.running.retain(|&r| r != id);
            self.waiting.retain(|&w| w != id);
        }
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

    pub fn blocks_used(&self) -> usize {
        self.alloc.used()
    }

    pub fn blocks_total(&self) -> usize {
        self.alloc.total()
    }

    /// Decides this step's batch and advances every scheduled sequence's progress.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.cfg.max_batch_tokens;

        // 1 and 2: running sequences, decoders before prefill chunks, oldest first.
        let order: Vec<SeqId> = {
            let (decoding, prefilling): (Vec<SeqId>, Vec<SeqId>) = self
                .running
                .iter()
                .partition(|id| self.entries[id].tokens - self.entries[id].computed == 1);
            decoding.into_iter().chain(prefilling).collect()
        };
        for id in order {
            if budget == 0 {
                break;
            }
            // It may have been preempted to make room for an older one.
            if !self.running.contains(&id) {
                continue;
            }
            let e = &self.entries[&id];
            let len = (e.tokens - e.computed).min(budget);
            if !self.reserve(id, len, &mut plan.preempted) {
                continue;
            }
            budget -= len;
            plan.batch.push(self.advance(id, len));
        }

        // 3: admit waiting sequences.
        while budget > 0 && self.running.len() < self.cfg.max_running {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let e = &self.entries[&id];
            let len = (e.tokens - e.computed).min(budget);
            let needed = blocks_for(e.computed + len).saturating_sub(e.blocks.len());
            if needed > self.alloc.free_count() {
                break;
            }
            self.waiting.pop_front();
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
            budget -= len;
            plan.batch.push(self.advance(id, len));
        }
        plan
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
        if let Some(e) = self.entries.get_mut(&id) {
            self.alloc.release_all(&e.blocks);
            e.blocks.clear();
            e.computed = 0;
        }
        self.waiting.push_front(id);
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
            samples: e.computed == e.tokens,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chorus_model::kv::BLOCK_SIZE;

    fn sched(max_running: usize, max_batch_tokens: usize, num_blocks: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            max_running,
            max_batch_tokens,
            num_blocks,
        })
    }

    fn lens(plan: &Plan) -> Vec<(SeqId, usize)> {
        plan.batch.iter().map(|s| (s.id, s.len)).collect()
    }

    /// Runs a step and records one sampled token for each sequence that samples.
    fn step(s: &mut Scheduler) -> Plan {
        let plan = s.schedule();
        for x in &plan.batch {
            if x.samples {
                s.append_token(x.id);
            }
        }
        plan
    }

    #[test]
    fn admits_fcfs_up_to_max_running() {
        let mut s = sched(2, 1000, 100);
        for id in 1..=3 {
            s.add(id, 10, 50).unwrap();
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
        s.add(1, 4, 100).unwrap();
        step(&mut s); // 1 prefilled, sampled its first token
        s.add(2, 40, 100).unwrap();
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
        s.add(1, 5, 100).unwrap();
        step(&mut s);
        step(&mut s);
        s.add(2, 7, 100).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 7)]);
    }

    #[test]
    fn budget_limits_admission() {
        let mut s = sched(8, 10, 100);
        s.add(1, 6, 100).unwrap();
        s.add(2, 6, 100).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 6), (2, 4)]);
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 1), (2, 2)]);
    }

    #[test]
    fn finish_frees_blocks_and_slot() {
        let mut s = sched(1, 512, 10);
        s.add(1, 40, 64).unwrap();
        s.add(2, 10, 64).unwrap();
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
        s.add(1, 4, 64).unwrap();
        s.add(2, 4, 64).unwrap();
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
        s.add(1, 2 * BLOCK_SIZE, 4 * BLOCK_SIZE).unwrap();
        s.add(2, 2 * BLOCK_SIZE, 4 * BLOCK_SIZE).unwrap();
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
            s.add(1, 10, 3 * BLOCK_SIZE),
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
        s.add(1, 2 * BLOCK_SIZE, 2 * BLOCK_SIZE).unwrap();
        s.add(2, 4, 2 * BLOCK_SIZE).unwrap();
        let plan = step(&mut s);
        assert_eq!(lens(&plan), vec![(1, 2 * BLOCK_SIZE)]);
        assert_eq!(s.waiting(), 1);
    }
}
