//! Training a very small demo model for a few steps: the loss must fall well below its
//! starting value, and the directory it writes must load through the checkpoint path.

use burn::backend::Flex;
use burn::tensor::DType;
use ecache_demo::language::QuestionMix;
use ecache_demo::model_dir::DemoShape;
use ecache_demo::train::{TrainOptions, train};
use ecache_model::{ImageProcessor, Llava, PromptTokenizer};

#[test]
fn a_short_run_learns_the_answer_format_and_writes_a_loadable_model() {
    let dir = std::env::temp_dir().join(format!("ecache-train-test-{}", std::process::id()));
    let shape = DemoShape {
        vision_hidden: 32,
        vision_layers: 1,
        vision_heads: 2,
        patch: 24,
        text_hidden: 64,
        text_layers: 1,
        text_heads: 2,
        text_kv_heads: 1,
        text_intermediate: 128,
    };
    let options = TrainOptions {
        steps: 40,
        batch: 8,
        peak_lr: 3e-3,
        warmup: 5,
        seed: 1,
        description_share: 0.5,
        turns: 2,
        probe_weight: 0.0,
        // Both stages and the fade between: the oracle for 15 steps, a fade over 10, then
        // the tower's features alone.
        oracle_steps: 15,
        oracle_fade: 10,
        oracle_weight: 1.0,
        focus_weight: 0.5,
        focus_layer: 0,
        // The cue loss on the same layer as the focus loss: one probe serves both.
        cue_weight: 0.5,
        cue_layer: 0,
        question_mix: QuestionMix([1.0, 3.0, 3.0, 1.0, 2.0, 1.0]),
    };
    let (check, log) = train(&dir, &shape, &options, 5, 20, |_| {}).unwrap();
    let first = log.first().unwrap().loss;
    let last = log.last().unwrap().loss;
    eprintln!("loss {first} -> {last}, {check:?}");
    // ln(vocabulary) is about 4; the answer templates alone are worth far more than half.
    assert!(first > 3.0, "{first}");
    assert!(last < 0.6 * first, "loss {first} -> {last}");
    assert!(
        log.iter().any(|p| p.check.is_some()),
        "a checkpoint was reported"
    );
    // The tower learns to produce the oracle: its distance shrinks.
    let fit_first = log.first().unwrap().oracle_fit;
    let fit_last = log.last().unwrap().oracle_fit;
    assert!(
        fit_last < 0.8 * fit_first,
        "oracle fit {fit_first} -> {fit_last}"
    );
    // The first layer learns to look at the cue words (relative positions, learned fast).
    let cue_first = log.first().unwrap().cue;
    let cue_last = log.last().unwrap().cue;
    assert!(
        cue_first > 0.0 && cue_last < 0.5 * cue_first,
        "cue loss {cue_first} -> {cue_last}"
    );
    assert!((0.0..=1.0).contains(&check.description_token_accuracy));
    assert!(check.description_token_accuracy > 0.3, "{check:?}");
    let device = Default::default();
    let (_, config) = Llava::<Flex>::load(&dir, &device, DType::F32).unwrap();
    assert_eq!(config.image_tokens(), shape.image_tokens());
    PromptTokenizer::load(&dir, config.image_token_id).unwrap();
    ImageProcessor::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
}
