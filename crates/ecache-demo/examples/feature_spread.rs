//! How much a demo model's image features differ between two scenes and between two
//! tokens of one scene: the collapse diagnostic of docs/demo.md.
//! `cargo run --release -p ecache-demo --example feature_spread -- MODEL_DIR [fresh]`
//! (`fresh`: a newly initialised model of the same config instead of the weights).
use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData};
use ecache_demo::scene::Scene;
use ecache_model::generate::SeededRng;
use ecache_model::{ImageProcessor, Llava};
fn main() {
    let dir = std::path::Path::new(&std::env::args().nth(1).unwrap()).to_path_buf();
    let device = Default::default();
    let (model, config) = Llava::<Flex>::load(&dir, &device, DType::F32).unwrap();
    let model = if std::env::args().nth(2).is_some() {
        println!("fresh init");
        Llava::<Flex>::init_from(
            &config,
            ecache_model::Checkpoint::random(0.02).with_std("embeddings.position_embedding", 0.5),
            &device,
            DType::F32,
            3,
        )
    } else {
        model
    };
    let processor = ImageProcessor::load(&dir).unwrap();
    let mut rng = SeededRng::new(77);
    let feats: Vec<Tensor<Flex, 3>> = (0..2)
        .map(|_| {
            let s = Scene::generate(&mut rng);
            println!("{}", ecache_demo::language::describe(&s));
            let (v, [c, h, w]) = processor
                .process(&image::DynamicImage::ImageRgb8(s.render()))
                .unwrap();
            let px =
                Tensor::<Flex, 4>::from_data(TensorData::new(v.clone(), [1, c, h, w]), &device);
            let mean: f32 = v.iter().sum::<f32>() / v.len() as f32;
            println!("pixel mean {mean}");
            let vis = model.vision.forward(px.clone());
            println!(
                "vision out std per token {:?}",
                vis.clone().var(2).sqrt().mean().into_scalar()
            );
            model.image_features(px)
        })
        .collect();
    let d = (feats[0].clone() - feats[1].clone())
        .abs()
        .mean()
        .into_scalar();
    let m = feats[0].clone().abs().mean().into_scalar();
    let tok = (feats[0].clone().slice([0..1, 0..1]) - feats[0].clone().slice([0..1, 4..5]))
        .abs()
        .mean()
        .into_scalar();
    println!("feature |a-b| {d} |a| {m}, token0 vs token4 {tok}");
}
