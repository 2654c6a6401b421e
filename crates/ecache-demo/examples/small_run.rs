//! Trains a small demo model (64 wide) to see how soon answers come to depend on the image:
//! `cargo run --release -p ecache-demo --example small_run -- STEPS LR DESCRIPTION_SHARE
//! VISION_LAYERS PATCH [PROBE_WEIGHT]` (docs/demo.md's small-model experiments). The
//! environment sets the rest: TEXT_HIDDEN, TEXT_LAYERS, TEXT_HEADS, TEXT_FFN (decoder
//! shape), BATCH, TURNS, ORACLE_STEPS, ORACLE_WEIGHT, FOCUS_WEIGHT, FOCUS_LAYER,
//! CUE_WEIGHT and CUE_LAYER.
use ecache_demo::model_dir::DemoShape;
use ecache_demo::train::{TrainOptions, train};
fn env(name: &str, default: f64) -> f64 {
    std::env::var(name).map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let a: Vec<f64> = std::env::args()
        .skip(1)
        .map(|x| x.parse().unwrap())
        .collect();
    let shape = DemoShape {
        vision_hidden: 64,
        vision_layers: a.get(3).copied().unwrap_or(2.0) as usize,
        vision_heads: 2,
        patch: a.get(4).copied().unwrap_or(24.0) as usize,
        text_hidden: env("TEXT_HIDDEN", 64.0) as usize,
        text_layers: env("TEXT_LAYERS", 2.0) as usize,
        text_heads: env("TEXT_HEADS", 2.0) as usize,
        text_kv_heads: 1,
        text_intermediate: env("TEXT_FFN", 128.0) as usize,
    };
    let options = TrainOptions {
        steps: a[0] as usize,
        batch: env("BATCH", 16.0) as usize,
        peak_lr: a[1],
        warmup: 20,
        seed: 3,
        description_share: a[2],
        probe_weight: a.get(5).copied().unwrap_or(1.0),
        turns: env("TURNS", 1.0) as usize,
        oracle_steps: env("ORACLE_STEPS", 0.0) as usize,
        oracle_fade: env("ORACLE_FADE", 0.0) as usize,
        oracle_weight: env("ORACLE_WEIGHT", 0.0),
        focus_weight: env("FOCUS_WEIGHT", 0.0),
        focus_layer: env("FOCUS_LAYER", 1.0) as usize,
        cue_weight: env("CUE_WEIGHT", 0.0),
        cue_layer: env("CUE_LAYER", 0.0) as usize,
        question_mix: Default::default(),
    };
    train(
        std::path::Path::new("/tmp/probe"),
        &shape,
        &options,
        50,
        100,
        |p| {
            println!(
                "step {} loss {:.4} fit {:.3} focus {:.3} cue {:.3} {:.0}s {:?}",
                p.step, p.loss, p.oracle_fit, p.focus, p.cue, p.seconds, p.check
            )
        },
    )
    .unwrap();
}
