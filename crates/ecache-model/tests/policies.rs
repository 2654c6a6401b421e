//! Policies driving the real model: every layer holds `min(len, target(N))` slots after
//! every step, positions stay strictly increasing, and only policies that need scores
//! get them.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_core::{CachePolicy, PolicyConfig, PositionMode};
use ecache_model::{Llava, PromptTokenizer, Session, chat_prompt, splice};

type B = Flex;

#[test]
fn elastic_keeps_every_layer_on_budget_through_generation() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha");
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let ids = tokenizer
        .encode_prompt(&chat_prompt("describe the picture ."), true)
        .unwrap();
    let pixels = burn::tensor::Tensor::<B, 4>::zeros([1, 3, 56, 56], &device);
    let features = model.image_features(pixels);

    let mut elastic_config = PolicyConfig::new("elastic", 0.5);
    elastic_config.set_param("offset", "4").unwrap();
    let elastic = ecache_policy_elastic::build(&elastic_config).unwrap();
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    for (policy, mode) in [
        (&elastic, PositionMode::Absolute),
        (&elastic, PositionMode::Compact),
        (&full, PositionMode::Absolute),
    ] {
        let policy: &dyn CachePolicy = policy.as_ref();
        let (embeds, kinds) = splice(
            &model,
            &ids,
            config.image_token_id,
            Some(features.clone()),
            &device,
        );
        let t = kinds.len();
        let mut session = Session::new(
            &model.decoder,
            &config.text,
            policy,
            mode,
            1,
            &device,
            DType::F32,
        );
        session.prefill(embeds, &kinds).unwrap();
        let mut anchors = Vec::new();
        for step in 0..=12 {
            let n = t + step;
            for cache in session.sequences()[0].caches() {
                let table = cache.table(0).unwrap();
                let expected = n.min(policy.target(n).unwrap_or(usize::MAX));
                assert_eq!(table.len(), expected, "{} step {step}", policy.name());
                assert!(table.positions().windows(2).all(|w| w[0] < w[1]));
                assert_eq!(table.scores().is_some(), policy.needs().tracks_scores());
                if step == 0 {
                    anchors.push(table.positions().to_vec());
                }
            }
            session.step(&[5]).unwrap();
        }
        assert_eq!(session.tokens_seen(), vec![t + 13]);
        if policy.name() == "elastic" {
            assert_eq!(anchors[0].len(), elastic.target(t).unwrap());
        }
    }
}
