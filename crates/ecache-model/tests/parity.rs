//! Numerical parity with transformers on the tiny fixtures (tools/make_fixtures.py):
//! vision features and prompt logits within 1e-4, identical greedy tokens, perplexity
//! within 1e-5 relative, all in f32 on the CPU backend.

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Tensor, TensorData};
use ecache_core::{CachePolicy, PolicyConfig, PositionMode};
use ecache_model::{Llava, LlavaConfig, PromptTokenizer, Session, splice};
use safetensors::SafeTensors;

type B = common::AnyBackend;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

struct Expected {
    json: serde_json::Value,
    tensors: Vec<(String, Vec<usize>, Vec<f32>)>,
}

impl Expected {
    fn load(dir: &Path) -> Self {
        let json =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, view)| {
                let data = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                (name, view.shape().to_vec(), data)
            })
            .collect();
        Self { json, tensors }
    }

    fn tensor(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (_, shape, data) = self.tensors.iter().find(|(n, _, _)| n == name).unwrap();
        (shape.clone(), data.clone())
    }

    fn ids(&self, key: &str) -> Vec<u32> {
        self.json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    }
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn full_policy() -> Box<dyn CachePolicy> {
    ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap()
}

struct Loaded {
    model: Llava<B>,
    config: LlavaConfig,
    tokenizer: PromptTokenizer,
    expected: Expected,
    pixels: Tensor<B, 4>,
}

fn load(name: &str) -> Loaded {
    let dir = fixture(name);
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).unwrap();
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    let expected = Expected::load(&dir);
    let (shape, data) = expected.tensor("pixel_values");
    let pixels = Tensor::from_data(TensorData::new(data, shape), &device);
    Loaded {
        model,
        config,
        tokenizer,
        expected,
        pixels,
    }
}

/// Prompt embeddings and kinds for the fixture's prompt.
fn prompt(l: &Loaded) -> (Tensor<B, 3>, Vec<ecache_core::SlotKind>) {
    let ids = l
        .tokenizer
        .encode_prompt(l.expected.json["prompt"].as_str().unwrap(), true)
        .unwrap();
    assert_eq!(ids, l.expected.ids("prompt_ids"), "tokenizer.json parity");
    let features = l.model.image_features(l.pixels.clone());
    splice(
        &l.model,
        &ids,
        l.config.image_token_id,
        Some(features),
        &Default::default(),
    )
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.iter().map(|&x| x as f64 - max - sum.ln()).collect()
}

fn argmax(row: &[f32]) -> u32 {
    row.iter()
        .enumerate()
        .max_by(|a, b| a.1.partial_cmp(b.1).unwrap())
        .unwrap()
        .0 as u32
}

fn check_fixture(name: &str) {
    let l = load(name);

    let (shape, want) = l.expected.tensor("image_features");
    let got: Vec<f32> = l
        .model
        .image_features(l.pixels.clone())
        .into_data()
        .into_vec()
        .unwrap();
    assert_eq!(shape, vec![l.config.image_tokens(), l.config.text.hidden]);
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{name}: image features differ by {diff}");

    let policy = full_policy();
    let (embeds, kinds) = prompt(&l);
    assert_eq!(kinds.len(), l.expected.ids("expanded_ids").len());
    let mut session = common::session(&l.model, &l.config, policy.as_ref(), 1);
    let logits = session.prefill(embeds, &kinds).unwrap();
    let (_, want) = l.expected.tensor("prompt_logits");
    let got: Vec<f32> = logits.clone().into_data().into_vec().unwrap();
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-4, "{name}: prompt logits differ by {diff}");

    // Greedy continuation, 16 tokens, EOS not special (as the fixture recorded it).
    let vocab = l.config.text.vocab_size;
    let mut last: Vec<f32> = got[got.len() - vocab..].to_vec();
    let mut tokens = Vec::new();
    for _ in 0..16 {
        let next = argmax(&last);
        tokens.push(next);
        last = session
            .step(&[next])
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap();
    }
    assert_eq!(
        tokens,
        l.expected.ids("greedy_ids"),
        "{name}: greedy tokens"
    );

    // Teacher-forced perplexity of the answer.
    let answer = l
        .tokenizer
        .encode_answer(l.expected.json["answer"].as_str().unwrap())
        .unwrap();
    assert_eq!(answer, l.expected.ids("answer_ids"));
    let (embeds, kinds) = prompt(&l);
    let mut session = common::session(&l.model, &l.config, policy.as_ref(), 1);
    let logits: Vec<f32> = session
        .prefill(embeds, &kinds)
        .unwrap()
        .into_data()
        .into_vec()
        .unwrap();
    let mut row = logits[logits.len() - vocab..].to_vec();
    let mut nll = 0.0;
    for (i, &a) in answer.iter().enumerate() {
        nll -= log_softmax(&row)[a as usize];
        if i + 1 < answer.len() {
            row = session.step(&[a]).unwrap().into_data().into_vec().unwrap();
        }
    }
    let ppl = (nll / answer.len() as f64).exp();
    let want = l.expected.json["ppl"].as_f64().unwrap();
    assert!(
        ((ppl - want) / want).abs() < 1e-5,
        "{name}: ppl {ppl} vs {want}"
    );
}

#[test]
fn mha_fixture_matches_transformers() {
    check_fixture("tiny-llava-mha");
}

#[test]
fn gqa_sharded_legacy_fixture_matches_transformers() {
    check_fixture("tiny-llava-gqa");
}

/// Policy-level agreement: the engine's teacher-forced PPL under elastic, h2o, local and
/// snapkv (with the fixture's `snapkv_params`) at budget 0.5 against the straightforward
/// spec implementation written on transformers' modules in tools/make_fixtures.py (two
/// independent implementations).
fn check_policies(name: &str) {
    let l = load(name);
    let budget = l.expected.json["policy_budget"].as_f64().unwrap();
    let answer = l.expected.ids("answer_ids");
    for (policy_name, build) in [
        (
            "elastic",
            ecache_policy_elastic::build as ecache_core::PolicyConstructor,
        ),
        ("h2o", ecache_policy_h2o::build),
        ("local", ecache_policy_local::build),
        ("snapkv", ecache_policy_snapkv::build),
    ] {
        let mut config = PolicyConfig::new(policy_name, budget);
        if policy_name == "snapkv" {
            for (key, value) in l.expected.json["snapkv_params"].as_object().unwrap() {
                config.set_param(key, &value.to_string()).unwrap();
            }
        }
        let policy = build(&config).unwrap();
        let (embeds, kinds) = prompt(&l);
        let mut session = common::session(&l.model, &l.config, policy.as_ref(), 1);
        let nll = ecache_model::answer_nll(&mut session, embeds, &kinds, &answer).unwrap();
        let ppl = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
        let want = l.expected.json["policy_ppl"][policy_name].as_f64().unwrap();
        assert!(
            ((ppl - want) / want).abs() < 1e-4,
            "{name} {policy_name}: ppl {ppl} vs spec {want}"
        );
    }
}

#[test]
fn mha_policies_match_the_spec_implementation() {
    check_policies("tiny-llava-mha");
}

#[test]
fn gqa_policies_match_the_spec_implementation() {
    check_policies("tiny-llava-gqa");
}

/// Half precision: weights and activations in f16 and bf16 stay close to transformers' f32
/// logits (softmax and importance are computed in f32 either way), at prefill and over the
/// fixture's 16 greedy tokens fed back (decode steps reading a half-precision cache, against
/// the same steps in f32).
#[test]
fn half_precision_stays_close_to_f32() {
    let dir = fixture("tiny-llava-mha");
    let device = Default::default();
    let expected = Expected::load(&dir);
    let (_, want) = expected.tensor("prompt_logits");
    let greedy = expected.ids("greedy_ids");
    let session_logits = |dtype: DType| -> (Vec<f32>, Vec<Vec<f32>>, usize) {
        let (model, config) = Llava::<B>::load(&dir, &device, dtype).unwrap();
        let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).unwrap();
        let (shape, data) = expected.tensor("pixel_values");
        let pixels = Tensor::<B, 4>::from_data(TensorData::new(data, shape), (&device, dtype));
        let ids = tokenizer
            .encode_prompt(expected.json["prompt"].as_str().unwrap(), true)
            .unwrap();
        let features = model.image_features(pixels);
        let (embeds, kinds) = splice(&model, &ids, config.image_token_id, Some(features), &device);
        let policy = full_policy();
        let mut session = Session::new(
            &model.decoder,
            &config.text,
            policy.as_ref(),
            PositionMode::Absolute,
            1,
            &device,
            dtype,
        );
        let prompt = session.prefill(embeds, &kinds).unwrap().into_data();
        let prompt = prompt.convert::<f32>().into_vec::<f32>().unwrap();
        assert!(session.kv_bytes() > 0);
        let steps = greedy
            .iter()
            .map(|&t| {
                let row = session.step(&[t]).unwrap().into_data();
                row.convert::<f32>().into_vec::<f32>().unwrap()
            })
            .collect();
        (prompt, steps, config.text.vocab_size)
    };
    let (_, steps_f32, _) = session_logits(DType::F32);
    // wgpu has no bf16 (WGSL lacks the type).
    let dtypes: &[(DType, f32)] = if cfg!(all(feature = "wgpu", not(feature = "cuda"))) {
        &[(DType::F16, 0.05)]
    } else {
        &[(DType::F16, 0.05), (DType::BF16, 0.4)]
    };
    for &(dtype, tolerance) in dtypes {
        let (got, steps, vocab) = session_logits(dtype);
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < tolerance,
            "{dtype:?}: prompt logits differ by {diff}"
        );
        assert_eq!(argmax(&got[got.len() - vocab..]), greedy[0], "{dtype:?}");
        for (i, (step, step_f32)) in steps.iter().zip(&steps_f32).enumerate() {
            let diff = max_abs_diff(step, step_f32);
            assert!(
                diff < tolerance,
                "{dtype:?}: logits of step {i} differ from f32's by {diff}"
            );
        }
    }
}
