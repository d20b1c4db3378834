//! Engine invariants on the real model: a sequence's greedy tokens do not depend on what
//! else shares its batch, nor on how its prompt was split into prefill chunks.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use crate::common;
use chorus_model::kv::{blocks_for, BlockAllocator};
use chorus_model::{gguf, sampling::argmax, KvCache, LoadedModel, SeqInput, WeightFormat};

const PROMPTS: [&str; 8] = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colours are",
    "Translate to French: good morning",
    "List three uses of a paperclip:",
];
const NEW_TOKENS: usize = 24;

struct Seq {
    prompt_len: usize,
    tokens: Vec<u32>,
    computed: usize,
    blocks: Vec<u32>,
}

/// Greedy-decodes every prompt together; prompts are prefilled in chunks of at most
/// `chunk` tokens, all sequences sharing each step.
fn generate(m: &LoadedModel, prompts: &[Vec<u32>], chunk: usize) -> Vec<Vec<u32>> {
    let cfg = m.model.config();
    let max_len = prompts.iter().map(Vec::len).max().unwrap_or(0) + NEW_TOKENS;
    let blocks_each = blocks_for(max_len);
    let mut alloc = BlockAllocator::new(blocks_each * prompts.len() + 3);
    // Take some blocks first so sequences do not start at block 0.
    let _offset = [alloc.allocate(), alloc.allocate(), alloc.allocate()];
    let mut kv = KvCache::new(cfg.kv_shape(), alloc.total()).unwrap();
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|p| Seq {
            prompt_len: p.len(),
            tokens: p.clone(),
            computed: 0,
            blocks: (0..blocks_each)
                .map(|_| alloc.allocate().unwrap())
                .collect(),
        })
        .collect();
    while seqs
        .iter()
        .any(|s| s.tokens.len() - s.prompt_len < NEW_TOKENS)
    {
        let mut plan = Vec::new();
        for (i, s) in seqs.iter().enumerate() {
            if s.tokens.len() - s.prompt_len >= NEW_TOKENS {
                continue;
            }
            let len = (s.tokens.len() - s.computed).min(chunk);
            plan.push((i, s.computed, len, s.computed + len == s.tokens.len()));
        }
        let inputs: Vec<SeqInput> = plan
            .iter()
            .map(|&(i, start, len, wants)| SeqInput {
                tokens: &seqs[i].tokens[start..start + len],
                start_pos: start,
                blocks: &seqs[i].blocks,
                wants_logits: wants,
                all_logits: false,
            })
            .collect();
        let logits = m.model.forward(&mut kv, &inputs).unwrap();
        let mut rows = logits.iter();
        for &(i, _, len, wants) in &plan {
            seqs[i].computed += len;
            if wants {
                let next = argmax(rows.next().unwrap());
                seqs[i].tokens.push(next);
            }
        }
    }
    seqs.iter()
        .zip(prompts)
        .map(|(s, p)| s.tokens[p.len()..].to_vec())
        .collect()
}

#[test]
fn batched_greedy_equals_one_at_a_time_packed() {
    check_batch_invariance(WeightFormat::Packed);
}

#[test]
fn batched_greedy_equals_one_at_a_time_packed_int8() {
    check_batch_invariance(WeightFormat::PackedInt8);
}

#[test]
fn batched_greedy_equals_one_at_a_time_packed_int16() {
    check_batch_invariance(WeightFormat::PackedInt16);
}

#[test]
fn batched_greedy_equals_one_at_a_time_f32() {
    check_batch_invariance(WeightFormat::F32);
}

#[test]
fn batched_greedy_equals_one_at_a_time_quantized() {
    check_batch_invariance(WeightFormat::Quantized);
}

fn check_batch_invariance(format: WeightFormat) {
    let m = gguf::load(&common::model_path(), format).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| m.tokenizer.encode(p).unwrap())
        .collect();

    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| generate(&m, std::slice::from_ref(p), usize::MAX).remove(0))
        .collect();
    let together = generate(&m, &prompts, usize::MAX);
    let chunked = generate(&m, &prompts, 5);

    for (i, p) in PROMPTS.iter().enumerate() {
        assert_eq!(
            together[i], alone[i],
            "prompt {i} ({p:?}) changed when batched"
        );
        assert_eq!(
            chunked[i], alone[i],
            "prompt {i} ({p:?}) changed with chunked prefill"
        );
    }
    // The model says something sensible, so the test is not comparing garbage with garbage.
    let paris = m.tokenizer.decode(&alone[0], true).unwrap();
    assert!(paris.contains("Paris"), "greedy continuation: {paris:?}");
}
