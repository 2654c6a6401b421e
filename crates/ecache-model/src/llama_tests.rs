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
    let tables = rope.tables::<B>(
        &positions,
        &[config.heads, config.kv_heads],
        &device,
        DType::F32,
    );
    let (q, k, v) = layer.qkv(x, &tables);
    let refs: Vec<&[usize]> = positions.iter().map(Vec::as_slice).collect();
    cache.append(k, v, &refs, &vec![SlotKind::Text; t]).unwrap();
    q
}

/// An empty cache for `batch` sequences of the decoder's layer shape.
fn empty_cache(
    config: &LlamaConfig,
    batch: usize,
    capacity: usize,
    tracks_scores: bool,
) -> LayerCache<B> {
    let shape = ecache_core::CacheShape {
        batch,
        kv_heads: config.kv_heads,
        head_dim: config.head_dim,
    };
    LayerCache::new(
        shape,
        capacity,
        tracks_scores,
        DType::F32,
        &Default::default(),
    )
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
            visibility,
            usize::MAX,
        )
        .unwrap();
    // One query row per block.
    let (blocked, blocked_scores) = layer
        .attention_with_scores(q, cache.keys(), cache.values(), mask, visibility, 1)
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
    let mut cache = empty_cache(&config, 2, 4, false);
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

/// A prefill long enough (600 x 600 scores per head) that `flex` takes its blocked kernel
/// (blocks of query rows, exact softmax, keys cut at each block's causal limit; heads in
/// parallel) agrees with attention written out.
#[test]
fn a_long_causal_prefill_agrees_with_attention_written_out() {
    let (decoder, config) = decoder();
    let layer = &decoder.layers()[0];
    let mut cache = empty_cache(&config, 2, 600, false);
    let q = feed(layer, &config, &mut cache, 600);
    check_paths(&cache, layer, q, Visibility::Causal);
}

/// A prompt's attention with its importance in one pass (`flex`'s blocked kernel, which
/// sums each row's probabilities as it computes them) equals attention written out in
/// blocks with the importance accumulated from its probabilities, for a short prompt and
/// one of several blocks, at batch 2 with grouped-query heads.
#[test]
fn causal_attention_with_sums_equals_the_scored_path() {
    let (decoder, config) = decoder();
    let layer = &decoder.layers()[0];
    for t in [9, 300] {
        let mut cache = empty_cache(&config, 2, t, false);
        let q = feed(layer, &config, &mut cache, t);
        assert_eq!(Visibility::of(&cache, t), Visibility::Causal);
        let mask = Visibility::mask::<B>(&cache, t, &Default::default());
        let (written, scores) = layer
            .attention_with_scores(
                q.clone(),
                cache.keys(),
                cache.values(),
                mask,
                Visibility::Causal,
                SCORE_BLOCK_ELEMENTS,
            )
            .unwrap();
        let (fused, sums) =
            B::causal_attention_with_sums(&q, &cache.keys(), &cache.values(), layer.scale())
                .expect("flex has the kernel");
        assert!(max_diff(fused, written) < 1e-5, "t = {t}: attention");
        let scale = scores.clone().abs().max().into_scalar();
        assert!(
            max_diff(sums, scores) < 1e-5 * scale.max(1.0),
            "t = {t}: importance"
        );
    }
}

/// A long chunk appended to a ragged batch (a mask per sequence, 520 x 1,117 scores per
/// head) takes `flex`'s tiled flash kernel, with its mask, and agrees with attention
/// written out.
#[test]
fn a_long_ragged_chunk_agrees_with_attention_written_out() {
    let (decoder, config) = decoder();
    let layer = &decoder.layers()[0];
    let mut cache = empty_cache(&config, 2, 1200, false);
    feed(layer, &config, &mut cache, 600);
    let plan = Plan::new(Decision::remove(600, &[3, 100, 401]), 600, "test", 0).unwrap();
    cache.apply(1, &plan).unwrap();
    let q = feed(layer, &config, &mut cache, 520);
    check_paths(&cache, layer, q, Visibility::Ragged);
}

/// `buffer`'s rows of every sequence put back in slot order (through `cache.rows`).
fn in_slot_order(cache: &LayerCache<B>, buffer: Tensor<B, 4>) -> Tensor<B, 4> {
    let device = Default::default();
    let rows: Vec<Tensor<B, 4>> = (0..cache.shape().batch)
        .map(|b| {
            let rows: Vec<i64> = cache.rows(b).unwrap().iter().map(|&r| r as i64).collect();
            let n = rows.len();
            let index = Tensor::<B, 1, burn::tensor::Int>::from_data(
                burn::tensor::TensorData::new(rows, [n]),
                &device,
            );
            buffer.clone().narrow(0, b, 1).select(2, index)
        })
        .collect();
    Tensor::cat(rows, 0)
}

/// Removals move rows instead of shifting slots, so the buffers are out of slot order:
/// attention over them must equal attention over the same slots in slot order, and the
/// importance rows, taken back to slot order by the cache, must equal the slot-ordered
/// attention's.
#[test]
fn attention_over_moved_rows_equals_attention_in_slot_order() {
    let (decoder, config) = decoder();
    let layer = &decoder.layers()[0];
    let device = Default::default();
    let mut cache = empty_cache(&config, 2, 16, true);
    feed(layer, &config, &mut cache, 12);
    for step in 0..6 {
        let q = feed(layer, &config, &mut cache, 1);
        let mask = Visibility::mask::<B>(&cache, 1, &device);
        let (out, by_row) = layer
            .attention_with_scores(
                q.clone(),
                cache.keys(),
                cache.values(),
                mask.clone(),
                Visibility::of(&cache, 1),
                1,
            )
            .unwrap();
        let keys = in_slot_order(&cache, cache.keys());
        let values = in_slot_order(&cache, cache.values());
        let (reference, by_slot) = layer
            .attention_with_scores(q, keys, values, mask, Visibility::of(&cache, 1), 1)
            .unwrap();
        assert!(max_diff(out, reference) < 1e-5, "step {step}");
        let len = cache.len(0);
        let by_row: Vec<f32> = by_row.into_data().into_vec().unwrap();
        let by_slot: Vec<f32> = by_slot.into_data().into_vec().unwrap();
        for b in 0..2 {
            let before: Vec<f32> = cache.table(b).unwrap().scores().unwrap().to_vec();
            cache
                .accumulate_rows(b, &by_row[b * len..(b + 1) * len])
                .unwrap();
            let after = cache.table(b).unwrap().scores().unwrap();
            for i in 0..len {
                let added = after[i] - before[i];
                assert!((added - by_slot[b * len + i]).abs() < 1e-6, "step {step}");
            }
        }
        // Sequence 0 drops its oldest non-sink slot (a window); sequence 1 a middle one.
        for (b, drop) in [(0, 1), (1, 4 + step % 3)] {
            let plan = Plan::new(Decision::remove(len, &[drop]), len, "test", 0).unwrap();
            cache.apply(b, &plan).unwrap();
        }
    }
    for b in 0..2 {
        let rows = cache.rows(b).unwrap();
        assert!(
            rows.iter().enumerate().any(|(i, &r)| i != r),
            "sequence {b}'s rows were moved"
        );
    }
}
