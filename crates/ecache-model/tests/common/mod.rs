//! Setup shared by the model's integration tests.

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_core::{CachePolicy, PositionMode};
use ecache_model::{Llava, LlavaConfig, Session};

/// A session on the CPU in f32 with absolute positions, for `batch` sequences.
pub fn session<'a>(
    model: &'a Llava<Flex>,
    config: &LlavaConfig,
    policy: &'a dyn CachePolicy,
    batch: usize,
) -> Session<'a, Flex> {
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
