//! # ecache-server
//!
//! An OpenAI-compatible HTTP server over the ecache [`Engine`]: `POST
//! /v1/chat/completions` (whole answers or server-sent events), `GET /v1/models`, `GET
//! /health`, `GET /metrics`. It parses, validates, authenticates and reports; it never
//! touches a tensor: every request goes to the engine, whose scheduler batches them.

mod convert;
mod error;
mod metrics;
pub mod openai;
mod routes;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ecache_engine::Engine;

pub use error::ApiError;
pub use metrics::Metrics;

/// What an image sent to a server may cost to decode: 8,192 pixels a side, 32 Mi pixels,
/// 512 MiB for the decoder; anything larger is refused from its header. `ecache serve`
/// gives these to its engine.
pub const IMAGE_LIMITS: ecache_engine::ImageLimits = ecache_engine::ImageLimits {
    max_side: 8192,
    max_pixels: 32 << 20,
    max_alloc: 512 << 20,
};

/// How the server behaves around the engine.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Requests to `/v1/*` must send `Authorization: Bearer KEY` when set.
    pub api_key: Option<String>,
    /// Largest request body in bytes; larger ones get 413.
    pub max_body: usize,
    /// `max_tokens` of a request that gives none (cut to what the context leaves).
    pub max_tokens: usize,
    /// After a shutdown signal, how long requests already accepted may take.
    pub shutdown_grace: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            api_key: None,
            max_body: 20 << 20,
            max_tokens: 256,
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// What the handlers share.
pub(crate) struct State {
    pub engine: Arc<Engine>,
    pub config: ServerConfig,
    pub metrics: Metrics,
    /// When the server started (the model's `created`).
    pub created: u64,
}

/// The server's routes over `engine`.
pub fn router(engine: Arc<Engine>, config: ServerConfig) -> axum::Router {
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    routes::router(Arc::new(State {
        engine,
        config,
        metrics: Metrics::default(),
        created,
    }))
}

/// Serves on `listener` until `shutdown` completes; then stops accepting connections and
/// requests, lets the requests already accepted finish within `config.shutdown_grace`
/// (those still running then fail, so that no connection hangs), and returns once every
/// connection has closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<Engine>,
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let grace = config.shutdown_grace;
    let app = router(engine.clone(), config);
    let drained = async move {
        shutdown.await;
        tracing::info!("shutting down: no new requests; finishing those in flight");
        // The engine refuses new requests at once and finishes the others in the
        // background; the server waits for their connections to close.
        std::thread::spawn(move || engine.shutdown(grace));
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(drained)
        .await
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
