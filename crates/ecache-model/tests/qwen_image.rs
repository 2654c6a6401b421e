//! Qwen2-VL's image processor against transformers' (`Qwen2VLImageProcessorPil`) on three
//! pictures that take each branch of `smart_resize`: the grids, and every patch value.

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
