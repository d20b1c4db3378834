//! chorus-model: everything that turns token ids into next-token choices, with a
//! synchronous API and no knowledge of HTTP or async runtimes.
//!
//! - [`gguf`]: read a GGUF file into a [`LoadedModel`] (config, weights, tokenizer, template).
//! - [`hf`]: read an HF-layout directory (safetensors, `config.json`, `tokenizer.json`).
//! - [`arch`]: the supported architectures, each a small module that fills a [`ModelConfig`].
//! - [`load`]: build the [`Transformer`] from either source, checking every tensor's shape.
//! - [`tokenizer`]: a `tokenizers::Tokenizer` rebuilt from GGUF metadata or read from HF files.
//! - [`template`]: the model's own chat template, rendered with minijinja.
//! - [`detok`]: incremental detokenization that never splits a UTF-8 character.
//! - [`stop`]: stop-string matching on streamed text.
//! - [`logits`]: logit bias, repetition penalties and log-probabilities.
//! - [`sampling`]: temperature / top-k / top-p / min-p sampling with a per-request RNG.
//! - [`kv`]: the paged KV cache (block pool) and its allocator.
//! - [`attention`]: attention over a ragged batch that reads each sequence's KV blocks in place.
//! - [`linear`]: a projection in the chosen weight format (`--weights`).
//! - [`packed`]: projection weights in their 4/8-bit blocks, multiplied with f32 activations.
//! - [`int8`]: the same blocks multiplied with 8-bit activations by integer SIMD kernels.
//! - [`strips`]: what both kernels share: stacked shapes, output strips in parallel.
//! - [`math`]: vectorizable `dot` and `exp`.
//! - [`prefetch`]: a hint that a slice is read soon (attention's next KV blocks).
//! - [`threads`]: the compute thread pool the driving thread belongs to.
//! - [`config`]: what the transformer needs to know about an architecture.
//! - [`transformer`]: the shared decoder and its batched forward pass.
//! - [`device`]: the same forward as candle tensor operations on a device (CUDA, or
//!   candle's CPU device where it is checked against the packed path).
//! - [`backend`]: the seam the engine drives: the packed CPU path or the device path.

pub mod arch;
pub mod attention;
pub mod backend;
pub mod config;
pub mod detok;
pub mod device;
pub mod error;
pub mod gguf;
pub mod hf;
pub mod int8;
pub mod kv;
pub mod linear;
pub mod load;
pub mod logits;
pub mod math;
pub mod packed;
// A cache hint, the one `unsafe` outside the kernel modules (`int8/`, `device/cuda/`),
// with a `// SAFETY:` comment.
#[allow(unsafe_code)]
pub mod prefetch;
pub mod sampling;
pub mod stop;
pub mod strips;
pub mod template;
pub mod threads;
pub mod tokenizer;
pub mod transformer;

pub use backend::{Backend, StepRow};
pub use config::{Arch, ModelConfig};
pub use detok::IncrementalDecoder;
pub use device::{DeviceAttention, DeviceModel, DeviceOptions, DeviceWeights};
pub use error::{ModelError, Result};
pub use kv::{BlockAllocator, KvCache};
pub use linear::{Dtype, WeightFormat};
pub use load::LoadedModel;
pub use sampling::{Sampler, SamplingParams};
pub use stop::StopMatcher;
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;
pub use transformer::{SeqInput, Transformer};
