//! Cache operations for one decoder layer of LLaVA-1.5-7B shape (32 KV heads, head_dim 128,
//! 1,024 prompt slots, f32) on the CPU backend. Every figure is compared with `baseline`,
//! one copy of the layer's keys and values measured in the same run.
//!
//! Run: `cargo bench -p ecache-core --bench cache_ops`.

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ecache_core::{
    Budget, CachePolicy, CacheShape, Decision, ImportanceAccumulator, LayerCache, LayerView, Needs,
    Phase, Plan, SlotKind, StepContext,
};

type B = Flex;

const HEADS: usize = 32;
const DIM: usize = 128;
const PROMPT: usize = 1024;

struct Fixture {
    keys: Tensor<B, 4>,
    values: Tensor<B, 4>,
    scores: Vec<f32>,
}

fn fixture(len: usize) -> Fixture {
    let device = Default::default();
    let normal = Distribution::Normal(0.0, 1.0);
    let scores: Vec<f32> = (0..len).map(|i| ((i * 7919) % 1009) as f32).collect();
    Fixture {
        keys: Tensor::random([1, HEADS, len, DIM], normal, &device),
        values: Tensor::random([1, HEADS, len, DIM], normal, &device),
        scores,
    }
}

/// A fresh, uniquely owned cache of `batch` sequences, each holding an equal share of the
/// fixture's slots (built outside the timing).
fn cache(f: &Fixture, batch: usize) -> LayerCache<B> {
    let len = f.keys.dims()[2] / batch;
    let shape = CacheShape {
        batch,
        kv_heads: HEADS,
        head_dim: DIM,
    };
    let mut cache = LayerCache::new(shape, len + 1, true, DType::F32, &Default::default());
    let positions: Vec<usize> = (0..len).collect();
    let rows = |t: &Tensor<B, 4>| t.clone().reshape([batch, len, HEADS, DIM]).swap_dims(1, 2);
    cache
        .append(
            rows(&f.keys),
            rows(&f.values),
            &vec![&positions[..]; batch],
            &vec![SlotKind::Image; len],
        )
        .unwrap();
    for seq in 0..batch {
        cache
            .table_mut(seq)
            .unwrap()
            .accumulate(&f.scores[..len])
            .unwrap();
    }
    cache
}

/// Waits for the backend: reading one element forces every queued operation.
fn sync(cache: &LayerCache<B>) {
    let _ = cache.keys().narrow(2, 0, 1).into_data();
    let _ = cache.values().narrow(2, 0, 1).into_data();
}

/// Elastic's prefill decision, built here to avoid a dependency on the policy crate.
struct ElasticPrefill(Budget);

impl CachePolicy for ElasticPrefill {
    fn name(&self) -> &str {
        "elastic-prefill"
    }
    fn needs(&self) -> Needs {
        Needs {
            prefill_importance: true,
            ..Needs::default()
        }
    }
    fn decide(&self, view: &LayerView<'_>) -> Decision {
        use ecache_core::selection::{TieBreak, nearest_anchor, top_k};
        let len = view.len();
        let k = self.0.target(len) - 2;
        let candidates: Vec<usize> = (1..len - 1).collect();
        let anchors = top_k(
            view.importance.unwrap(),
            &candidates,
            k,
            TieBreak::KeepLower,
        );
        let others: Vec<usize> = candidates
            .into_iter()
            .filter(|c| anchors.binary_search(c).is_err())
            .collect();
        Decision::Merge {
            keep: [0]
                .into_iter()
                .chain(anchors.iter().copied())
                .chain([len - 1])
                .collect(),
            into: nearest_anchor(&others, &anchors),
            weighting: ecache_core::MergeWeighting::Mean,
        }
    }
    fn target(&self, at: ecache_core::TargetAt) -> Option<usize> {
        Some(self.0.target(at.tokens_seen))
    }
}

fn prefill_ctx() -> StepContext {
    StepContext {
        layer: 0,
        layers: 1,
        phase: Phase::Prefill,
        tokens_seen: PROMPT,
        prompt_len: PROMPT,
    }
}

/// Times applying `plan` to sequence 0 of a fresh cache from `make` (built outside the
/// timing; the cache is handed back so that freeing its buffers is not timed either).
fn time_apply(b: &mut criterion::Bencher<'_>, make: impl FnMut() -> LayerCache<B>, plan: &Plan) {
    b.iter_batched(
        make,
        |mut c| {
            c.apply(0, plan).unwrap();
            sync(&c);
            c
        },
        BatchSize::LargeInput,
    )
}

fn benches(c: &mut Criterion) {
    let full = fixture(PROMPT);
    let mut group = c.benchmark_group("layer_7b_1024");
    group.sample_size(20);

    group.bench_function("baseline_copy_kv", |b| {
        b.iter_batched(
            || cache(&full, 1),
            |cache| {
                let k = cache.keys() + 0.0;
                let v = cache.values() + 0.0;
                let _ = k.narrow(2, 0, 1).into_data();
                let _ = v.narrow(2, 0, 1).into_data();
            },
            BatchSize::LargeInput,
        )
    });

    for budget in [0.2, 0.5] {
        let policy = ElasticPrefill(Budget::new(budget, 1, 1).unwrap());
        group.bench_function(format!("elastic_prefill_decide_b{budget}"), |b| {
            let c = cache(&full, 1);
            b.iter(|| c.table(0).unwrap().decide(&policy, prefill_ctx()).unwrap())
        });
        let plan = cache(&full, 1)
            .table(0)
            .unwrap()
            .decide(&policy, prefill_ctx())
            .unwrap();
        group.bench_function(format!("elastic_prefill_merge_b{budget}"), |b| {
            time_apply(b, || cache(&full, 1), &plan)
        });
    }

    // A decode step's single removal: elastic at budget 0.2 holds target(N) + 1 slots and
    // removes the one at its truncation point; the worst case removes slot 1 of 1,024.
    let decode = fixture(206);
    for (name, fix, at) in [
        ("elastic_b0.2_at_181", &decode, 181),
        ("worst_1024_at_1", &full, 1),
    ] {
        let len = fix.keys.dims()[2];
        let remove_one = Plan::new(Decision::remove(len, &[at]), len, "bench", 0).unwrap();
        group.bench_function(format!("decode_remove_{name}"), |b| {
            time_apply(b, || cache(fix, 1), &remove_one)
        });
    }
    let scattered =
        Plan::new(Decision::remove(PROMPT, &[1, 500, 900]), PROMPT, "bench", 0).unwrap();
    group.bench_function("decode_remove_three_scattered_1024", |b| {
        time_apply(b, || cache(&full, 1), &scattered)
    });

    // The same removal in sequence 0 of a batch of four (decode at batch 4 is where the
    // policies lost to the full cache, docs/performance.md): its cost should be that of
    // one sequence's rows, not of the whole batch's buffer.
    let batch4 = fixture(4 * 206);
    for (name, at) in [("elastic_b0.2_at_181", 181), ("worst_at_1", 1)] {
        let remove_one = Plan::new(Decision::remove(206, &[at]), 206, "bench", 0).unwrap();
        group.bench_function(format!("decode_remove_{name}_batch4"), |b| {
            time_apply(b, || cache(&batch4, 4), &remove_one)
        });
    }

    // Prefill importance from [1, 32, 1024, 1024] probabilities in blocks of 128 queries.
    let device = Default::default();
    let probs = Tensor::<B, 4>::random(
        [1, HEADS, PROMPT, PROMPT],
        Distribution::Uniform(0.0, 1.0),
        &device,
    );
    group.bench_function("importance_blockwise_128", |b| {
        b.iter(|| {
            let mut acc = ImportanceAccumulator::new();
            for start in (0..PROMPT).step_by(128) {
                acc.add_block(probs.clone().narrow(2, start, 128)).unwrap();
            }
            acc.into_rows(&[PROMPT]).unwrap()
        })
    });
    group.finish();
}

criterion_group!(cache_ops, benches);
criterion_main!(cache_ops);
