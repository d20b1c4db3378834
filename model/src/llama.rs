//! The llama-family transformer (SmolLM2, Llama, and relatives) with a batched forward
//! pass over a ragged batch: the scheduled tokens of every sequence are concatenated into
//! one `[T, hidden]` matrix, so each projection is one matmul for the whole step, while
//! positions, KV writes and attention are per token over each sequence's own blocks.

use crate::attention::{paged_attention, AttnShape, RowSpan};
use crate::error::{ModelError, Result};
use crate::kv::{KvCache, KvShape};
use crate::linear::Linear;
use crate::math::{dot, exp};

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rope_theta: f32,
    pub rms_eps: f32,
    pub context_len: usize,
}

impl LlamaConfig {
    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// Weights of one decoder layer.
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    /// q, k and v projections stacked into one `[q_dim + 2 * kv_dim, hidden]` matrix.
    pub qkv: Linear,
    pub out: Linear,
    pub ffn_norm: Vec<f32>,
    /// gate and up projections stacked into one `[2 * ffn, hidden]` matrix.
    pub gate_up: Linear,
    pub down: Linear,
}

pub struct Llama {
    cfg: LlamaConfig,
    /// `[vocab, hidden]`, dequantized for row lookup.
    embed: Vec<f32>,
    layers: Vec<LayerWeights>,
    norm: Vec<f32>,
    lm_head: Linear,
    /// `[context_len, head_dim / 2]` rope tables.
    cos: Vec<f32>,
    sin: Vec<f32>,
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
}

impl Llama {
    pub fn new(
        cfg: LlamaConfig,
        embed: Vec<f32>,
        layers: Vec<LayerWeights>,
        norm: Vec<f32>,
        lm_head: Linear,
    ) -> Self {
        let half = cfg.head_dim / 2;
        let mut cos = Vec::with_capacity(cfg.context_len * half);
        let mut sin = Vec::with_capacity(cfg.context_len * half);
        for pos in 0..cfg.context_len {
            for i in 0..half {
                let freq = 1.0 / cfg.rope_theta.powf(2.0 * i as f32 / cfg.head_dim as f32);
                let angle = pos as f32 * freq;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            cos,
            sin,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Runs one step. Returns the logits (`[vocab]` each) of the sequences with
    /// `wants_logits`, in batch order.
    pub fn forward(&self, kv: &mut KvCache, batch: &[SeqInput]) -> Result<Vec<Vec<f32>>> {
        let cfg = &self.cfg;
        let (hidden, q_dim, kv_dim) = (cfg.hidden, cfg.q_dim(), cfg.kv_dim());
        let mut spans = Vec::with_capacity(batch.len());
        let mut rows = 0;
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
                first_row: rows,
                rows: s.tokens.len(),
                start_pos: s.start_pos,
                blocks: s.blocks,
            });
            rows += s.tokens.len();
        }
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
                x.extend_from_slice(row);
            }
        }
        let attn_shape = AttnShape {
            heads: cfg.heads,
            kv: cfg.kv_shape(),
        };

        for (li, layer) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &layer.attn_norm, cfg.rms_eps);
            // [rows, q_dim + 2 * kv_dim]
            let qkv = layer.qkv.forward(h, rows)?;
            let width = q_dim + 2 * kv_dim;
            let mut q = Vec::with_capacity(rows * q_dim);
            for span in &spans {
                for r in 0..span.rows {
                    let row = span.first_row + r;
                    let pos = span.start_pos + r;
                    let line = &qkv[row * width..(row + 1) * width];
                    let mut qr = line[..q_dim].to_vec();
                    let mut kr = line[q_dim..q_dim + kv_dim].to_vec();
                    let vr = &line[q_dim + kv_dim..];
                    self.rope(&mut qr, pos);
                    self.rope(&mut kr, pos);
                    kv.write(li, span.blocks, pos, &kr, vr);
                    q.extend_from_slice(&qr);
                }
            }
            // [rows, q_dim]
            let attn = paged_attention(&attn_shape, &q, kv.layer(li), &spans);
            let o = layer.out.forward(attn, rows)?;
            add_into(&mut x, &o);

            let h = rms_norm(&x, &layer.ffn_norm, cfg.rms_eps);
            // [rows, 2 * ffn]
            let gu = layer.gate_up.forward(h, rows)?;
            let mut act = Vec::with_capacity(rows * cfg.ffn);
            for line in gu.chunks_exact(2 * cfg.ffn) {
                let (g, u) = line.split_at(cfg.ffn);
                act.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + exp(-g)) * u));
            }
            let d = layer.down.forward(act, rows)?;
            add_into(&mut x, &d);
        }

        // Only the last row of each sampling sequence reaches the head.
        let mut last = Vec::new();
        for (s, span) in batch.iter().zip(&spans) {
            if s.wants_logits && span.rows > 0 {
                let row = span.first_row + span.rows - 1;
                last.extend_from_slice(&x[row * hidden..(row + 1) * hidden]);
            }
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

    /// Rotary embedding, interleaved pairs (GGUF's llama layout), in place on `[heads * head_dim]`.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..][..half],
            &self.sin[pos * half..][..half],
        );
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }
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
