//! The three attention paths of a layer agree: fused (no probabilities), explicit, and
//! explicit over blocks of query rows with importance; under causal, full and ragged
//! visibility, with grouped-query heads.

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_core::{Decision, LayerCache, Plan, SlotKind};

use super::*;
use crate::LlavaConfig;

type B = Flex;

fn decoder() -> (LlamaDecoder<B>, LlamaConfig) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-gqa");
    let config = LlavaConfig::from_path(&dir.join("config.json"))
        .unwrap()
        .text;
    assert!(
        config.heads > config.kv_heads,
        "the fixture is grouped-query"
    );
    (
        LlamaDecoder::init(&config, &Default::default(), DType::F32, 7),
        config,
    )
}

/// Appends `t` random tokens to every sequence of `cache` through layer 0's projections,
/// and returns their queries.
fn feed(
    layer: &LlamaLayer<B>,
    config: &LlamaConfig,
    cache: &mut LayerCache<B>,
    t: usize,
) -> Tensor<B, 4> {
    let device = Default::default();
    let batch = cache.shape().batch;
    let x = Tensor::<B, 3>::random(
        [batch, t, config.hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let positions: Vec<Vec<usize>> = (0..batch)
        .map(|b| {
            let next = cache
                .table(b)
                .unwrap()
                .positions()
                .last()
                .map_or(0, |p| p + 1);
            (next..next + t).collect()
        })
        .collect();
    let rope = Rope::new(config.head_dim, config.rope_theta);
    let (cos, sin) = rope.tables::<B>(&positions, &device, DType::F32);
    let (q, k, v) = layer.qkv(x, (&cos, &sin));
    let refs: Vec<&[usize]> = positions.iter().map(Vec::as_slice).collect();
    cache.append(k, v, &refs, &vec![SlotKind::Text; t]).unwrap();
    q
}

fn max_diff<const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

fn check_paths(
    cache: &LayerCache<B>,
    layer: &LlamaLayer<B>,
    q: Tensor<B, 4>,
    expected: Visibility,
) {
    let t = q.dims()[2];
    let visibility = Visibility::of(cache, t);
    assert_eq!(visibility, expected);
    let device = Default::default();
    let mask = Visibility::mask::<B>(cache, t, &device);
    let (explicit, probs) = layer.attention_explicit(
        q.clone(),
        cache.keys(),
        cache.values(),
        Some(mask.clone()),
        true,
    );
    let fused = layer.attention_fused(q.clone(), cache.keys(), cache.values(), visibility, cache);
    assert!(max_diff(fused, explicit.clone()) < 1e-5);
    if visibility == Visibility::All {
        // The decode path drops the mask when every slot is visible.
        let (unmasked, _) =
            layer.attention_explicit(q.clone(), cache.keys(), cache.values(), None, false);
        assert!(max_diff(unmasked, explicit.clone()) < 1e-6);
    }
    let (whole, scores) = layer
        .attention_with_scores(
            q.clone(),
            cache.keys(),
            cache.values(),
            mask.clone(),
            usize::MAX,
        )
        .unwrap();
    // One query row per block.
    let (blocked, blocked_scores) = layer
        .attention_with_scores(q, cache.keys(), cache.values(), mask, 1)
        .unwrap();
    assert!(max_diff(whole.clone(), explicit) < 1e-6);
    assert!(max_diff(blocked, whole) < 1e-5);
    assert!(max_diff(blocked_scores, scores.clone()) < 1e-5);
    // Every query row's probabilities sum to one, so each sequence's scores sum to `t`,
    // and masked slots get nothing.
    let probs = probs.unwrap();
    let batch = cache.shape().batch;
    let totals: Vec<f32> = scores.clone().sum_dim(1).into_data().into_vec().unwrap();
    for total in totals {
        assert!((total - t as f32).abs() < 1e-4, "{total}");
    }
    let scores: Vec<f32> = scores.into_data().into_vec().unwrap();
    let slots = cache.max_len();
    for b in 0..batch {
        for j in cache.len(b)..slots {
            assert_eq!(scores[b * slots + j], 0.0);
        }
    }
    assert_eq!(probs.dims()[3], slots);
}

#[test]
fn attention_paths_agree_for_prefill_decode_and_ragged_batches() {
    let (decoder, config) = decoder();
    let layer = &decoder.layers()[0];
    let shape = ecache_core::CacheShape {
        batch: 2,
        kv_heads: config.kv_heads,
        head_dim: config.head_dim,
    };
    let mut cache = LayerCache::<B>::new(shape, 4, false, DType::F32, &Default::default());
    let q = feed(layer, &config, &mut cache, 9);
    check_paths(&cache, layer, q, Visibility::Causal);
    let q = feed(layer, &config, &mut cache, 1);
    check_paths(&cache, layer, q, Visibility::All);
    // Sequence 1 loses three slots: the batch is ragged from now on.
    let plan = Plan::new(Decision::remove(10, &[2, 5, 7]), 10, "test", 0).unwrap();
    cache.apply(1, &plan).unwrap();
    let q = feed(layer, &config, &mut cache, 1);
    check_paths(&cache, layer, q, Visibility::Ragged);
    let q = feed(layer, &config, &mut cache, 3);
    check_paths(&cache, layer, q, Visibility::Ragged);
}
