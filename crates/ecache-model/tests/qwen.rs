//! Qwen2-VL against transformers: the image processor (`Qwen2VLImageProcessorPil`) on three
//! pictures that take each branch of `smart_resize` (the grids, and every patch value), and
//! the vision tower's features on the tiny random checkpoint.

use std::path::PathBuf;

use ecache_model::qwen_image::QwenImageProcessor;
use safetensors::SafeTensors;

#[test]
fn patches_and_grids_match_transformers() {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/qwen2-vl-images");
    let processor = QwenImageProcessor::load(&dir).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["wide", "large", "small"] {
        let image = image::open(dir.join(format!("{name}.png"))).unwrap();
        let got = processor.process(&image).unwrap();
        let grid: Vec<usize> = expected["image_grid_thw"][name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(got.grid.to_vec(), grid, "{name}");
        let view = st.tensor(&format!("pixel_values_{name}")).unwrap();
        assert_eq!(view.shape(), [got.rows(), got.row_len], "{name}");
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let max = got
            .patches
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-6, "{name}: max difference {max}");
        assert_eq!(processor.image_tokens(got.grid), got.rows() / 4);
    }
}

/// The vision towers of the tiny random Qwen2-VL and Qwen2.5-VL (windows of 3 x 3 merge
/// groups, padded, and one full-attention block): features within 1e-4 of transformers'
/// (`get_image_features`, the merger's output) for the three pictures, from our own
/// preprocessing.
#[test]
fn vision_features_match_transformers() {
    for fixture in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        vision_features(fixture);
    }
}

fn vision_features(fixture: &str) {
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor, TensorData};
    use ecache_model::layers::Loader;
    use ecache_model::qwen_vision::{HfQwenVisionConfig, QwenVision};
    use ecache_model::weights::Checkpoint;

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = fixtures.join(fixture);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vision: HfQwenVisionConfig =
        serde_json::from_value(config["vision_config"].clone()).unwrap();
    let vision = vision.validate().unwrap();
    let device = Default::default();
    let mut checkpoint = Checkpoint::open(&dir).unwrap();
    let mut loader = Loader::<Flex> {
        checkpoint: &mut checkpoint,
        device: &device,
        dtype: DType::F32,
    };
    let tower = QwenVision::load(&vision, &mut loader).unwrap();
    let processor = QwenImageProcessor::load(&dir).unwrap();
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in ["wide", "large", "small"] {
        let image =
            image::open(fixtures.join("qwen2-vl-images").join(format!("{name}.png"))).unwrap();
        let pixels = processor.process(&image).unwrap();
        let rows = pixels.rows();
        let input = Tensor::<Flex, 2>::from_data(
            TensorData::new(pixels.patches, [rows, pixels.row_len]),
            &device,
        );
        let got: Vec<f32> = tower
            .forward(input, pixels.grid)
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap();
        let view = st.tensor(&format!("features_{name}")).unwrap();
        assert_eq!(view.shape(), [rows / 4, 64], "{name}");
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max <= 1e-4, "{fixture} {name}: max difference {max}");
    }
}

/// The whole tiny Qwen2-VL and Qwen2.5-VL on a prompt with the wide picture, under the
/// full cache: every
/// prompt position's logits, then three tokens fed one at a time, within 1e-4 of
/// transformers' (which places them with `get_rope_index`). The tokens after the prompt
/// continue at the true multimodal position (`rope_deltas`: a mutation that drops it is
/// off by 2.7 at the first new token), and every tensor of the checkpoint is used.
#[test]
fn prompt_and_decode_logits_match_transformers() {
    for fixture in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        prompt_and_decode(fixture);
    }
}

fn prompt_and_decode(fixture: &str) {
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor, TensorData};
    use ecache_core::{PolicyConfig, PositionMode};
    use ecache_model::layers::Loader;
    use ecache_model::llama::LlamaDecoder;
    use ecache_model::qwen::{QwenVlConfig, embed_with_images, mrope_positions};
    use ecache_model::qwen_vision::QwenVision;
    use ecache_model::weights::Checkpoint;
    use ecache_model::{Runner, Sequence};

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = fixtures.join(fixture);
    let config = QwenVlConfig::from_path(&dir.join("config.json")).unwrap();
    let device = Default::default();
    let mut checkpoint = Checkpoint::open(&dir).unwrap();
    let mut loader = Loader::<Flex> {
        checkpoint: &mut checkpoint,
        device: &device,
        dtype: DType::F32,
    };
    let tower = QwenVision::load(&config.vision, &mut loader).unwrap();
    let decoder = LlamaDecoder::load(&config.text, &mut loader).unwrap();
    checkpoint.finish().unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, continuation) = (ids("prompt_ids"), ids("continuation_ids"));
    let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor("logits").unwrap();
    let vocab = view.shape()[1];
    let want: Vec<f32> = view
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let close = |got: &[f32], row: usize| {
        let max = got
            .iter()
            .zip(&want[row * vocab..(row + 1) * vocab])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            max <= 1e-4,
            "{fixture} position {row}: max difference {max}"
        );
    };

    let processor = QwenImageProcessor::load(&dir).unwrap();
    let image = image::open(fixtures.join("qwen2-vl-images/wide.png")).unwrap();
    let pixels = processor.process(&image).unwrap();
    let input = Tensor::<Flex, 2>::from_data(
        TensorData::new(pixels.patches.clone(), [pixels.rows(), pixels.row_len]),
        &device,
    );
    let features = tower.forward(input, pixels.grid).unwrap();
    let (embeds, kinds) = embed_with_images(
        &decoder,
        &prompt,
        config.image_token_id,
        Some(features),
        &device,
    )
    .unwrap();
    let (positions, delta) = mrope_positions(
        &prompt,
        config.image_token_id,
        &[pixels.grid],
        config.vision.merge,
    )
    .unwrap();
    assert_eq!(delta, expected["rope_delta"].as_i64().unwrap());

    let runner = Runner::new(&decoder, &config.text, &device);
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    let mut seq = Sequence::new(
        &config.text,
        full.as_ref(),
        PositionMode::Absolute,
        &device,
        DType::F32,
    );
    let hidden = runner
        .prefill_at(&mut seq, full.as_ref(), embeds, &kinds, Some(&positions))
        .unwrap();
    let logits: Vec<f32> = decoder.head(hidden).into_data().into_vec().unwrap();
    for row in 0..prompt.len() {
        close(&logits[row * vocab..(row + 1) * vocab], row);
    }
    for (k, &token) in continuation.iter().enumerate() {
        let logits: Vec<f32> = runner
            .decode(&mut [(&mut seq, full.as_ref())], &[token])
            .unwrap()
            .into_data()
            .into_vec()
            .unwrap();
        close(&logits, prompt.len() + k);
    }
}

/// Policy-level agreement on both Qwen fixtures: the answer's teacher-forced PPL under
/// the full cache (transformers' own, 1e-5) and under local, h2o, elastic and snapkv at
/// budget 0.5 (the independent spec implementation over transformers' modules in
/// tools/make_qwen_fixtures.py, 1e-4). The decode steps run at the true multimodal
/// positions while the policies remove and merge slots.
#[test]
fn policies_match_the_spec_implementation() {
    for fixture in ["tiny-qwen2-vl", "tiny-qwen2.5-vl"] {
        policies(fixture);
    }
}

fn policies(fixture: &str) {
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor, TensorData};
    use ecache_core::{CachePolicy, PolicyConfig, PositionMode};
    use ecache_model::generate::{nll, rows_of};
    use ecache_model::layers::Loader;
    use ecache_model::llama::LlamaDecoder;
    use ecache_model::qwen::{QwenVlConfig, embed_with_images, mrope_positions};
    use ecache_model::qwen_vision::QwenVision;
    use ecache_model::weights::Checkpoint;
    use ecache_model::{Runner, Sequence};

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = fixtures.join(fixture);
    let config = QwenVlConfig::from_path(&dir.join("config.json")).unwrap();
    let device = Default::default();
    let mut checkpoint = Checkpoint::open(&dir).unwrap();
    let mut loader = Loader::<Flex> {
        checkpoint: &mut checkpoint,
        device: &device,
        dtype: DType::F32,
    };
    let tower = QwenVision::load(&config.vision, &mut loader).unwrap();
    let decoder = LlamaDecoder::load(&config.text, &mut loader).unwrap();
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect()
    };
    let (prompt, answer) = (ids("prompt_ids"), ids("answer_ids"));
    let processor = QwenImageProcessor::load(&dir).unwrap();
    let image = image::open(fixtures.join("qwen2-vl-images/wide.png")).unwrap();
    let pixels = processor.process(&image).unwrap();
    let input = Tensor::<Flex, 2>::from_data(
        TensorData::new(pixels.patches.clone(), [pixels.rows(), pixels.row_len]),
        &device,
    );
    let features = tower.forward(input, pixels.grid).unwrap();
    let (positions, _) = mrope_positions(
        &prompt,
        config.image_token_id,
        &[pixels.grid],
        config.vision.merge,
    )
    .unwrap();
    let runner = Runner::new(&decoder, &config.text, &device);
    let ppl = |policy: &dyn CachePolicy| -> f64 {
        let (embeds, kinds) = embed_with_images(
            &decoder,
            &prompt,
            config.image_token_id,
            Some(features.clone()),
            &device,
        )
        .unwrap();
        let mut seq = Sequence::new(
            &config.text,
            policy,
            PositionMode::Absolute,
            &device,
            DType::F32,
        );
        let hidden = runner
            .prefill_at(&mut seq, policy, embeds, &kinds, Some(&positions))
            .unwrap();
        let t = prompt.len();
        let last = decoder.head(hidden.narrow(1, t - 1, 1));
        let mut row = rows_of(last.reshape([1, config.text.vocab_size]))
            .unwrap()
            .remove(0);
        let mut total = 0.0;
        for (i, &a) in answer.iter().enumerate() {
            total += nll(&row, a);
            if i + 1 < answer.len() {
                let logits = runner.decode(&mut [(&mut seq, policy)], &[a]).unwrap();
                row = rows_of(logits).unwrap().remove(0);
            }
        }
        (total / answer.len() as f64).exp()
    };
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).unwrap();
    let got = ppl(full.as_ref());
    let want = expected["ppl"].as_f64().unwrap();
    assert!(
        ((got - want) / want).abs() < 1e-5,
        "{fixture} full: {got} vs {want}"
    );
    let budget = expected["policy_budget"].as_f64().unwrap();
    for (name, build) in [
        (
            "local",
            ecache_policy_local::build as ecache_core::PolicyConstructor,
        ),
        ("h2o", ecache_policy_h2o::build),
        ("elastic", ecache_policy_elastic::build),
        ("snapkv", ecache_policy_snapkv::build),
    ] {
        let mut policy_config = PolicyConfig::new(name, budget);
        if name == "snapkv" {
            for (key, value) in expected["snapkv_params"].as_object().unwrap() {
                policy_config.set_param(key, &value.to_string()).unwrap();
            }
        }
        let policy = build(&policy_config).unwrap();
        let got = ppl(policy.as_ref());
        let want = expected["policy_ppl"][name].as_f64().unwrap();
        assert!(
            ((got - want) / want).abs() < 1e-4,
            "{fixture} {name}: ppl {got} vs spec {want}"
        );
    }
}
