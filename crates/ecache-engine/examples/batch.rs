//! Several requests under different cache policies in flight at once, on the demo model:
//! one streamed to the terminal as it is generated, the others waited for.
//!
//! `cargo run --release -p ecache-engine --example batch [MODEL_DIR]`

use std::io::Write;
use std::path::PathBuf;

use ecache_core::PolicyConfig;
use ecache_engine::{Engine, EngineConfig, EngineError, Event, ImageInput, Request};

fn main() -> Result<(), EngineError> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
        });
    let mut config = EngineConfig::new(&dir);
    config.max_batch = 8;
    // Room for about two requests under the full cache.
    config.kv_memory = Some(1 << 20);
    let engine = Engine::load(config)?;

    let ask = |question: &str, policy: PolicyConfig| {
        let mut r = Request::text(question);
        r.image = Some(ImageInput::Path(dir.join("scene.png")));
        r.max_new_tokens = 48;
        r.policy = Some(policy);
        r
    };
    let mut elastic = PolicyConfig::new("elastic", 0.2);
    elastic.set_param("protected_tail", "10").expect("a number");
    let policies = [
        PolicyConfig::new("full", 1.0),
        elastic,
        PolicyConfig::new("h2o", 0.3),
        PolicyConfig::new("local", 0.5),
    ];
    // Submit everything first: the scheduler batches whatever fits under the cap.
    let mut handles = Vec::new();
    for policy in &policies {
        handles.push(engine.submit(ask("describe the image in detail .", policy.clone()))?);
        handles.push(engine.submit(ask("how many objects are there ?", policy.clone()))?);
    }

    // Stream the first answer token by token.
    let mut first = handles.remove(0);
    print!("full, streamed: ");
    while let Some(event) = first.blocking_next() {
        match event {
            Event::Token { text, .. } => {
                print!("{text}");
                std::io::stdout().flush().ok();
            }
            Event::Done(c) => println!("  [{:?}, {} tokens]", c.finish_reason, c.tokens.len()),
            Event::Failed(why) => println!("  [failed: {why}]"),
        }
    }
    for handle in handles {
        let c = handle.wait()?;
        println!(
            "{:<8} {:<4} KV reserved {:>7} B, held at the end {:>7} B: {}",
            c.stats.policy, c.stats.budget, c.stats.kv_reserved, c.stats.kv_bytes, c.text
        );
    }
    let stats = engine.stats();
    println!(
        "at most {} requests ran at once; {} tokens generated",
        stats.peak_active, stats.tokens_generated
    );
    Ok(())
}
