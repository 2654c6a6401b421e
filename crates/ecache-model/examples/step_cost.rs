//! What joining and stepping a ragged batch costs on a model directory (default: the demo
//! model): the vision tower, one prefill (the time a join holds up the running sequences),
//! and a decode step at several batch sizes, under the full cache and Elastic Cache.
//!
//! `cargo run --release -p ecache-model --example step_cost [MODEL_DIR]`

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Tensor, TensorData};
use ecache_core::{CachePolicy, PolicyConfig, PositionMode};
use ecache_model::{ImageProcessor, Llava, PromptTokenizer, Runner, Sequence, chat_prompt, splice};

type B = burn::backend::Flex;

fn main() {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
        });
    let device = Default::default();
    let (model, config) = Llava::<B>::load(&dir, &device, DType::F32).expect("a model directory");
    let tokenizer = PromptTokenizer::load(&dir, config.image_token_id).expect("tokenizer.json");
    let processor = ImageProcessor::load(&dir).expect("preprocessor_config.json");
    let scene =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo/scene.png");
    let (pixels, [c, h, w]) = processor.open(&scene).expect("the demo scene");
    let ids = tokenizer
        .encode_prompt(&chat_prompt("describe the image in detail ."), true)
        .expect("a prompt");
    let runner = Runner::new(&model.decoder, &config.text, &device);
    let time = |reps: usize, f: &mut dyn FnMut()| {
        f();
        let start = Instant::now();
        for _ in 0..reps {
            f();
        }
        start.elapsed().as_secs_f64() * 1e3 / reps as f64
    };
    let input =
        || Tensor::<B, 4>::from_data(TensorData::new(pixels.clone(), [1, c, h, w]), &device);
    let vision = time(10, &mut || {
        let _ = model.image_features(input()).into_data();
    });
    let features = model.image_features(input());
    println!("vision tower: {vision:.2} ms");
    let full = ecache_policy_full::build(&PolicyConfig::new("full", 1.0)).expect("full");
    let elastic =
        ecache_policy_elastic::build(&PolicyConfig::new("elastic", 0.2)).expect("elastic");
    for policy in [full.as_ref(), elastic.as_ref()] {
        let start = |seq: &mut Sequence<B>, policy: &dyn CachePolicy| {
            let (embeds, kinds) = splice(
                &model,
                &ids,
                config.image_token_id,
                Some(features.clone()),
                &device,
            );
            let _ = runner
                .prefill_last(seq, policy, embeds, &kinds)
                .expect("prefill")
                .into_data();
        };
        let fresh = || {
            Sequence::new(
                &config.text,
                policy,
                PositionMode::Absolute,
                &device,
                DType::F32,
            )
        };
        let prefill = time(10, &mut || start(&mut fresh(), policy));
        println!(
            "{}: prefill of {} slots {prefill:.2} ms",
            policy.name(),
            ids.len() - 1 + config.image_tokens()
        );
        for batch in [1usize, 4, 8, 16, 32] {
            let mut seqs: Vec<Sequence<B>> = (0..batch)
                .map(|_| {
                    let mut seq = fresh();
                    start(&mut seq, policy);
                    seq
                })
                .collect();
            let tokens = vec![5u32; batch];
            let step = time(20, &mut || {
                let mut rows: Vec<(&mut Sequence<B>, &dyn CachePolicy)> =
                    seqs.iter_mut().map(|s| (s, policy)).collect();
                let _ = runner
                    .decode(&mut rows, &tokens)
                    .expect("decode")
                    .into_data();
            });
            println!(
                "  decode step, {batch:>2} sequences: {step:.2} ms ({:.0} tokens/s)",
                batch as f64 * 1e3 / step
            );
        }
    }
}
