//! Engine microbenchmarks on the real default model: one decode step at several batch
//! sizes, prefill of one long prompt, and sampling over the full vocabulary. These are
//! the numbers the kernel work is steered by (`cargo bench -p chorus-bench`).
//!
//! The model comes from `CHORUS_TEST_MODEL` or the workspace cache (run
//! `cargo run --release -- --download-only` once).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::OnceLock;

use chorus_model::kv::{blocks_for, BlockAllocator};
use chorus_model::{gguf, KvCache, LoadedModel, Sampler, SamplingParams, SeqInput, WeightFormat};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};

/// Tokens already in each decoding sequence's KV cache.
const CONTEXT: usize = 128;

/// The compute threads, with the benchmark's thread as one of them, as in the server.
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        chorus_model::threads::compute_pool(chorus_model::threads::default_threads())
            .expect("compute threads")
    })
}

fn model_path() -> PathBuf {
    std::env::var_os("CHORUS_TEST_MODEL").map_or_else(
        || {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../models/cache/SmolLM2-135M-Instruct.Q4_1.gguf")
        },
        PathBuf::from,
    )
}

fn load() -> LoadedModel {
    load_as(WeightFormat::default())
}

fn load_as(format: WeightFormat) -> LoadedModel {
    let path = model_path();
    gguf::load(&path, format).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `cargo run --release -- --download-only` first)",
            path.display()
        )
    })
}

/// Block tables for `seqs` sequences of up to `len` tokens, and a cache holding them.
fn cache(m: &LoadedModel, seqs: usize, len: usize) -> (KvCache, Vec<Vec<u32>>) {
    let per_seq = blocks_for(len);
    let mut alloc = BlockAllocator::new(per_seq * seqs);
    let tables = (0..seqs)
        .map(|_| (0..per_seq).filter_map(|_| alloc.allocate()).collect())
        .collect();
    let kv = KvCache::new(m.model.config().kv_shape(), alloc.total()).expect("kv cache");
    (kv, tables)
}

/// One decode step at several batch sizes, for each packed weight format (f32, 8-bit
/// and two-limb activations).
fn decode_step(c: &mut Criterion) {
    for (name, format) in [
        ("decode_step_packed", WeightFormat::Packed),
        ("decode_step_int8", WeightFormat::PackedInt8),
        ("decode_step_int16", WeightFormat::PackedInt16),
    ] {
        let m = load_as(format);
        let mut group = c.benchmark_group(name);
        group.sample_size(10);
        for seqs in [1, 8, 32, 64] {
            // The KV contents do not change the work, only the context length does, so
            // the cache is left as allocated rather than prefilled.
            let (mut kv, tables) = cache(&m, seqs, CONTEXT + 1);
            let tokens: Vec<[u32; 1]> = (0..seqs).map(|i| [100 + i as u32]).collect();
            let batch: Vec<SeqInput> = (0..seqs)
                .map(|i| SeqInput {
                    tokens: &tokens[i],
                    start_pos: CONTEXT,
                    blocks: &tables[i],
                    wants_logits: true,
                    all_logits: false,
                })
                .collect();
            group.throughput(Throughput::Elements(seqs as u64));
            group.bench_with_input(BenchmarkId::from_parameter(seqs), &batch, |b, batch| {
                pool().install(|| {
                    b.iter(|| black_box(m.model.forward(&mut kv, batch).expect("forward")))
                })
            });
        }
        group.finish();
    }
}

fn prefill(c: &mut Criterion) {
    let m = load();
    let mut group = c.benchmark_group("prefill");
    group.sample_size(10);
    for len in [128, 512] {
        let (mut kv, tables) = cache(&m, 1, len);
        let tokens: Vec<u32> = (0..len as u32).map(|i| 200 + i % 1000).collect();
        let batch = [SeqInput {
            tokens: &tokens,
            start_pos: 0,
            blocks: &tables[0],
            wants_logits: true,
            all_logits: false,
        }];
        group.throughput(Throughput::Elements(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(len), &batch, |b, batch| {
            pool()
                .install(|| b.iter(|| black_box(m.model.forward(&mut kv, batch).expect("forward"))))
        });
    }
    group.finish();
}

/// A new conversation turn: 128 tokens prefilled after a 2,048-token history already in
/// the cache (each of them attends to the whole history).
fn prefill_turn(c: &mut Criterion) {
    let m = load();
    let mut group = c.benchmark_group("prefill_turn");
    group.sample_size(10);
    let (history, len) = (2048, 128);
    let (mut kv, tables) = cache(&m, 1, history + len);
    let tokens: Vec<u32> = (0..len as u32).map(|i| 200 + i % 1000).collect();
    let batch = [SeqInput {
        tokens: &tokens,
        start_pos: history,
        blocks: &tables[0],
        wants_logits: true,
        all_logits: false,
    }];
    group.throughput(Throughput::Elements(len as u64));
    group.bench_with_input(
        BenchmarkId::from_parameter(format!("{len}_after_{history}")),
        &batch,
        |b, batch| {
            pool()
                .install(|| b.iter(|| black_box(m.model.forward(&mut kv, batch).expect("forward"))))
        },
    );
    group.finish();
}

/// A decode step of 8 conversations deep into their history (2,048 tokens each): the
/// step every stream of a long chat waits for, where attention over the history is most
/// of the work.
fn decode_long(c: &mut Criterion) {
    let m = load();
    let mut group = c.benchmark_group("decode_long");
    group.sample_size(10);
    let (seqs, history) = (8, 2048);
    let (mut kv, tables) = cache(&m, seqs, history + 1);
    let tokens: Vec<[u32; 1]> = (0..seqs).map(|i| [100 + i as u32]).collect();
    let batch: Vec<SeqInput> = (0..seqs)
        .map(|i| SeqInput {
            tokens: &tokens[i],
            start_pos: history,
            blocks: &tables[i],
            wants_logits: true,
            all_logits: false,
        })
        .collect();
    group.throughput(Throughput::Elements(seqs as u64));
    group.bench_with_input(
        BenchmarkId::from_parameter(format!("{seqs}_after_{history}")),
        &batch,
        |b, batch| {
            pool()
                .install(|| b.iter(|| black_box(m.model.forward(&mut kv, batch).expect("forward"))))
        },
    );
    group.finish();
}

/// Attention alone, one layer of the default model's shape (9 query heads over 3 KV
/// heads of 64): 8 decoding rows at a 2,048-token history each, and a 128-row chunk
/// after 2,048 tokens.
fn attention(c: &mut Criterion) {
    use chorus_model::attention::{paged_attention, AttnShape, RowSpan};
    use chorus_model::kv::KvShape;
    let shape = KvShape {
        layers: 1,
        kv_heads: 3,
        head_dim: 64,
    };
    let attn = AttnShape {
        heads: 9,
        kv: shape,
        scale: 0.125,
        window: None,
    };
    let history = 2048;
    let per_seq = blocks_for(history + 128);
    let mut kv = KvCache::new(shape, 8 * per_seq).expect("kv cache");
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let tables: Vec<Vec<u32>> = (0..8)
        .map(|s| (0..per_seq).map(|b| (b * 8 + s) as u32).collect())
        .collect();
    let row = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
        (0..3 * 64).map(|_| rng.random_range(-1.0..1.0)).collect()
    };
    for t in &tables {
        for pos in 0..history + 128 {
            let (k, v) = (row(&mut rng), row(&mut rng));
            kv.write(0, t, pos, &k, &v);
        }
    }
    let mut group = c.benchmark_group("attention");
    group.sample_size(20);
    let decode: Vec<RowSpan> = tables
        .iter()
        .enumerate()
        .map(|(i, t)| RowSpan {
            first_row: i,
            rows: 1,
            start_pos: history,
            blocks: t,
        })
        .collect();
    let q: Vec<f32> = (0..128 * 9 * 64)
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    let short: Vec<RowSpan> = decode
        .iter()
        .map(|s| RowSpan {
            start_pos: 256,
            ..*s
        })
        .collect();
    group.bench_function("decode_8x256", |b| {
        pool().install(|| {
            b.iter(|| black_box(paged_attention(&attn, &q[..8 * 576], kv.layer(0), &short)))
        })
    });
    group.bench_function("decode_8x2048", |b| {
        pool().install(|| {
            b.iter(|| black_box(paged_attention(&attn, &q[..8 * 576], kv.layer(0), &decode)))
        })
    });
    let chunk = [RowSpan {
        first_row: 0,
        rows: 128,
        start_pos: history,
        blocks: &tables[0],
    }];
    group.bench_function("chunk_128_after_2048", |b| {
        pool().install(|| b.iter(|| black_box(paged_attention(&attn, &q, kv.layer(0), &chunk))))
    });
    group.finish();
}

/// One `[3072, 576]` projection (SmolLM2's stacked gate/up) from a Q4_1 weight, by each
/// kernel path, at several row counts.
fn matmul(c: &mut Criterion) {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};
    use chorus_model::int8::{Int8Linear, Isa};
    use chorus_model::packed::PackedLinear;

    let (n, k) = (3072, 576);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
    let q = QTensor::quantize(&w, GgmlDType::Q4_1).expect("quantize");
    let packed = PackedLinear::from_parts(std::slice::from_ref(&q)).expect("pack");
    let q8 = QTensor::quantize(&w, GgmlDType::Q8_0).expect("quantize");
    // Each 8-bit-activation kernel this machine runs, on Q4_1 and on Q8_0 weights.
    let int8: Vec<(String, Int8Linear)> = Isa::available()
        .into_iter()
        .flat_map(|isa| {
            [
                ("q4_1", &q, false),
                ("q8_0", &q8, false),
                ("q4_1", &q, true),
                ("q8_0", &q8, true),
            ]
            .map(|(name, t, two)| {
                let w = Int8Linear::from_parts(std::slice::from_ref(t), two)
                    .expect("pack")
                    .expect("a block format");
                let bits = if two { 16 } else { 8 };
                (format!("int{bits}_{name}_{isa:?}"), w.with_isa(isa))
            })
        })
        .collect();
    let dense = QMatMul::Tensor(q.dequantize(&Device::Cpu).expect("dequantize"));
    let quant = QMatMul::from_qtensor(q).expect("qmatmul");

    let mut group = c.benchmark_group("matmul_3072x576");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(2));
    for rows in [1, 8, 32, 64, 256] {
        if std::env::var_os("CHORUS_BENCH_PACKED_ONLY").is_some() {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_with_input(BenchmarkId::new("packed_q4_1", rows), &x, |b, x| {
                pool().install(|| b.iter(|| black_box(packed.forward(x, rows))))
            });
            continue;
        }
        let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
        let t = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).expect("tensor");
        group.throughput(Throughput::Elements(rows as u64));
        for (name, w) in &int8 {
            if name.ends_with("Scalar") && rows > 8 {
                continue; // the reference kernel is for checking, not for speed
            }
            group.bench_with_input(BenchmarkId::new(name, rows), &x, |b, x| {
                pool().install(|| b.iter(|| black_box(w.forward(x, rows))))
            });
        }
        group.bench_with_input(BenchmarkId::new("packed_q4_1", rows), &x, |b, x| {
            pool().install(|| b.iter(|| black_box(packed.forward(x, rows))))
        });
        group.bench_with_input(BenchmarkId::new("candle_f32", rows), &t, |b, t| {
            b.iter(|| black_box(dense.forward(t).expect("matmul")))
        });
        group.bench_with_input(BenchmarkId::new("candle_q4_1", rows), &t, |b, t| {
            b.iter(|| black_box(quant.forward(t).expect("matmul")))
        });
    }
    group.finish();
}

/// The same `[3072, 576]` projection from dense (safetensors) weights in each `--dtype`:
/// f32 on the packed kernels' f32 strips, bf16 and f16 on candle's gemm.
fn dtype(c: &mut Criterion) {
    use candle_core::{Device, Tensor};
    use chorus_model::linear::{Dtype, Linear};

    let (n, k) = (3072, 576);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let w: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.1..0.1)).collect();
    let w = Tensor::from_vec(w, (n, k), &Device::Cpu).expect("tensor");
    let mut group = c.benchmark_group("dtype_3072x576");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(2));
    for (name, dtype) in [
        ("f32", Dtype::F32),
        ("bf16", Dtype::Bf16),
        ("f16", Dtype::F16),
    ] {
        let linear = Linear::dense(std::slice::from_ref(&w), dtype, false).expect("linear");
        for rows in [1, 8, 64] {
            let x: Vec<f32> = (0..rows * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            group.throughput(Throughput::Elements(rows as u64));
            group.bench_with_input(BenchmarkId::new(name, rows), &x, |b, x| {
                pool().install(|| {
                    b.iter(|| black_box(linear.forward(x.clone(), rows).expect("matmul")))
                })
            });
        }
    }
    group.finish();
}

fn sampling(c: &mut Criterion) {
    let vocab = 49152;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let logits: Vec<Vec<f32>> = (0..64)
        .map(|_| (0..vocab).map(|_| rng.random_range(-10.0..10.0)).collect())
        .collect();
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
        top_k: 0,
        min_p: 0.0,
        seed: Some(1),
        ..SamplingParams::default()
    };
    let mut samplers: Vec<Sampler> = (0..64).map(|_| Sampler::new(params.clone())).collect();
    let mut group = c.benchmark_group("sampling");
    group.throughput(Throughput::Elements(64));
    group.bench_function("64_seqs_full_vocab", |b| {
        b.iter(|| {
            for (s, l) in samplers.iter_mut().zip(&logits) {
                black_box(s.sample(l));
            }
        })
    });
    group.finish();
}

criterion_group!(
    benches,
    matmul,
    dtype,
    decode_step,
    prefill,
    prefill_turn,
    decode_long,
    attention,
    sampling
);
criterion_main!(benches);
