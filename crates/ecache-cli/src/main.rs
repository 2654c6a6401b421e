//! The `ecache` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ecache_cli::BadInput;
use ecache_cli::policies::builtin_registry;
use ecache_cli::trace::{self, TraceInput};
use ecache_core::{PolicyConfig, RunConfig};

#[derive(Parser)]
#[command(
    name = "ecache",
    version,
    about = "Vision-language inference with pluggable KV cache policies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show what a policy keeps and merges, given attention scores (no model needed).
    Trace(TraceArgs),
    /// List the registered policies and what each needs.
    Policies,
}

#[derive(clap::Args)]
struct TraceArgs {
    /// Policy name (overrides the config's).
    #[arg(long)]
    policy: Option<String>,
    /// Fraction of slots kept, in (0, 1] (overrides the config's).
    #[arg(long)]
    budget: Option<f64>,
    /// A policy parameter, `key=value` (repeatable; overrides the config's).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A run config whose [policy] section is used.
    #[arg(long)]
    config: Option<PathBuf>,
    /// JSON input: {"prompt_len", "decode_steps", "layers": [{"prefill_scores", "decode_scores"}]}.
    #[arg(long)]
    input: PathBuf,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn policy_config(args: &TraceArgs) -> Result<PolicyConfig> {
    let mut config = match &args.config {
        Some(path) => RunConfig::from_path(path)?.policy,
        None => PolicyConfig::new("elastic", 1.0),
    };
    if args.config.is_none() && args.budget.is_none() {
        return Err(BadInput("give --budget (or --config with a [policy] section)".into()).into());
    }
    if let Some(name) = &args.policy {
        config.name.clone_from(name);
    }
    if let Some(budget) = args.budget {
        config.budget = budget;
    }
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| BadInput(format!("--set {pair:?}: expected KEY=VALUE")))?;
        config.set_param(key, value)?;
    }
    Ok(config)
}

fn trace_command(args: TraceArgs) -> Result<()> {
    let config = policy_config(&args)?;
    let policy = builtin_registry()?.build(&config)?;
    let input = TraceInput::from_path(&args.input)?;
    let output = trace::run(policy.as_ref(), &input)?;
    let json = output.to_json()?;
    match args.output {
        Some(path) => std::fs::write(&path, json)
            .with_context(|| format!("cannot write {}", path.display()))?,
        None => print!("{json}"),
    }
    Ok(())
}

fn policies_command() -> Result<()> {
    let registry = builtin_registry()?;
    for name in registry.names() {
        let policy = registry.build(&PolicyConfig::new(&name, 0.5))?;
        let needs = policy.needs();
        println!(
            "{name:<10} prefill importance: {:<5} decode attention: {}",
            needs.prefill_importance, needs.decode_attention
        );
    }
    Ok(())
}

fn is_bad_input(err: &anyhow::Error) -> bool {
    err.downcast_ref::<BadInput>().is_some() || err.chain().any(|e| e.is::<ecache_core::Error>())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace(args) => trace_command(args),
        Command::Policies => policies_command(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            // Bad input (config, policy, data files) exits with 2; anything else with 1.
            if is_bad_input(&err) {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}
