//! Kernels of ours for CUDA devices, compiled at run time by NVRTC for the model's shape.
//!
//! - `paged_attention.cu`: decode attention reading the paged cache in place (the
//!   [`super::paged`] op's CUDA side). Its tests run the same source on the host through
//!   `host_emulation.cpp`, so CI checks the kernel's logic without a GPU.
//! - `kv_write.cu`: writing a step's keys and values into the paged cache (the
//!   [`super::kv_write`] op's CUDA side); `kv_write` (feature `cuda`) compiles and
//!   launches it.
//! - `launch` (feature `cuda`): compiling it and launching it on candle's CUDA device.
//! - `graph` (feature `cuda`): capturing a step as a CUDA graph and replaying it
//!   ([`super::graphs`]).
//! - `memory` (feature `cuda`): the memory pool and candle's events, set at start.

#[cfg(feature = "cuda")]
pub(crate) mod graph;
#[cfg(feature = "cuda")]
mod kv_write;
#[cfg(feature = "cuda")]
mod launch;
#[cfg(feature = "cuda")]
pub(crate) mod memory;
#[cfg(test)]
mod tests;

#[cfg(feature = "cuda")]
pub(crate) use graph::Graph;
#[cfg(feature = "cuda")]
pub(crate) use kv_write::KvWriteKernel;
#[cfg(feature = "cuda")]
pub(crate) use launch::PagedKernel;

use candle_core::DType;

use crate::kv::BLOCK_SIZE;

/// The kernel's source.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launch's, and the tests'
pub(crate) const PAGED_ATTENTION: &str = include_str!("paged_attention.cu");

/// The KV write kernels' source.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launch's, and the tests'
pub(crate) const KV_WRITE: &str = include_str!("kv_write.cu");

/// Static shared memory a block may use without opting in to more.
const SHARED_LIMIT: usize = 48 * 1024;

/// What one compilation of the paged decode kernel is specialised for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelShape {
    pub head_dim: usize,
    /// Query heads per KV head.
    pub group: usize,
    /// The cache's type: f16 or bf16.
    pub cache: DType,
}

impl KernelShape {
    /// Threads per block: a multiple of the head's value pairs (each thread sums one pair
    /// over every few positions), about 128.
    pub(crate) fn threads(&self) -> usize {
        let pairs = self.head_dim / 2;
        match pairs {
            0 => 0,
            p if p >= 128 => p,
            p => p * (128 / p),
        }
    }

    /// The block's shared memory in bytes: the queries, the tile's scores twice, its
    /// slots, and every thread's partial output.
    pub(crate) fn shared_bytes(&self) -> usize {
        let (g, t) = (self.group, self.threads());
        4 * (g * self.head_dim + 4 * g * t + t)
    }

    /// Whether the kernel serves this shape; the gather path serves the rest.
    pub(crate) fn supported(&self) -> bool {
        self.head_dim >= 2
            && self.head_dim.is_multiple_of(2)
            && self.group >= 1
            && self.threads() <= 1024
            && self.shared_bytes() <= SHARED_LIMIT
            && matches!(self.cache, DType::F16 | DType::BF16)
    }

    /// The `-D` constants the source is compiled with.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))] // the launch's, and the tests'
    pub(crate) fn defines(&self) -> Vec<String> {
        vec![
            format!("-DHEAD_DIM={}", self.head_dim),
            format!("-DGROUP={}", self.group),
            format!("-DTHREADS={}", self.threads()),
            format!("-DBLOCK_SIZE={BLOCK_SIZE}"),
            format!("-DCACHE_BF16={}", u8::from(self.cache == DType::BF16)),
        ]
    }
}
