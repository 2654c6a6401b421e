//! `GET /metrics` in Prometheus's text format (the `prometheus-client` crate, one registry
//! per server, so that several servers in one process keep their own): the engine's
//! queue, batch and KV memory as gauges read at scrape time, its counters, and request
//! latencies observed by the handlers.

use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use ecache_engine::EngineStats;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// The server's metrics.
pub struct Metrics {
    registry: Mutex<Registry>,
    queued: Gauge,
    active: Gauge,
    kv_reserved: Gauge,
    kv_in_use: Gauge,
    kv_allocated: Gauge,
    kv_cap: Gauge,
    generated: Counter<u64, AtomicU64>,
    prompt: Counter<u64, AtomicU64>,
    outcomes: Family<Labels, Counter<u64, AtomicU64>>,
    /// Answers by HTTP status (errors included).
    pub responses: Family<Labels, Counter<u64, AtomicU64>>,
    /// Seconds from the request's arrival to its last token.
    pub latency: Histogram,
    /// Seconds from the request's arrival to its first token.
    pub first_token: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("ecache");
        let gauge = |r: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            r.register(name, help, g.clone());
            g
        };
        let queued = gauge(&mut r, "queue_length", "Requests waiting to start");
        let active = gauge(
            &mut r,
            "active_sequences",
            "Requests prefilled and decoding",
        );
        let kv_reserved = gauge(
            &mut r,
            "kv_reserved_bytes",
            "KV bytes the running requests reserve (what they can grow to)",
        );
        let kv_in_use = gauge(
            &mut r,
            "kv_in_use_bytes",
            "KV bytes held by the running requests' slots",
        );
        let kv_allocated = gauge(
            &mut r,
            "kv_allocated_bytes",
            "KV bytes of the running requests' buffers",
        );
        let kv_cap = gauge(
            &mut r,
            "kv_cap_bytes",
            "The cap on reserved KV bytes (-1: none)",
        );
        let generated = Counter::default();
        r.register("generated_tokens", "Tokens generated", generated.clone());
        let prompt = Counter::default();
        r.register("prompt_tokens", "Prompt tokens prefilled", prompt.clone());
        let outcomes = Family::default();
        r.register(
            "requests",
            "Requests that left the engine, by outcome (finished, failed, cancelled)",
            outcomes.clone(),
        );
        let responses = Family::default();
        r.register(
            "http_responses",
            "Chat completion answers by HTTP status",
            responses.clone(),
        );
        let latency = Histogram::new(exponential_buckets(0.005, 2.0, 16));
        r.register(
            "request_duration_seconds",
            "Seconds from a chat completion's arrival to its last token",
            latency.clone(),
        );
        let first_token = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        r.register(
            "time_to_first_token_seconds",
            "Seconds from a chat completion's arrival to its first token",
            first_token.clone(),
        );
        Self {
            registry: Mutex::new(r),
            queued,
            active,
            kv_reserved,
            kv_in_use,
            kv_allocated,
            kv_cap,
            generated,
            prompt,
            outcomes,
            responses,
            latency,
            first_token,
        }
    }
}

impl Metrics {
    /// Counts an answer of `status`.
    pub fn respond(&self, status: u16) {
        self.responses
            .get_or_create(&vec![("status".into(), status.to_string())])
            .inc();
    }

    /// The text exposition, with the engine's state as of now.
    pub fn render(&self, stats: &EngineStats) -> String {
        let set = |g: &Gauge, v: usize| {
            g.set(i64::try_from(v).unwrap_or(-1));
        };
        set(&self.queued, stats.queued);
        set(&self.active, stats.active);
        set(&self.kv_reserved, stats.kv_reserved);
        set(&self.kv_in_use, stats.kv_in_use);
        set(&self.kv_allocated, stats.kv_allocated);
        set(&self.kv_cap, stats.kv_cap);
        // The engine's totals only grow: bring the counters up to them.
        let catch_up = |c: &Counter<u64, AtomicU64>, total: u64| {
            c.inc_by(total.saturating_sub(c.get()));
        };
        catch_up(&self.generated, stats.tokens_generated);
        catch_up(&self.prompt, stats.prompt_tokens);
        for (outcome, total) in [
            ("finished", stats.finished),
            ("failed", stats.failed),
            ("cancelled", stats.cancelled),
        ] {
            catch_up(
                &self
                    .outcomes
                    .get_or_create(&vec![("outcome".into(), outcome.into())]),
                total,
            );
        }
        let mut out = String::new();
        if let Ok(registry) = self.registry.lock() {
            let _ = encode(&mut out, &registry);
        }
        out
    }
}
