//! Compiling `kv_write.cu` with NVRTC and launching it on candle's CUDA device: the CUDA
//! side of [`crate::device::kv_write`].

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::compile_ptx;
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType};

use super::KV_WRITE;
use crate::device::kv_write::WriteShape;
use crate::error::{ModelError, Result};

/// The module's name in candle's cache of loaded modules.
const MODULE: &str = "chorus_kv_write";
/// Threads per block: one a value.
const THREADS: u32 = 256;

/// The KV write kernels (one per cache type), compiled once.
pub(crate) struct KvWriteKernel {
    ptx: String,
}

impl KvWriteKernel {
    pub(crate) fn compile() -> Result<Self> {
        let ptx = compile_ptx(KV_WRITE).map_err(|e| {
            ModelError::Unsupported(format!(
                "NVRTC could not compile the KV write kernel: {e:?}"
            ))
        })?;
        Ok(Self { ptx: ptx.to_src() })
    }

    /// Loads the module onto `dev` (candle keeps it for every later launch).
    pub(crate) fn load(&self, dev: &CudaDevice) -> Result<()> {
        for function in ["kv_write_bf16", "kv_write_f16"] {
            dev.get_or_load_custom_func(function, MODULE, &self.ptx)
                .map_err(|e| {
                    ModelError::Unsupported(format!(
                        "the driver could not load the KV write kernel: {e}"
                    ))
                })?;
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn ptx(&self) -> &str {
        &self.ptx
    }

    /// Writes `src`'s rows into `cache` at `slots` (see `kv_write.cu`).
    pub(crate) fn launch(
        &self,
        s: WriteShape,
        cache: &mut CudaStorage,
        src: &CudaStorage,
        slots: &CudaStorage,
    ) -> candle_core::Result<()> {
        match cache.dtype() {
            DType::BF16 => self.launch_on::<half::bf16>("kv_write_bf16", s, cache, src, slots),
            DType::F16 => self.launch_on::<half::f16>("kv_write_f16", s, cache, src, slots),
            other => candle_core::bail!("kv write: the cache is {other:?}, not f16 or bf16"),
        }
    }

    fn launch_on<C: CudaDType>(
        &self,
        function: &str,
        s: WriteShape,
        cache: &mut CudaStorage,
        src: &CudaStorage,
        slots: &CudaStorage,
    ) -> candle_core::Result<()> {
        let values = s.rows * s.kv_dim;
        if values == 0 {
            return Ok(());
        }
        if u32::try_from(values).is_err() || u32::try_from(s.src_stride).is_err() {
            candle_core::bail!(
                "kv write: {} rows of {} values are too many",
                s.rows,
                s.kv_dim
            );
        }
        let dev = src.device().clone();
        let src = src.as_cuda_slice::<f32>()?;
        let slots = slots.as_cuda_slice::<u32>()?;
        if src.len() < s.src_offset + s.src_len() || slots.len() < s.slots_offset + s.rows {
            candle_core::bail!("kv write: the source or the slots are shorter than their layouts");
        }
        let src = src.slice(s.src_offset..s.src_offset + s.src_len());
        let slots = slots.slice(s.slots_offset..s.slots_offset + s.rows);
        let cache = cache.as_cuda_slice_mut::<C>()?;
        let cache_len = s.cache_slots * s.kv_dim;
        if cache.len() < s.cache_offset + cache_len {
            candle_core::bail!("kv write: the cache is shorter than its layout");
        }
        let mut cache = cache.slice_mut(s.cache_offset..s.cache_offset + cache_len);
        let func = dev.get_or_load_custom_func(function, MODULE, &self.ptx)?;
        let (rows, kv_dim, stride, cache_slots) = (
            s.rows as u32,
            s.kv_dim as u32,
            s.src_stride as u32,
            s.cache_slots as u32,
        );
        let mut b = func.builder();
        b.arg(&mut cache);
        b.arg(&src);
        b.arg(&slots);
        b.arg(&rows);
        b.arg(&kv_dim);
        b.arg(&stride);
        b.arg(&cache_slots);
        let cfg = LaunchConfig {
            grid_dim: ((values as u32).div_ceil(THREADS), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature in kv_write.cu in order and
        // type (the cache as 16-bit words); the views are live device buffers of the
        // lengths the kernel reads (the source's `(rows - 1) * stride + kv_dim` values,
        // `rows` slots, `cache_slots * kv_dim` cache values, checked above), the grid
        // covers `rows * kv_dim` threads and the kernel returns past that, and it skips a
        // slot outside the cache rather than write there.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}
