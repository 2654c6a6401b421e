//! One decode step of one LLaMA layer at LLaVA-1.5-7B shape (hidden 4096, 32 heads,
//! intermediate 11008, f32) with 1,024 cached slots, on the CPU backend: the path the full
//! cache and local take (attention written out, no score row) and the path H2O and Elastic
//! Cache take during decode (the probabilities' head-mean row kept for the policy).
//! Baseline, measured in the same run: the same step over a one-slot cache, which is the
//! layer's weight traffic with almost no attention.
//!
//! Run: `cargo bench -p ecache-model --bench decode_layer`.

use std::time::{Duration, Instant};

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use criterion::{Criterion, criterion_group, criterion_main};
use ecache_core::{CacheShape, Decision, LayerCache, Plan, SlotKind};
use ecache_model::LlavaConfig;
use ecache_model::layers::Rope;
use ecache_model::llama::LlamaDecoder;

type B = Flex;

const SHAPE: &str = include_str!("../../ecache-cli/shapes/llava-1.5-7b.json");

/// A cache holding `slots` random slots at positions `0..slots`.
fn cache(config: &ecache_model::config::LlamaConfig, slots: usize) -> LayerCache<B> {
    let device = Default::default();
    let shape = CacheShape {
        batch: 1,
        kv_heads: config.kv_heads,
        head_dim: config.head_dim,
    };
    let mut cache = LayerCache::new(shape, slots + 64, true, DType::F32, &device);
    let dims = [1, config.kv_heads, slots, config.head_dim];
    let normal = Distribution::Normal(0.0, 1.0);
    let positions: Vec<usize> = (0..slots).collect();
    cache
        .append(
            Tensor::random(dims, normal, &device),
            Tensor::random(dims, normal, &device),
            &[&positions],
            &vec![SlotKind::Text; slots],
        )
        .unwrap();
    cache
}

fn benches(c: &mut Criterion) {
    let mut config = LlavaConfig::from_json(SHAPE, "llava-1.5-7b").unwrap().text;
    config.layers = 1;
    config.vocab_size = 32;
    let device = Default::default();
    let decoder = LlamaDecoder::<B>::init(&config, &device, DType::F32, 0);
    let layer = &decoder.layers()[0];
    let rope = Rope::new(config.head_dim, config.rope_theta);
    let x = Tensor::<B, 3>::random(
        [1, 1, config.hidden],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let mut group = c.benchmark_group("decode_layer_7b");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    for (name, slots, scores) in [
        ("baseline_1_slot", 1, false),
        ("unscored_1024_slots", 1024, false),
        ("scored_1024_slots", 1024, true),
    ] {
        let mut cache = cache(&config, slots);
        let tables = rope.tables::<B>(
            &[vec![slots]],
            &[config.heads, config.kv_heads],
            &device,
            DType::F32,
        );
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let out = layer
                        .forward(
                            x.clone(),
                            &tables,
                            &mut cache,
                            &[&[slots]],
                            &[SlotKind::Text],
                            scores,
                            0,
                        )
                        .unwrap();
                    // Reading one value waits for the step.
                    let _: f32 = out.hidden.slice([0..1, 0..1, 0..1]).into_scalar();
                    total += start.elapsed();
                    // Drop the new slot again (a removal at the end moves nothing).
                    let plan =
                        Plan::new(Decision::remove(slots + 1, &[slots]), slots + 1, "bench", 0)
                            .unwrap();
                    cache.apply(0, &plan).unwrap();
                }
                total
            })
        });
    }
    group.finish();
}

criterion_group!(decode, benches);
criterion_main!(decode);
