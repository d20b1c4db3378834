//! Capturing a step's work on candle's CUDA stream as a graph, and replaying it.
//!
//! A capture records the kernels the work launches, on the addresses it uses, without
//! running them; a replay runs them all with one launch. So the work must read its inputs
//! from buffers it finds at the same addresses every time, and may not copy from the
//! host while captured: [`warm`] runs it once first with candle's cache of small uploads
//! on (the shapes and strides its operations copy to the device), which the capture then
//! finds there, and loads every kernel module it needs.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaGraph, CudaStream};
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

/// Whether steps on `device` can be captured: a CUDA device whose allocations are
/// stream-ordered (memory pools: a capture records them as the graph's own), on one
/// stream without cudarc's cross-stream events (a capture may not wait on an event
/// recorded outside it).
pub(crate) fn supported(device: &Device) -> bool {
    let Device::Cuda(dev) = device else {
        return false;
    };
    let ctx = dev.cuda_stream().context().clone();
    ctx.has_async_alloc() && !ctx.is_managing_stream_synchronization()
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
/// creates must be dropped inside it, so that the graph frees what it allocates. However
/// the work ends, the capture ends with it and the stream runs work again.
pub(crate) fn capture(device: &Device, work: impl FnOnce() -> Result<()>) -> Result<Graph> {
    let dev = cuda(device)?;
    let _cache = dev.enable_cuda_graph_htod_cache();
    let stream = dev.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .w()?;
    let mut capturing = Capturing(Some(stream));
    let worked = work();
    let ended = capturing.end();
    worked?;
    let graph =
        ended?.ok_or_else(|| ModelError::Unsupported("the capture recorded nothing".into()))?;
    graph.upload().w()?;
    Ok(Graph(graph))
}

/// A stream in capture; ending it, or dropping it (a panic in the work), ends the capture.
struct Capturing(Option<Arc<CudaStream>>);

impl Capturing {
    fn end(&mut self) -> Result<Option<CudaGraph>> {
        let Some(stream) = self.0.take() else {
            return Ok(None);
        };
        // An operation that failed inside the capture may have left an error pending in
        // cudarc's context (a free on an invalidated capture), which `end_capture` would
        // return before ending anything: take it first, and report it.
        let pending = stream.context().check_err();
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
        let status = stream.capture_status();
        if status.as_ref().ok() != Some(&sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
        {
            tracing::error!(?status, "a CUDA graph capture did not end");
        }
        pending.w()?;
        Ok(graph.w()?)
    }
}

impl Drop for Capturing {
    fn drop(&mut self) {
        if let Err(e) = self.end() {
            tracing::warn!(error = %e, "ending an abandoned CUDA graph capture");
        }
    }
}

fn cuda(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        _ => Err(ModelError::Unsupported(
            "CUDA graphs on a device that is not CUDA".into(),
        )),
    }
}
