//! Errors of model loading and inference; each names the file, tensor or value at fault.

use std::path::{Path, PathBuf};

/// What can go wrong loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is malformed or describes an unsupported model.
    #[error("model config: {0}")]
    Config(String),
    /// Weights are missing, mis-shaped, of an unsupported dtype, unexpected or corrupt.
    #[error("weights: {0}")]
    Weights(String),
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// An image that cannot be read or used.
    #[error("image: {0}")]
    Image(String),
    /// A prompt the model cannot take.
    #[error("prompt: {0}")]
    Prompt(String),
    /// An error from the cache core (policy decisions, cache shapes).
    #[error(transparent)]
    Cache(#[from] ecache_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Shorthand for results carrying [`ModelError`].
pub type Result<T, E = ModelError> = std::result::Result<T, E>;
