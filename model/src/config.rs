//! What the shared transformer needs to know about an architecture: shapes plus the few
//! switches where the supported families differ. Each architecture module in
//! [`crate::arch`] fills one from a GGUF header or an HF `config.json`.

use crate::kv::KvShape;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma3 => "gemma3",
        }
    }
}

/// Which dimensions rotary embedding pairs up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// `(2i, 2i + 1)`: GGUF llama files, whose q/k rows were permuted at conversion.
    Interleaved,
    /// `(i, i + head_dim / 2)`: HF checkpoints, and GGUF files of the other families.
    Half,
}

/// Rotary frequencies for one kind of layer.
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub theta: f32,
    /// Divides each frequency (`head_dim / 2` of them); empty means none. Llama 3's
    /// frequency-dependent scaling and linear scaling both come down to this.
    pub freq_divisors: Vec<f32>,
}

impl Rope {
    pub fn plain(theta: f32) -> Self {
        Self {
            theta,
            freq_divisors: Vec::new(),
        }
    }

    /// The `head_dim / 2` inverse frequencies.
    pub fn inv_freqs(&self, head_dim: usize) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let f = 1.0 / self.theta.powf(2.0 * i as f32 / head_dim as f32);
                f / self.freq_divisors.get(i).copied().unwrap_or(1.0)
            })
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu(gate) * up` (llama, qwen).
    Silu,
    /// `gelu_tanh(gate) * up` (gemma).
    GeluTanh,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub ffn: usize,
    pub vocab: usize,
    pub rms_eps: f32,
    pub context_len: usize,
    pub rope_style: RopeStyle,
    /// Rope of full-attention layers.
    pub rope: Rope,
    /// Rope of sliding-window layers (Gemma 3 uses a lower base there).
    pub rope_local: Rope,
    pub activation: Activation,
    /// Multiplies the embedding rows (Gemma: `sqrt(hidden)`); 1 elsewhere.
    pub embed_scale: f32,
    /// Multiplies `q · k` (usually `1 / sqrt(head_dim)`).
    pub attn_scale: f32,
    /// Per layer: `Some(w)` attends to the last `w` positions only.
    pub windows: Vec<Option<usize>>,
    /// q/k/v projections carry a bias (Qwen2).
    pub qkv_bias: bool,
    /// Per-head RMS norm of q and k before rope (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// RMS norms after attention and after the MLP, before the residual add (Gemma 3).
    pub sandwich_norms: bool,
}

impl ModelConfig {
    /// Context positions whose attention costs about as much as computing one token: a
    /// token's projections and MLP take `hidden × (2q + 2kv) + 3 × hidden × ffn`
    /// multiply-adds a layer, attending to one earlier position `2q` (scores and values),
    /// and attention runs at about half the matrix products' rate on the CPU (measured:
    /// a 128-token turn after 2,048 tokens of history costs twice a fresh one).
    pub fn attention_positions_per_token(&self) -> usize {
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        let per_token = self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.ffn;
        (per_token / (2 * q) / 2).max(1)
    }

    pub fn kv_shape(&self) -> KvShape {
        KvShape {
            layers: self.layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    pub fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// The sliding window of layer `layer`, if it has one.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.windows.get(layer).copied().flatten()
    }

    /// The shape checks every architecture shares.
    pub fn validate(&self) -> crate::Result<()> {
        let ok = self.layers > 0
            && self.heads > 0
            && self.kv_heads > 0
            && self.heads.is_multiple_of(self.kv_heads)
            && self.head_dim > 0
            && self.head_dim.is_multiple_of(2)
            && self.windows.len() == self.layers;
        if ok {
            Ok(())
        } else {
            Err(crate::ModelError::Unsupported(format!(
                "attention shape: {} layers, {} heads, {} kv heads, head dim {}",
                self.layers, self.heads, self.kv_heads, self.head_dim
            )))
        }
    }
}
