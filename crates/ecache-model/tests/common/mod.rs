//! Setup shared by the model's integration tests.

use burn::tensor::DType;
use ecache_core::{CachePolicy, PositionMode};
use ecache_model::{Llava, LlavaConfig, Session};

/// The CPU backend, or CUDA when built with `--features cuda` (tools/gpu-check.sh), or
/// wgpu with `--features wgpu` (.ci/run, on Mesa's software Vulkan driver): the backend of
/// the tests that run on any of them.
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
#[allow(dead_code)]
pub type AnyBackend = burn::backend::Flex;
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub type AnyBackend = burn::backend::Cuda;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
#[allow(dead_code)]
pub type AnyBackend = burn::backend::Wgpu;

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

/// A JSON file, parsed.
#[allow(dead_code)]
pub fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// An f32 tensor of a safetensors file's bytes: its shape and values.
#[allow(dead_code)]
pub fn st_f32(bytes: &[u8], name: &str) -> (Vec<usize>, Vec<f32>) {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let view = st.tensor(name).unwrap();
    let values = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (view.shape().to_vec(), values)
}

/// The largest absolute difference between two runs of values of one length.
#[allow(dead_code)]
pub fn max_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared runs differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
