//! The forward pass as candle tensor operations on any candle device: CUDA GPUs, and
//! candle's CPU device, where CI checks this code against the packed CPU path.
//!
//! The same transformer as [`crate::transformer`] (every architecture's switches), over
//! the same ragged batch and the same block tables, with weights and the KV cache in the
//! device's memory. A step uploads its token ids, positions and attention plan once,
//! runs every layer on the device (the rotary angles looked up in tables computed at
//! start), and copies back only the logits it was asked for, or only their argmax.
//!
//! - [`weights`]: projections dense in the compute type or in quantized blocks.
//! - [`kv`]: the block pool as device memory.
//! - [`kv_write`]: a step's keys and values into the pool, as one candle op.
//! - [`calibrate`]: `--device-weights auto`, which weight form each step size uses.
//! - [`attention`]: a step's attention plan: decoding rows through [`paged`], the rest
//!   by gathering each sequence's blocks.
//! - [`paged`]: attention reading the blocks in place a query row at a time, as one
//!   candle op (decoding rows; in fixed-shape steps, prompt chunks too).
//! - [`graphs`]: steps of few rows at fixed shapes, replayed as CUDA graphs.
//! - [`argmax`]: greedy rows' picks on the device.
//! - [`cuda`]: our CUDA kernels, compiled at run time, and the graphs' capture.

mod argmax;
mod attention;
mod calibrate;
// The CUDA kernels' launches: with `prefetch` and `int8/`, the only `unsafe` code, each
// block with a `// SAFETY:` comment. The kernels' host tests run their source beside the
// op's safe reference.
#[allow(unsafe_code)]
mod cuda;
mod graphs;
mod kv;
mod kv_write;
mod paged;
mod weights;

use std::time::Instant;

use candle_core::{DType, Device, Tensor};

pub use calibrate::{Timing, WeightChoice};
pub use paged::DeviceAttention;
pub use weights::DeviceWeights;

use self::argmax::Argmax;
use self::attention::{Heads, StepAttention};
use self::cuda::KernelShape;
use self::graphs::FixedSteps;
use self::kv::{row_slots, DeviceKv};
use self::paged::{cache_dtype, PagedDecoder};
use self::weights::{vector, DeviceLayer, DeviceLinear};
use crate::attention::RowSpan;
use crate::backend::StepRow;
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::transformer::{row_spans, RopeRows, SeqInput, Transformer};

/// Where and how the device forward runs.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    pub device: Device,
    /// The type of weights and of the matrix products: f16 or bf16 on a GPU; f32 on the
    /// CPU, where this path exists to be checked.
    pub dtype: DType,
    pub weights: DeviceWeights,
    pub attention: DeviceAttention,
    /// Steps of up to this many rows (decoding rows and short prompt chunks, every row
    /// through the paged op) run at fixed shapes, captured as CUDA graphs on a GPU
    /// ([`graphs`]); 0: never. Needs the paged op.
    pub graph_rows: usize,
    /// The most shapes kept (buffers and graph each), the least recently used dropped.
    pub graph_shapes: usize,
}

pub struct DeviceModel {
    cfg: ModelConfig,
    device: Device,
    dtype: DType,
    /// `[vocab, hidden]` f32.
    embed: Tensor,
    layers: Vec<DeviceLayer>,
    norm: Tensor,
    lm_head: DeviceLinear,
    /// Rotary cos/sin of every position, and of the local base where sliding-window
    /// layers have their own.
    rope: RopeTable,
    rope_local: Option<RopeTable>,
    /// The distinct attention windows of the layers (`None` is full attention).
    windows: Vec<Option<usize>>,
    kv: DeviceKv,
    /// The decode op, unless the gather serves decoding rows too.
    paged: Option<PagedDecoder>,
    /// With both weight forms (`auto`): which one each step size uses.
    choice: Option<WeightChoice>,
    /// The fixed-shape steps, unless off or without the paged op.
    fixed: Option<FixedSteps>,
    /// Greedy rows' picks on the device.
    argmax: Argmax,
    /// How long the last step's logits took to reach the host once the device had
    /// finished the step, in ms (the step profile's `copy_ms`): the copy, and for greedy
    /// rows the argmax's kernels before their ids' copy.
    copy_ms: f64,
}

impl DeviceModel {
    /// Moves `model` onto the device with a cache of `num_blocks` blocks. Its
    /// projections must be candle tensors (loaded with [`crate::WeightFormat::Quantized`]
    /// from GGUF, unpacked from HF checkpoints). With [`DeviceWeights::Auto`] it times
    /// both weight forms here ([`calibrate`]); with [`DeviceAttention::Paged`] on CUDA it
    /// compiles the kernel here.
    pub fn new(model: Transformer, opts: &DeviceOptions, num_blocks: usize) -> Result<Self> {
        let parts = model.into_parts();
        let cfg = parts.cfg;
        let dev = &opts.device;
        if !matches!(opts.dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(ModelError::Unsupported(format!(
                "device compute type {:?} (f32, f16 or bf16)",
                opts.dtype
            )));
        }
        #[cfg(feature = "cuda")]
        if let Device::Cuda(d) = dev {
            cuda::memory::prepare(d);
        }
        let layers = parts
            .layers
            .into_iter()
            .map(|w| DeviceLayer::new(w, dev, opts.dtype, opts.weights))
            .collect::<Result<Vec<_>>>()?;
        let embed = Tensor::from_vec(parts.embed, (cfg.vocab, cfg.hidden), dev)?;
        // The cache keeps two bytes a value, as the CPU's does and as its budget counts.
        let kv_dtype = cache_dtype(opts.dtype);
        let kv = DeviceKv::new(cfg.kv_shape(), num_blocks, kv_dtype, dev)?;
        let paged = match opts.attention {
            DeviceAttention::Paged => {
                let shape = KernelShape {
                    head_dim: cfg.head_dim,
                    group: cfg.heads / cfg.kv_heads,
                    cache: kv_dtype,
                };
                PagedDecoder::new(shape, dev)
            }
            DeviceAttention::Gather => None,
        };
        let mut windows = cfg.windows.clone();
        windows.sort_unstable();
        windows.dedup();
        let mut model = Self {
            windows,
            rope: RopeTable::new(&cfg.rope.inv_freqs(cfg.head_dim), cfg.context_len, dev)?,
            rope_local: match cfg.windows.iter().any(Option::is_some) {
                true => Some(RopeTable::new(
                    &cfg.rope_local.inv_freqs(cfg.head_dim),
                    cfg.context_len,
                    dev,
                )?),
                false => None,
            },
            device: dev.clone(),
            dtype: opts.dtype,
            embed,
            layers,
            norm: vector(parts.norm, dev)?,
            lm_head: DeviceLinear::new(parts.lm_head, dev, opts.dtype, opts.weights)?,
            fixed: match (&paged, opts.graph_rows) {
                (Some(_), 1..) => FixedSteps::new(dev, opts.graph_rows, opts.graph_shapes),
                _ => None,
            },
            kv,
            paged,
            choice: None,
            argmax: Argmax::new(cfg.vocab, dev)?,
            copy_ms: 0.0,
            cfg,
        };
        if let DeviceWeights::Auto { up_to } = opts.weights {
            if model.layers.iter().any(|l| l.qkv.has_both()) {
                model.choice = Some(calibrate::measure(&mut model, up_to)?);
            }
        }
        // Serve with the uploads done, so that the first step's time is its own.
        model.device.synchronize()?;
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// How decoding rows attend: paged unless gather was asked for or the kernel does
    /// not serve this model's shape.
    pub fn attention(&self) -> DeviceAttention {
        match self.paged {
            Some(_) => DeviceAttention::Paged,
            None => DeviceAttention::Gather,
        }
    }

    /// Steps of up to this many rows run at fixed shapes, and whether they are captured
    /// as CUDA graphs; `None`: every step runs eagerly.
    pub fn fixed_steps(&self) -> Option<(usize, bool)> {
        self.fixed.as_ref().map(|g| (g.max_rows(), g.captures()))
    }

    /// With `--device-weights auto`: which weight form each step size uses, and the
    /// timings behind it. `None` with one form.
    pub fn weight_choice(&self) -> Option<&WeightChoice> {
        self.choice.as_ref()
    }

    /// Copies every layer's keys and values of block `src` into block `dst`.
    pub fn copy_block(&mut self, src: u32, dst: u32) -> Result<()> {
        self.kv.copy_block(src, dst)
    }

    /// Runs one step; the contract of [`Transformer::forward`].
    pub fn forward(&mut self, batch: &[SeqInput]) -> Result<Vec<Vec<f32>>> {
        // No row asked for its argmax alone: every row comes back as logits.
        let rows = self.step(batch, None, &[])?;
        Ok(rows.into_iter().filter_map(StepRow::into_logits).collect())
    }

    /// Runs one step like [`Self::forward`]; the last row of each sequence flagged in
    /// `argmax_only` comes back as its argmax alone, found on the device
    /// ([`crate::Backend::forward_rows`]).
    pub fn forward_rows(
        &mut self,
        batch: &[SeqInput],
        argmax_only: &[bool],
    ) -> Result<Vec<StepRow>> {
        self.step(batch, None, argmax_only)
    }

    /// One step; `quantized` forces the weight form where there are both, else the
    /// choice for the step's rows does.
    fn step(
        &mut self,
        batch: &[SeqInput],
        quantized: Option<bool>,
        argmax_only: &[bool],
    ) -> Result<Vec<StepRow>> {
        self.copy_ms = 0.0;
        // The device is done with the step: the copy is timed apart from its work.
        let Some(logits) = self.step_on_device(batch, quantized)? else {
            return Ok(Vec::new());
        };
        let began = Instant::now();
        let rows = self.rows_back(&logits, &argmax_rows(batch, argmax_only))?;
        self.copy_ms = began.elapsed().as_secs_f64() * 1e3;
        Ok(rows)
    }

    /// The wanted rows' `logits` on the host: the argmax of those flagged in `argmax`,
    /// the logits of the others.
    fn rows_back(&self, logits: &Tensor, argmax: &[bool]) -> Result<Vec<StepRow>> {
        if argmax.len() != logits.dim(0)? {
            return Err(ModelError::Kv(format!(
                "{} argmax flags for {} rows of logits",
                argmax.len(),
                logits.dim(0)?
            )));
        }
        if !argmax.contains(&true) {
            let rows = logits.to_vec2::<f32>()?;
            return Ok(rows.into_iter().map(StepRow::Logits).collect());
        }
        let (flagged, kept): (Vec<u32>, Vec<u32>) =
            (0..argmax.len() as u32).partition(|&r| argmax[r as usize]);
        let some = |rows: &[u32]| -> Result<Tensor> {
            let ids = Tensor::from_vec(rows.to_vec(), rows.len(), &self.device)?;
            Ok(logits.index_select(&ids, 0)?)
        };
        // The argmax over the flagged rows alone: its temporaries grow with the rows.
        let tokens = match kept.is_empty() {
            true => self.argmax.tokens(logits)?,
            false => self.argmax.tokens(&some(&flagged)?)?,
        };
        let mut rows = vec![StepRow::Argmax(0); argmax.len()];
        for (r, token) in flagged.into_iter().zip(tokens) {
            rows[r as usize] = StepRow::Argmax(token);
        }
        if !kept.is_empty() {
            let logits = some(&kept)?.to_vec2::<f32>()?;
            for (r, row) in kept.into_iter().zip(logits) {
                rows[r as usize] = StepRow::Logits(row);
            }
        }
        Ok(rows)
    }

    /// How long the last step's logits took to reach the host once the device was done
    /// with the step, in ms: their copy, and for greedy rows the argmax's kernels and the
    /// ids' copy instead.
    pub fn copy_ms(&self) -> f64 {
        self.copy_ms
    }

    /// [`Self::step`] up to the logits, which stay on the device; it returns them once
    /// the device is done with the step (the copy would wait for that anyway). A step of
    /// few rows goes through a fixed-shape step ([`graphs`]) when it fits one.
    fn step_on_device(
        &mut self,
        batch: &[SeqInput],
        quantized: Option<bool>,
    ) -> Result<Option<Tensor>> {
        let (spans, positions) = row_spans(&self.cfg, batch)?;
        let rows = positions.len();
        if rows == 0 {
            return Ok(None);
        }
        self.check(batch, &spans)?;
        if let Some(mut fixed) = self.fixed.take() {
            let out = match fixed.fits(batch, &spans) {
                // candle's quantized kernels keep a scratch buffer that grows with the
                // batch and moves when it does, which a replayed graph would not follow:
                // steps with the quantized form are launched op by op. Waiting for the
                // device here charges an error that a replay reports late to the fixed
                // step, which then falls back like any other.
                Some(shape) if !self.multiplies_quantized(shape.rows, quantized) => Some(
                    fixed
                        .step(self, batch, &spans, &positions, shape)
                        .and_then(|logits| Ok(self.device.synchronize().map(|()| logits)?)),
                ),
                _ => None,
            };
            match out {
                Some(Ok(logits)) => {
                    // On a GPU whose graphs failed, padding would only cost: they go.
                    if fixed.captures() || self.device.is_cpu() {
                        self.fixed = Some(fixed);
                    }
                    return Ok(logits);
                }
                // Not the capture's doing (that falls back inside): an eager step of the
                // shape failed, out of memory say. The same step runs op by op, as do all
                // from now on; it rewrites any keys and values the failed one wrote.
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "a fixed-shape step failed: steps run op by op from now on");
                }
                None => self.fixed = Some(fixed),
            }
        }
        let quantized = quantized.unwrap_or_else(|| self.quantized_for(rows));
        let dev = &self.device;
        let ids: Vec<u32> = batch.iter().flat_map(|s| s.tokens).copied().collect();
        let slots: Vec<u32> = row_slots(&spans).collect();
        // Only the rows whose logits are wanted reach the head.
        let wanted: Vec<u32> = wanted_rows(batch, &spans).collect();
        let n = wanted.len();
        let inputs = StepInputs {
            ids: Tensor::from_vec(ids, rows, dev)?,
            slots: Tensor::from_vec(slots, (rows, 1), dev)?,
            positions: Tensor::from_vec(
                positions.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                rows,
                dev,
            )?,
            attention: StepAttention::new(
                &self.heads(),
                &spans,
                &self.windows,
                dev,
                self.paged.as_ref(),
            )?,
            logits: match n {
                0 => Logits::Nothing,
                _ => Logits::Rows(Tensor::from_vec(wanted, n, dev)?),
            },
        };
        let logits = self.run(&inputs, quantized)?;
        if logits.is_some() {
            self.device.synchronize()?;
        }
        Ok(logits)
    }

    /// Rejects token ids outside the vocabulary and block ids outside the cache.
    fn check(&self, batch: &[SeqInput], spans: &[RowSpan]) -> Result<()> {
        if let Some(t) = batch
            .iter()
            .flat_map(|s| s.tokens)
            .find(|&&t| t as usize >= self.cfg.vocab)
        {
            return Err(ModelError::Tokenizer(format!(
                "token id {t} is outside the vocabulary"
            )));
        }
        let highest = spans.iter().flat_map(|s| s.blocks).copied().max();
        if highest.is_some_and(|b| b as usize >= self.kv.num_blocks()) {
            return Err(ModelError::Kv("a block id is outside the cache".into()));
        }
        Ok(())
    }

    /// Whether a step of `rows` rows multiplies with the quantized form.
    fn quantized_for(&self, rows: usize) -> bool {
        self.choice
            .as_ref()
            .is_some_and(|c| rows <= c.quantized_up_to)
    }

    /// Whether a step of `rows` rows goes through candle's quantized kernels anywhere:
    /// a projection held only quantized, or both forms when `forced` or the choice says
    /// so. (A file may hold some projections unquantized, the head often.)
    fn multiplies_quantized(&self, rows: usize, forced: Option<bool>) -> bool {
        let quantized = forced.unwrap_or_else(|| self.quantized_for(rows));
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.out, &l.gate_up, &l.down])
            .chain([&self.lm_head])
            .any(|w| w.multiplies_quantized(quantized))
    }

    fn heads(&self) -> Heads {
        Heads {
            heads: self.cfg.heads,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.cfg.attn_scale,
        }
    }

    /// The layers and the head over a step's inputs, all on the device: `[n, vocab]` f32
    /// logits of the wanted rows, or `None` when no row wants them. Reads nothing from
    /// the host, so that a CUDA graph can capture it ([`graphs`]).
    fn run(&self, inputs: &StepInputs, quantized: bool) -> Result<Option<Tensor>> {
        let cfg = &self.cfg;
        let (q_dim, kv_dim, hd) = (cfg.q_dim(), cfg.kv_dim(), cfg.head_dim);
        let rows = inputs.ids.dim(0)?;
        let mut x = self.embed.index_select(&inputs.ids, 0)?;
        if cfg.embed_scale != 1.0 {
            x = (x * f64::from(cfg.embed_scale))?;
        }
        let eps = cfg.rms_eps;
        let rope = self.rope.rows(&inputs.positions)?;
        let rope_local = match &self.rope_local {
            Some(table) => Some(table.rows(&inputs.positions)?),
            None => None,
        };
        for (li, layer) in self.layers.iter().enumerate() {
            let window = cfg.window(li);
            let rope = match (window, &rope_local) {
                (Some(_), Some(local)) => local,
                _ => &rope,
            };
            let h = rms_norm(&x, &layer.attn_norm, eps)?;
            let mut qkv = layer.qkv.forward(&h, quantized)?;
            if let Some(bias) = &layer.qkv_bias {
                qkv = qkv.broadcast_add(bias)?;
            }
            let mut q = qkv.narrow(1, 0, q_dim)?.contiguous()?;
            let mut k = qkv.narrow(1, q_dim, kv_dim)?.contiguous()?;
            let v = qkv.narrow(1, q_dim + kv_dim, kv_dim)?;
            if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                q = rms_norm(&q.reshape((rows * cfg.heads, hd))?, qn, eps)?;
                k = rms_norm(&k.reshape((rows * cfg.kv_heads, hd))?, kn, eps)?;
            }
            let q = rope.apply(cfg.rope_style, &q, rows, cfg.heads, hd)?;
            let k = rope.apply(cfg.rope_style, &k, rows, cfg.kv_heads, hd)?;
            self.kv.write(li, &inputs.slots, &k, &v)?;
            let attn = inputs
                .attention
                .forward(&q, &self.kv, li, window, self.dtype)?;
            let mut o = layer.out.forward(&attn, quantized)?;
            if let Some(norm) = &layer.post_attn_norm {
                o = rms_norm(&o, norm, eps)?;
            }
            x = (x + o)?;

            let h = rms_norm(&x, &layer.ffn_norm, eps)?;
            let gu = layer.gate_up.forward(&h, quantized)?;
            let g = gu.narrow(1, 0, cfg.ffn)?;
            let u = gu.narrow(1, cfg.ffn, cfg.ffn)?;
            let act = match cfg.activation {
                Activation::Silu => (candle_nn::ops::silu(&g)? * u)?,
                Activation::GeluTanh => (g.gelu()? * u)?,
            };
            let mut d = layer.down.forward(&act, quantized)?;
            if let Some(norm) = &layer.post_ffn_norm {
                d = rms_norm(&d, norm, eps)?;
            }
            x = (x + d)?;
        }
        let last = match &inputs.logits {
            Logits::Nothing => return Ok(None),
            Logits::Rows(wanted) => x.index_select(wanted, 0)?,
        };
        let h = rms_norm(&last, &self.norm, eps)?;
        Ok(Some(self.lm_head.forward(&h, quantized)?))
    }
}

/// How many of a sequence's rows get logits: every row when it wants all of them, else
/// its last when it wants logits.
fn logit_rows(s: &SeqInput) -> usize {
    match (s.all_logits, s.wants_logits) {
        (true, _) => s.tokens.len(),
        (false, true) => usize::from(!s.tokens.is_empty()),
        (false, false) => 0,
    }
}

/// The batch rows whose logits are computed, in batch order: the last [`logit_rows`] of
/// each sequence. The order of the logits a step returns, on either path.
fn wanted_rows<'a>(batch: &'a [SeqInput], spans: &'a [RowSpan]) -> impl Iterator<Item = u32> + 'a {
    batch.iter().zip(spans).flat_map(|(s, span)| {
        let end = (span.first_row + span.rows) as u32;
        end - logit_rows(s) as u32..end
    })
}

/// For each row of [`wanted_rows`], whether only its argmax comes back: the one row of a
/// sequence flagged in `argmax_only` (never one that wants every row's logits).
fn argmax_rows(batch: &[SeqInput], argmax_only: &[bool]) -> Vec<bool> {
    batch
        .iter()
        .enumerate()
        .flat_map(|(i, s)| {
            let only = !s.all_logits && argmax_only.get(i) == Some(&true);
            std::iter::repeat_n(only, logit_rows(s))
        })
        .collect()
}

/// What a step's layers read besides the weights and the cache, on the device.
struct StepInputs<'a> {
    /// `[rows]` u32 token ids.
    ids: Tensor,
    /// `[rows, 1]` u32: the cache slot of each row's keys and values.
    slots: Tensor,
    /// `[rows]` u32: each row's position.
    positions: Tensor,
    attention: StepAttention<'a>,
    logits: Logits,
}

/// The rows of a step whose logits are computed.
enum Logits {
    /// `[n]` u32 row indices.
    Rows(Tensor),
    Nothing,
}

/// Rotary cos/sin of every position up to the context length, `[positions, head_dim /
/// 2]` each, computed once on the host as the CPU path computes them, so that a step
/// uploads positions, not angles.
struct RopeTable {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTable {
    fn new(inv_freq: &[f32], context: usize, dev: &Device) -> Result<Self> {
        let all: Vec<usize> = (0..context).collect();
        let t = RopeRows::new(inv_freq, &all);
        let dims = (context, inv_freq.len());
        Ok(Self {
            cos: Tensor::from_vec(t.cos, dims, dev)?,
            sin: Tensor::from_vec(t.sin, dims, dev)?,
        })
    }

    /// The rows of `positions` (`[rows]` u32), as a step's [`Rope`].
    fn rows(&self, positions: &Tensor) -> Result<Rope> {
        let rows = positions.dim(0)?;
        let half = self.cos.dim(1)?;
        let at = |t: &Tensor| -> Result<Tensor> {
            Ok(t.index_select(positions, 0)?.reshape((rows, 1, half))?)
        };
        Ok(Rope {
            cos: at(&self.cos)?,
            sin: at(&self.sin)?,
        })
    }
}

/// A step's rotary cos/sin, `[rows, 1, head_dim / 2]` each.
struct Rope {
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// Rotates every head of `x` (`[rows, heads * head_dim]`), each row by its own
    /// position: the rows are candle's batch dimension, each a sequence of one token.
    fn apply(
        &self,
        style: RopeStyle,
        x: &Tensor,
        rows: usize,
        heads: usize,
        hd: usize,
    ) -> Result<Tensor> {
        let x = x.reshape((rows, heads, 1, hd))?.contiguous()?;
        let y = match style {
            RopeStyle::Half => candle_nn::rotary_emb::rope(&x, &self.cos, &self.sin)?,
            RopeStyle::Interleaved => candle_nn::rotary_emb::rope_i(&x, &self.cos, &self.sin)?,
        };
        Ok(y.reshape((rows, heads * hd))?)
    }
}

/// RMS norm of each row (the last dimension) of `x`, in f32.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f32) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(&x.contiguous()?, weight, eps)?)
}
