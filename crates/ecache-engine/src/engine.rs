//! The engine handle: loading, submitting, reading answers, statistics, shutdown.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ecache_core::{BackendKind, PolicyConfig, Precision, Registry};
use ecache_model::preprocess::ImageLimits;
use ecache_model::{Architecture, Frontend, FrontendOptions};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::admission::KvLayout;
use crate::prepare::Checker;
use crate::request::{Completion, EngineError, Event, Request, SubmitError};
use crate::scheduler::{self, Msg};

/// How an engine is set up.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A Hugging Face model directory of any architecture `ecache_model` loads
    /// (config.json, weights, tokenizer.json,
    /// preprocessor_config.json).
    pub model_dir: PathBuf,
    pub backend: BackendKind,
    pub dtype: Precision,
    /// Most sequences decoding together.
    pub max_batch: usize,
    /// Most KV bytes the running requests may reserve together; `None` for no cap.
    pub kv_memory: Option<usize>,
    /// Most requests waiting to start; more are refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
    /// The policy of requests that name none.
    pub policy: PolicyConfig,
    /// Pad images to a square with the mean colour first (LLaVA-1.5's evaluation).
    pub pad_to_square: bool,
    /// What an image may cost to decode.
    pub image_limits: ImageLimits,
    /// Image features kept for reuse by later requests showing the same picture.
    pub image_cache: usize,
    /// The policies requests may name; `None` for the built-in ones.
    pub registry: Option<Registry>,
}

impl EngineConfig {
    /// The defaults for a model directory: CPU (`flex`), f32, 16 sequences, no KV cap, a
    /// queue of 1,024, the full cache.
    pub fn new(model_dir: impl Into<PathBuf>) -> Self {
        Self {
            model_dir: model_dir.into(),
            backend: BackendKind::Flex,
            dtype: Precision::F32,
            max_batch: 16,
            kv_memory: None,
            max_queue: 1024,
            policy: PolicyConfig::new("full", 1.0),
            pad_to_square: false,
            image_limits: ImageLimits::default(),
            image_cache: 8,
            registry: None,
        }
    }
}

/// What the engine serves.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The model directory's name.
    pub id: String,
    /// `max_position_embeddings`: prompt and new tokens together.
    pub context: usize,
    /// Which architecture the model is.
    pub architecture: Architecture,
    /// Slots every image takes when that is fixed (LLaVA); `None` when it follows each
    /// picture's size (Qwen2-VL).
    pub image_tokens: Option<usize>,
    pub eos: Vec<u32>,
    pub vocab: usize,
    pub layout: KvLayout,
    pub backend: BackendKind,
    pub dtype: Precision,
}

/// What a request would reserve ([`Engine::estimate`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Prompt slots, image tokens included.
    pub prompt_tokens: usize,
    /// New tokens it may generate (the answer's length for a score task).
    pub max_new_tokens: usize,
    /// Slots per layer it can grow to under its policy.
    pub slots: usize,
    /// KV bytes of those slots in every layer.
    pub bytes: usize,
}

/// A snapshot of the engine's state and counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineStats {
    /// Requests waiting to start.
    pub queued: usize,
    /// Requests running (prefilled, decoding).
    pub active: usize,
    /// KV bytes reserved by the running requests, held by their slots, and allocated
    /// by their buffers.
    pub kv_reserved: usize,
    pub kv_in_use: usize,
    pub kv_allocated: usize,
    /// The cap on reservations (`usize::MAX` for none).
    pub kv_cap: usize,
    /// Most requests running at once, and most KV bytes held at once, since the last
    /// [`Engine::reset_peaks`].
    pub peak_active: usize,
    pub peak_kv_in_use: usize,
    /// Tokens generated and prompt tokens prefilled, in all.
    pub tokens_generated: u64,
    pub prompt_tokens: u64,
    /// Seconds the scheduler spent prefilling (image features included), in all: while
    /// it prefills, the running sequences wait.
    pub prefill_seconds: f64,
    /// Requests finished, failed, and cancelled by their clients.
    pub finished: u64,
    pub failed: u64,
    pub cancelled: u64,
}

/// Counters shared by the handle and the scheduler thread.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub queued: AtomicUsize,
    pub active: AtomicUsize,
    pub kv_reserved: AtomicUsize,
    pub kv_in_use: AtomicUsize,
    pub kv_allocated: AtomicUsize,
    pub peak_active: AtomicUsize,
    pub peak_kv_in_use: AtomicUsize,
    pub tokens_generated: AtomicU64,
    pub prompt_tokens: AtomicU64,
    /// Microseconds spent prefilling.
    pub prefill_micros: AtomicU64,
    pub finished: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
}

/// What the handle and the scheduler thread share.
pub(crate) struct Shared {
    pub frontend: Box<dyn Frontend>,
    pub info: ModelInfo,
    pub registry: Registry,
    pub default_policy: PolicyConfig,
    pub image_limits: ImageLimits,
    pub cap: usize,
    pub max_queue: usize,
    pub counters: Counters,
    pub accepting: AtomicBool,
    next_id: AtomicU64,
    seed_base: u64,
}

/// An engine: one model, one scheduler thread, any number of requests in flight.
/// `Send + Sync`: share it (in an `Arc`) between threads or tasks.
pub struct Engine {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Engine {
    /// Loads the model on the configured backend and starts the scheduler.
    pub fn load(config: EngineConfig) -> Result<Self, EngineError> {
        let dir = config.model_dir.clone();
        let load =
            |e: &dyn std::fmt::Display| EngineError::Load(format!("model {}: {e}", dir.display()));
        let options = FrontendOptions {
            pad_to_square: config.pad_to_square,
        };
        let frontend = ecache_model::load_frontend(&dir, options).map_err(|e| load(&e))?;
        let registry = match config.registry.clone() {
            Some(r) => r,
            None => crate::builtin_registry().map_err(|e| load(&e))?,
        };
        registry
            .build(&config.policy)
            .map_err(|e| EngineError::Load(format!("default policy: {e}")))?;
        if config.max_batch == 0 {
            return Err(EngineError::Load("max_batch must be at least 1".into()));
        }
        let dtype = ecache_model::backend::dtype(config.dtype);
        let text = frontend.text();
        let architecture = frontend.architecture();
        let info = ModelInfo {
            id: model_id(&dir),
            architecture,
            context: text.max_positions,
            image_tokens: frontend.image_tokens(),
            eos: text.eos_token_ids.clone(),
            vocab: text.vocab_size,
            layout: KvLayout {
                layers: text.layers,
                kv_heads: text.kv_heads,
                head_dim: text.head_dim,
                dtype_bytes: dtype.size(),
            },
            backend: config.backend,
            dtype: config.dtype,
        };
        let seed_base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let shared = Arc::new(Shared {
            frontend,
            info,
            registry,
            default_policy: config.policy.clone(),
            image_limits: config.image_limits,
            cap: config.kv_memory.unwrap_or(usize::MAX),
            max_queue: config.max_queue,
            counters: Counters::default(),
            accepting: AtomicBool::new(true),
            next_id: AtomicU64::new(1),
            seed_base,
        });
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread = {
            let shared = shared.clone();
            let settings = scheduler::Settings {
                model_dir: dir.clone(),
                backend: config.backend,
                dtype,
                max_batch: config.max_batch,
                image_cache: config.image_cache,
            };
            std::thread::Builder::new()
                .name("ecache-scheduler".into())
                .spawn(move || scheduler::run(settings, shared, rx, ready_tx))
                .map_err(|e| EngineError::Load(format!("cannot start the scheduler: {e}")))?
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Self {
                shared,
                tx,
                thread: Mutex::new(Some(thread)),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(EngineError::Load(e))
            }
            Err(_) => {
                let _ = thread.join();
                Err(EngineError::Load(
                    "the scheduler stopped while loading the model".into(),
                ))
            }
        }
    }

    /// What the engine serves.
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The engine's default policy section.
    pub fn default_policy(&self) -> &PolicyConfig {
        &self.shared.default_policy
    }

    /// Checks a request without queueing it, and says what it would reserve: its prompt
    /// slots, the slots per layer it can grow to under its policy, and those in bytes.
    pub fn estimate(&self, request: Request) -> Result<Estimate, SubmitError> {
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let prepared = self.checker().prepare(request, 0, 0, tx)?;
        Ok(Estimate {
            prompt_tokens: prepared.prompt_tokens,
            max_new_tokens: prepared.max_new_tokens,
            slots: prepared.slots,
            bytes: prepared.reservation,
        })
    }

    fn checker(&self) -> Checker<'_> {
        let shared = &self.shared;
        Checker {
            frontend: shared.frontend.as_ref(),
            info: &shared.info,
            registry: &shared.registry,
            default_policy: &shared.default_policy,
            limits: &shared.image_limits,
            layout: shared.info.layout,
            cap: usize::MAX,
        }
    }

    /// Checks a request and queues it. Requests without a seed get one of their own
    /// (different every time); give one to repeat a sampled answer.
    pub fn submit(&self, request: Request) -> Result<RequestHandle, SubmitError> {
        let shared = &self.shared;
        if !shared.accepting.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let checker = Checker {
            cap: shared.cap,
            ..self.checker()
        };
        let seed = splitmix(shared.seed_base ^ id);
        let prepared = checker.prepare(request, id, seed, tx)?;
        let prompt_tokens = prepared.prompt_tokens;
        let queued = shared.counters.queued.fetch_add(1, Ordering::SeqCst);
        if queued >= shared.max_queue {
            shared.counters.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::QueueFull(queued));
        }
        if self.tx.send(Msg::Submit(Box::new(prepared))).is_err() {
            shared.counters.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::ShuttingDown);
        }
        Ok(RequestHandle {
            id,
            prompt_tokens,
            rx,
        })
    }

    /// Submits a request and waits for its whole answer (blocking; call it outside async
    /// code).
    pub fn generate(&self, request: Request) -> Result<Completion, EngineError> {
        self.submit(request)?.wait()
    }

    /// A snapshot of the engine's state and counters.
    pub fn stats(&self) -> EngineStats {
        let c = &self.shared.counters;
        let u = |a: &AtomicUsize| a.load(Ordering::Relaxed);
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EngineStats {
            queued: u(&c.queued),
            active: u(&c.active),
            kv_reserved: u(&c.kv_reserved),
            kv_in_use: u(&c.kv_in_use),
            kv_allocated: u(&c.kv_allocated),
            kv_cap: self.shared.cap,
            peak_active: u(&c.peak_active),
            peak_kv_in_use: u(&c.peak_kv_in_use),
            tokens_generated: n(&c.tokens_generated),
            prompt_tokens: n(&c.prompt_tokens),
            prefill_seconds: n(&c.prefill_micros) as f64 * 1e-6,
            finished: n(&c.finished),
            failed: n(&c.failed),
            cancelled: n(&c.cancelled),
        }
    }

    /// Starts the peaks of [`EngineStats`] again from the present state.
    pub fn reset_peaks(&self) {
        let c = &self.shared.counters;
        c.peak_active
            .store(c.active.load(Ordering::Relaxed), Ordering::Relaxed);
        c.peak_kv_in_use
            .store(c.kv_in_use.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Whether new requests are still accepted.
    pub fn accepting(&self) -> bool {
        self.shared.accepting.load(Ordering::SeqCst)
    }

    /// Stops accepting requests, lets those already accepted (running or queued) finish
    /// until `grace` has passed, fails the rest, and stops the scheduler. Returns when it
    /// has stopped.
    pub fn shutdown(&self, grace: Duration) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Shutdown {
            deadline: Instant::now() + grace,
        });
        self.join();
    }

    fn join(&self) {
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shared.accepting.store(false, Ordering::SeqCst);
        let _ = self.tx.send(Msg::Shutdown {
            deadline: Instant::now(),
        });
        self.join();
    }
}

/// The answer to one request, as it is produced. Dropping the handle cancels the request:
/// it leaves the batch at the next step and its reservation is freed.
#[derive(Debug)]
pub struct RequestHandle {
    id: u64,
    prompt_tokens: usize,
    rx: UnboundedReceiver<Event>,
}

impl RequestHandle {
    /// The request's number (in submission order).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Prompt slots, image tokens included.
    pub fn prompt_tokens(&self) -> usize {
        self.prompt_tokens
    }

    /// The next event; `None` after [`Event::Done`] or [`Event::Failed`].
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }

    /// The next event, blocking (outside async code).
    pub fn blocking_next(&mut self) -> Option<Event> {
        self.rx.blocking_recv()
    }

    /// Waits for the whole answer (blocking, outside async code).
    pub fn wait(mut self) -> Result<Completion, EngineError> {
        loop {
            match self.blocking_next() {
                Some(Event::Token { .. }) => continue,
                Some(event) => return finished(event),
                None => return finished(Event::Failed(ended())),
            }
        }
    }

    /// Waits for the whole answer (async).
    pub async fn completion(mut self) -> Result<Completion, EngineError> {
        loop {
            match self.next().await {
                Some(Event::Token { .. }) => continue,
                Some(event) => return finished(event),
                None => return finished(Event::Failed(ended())),
            }
        }
    }
}

fn ended() -> String {
    "the engine stopped before the request finished".into()
}

fn finished(event: Event) -> Result<Completion, EngineError> {
    match event {
        Event::Done(c) => Ok(*c),
        Event::Failed(why) => Err(EngineError::Failed(why)),
        Event::Token { .. } => Err(EngineError::Failed("unexpected token".into())),
    }
}

/// The model's id: its directory's name.
fn model_id(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    canonical
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned())
}

/// SplitMix64's output function: well-spread seeds from consecutive numbers.
fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
