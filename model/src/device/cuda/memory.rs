//! How candle's CUDA device keeps and orders its memory, set once per model at start.
//!
//! - Freed memory stays in the device's memory pool. Allocations are stream-ordered
//!   (`cuMemAllocAsync`), and by default a pool returns what is free to the driver at
//!   every synchronization, which a step does once: the next step's allocations would
//!   map it again.
//! - No CUDA events per allocation. candle records two for each tensor, to order uses
//!   across streams; every tensor of a model and of its steps lives on one stream (the
//!   inference thread's: candle's device uses each thread's own stream).

use std::ffi::c_void;

use candle_core::cuda_backend::cudarc::driver::{result, sys};
use candle_core::CudaDevice;

/// Sets both on `dev`'s context; a pool that refuses is logged, not fatal.
pub(crate) fn prepare(dev: &CudaDevice) {
    // SAFETY: the model's tensors are created, used and freed on the inference thread's
    // stream alone (`DeviceModel` is built and stepped there), so no use waits on
    // another stream: the events would order nothing.
    unsafe { dev.disable_event_tracking() };
    let ctx = dev.cuda_stream().context().clone();
    if !ctx.has_async_alloc() {
        return;
    }
    let kept = ctx.bind_to_thread().and_then(|()| {
        // SAFETY: `cu_device` is the context's own device handle, and the attribute is
        // a `cuuint64_t`, which `threshold` is and outlives the call.
        unsafe {
            let pool = result::device::get_mem_pool(ctx.cu_device())?;
            let mut threshold = u64::MAX;
            result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast::<c_void>(),
            )
        }
    });
    if let Err(e) = kept {
        tracing::warn!(error = %e, "the CUDA memory pool will return freed memory at each step");
    }
}
