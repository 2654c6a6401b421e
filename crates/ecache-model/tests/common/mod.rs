//! Setup shared by the model's integration tests.

use burn::tensor::DType;
use ecache_core::{CachePolicy, PositionMode};
use ecache_model::{Llava, LlavaConfig, Session};

#[allow(dead_code)]
/// A session on the backend's default device in f32 with absolute positions, for `batch`
/// sequences.
pub fn session<'a, B: ecache_model::kernels::KernelBackend>(
    model: &'a Llava<B>,
    config: &LlavaConfig,
    policy: &'a dyn CachePolicy,
    batch: usize,
) -> Session<'a, B> {
    Session::new(
        &model.decoder,
        &config.text,
        policy,
        PositionMode::Absolute,
        batch,
        &Default::default(),
        DType::F32,
    )
}

/// A transformers fixture directory under `tests/fixtures`.
#[allow(dead_code)]
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The backend's random generator is one per process: tests that seed it and draw from it
/// hold this lock, so that a test running beside them cannot draw in between.
#[allow(dead_code)]
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}
