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

/// The vision tower on the tiny random Qwen2-VL: features within 1e-4 of transformers'
/// (`get_image_features`, the merger's output) for the three pictures, from our own
/// preprocessing.
#[test]
fn vision_features_match_transformers() {
    use burn::backend::Flex;
    use burn::tensor::{DType, Tensor, TensorData};
    use ecache_model::layers::Loader;
    use ecache_model::qwen_vision::{HfQwenVisionConfig, QwenVision};
    use ecache_model::weights::Checkpoint;

    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    let dir = fixtures.join("tiny-qwen2-vl");
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
        assert!(max <= 1e-4, "{name}: max difference {max}");
    }
}
