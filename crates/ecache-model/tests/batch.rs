//! A batch of sequences gives each sequence the logits it gets alone, under a policy that
//! evicts, while their caches are managed independently.

mod common;

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_core::PolicyConfig;
use ecache_model::{
    Llava, PromptTokenizer, Sampling, answer_nll, answer_nll_batch, chat_prompt, generate,
    generate_batch, splice,
};

type B = Flex;

#[test]
fn batched_sequences_match_single_runs_under_h2o() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-gqa");
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let ids = tokenizer
        .encode_prompt(&chat_prompt("how many objects are there ?"), true)
        .unwrap();
    let policy = ecache_policy_h2o::build(&PolicyConfig::new("h2o", 0.5)).unwrap();
    // Two different images, same prompt length.
    let prompts: Vec<_> = (0..2)
        .map(|_| {
            let pixels =
                Tensor::<B, 4>::random([1, 3, 42, 42], Distribution::Normal(0.0, 1.0), &device);
            splice(
                &model,
                &ids,
                config.image_token_id,
                Some(model.image_features(pixels)),
                &device,
            )
        })
        .collect();
    let kinds = prompts[0].1.clone();
    let feed = [[3u32, 7, 9, 11], [5, 5, 20, 2]];
    let run = |embeds: Tensor<B, 3>, batch: usize, tokens: &dyn Fn(usize) -> Vec<u32>| {
        let mut session = common::session(&model, &config, policy.as_ref(), batch);
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let prefill = session.prefill(embeds, &kinds).unwrap();
        let [_, t, v] = prefill.dims();
        rows.push(
            prefill
                .narrow(1, t - 1, 1)
                .reshape([batch * v])
                .into_data()
                .into_vec()
                .unwrap(),
        );
        for step in 0..4 {
            rows.push(
                session
                    .step(&tokens(step))
                    .unwrap()
                    .reshape([batch * v])
                    .into_data()
                    .into_vec()
                    .unwrap(),
            );
        }
        let positions: Vec<Vec<usize>> = (0..batch)
            .map(|b| {
                session.sequences()[b]
                    .caches()
                    .iter()
                    .flat_map(|c| c.table(0).unwrap().positions().to_vec())
                    .collect()
            })
            .collect();
        (rows, positions)
    };
    let both = Tensor::cat(vec![prompts[0].0.clone(), prompts[1].0.clone()], 0);
    let (batched, batched_positions) = run(both, 2, &|s| vec![feed[0][s], feed[1][s]]);
    let vocab = config.text.vocab_size;
    for b in 0..2 {
        let (single, single_positions) = run(prompts[b].0.clone(), 1, &|s| vec![feed[b][s]]);
        for (step, (s, m)) in single.iter().zip(&batched).enumerate() {
            let diff = s
                .iter()
                .zip(&m[b * vocab..(b + 1) * vocab])
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(diff < 1e-4, "sequence {b} step {step}: {diff}");
        }
        assert_eq!(
            single_positions[0], batched_positions[b],
            "sequence {b} keeps its own slots"
        );
    }
    assert_ne!(
        batched_positions[0], batched_positions[1],
        "different images, different heavy hitters"
    );
}

#[test]
fn batched_generation_gives_each_prompt_its_own_answer() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha");
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let ids = tokenizer
        .encode_prompt(&chat_prompt("what colour is the square ?"), true)
        .unwrap();
    let policy = ecache_policy_h2o::build(&PolicyConfig::new("h2o", 0.5)).unwrap();
    let size = config.vision.image_size;
    // Seeded pixels: which sequence stops when must not vary between runs.
    let mut rng = ecache_model::generate::SeededRng::new(21);
    let prompts: Vec<_> = (0..3)
        .map(|_| {
            let values: Vec<f32> = (0..3 * size * size)
                .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
                .collect();
            let pixels = Tensor::<B, 4>::from_data(
                burn::tensor::TensorData::new(values, [1, 3, size, size]),
                &device,
            );
            splice(
                &model,
                &ids,
                config.image_token_id,
                Some(model.image_features(pixels)),
                &device,
            )
        })
        .collect();
    let kinds = prompts[0].1.clone();
    let sampling = Sampling {
        max_new_tokens: 10,
        temperature: 0.8,
        top_p: 0.9,
        seed: 11,
    };
    // Token 5 as EOS makes sequences stop at different steps on some draws.
    let eos = [5u32];
    let session = || common::session(&model, &config, policy.as_ref(), 1);
    let mut streamed = vec![Vec::new(); 3];
    let embeds = Tensor::cat(prompts.iter().map(|p| p.0.clone()).collect(), 0);
    let mut batched_session = common::session(&model, &config, policy.as_ref(), 3);
    let batched = generate_batch(
        &mut batched_session,
        embeds,
        &kinds,
        &sampling,
        &eos,
        |b, t| streamed[b].push(t),
    )
    .unwrap();
    let lengths: Vec<usize> = batched.iter().map(|g| g.tokens.len()).collect();
    assert!(
        lengths.iter().any(|&l| l < sampling.max_new_tokens)
            && lengths.iter().any(|&l| l != lengths[0]),
        "some sequences stop before others: {lengths:?}"
    );
    let mut distinct = std::collections::BTreeSet::new();
    for b in 0..3 {
        let alone = generate(
            &mut session(),
            prompts[b].0.clone(),
            &kinds,
            &Sampling {
                seed: sampling.seed + b as u64,
                ..sampling
            },
            &eos,
            |_| {},
        )
        .unwrap();
        assert_eq!(batched[b].tokens, alone.tokens, "sequence {b}");
        assert_eq!(streamed[b], alone.tokens, "sequence {b} streamed");
        assert_eq!(batched[b].slots_per_layer, alone.slots_per_layer);
        distinct.insert(alone.tokens.clone());
    }
    assert!(
        distinct.len() > 1,
        "different images and seeds, different answers"
    );

    // Teacher forcing of ragged answers in one batch scores each as it scores alone.
    let answers = vec![vec![7u32, 9, 11, 4, 8], vec![12u32], vec![6u32, 6, 30]];
    let embeds = Tensor::cat(prompts.iter().map(|p| p.0.clone()).collect(), 0);
    let mut batched_session = common::session(&model, &config, policy.as_ref(), 3);
    let batched = answer_nll_batch(&mut batched_session, embeds, &kinds, &answers).unwrap();
    for b in 0..3 {
        let alone = answer_nll(&mut session(), prompts[b].0.clone(), &kinds, &answers[b]).unwrap();
        assert_eq!(batched[b].len(), answers[b].len());
        for (x, y) in batched[b].iter().zip(&alone) {
            assert!((x - y).abs() < 1e-4, "sequence {b}: {x} vs {y}");
        }
    }
}
