//! Set-up shared by the engine's tests: the demo model, its scenes as PNG bytes, and the
//! answers a plain session gives (the reference the engine must reproduce).

#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{DType, Tensor, TensorData};
use ecache_core::{PolicyConfig, PositionMode};
use ecache_engine::{Engine, EngineConfig, ImageInput, Request};
use ecache_model::{
    ImageProcessor, Llava, PromptTokenizer, Sampling, Session, chat_prompt, generate, splice,
};

type B = burn::backend::Flex;

/// The committed demo model.
pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
}

/// Held-out demo scenes `0..n`, encoded as PNG.
pub fn scenes(n: usize) -> Vec<Vec<u8>> {
    ecache_demo::dataset::held_out_pngs(n, 2024)
}

/// An engine on the demo model with `configure` applied to the defaults.
pub fn engine(configure: impl FnOnce(&mut EngineConfig)) -> Engine {
    let mut config = EngineConfig::new(demo_dir());
    configure(&mut config);
    Engine::load(config).unwrap()
}

/// A greedy request about `png` under `policy` (full when `None`).
pub fn ask(png: &[u8], question: &str, policy: Option<PolicyConfig>, max: usize) -> Request {
    let mut r = Request::text(question);
    r.image = Some(ImageInput::Bytes {
        data: png.to_vec(),
        name: "scene.png".into(),
    });
    r.policy = policy;
    r.max_new_tokens = max;
    r
}

/// Elastic Cache at `budget` as the demo run sets it up.
pub fn elastic(budget: f64) -> PolicyConfig {
    let mut p = PolicyConfig::new("elastic", budget);
    p.set_param("protected_tail", "10").unwrap();
    p
}

/// The tokens a plain one-sequence session generates for the same question and image,
/// outside the engine (no scheduler, no batching).
pub fn reference(
    png: &[u8],
    question: &str,
    policy: &PolicyConfig,
    sampling: Sampling,
) -> Vec<u32> {
    let dir = demo_dir();
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let processor = ImageProcessor::load(&dir).unwrap();
    let (pixels, [c, h, w]) = processor
        .decode(png, "scene.png", &Default::default())
        .unwrap();
    let pixels = Tensor::<B, 4>::from_data(TensorData::new(pixels, [1, c, h, w]), &device);
    let ids = tokenizer
        .encode_prompt(&chat_prompt(question), true)
        .unwrap();
    let (embeds, kinds) = splice(
        &model,
        &ids,
        config.image_token_id,
        Some(model.image_features(pixels)),
        &device,
    );
    let policy = ecache_engine::builtin_registry()
        .unwrap()
        .build(policy)
        .unwrap();
    let mut session = Session::new(
        &model.decoder,
        &config.text,
        policy.as_ref(),
        PositionMode::Absolute,
        1,
        &device,
        DType::F32,
    );
    generate(
        &mut session,
        embeds,
        &kinds,
        &sampling,
        &config.text.eos_token_ids,
        |_| {},
    )
    .unwrap()
    .tokens
}
