//! Writing a step's new keys and values into the paged cache, as one in-place candle op
//! a layer and side: on CUDA our kernel ([`super::cuda`]'s `kv_write.cu`), on candle's
//! CPU device a plain reference of the same write (what CI checks the device forward
//! with, and what the kernel's GPU test compares against).
//!
//! Row `r` of the source (`[rows, kv_dim]` f32, rows possibly strided: a view into the
//! fused QKV projection) goes to slot `slots[r]` of the cache (`[cache slots, kv_dim]`,
//! f16 or bf16), rounded to nearest, ties to even. candle's own `scatter_set` does the
//! same, but its CUDA kernel walks the rows one after another in each of `kv_dim`
//! threads: on an H200 it took half of a 4,000-token prompt chunk's step.

use candle_core::{CpuStorage, InplaceOp3, Layout};

/// Where the write reads and writes, from the three operands' layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WriteShape {
    pub rows: usize,
    pub kv_dim: usize,
    /// The source's first value and the distance between its rows.
    pub src_offset: usize,
    pub src_stride: usize,
    /// The slots' first value (they are contiguous).
    pub slots_offset: usize,
    /// The cache's first value (it is contiguous) and its number of slots.
    pub cache_offset: usize,
    pub cache_slots: usize,
}

impl WriteShape {
    /// `cache`: `[cache slots, kv_dim]` contiguous; `src`: `[rows, kv_dim]` with unit
    /// stride within a row; `slots`: `rows` contiguous values (`[rows]` or `[rows, 1]`).
    pub(crate) fn new(cache: &Layout, src: &Layout, slots: &Layout) -> candle_core::Result<Self> {
        let (&[cache_slots, kv_dim], Some((cache_offset, _))) =
            (cache.dims(), cache.contiguous_offsets())
        else {
            candle_core::bail!("kv write: the cache is not a contiguous [slots, kv_dim] matrix");
        };
        let (&[rows, src_dim], &[src_stride, 1]) = (src.dims(), src.stride()) else {
            candle_core::bail!(
                "kv write: the source is not [rows, kv_dim] with rows of unit stride"
            );
        };
        let Some((slots_offset, slots_end)) = slots.contiguous_offsets() else {
            candle_core::bail!("kv write: the slots are not contiguous");
        };
        if src_dim != kv_dim || slots_end - slots_offset != rows {
            candle_core::bail!(
                "kv write: {rows} rows of {src_dim} values and {} slots for a cache of {kv_dim} a slot",
                slots_end - slots_offset
            );
        }
        Ok(Self {
            rows,
            kv_dim,
            src_offset: src.start_offset(),
            src_stride,
            slots_offset,
            cache_offset,
            cache_slots,
        })
    }

    /// The source's values from its first to its last (what the kernel may read).
    pub(crate) fn src_len(&self) -> usize {
        match self.rows {
            0 => 0,
            r => (r - 1) * self.src_stride + self.kv_dim,
        }
    }
}

#[cfg(feature = "cuda")]
pub(crate) use super::cuda::KvWriteKernel;
/// Without the `cuda` feature there is no kernel to launch.
#[cfg(not(feature = "cuda"))]
pub(crate) enum KvWriteKernel {}

/// The op: `cache.inplace_op3(src, slots, &KvWrite { kernel })`; the kernel serves a
/// CUDA cache, the reference a CPU one.
pub(crate) struct KvWrite<'a> {
    pub kernel: Option<&'a KvWriteKernel>,
}

impl InplaceOp3 for KvWrite<'_> {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
        slots: &CpuStorage,
        tl: &Layout,
    ) -> candle_core::Result<()> {
        let shape = WriteShape::new(cl, sl, tl)?;
        let (CpuStorage::F32(src), CpuStorage::U32(slots)) = (src, slots) else {
            candle_core::bail!("kv write: the source must be f32 and the slots u32");
        };
        match cache {
            CpuStorage::BF16(c) => reference(shape, c, src, slots, half::bf16::from_f32),
            CpuStorage::F16(c) => reference(shape, c, src, slots, half::f16::from_f32),
            _ => candle_core::bail!("kv write: the cache must be f16 or bf16"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        cl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
        slots: &candle_core::CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<()> {
        let Some(kernel) = self.kernel else {
            candle_core::bail!("kv write: the kernel was not compiled for this device");
        };
        kernel.launch(WriteShape::new(cl, sl, tl)?, cache, src, slots)
    }
}

/// The write the kernel implements: each row's values, converted, at its slot.
fn reference<T: Copy>(
    s: WriteShape,
    cache: &mut [T],
    src: &[f32],
    slots: &[u32],
    convert: fn(f32) -> T,
) -> candle_core::Result<()> {
    let src = &src[s.src_offset..s.src_offset + s.src_len()];
    let slots = &slots[s.slots_offset..s.slots_offset + s.rows];
    let cache = &mut cache[s.cache_offset..s.cache_offset + s.cache_slots * s.kv_dim];
    for (r, &slot) in slots.iter().enumerate() {
        let slot = slot as usize;
        if slot >= s.cache_slots {
            candle_core::bail!(
                "kv write: slot {slot} is outside the cache's {}",
                s.cache_slots
            );
        }
        let row = &src[r * s.src_stride..r * s.src_stride + s.kv_dim];
        let dst = &mut cache[slot * s.kv_dim..(slot + 1) * s.kv_dim];
        for (d, &x) in dst.iter_mut().zip(row) {
            *d = convert(x);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use super::KvWrite;

    /// The reference writes what candle's `scatter_set` writes, from a strided view of a
    /// wider matrix (as the values are a view of the QKV projection), in both cache types,
    /// rounding ties, infinities and overflow included; slots it does not name are kept.
    #[test]
    fn the_reference_writes_what_scatter_set_writes() {
        let dev = Device::Cpu;
        let (rows, kv_dim, slots) = (5, 6, 11);
        let mut wide: Vec<f32> = (0..rows * 10)
            .map(|i| (i as f32 * 0.37).sin() * 3.0)
            .collect();
        // Ties in bf16 (the 17th bit of the significand) and f16, an infinity, a value
        // past f16's range, and a subnormal.
        wide[2..7].copy_from_slice(&[
            f32::from_bits(0x3f80_8000),
            f32::from_bits(0x3f81_8000),
            f32::INFINITY,
            1e6,
            1e-7,
        ]);
        let wide = Tensor::from_vec(wide, (rows, 10), &dev).unwrap();
        let src = wide.narrow(1, 2, kv_dim).unwrap();
        let slot_ids = [7u32, 0, 10, 3, 4];
        let ids = Tensor::from_slice(&slot_ids, (rows, 1), &dev).unwrap();
        for dtype in [DType::BF16, DType::F16] {
            let ours = Tensor::ones((slots, kv_dim), dtype, &dev).unwrap();
            ours.inplace_op3(&src, &ids, &KvWrite { kernel: None })
                .unwrap();
            let theirs = Tensor::ones((slots, kv_dim), dtype, &dev).unwrap();
            let wide_ids = ids
                .broadcast_as((rows, kv_dim))
                .unwrap()
                .contiguous()
                .unwrap();
            let converted = src.to_dtype(dtype).unwrap().contiguous().unwrap();
            theirs.scatter_set(&wide_ids, &converted, 0).unwrap();
            let bits = |t: &Tensor| -> Vec<Vec<u32>> {
                let t = t.to_dtype(DType::F32).unwrap();
                t.to_vec2::<f32>()
                    .unwrap()
                    .iter()
                    .map(|r| r.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            assert_eq!(bits(&ours), bits(&theirs), "{dtype:?}");
        }
    }

    #[test]
    fn a_slot_outside_the_cache_is_an_error() {
        let dev = Device::Cpu;
        let cache = Tensor::zeros((4, 2), DType::BF16, &dev).unwrap();
        let src = Tensor::ones((1, 2), DType::F32, &dev).unwrap();
        let ids = Tensor::from_slice(&[4u32], (1, 1), &dev).unwrap();
        let err = cache
            .inplace_op3(&src, &ids, &KvWrite { kernel: None })
            .unwrap_err();
        assert!(err.to_string().contains("outside the cache"), "{err}");
    }
}
