//! chorus-model: everything that turns token ids into next-token choices, with a
//! synchronous API and no knowledge of HTTP or async runtimes.
//!
//! - [`gguf`]: read a GGUF file into a [`LoadedModel`] (config, weights, tokenizer, template).
//! - [`tokenizer`]: a `tokenizers::Tokenizer` rebuilt from GGUF metadata.
//! - [`template`]: the model's own chat template, rendered with minijinja.
//! - [`detok`]: incremental detokenization that never splits a UTF-8 character.
//! - [`stop`]: stop-string matching on streamed text.
//! - [`sampling`]: temperature / top-k / top-p / min-p sampling with a per-request RNG.
//! - [`kv`]: the paged KV cache (block pool) and its allocator.
//! - [`attention`]: attention over a ragged batch that reads each sequence's KV blocks in place.
//! - [`linear`]: a projection in the chosen weight format (`--weights`).
//! - [`packed`]: projection weights in their 4/8-bit blocks, multiplied with f32 activations.
//! - [`math`]: vectorizable `dot` and `exp`.
//! - [`threads`]: the compute thread pool the driving thread belongs to.
//! - [`llama`]: the llama-family transformer and its batched forward pass.

pub mod attention;
pub mod detok;
pub mod error;
pub mod gguf;
pub mod kv;
pub mod linear;
pub mod llama;
pub mod math;
pub mod packed;
pub mod sampling;
pub mod stop;
pub mod template;
pub mod threads;
pub mod tokenizer;

pub use detok::IncrementalDecoder;
pub use error::{ModelError, Result};
pub use gguf::LoadedModel;
pub use kv::{BlockAllocator, KvCache};
pub use linear::WeightFormat;
pub use llama::{Llama, LlamaConfig, SeqInput};
pub use sampling::{Sampler, SamplingParams};
pub use stop::StopMatcher;
pub use template::{ChatMessage, ChatTemplate};
pub use tokenizer::Tokenizer;
