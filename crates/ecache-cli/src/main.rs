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
    /// Answer a prompt about an image with a LLaVA checkpoint under a cache policy.
    Generate(GenerateArgs),
    /// Perplexity or ROUGE-L of policies and budgets over a dataset, against the full cache.
    Eval(EvalArgs),
    /// List the registered policies and what each needs.
    Policies,
}

#[derive(clap::Args)]
struct TraceArgs {
    #[command(flatten)]
    policy: PolicyArgs,
    /// JSON input: {"prompt_len", "decode_steps", "layers": [{"prefill_scores", "decode_scores"}]}.
    #[arg(long)]
    input: PathBuf,
    /// Write the JSON here instead of standard output.
    #[arg(long)]
    output: Option<PathBuf>,
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// The image the prompt asks about.
    #[arg(long)]
    image: Option<PathBuf>,
    /// A question (wrapped in the chat format) or a full prompt with `<image>`.
    #[arg(long)]
    prompt: String,
    #[command(flatten)]
    policy: PolicyArgs,
    #[arg(long)]
    max_new_tokens: Option<usize>,
    #[arg(long)]
    temperature: Option<f64>,
    #[arg(long)]
    top_p: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
}

/// Model selection shared by generate and eval.
#[derive(clap::Args)]
struct ModelArgs {
    /// A Hugging Face LLaVA directory (config.json, weights, tokenizer.json, preprocessor_config.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// flex | ndarray | cuda (overrides the config's).
    #[arg(long)]
    backend: Option<String>,
    /// f32 | f16 | bf16 (overrides the config's).
    #[arg(long)]
    dtype: Option<String>,
    /// Pad images to a square with the mean colour first (LLaVA-1.5 evaluation setting).
    #[arg(long)]
    pad_to_square: bool,
}

impl ModelArgs {
    /// Applies the overrides to the config's [model] section and returns the model directory.
    fn apply(&self, config: &mut RunConfig) -> Result<PathBuf> {
        if let Some(b) = &self.backend {
            config.model.backend = parse_value("backend", b)?;
        }
        if let Some(d) = &self.dtype {
            config.model.dtype = parse_value("dtype", d)?;
        }
        Ok(self
            .model
            .clone()
            .or_else(|| config.model.path.clone())
            .ok_or_else(|| BadInput("give --model DIR (or [model] path in --config)".into()))?)
    }
}

/// Policy selection shared by the commands.
#[derive(clap::Args)]
struct PolicyArgs {
    /// Policy name (overrides the config's).
    #[arg(long)]
    policy: Option<String>,
    /// Fraction of slots kept, in (0, 1] (overrides the config's).
    #[arg(long)]
    budget: Option<f64>,
    /// A policy parameter, `key=value` (repeatable; overrides the config's).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// A run config (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum MetricArg {
    Ppl,
    Rouge,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// ppl: teacher-forced perplexity of the answers; rouge: ROUGE-L against the full cache.
    #[arg(value_enum)]
    metric: MetricArg,
    #[command(flatten)]
    model: ModelArgs,
    /// JSON array or JSON lines of {image, question, answer}.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Comma-separated policies (default: the config's [evaluation] policies, else its policy).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Comma-separated budgets (default: the config's [evaluation] budgets, else its budget).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<f64>,
    #[arg(long)]
    max_items: Option<usize>,
    /// Write the results as JSON here (atomically).
    #[arg(long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Length of the greedy outputs compared by ROUGE-L.
    #[arg(long)]
    max_new_tokens: Option<usize>,
}

fn eval_command(args: EvalArgs) -> Result<()> {
    use ecache_cli::eval::{EvalRequest, Metric, grid, table, write_atomically};
    let mut config = run_config(&args.policy, "full", 1.0)?;
    let model_dir = args.model.apply(&mut config)?;
    if let Some(n) = args.max_new_tokens {
        config.generation.max_new_tokens = n;
    }
    let e = &mut config.evaluation;
    if !args.policies.is_empty() {
        e.policies = args.policies.clone();
    }
    if !args.budgets.is_empty() {
        e.budgets = args.budgets.clone();
    }
    e.max_items = args.max_items.or(e.max_items);
    e.dataset = args.dataset.clone().or(e.dataset.take());
    e.output = args.output.clone().or(e.output.take());
    config.validate()?;
    let e = &config.evaluation;
    let policies = if e.policies.is_empty() {
        vec![config.policy.name.clone()]
    } else {
        e.policies.clone()
    };
    let budgets = if e.budgets.is_empty() {
        vec![config.policy.budget]
    } else {
        e.budgets.clone()
    };
    let registry = builtin_registry()?;
    let runs = grid(&config, &policies, &budgets);
    let built = runs
        .iter()
        .map(|r| registry.build(r))
        .collect::<Result<Vec<_>, _>>()?;
    let full = registry.build(&PolicyConfig::new("full", 1.0))?;
    let dataset = e
        .dataset
        .clone()
        .ok_or_else(|| BadInput("give --dataset FILE (or [evaluation] dataset)".into()))?;
    let mut items = ecache_cli::dataset::read(&dataset)?;
    if let Some(n) = e.max_items {
        items.truncate(n);
    }
    let output = e.output.clone();
    let metric = match args.metric {
        MetricArg::Ppl => Metric::Ppl,
        MetricArg::Rouge => Metric::Rouge,
    };
    let request = EvalRequest {
        model_dir,
        items,
        runs,
        config,
        metric,
        pad_to_square: args.model.pad_to_square,
    };
    let rows = ecache_cli::eval::run(&request, &built, full.as_ref())?;
    print!("{}", table(&rows));
    if let Some(path) = output {
        write_atomically(&path, &(serde_json::to_string_pretty(&rows)? + "\n"))?;
    }
    Ok(())
}

fn run_config(args: &PolicyArgs, default_policy: &str, default_budget: f64) -> Result<RunConfig> {
    let mut config = match &args.config {
        Some(path) => RunConfig::from_path(path)?,
        None => RunConfig::with_policy(PolicyConfig::new(default_policy, default_budget)),
    };
    if let Some(name) = &args.policy {
        config.policy.name.clone_from(name);
    }
    if let Some(budget) = args.budget {
        config.policy.budget = budget;
    }
    for pair in &args.set {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| BadInput(format!("--set {pair:?}: expected KEY=VALUE")))?;
        config.policy.set_param(key, value)?;
    }
    Ok(config)
}

fn parse_value<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        BadInput(format!(
            "--{flag} {value:?} is not one of the accepted values"
        ))
        .into()
    })
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    let mut config = run_config(&args.policy, "elastic", 0.2)?;
    let model_dir = args.model.apply(&mut config)?;
    let g = &mut config.generation;
    g.max_new_tokens = args.max_new_tokens.unwrap_or(g.max_new_tokens);
    g.temperature = args.temperature.unwrap_or(g.temperature);
    g.top_p = args.top_p.unwrap_or(g.top_p);
    g.seed = args.seed.unwrap_or(g.seed);
    config.validate()?;
    let policy = builtin_registry()?.build(&config.policy)?;
    let request = ecache_cli::generate::GenerateRequest {
        model_dir,
        image: args.image,
        prompt: args.prompt,
        config,
        pad_to_square: args.model.pad_to_square,
    };
    ecache_cli::generate::run(&request, policy.as_ref())
}

fn trace_command(args: TraceArgs) -> Result<()> {
    if args.policy.config.is_none() && args.policy.budget.is_none() {
        return Err(BadInput("give --budget (or --config with a [policy] section)".into()).into());
    }
    let config = run_config(&args.policy, "elastic", 1.0)?.policy;
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
        Command::Generate(args) => generate_command(args),
        Command::Eval(args) => eval_command(args),
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
