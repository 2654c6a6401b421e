//! Teacher-forced exact match of a saved demo model on two held-out streams: the training
//! run's own check (`train::quick_check`) and the study's scenes (`dataset::write_held_out`'s
//! stream), both through the training forward: `cargo run --release -p ecache-demo --example
//! held_out_check -- MODEL_DIR [COUNT]`. Compares with what `ecache study` measures greedily
//! through the cached inference path, to tell sampling from a path difference. The training
//! stream is checked twice, the second time with the oracle in place of the features.
use burn::backend::Flex;
use burn::tensor::DType;
use ecache_demo::dataset::held_out_items;
use ecache_demo::language::{IMAGE, template_of};
use ecache_demo::train::{
    Example, TrainOptions, answer_accuracy, batch_forward, make_batch, quick_check,
};
use ecache_model::layers::Rope;
use ecache_model::{ImageProcessor, Llava, PromptTokenizer};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = std::path::PathBuf::from(&args[0]);
    let count: usize = args.get(1).map_or(128, |c| c.parse().expect("a count"));
    let device = Default::default();
    let (model, config) = Llava::<Flex>::load(&dir, &device, DType::F32).expect("loads");
    let tokenizer = PromptTokenizer::load(&dir, IMAGE).expect("tokenizer");
    let processor = ImageProcessor::load(&dir).expect("processor");
    let seed = TrainOptions::default().seed;
    // The second pass is the decoder alone: the same questions with the oracle in place
    // of the tower's features, which tells a reading failure from a seeing failure.
    for (oracle, input) in [(false, "features"), (true, "oracle")] {
        let check = quick_check(
            &model, &config, &tokenizer, &processor, seed, count, &device, oracle,
        )
        .expect("check");
        println!(
            "training's check stream, {input}: short exact {:.3}, descriptions: tokens right {:.3}",
            check.short_exact, check.description_token_accuracy
        );
        println!("  by kind: {:?}", check.by_template);
    }
    // The study's scenes, each with its short question only.
    let examples: Vec<Example> = held_out_items(count, seed)
        .into_iter()
        .map(|(scene, [_, short])| Example {
            scene,
            turns: vec![short],
        })
        .collect();
    let rope = Rope::new(config.text.head_dim, config.text.rope_theta);
    let mut right = 0;
    // kind -> (right, asked)
    let mut by_kind: std::collections::BTreeMap<&str, (usize, usize)> = Default::default();
    for chunk in examples.chunks(16) {
        let batch = make_batch(chunk, &tokenizer, &processor, config.image_tokens()).unwrap();
        let logits = batch_forward(&model, &batch, &rope, &device, None).0;
        for (example, (exact, _)) in chunk.iter().zip(answer_accuracy(logits, &batch)) {
            let entry = by_kind
                .entry(template_of(&example.turns[0].question))
                .or_default();
            *entry = (entry.0 + exact as usize, entry.1 + 1);
            right += exact as usize;
        }
    }
    println!(
        "study's stream: short exact {:.3}",
        right as f64 / count as f64
    );
    let kinds: Vec<String> = by_kind
        .iter()
        .map(|(kind, (r, n))| format!("{kind} {r}/{n}"))
        .collect();
    println!("  by kind: {}", kinds.join(", "));
}
