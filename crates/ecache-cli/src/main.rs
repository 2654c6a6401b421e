//! The `ecache` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ecache_cli::BadInput;
use ecache_cli::args::{DeviceArgs, ModelArgs, PolicyArgs, parse_value, run_config};
use ecache_cli::policies::builtin_registry;
use ecache_cli::trace::{self, TraceInput};
use ecache_core::{PolicyConfig, RunConfig};

/// mimalloc keeps freed memory for reuse; the system allocator on Linux hands every large
/// tensor buffer back to the kernel and pays page faults to get it again, a visible share of
/// a CPU prefill (docs/performance.md, "The prefill: six fixes", fix 3).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Answer a prompt about an image with a checkpoint (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL)
    /// under a cache policy.
    Generate(GenerateArgs),
    /// Perplexity or ROUGE-L of policies and budgets over a dataset, against the full cache.
    Eval(EvalArgs),
    /// Pictures of what each layer keeps: the image's patch grid coloured by each slot's
    /// fate after the prefill and at the end of a greedy answer, with an index.html.
    Inspect(ecache_cli::inspect::InspectArgs),
    /// List the registered policies and what each needs.
    Policies,
    /// Train the embedded demo model again from its seed (burn autodiff, CPU).
    TrainDemo(TrainDemoArgs),
    /// The quality study on the demo model: every policy and budget over held-out scenes.
    Study(StudyArgs),
    /// Time prefill and decode on random weights of a named shape, every policy against
    /// the full cache in the same run (the paper's latency protocol).
    Bench(BenchArgs),
    /// Serve the model over HTTP with an OpenAI-compatible API (continuous batching).
    Serve(ecache_cli::serve::ServeArgs),
    /// Serve each policy on a loopback port under one KV cap and drive it with concurrent
    /// streaming clients: tokens/s, requests/s, concurrency and latencies per policy.
    BenchServe(ecache_cli::bench_serve::BenchServeArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// llava-1.5-7b | llava-1.5-13b | llava-mid | llama-h1024x8 | qwen2-vl-7b | qwen2.5-vl-7b |
    /// qwen2-vl-mid | a config.json or model directory.
    #[arg(long, default_value = "llava-1.5-7b")]
    shape: String,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Prompt tokens, the image's included.
    #[arg(long, default_value_t = 900)]
    prompt_len: usize,
    /// Decode steps after the prefill.
    #[arg(long, default_value_t = 512)]
    gen_len: usize,
    /// Policies to time besides the full cache (default: --policy, else elastic).
    #[arg(long, value_delimiter = ',')]
    policies: Vec<String>,
    /// Budgets for every policy but full (default: --budget, else 0.2).
    #[arg(long, value_delimiter = ',')]
    budgets: Vec<f64>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Backend and dtype; the random weights are created directly in that dtype.
    #[command(flatten)]
    device: DeviceArgs,
    /// Untimed passes of the whole protocol with the full cache first (kernel tuning).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Write the figures as JSON here as well.
    #[arg(long)]
    output: Option<PathBuf>,
}

fn bench_command(args: BenchArgs) -> Result<()> {
    use ecache_cli::bench::{BenchRequest, resolve_shape, table, write};
    let mut config = run_config(&args.policy, "elastic", 0.2)?;
    args.device.apply(&mut config)?;
    config.validate()?;
    let runs = ecache_cli::eval::grid(&config, &args.policies, &args.budgets);
    if let Some(why) = ecache_cli::eval::unused_params(&config, &runs) {
        return Err(BadInput(why).into());
    }
    let request = BenchRequest {
        shape_name: args.shape.clone(),
        shape: resolve_shape(&args.shape)?,
        batch: args.batch,
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        runs,
        dtype: ecache_cli::backend::dtype(config.model.dtype),
        warmup: args.warmup,
        seed: args.seed,
    };
    let report = ecache_cli::backend::on_backend(config.model.backend, request)?;
    print!("{}", table(&report));
    write(&report, args.output.as_ref())
}

#[derive(clap::Args)]
struct TrainDemoArgs {
    /// Where to write the model directory.
    #[arg(long, default_value = "models/ecache-demo")]
    out: PathBuf,
    #[arg(long)]
    steps: Option<usize>,
    #[arg(long)]
    batch: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// Question-answer turns per training conversation.
    #[arg(long)]
    turns: Option<usize>,
    /// Weight of the focus loss (0 turns it off).
    #[arg(long)]
    focus_weight: Option<f64>,
    /// Weight of the cue loss (0 turns it off): the first layer carries the words that
    /// name the asked object to the answer.
    #[arg(long)]
    cue_weight: Option<f64>,
    /// Steps in which the decoder reads the oracle instead of the tower's features.
    #[arg(long)]
    oracle_steps: Option<usize>,
    /// Steps after those over which the decoder's input fades from the oracle to the
    /// features (0 switches at once).
    #[arg(long)]
    oracle_fade: Option<usize>,
    /// Relative weights of the short-question templates in training: count, colour, shape,
    /// size, where, count colour (held-out checks stay uniform).
    #[arg(long, value_delimiter = ',', num_args = 6)]
    question_mix: Option<Vec<f64>>,
}

#[derive(clap::Args)]
struct StudyArgs {
    /// The model (default: the embedded demo model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where to write the held-out data, results.json, results.md and the plots (default
    /// results/demo, or results/demo-elastic for --elastic-sweep).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Held-out scenes (one description and one short question each).
    #[arg(long, default_value_t = 200)]
    scenes: usize,
    /// Seed of the held-out scenes (the demo model's training seed).
    #[arg(long, default_value_t = 2024)]
    seed: u64,
    /// Policies (elastic runs in its four protect x importance settings).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,local,h2o,snapkv,elastic"
    )]
    policies: Vec<String>,
    /// Budgets with uniform layer budgets.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.2,0.3,0.5,0.7,0.9")]
    budgets: Vec<f64>,
    /// Budgets each policy also runs at with pyramid layer budgets (empty: none).
    #[arg(long, value_delimiter = ',', default_value = "0.2,0.5")]
    pyramid_budgets: Vec<f64>,
    /// Sweep Elastic Cache's sinks, offset and merge mode at --sweep-budget instead.
    #[arg(long)]
    elastic_sweep: bool,
    #[arg(long, default_value_t = 0.2)]
    sweep_budget: f64,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    sinks: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "0,4,8,24")]
    offsets: Vec<usize>,
    #[arg(long, default_value_t = 48)]
    max_new_tokens: usize,
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// flex | ndarray | cuda | wgpu
    #[arg(long)]
    backend: Option<String>,
}

fn train_demo_command(args: TrainDemoArgs) -> Result<()> {
    let defaults = ecache_demo::train::TrainOptions::default();
    let options = ecache_demo::train::TrainOptions {
        steps: args.steps.unwrap_or(defaults.steps),
        batch: args.batch.unwrap_or(defaults.batch),
        seed: args.seed.unwrap_or(defaults.seed),
        turns: args.turns.unwrap_or(defaults.turns),
        focus_weight: args.focus_weight.unwrap_or(defaults.focus_weight),
        cue_weight: args.cue_weight.unwrap_or(defaults.cue_weight),
        oracle_steps: args.oracle_steps.unwrap_or(defaults.oracle_steps),
        oracle_fade: args.oracle_fade.unwrap_or(defaults.oracle_fade),
        question_mix: match args.question_mix {
            Some(w) => {
                ecache_demo::language::QuestionMix(w.try_into().map_err(|w: Vec<f64>| {
                    BadInput(format!("--question-mix takes 6 weights, got {}", w.len()))
                })?)
            }
            None => defaults.question_mix,
        },
        ..defaults
    };
    options
        .validate()
        .map_err(|e| BadInput(format!("train-demo: {e}")))?;
    ecache_cli::demo::train_command(&args.out, &options)
}

fn study_command(args: StudyArgs) -> Result<()> {
    let mut config = RunConfig::with_policy(PolicyConfig::new("full", 1.0));
    if let Some(b) = &args.backend {
        config.model.backend = parse_value("backend", b)?;
    }
    config.generation.max_new_tokens = args.max_new_tokens;
    config.validate()?;
    let request = ecache_cli::demo::StudyRequest {
        model_dir: args.model.unwrap_or_else(ecache_cli::demo::model_dir),
        out: args.out.unwrap_or_else(|| {
            PathBuf::from(if args.elastic_sweep {
                "results/demo-elastic"
            } else {
                "results/demo"
            })
        }),
        scenes: args.scenes,
        seed: args.seed,
        config,
        batch: args.batch,
    };
    if args.elastic_sweep {
        ecache_cli::demo::elastic_sweep_command(
            &request,
            args.sweep_budget,
            &args.sinks,
            &args.offsets,
        )
    } else {
        ecache_cli::demo::study_command(
            &request,
            &args.policies,
            &args.budgets,
            &args.pyramid_budgets,
        )
    }
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
    prompt: Option<String>,
    /// Answer again under the full cache and compare the memory used.
    #[arg(long)]
    compare_full: bool,
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

#[derive(Clone, Copy, PartialEq, clap::ValueEnum)]
enum MetricArg {
    Ppl,
    Rouge,
    All,
    /// Combine `--shard` results: `ecache eval merge A.json B.json ... --output C.json`.
    Merge,
}

#[derive(clap::Args)]
struct EvalArgs {
    /// ppl: teacher-forced perplexity of the answers; rouge: greedy outputs scored by ROUGE-L
    /// against the full cache's and against the references, and exact match; all: both;
    /// merge: combine the shard files given after it.
    #[arg(value_enum)]
    metric: MetricArg,
    /// The shard files to merge (`eval merge` only).
    files: Vec<PathBuf>,
    /// Evaluate every N-th item from item I (1-based), e.g. 2/8, and write the shard's
    /// records to --output for `ecache eval merge`.
    #[arg(long, value_name = "I/N")]
    shard: Option<ecache_cli::shard::Shard>,
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
    /// Most sequences per batch (items with prompts of equal length are batched).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Report and skip malformed dataset lines and unusable items (missing image, prompt
    /// too long) instead of stopping before any work.
    #[arg(long)]
    keep_going: bool,
    /// Stop as if interrupted after this many items (tests resumption).
    #[arg(long, hide = true)]
    stop_after_items: Option<usize>,
}

fn eval_command(args: EvalArgs) -> Result<()> {
    use ecache_cli::eval::{EvalRequest, Metric, grid, table, write_atomically};
    if args.metric == MetricArg::Merge {
        if args.shard.is_some() {
            return Err(BadInput("eval merge takes shard files, not --shard".into()).into());
        }
        let rows = ecache_cli::shard::merge(&args.files)?;
        print!("{}", table(&rows));
        if let Some(path) = &args.output {
            write_atomically(path, &(serde_json::to_string_pretty(&rows)? + "\n"))?;
        }
        return Ok(());
    }
    if !args.files.is_empty() {
        return Err(BadInput(format!(
            "unexpected arguments {:?}: only `eval merge` takes files",
            args.files
        ))
        .into());
    }
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
    let registry = builtin_registry()?;
    let runs = grid(&config, &e.policies, &e.budgets);
    if let Some(why) = ecache_cli::eval::unused_params(&config, &runs) {
        return Err(BadInput(why).into());
    }
    for run in &runs {
        registry.build(run)?;
    }
    let dataset = e
        .dataset
        .clone()
        .ok_or_else(|| BadInput("give --dataset FILE (or [evaluation] dataset)".into()))?;
    let (mut items, skipped) = ecache_cli::dataset::read_with(&dataset, args.keep_going)?;
    for problem in &skipped {
        eprintln!("skipped: {problem}");
    }
    if let Some(n) = e.max_items {
        items.truncate(n);
    }
    let output = e.output.clone();
    let metric = match args.metric {
        MetricArg::Ppl => Metric::Ppl,
        MetricArg::Rouge => Metric::Rouge,
        MetricArg::All => Metric::All,
        MetricArg::Merge => unreachable!("merged above"),
    };
    if args.shard.is_some() && output.is_none() {
        return Err(BadInput("--shard needs --output: the shard's records go there".into()).into());
    }
    let request = EvalRequest {
        model_dir,
        items,
        runs,
        config,
        metric,
        pad_to_square: args.model.pad_to_square,
        batch: args.batch,
        keep_going: args.keep_going,
        // Beside the results: finished batches, so that a rerun resumes.
        progress_file: output.as_ref().map(|p| p.with_extension("progress.json")),
        stop_after_items: args.stop_after_items,
        shard: args.shard,
    };
    if let (Some(shard), Some(path)) = (args.shard, &output) {
        let records = ecache_cli::eval::run_records(&request)?;
        let file = ecache_cli::shard::ShardFile {
            shard: shard.to_string(),
            evaluation: ecache_cli::eval::evaluation_fingerprint(&request),
            metric,
            runs: request.runs.clone(),
            records: records.per_run.clone(),
        };
        let rows = ecache_cli::eval::rows_from_records(&request.runs, metric, &records.per_run);
        println!("shard {shard} (its items only; `ecache eval merge` combines the shards):");
        print!("{}", table(&rows));
        write_atomically(path, &(serde_json::to_string(&file)? + "\n"))?;
        if let Some(progress) = &request.progress_file {
            let _ = std::fs::remove_file(progress);
        }
        return Ok(());
    }
    let rows = ecache_cli::eval::run(&request)?;
    print!("{}", table(&rows));
    if let Some(path) = output {
        write_atomically(&path, &(serde_json::to_string_pretty(&rows)? + "\n"))?;
    }
    if let Some(progress) = &request.progress_file {
        let _ = std::fs::remove_file(progress);
    }
    Ok(())
}

fn generate_command(args: GenerateArgs) -> Result<()> {
    let mut config = run_config(&args.policy, "elastic", 0.2)?;
    // With no model anywhere, the embedded demo model answers about its bundled scene.
    let demo = args.model.model.is_none() && config.model.path.is_none();
    if demo {
        config.model.path = Some(ecache_cli::demo::model_dir());
        // The demo's question follows the image; with the paper's protection (the last
        // slot only), Elastic Cache's prefill merge takes it and the answer is not to the
        // question asked (docs/results.md). The study's best setting at the demo's budget
        // protects the instruction; `--set protect=tail` gives the paper's behaviour.
        let p = &mut config.policy;
        if args.policy.config.is_none()
            && p.name == "elastic"
            && !["protect", "protected_tail", "importance"]
                .iter()
                .any(|k| p.params.contains_key(*k))
        {
            p.set_param("protect", "instruction")?;
            println!(
                "demo: elastic protects the question after the image from its prefill merge, protect = instruction (the paper's: --set protect=tail)"
            );
        }
    }
    let model_dir = args.model.apply(&mut config)?;
    let (image, prompt) = match (args.image, args.prompt) {
        (image, Some(prompt)) => (image, prompt),
        (image, None) if demo => (
            Some(image.unwrap_or_else(|| model_dir.join("scene.png"))),
            ecache_demo::language::DESCRIBE.to_string(),
        ),
        (_, None) => return Err(BadInput("give --prompt TEXT".into()).into()),
    };
    if prompt.trim().is_empty() {
        return Err(BadInput("--prompt: the prompt is empty".into()).into());
    }
    let g = &mut config.generation;
    g.max_new_tokens = args.max_new_tokens.unwrap_or(g.max_new_tokens);
    g.temperature = args.temperature.unwrap_or(g.temperature);
    g.top_p = args.top_p.unwrap_or(g.top_p);
    g.seed = args.seed.unwrap_or(g.seed);
    config.validate()?;
    let policy = builtin_registry()?.build(&config.policy)?;
    // A policy without a target (the full cache) keeps everything: budget 1 in every
    // line printed, whatever budget the defaults or the config carried.
    if policy.keeps_everything() {
        config.policy.budget = 1.0;
    }
    let request = ecache_cli::generate::GenerateRequest {
        model_dir,
        image,
        prompt,
        config,
        pad_to_square: args.model.pad_to_square,
    };
    ecache_cli::generate::run(&request, demo || args.compare_full)
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
            "{name:<10} prefill importance: {:<5} decode attention: {:<5} prefill rows: {}",
            needs.prefill_importance, needs.decode_attention, needs.prefill_rows
        );
    }
    Ok(())
}

fn is_bad_input(err: &anyhow::Error) -> bool {
    err.downcast_ref::<BadInput>().is_some() || err.chain().any(|e| e.is::<ecache_core::Error>())
}

fn main() -> ExitCode {
    ecache_cli::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Trace(args) => trace_command(args),
        Command::Generate(args) => generate_command(args),
        Command::Eval(args) => eval_command(args),
        Command::Inspect(args) => ecache_cli::inspect::command(args),
        Command::Policies => policies_command(),
        Command::TrainDemo(args) => train_demo_command(args),
        Command::Study(args) => study_command(args),
        Command::Bench(args) => bench_command(args),
        Command::Serve(args) => ecache_cli::serve::command(args),
        Command::BenchServe(args) => ecache_cli::bench_serve::command(args),
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
