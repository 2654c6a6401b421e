//! `ecache serve`: the OpenAI-compatible server over the engine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ecache_engine::EngineConfig;
use ecache_server::ServerConfig;

use crate::BadInput;
use crate::args::{ModelArgs, PolicyArgs, run_config};
use crate::generate::{engine_config, load_engine};

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The model (default: the embedded demo model).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on; the default answers this machine only.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences decoding together.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Cap on the KV memory the running requests reserve (`256MiB`, `2GiB`, or `none`).
    #[arg(long, default_value = "1GiB")]
    pub kv_memory: String,
    /// Most requests waiting to start; more get 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// Largest request body; larger ones get 413.
    #[arg(long, default_value = "20MiB")]
    pub max_body: String,
    /// `max_tokens` of a request that gives none (cut to what the context leaves).
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Seconds that requests in flight may take after SIGTERM or Ctrl-C.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
    /// Require `Authorization: Bearer KEY` on /v1/*.
    #[arg(long, env = "ECACHE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// The default policy of requests without `kv_cache` (default: the full cache).
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// Parses a size such as `256MiB`, `1 GB` or `1048576` (bytes).
pub fn parse_size(flag: &str, text: &str) -> Result<usize> {
    let size: bytesize::ByteSize = text
        .trim()
        .parse()
        .map_err(|e| BadInput(format!("--{flag} {text:?}: {e} (e.g. 256MiB, 2GiB)")))?;
    Ok(size.as_u64() as usize)
}

/// The engine a serve run loads.
pub fn engine_for(args: &ServeArgs) -> Result<(EngineConfig, ServerConfig)> {
    let mut config = run_config(&args.policy, "full", 1.0)?;
    if args.model.model.is_none() && config.model.path.is_none() {
        config.model.path = Some(crate::demo::model_dir());
    }
    let dir: PathBuf = args.model.apply(&mut config)?;
    config.validate()?;
    let mut engine = engine_config(dir, &config);
    engine.pad_to_square = args.model.pad_to_square;
    engine.max_batch = args.max_batch;
    engine.max_queue = args.max_queue;
    // Images come from strangers: refuse big ones from their header (docs/serving.md).
    engine.image_limits = ecache_server::IMAGE_LIMITS;
    engine.kv_memory = match args.kv_memory.trim() {
        "none" => None,
        text => Some(parse_size("kv-memory", text)?),
    };
    if args.max_batch == 0 {
        return Err(BadInput("--max-batch must be at least 1".into()).into());
    }
    let server = ServerConfig {
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        max_body: parse_size("max-body", &args.max_body)?,
        max_tokens: args.max_tokens.max(1),
        shutdown_grace: Duration::from_secs(args.shutdown_timeout),
    };
    Ok((engine, server))
}

pub fn command(args: ServeArgs) -> Result<()> {
    let (engine_config, server) = engine_for(&args)?;
    // Logs on standard error; `RUST_LOG` chooses what (default: ecache's at info).
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new("ecache=info,ecache_server=info,ecache_engine=info")
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let addr: SocketAddr = format!("{}:{}", args.host, args.port)
        .parse()
        .map_err(|e| BadInput(format!("--host {} --port {}: {e}", args.host, args.port)))?;
    let engine = Arc::new(load_engine(engine_config)?);
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| BadInput(format!("cannot listen on {addr}: {e}")))?;
        let addr = listener.local_addr().unwrap_or(addr);
        let info = engine.info();
        let cap = match engine.stats().kv_cap {
            usize::MAX => "none".to_string(),
            c => bytesize::ByteSize(c as u64).to_string(),
        };
        println!(
            "serving {} on http://{addr} (context {}, KV cap {cap}, batch up to {}, default policy {} {})",
            info.id,
            info.context,
            args.max_batch,
            engine.default_policy().name,
            engine.default_policy().budget,
        );
        use std::io::Write;
        let _ = std::io::stdout().flush();
        ecache_server::serve(listener, engine, server, ecache_server::shutdown_signal())
            .await
            .context("the server failed")
    })
}
