//! # ecache-engine
//!
//! The engine a Rust program embeds: load a model directory on a backend, submit
//! [`Request`]s (a prompt or chat messages, an image or none, sampling, stop strings, a cache
//! policy of their own), and read each one's tokens as a stream or its whole answer.
//!
//! One scheduler thread owns the model. Requests wait in a bounded FIFO queue until the
//! KV memory they can grow to under their own policy fits under the cap beside the running
//! ones (see [`admission`]); each is then prefilled on its own and joins the running batch,
//! which takes one decode step for all of its sequences at a time (continuous batching).
//! A finished or cancelled request (its [`RequestHandle`] dropped) leaves at the next step
//! and its memory is freed at once.
//!
//! ```no_run
//! use ecache_engine::{Engine, EngineConfig, ImageInput, Request};
//!
//! let engine = Engine::load(EngineConfig::new("models/ecache-demo"))?;
//! let mut request = Request::text("describe the image in detail .");
//! request.image = Some(ImageInput::Path("models/ecache-demo/scene.png".into()));
//! let answer = engine.generate(request)?;
//! println!("{} ({:?})", answer.text, answer.finish_reason);
//! # Ok::<(), ecache_engine::EngineError>(())
//! ```

pub mod admission;
mod engine;
mod prepare;
mod request;
mod scheduler;
pub mod text;

pub use ecache_model::preprocess::ImageLimits;
pub use engine::{Engine, EngineConfig, EngineStats, Estimate, ModelInfo, RequestHandle};
pub use request::{
    Completion, EngineError, Event, FinishReason, ImageInput, Message, Part, Prompt, Request, Role,
    Stats, SubmitError, Task, Usage,
};

/// A registry holding the built-in policies: `elastic`, `h2o`, `snapkv`, `local` and
/// `full`. A new
/// policy crate adds one line here.
pub fn builtin_registry() -> ecache_core::Result<ecache_core::Registry> {
    let mut registry = ecache_core::Registry::new();
    ecache_policy_elastic::register(&mut registry)?;
    ecache_policy_h2o::register(&mut registry)?;
    ecache_policy_snapkv::register(&mut registry)?;
    ecache_policy_local::register(&mut registry)?;
    ecache_policy_full::register(&mut registry)?;
    Ok(registry)
}
