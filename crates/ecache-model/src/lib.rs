//! # ecache-model
//!
//! LLaVA-1.5 in burn, generic over the backend: Hugging Face config and weights, the CLIP
//! vision tower, the projector, the LLaMA decoder, prompt handling, and the [`Runner`] that runs the
//! decoder over [`Sequence`]s of any lengths, each under its own [`ecache_core::CachePolicy`]
//! ([`Session`]: a fixed batch under one policy).

pub mod backend;
pub mod clip;
pub mod config;
pub mod error;
pub mod export;
pub mod generate;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod llava;
pub mod preprocess;
pub mod prompt;
pub mod qwen;
pub mod qwen_image;
pub mod qwen_vision;
pub mod resample;
pub mod sequence;
pub mod session;
pub mod weights;

pub use config::LlavaConfig;
pub use error::{ModelError, Result};
pub use generate::{Generation, Sampling, answer_nll, answer_nll_batch, generate, generate_batch};
pub use llava::Llava;
pub use preprocess::ImageProcessor;
pub use prompt::{PromptTokenizer, Role, Turn, chat_prompt, chat_template, splice};
pub use sequence::{Runner, Sequence};
pub use session::Session;
pub use weights::Checkpoint;
