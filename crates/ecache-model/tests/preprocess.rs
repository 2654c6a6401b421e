//! Image preprocessing against the pixel values transformers' CLIP processor produced for
//! the fixture images (PIL bicubic there, Pillow's algorithm re-implemented here).

use std::path::PathBuf;

use ecache_model::ImageProcessor;
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

#[test]
fn pixel_values_match_the_clip_processor() {
    for name in ["tiny-llava-mha", "tiny-llava-gqa"] {
        let dir = fixture(name);
        let processor = ImageProcessor::load(&dir).unwrap();
        let (got, shape) = processor.open(&dir.join("image.png")).unwrap();
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let view = st.tensor("pixel_values").unwrap();
        assert_eq!(view.shape()[1..], shape);
        let want: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        // The resize is Pillow's to the grey level (crate::resample); what is left is
        // float rounding of the normalisation.
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(max <= 1e-6, "{name}: max difference {max}");
    }
}

#[test]
fn greyscale_rgba_and_padding_are_handled() {
    let processor = ImageProcessor::load(&fixture("tiny-llava-mha")).unwrap();
    let grey =
        image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(30, 20, image::Luma([128])));
    let (data, shape) = processor.process(&grey).unwrap();
    assert_eq!(shape, [3, 56, 56]);
    assert!(
        (data[0] - data[56 * 56]).abs() < 0.1,
        "grey has equal channels before normalising"
    );
    let rgba = image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        10,
        70,
        image::Rgba([255, 0, 0, 0]),
    ));
    assert_eq!(processor.process(&rgba).unwrap().1, [3, 56, 56]);
    let mut padded = processor.clone();
    padded.pad_to_square = true;
    assert_eq!(padded.output_size(10, 70), (56, 56));
    let empty = image::DynamicImage::ImageRgb8(image::RgbImage::new(0, 0));
    assert!(
        processor
            .process(&empty)
            .unwrap_err()
            .to_string()
            .contains("zero")
    );
    let err = processor
        .open(&fixture("tiny-llava-mha").join("config.json"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}
