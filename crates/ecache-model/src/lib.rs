//! # ecache-model
//!
//! Vision-language models in burn, generic over the backend: LLaVA-1.5 (CLIP, projector,
//! LLaMA) and Qwen2-VL / Qwen2.5-VL (their ViTs, a Qwen2 decoder with multimodal RoPE)
//! from Hugging Face configs and weights, behind one interface ([`model`]: a backend-free
//! [`Frontend`] for prompts and images, a [`VisionLanguageModel`] for features and
//! embeddings); the shared decoder and the [`Runner`] that runs it over [`Sequence`]s of
//! any lengths, each under its own [`ecache_core::CachePolicy`] ([`Session`]: a fixed
//! batch under one policy).

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
pub mod model;
pub mod preprocess;
pub mod prompt;
pub mod qwen;
pub mod qwen_image;
pub mod qwen_vision;
pub mod qwen_vl;
pub mod resample;
pub mod sequence;
pub mod session;
pub mod template;
pub mod threads;
pub mod weights;

pub use config::LlavaConfig;
pub use error::{ModelError, Result};
pub use generate::{Generation, Sampling, answer_nll, answer_nll_batch, generate, generate_batch};
pub use llava::Llava;
pub use model::{
    Architecture, Frontend, FrontendOptions, Pixels, Prompt, VisionLanguageModel, image_prompt,
    load_frontend, load_model,
};
pub use preprocess::ImageProcessor;
pub use prompt::{
    Content, PromptTokenizer, Role, Turn, chat_prompt, chat_template, embed_with_images, splice,
};
pub use sequence::{Runner, Sequence};
pub use session::Session;
pub use weights::Checkpoint;
