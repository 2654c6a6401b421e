//! Policies driving the real model: every layer holds `min(len, target_l(N))` slots after
//! every step (its own target under pyramid budgets), positions stay strictly
//! increasing, and only policies that need scores get them.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_core::{CachePolicy, LayerBudgets, PolicyConfig, PositionMode, TargetAt};
use ecache_model::{Llava, PromptTokenizer, Session, chat_prompt, splice};

type B = Flex;

#[test]
fn every_policy_keeps_every_layer_on_its_budget_through_generation() {
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
    let pyramid =
        |name: &str, build: fn(&PolicyConfig) -> ecache_core::Result<Box<dyn CachePolicy>>| {
            let mut c = PolicyConfig::new(name, 0.5);
            c.layer_budgets = LayerBudgets::Pyramid;
            c.pyramid_beta = 3.0;
            if name == "snapkv" {
                c.set_param("window", "4").unwrap();
            }
            build(&c).unwrap()
        };
    let mut snap = PolicyConfig::new("snapkv", 0.5);
    snap.set_param("window", "4").unwrap();
    let snapkv = ecache_policy_snapkv::build(&snap).unwrap();
    let elastic_pyramid = pyramid("elastic", ecache_policy_elastic::build);
    let local_pyramid = pyramid("local", ecache_policy_local::build);
    let h2o_pyramid = pyramid("h2o", ecache_policy_h2o::build);
    let snapkv_pyramid = pyramid("snapkv", ecache_policy_snapkv::build);
    for (policy, mode) in [
        (&elastic, PositionMode::Absolute),
        (&elastic, PositionMode::Compact),
        (&full, PositionMode::Absolute),
        (&snapkv, PositionMode::Absolute),
        (&elastic_pyramid, PositionMode::Absolute),
        (&local_pyramid, PositionMode::Absolute),
        (&h2o_pyramid, PositionMode::Absolute),
        (&snapkv_pyramid, PositionMode::Absolute),
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
        let caches = session.sequences()[0].caches().len();
        let mut lens = Vec::new();
        for step in 0..=12 {
            let n = t + step;
            for (layer, cache) in session.sequences()[0].caches().iter().enumerate() {
                let table = cache.table(0).unwrap();
                let at = TargetAt {
                    layer,
                    layers: caches,
                    prompt_len: t,
                    tokens_seen: n,
                };
                let expected = n.min(policy.target(at).unwrap_or(usize::MAX));
                assert_eq!(
                    table.len(),
                    expected,
                    "{} layer {layer} step {step}",
                    policy.name()
                );
                if step == 0 {
                    lens.push(table.len());
                }
                assert!(table.positions().windows(2).all(|w| w[0] < w[1]));
                assert_eq!(table.scores().is_some(), policy.needs().tracks_scores());
                if step == 0 {
                    anchors.push(table.positions().to_vec());
                }
            }
            session.step(&[5]).unwrap();
        }
        assert_eq!(session.tokens_seen(), vec![t + 13]);
        if std::ptr::eq(policy, elastic.as_ref()) {
            assert_eq!(
                anchors[0].len(),
                elastic.target(TargetAt::single(t, t)).unwrap()
            );
        }
        // Pyramid budgets: the lower layers kept more than the upper ones.
        if [
            &elastic_pyramid,
            &local_pyramid,
            &h2o_pyramid,
            &snapkv_pyramid,
        ]
        .iter()
        .any(|p| std::ptr::eq(policy, p.as_ref()))
        {
            assert!(lens.first() > lens.last(), "{}: {lens:?}", policy.name());
        }
    }
}
