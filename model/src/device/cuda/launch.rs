//! Compiling `paged_attention.cu` with NVRTC and launching it on candle's CUDA device.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage};

use super::{KernelShape, PAGED_ATTENTION};
use crate::device::paged::{check_sizes, RowPlans};
use crate::error::{ModelError, Result};

/// The kernel's name in `paged_attention.cu`.
const FUNCTION: &str = "paged_decode_attention";

/// The paged decode kernel compiled for one model's shape.
pub(crate) struct PagedKernel {
    shape: KernelShape,
    /// The module's name in candle's cache of loaded modules, one per shape.
    module: String,
    ptx: String,
}

impl PagedKernel {
    pub(crate) fn compile(shape: KernelShape) -> Result<Self> {
        let opts = CompileOptions {
            options: shape.defines(),
            ..Default::default()
        };
        let ptx = compile_ptx_with_opts(PAGED_ATTENTION, opts).map_err(|e| {
            ModelError::Unsupported(format!(
                "NVRTC could not compile the paged attention kernel for {shape:?}: {e:?}"
            ))
        })?;
        Ok(Self {
            module: format!(
                "chorus_paged_attention_{}_{}_{:?}",
                shape.head_dim, shape.group, shape.cache
            ),
            ptx: ptx.to_src(),
            shape,
        })
    }

    /// Loads the module onto `dev` (candle keeps it for every later launch).
    pub(crate) fn load(&self, dev: &CudaDevice) -> Result<()> {
        dev.get_or_load_custom_func(FUNCTION, &self.module, &self.ptx)
            .map_err(|e| {
                ModelError::Unsupported(format!(
                    "the driver could not load the paged attention kernel for {:?}: {e}",
                    self.shape
                ))
            })?;
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn ptx(&self) -> &str {
        &self.ptx
    }

    /// Launches one block per (row, KV head); returns `[n, heads * head_dim]` f32.
    pub(crate) fn launch(
        &self,
        q: (&CudaStorage, &Layout),
        keys: (&CudaStorage, &Layout),
        values: (&CudaStorage, &Layout),
        meta: &RowPlans,
        kv_heads: usize,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let cache = self.shape.cache;
        if keys.0.dtype() != cache || values.0.dtype() != cache {
            candle_core::bail!(
                "paged attention: the cache is {:?}, the kernel was built for {cache:?}",
                keys.0.dtype()
            );
        }
        // The kernel reads the cache as 16-bit words, whichever the type.
        match cache {
            DType::BF16 => self.launch_on::<half::bf16>(q, keys, values, meta, kv_heads, scale),
            _ => self.launch_on::<half::f16>(q, keys, values, meta, kv_heads, scale),
        }
    }

    fn launch_on<C: CudaDType>(
        &self,
        q: (&CudaStorage, &Layout),
        keys: (&CudaStorage, &Layout),
        values: (&CudaStorage, &Layout),
        meta: &RowPlans,
        kv_heads: usize,
        scale: f32,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let s = self.shape;
        let dev = q.0.device();
        let q_view = view::<f32>(q.0, q.1, "q")?;
        let (keys, values) = (
            view::<C>(keys.0, keys.1, "keys")?,
            view::<C>(values.0, values.1, "values")?,
        );
        let q_dim = kv_heads * s.group * s.head_dim;
        let n = q_view.len() / q_dim;
        let (meta_storage, meta_layout) = meta.device().storage_and_layout();
        let Storage::Cuda(meta_storage) = &*meta_storage else {
            candle_core::bail!("paged attention: the plan is not on the GPU");
        };
        let meta_view = view::<u32>(meta_storage, meta_layout, "the plan")?;
        check_sizes(
            s,
            kv_heads,
            meta,
            (q_view.len(), meta_view.len(), keys.len(), values.len()),
        )?;
        // SAFETY: uninitialised device memory that the launch below fills: every block
        // (row, KV head) writes all `GROUP * HEAD_DIM` values of its heads, and the
        // grid covers every row and KV head.
        let out = unsafe { dev.alloc::<f32>(n * q_dim) }?;
        let func = dev.get_or_load_custom_func(FUNCTION, &self.module, &self.ptx)?;
        let (stride, kv_heads_u32) = (meta.stride() as u32, kv_heads as u32);
        let mut b = func.builder();
        b.arg(&out);
        b.arg(&q_view);
        b.arg(&keys);
        b.arg(&values);
        b.arg(&meta_view);
        b.arg(&stride);
        b.arg(&kv_heads_u32);
        b.arg(&scale);
        let cfg = LaunchConfig {
            grid_dim: (n as u32, kv_heads as u32, 1),
            block_dim: (s.threads() as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel's signature in paged_attention.cu in
        // order and type (the cache as 16-bit words); every pointer is a live device
        // buffer of the size the kernel reads (q and out `n * q_dim`, the cache
        // `slots * kv_dim`, the plan `n * stride`: `check_sizes` above), and the plan's
        // block ids were checked against the cache's size before the step
        // (`DeviceModel::forward`).
        unsafe { b.launch(cfg) }.w()?;
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev.clone()),
            Shape::from((n, q_dim)),
        ))
    }
}

/// The contiguous values of `storage` under `layout`.
fn view<'a, T: CudaDType>(
    storage: &'a CudaStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<CudaView<'a, T>> {
    let slice = storage.as_cuda_slice::<T>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("paged attention: {what} is not contiguous"),
    }
}
