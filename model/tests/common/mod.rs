//! Locating the real default model for tests.

#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

use std::path::PathBuf;

use chorus_model::kv::{blocks_for, BlockAllocator};
use chorus_model::{Backend, KvCache, SeqInput, Transformer};

/// `CHORUS_TEST_MODEL`, or the default model in the workspace's model cache (the test
/// script fetches it first with `chorus --download-only`).
pub fn model_path() -> PathBuf {
    if let Ok(p) = std::env::var("CHORUS_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "the default model is not cached at {}: run `cargo run --release -- --download-only` first",
        p.display()
    );
    p
}

/// `CHORUS_TEST_GEMMA`, or the `gemma3-270m` catalog model in the workspace's model
/// cache (the test script fetches it with `chorus models pull gemma3-270m`).
pub fn gemma_path() -> PathBuf {
    if let Ok(p) = std::env::var("CHORUS_TEST_GEMMA") {
        return PathBuf::from(p);
    }
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/cache/gemma-3-270m-q4_k_m.gguf");
    assert!(
        p.is_file(),
        "gemma3-270m is not cached at {}: run `cargo run --release -- models pull gemma3-270m` first",
        p.display()
    );
    p
}

/// A file of the reference data (copied into `tests/reference/` from the project's
/// `shared/reference/`, so the test does not depend on anything outside the repository).
pub fn reference(name: &str) -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/reference")
        .join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("reference file is JSON")
}

/// Runs `prompts` (prefill in chunks of `chunk`, then `steps` greedy decode steps, all
/// sequences in every step) and returns every logits vector each sequence produced.
pub fn run(
    m: &Transformer,
    prompts: &[Vec<u32>],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<Vec<f32>>> {
    let mut kv = KvCache::new(m.config().kv_shape(), blocks_needed(prompts, steps)).unwrap();
    drive(
        &mut |b| m.forward(&mut kv, b).unwrap(),
        prompts,
        chunk,
        steps,
    )
}

/// As [`run`], through a [`Backend`] of at least [`blocks_needed`] blocks.
pub fn run_backend(
    b: &mut Backend,
    prompts: &[Vec<u32>],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<Vec<f32>>> {
    drive(
        &mut |batch| b.forward(batch).unwrap(),
        prompts,
        chunk,
        steps,
    )
}

/// The cache [`run`] needs (block 0 is left unused, so that a zero id is never right
/// by accident).
pub fn blocks_needed(prompts: &[Vec<u32>], steps: usize) -> usize {
    let max_len = prompts.iter().map(Vec::len).max().unwrap() + steps;
    blocks_for(max_len) * prompts.len() + 1
}

fn drive(
    forward: &mut dyn FnMut(&[SeqInput]) -> Vec<Vec<f32>>,
    prompts: &[Vec<u32>],
    chunk: usize,
    steps: usize,
) -> Vec<Vec<Vec<f32>>> {
    let max_len = prompts.iter().map(Vec::len).max().unwrap() + steps;
    let each = blocks_for(max_len);
    let mut alloc = BlockAllocator::new(blocks_needed(prompts, steps));
    let _skip = alloc.allocate();
    let blocks: Vec<Vec<u32>> = prompts
        .iter()
        .map(|_| (0..each).map(|_| alloc.allocate().unwrap()).collect())
        .collect();
    let mut tokens: Vec<Vec<u32>> = prompts.to_vec();
    let mut done = vec![0usize; prompts.len()];
    let mut out = vec![Vec::new(); prompts.len()];
    while (0..prompts.len()).any(|i| out[i].len() < steps) {
        let mut plan = Vec::new();
        for i in 0..prompts.len() {
            if out[i].len() >= steps {
                continue;
            }
            let len = (tokens[i].len() - done[i]).min(chunk);
            plan.push((i, done[i], len, done[i] + len == tokens[i].len()));
        }
        let batch: Vec<SeqInput> = plan
            .iter()
            .map(|&(i, start, len, wants)| SeqInput {
                tokens: &tokens[i][start..start + len],
                start_pos: start,
                blocks: &blocks[i],
                wants_logits: wants,
                all_logits: false,
            })
            .collect();
        let logits = forward(&batch);
        let mut next = logits.into_iter();
        for &(i, start, len, wants) in &plan {
            done[i] = start + len;
            if wants {
                let l = next.next().unwrap();
                let best = chorus_model::sampling::argmax(&l);
                out[i].push(l);
                tokens[i].push(best);
            }
        }
    }
    out
}
