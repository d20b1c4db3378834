//! The decoder-only transformer every supported architecture shares (llama, qwen2,
//! qwen3, gemma3: [`crate::arch`] says how each differs), with a batched forward pass
//! over a ragged batch: the scheduled tokens of every sequence are concatenated into one
//! `[T, hidden]` matrix, so each projection is one matmul for the whole step, while
//! positions, KV writes and attention are per token over each sequence's own blocks.

use crate::attention::{paged_attention, AttnShape, RowSpan};
use crate::config::{Activation, ModelConfig, RopeStyle};
use crate::error::{ModelError, Result};
use crate::kv::KvCache;
use crate::linear::Linear;
use crate::math::{dot, exp};

/// Weights of one decoder layer; the optional parts exist where the config asks for them.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked into one `[q_dim + 2 * kv_dim, hidden]` matrix.
    pub qkv: Linear,
    /// `[q_dim + 2 * kv_dim]` (`qkv_bias`).
    pub qkv_bias: Option<Vec<f32>>,
    /// `[head_dim]` each (`qk_norm`).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    pub out: Linear,
    /// After attention, before the residual add (`sandwich_norms`).
    pub post_attn_norm: Option<Vec<f32>>,
    pub ffn_norm: Vec<f32>,
    /// gate and up projections stacked into one `[2 * ffn, hidden]` matrix.
    pub gate_up: Linear,
    pub down: Linear,
    /// After the MLP, before the residual add (`sandwich_norms`).
    pub post_ffn_norm: Option<Vec<f32>>,
}

pub struct Transformer {
    cfg: ModelConfig,
    /// `[vocab, hidden]`, dequantized for row lookup.
    embed: Vec<f32>,
    layers: Vec<LayerWeights>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// `[head_dim / 2]` inverse rope frequencies of full-attention and sliding layers.
    inv_freq: Vec<f32>,
    inv_freq_local: Vec<f32>,
}

/// What a [`Transformer`] is made of.
pub(crate) struct TransformerParts {
    pub cfg: ModelConfig,
    pub embed: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    pub norm: Vec<f32>,
    pub lm_head: Linear,
}

/// One sequence's part of a step.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    /// Tokens to run this step (a prefill chunk, or the one token being decoded).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]` in the sequence; everything before it is in the KV cache.
    pub start_pos: usize,
    /// The sequence's block table, covering `start_pos + tokens.len()` positions.
    pub blocks: &'a [u32],
    /// Whether the logits after the last token are wanted (it samples this step).
    pub wants_logits: bool,
    /// The logits after every token of this step are wanted (prompt log-probabilities).
    pub all_logits: bool,
}

impl Transformer {
    pub fn new(
        cfg: ModelConfig,
        embed: Vec<f32>,
        layers: Vec<LayerWeights>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Self {
        let inv_freq = cfg.rope.inv_freqs(cfg.head_dim);
        let inv_freq_local = cfg.rope_local.inv_freqs(cfg.head_dim);
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
            inv_freq_local,
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The config and weights, for a backend that holds them its own way.
    pub(crate) fn into_parts(self) -> TransformerParts {
        TransformerParts {
            cfg: self.cfg,
            embed: self.embed,
            layers: self.layers,
            norm: self.norm,
            lm_head: self.lm_head,
        }
    }

    /// Runs one step. Returns the logits (`[vocab]` each), in batch order: every row of
    /// a sequence with `all_logits`, else the last row of one with `wants_logits`.
    pub fn forward(&self, kv: &mut KvCache, batch: &[SeqInput]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (hidden, q_dim, kv_dim) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let (spans, positions) = row_spans(cfg, batch)?;
        let rows = positions.len();
        if rows == 0 {
            return Ok(Vec::new());
        }

        // [rows, hidden]
        let mut x = Vec::with_capacity(rows * hidden);
        for s in batch {
            for &t in s.tokens {
                let row = self
                    .embed
                    .get(t as usize * hidden..(t as usize + 1) * hidden);
                let row = row.ok_or_else(|| {
                    ModelError::Tokenizer(format!("token id {t} is outside the vocabulary"))
                })?;
                x.extend(row.iter().map(|&v| v * cfg.embed_scale));
            }
        }
        let rope = RopeRows::new(&self.inv_freq, &positions);
        let rope_local = match cfg.windows.iter().any(Option::is_some) {
            true => RopeRows::new(&self.inv_freq_local, &positions),
            false => RopeRows::default(),
        };

        for (li, layer) in self.layers.iter().enumerate() {
            let window = cfg.window(li);
            let rope = if window.is_some() { &rope_local } else { &rope };
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps);
            // [rows, q_dim + 2 * kv_dim]
            let mut qkv = layer.qkv.forward(h, rows)?;
            if let Some(bias) = &layer.qkv_bias {
                for line in qkv.chunks_exact_mut(bias.len()) {
                    add_into(line, bias);
                }
            }
            let width = q_dim + 2 * kv_dim;
            let mut q = Vec::with_capacity(rows * q_dim);
            for span in &spans {
                for r in 0..span.rows {
                    let row = span.first_row + r;
                    let line = &qkv[row * width..(row + 1) * width];
                    let mut qr = line[..q_dim].to_vec();
                    let mut kr = line[q_dim..q_dim + kv_dim].to_vec();
                    let vr = &line[q_dim + kv_dim..];
                    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
                        qr = rms_norm(&qr, qn, cfg.rms_eps);
                        kr = rms_norm(&kr, kn, cfg.rms_eps);
                    }
                    rope.apply(cfg.rope_style, &mut qr, cfg.head_dim, row);
                    rope.apply(cfg.rope_style, &mut kr, cfg.head_dim, row);
                    kv.write(li, span.blocks, span.start_pos + r, &kr, vr);
                    q.extend_from_slice(&qr);
                }
            }
            let attn_shape = AttnShape {
                heads: cfg.heads,
                kv: cfg.kv_shape(),
                scale: cfg.attn_scale,
                window,
            };
            // [rows, q_dim]
            let attn = paged_attention(&attn_shape, &q, kv.layer(li), &spans);
            let mut o = layer.out.forward(attn, rows)?;
            if let Some(norm) = &layer.post_attn_norm {
                o = rms_norm(&o, norm, cfg.rms_eps);
            }
            add_into(&mut x, &o);

            let h = rms_norm(&x, &layer.ffn_norm, cfg.rms_eps);
            // [rows, 2 * ffn]
            let gu = layer.gate_up.forward(h, rows)?;
            let mut act = Vec::with_capacity(rows * cfg.ffn);
            for line in gu.chunks_exact(2 * cfg.ffn) {
                let (g, u) = line.split_at(cfg.ffn);
                match cfg.activation {
                    Activation::Silu => {
                        act.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + exp(-g)) * u))
                    }
                    Activation::GeluTanh => {
                        act.extend(g.iter().zip(u).map(|(&g, &u)| gelu_tanh(g) * u))
                    }
                }
            }
            let mut d = layer.down.forward(act, rows)?;
            if let Some(norm) = &layer.post_ffn_norm {
                d = rms_norm(&d, norm, cfg.rms_eps);
            }
            add_into(&mut x, &d);
        }

        // Only the last row of each sampling sequence reaches the head.
        let mut last = Vec::new();
        for (s, span) in batch.iter().zip(&spans) {
            let rows = match (s.all_logits, s.wants_logits) {
                (true, _) => span.first_row..span.first_row + span.rows,
                (false, true) if span.rows > 0 => {
                    span.first_row + span.rows - 1..span.first_row + span.rows
                }
                _ => 0..0,
            };
            last.extend_from_slice(&x[rows.start * hidden..rows.end * hidden]);
        }
        let n = last.len() / hidden;
        if n == 0 {
            return Ok(Vec::new());
        }
        let h = rms_norm(&last, &self.norm, cfg.rms_eps);
        let logits = self.lm_head.forward(h, n)?;
        Ok(logits
            .chunks_exact(cfg.vocab)
            .map(<[f32]>::to_vec)
            .collect())
    }
}

/// Where each sequence's rows sit in the step, and every row's position; checks that
/// each sequence fits the context and its block table.
pub(crate) fn row_spans<'a>(
    cfg: &ModelConfig,
    batch: &[SeqInput<'a>],
) -> Result<(Vec<RowSpan<'a>>, Vec<usize>)> {
    let mut spans = Vec::with_capacity(batch.len());
    let mut positions = Vec::new();
    for s in batch {
        let end = s.start_pos + s.tokens.len();
        if end > cfg.context_len {
            return Err(ModelError::Kv(format!(
                "position {end} is past the context length {}",
                cfg.context_len
            )));
        }
        if s.blocks.len() * crate::kv::BLOCK_SIZE < end {
            return Err(ModelError::Kv(format!(
                "{} blocks cannot hold {end} positions",
                s.blocks.len()
            )));
        }
        spans.push(RowSpan {
            first_row: positions.len(),
            rows: s.tokens.len(),
            start_pos: s.start_pos,
            blocks: s.blocks,
        });
        positions.extend(s.start_pos..end);
    }
    Ok((spans, positions))
}

/// Rotary cos/sin for every row of a step (`[rows][head_dim / 2]`), computed once and
/// used by every layer of that kind.
#[derive(Default)]
pub(crate) struct RopeRows {
    pub(crate) cos: Vec<f32>,
    pub(crate) sin: Vec<f32>,
    half: usize,
}

impl RopeRows {
    pub(crate) fn new(inv_freq: &[f32], positions: &[usize]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &pos in positions {
            for &f in inv_freq {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self { cos, sin, half }
    }

    /// Rotates every head of `x` (`[heads * head_dim]`) for batch row `row`.
    fn apply(&self, style: RopeStyle, x: &mut [f32], head_dim: usize, row: usize) {
        let half = self.half;
        let (cos, sin) = (
            &self.cos[row * half..][..half],
            &self.sin[row * half..][..half],
        );
        for head in x.chunks_exact_mut(head_dim) {
            for i in 0..half {
                let (ia, ib) = match style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::Half => (i, i + half),
                };
                let (a, b) = (head[ia], head[ib]);
                head[ia] = a * cos[i] - b * sin[i];
                head[ib] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// GELU, tanh approximation (`gelu_pytorch_tanh`).
pub(crate) fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// RMS norm of each row of `x` (rows of `weight.len()`).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(weight.len()) {
        let mean_sq = dot(row, row) / row.len() as f32;
        let scale = 1.0 / (mean_sq + eps).sqrt();
        out.extend(row.iter().zip(weight).map(|(&v, &w)| v * scale * w));
    }
    out
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
