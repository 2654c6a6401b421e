//! Ragged batches: sequences of different prompt lengths (with and without an image) join a
//! batch that is already decoding, step together and leave at different steps; each one's
//! logits at every step equal those of its run alone, under every built-in policy, on both
//! transformers fixtures.

mod common;

use burn::tensor::{DType, Tensor, TensorData};
use ecache_core::{CachePolicy, PolicyConfig, PositionMode, SlotKind};
use ecache_model::{Llava, LlavaConfig, PromptTokenizer, Runner, Sequence, chat_prompt, splice};

type B = burn::backend::Flex;

/// One sequence of the scenario: its prompt, the step at which it joins, what it is fed.
struct Plan {
    embeds: Tensor<B, 3>,
    kinds: Vec<SlotKind>,
    joins_at: usize,
    feed: Vec<u32>,
}

/// Three prompts of different lengths: an image and a short question, text alone, an image
/// and a long question. They join at steps 0, 1 and 3 and are fed 7, 3 and 5 tokens, so
/// they leave at steps 7, 4 and 8.
fn plans(model: &Llava<B>, config: &LlavaConfig, dir: &std::path::Path) -> Vec<Plan> {
    let device = Default::default();
    let tokenizer = PromptTokenizer::load(dir, config.image_token_id).unwrap();
    let size = config.vision.image_size;
    let mut rng = ecache_model::generate::SeededRng::new(5);
    let mut pixels = || {
        let values: Vec<f32> = (0..3 * size * size)
            .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
            .collect();
        Tensor::<B, 4>::from_data(TensorData::new(values, [1, 3, size, size]), &device)
    };
    let prompts = [
        (Some(pixels()), chat_prompt("how many ?")),
        (
            None,
            "USER: what is the colour of the square ? ASSISTANT:".to_string(),
        ),
        (
            Some(pixels()),
            chat_prompt("where is the small circle and what colour is it ?"),
        ),
    ];
    let joins = [0, 1, 3];
    let feeds = [
        vec![3u32, 7, 9, 11, 4, 8, 2],
        vec![5u32, 5, 20],
        vec![6u32, 12, 7, 7, 30],
    ];
    prompts
        .into_iter()
        .zip(joins)
        .zip(feeds)
        .map(|(((pixels, prompt), joins_at), feed)| {
            let ids = tokenizer.encode_prompt(&prompt, pixels.is_some()).unwrap();
            let features = pixels.map(|p| model.image_features(p));
            let (embeds, kinds) = splice(model, &ids, config.image_token_id, features, &device);
            Plan {
                embeds,
                kinds,
                joins_at,
                feed,
            }
        })
        .collect()
}

/// The largest absolute difference between two rows.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn host(logits: Tensor<B, 2>) -> Vec<Vec<f32>> {
    let v = logits.dims()[1];
    let flat: Vec<f32> = logits.into_data().into_vec().unwrap();
    flat.chunks(v).map(<[f32]>::to_vec).collect()
}

/// Logits rows of one sequence (prefill, then one per fed token) and its final slot
/// positions per layer.
type Trace = (Vec<Vec<f32>>, Vec<Vec<usize>>);

/// Runs the plans in one ragged batch: at each step, sequences due to join are prefilled,
/// then every sequence with a token left is fed it; a sequence leaves after its last feed.
fn together(
    runner: &Runner<'_, B>,
    config: &LlavaConfig,
    policy: &dyn CachePolicy,
    plans: &[Plan],
) -> Vec<Trace> {
    let device = Default::default();
    let mut traces: Vec<Trace> = plans.iter().map(|_| (Vec::new(), Vec::new())).collect();
    let mut live: Vec<(usize, Sequence<B>, usize)> = Vec::new(); // (plan, state, fed)
    let last = plans
        .iter()
        .map(|p| p.joins_at + p.feed.len())
        .max()
        .unwrap();
    for step in 0..=last {
        for (i, plan) in plans.iter().enumerate().filter(|(_, p)| p.joins_at == step) {
            let mut seq = Sequence::new(
                &config.text,
                policy,
                PositionMode::Absolute,
                &device,
                DType::F32,
            );
            let logits = runner
                .prefill_last(&mut seq, policy, plan.embeds.clone(), &plan.kinds)
                .unwrap();
            traces[i].0.extend(host(logits));
            live.push((i, seq, 0));
        }
        if live.is_empty() {
            continue;
        }
        let tokens: Vec<u32> = live
            .iter()
            .map(|(i, _, fed)| plans[*i].feed[*fed])
            .collect();
        let mut batch: Vec<(&mut Sequence<B>, &dyn CachePolicy)> =
            live.iter_mut().map(|(_, s, _)| (s, policy)).collect();
        let rows = host(runner.decode(&mut batch, &tokens).unwrap());
        for ((i, _, fed), row) in live.iter_mut().zip(rows) {
            traces[*i].0.push(row);
            *fed += 1;
        }
        // Leaving: the finished sequences' caches are dropped here.
        let (done, running): (Vec<_>, Vec<_>) = live
            .into_iter()
            .partition(|(i, _, fed)| *fed == plans[*i].feed.len());
        for (i, seq, _) in done {
            traces[i].1 = positions(&seq);
        }
        live = running;
    }
    traces
}

fn positions(seq: &Sequence<B>) -> Vec<Vec<usize>> {
    seq.caches()
        .iter()
        .map(|c| c.table(0).unwrap().positions().to_vec())
        .collect()
}

/// One plan on its own.
fn alone(
    runner: &Runner<'_, B>,
    config: &LlavaConfig,
    policy: &dyn CachePolicy,
    plan: &Plan,
) -> Trace {
    let device = Default::default();
    let mut seq = Sequence::new(
        &config.text,
        policy,
        PositionMode::Absolute,
        &device,
        DType::F32,
    );
    let mut rows = host(
        runner
            .prefill_last(&mut seq, policy, plan.embeds.clone(), &plan.kinds)
            .unwrap(),
    );
    for &token in &plan.feed {
        rows.extend(host(
            runner.decode(&mut [(&mut seq, policy)], &[token]).unwrap(),
        ));
    }
    (rows, positions(&seq))
}

fn policies() -> Vec<Box<dyn CachePolicy>> {
    let mut elastic = PolicyConfig::new("elastic", 0.5);
    elastic.set_param("offset", "2").unwrap();
    vec![
        ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap(),
        ecache_policy_local::build(&PolicyConfig::new("local", 0.5)).unwrap(),
        ecache_policy_h2o::build(&PolicyConfig::new("h2o", 0.5)).unwrap(),
        ecache_policy_elastic::build(&elastic).unwrap(),
    ]
}

fn check(fixture: &str, policy_index: usize) {
    let dir = common::fixture(fixture);
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let plans = plans(&model, &config, &dir);
    let lengths: Vec<usize> = plans.iter().map(|p| p.kinds.len()).collect();
    assert!(
        lengths[0] != lengths[1] && lengths[1] != lengths[2] && lengths[0] != lengths[2],
        "{lengths:?}"
    );
    let runner = Runner::new(&model.decoder, &config.text, &device);
    let policy = policies().remove(policy_index);
    let batched = together(&runner, &config, policy.as_ref(), &plans);
    for (i, plan) in plans.iter().enumerate() {
        let (rows, held) = alone(&runner, &config, policy.as_ref(), plan);
        assert_eq!(rows.len(), plan.feed.len() + 1);
        assert_eq!(batched[i].0.len(), rows.len(), "sequence {i}");
        for (step, (a, b)) in rows.iter().zip(&batched[i].0).enumerate() {
            let diff = max_diff(a, b);
            assert!(
                diff < 1e-4,
                "{fixture} {} sequence {i} row {step}: {diff}",
                policy.name()
            );
        }
        assert_eq!(held, batched[i].1, "{} sequence {i} slots", policy.name());
        if policy.name() != "full" {
            let n = lengths[i] + plan.feed.len();
            assert!(
                held.iter().all(|l| l.len() < n),
                "{} evicted",
                policy.name()
            );
        }
    }
}

#[test]
fn ragged_batches_match_single_runs_under_full() {
    check("tiny-llava-mha", 0);
    check("tiny-llava-gqa", 0);
}

#[test]
fn ragged_batches_match_single_runs_under_local() {
    check("tiny-llava-mha", 1);
    check("tiny-llava-gqa", 1);
}

#[test]
fn ragged_batches_match_single_runs_under_h2o() {
    check("tiny-llava-mha", 2);
    check("tiny-llava-gqa", 2);
}

#[test]
fn ragged_batches_match_single_runs_under_elastic() {
    check("tiny-llava-mha", 3);
    check("tiny-llava-gqa", 3);
}

/// Sequences under different policies share a step: each gets what it gets alone.
#[test]
fn mixed_policies_in_one_batch_match_single_runs() {
    let dir = common::fixture("tiny-llava-gqa");
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let plans = plans(&model, &config, &dir);
    let runner = Runner::new(&model.decoder, &config.text, &device);
    let policies = policies();
    let chosen: Vec<&dyn CachePolicy> = vec![
        policies[3].as_ref(),
        policies[0].as_ref(),
        policies[2].as_ref(),
    ];
    let mut seqs: Vec<Sequence<B>> = plans
        .iter()
        .zip(&chosen)
        .map(|(_, p)| {
            Sequence::new(
                &config.text,
                *p,
                PositionMode::Absolute,
                &device,
                DType::F32,
            )
        })
        .collect();
    for ((seq, plan), policy) in seqs.iter_mut().zip(&plans).zip(&chosen) {
        runner
            .prefill_last(seq, *policy, plan.embeds.clone(), &plan.kinds)
            .unwrap();
    }
    let tokens: Vec<u32> = plans.iter().map(|p| p.feed[0]).collect();
    let mut batch: Vec<(&mut Sequence<B>, &dyn CachePolicy)> =
        seqs.iter_mut().zip(&chosen).map(|(s, p)| (s, *p)).collect();
    let rows = host(runner.decode(&mut batch, &tokens).unwrap());
    for (i, plan) in plans.iter().enumerate() {
        let single = Plan {
            embeds: plan.embeds.clone(),
            kinds: plan.kinds.clone(),
            joins_at: 0,
            feed: vec![plan.feed[0]],
        };
        let (alone_rows, held) = alone(&runner, &config, chosen[i], &single);
        let diff = max_diff(&alone_rows[1], &rows[i]);
        assert!(
            diff < 1e-4,
            "sequence {i} under {}: {diff}",
            chosen[i].name()
        );
        assert_eq!(held, positions(&seqs[i]), "sequence {i}");
    }
}
