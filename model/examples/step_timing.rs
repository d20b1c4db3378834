use candle_core::quantized::QMatMul;
use candle_core::{Device, Module, Tensor};
use chorus_model::kv::{blocks_for, BlockAllocator};
use chorus_model::{gguf, KvCache, SeqInput, WeightFormat};
use std::time::Instant;

fn main() {
    let path = std::env::args().nth(1).unwrap();
    let fmt = if std::env::args().nth(2).as_deref() == Some("q") {
        WeightFormat::Quantized
    } else {
        WeightFormat::F32
    };
    let m = gguf::load(std::path::Path::new(&path), fmt).unwrap();
    // raw gemm timing
    for rows in [1usize, 2, 8, 32, 64] {
        let w = Tensor::randn(0f32, 1.0, (1536, 576), &Device::Cpu).unwrap();
        let mm = QMatMul::Tensor(w);
        let x = Tensor::randn(0f32, 1.0, (rows, 576), &Device::Cpu).unwrap();
        let _ = mm.forward(&x).unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            let _ = mm.forward(&x).unwrap();
        }
        println!(
            "gemm 576x1536 rows={rows}: {:.1} us/call",
            t.elapsed().as_secs_f64() * 1e6 / 100.0
        );
        let wt = Tensor::randn(0f32, 1.0, (576, 1536), &Device::Cpu).unwrap();
        let _ = x.matmul(&wt).unwrap();
        let t = Instant::now();
        for _ in 0..100 {
            let _ = x.matmul(&wt).unwrap();
        }
        println!(
            "  kxn layout rows={rows}: {:.1} us/call",
            t.elapsed().as_secs_f64() * 1e6 / 100.0
        );
    }
    let cfg = m.model.config().clone();
    for batch in [1usize, 8, 32, 64] {
        let ctx = 128;
        let mut alloc = BlockAllocator::new(blocks_for(ctx + 8) * batch);
        let mut kv = KvCache::new(cfg.kv_shape(), alloc.total()).unwrap();
        let blocks: Vec<Vec<u32>> = (0..batch)
            .map(|_| {
                (0..blocks_for(ctx + 8))
                    .map(|_| alloc.allocate().unwrap())
                    .collect()
            })
            .collect();
        let toks = vec![100u32; 1];
        let steps = 5;
        let t = Instant::now();
        for s in 0..steps {
            let inputs: Vec<SeqInput> = blocks
                .iter()
                .map(|b| SeqInput {
                    tokens: &toks,
                    start_pos: ctx + s,
                    blocks: b,
                    wants_logits: true,
                })
                .collect();
            m.model.forward(&mut kv, &inputs).unwrap();
        }
        let per = t.elapsed().as_secs_f64() / steps as f64;
        println!(
            "decode batch={batch}: {:.1} ms/step, {:.0} tok/s",
            per * 1e3,
            batch as f64 / per
        );
    }
}
