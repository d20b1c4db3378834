//! Steps at fixed shapes, replayed as CUDA graphs.
//!
//! candle launches each operation from the host, about thirty a layer, and for a small
//! batch that launching, not the GPU's work, sets how long a step takes. So a step of
//! few enough rows (decoding rows and short prompt chunks) is padded to one of a few
//! sizes, every row attends through the paged op (a prompt chunk's rows each as a query
//! of its own), and the step reads its inputs from buffers allocated once per shape:
//! every step of a shape then runs the same kernels on the same addresses. On CUDA the
//! first step of a shape runs eagerly (loading its kernels and keeping the small uploads
//! candle's operations make), the second is captured as a graph, and every later one
//! copies its inputs into the buffers and replays the graph: one launch instead of
//! hundreds. If a capture or a replay fails, the log says why and steps run op by op from
//! then on (on a GPU, padding without graphs would only cost).
//!
//! On candle's CPU device the same fixed-shape steps run eagerly, which is how CI checks
//! the padding and the buffers: [`DeviceModel::run`] reads nothing but its inputs, and
//! here those inputs are the refilled buffers, exactly as a replay reads them.
//!
//! Padding rows compute token 0 at position 0 in the scratch block, which no sequence
//! owns ([`super::kv`]); their logits are never asked for.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, WithDType};

use super::attention::StepAttention;
use super::kv::row_slots;
use super::paged::{write_plans, RowPlans};
use super::{wanted_rows, DeviceModel, Logits, StepInputs};
use crate::attention::RowSpan;
use crate::error::{ModelError, Result};
use crate::kv::BLOCK_SIZE;
use crate::transformer::SeqInput;

/// A prompt chunk's rows in a fixed step attend a query row at a time, reading their
/// history once each, where the gather's matrix products share it: fine for short
/// prompts, not for long ones. The positions a step's chunk rows attend to, summed over
/// those rows, may be at most this many per row of the step's size; larger steps go the
/// eager way.
const CHUNK_POSITIONS_PER_ROW: usize = 512;

/// The fixed-shape steps of one model, by shape.
pub(crate) struct FixedSteps {
    /// The largest step, in rows.
    max_rows: usize,
    /// The most shapes kept.
    max_shapes: usize,
    /// Whether steps are captured: on a CUDA device, until a capture or a replay fails.
    /// Without, fixed steps run only on candle's CPU device, to check them.
    capture: bool,
    steps: HashMap<Key, FixedStep>,
    /// Counts steps, to find the least recently used shape.
    clock: u64,
}

/// A step's padded shape: its rows, and the rows whose logits it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Shape {
    pub rows: usize,
    pub wanted: usize,
}

/// What a fixed step's kernels depend on besides its inputs' values. Its projections
/// are dense (quantized steps are not fixed: see [`DeviceModel::step`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    shape: Shape,
    /// Block-table entries per row: a power of two, so that growing contexts recapture
    /// only a few times.
    blocks: usize,
}

impl Key {
    /// Values per row plan: the context, the first position seen, the block table.
    fn stride(&self) -> usize {
        2 + self.blocks
    }

    /// Where window `i`'s row plans start in [`FixedStep::ints`], after the token ids,
    /// slots, positions and sampling rows (with `i` the number of windows: its length).
    fn plans_at(&self, i: usize) -> usize {
        let Shape { rows, wanted } = self.shape;
        3 * rows + wanted + i * rows * self.stride()
    }
}

struct FixedStep {
    key: Key,
    /// u32: token ids `[rows]`, slots `[rows]`, positions `[rows]`, the rows whose
    /// logits are wanted `[wanted]`, then each window's row plans `[rows, 2 + blocks]`
    /// (see [`write_plans`]).
    ints: Tensor,
    /// `[wanted, vocab]` f32: the step's logits, padding included; `None` when it
    /// wants none.
    logits: Option<Tensor>,
    state: State,
    /// [`FixedSteps::clock`] when it last ran.
    used: u64,
}

enum State {
    /// Not run yet.
    Cold,
    /// Ran once eagerly: on CUDA its kernels are loaded and its small uploads kept.
    Warm,
    #[cfg(feature = "cuda")]
    Captured(super::cuda::Graph),
}

impl FixedSteps {
    /// `None` where steps could only be run eagerly, other than on candle's CPU device.
    pub(crate) fn new(device: &Device, max_rows: usize, max_shapes: usize) -> Option<Self> {
        #[cfg(feature = "cuda")]
        let capture = super::cuda::graph::supported(device);
        #[cfg(not(feature = "cuda"))]
        let capture = false;
        if !capture && !device.is_cpu() {
            tracing::warn!(
                "CUDA graphs cannot be captured here (no stream-ordered allocation, or \
                 several streams): steps run op by op"
            );
            return None;
        }
        Some(Self {
            max_rows,
            max_shapes: max_shapes.max(1),
            capture,
            steps: HashMap::new(),
            clock: 0,
        })
    }

    /// The largest fixed-shape step, in rows.
    pub(crate) fn max_rows(&self) -> usize {
        self.max_rows
    }

    /// Whether steps are captured as CUDA graphs (else they run eagerly).
    pub(crate) fn captures(&self) -> bool {
        self.capture
    }

    /// The shape a step of `batch` pads to, if it has few enough rows, its prompt chunks
    /// attend to few enough positions, and no sequence wants every row's logits.
    /// (Quantized steps are not fixed either: see [`DeviceModel::step`].)
    pub(crate) fn fits(&self, batch: &[SeqInput], spans: &[RowSpan]) -> Option<Shape> {
        if batch.iter().any(|s| s.all_logits) {
            return None;
        }
        let rows = size_for(spans.iter().map(|s| s.rows).sum(), self.max_rows)?;
        // A chunk's row r sees start + r + 1 positions.
        let attended: usize = spans
            .iter()
            .filter(|s| s.rows > 1)
            .map(|s| s.rows * s.start_pos + s.rows * (s.rows + 1) / 2)
            .sum();
        if attended > rows * CHUNK_POSITIONS_PER_ROW {
            return None;
        }
        let wanted = wanted_rows(batch, spans).count();
        Some(Shape {
            rows,
            wanted: match wanted {
                0 => 0,
                n => size_for(n, self.max_rows)?,
            },
        })
    }

    /// Runs the step `batch` padded to `shape`; returns the logits of each sequence that
    /// wants them, in batch order, still on the device (a view of the shape's buffer,
    /// which the next step of the shape overwrites).
    pub(crate) fn step(
        &mut self,
        model: &DeviceModel,
        batch: &[SeqInput],
        spans: &[RowSpan],
        positions: &[usize],
        shape: Shape,
    ) -> Result<Option<Tensor>> {
        let widest = spans.iter().map(|s| s.blocks.len()).max().unwrap_or(1);
        // A shape's step serves every table up to its width; a longer one replaces it.
        let key = match self
            .steps
            .keys()
            .find(|k| k.shape == shape && k.blocks >= widest)
        {
            Some(&k) => k,
            None => {
                let key = Key {
                    shape,
                    blocks: widest.next_power_of_two().max(4),
                };
                self.steps.retain(|k, _| k.shape != shape);
                while self.steps.len() >= self.max_shapes {
                    let Some((&oldest, _)) = self.steps.iter().min_by_key(|(_, s)| s.used) else {
                        break;
                    };
                    self.steps.remove(&oldest);
                }
                self.steps.insert(key, FixedStep::new(model, key)?);
                key
            }
        };
        self.clock += 1;
        let Some(step) = self.steps.get_mut(&key) else {
            return Err(ModelError::Kv("a fixed step went missing".into()));
        };
        step.used = self.clock;
        step.fill(model, batch, spans, positions)?;
        // Only a capture or a replay is the graphs' doing; an eager run's error is the
        // caller's to handle.
        let graph = self.capture && !matches!(step.state, State::Cold);
        if let Err(e) = step.compute(model, self.capture) {
            if !graph {
                return Err(e);
            }
            tracing::warn!(error = %e, ?shape, "CUDA graphs failed: steps run op by op from now on");
            self.capture = false;
            step.run(model)?;
        }
        let wanted = wanted_rows(batch, spans).count();
        match &self.steps[&key].logits {
            Some(logits) if wanted > 0 => Ok(Some(logits.narrow(0, 0, wanted)?)),
            _ => Ok(None),
        }
    }
}

/// The sizes a step pads to: 1, 2, 3, 4, 6, 8, 12, 16, 24, … (powers of two and
/// the points halfway between), so padding adds less than half a step's rows, and `max`
/// itself. `None` above `max`.
fn size_for(rows: usize, max: usize) -> Option<usize> {
    if rows == 0 || rows > max {
        return None;
    }
    let pow = rows.next_power_of_two();
    let size = match pow / 4 * 3 {
        mid if mid >= rows => mid,
        _ => pow,
    };
    Some(size.min(max))
}

impl FixedStep {
    fn new(model: &DeviceModel, key: Key) -> Result<Self> {
        let dev = &model.device;
        let wanted = key.shape.wanted;
        let ints = key.plans_at(model.windows.len());
        Ok(Self {
            used: 0,
            key,
            ints: Tensor::zeros(ints, DType::U32, dev)?,
            logits: match wanted {
                0 => None,
                n => Some(Tensor::zeros((n, model.cfg.vocab), DType::F32, dev)?),
            },
            state: State::Cold,
        })
    }

    /// Writes the step's inputs into the buffers, padding rows after the real ones.
    fn fill(
        &self,
        model: &DeviceModel,
        batch: &[SeqInput],
        spans: &[RowSpan],
        positions: &[usize],
    ) -> Result<()> {
        let Shape { rows, wanted } = self.key.shape;
        let stride = self.key.stride();
        let scratch = model.kv.scratch_block();
        let real = positions.len();
        let mut ints = Vec::with_capacity(self.ints.elem_count());
        ints.extend(batch.iter().flat_map(|s| s.tokens));
        ints.resize(rows, 0);
        ints.extend(row_slots(spans));
        ints.resize(2 * rows, scratch * BLOCK_SIZE as u32);
        ints.extend(positions.iter().map(|&p| p as u32));
        ints.resize(3 * rows, 0);
        ints.extend(wanted_rows(batch, spans));
        ints.resize(3 * rows + wanted, 0);
        let all: Vec<&RowSpan> = spans.iter().collect();
        for &window in &model.windows {
            write_plans(&all, window, stride, &mut ints)?;
            // A padding row sees its one position in the scratch block.
            for _ in real..rows {
                ints.extend([1, 0, scratch]);
                ints.resize(ints.len() + stride - 3, 0);
            }
        }
        if ints.len() != self.ints.elem_count() {
            return Err(ModelError::Kv(
                "a fixed step's inputs do not fit its buffers".into(),
            ));
        }
        upload(&self.ints, ints)
    }

    /// The step's inputs: views of the buffers, the same addresses every time.
    fn inputs<'a>(&self, model: &'a DeviceModel) -> Result<StepInputs<'a>> {
        let Shape { rows, wanted } = self.key.shape;
        let stride = self.key.stride();
        let op = model
            .paged
            .as_ref()
            .ok_or_else(|| ModelError::Unsupported("fixed steps need the paged op".into()))?;
        let mut metas = HashMap::new();
        for (i, &window) in model.windows.iter().enumerate() {
            let plan = self
                .ints
                .narrow(0, self.key.plans_at(i), rows * stride)?
                .reshape((rows, stride))?;
            metas.insert(window, RowPlans::on_device(plan));
        }
        Ok(StepInputs {
            ids: self.ints.narrow(0, 0, rows)?,
            slots: self.ints.narrow(0, rows, rows)?.reshape((rows, 1))?,
            positions: self.ints.narrow(0, 2 * rows, rows)?,
            attention: StepAttention::paged(&model.heads(), op, rows, metas),
            logits: match wanted {
                0 => Logits::Nothing,
                n => Logits::Rows(self.ints.narrow(0, 3 * rows, n)?),
            },
        })
    }

    /// The step, eagerly: its logits into [`Self::logits`].
    fn run(&self, model: &DeviceModel) -> Result<()> {
        let inputs = self.inputs(model)?;
        let computed = model.run(&inputs, false)?;
        if let (Some(logits), Some(out)) = (&computed, &self.logits) {
            out.slice_set(logits, 0, 0)?;
        }
        Ok(())
    }

    /// The step over the filled buffers: eagerly, or on CUDA through its graph, captured
    /// on the second run.
    fn compute(&mut self, model: &DeviceModel, capture: bool) -> Result<()> {
        #[cfg(feature = "cuda")]
        if capture {
            use super::cuda::graph;
            match &self.state {
                State::Cold => {
                    graph::warm(&model.device, || self.run(model))?;
                    self.state = State::Warm;
                }
                State::Warm => {
                    let started = std::time::Instant::now();
                    let g = graph::capture(&model.device, || self.run(model))?;
                    g.launch()?;
                    self.state = State::Captured(g);
                    tracing::info!(
                        rows = self.key.shape.rows,
                        wanted = self.key.shape.wanted,
                        blocks = self.key.blocks,
                        ms = started.elapsed().as_secs_f64() * 1e3,
                        "captured a CUDA graph of a step"
                    );
                }
                State::Captured(g) => g.launch()?,
            }
            return Ok(());
        }
        let _ = capture;
        self.run(model)?;
        self.state = State::Warm;
        Ok(())
    }
}

/// Copies `host` into the start of `dst` in place.
fn upload<T: WithDType>(dst: &Tensor, host: Vec<T>) -> Result<()> {
    let n = host.len();
    dst.slice_set(&Tensor::from_vec(host, n, dst.device())?, 0, 0)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_powers_of_two_and_halfway_points_up_to_the_limit() {
        let sizes: Vec<Option<usize>> = (0..=13).map(|r| size_for(r, 256)).collect();
        let want = [0, 1, 2, 3, 4, 6, 6, 8, 8, 12, 12, 12, 12, 16];
        for (r, (&got, &w)) in sizes.iter().zip(&want).enumerate() {
            assert_eq!(got, (w > 0).then_some(w), "{r} rows");
        }
        assert_eq!(size_for(200, 256), Some(256));
        assert_eq!(size_for(129, 256), Some(192));
        assert_eq!(size_for(100, 100), Some(100));
        assert_eq!(size_for(97, 100), Some(100));
        assert_eq!(size_for(101, 100), None);
        // Padding adds less than half.
        for rows in 1..=256 {
            let size = size_for(rows, 256).unwrap();
            assert!(size >= rows && 2 * size < 3 * rows + 2, "{rows} → {size}");
        }
    }
}
