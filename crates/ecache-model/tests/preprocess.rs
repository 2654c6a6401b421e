//! Image preprocessing against the pixel values transformers' CLIP processor produced for
//! the fixture images (PIL bicubic there, Pillow's algorithm re-implemented here).

mod common;

use common::{fixture, max_difference, st_f32};
use ecache_model::ImageProcessor;

#[test]
fn pixel_values_match_the_clip_processor() {
    for name in ["tiny-llava-mha", "tiny-llava-gqa"] {
        let dir = fixture(name);
        let processor = ImageProcessor::load(&dir).unwrap();
        let (got, shape) = processor.open(&dir.join("image.png")).unwrap();
        let bytes = std::fs::read(dir.join("expected.safetensors")).unwrap();
        let (want_shape, want) = st_f32(&bytes, "pixel_values");
        assert_eq!(want_shape[1..], shape);
        // The resize is Pillow's to the grey level (crate::resample); what is left is
        // float rounding of the normalisation.
        let max = max_difference(&got, &want);
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
