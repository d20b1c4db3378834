//! `paged_attention.cu` run on the host (`host_emulation.cpp`: a thread per CUDA thread,
//! a barrier for `__syncthreads`) against the paged op's reference, for shapes that take
//! every branch of the kernel: vectorised and scalar key loads, a power-of-two and an
//! odd thread count, one and several value splits, f16 and bf16, contexts that end on,
//! before and after a tile's edge, and sliding windows that start inside a tile.

#![allow(clippy::unwrap_used)] // test code: a failure here is a test failure

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device, Tensor};

use super::KernelShape;
use crate::attention::RowSpan;
use crate::device::paged::{PagedDecoder, RowPlans};
use crate::kv::BLOCK_SIZE;

const KV_HEADS: usize = 2;

/// (head_dim, group, cache type): every branch of the kernel.
const SHAPES: [(usize, usize, DType); 7] = [
    // The tiny test models: 8 value pairs, 16 splits.
    (16, 2, DType::F16),
    // The 1B shape (Llama 3.2 1B): 4 splits, in both cache types.
    (64, 4, DType::BF16),
    (64, 4, DType::F16),
    // 96 threads, not a power of two.
    (96, 4, DType::F16),
    // Scalar key loads (head_dim not a multiple of 8), 126 threads.
    (6, 2, DType::BF16),
    (128, 8, DType::F16),
    // Gemma 3's heads: one split, 128 threads.
    (256, 2, DType::BF16),
];
const POOL_BLOCKS: usize = 48;

/// A small xorshift: the tests need no statistical quality, only spread and repeatability.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// Roughly normal, from the sum of four uniforms.
    fn normal(&mut self) -> f32 {
        let u: f32 = (0..4)
            .map(|_| (self.next() >> 40) as f32 / (1u64 << 24) as f32)
            .sum();
        (u - 2.0) * 1.7
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Compiles the harness for `shape` with the host's C++ compiler (`$CXX`, else `c++`).
fn harness(shape: KernelShape, dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/device/cuda/host_emulation.cpp");
    let exe = dir.join(format!(
        "paged-{}-{}-{:?}",
        shape.head_dim, shape.group, shape.cache
    ));
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let out = Command::new(&cxx)
        .args(["-std=c++17", "-O1", "-pthread", "-DCHORUS_HOST_EMULATION"])
        .args(shape.defines())
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("running {cxx} (a C++ compiler; set CXX): {e}"));
    assert!(
        out.status.success(),
        "{cxx} could not compile the kernel for {shape:?}:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// Runs the kernel on the host over one window's plan.
fn run_kernel(
    exe: &Path,
    meta: &[u32],
    stride: usize,
    n: usize,
    q: &[f32],
    (keys, values, slots): (&[u16], &[u16], usize),
    scale: f32,
) -> Vec<f32> {
    let mut input = Vec::new();
    for v in [n, KV_HEADS, stride, slots] {
        input.extend((v as u32).to_le_bytes());
    }
    input.extend(scale.to_le_bytes());
    input.extend(q.iter().flat_map(|x| x.to_le_bytes()));
    input.extend(keys.iter().flat_map(|x| x.to_le_bytes()));
    input.extend(values.iter().flat_map(|x| x.to_le_bytes()));
    input.extend(meta.iter().flat_map(|x| x.to_le_bytes()));
    let mut child = Command::new(exe)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the host kernel failed: {:?}",
        out.status
    );
    out.stdout
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn check(shape: KernelShape, dir: &Path, seed: u64) {
    let exe = harness(shape, dir);
    let mut rng = Rng(seed);
    let (hd, group) = (shape.head_dim, shape.group);
    let (q_dim, kv_dim) = (KV_HEADS * group * hd, KV_HEADS * hd);
    let slots = POOL_BLOCKS * BLOCK_SIZE;
    let bits = |x: f32| match shape.cache {
        DType::BF16 => half::bf16::from_f32(x).to_bits(),
        _ => half::f16::from_f32(x).to_bits(),
    };
    let keys: Vec<u16> = (0..slots * kv_dim).map(|_| bits(rng.normal())).collect();
    let values: Vec<u16> = (0..slots * kv_dim).map(|_| bits(rng.normal())).collect();
    // Contexts around the tile (the thread count) and block edges, and a long one.
    let t = shape.threads();
    let contexts = [1, 15, 16, 17, t - 1, t, t + 1, 2 * t + 37, 700];
    let tables: Vec<Vec<u32>> = contexts
        .iter()
        .map(|&c| {
            (0..c.div_ceil(BLOCK_SIZE))
                .map(|_| rng.below(POOL_BLOCKS) as u32)
                .collect()
        })
        .collect();
    let spans: Vec<RowSpan> = contexts
        .iter()
        .zip(&tables)
        .enumerate()
        .map(|(i, (&c, blocks))| RowSpan {
            first_row: i,
            rows: 1,
            start_pos: c - 1,
            blocks,
        })
        .collect();
    let spans: Vec<&RowSpan> = spans.iter().collect();
    let n = spans.len();
    let q: Vec<f32> = (0..n * q_dim).map(|_| rng.normal()).collect();
    let scale = 1.0 / (hd as f32).sqrt();

    let cpu = Device::Cpu;
    let decoder = PagedDecoder::new(shape, &cpu).unwrap();
    let as_cache = |v: &[u16]| -> Tensor {
        match shape.cache {
            DType::BF16 => {
                let v: Vec<half::bf16> = v.iter().map(|&b| half::bf16::from_bits(b)).collect();
                Tensor::from_vec(v, (slots, kv_dim), &cpu).unwrap()
            }
            _ => {
                let v: Vec<half::f16> = v.iter().map(|&b| half::f16::from_bits(b)).collect();
                Tensor::from_vec(v, (slots, kv_dim), &cpu).unwrap()
            }
        }
    };
    let (kt, vt) = (as_cache(&keys), as_cache(&values));
    let qt = Tensor::from_vec(q.clone(), (n, q_dim), &cpu).unwrap();
    for window in [None, Some(50), Some(t + 3)] {
        let meta = RowPlans::new(&spans, window, &cpu).unwrap();
        let want: Vec<f32> = decoder
            .forward(&qt, &kt, &vt, &meta, KV_HEADS, scale)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let plan: Vec<u32> = meta.device().flatten_all().unwrap().to_vec1().unwrap();
        let got = run_kernel(
            &exe,
            &plan,
            meta.stride(),
            n,
            &q,
            (&keys, &values, slots),
            scale,
        );
        assert_eq!(got.len(), want.len());
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            let (row, col) = (i / q_dim, i % q_dim);
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{shape:?} window {window:?}: row {row} (context {}) value {col}: kernel {g}, reference {w}",
                contexts[row]
            );
        }
        // Not a constant: the rows attend to different positions.
        assert!(want.iter().any(|&x| (x - want[0]).abs() > 1e-3));
    }
}

#[test]
fn the_kernel_on_the_host_matches_the_reference() {
    let dir = std::env::temp_dir().join(format!("chorus-paged-kernel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (seed, (head_dim, group, cache)) in SHAPES.into_iter().enumerate() {
        let shape = KernelShape {
            head_dim,
            group,
            cache,
        };
        assert!(shape.supported(), "{shape:?}");
        check(shape, &dir, 0x9e37_79b9_7f4a_7c15 ^ seed as u64);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn shapes_the_kernel_cannot_hold_fall_back() {
    let shape = |head_dim, group| KernelShape {
        head_dim,
        group,
        cache: DType::F16,
    };
    assert!(!shape(7, 2).supported(), "an odd head");
    assert!(!shape(64, 64).supported(), "shared memory over 48 KiB");
    assert!(!shape(4096, 1).supported(), "over 1024 threads");
    assert_eq!(shape(64, 4).threads(), 128);
    assert_eq!(shape(96, 4).threads(), 96);
    assert_eq!(shape(256, 2).threads(), 128);
    assert_eq!(shape(512, 1).threads(), 256);
    // What ptxas reports for the 1B shape's kernel: 9728 bytes.
    assert_eq!(shape(64, 4).shared_bytes(), 9728);
}

/// Buffers that do not hold what the rows' plans say are an error before anything reads
/// them: the kernel reads them unchecked, and on a GPU a read past a buffer's end
/// poisons the whole context. The same check guards the kernel's launch.
#[test]
fn mis_sized_buffers_are_refused() {
    let shape = KernelShape {
        head_dim: 16,
        group: 2,
        cache: DType::F16,
    };
    let (q_dim, kv_dim) = (KV_HEADS * 2 * 16, KV_HEADS * 16);
    let cpu = Device::Cpu;
    let decoder = PagedDecoder::new(shape, &cpu).unwrap();
    let blocks = [0u32];
    let spans: Vec<RowSpan> = (0..2)
        .map(|i| RowSpan {
            first_row: i,
            rows: 1,
            start_pos: 3,
            blocks: &blocks,
        })
        .collect();
    let spans: Vec<&RowSpan> = spans.iter().collect();
    let meta = RowPlans::new(&spans, None, &cpu).unwrap();
    let cache = |slots: usize, dim: usize| {
        Tensor::zeros((slots * dim,), DType::F16, &cpu)
            .unwrap()
            .reshape((slots, dim))
            .unwrap()
    };
    let q = |rows: usize| Tensor::zeros((rows, q_dim), DType::F32, &cpu).unwrap();
    let run = |q: &Tensor, k: &Tensor, v: &Tensor| decoder.forward(q, k, v, &meta, KV_HEADS, 0.25);
    let whole = cache(BLOCK_SIZE, kv_dim);
    assert!(run(&q(2), &whole, &whole).is_ok());
    let err = |r: crate::error::Result<Tensor>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        err(run(&q(1), &whole, &whole)).contains("q holds"),
        "a row short"
    );
    assert!(
        err(run(&q(3), &whole, &whole)).contains("q holds"),
        "a row over"
    );
    let short = cache(BLOCK_SIZE - 1, kv_dim);
    assert!(
        err(run(&q(2), &whole, &short)).contains("not whole slots"),
        "values short"
    );
    let ragged = cache(BLOCK_SIZE, kv_dim + 1);
    assert!(
        err(run(&q(2), &ragged, &ragged)).contains("not whole slots"),
        "ragged slots"
    );
}

/// NVRTC compiles the paged kernel for every shape, and the KV write kernels, and
/// `ptxas` assembles them for the H100/H200 (sm_90) as the driver would. No GPU needed: run with NVRTC's `lib` folder
/// on `LD_LIBRARY_PATH` and `ptxas` on `PATH`, as `scripts/cuda-env.sh` sets up.
#[cfg(feature = "cuda")]
#[test]
fn nvrtc_compiles_the_kernel() {
    let dir = std::env::temp_dir().join(format!("chorus-nvrtc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (head_dim, group, cache) in SHAPES {
        let shape = KernelShape {
            head_dim,
            group,
            cache,
        };
        let kernel = super::PagedKernel::compile(shape).unwrap_or_else(|e| panic!("{e}"));
        assemble(
            &dir,
            kernel.ptx(),
            &["paged_decode_attention"],
            &format!("{shape:?}"),
        );
    }
    let kv_write = super::KvWriteKernel::compile().unwrap_or_else(|e| panic!("{e}"));
    assemble(
        &dir,
        kv_write.ptx(),
        &["kv_write_bf16", "kv_write_f16"],
        "the KV write",
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Checks that `ptx` holds each of `entries` and that `ptxas` assembles it for sm_90.
#[cfg(feature = "cuda")]
fn assemble(dir: &Path, ptx: &str, entries: &[&str], what: &str) {
    for entry in entries {
        assert!(ptx.contains(&format!(".entry {entry}")), "{what}: {entry}");
    }
    let file = dir.join("kernel.ptx");
    std::fs::write(&file, ptx).unwrap();
    let out = Command::new("ptxas")
        .args(["-arch=sm_90", "-o"])
        .arg(dir.join("kernel.cubin"))
        .arg(&file)
        .output()
        .expect("ptxas on PATH (scripts/cuda-env.sh)");
    assert!(
        out.status.success(),
        "ptxas rejected the kernel for {what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// On a GPU (`CHORUS_TEST_CUDA=1`, as `scripts/device-check.sh` runs it): the KV write
/// kernel writes what the op's reference writes on the CPU, bit for bit, in both cache
/// types: thousands of rows from a strided view (the values' place in the QKV
/// projection), rounding ties, infinities and values past f16's range among them, and
/// the slots no row names left as they were.
#[cfg(feature = "cuda")]
#[test]
fn the_kv_write_kernel_matches_the_reference_on_a_gpu() {
    use crate::device::kv_write::KvWrite;
    if !std::env::var("CHORUS_TEST_CUDA").is_ok_and(|v| v == "1") {
        eprintln!("skipped: CHORUS_TEST_CUDA=1 asks for a GPU");
        return;
    }
    let gpu = Device::new_cuda(0).unwrap();
    let Device::Cuda(cuda) = &gpu else {
        unreachable!("new_cuda gives a CUDA device")
    };
    let kernel = super::KvWriteKernel::compile().unwrap();
    kernel.load(cuda).unwrap();
    let (rows, kv_dim, cache_slots) = (3001, 512, 4096);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let mut wide: Vec<f32> = (0..rows * 3 * kv_dim).map(|_| rng.normal()).collect();
    wide[kv_dim..kv_dim + 5].copy_from_slice(&[
        f32::from_bits(0x3f80_8000),
        f32::from_bits(0x3f81_8000),
        f32::NEG_INFINITY,
        1e6,
        1e-7,
    ]);
    // Distinct slots, in no order.
    let mut slots: Vec<u32> = (0..cache_slots as u32).collect();
    for i in (1..slots.len()).rev() {
        slots.swap(i, rng.below(i + 1));
    }
    slots.truncate(rows);
    let before: Vec<f32> = (0..cache_slots * kv_dim).map(|_| rng.normal()).collect();
    let bits = |t: &Tensor| -> Vec<u32> {
        let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        t.to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect()
    };
    for dtype in [DType::BF16, DType::F16] {
        let written = |dev: &Device, kernel| {
            let wide = Tensor::from_slice(&wide, (rows, 3 * kv_dim), dev).unwrap();
            let src = wide.narrow(1, kv_dim, kv_dim).unwrap();
            let ids = Tensor::from_slice(&slots, (rows, 1), dev).unwrap();
            let cache = Tensor::from_slice(&before, (cache_slots, kv_dim), dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            cache.inplace_op3(&src, &ids, &KvWrite { kernel }).unwrap();
            bits(&cache)
        };
        let reference = written(&Device::Cpu, None);
        let ours = written(&gpu, Some(&kernel));
        let differ = reference.iter().zip(&ours).filter(|(a, b)| a != b).count();
        assert_eq!(
            differ, 0,
            "{dtype:?}: {differ} values differ from the reference"
        );
    }
}
