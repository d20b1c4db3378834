//! Capturing a step's work on candle's CUDA stream as a graph, and replaying it.
//!
//! A capture records the kernels the work launches, on the addresses it uses, without
//! running them; a replay runs them all with one launch. So the work must read its inputs
//! from buffers it finds at the same addresses every time, and may not copy from the
//! host while captured: [`warm`] runs it once first with candle's cache of small uploads
//! on (the shapes and strides its operations copy to the device), which the capture then
//! finds there, and loads every kernel module it needs.

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Device};

use crate::error::{ModelError, Result};

/// A captured step.
pub(crate) struct Graph(CudaGraph);

impl Graph {
    /// Runs the captured work again, over whatever its buffers hold now.
    pub(crate) fn launch(&self) -> Result<()> {
        self.0.launch().w()?;
        Ok(())
    }
}

/// Runs `work` eagerly with candle's cache of small uploads on, so that a capture of the
/// same work finds them.
pub(crate) fn warm(device: &Device, work: impl FnOnce() -> Result<()>) -> Result<()> {
    let dev = cuda(device)?;
    let _cache = dev.enable_cuda_graph_htod_cache();
    work()?;
    device.synchronize()?;
    Ok(())
}

/// Captures `work`, which has run through [`warm`] with the same shapes. Every tensor it
/// creates must be dropped inside it, so that the graph frees what it allocates.
pub(crate) fn capture(device: &Device, work: impl FnOnce() -> Result<()>) -> Result<Graph> {
    let dev = cuda(device)?;
    let _cache = dev.enable_cuda_graph_htod_cache();
    let stream = dev.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let worked = work();
    // The capture ends whether or not the work failed, so the stream runs work again.
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).w();
    worked?;
    let graph =
        graph?.ok_or_else(|| ModelError::Unsupported("the capture recorded nothing".into()))?;
    graph.upload().w()?;
    Ok(Graph(graph))
}

fn cuda(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(ModelError::Unsupported(
            "CUDA graphs on a device that is not CUDA".into(),
        )),
    }
}
