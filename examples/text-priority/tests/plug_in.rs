//! The plug-in path end to end: register beside the built-ins, build from TOML, run on
//! slot tables and on real tensors.

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use ecache_core::trace::{LayerScores, Protected, check_trace, trace_layer};
use ecache_core::{CacheShape, LayerCache, Phase, RunConfig, SlotKind, StepContext};

const CONFIG: &str = r#"
[policy]
name = "text-priority"
budget = 0.5
[policy.params]
sinks = 2
"#;

#[test]
fn registers_without_touching_the_core_and_builds_from_toml() {
    let mut registry = ecache_cli::policies::builtin_registry().unwrap();
    ecache_policy_text_priority::register(&mut registry).unwrap();
    assert!(registry.names().contains(&"text-priority".to_string()));
    let config = RunConfig::from_toml_str(CONFIG, "inline").unwrap();
    let policy = registry.build(&config.policy).unwrap();
    assert_eq!(policy.name(), "text-priority");
    let tr = trace_layer(
        policy.as_ref(),
        30,
        20,
        &LayerScores {
            prefill_scores: vec![0.0; 30],
            decode_scores: vec![],
            ..Default::default()
        },
    )
    .unwrap();
    check_trace(
        policy.as_ref(),
        30,
        &tr,
        Protected {
            sinks: 2,
            protected_tail: 1,
        },
    )
    .unwrap();
}

#[test]
fn image_slots_go_first_on_real_tensors() {
    type B = Flex;
    let device = Default::default();
    let config = RunConfig::from_toml_str(CONFIG, "inline").unwrap();
    let policy = ecache_policy_text_priority::build(&config.policy).unwrap();
    // 2 text, 6 image, 4 text slots; each slot's key holds its position.
    let kinds: Vec<SlotKind> = [
        [SlotKind::Text; 2].as_slice(),
        &[SlotKind::Image; 6],
        &[SlotKind::Text; 4],
    ]
    .concat();
    let positions: Vec<usize> = (0..12).collect();
    let data: Vec<f32> = positions.iter().map(|&p| p as f32).collect();
    let keys = Tensor::<B, 4>::from_data(TensorData::new(data, [1, 1, 12, 1]), &device);
    let mut cache = LayerCache::<B>::new(
        CacheShape {
            batch: 1,
            kv_heads: 1,
            head_dim: 1,
        },
        4,
        false,
        DType::F32,
        &device,
    );
    cache
        .append(keys.clone(), keys, &[&positions], &kinds)
        .unwrap();
    let ctx = StepContext {
        layer: 0,
        layers: 1,
        phase: Phase::Prefill,
        tokens_seen: 12,
        prompt_len: 12,
    };
    let plan = cache
        .table(0)
        .unwrap()
        .decide(policy.as_ref(), ctx)
        .unwrap();
    cache.apply(0, &plan).unwrap();
    // target(12) = 6: all six image slots are removed, every text slot stays.
    assert_eq!(cache.table(0).unwrap().positions(), &[0, 1, 8, 9, 10, 11]);
    // The buffers are in row order; `rows` says which row holds each slot.
    let by_row: Vec<f32> = cache.keys().into_data().into_vec().unwrap();
    let kept: Vec<f32> = cache.rows(0).unwrap().iter().map(|&r| by_row[r]).collect();
    assert_eq!(kept, vec![0.0, 1.0, 8.0, 9.0, 10.0, 11.0]);
}
