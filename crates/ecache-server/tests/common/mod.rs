//! Set-up shared by the server's tests: an engine on the demo model, a server on an
//! ephemeral loopback port in this process, demo scenes as data URLs, and small HTTP
//! helpers. Every request goes to 127.0.0.1 only.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use ecache_engine::{Engine, EngineConfig};
use ecache_server::ServerConfig;
use serde_json::{Value, json};
use tokio::sync::oneshot;

pub fn demo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
}

/// A running server and what the test needs to drive it.
pub struct Server {
    pub url: String,
    pub engine: Arc<Engine>,
    pub client: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Starts a server on the demo model; `engine` and `server` adjust the defaults.
    pub async fn start(
        engine: impl FnOnce(&mut EngineConfig),
        server: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_on(demo_dir(), engine, server).await
    }

    /// Starts a server on the model in `dir`.
    pub async fn start_on(
        dir: PathBuf,
        engine: impl FnOnce(&mut EngineConfig),
        server: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let mut config = EngineConfig::new(dir);
        config.image_limits = ecache_server::IMAGE_LIMITS;
        engine(&mut config);
        let engine = Arc::new(
            tokio::task::spawn_blocking(move || Engine::load(config).unwrap())
                .await
                .unwrap(),
        );
        let mut server_config = ServerConfig::default();
        server(&mut server_config);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr: SocketAddr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(ecache_server::serve(
            listener,
            engine.clone(),
            server_config,
            async move {
                let _ = stopped.await;
            },
        ));
        Self {
            url: format!("http://{addr}"),
            engine,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            stop: Some(stop),
            done,
        }
    }

    /// Sends the shutdown signal.
    pub fn shut_down(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// POSTs a chat request; the status and the JSON body.
    pub async fn chat(&self, body: &Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    /// POSTs a streaming chat request and reads every event: the data lines in order.
    pub async fn stream(&self, body: &Value) -> Vec<String> {
        let mut r = self
            .client
            .post(format!("{}/v1/chat/completions", self.url))
            .json(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let mut text = String::new();
        while let Some(bytes) = r.chunk().await.unwrap() {
            text.push_str(&String::from_utf8_lossy(&bytes));
        }
        data_lines(&text)
    }

    /// The value of a metric without labels, from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self
            .client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in\n{text}"))
    }

    /// Waits (at most 20 s) until `name` reads `value`.
    pub async fn wait_metric(&self, name: &str, value: f64) {
        let start = Instant::now();
        while self.metric(name).await != value {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{name} never reached {value}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The `data:` payloads of a server-sent event stream.
pub fn data_lines(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
        .map(|l| l.trim().to_string())
        .collect()
}

/// The text a stream's chunks carry, and its finish reason.
pub fn streamed_text(events: &[String]) -> (String, Option<String>) {
    let mut text = String::new();
    let mut finish = None;
    for e in events.iter().filter(|e| e.as_str() != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            if let Some(t) = c["delta"]["content"].as_str() {
                text.push_str(t);
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = Some(f.to_string());
            }
        }
    }
    (text, finish)
}

/// Held-out demo scenes as PNG bytes.
pub fn scenes(n: usize) -> Vec<Vec<u8>> {
    ecache_demo::dataset::held_out_pngs(n, 2024)
}

pub fn data_url(png: &[u8]) -> String {
    format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    )
}

/// A user message with one image and one question.
pub fn body(png: &[u8], question: &str, max_tokens: usize) -> Value {
    json!({
        "model": "ecache-demo",
        "messages": [{
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(png)}},
                {"type": "text", "text": question}
            ]
        }],
        "max_tokens": max_tokens
    })
}
