//! Software prefetch: a hint that a slice is read soon, so its cache lines are on their
//! way while the current data is computed on.
//!
//! Why: a decoding row's attention walks its history block by block, and the blocks of a
//! long conversation are scattered over a KV pool far larger than the caches. The
//! hardware prefetcher follows each 2 KiB block only once it has missed in it, so
//! without a hint every block starts with a wait on memory (`decode_long` in
//! benches/RESULTS.md). A prefetch never faults and never changes a result: the
//! reference (no hint at all, as on other architectures) computes the same values, and
//! every attention test runs through it.

/// Bytes per cache line on every x86-64 CPU chorus runs on.
const LINE: usize = 64;

/// Asks for every cache line of `data` to be brought into the L1 cache.
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(data);
        let start = data.as_ptr().cast::<i8>();
        for at in (0..bytes).step_by(LINE) {
            // SAFETY: `_mm_prefetch` needs SSE, part of every x86-64 CPU; it only hints
            // and never faults, and `start + at` stays inside `data` (`at < bytes`).
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.add(at)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}
