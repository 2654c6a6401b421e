//! The cache-free causal forward (the training path) agrees with the cached prefill, which
//! the parity tests tie to transformers; random initialisation follows its rules.

mod common;

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_core::PolicyConfig;
use ecache_model::layers::Rope;
use ecache_model::{Llava, LlavaConfig, PromptTokenizer, chat_prompt, splice};

type B = Flex;

#[test]
fn causal_forward_matches_the_cached_prefill_for_a_batch() {
    let _rng = common::rng_lock();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-gqa");
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let ids = tokenizer
        .encode_prompt(&chat_prompt("how many objects are there ?"), true)
        .unwrap();
    let size = config.vision.image_size;
    let prompts: Vec<_> = (0..2)
        .map(|_| {
            let pixels =
                Tensor::<B, 4>::random([1, 3, size, size], Distribution::Normal(0.0, 1.0), &device);
            let features = model.image_features(pixels);
            splice(&model, &ids, config.image_token_id, Some(features), &device)
        })
        .collect();
    let embeds = Tensor::cat(vec![prompts[0].0.clone(), prompts[1].0.clone()], 0);
    let rope = Rope::new(config.text.head_dim, config.text.rope_theta);
    let causal = model.decoder.forward_causal(embeds.clone(), &rope);
    let policy = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    let mut session = common::session(&model, &config, policy.as_ref(), 2);
    let cached = session.prefill(embeds, &prompts[0].1).unwrap();
    assert_eq!(causal.dims(), cached.dims());
    let diff: f32 = (causal - cached).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
}

#[test]
fn random_init_fills_every_parameter_by_the_rules() {
    let _rng = common::rng_lock();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha");
    let config = LlavaConfig::from_path(&dir.join("config.json")).unwrap();
    let device = Default::default();
    let a = Llava::<B>::init(&config, &device, DType::F32, 3);
    let b = Llava::<B>::init(&config, &device, DType::F32, 3);
    let c = Llava::<B>::init(&config, &device, DType::F32, 4);
    let pixels = Tensor::<B, 4>::ones(
        [1, 3, config.vision.image_size, config.vision.image_size],
        &device,
    );
    let fa: Vec<f32> = a
        .image_features(pixels.clone())
        .into_data()
        .into_vec()
        .unwrap();
    let fb: Vec<f32> = b
        .image_features(pixels.clone())
        .into_data()
        .into_vec()
        .unwrap();
    let fc: Vec<f32> = c.image_features(pixels).into_data().into_vec().unwrap();
    assert_eq!(fa, fb, "same seed, same weights");
    assert_ne!(fa, fc, "another seed, other weights");
    assert!(fa.iter().all(|x| x.is_finite()));
}

#[test]
fn an_exported_model_loads_back_identically() {
    let _rng = common::rng_lock();
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha");
    let dir = std::env::temp_dir().join(format!("ecache-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut hf: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    hf["vision_feature_layer"] = serde_json::json!(-1);
    std::fs::write(dir.join("config.json"), hf.to_string()).unwrap();
    let config = LlavaConfig::from_path(&dir.join("config.json")).unwrap();
    let device = Default::default();
    let model = Llava::<B>::init(&config, &device, DType::F32, 9);
    let exported = model.export();
    assert!(
        exported
            .names()
            .any(|n| n == "language_model.model.layers.0.self_attn.q_proj.weight")
    );
    exported.save(&dir.join("model.safetensors")).unwrap();
    // Loading checks that every tensor is consumed and every parameter found.
    let (back, _) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let size = config.vision.image_size;
    let pixels =
        Tensor::<B, 4>::random([1, 3, size, size], Distribution::Normal(0.0, 1.0), &device);
    let a = model.image_features(pixels.clone());
    let b = back.image_features(pixels);
    assert_eq!(
        a.clone().into_data().to_vec::<f32>().unwrap(),
        b.into_data().to_vec::<f32>().unwrap()
    );
    let rope = Rope::new(config.text.head_dim, config.text.rope_theta);
    let la = model.decoder.forward_causal(a.clone(), &rope);
    let lb = back.decoder.forward_causal(a, &rope);
    assert_eq!(
        la.into_data().to_vec::<f32>().unwrap(),
        lb.into_data().to_vec::<f32>().unwrap()
    );
    std::fs::remove_dir_all(&dir).ok();
}
