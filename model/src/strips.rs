//! What the projection kernels ([`crate::packed`], [`crate::int8`]) share: the stacked
//! weight's shape, its f32 values for re-blocking, and the output computed in strips of
//! 64 columns in parallel.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use rayon::prelude::*;

use crate::error::{ModelError, Result};

/// Output columns per strip: the unit of parallel work.
pub const STRIP: usize = 64;

/// `(type of the first part, n, k)` of the row-wise stack of `parts` (`[n_i, k]` each).
pub(crate) fn stacked_shape(parts: &[QTensor]) -> Result<(GgmlDType, usize, usize)> {
    let first = parts
        .first()
        .ok_or_else(|| ModelError::Unsupported("a projection with no weight".into()))?;
    let (dtype, k) = (first.dtype(), first.shape().dims2()?.1);
    let mut n = 0;
    for p in parts {
        let (pn, pk) = p.shape().dims2()?;
        if pk != k {
            return Err(ModelError::Unsupported(format!(
                "stacked weights disagree on width: {pk} vs {k}"
            )));
        }
        n += pn;
    }
    Ok((dtype, n, k))
}

/// The stack's values as f32, row-major `[n, k]`.
pub(crate) fn dense_rows(parts: &[QTensor]) -> Result<Vec<f32>> {
    let mut dense = Vec::new();
    for p in parts {
        dense.extend(
            p.dequantize(&Device::Cpu)?
                .flatten_all()?
                .to_vec1::<f32>()?,
        );
    }
    Ok(dense)
}

/// `[rows, n]` from `strips` strips, each computed by `strip(s, out)` into a zeroed
/// `[rows][STRIP]` buffer, in parallel (a few tasks per thread, consecutive strips each).
pub(crate) fn by_strips(
    strips: usize,
    rows: usize,
    n: usize,
    strip: impl Fn(usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    // [strip][rows][STRIP], so that each strip's output is one contiguous chunk.
    let mut by_strip = vec![0.0f32; strips * rows * STRIP];
    let per_task = strips.div_ceil(4 * rayon::current_num_threads()).max(1);
    by_strip
        .par_chunks_mut(rows * STRIP * per_task)
        .enumerate()
        .for_each(|(task, out)| {
            for (i, out) in out.chunks_exact_mut(rows * STRIP).enumerate() {
                strip(task * per_task + i, out);
            }
        });
    let mut y = vec![0.0f32; rows * n];
    for (s, strip) in by_strip.chunks_exact(rows * STRIP).enumerate() {
        let cols = STRIP.min(n - s * STRIP);
        for (r, line) in strip.chunks_exact(STRIP).enumerate() {
            y[r * n + s * STRIP..][..cols].copy_from_slice(&line[..cols]);
        }
    }
    y
}
