//! The model crate's error type.

use thiserror::Error;

pub type Result<T> = std::result::Result<T, ModelError>;

#[derive(Debug, Error)]
pub enum ModelError {
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("GGUF metadata key `{0}` is missing or has the wrong type")]
    Metadata(String),
    #[error("config.json: {0}")]
    Config(String),
    #[error("model files: {0}")]
    Files(String),
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("chat template error: {0}")]
    Template(String),
    #[error("KV cache: {0}")]
    Kv(String),
}

impl From<tokenizers::Error> for ModelError {
    fn from(e: tokenizers::Error) -> Self {
        ModelError::Tokenizer(e.to_string())
    }
}

impl From<minijinja::Error> for ModelError {
    fn from(e: minijinja::Error) -> Self {
        // `{:#}` includes the template location of the failure.
        ModelError::Template(format!("{e:#}"))
    }
}
