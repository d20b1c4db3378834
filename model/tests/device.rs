//! The device forward ([`chorus_model::device`], the code the CUDA path runs) on
//! candle's CPU device (and on a GPU where one is asked for, see [`targets`]), against
//! the packed CPU path: every architecture's tiny model alone and batched with chunked
//! prefill, every row's logits, the real default model in both device weight formats
//! and with both chosen per step, a copied block (what `n > 1` forks) continuing as the
//! original, and greedy rows' argmax found on the device.

#![allow(clippy::unwrap_used)] // test helpers: a failure here is a test failure

mod common;
mod tiny;

use candle_core::{DType, Device};
use chorus_model::{
    gguf, Backend, DeviceAttention, DeviceOptions, DeviceWeights, SeqInput, StepRow, WeightFormat,
};
use common::{blocks_needed, model_path, run, run_backend};
use tiny::{tiny, MODEL_TYPES, VOCAB};

fn on_cpu(weights: DeviceWeights) -> DeviceOptions {
    DeviceOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        weights,
        attention: DeviceAttention::Paged,
        graph_rows: 0,
        graph_shapes: 32,
    }
}

/// The largest difference between two runs' logits. Each run feeds back its own greedy
/// choice, so where the two choose differently the rest of that sequence is not
/// comparable: that is allowed only at a near tie (both runs rate the other's choice
/// within `tie` of their own), and the comparison of that sequence stops there.
fn max_diff(a: &[Vec<Vec<f32>>], b: &[Vec<Vec<f32>>], tie: f32, what: &str) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}");
    let mut worst = 0.0f32;
    for (i, (sa, sb)) in a.iter().zip(b).enumerate() {
        assert_eq!(sa.len(), sb.len(), "{what}: sequence {i}");
        for (step, (la, lb)) in sa.iter().zip(sb).enumerate() {
            for (x, y) in la.iter().zip(lb) {
                worst = worst.max((x - y).abs());
            }
            let (ta, tb) = (
                chorus_model::sampling::argmax(la),
                chorus_model::sampling::argmax(lb),
            );
            if ta != tb {
                let gap_a = la[ta as usize] - la[tb as usize];
                let gap_b = lb[tb as usize] - lb[ta as usize];
                assert!(
                    gap_a < tie && gap_b < tie,
                    "{what}: sequence {i} step {step} chose {ta} and {tb}, margins {gap_a} and {gap_b}"
                );
                eprintln!("{what}: sequence {i} step {step}: a near tie ({gap_a}, {gap_b}) chose differently");
                break;
            }
        }
    }
    worst
}

/// f16 keeps 11 bits: on candle's CPU device (the gather) 3.6e-2 seen in decode steps,
/// 5.3e-2 over every row of a 37-token Gemma 3 prompt; 0.1 allowed.
const F16_TOL: f32 = 0.1;
/// bf16 keeps 8 bits, eight times f16's rounding: 0.30 seen on candle's CPU device
/// (Gemma 3; 0.09–0.18 for the others), 0.5 allowed.
const BF16_TOL: f32 = 0.5;

/// A device to check, with the tolerance its logits are held to on the tiny models
/// (values of order 1).
struct Target {
    name: &'static str,
    opts: DeviceOptions,
    tol: f32,
}

/// Candle's CPU device always: in f32, decoding rows through the paged op's reference,
/// the same in fixed-shape steps (what CUDA graphs replay), and through the gather; the
/// GPU's defaults (bf16, fixed-shape steps); the gather in f16. With the `cuda` feature
/// and `CHORUS_TEST_CUDA=1` (what `scripts/device-check.sh` sets on a GPU machine) also
/// the first GPU: the paged kernel with steps replayed as CUDA graphs in f32, bf16 and
/// f16, in bf16 without, and the gather in f16.
///
/// In f32 both paths compute over an f16 cache in different summation orders, and a
/// last-bit difference in a key can round it to a neighbouring f16: 6e-4 seen on the CPU,
/// 2e-3 allowed. Half-precision products: see [`F16_TOL`] and [`BF16_TOL`].
fn targets() -> Vec<Target> {
    let mut t = vec![
        Target {
            name: "candle-cpu f32 paged",
            opts: on_cpu(DeviceWeights::Dense),
            tol: 2e-3,
        },
        Target {
            name: "candle-cpu f32 paged fixed",
            opts: DeviceOptions {
                graph_rows: 512,
                ..on_cpu(DeviceWeights::Dense)
            },
            tol: 2e-3,
        },
        Target {
            name: "candle-cpu f32 gather",
            opts: DeviceOptions {
                attention: DeviceAttention::Gather,
                ..on_cpu(DeviceWeights::Dense)
            },
            tol: 2e-3,
        },
        Target {
            name: "candle-cpu bf16 paged fixed",
            opts: DeviceOptions {
                dtype: DType::BF16,
                graph_rows: 512,
                ..on_cpu(DeviceWeights::Dense)
            },
            tol: BF16_TOL,
        },
        Target {
            name: "candle-cpu f16 gather",
            opts: DeviceOptions {
                dtype: DType::F16,
                attention: DeviceAttention::Gather,
                ..on_cpu(DeviceWeights::Dense)
            },
            tol: F16_TOL,
        },
    ];
    if let Some(gpu) = cuda() {
        for (name, dtype, attention, graph_rows, tol) in [
            (
                "cuda f32 paged graphs",
                DType::F32,
                DeviceAttention::Paged,
                512,
                2e-3,
            ),
            (
                "cuda bf16 paged graphs",
                DType::BF16,
                DeviceAttention::Paged,
                512,
                BF16_TOL,
            ),
            (
                "cuda f16 paged graphs",
                DType::F16,
                DeviceAttention::Paged,
                512,
                F16_TOL,
            ),
            (
                "cuda bf16 paged",
                DType::BF16,
                DeviceAttention::Paged,
                0,
                BF16_TOL,
            ),
            (
                "cuda f16 gather",
                DType::F16,
                DeviceAttention::Gather,
                0,
                F16_TOL,
            ),
        ] {
            t.push(Target {
                name,
                opts: DeviceOptions {
                    device: gpu.clone(),
                    dtype,
                    weights: DeviceWeights::Dense,
                    attention,
                    graph_rows,
                    graph_shapes: 32,
                },
                tol,
            });
        }
    }
    t
}

/// The first GPU, where `CHORUS_TEST_CUDA=1` asks for it.
fn cuda() -> Option<Device> {
    std::env::var("CHORUS_TEST_CUDA")
        .is_ok_and(|v| v == "1")
        .then(|| Device::new_cuda(0).expect("CHORUS_TEST_CUDA=1 but no CUDA device"))
}

#[test]
fn every_architecture_matches_the_packed_path_alone_and_batched() {
    let prompts: Vec<Vec<u32>> = vec![
        (1..12).collect(),
        vec![5, 9, 3],
        (20..45).map(|t| t % VOCAB as u32).collect(),
        vec![42],
        vec![7, 7, 8],
    ];
    let steps = 6;
    for target in targets() {
        for model_type in MODEL_TYPES {
            let what = format!("{} {model_type}", target.name);
            let packed = run(&tiny(model_type, false), &prompts, 7, steps);
            let blocks = blocks_needed(&prompts, steps);
            let mut device =
                Backend::new(tiny(model_type, true), Some(&target.opts), blocks).unwrap();
            // The kernel serves every tiny model's shape: nothing fell back to the gather.
            assert_eq!(
                device.device_attention(),
                Some(target.opts.attention),
                "{what}"
            );
            let together = run_backend(&mut device, &prompts, 7, steps);
            let d = max_diff(&packed, &together, target.tol, &what);
            assert!(
                d < target.tol,
                "{what}: batched device logits differ by {d}"
            );
            eprintln!("{what}: batched {d} from the packed path");
            // Batch invariance on the device: each prompt alone, prefilled in one chunk.
            for (i, p) in prompts.iter().enumerate() {
                let alone = run_backend(&mut device, std::slice::from_ref(p), 64, steps);
                let d = max_diff(&together[i..=i], &alone, target.tol, &what);
                assert!(d < target.tol, "{what}: prompt {i} alone differs by {d}");
            }
            // A real distribution, not a constant.
            let first = &together[0][0];
            assert!(first.iter().any(|&x| x != first[0]), "{what}");
        }
    }
}

#[test]
fn a_copied_block_continues_as_the_original() {
    for target in targets() {
        let model = tiny("qwen3", true);
        let mut b = Backend::new(model, Some(&target.opts), 8).unwrap();
        let prompt: Vec<u32> = (1..=20).collect();
        // Positions 0..20 in blocks 1 and 2; the copy puts block 2's half in block 5.
        let step = |b: &mut Backend, tokens: &[u32], start: usize, blocks: &[u32]| {
            b.forward(&[SeqInput {
                tokens,
                start_pos: start,
                blocks,
                wants_logits: true,
                all_logits: false,
            }])
            .unwrap()
            .remove(0)
        };
        step(&mut b, &prompt, 0, &[1, 2]);
        b.copy_block(2, 5).unwrap();
        let original = step(&mut b, &[7], 20, &[1, 2]);
        let copy = step(&mut b, &[7], 20, &[1, 5]);
        assert_eq!(original, copy, "{}", target.name);
        // A table whose second block was never written sees other keys.
        let other = step(&mut b, &[7], 20, &[1, 6]);
        assert_ne!(original, other, "{}", target.name);
    }
}

#[test]
fn the_real_model_matches_in_both_device_weight_formats() {
    let prompts: Vec<Vec<u32>> = vec![
        vec![1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 2],
        (100..160).collect(),
        vec![9690, 2],
    ];
    let steps = 8;
    let path = model_path();
    let cpu = |format| {
        run(
            &gguf::load(&path, format).unwrap().model,
            &prompts,
            16,
            steps,
        )
    };
    let device = |weights| {
        let model = gguf::load(&path, WeightFormat::Quantized).unwrap().model;
        let opts = on_cpu(weights);
        let mut b = Backend::new(model, Some(&opts), blocks_needed(&prompts, steps)).unwrap();
        run_backend(&mut b, &prompts, 16, steps)
    };
    let (f32_ref, quantized_ref) = (cpu(WeightFormat::F32), cpu(WeightFormat::Quantized));
    let (dense, quantized) = (
        device(DeviceWeights::Dense),
        device(DeviceWeights::Quantized),
    );
    // Both forms, each step the one timed faster for its size; decode steps at fixed
    // shapes, as they are timed and served with CUDA graphs.
    let auto = {
        let model = gguf::load(&path, WeightFormat::Quantized).unwrap().model;
        let opts = DeviceOptions {
            graph_rows: 256,
            ..on_cpu(DeviceWeights::Auto { up_to: 4 })
        };
        let mut b = Backend::new(model, Some(&opts), blocks_needed(&prompts, steps)).unwrap();
        let Backend::Device(m) = &b else {
            panic!("not the device path")
        };
        let choice = m.weight_choice().expect("auto times both forms");
        let rows: Vec<usize> = choice.timings.iter().map(|t| t.rows).collect();
        assert_eq!(rows, [1, 2, 4], "{choice:?}");
        assert!(choice
            .timings
            .iter()
            .all(|t| !t.dense.is_zero() && !t.quantized.is_zero()));
        assert!([0, 1, 2, 4].contains(&choice.quantized_up_to), "{choice:?}");
        eprintln!("auto on candle-cpu: {choice:?}");
        run_backend(&mut b, &prompts, 16, steps)
    };
    // f32 weights through candle's gemm on both sides (0.015 seen on logits of ~20).
    let d = max_diff(&f32_ref, &dense, 0.05, "dense");
    assert!(
        d < 0.05,
        "dense device logits differ from the f32 path's by {d}"
    );
    // Candle's quantized matmul rounds activations to 8 bits on both sides, which turns
    // last-bit differences into logit differences of ~1: the same greedy tokens but at
    // near ties, and no further from the f32 path than the CPU's quantized path is.
    max_diff(&quantized_ref, &quantized, 0.1, "quantized");
    let from_f32_cpu = max_diff(&f32_ref, &quantized_ref, f32::INFINITY, "cpu");
    let from_f32_device = max_diff(&f32_ref, &quantized, f32::INFINITY, "device");
    assert!(
        from_f32_device < 1.5 * from_f32_cpu,
        "quantized device logits are {from_f32_device} from the f32 path's, the CPU's {from_f32_cpu}"
    );
    // Each of auto's steps is one of the two checked above.
    let from_f32_auto = max_diff(&f32_ref, &auto, f32::INFINITY, "auto");
    assert!(
        from_f32_auto < 1.5 * from_f32_cpu,
        "auto device logits are {from_f32_auto} from the f32 path's, the CPU's {from_f32_cpu}"
    );
}

#[test]
fn every_rows_logits_match_when_all_are_asked_for() {
    let prompt: Vec<u32> = (3..40).collect();
    let input = |blocks: &'static [u32]| SeqInput {
        tokens: &[],
        start_pos: 0,
        blocks,
        wants_logits: true,
        all_logits: true,
    };
    let blocks: &'static [u32] = &[1, 2, 3];
    let packed = {
        let m = tiny("gemma3_text", false);
        let mut kv = chorus_model::KvCache::new(m.config().kv_shape(), 4).unwrap();
        m.forward(
            &mut kv,
            &[SeqInput {
                tokens: &prompt,
                ..input(blocks)
            }],
        )
        .unwrap()
    };
    assert_eq!(packed.len(), prompt.len());
    for target in targets() {
        let mut b = Backend::new(tiny("gemma3_text", true), Some(&target.opts), 4).unwrap();
        let got = b
            .forward(&[SeqInput {
                tokens: &prompt,
                ..input(blocks)
            }])
            .unwrap();
        let d = max_diff(
            std::slice::from_ref(&packed),
            &[got],
            target.tol,
            target.name,
        );
        assert!(d < target.tol, "{}: {d}", target.name);
    }
}

/// Fixed-shape steps (CUDA graphs on a GPU) against eager ones on the same device, fed
/// the same tokens: prompts in chunks of up to 7 beside decoding rows, the batch growing
/// and shrinking every step (padding rows in most steps, some steps too large to be
/// fixed, some that want no logits, shapes dropped and made again), one sequence's
/// block table outgrowing its width.
/// Every step's logits agree, so each replay read the inputs of its own step, and a
/// prompt chunk's rows attending one at a time (fixed) match the gathered chunk (eager),
/// within the tolerances of [`targets`] (6.6e-4 seen in f32).
#[test]
fn fixed_steps_match_eager_ones_as_the_batch_changes() {
    let mut devices = vec![
        ("candle-cpu f32", on_cpu(DeviceWeights::Dense), 2e-3),
        (
            "candle-cpu bf16",
            DeviceOptions {
                dtype: DType::BF16,
                ..on_cpu(DeviceWeights::Dense)
            },
            BF16_TOL,
        ),
    ];
    if let Some(gpu) = cuda() {
        for (name, dtype, tol) in [
            ("cuda bf16", DType::BF16, BF16_TOL),
            ("cuda f16", DType::F16, F16_TOL),
        ] {
            devices.push((
                name,
                DeviceOptions {
                    device: gpu.clone(),
                    dtype,
                    ..on_cpu(DeviceWeights::Dense)
                },
                tol,
            ));
        }
    }
    const BLOCKS_EACH: u32 = 8;
    const CHUNK: usize = 7;
    let prompts: Vec<Vec<u32>> = vec![
        (1..60).collect(),
        vec![5, 9, 3],
        (20..45).collect(),
        vec![42],
        (50..61).collect(),
    ];
    for (name, opts, tol) in devices {
        for model_type in MODEL_TYPES {
            let what = format!("{name} {model_type}");
            let blocks = 1 + prompts.len() * BLOCKS_EACH as usize;
            let mut eager = Backend::new(tiny(model_type, true), Some(&opts), blocks).unwrap();
            // Few shapes kept: they are dropped and made again as the batch changes.
            let fixed_opts = DeviceOptions {
                graph_rows: 16,
                graph_shapes: 3,
                ..opts.clone()
            };
            let mut fixed =
                Backend::new(tiny(model_type, true), Some(&fixed_opts), blocks).unwrap();
            let tables: Vec<Vec<u32>> = (0..prompts.len() as u32)
                .map(|i| (1 + i * BLOCKS_EACH..1 + (i + 1) * BLOCKS_EACH).collect())
                .collect();
            let mut tokens = prompts.clone();
            let mut done = vec![0usize; prompts.len()];
            let mut worst = 0f32;
            for step in 0..30 {
                // Who steps: a pattern that changes the batch every step.
                let members: Vec<usize> = (0..prompts.len())
                    .filter(|&i| step < 2 || (step * (i + 1) + i) % 3 != 0)
                    .collect();
                let ends: Vec<usize> = members
                    .iter()
                    .map(|&i| tokens[i].len().min(done[i] + CHUNK))
                    .collect();
                let batch: Vec<SeqInput> = members
                    .iter()
                    .zip(&ends)
                    .map(|(&i, &end)| SeqInput {
                        tokens: &tokens[i][done[i]..end],
                        start_pos: done[i],
                        blocks: &tables[i],
                        wants_logits: end == tokens[i].len(),
                        all_logits: false,
                    })
                    .collect();
                let a = eager.forward(&batch).unwrap();
                let b = fixed.forward(&batch).unwrap();
                // The same step again (it writes the same keys and values), some of its
                // sequences (every one, every fifth step) asking for their argmax alone.
                let flags: Vec<bool> = members
                    .iter()
                    .map(|&i| step % 5 == 0 || (i + step) % 2 == 0)
                    .collect();
                let wanted: Vec<bool> = batch
                    .iter()
                    .zip(&flags)
                    .filter(|(s, _)| s.wants_logits)
                    .map(|(_, &f)| f)
                    .collect();
                let what_step = format!("{what} step {step}");
                let again = eager.forward_rows(&batch, &flags).unwrap();
                check_picks(&again, &a, &wanted, tol, &format!("{what_step} eager"));
                let again = fixed.forward_rows(&batch, &flags).unwrap();
                check_picks(&again, &b, &wanted, tol, &format!("{what_step} fixed"));
                assert_eq!(a.len(), b.len(), "{what} step {step}");
                for (x, y) in a.iter().zip(&b) {
                    assert_eq!(x.len(), y.len());
                    for (p, q) in x.iter().zip(y) {
                        worst = worst.max((p - q).abs());
                    }
                }
                let mut rows = a.iter();
                for (&i, &end) in members.iter().zip(&ends) {
                    let complete = end == tokens[i].len();
                    done[i] = end;
                    if complete {
                        tokens[i].push(chorus_model::sampling::argmax(rows.next().unwrap()));
                    }
                }
            }
            // The longest sequence went past 64 positions: its table widened.
            assert!(tokens[0].len() > 64 + 1, "{what}: {}", tokens[0].len());
            assert!(
                worst < tol,
                "{what}: fixed steps differ from eager ones by {worst}"
            );
            eprintln!("{what}: fixed steps within {worst} of eager ones");
        }
    }
}

/// `rows`, a step run again with some sequences asking for their argmax alone, against
/// `logits`, that step's logits: the flagged rows are the argmax (the lowest id among
/// equal maxima), unless a rerun's last-bit differences made a near tie go the other
/// way; the others the same logits.
fn check_picks(rows: &[StepRow], logits: &[Vec<f32>], flagged: &[bool], tol: f32, what: &str) {
    assert_eq!(rows.len(), logits.len(), "{what}");
    assert_eq!(rows.len(), flagged.len(), "{what}");
    for ((row, l), &flag) in rows.iter().zip(logits).zip(flagged) {
        match (row, flag) {
            (StepRow::Argmax(t), true) => {
                let want = chorus_model::sampling::argmax(l);
                assert!(
                    *t == want || l[want as usize] - l[*t as usize] < tol,
                    "{what}: argmax {t}, the logits' {want}"
                );
            }
            (StepRow::Logits(v), false) => {
                assert_eq!(v.len(), l.len(), "{what}");
                let d = v
                    .iter()
                    .zip(l)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(d < tol, "{what}: logits rerun differ by {d}");
            }
            (row, flag) => panic!("{what}: asked for the argmax alone: {flag}, got {row:?}"),
        }
    }
}

/// A sequence scoring its prompt (every row's logits) between sequences that sample: its
/// rows stay logits though it is flagged, and the flagged sampling row is its argmax,
/// each in batch order.
#[test]
fn argmax_rows_beside_a_scored_prompt() {
    let prompt: Vec<u32> = (3..12).collect();
    let batch = [
        SeqInput {
            tokens: &[5, 6, 7],
            start_pos: 0,
            blocks: &[1],
            wants_logits: true,
            all_logits: false,
        },
        SeqInput {
            tokens: &prompt,
            start_pos: 0,
            blocks: &[2],
            wants_logits: true,
            all_logits: true,
        },
        SeqInput {
            tokens: &[8],
            start_pos: 0,
            blocks: &[3],
            wants_logits: true,
            all_logits: false,
        },
    ];
    for target in targets() {
        let mut b = Backend::new(tiny("llama", true), Some(&target.opts), 4).unwrap();
        let logits = b.forward(&batch).unwrap();
        assert_eq!(logits.len(), 1 + prompt.len() + 1, "{}", target.name);
        let rows = b.forward_rows(&batch, &[true, true, false]).unwrap();
        let mut flagged = vec![true];
        flagged.extend(std::iter::repeat_n(false, prompt.len() + 1));
        check_picks(&rows, &logits, &flagged, target.tol, target.name);
    }
}

#[test]
fn a_block_outside_the_cache_is_an_error_not_a_panic() {
    let mut b = Backend::new(tiny("llama", true), Some(&on_cpu(DeviceWeights::Dense)), 2).unwrap();
    let err = b
        .forward(&[SeqInput {
            tokens: &[1, 2],
            start_pos: 0,
            blocks: &[9],
            wants_logits: true,
            all_logits: false,
        }])
        .unwrap_err();
    assert!(err.to_string().contains("outside the cache"), "{err}");
    // Nor a copy into the block past the scheduler's (fixed steps' scratch).
    let err = b.copy_block(0, 2).unwrap_err();
    assert!(err.to_string().contains("outside the cache"), "{err}");
}
