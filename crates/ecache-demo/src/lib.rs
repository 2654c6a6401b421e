//! The embedded demo: a seeded synthetic-scene task where the answer depends on the image,
//! a word-level tokenizer, and the training of a small LLaVA with burn's autodiff, written
//! out as a Hugging Face model directory that loads like any other checkpoint.

pub mod batch;
pub mod dataset;
pub mod language;
pub mod model_dir;
pub mod scaffold;
pub mod scene;
pub mod train;

/// What can go wrong building or training the demo.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("image {path}: {message}")]
    Image {
        path: std::path::PathBuf,
        message: String,
    },
    #[error(transparent)]
    Model(#[from] ecache_model::ModelError),
    #[error("training option: {0}")]
    Option(String),
}

impl DemoError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}
