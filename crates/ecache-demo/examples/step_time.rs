//! Times a few training steps of the demo model (for sizing it): `cargo run --release -p
//! ecache-demo --example step_time -- STEPS BATCH`.
fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("a number"))
        .collect();
    let options = ecache_demo::train::TrainOptions {
        steps: args.first().copied().unwrap_or(5),
        batch: args.get(1).copied().unwrap_or(16),
        ..Default::default()
    };
    let dir = std::path::PathBuf::from(
        std::env::var("DEMO_OUT").unwrap_or_else(|_| "/tmp/ecache-step-time".into()),
    );
    let (check, _) = ecache_demo::train::train(
        &dir,
        &Default::default(),
        &options,
        args.get(2).copied().unwrap_or(1),
        args.get(3).copied().unwrap_or(100),
        |p| {
            println!(
                "step {} loss {:.4} lr {:.2e} {:.2}s {:?}",
                p.step, p.loss, p.lr, p.seconds, p.check
            )
        },
    )
    .expect("training runs");
    println!("{check:?}");
}
