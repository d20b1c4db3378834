//! `--device-weights auto`: which of a projection's two forms each step multiplies with,
//! by the step's number of rows, decided at start by timing both on the device itself.
//! (Small steps read weights and favour the quantized blocks; large ones compute and
//! favour the dense gemm; where they cross depends on the device and the model.)

use std::time::{Duration, Instant};

use super::DeviceModel;
use crate::error::Result;
use crate::transformer::SeqInput;

/// One measured step size: the median step time with each form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub rows: usize,
    pub dense: Duration,
    pub quantized: Duration,
}

/// The choice for every step: the quantized form up to `quantized_up_to` rows (0:
/// never), dense above; and the measurements it was made from.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightChoice {
    pub quantized_up_to: usize,
    pub timings: Vec<Timing>,
}

impl WeightChoice {
    /// The quantized form serves every size up to the first at which dense was faster:
    /// one crossing, so that a noisy point past it cannot send large steps back to it.
    pub(crate) fn from_timings(timings: Vec<Timing>) -> Self {
        let quantized_up_to = timings
            .iter()
            .take_while(|t| t.quantized < t.dense)
            .last()
            .map_or(0, |t| t.rows);
        Self {
            quantized_up_to,
            timings,
        }
    }
}

/// Timed runs per size and form, after one untimed.
const RUNS: usize = 3;

/// Rows of a measured step that sample, as decoding rows do; the rest stand for prompt
/// rows, whose logits nobody asks for.
const SAMPLING_ROWS: usize = 256;

/// Times steps of 1, 2, 4, … up to `up_to` rows with each form. Each row is one token at
/// position 0 in block 0, written and read only here: a sequence writes its keys before
/// it reads them, so whatever is left there is overwritten before anyone reads it.
pub(crate) fn measure(model: &mut DeviceModel, up_to: usize) -> Result<WeightChoice> {
    let blocks = [0u32];
    let row = |i: usize| SeqInput {
        tokens: &[1],
        start_pos: 0,
        blocks: &blocks,
        wants_logits: i < SAMPLING_ROWS,
        all_logits: false,
    };
    let started = Instant::now();
    let mut timings = Vec::new();
    let mut rows = 1;
    while rows <= up_to.max(1) {
        let batch: Vec<SeqInput> = (0..rows).map(row).collect();
        let mut time = |quantized: bool| -> Result<Duration> {
            model.step(&batch, Some(quantized), &[])?;
            let mut runs = (0..RUNS)
                .map(|_| {
                    let t = Instant::now();
                    model.step(&batch, Some(quantized), &[])?;
                    Ok(t.elapsed())
                })
                .collect::<Result<Vec<_>>>()?;
            runs.sort_unstable();
            Ok(runs[RUNS / 2])
        };
        let t = Timing {
            rows,
            dense: time(false)?,
            quantized: time(true)?,
        };
        tracing::info!(
            rows,
            dense_ms = t.dense.as_secs_f64() * 1e3,
            quantized_ms = t.quantized.as_secs_f64() * 1e3,
            "device weights: a step of each form"
        );
        timings.push(t);
        rows *= 2;
    }
    let choice = WeightChoice::from_timings(timings);
    tracing::info!(
        quantized_up_to = choice.quantized_up_to,
        secs = started.elapsed().as_secs_f64(),
        "device weights: steps of at most this many rows use the quantized blocks, larger ones dense"
    );
    Ok(choice)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timings(ms: &[(u64, u64)]) -> Vec<Timing> {
        ms.iter()
            .enumerate()
            .map(|(i, &(d, q))| Timing {
                rows: 1 << i,
                dense: Duration::from_millis(d),
                quantized: Duration::from_millis(q),
            })
            .collect()
    }

    #[test]
    fn the_choice_is_the_last_size_before_dense_first_wins() {
        let up_to = |ms: &[(u64, u64)]| WeightChoice::from_timings(timings(ms)).quantized_up_to;
        assert_eq!(up_to(&[(5, 2), (5, 3), (6, 7), (9, 20)]), 2);
        assert_eq!(up_to(&[(5, 2), (5, 3), (6, 5), (9, 8)]), 8);
        assert_eq!(up_to(&[(2, 5), (3, 4)]), 0);
        // A noisy point past the crossing does not count.
        assert_eq!(up_to(&[(5, 2), (5, 6), (9, 8)]), 1);
        assert_eq!(up_to(&[]), 0);
    }
}
