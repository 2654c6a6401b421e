//! `ecache generate`: one image, one prompt, one policy, through the engine; streams the
//! answer and prints a summary line.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Result;
use ecache_core::{PolicyConfig, RunConfig};
use ecache_engine::{
    Completion, Engine, EngineConfig, EngineError, Event, ImageInput, Request, SubmitError,
};

use crate::BadInput;

/// Everything one generation needs, resolved from flags and config.
pub struct GenerateRequest {
    pub model_dir: PathBuf,
    pub image: Option<PathBuf>,
    pub prompt: String,
    pub config: RunConfig,
    pub pad_to_square: bool,
}

/// The engine for a run config: its backend, dtype and policy, one sequence at a time.
pub fn engine_config(model_dir: PathBuf, config: &RunConfig) -> EngineConfig {
    let mut e = EngineConfig::new(model_dir);
    e.backend = config.model.backend;
    e.dtype = config.model.dtype;
    e.policy = config.policy.clone();
    e
}

/// Loads an engine; problems with the model directory are the user's input.
pub fn load_engine(config: EngineConfig) -> Result<Engine> {
    Engine::load(config).map_err(|e| BadInput(e.to_string()).into())
}

/// An engine error as the command line reports it: refusals are bad input.
pub fn engine_error(e: EngineError) -> anyhow::Error {
    match e {
        EngineError::Load(m) | EngineError::Submit(SubmitError::Invalid { message: m, .. }) => {
            BadInput(m).into()
        }
        other => anyhow::anyhow!(other),
    }
}

/// Answers the request; with `compare_full`, the same prompt is answered again under the
/// full cache and the memory each used is compared.
pub fn run(request: &GenerateRequest, compare_full: bool) -> Result<()> {
    let mut config = engine_config(request.model_dir.clone(), &request.config);
    config.pad_to_square = request.pad_to_square;
    let engine = load_engine(config)?;
    if compare_full {
        if let Some(image) = &request.image {
            println!("image:    {}", image.display());
        }
        println!("question: {}", request.prompt);
    }
    let answer = |policy: &PolicyConfig| -> Result<Completion> {
        let g = &request.config.generation;
        let mut r = Request::text(request.prompt.clone());
        r.image = request.image.clone().map(ImageInput::Path);
        r.max_new_tokens = g.max_new_tokens;
        r.temperature = g.temperature;
        r.top_p = g.top_p;
        r.seed = Some(g.seed);
        r.policy = Some(policy.clone());
        let mut handle = engine
            .submit(r)
            .map_err(|e| engine_error(EngineError::Submit(e)))?;
        if compare_full {
            print!("{} (budget {}): ", policy.name, policy.budget);
        }
        let mut stdout = std::io::stdout();
        let done = loop {
            match handle.blocking_next() {
                Some(Event::Token { text, .. }) => {
                    let _ = write!(stdout, "{text}");
                    let _ = stdout.flush();
                }
                Some(Event::Done(c)) => break *c,
                Some(Event::Failed(why)) => return Err(anyhow::anyhow!(why)),
                None => return Err(anyhow::anyhow!("the engine stopped")),
            }
        };
        println!();
        println!("{}", summary(&done));
        Ok(done)
    };
    let ours = answer(&request.config.policy)?;
    if compare_full {
        let reference = answer(&PolicyConfig::new("full", 1.0))?;
        let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
        // Compare at the same number of tokens: the two answers may differ in length.
        let slots = reference.stats.slots_per_layer[0].max(1);
        let per_slot = reference.stats.kv_bytes as f64 / slots as f64;
        let seen = ours.usage.prompt_tokens + ours.tokens.len().saturating_sub(1);
        let full_bytes = per_slot * seen as f64;
        println!(
            "memory: after the same {seen} tokens, {} holds {:.3} MiB of KV cache and the full cache {:.3} MiB: {:.0}% saved",
            ours.stats.policy,
            mib(ours.stats.kv_bytes),
            full_bytes / (1024.0 * 1024.0),
            100.0 * (1.0 - ours.stats.kv_bytes as f64 / full_bytes.max(1.0))
        );
    }
    Ok(())
}

/// The one-line account of a generation.
fn summary(done: &Completion) -> String {
    let s = &done.stats;
    let slots = &s.slots_per_layer;
    let (lo, hi) = (
        slots.iter().min().unwrap_or(&0),
        slots.iter().max().unwrap_or(&0),
    );
    let per_second = if s.decode_seconds > 0.0 {
        done.tokens.len() as f64 / s.decode_seconds
    } else {
        0.0
    };
    format!(
        "[{} budget {}] prompt tokens {} (image {}), new tokens {}, slots per layer {}{}, KV {:.2} MiB, prefill {:.2} s, {:.1} tokens/s",
        s.policy,
        s.budget,
        done.usage.prompt_tokens,
        s.image_tokens,
        done.tokens.len(),
        lo,
        if lo == hi {
            String::new()
        } else {
            format!("..{hi}")
        },
        s.kv_bytes as f64 / (1024.0 * 1024.0),
        s.prefill_seconds,
        per_second,
    )
}
