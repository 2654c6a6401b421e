//! Trains a small demo model (64 wide) to see how soon answers come to depend on the image:
//! `cargo run --release -p ecache-demo --example small_run -- STEPS LR DESCRIPTION_SHARE
//! VISION_LAYERS PATCH [PROBE_WEIGHT]` (docs/demo.md's small-model experiments).
use ecache_demo::model_dir::DemoShape;
use ecache_demo::train::{TrainOptions, train};
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
        text_hidden: 64,
        text_layers: 2,
        text_heads: 2,
        text_kv_heads: 1,
        text_intermediate: 128,
    };
    let options = TrainOptions {
        steps: a[0] as usize,
        batch: 16,
        peak_lr: a[1],
        warmup: 20,
        seed: 3,
        description_share: a[2],
        probe_weight: a.get(5).copied().unwrap_or(1.0),
    };
    train(
        std::path::Path::new("/tmp/probe"),
        &shape,
        &options,
        50,
        100,
        |p| {
            println!(
                "step {} loss {:.4} {:.0}s {:?}",
                p.step, p.loss, p.seconds, p.check
            )
        },
    )
    .unwrap();
}
