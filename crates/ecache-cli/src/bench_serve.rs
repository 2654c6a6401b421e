//! `ecache bench-serve`: memory turned into throughput. For each policy, a server on a
//! loopback port is driven over real HTTP by concurrent streaming clients (demo-model
//! scenes, descriptions of a fixed length) under one KV cap; a plain loop of one-at-a-time
//! requests under the full cache is the further baseline. Prints a table; writes JSON.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine as _;
use ecache_core::PolicyConfig;
use ecache_engine::{Engine, EngineConfig, ImageInput, Message, Part, Request, Role};
use serde::Serialize;
use serde_json::{Value, json};

use crate::BadInput;
use crate::args::{DeviceArgs, PolicyArgs, run_config};
use crate::generate::{engine_config, engine_error, load_engine};

#[derive(clap::Args)]
pub struct BenchServeArgs {
    /// The model (default: the embedded demo model).
    #[arg(long, conflicts_with = "shape")]
    pub model: Option<PathBuf>,
    /// Instead of a model directory, random weights of a named shape, written to a
    /// temporary directory with the demo's vision tower, tokenizer and processor:
    /// `serve-mid` (llava-mid's text decoder, 1024 wide and 12 layers, where a decode
    /// step reads more weights than it computes with at small batches).
    #[arg(long)]
    pub shape: Option<String>,
    /// With --shape: write the random model here and keep it (for `step_cost` and other
    /// tools) instead of a temporary directory.
    #[arg(long, requires = "shape")]
    pub keep_model: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// Policies to serve, one run each (full is always the budget-1 full cache).
    #[arg(long, value_delimiter = ',', default_value = "full,elastic,h2o")]
    pub policies: Vec<String>,
    /// Budget of every policy but full.
    #[arg(long, value_delimiter = ',', default_value = "0.2")]
    pub budgets: Vec<f64>,
    /// The KV cap of every run (default: four full-cache requests' reservations).
    #[arg(long)]
    pub kv_memory: Option<String>,
    /// Most sequences decoding together (the cap is meant to bind first).
    #[arg(long, default_value_t = 64)]
    pub max_batch: usize,
    /// Measured requests per run.
    #[arg(long, default_value_t = 96)]
    pub requests: usize,
    /// Clients sending requests at once.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// New tokens per request.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    /// Let answers stop at EOS (by default every request generates --max-tokens tokens).
    #[arg(long)]
    pub stop_at_eos: bool,
    /// Unmeasured requests before each run.
    #[arg(long, default_value_t = 4)]
    pub warmup: usize,
    /// Requests of the one-at-a-time baseline (0 skips it).
    #[arg(long, default_value_t = 16)]
    pub baseline_requests: usize,
    /// Policy parameters (`--set protected_tail=10`) for the policy they belong to.
    #[command(flatten)]
    pub policy: PolicyArgs,
    /// Write the report as JSON here as well.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// One run's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ServeRow {
    pub policy: String,
    pub budget: f64,
    pub params: String,
    /// `http` for the served runs, `sequential` for the one-at-a-time baseline.
    pub mode: String,
    pub requests: usize,
    pub concurrency: usize,
    pub tokens_per_s: f64,
    /// Tokens per second of the time the scheduler was not prefilling: what the decode
    /// steps alone delivered.
    pub decode_tokens_per_s: f64,
    pub requests_per_s: f64,
    pub max_concurrent: usize,
    pub ttft_p50_s: f64,
    pub ttft_p99_s: f64,
    pub latency_p50_s: f64,
    pub latency_p99_s: f64,
    pub kv_peak_bytes: usize,
    pub kv_reserved_per_request: usize,
}

#[derive(Debug, Serialize)]
pub struct ServeReport {
    pub model: String,
    pub machine: crate::machine::Machine,
    pub kv_cap_bytes: usize,
    pub prompt_tokens: usize,
    pub max_tokens: usize,
    pub rows: Vec<ServeRow>,
}

pub fn command(args: BenchServeArgs) -> Result<()> {
    if args.requests == 0 || args.concurrency == 0 {
        return Err(BadInput("--requests and --concurrency must be at least 1".into()).into());
    }
    let mut config = run_config(&args.policy, "full", 1.0)?;
    args.device.apply(&mut config)?;
    config.validate()?;
    let scratch = match &args.shape {
        Some(name) => Some(random_model(name, args.keep_model.as_deref())?),
        None => None,
    };
    let dir = match (&scratch, &args.model) {
        (Some(s), _) => s.0.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => crate::demo::model_dir(),
    };
    let runs = crate::eval::grid(&config, &args.policies, &args.budgets);
    if let Some(why) = crate::eval::unused_params(&config, &runs) {
        return Err(BadInput(why).into());
    }
    let base = engine_config(dir, &config);
    let pictures = ecache_demo::dataset::held_out_pngs(
        args.requests.max(args.baseline_requests) + args.warmup,
        2024,
    );
    // The probe engine sizes the cap and runs the one-at-a-time baseline.
    let probe = load_engine(base.clone())?;
    let full = PolicyConfig::new("full", 1.0);
    let per_full = probe
        .estimate(request(&pictures[0], &full, &args))
        .map_err(|e| engine_error(e.into()))?;
    let cap = match &args.kv_memory {
        Some(text) => crate::serve::parse_size("kv-memory", text)?,
        None => 4 * per_full.bytes + per_full.bytes / 2,
    };
    let mut rows = Vec::new();
    for run in &runs {
        let reserved = probe
            .estimate(request(&pictures[0], run, &args))
            .map_err(|e| engine_error(e.into()))?;
        if reserved.bytes > cap {
            return Err(BadInput(format!(
                "one {} request reserves {} bytes, more than the cap of {cap}",
                run.name, reserved.bytes
            ))
            .into());
        }
        let mut engine = base.clone();
        engine.kv_memory = Some(cap);
        engine.max_batch = args.max_batch;
        engine.max_queue = usize::MAX;
        let row = served(engine, run, &args, &pictures, reserved.bytes)?;
        eprintln!(
            "{} {}: {:.1} tokens/s, {} at once",
            row.policy, row.budget, row.tokens_per_s, row.max_concurrent
        );
        rows.push(row);
    }
    if args.baseline_requests > 0 {
        rows.push(sequential(&probe, &full, &args, &pictures, per_full.bytes)?);
    }
    let report = ServeReport {
        model: match &args.shape {
            Some(shape) => format!("{shape} (random weights)"),
            None => probe.info().id.clone(),
        },
        machine: crate::machine::Machine::measured(),
        kv_cap_bytes: cap,
        prompt_tokens: per_full.prompt_tokens,
        max_tokens: args.max_tokens,
        rows,
    };
    print!("{}", table(&report));
    if let Some(path) = &args.output {
        crate::eval::write_atomically(path, &(serde_json::to_string_pretty(&report)? + "\n"))?;
    }
    Ok(())
}

/// A model directory written for the run, removed when dropped unless kept.
struct Scratch(PathBuf, bool);

impl Drop for Scratch {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Writes a model of a named shape with random weights (seed 0), into `keep` or a
/// temporary directory.
fn random_model(name: &str, keep: Option<&std::path::Path>) -> Result<Scratch> {
    use ecache_demo::model_dir::{DemoShape, write_descriptors};
    let shape = match name {
        "serve-mid" => DemoShape {
            text_hidden: 1024,
            text_layers: 12,
            text_heads: 16,
            text_kv_heads: 16,
            text_intermediate: 2816,
            ..DemoShape::default()
        },
        other => {
            return Err(BadInput(format!("--shape {other}: the known shape is serve-mid")).into());
        }
    };
    let dir = match keep {
        Some(dir) => Scratch(dir.to_path_buf(), true),
        None => Scratch(
            std::env::temp_dir().join(format!("ecache-bench-serve-{name}-{}", std::process::id())),
            false,
        ),
    };
    write_descriptors(&dir.0, &shape)?;
    let config = ecache_model::LlavaConfig::from_path(&dir.0.join("config.json"))?;
    let device = Default::default();
    let model = ecache_model::Llava::<burn::backend::Flex>::init(
        &config,
        &device,
        burn::tensor::DType::F32,
        0,
    );
    model.export().save(&dir.0.join("model.safetensors"))?;
    Ok(dir)
}

/// The engine request the HTTP body below becomes.
fn request(png: &[u8], policy: &PolicyConfig, args: &BenchServeArgs) -> Request {
    let mut r = Request::chat(vec![Message {
        role: Role::User,
        parts: vec![
            Part::Image(ImageInput::Bytes {
                data: png.to_vec(),
                name: "scene.png".into(),
            }),
            Part::Text(ecache_demo::language::DESCRIBE.into()),
        ],
    }]);
    r.max_new_tokens = args.max_tokens;
    r.ignore_eos = !args.stop_at_eos;
    r.policy = Some(policy.clone());
    r
}

fn body(png: &[u8], policy: &PolicyConfig, args: &BenchServeArgs) -> Value {
    let url = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    );
    let params: serde_json::Map<String, Value> = policy
        .params
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::to_value(v).unwrap_or(Value::Null)))
        .collect();
    json!({
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": ecache_demo::language::DESCRIBE}]}],
        "max_tokens": args.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
        "ignore_eos": !args.stop_at_eos,
        "kv_cache": {"policy": policy.name, "budget": policy.budget, "params": params},
    })
}

/// What one client saw of one request.
struct Sample {
    ttft: f64,
    latency: f64,
    tokens: usize,
}

/// One policy served over HTTP to concurrent streaming clients.
fn served(
    config: EngineConfig,
    policy: &PolicyConfig,
    args: &BenchServeArgs,
    pictures: &[Vec<u8>],
    reserved: usize,
) -> Result<ServeRow> {
    let engine = Arc::new(load_engine(config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let bodies: Vec<Value> = pictures.iter().map(|p| body(p, policy, args)).collect();
    let (samples, wall, prefill) = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/v1/chat/completions", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(ecache_server::serve(
            listener,
            engine.clone(),
            ecache_server::ServerConfig::default(),
            async move {
                let _ = stopped.await;
            },
        ));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(600))
            .build()?;
        drive(&client, &url, &bodies[..args.warmup], args.concurrency).await?;
        engine.reset_peaks();
        let prefill_before = engine.stats().prefill_seconds;
        let start = Instant::now();
        let measured = &bodies[args.warmup..args.warmup + args.requests];
        let samples = drive(&client, &url, measured, args.concurrency).await?;
        let wall = start.elapsed().as_secs_f64();
        let prefill = engine.stats().prefill_seconds - prefill_before;
        let _ = stop.send(());
        server.await??;
        Ok::<_, anyhow::Error>((samples, wall, prefill))
    })?;
    let stats = engine.stats();
    Ok(row(
        policy,
        "http",
        args.concurrency,
        &samples,
        (wall, prefill),
        stats.peak_active,
        stats.peak_kv_in_use,
        reserved,
    ))
}

/// Sends `bodies` with `concurrency` clients at a time, each request streamed.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    bodies: &[Value],
    concurrency: usize,
) -> Result<Vec<Sample>> {
    let next = AtomicUsize::new(0);
    let clients = (0..concurrency.min(bodies.len().max(1))).map(|_| async {
        let mut samples = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(body) = bodies.get(i) else {
                return Ok::<_, anyhow::Error>(samples);
            };
            samples.push(one(client, url, body).await?);
        }
    });
    let mut all = Vec::new();
    for samples in futures_util::future::join_all(clients).await {
        all.extend(samples?);
    }
    Ok(all)
}

/// One streamed request: time to the first content, to the end, and tokens generated.
async fn one(client: &reqwest::Client, url: &str, body: &Value) -> Result<Sample> {
    let start = Instant::now();
    let mut response = client.post(url).json(body).send().await?;
    if !response.status().is_success() {
        let status = response.status();
        anyhow::bail!("the server answered {status}: {}", response.text().await?);
    }
    let mut ttft = None;
    let mut tokens = 0;
    let mut pending = String::new();
    while let Some(bytes) = response.chunk().await? {
        pending.push_str(&String::from_utf8_lossy(&bytes));
        while let Some(end) = pending.find("\n\n") {
            let event: String = pending.drain(..end + 2).collect();
            // Comments (keep-alives) and other fields carry no data.
            let Some(data) = event.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let data = data.trim();
            if data == "[DONE]" || data.is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(data)?;
            if ttft.is_none()
                && v["choices"][0]["delta"]["content"]
                    .as_str()
                    .is_some_and(|t| !t.is_empty())
            {
                ttft = Some(start.elapsed().as_secs_f64());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                tokens = n as usize;
            }
            if v.get("error").is_some() {
                anyhow::bail!("the request failed: {}", v["error"]);
            }
        }
    }
    let latency = start.elapsed().as_secs_f64();
    Ok(Sample {
        ttft: ttft.unwrap_or(latency),
        latency,
        tokens,
    })
}

/// The baseline: the same requests one after another, nothing batched.
fn sequential(
    engine: &Engine,
    policy: &PolicyConfig,
    args: &BenchServeArgs,
    pictures: &[Vec<u8>],
    reserved: usize,
) -> Result<ServeRow> {
    for png in &pictures[..args.warmup.min(pictures.len())] {
        engine
            .generate(request(png, policy, args))
            .map_err(engine_error)?;
    }
    engine.reset_peaks();
    let prefill_before = engine.stats().prefill_seconds;
    let start = Instant::now();
    let mut samples = Vec::new();
    for png in &pictures[args.warmup..args.warmup + args.baseline_requests] {
        let asked = Instant::now();
        let done = engine
            .generate(request(png, policy, args))
            .map_err(engine_error)?;
        samples.push(Sample {
            ttft: done.stats.first_token_seconds,
            latency: asked.elapsed().as_secs_f64(),
            tokens: done.usage.completion_tokens,
        });
    }
    let wall = start.elapsed().as_secs_f64();
    let stats = engine.stats();
    let prefill = stats.prefill_seconds - prefill_before;
    Ok(row(
        policy,
        "sequential",
        1,
        &samples,
        (wall, prefill),
        stats.peak_active,
        stats.peak_kv_in_use,
        reserved,
    ))
}

#[allow(clippy::too_many_arguments)]
fn row(
    policy: &PolicyConfig,
    mode: &str,
    concurrency: usize,
    samples: &[Sample],
    (wall, prefill): (f64, f64),
    max_concurrent: usize,
    kv_peak_bytes: usize,
    reserved: usize,
) -> ServeRow {
    let tokens: usize = samples.iter().map(|s| s.tokens).sum();
    let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
    let latency: Vec<f64> = samples.iter().map(|s| s.latency).collect();
    ServeRow {
        policy: policy.name.clone(),
        budget: if policy.name == "full" {
            1.0
        } else {
            policy.budget
        },
        params: crate::eval::params_label(policy),
        mode: mode.into(),
        requests: samples.len(),
        concurrency,
        tokens_per_s: tokens as f64 / wall,
        decode_tokens_per_s: tokens as f64 / (wall - prefill).max(1e-9),
        requests_per_s: samples.len() as f64 / wall,
        max_concurrent,
        ttft_p50_s: percentile(&ttft, 0.5),
        ttft_p99_s: percentile(&ttft, 0.99),
        latency_p50_s: percentile(&latency, 0.5),
        latency_p99_s: percentile(&latency, 0.99),
        kv_peak_bytes,
        kv_reserved_per_request: reserved,
    }
}

/// The nearest-rank percentile.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// A markdown table of the report.
pub fn table(report: &ServeReport) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let mut out = format!(
        "{} on {} ({} threads, {}, {}); {} prompt tokens + {} new per request; KV cap {:.2} MiB\n\n",
        report.model,
        report.machine.cpu,
        report.machine.threads,
        report.machine.simd,
        report
            .machine
            .bandwidth_gb_s
            .map_or("bandwidth not measured".to_string(), |b| format!(
                "{b:.1} GB/s triad"
            )),
        report.prompt_tokens,
        report.max_tokens,
        mib(report.kv_cap_bytes)
    );
    out += "| policy | budget | mode | requests | clients | tokens/s | tokens/s outside prefill | requests/s | max concurrent | TTFT p50 s | TTFT p99 s | latency p50 s | latency p99 s | KV peak MiB | KV per request MiB |\n";
    out += "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &report.rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {:.1} | {:.1} | {:.2} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.2} | {:.3} |\n",
            r.policy,
            r.budget,
            r.mode,
            r.requests,
            r.concurrency,
            r.tokens_per_s,
            r.decode_tokens_per_s,
            r.requests_per_s,
            r.max_concurrent,
            r.ttft_p50_s,
            r.ttft_p99_s,
            r.latency_p50_s,
            r.latency_p99_s,
            mib(r.kv_peak_bytes),
            mib(r.kv_reserved_per_request),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
    }
}
