//! The scheduler thread: it owns the model and the running batch. Each iteration drops the
//! requests whose clients left, starts at most one waiting request (its prefill, then it
//! joins the batch), and takes one decode step for every running sequence. Nothing numeric
//! leaves this thread; tokens go out over each request's channel, whose sends never block.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Instant;

use burn::tensor::{DType, Tensor, backend::Backend};
use ecache_core::BackendKind;
use ecache_model::generate::{SeededRng, nll, rows_of, sample};
use ecache_model::{Runner, Sampling, Sequence, VisionLanguageModel};

use crate::admission::Admission;
use crate::engine::Shared;
use crate::prepare::{Pixels, Prepared};
use crate::request::{Completion, Event, FinishReason, Stats, Usage};
use crate::text::TextStream;

/// Messages to the scheduler.
pub(crate) enum Msg {
    Submit(Box<Prepared>),
    /// Accept nothing more; finish what was accepted until the deadline, fail the rest.
    Shutdown {
        deadline: Instant,
    },
}

/// What the scheduler thread is started with.
pub(crate) struct Settings {
    pub model_dir: PathBuf,
    pub backend: BackendKind,
    pub dtype: DType,
    pub max_batch: usize,
    pub image_cache: usize,
}

/// Loads the model on the configured backend, reports readiness, and runs the loop.
pub(crate) fn run(
    settings: Settings,
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Msg>,
    ready: mpsc::SyncSender<Result<(), String>>,
) {
    struct Job {
        settings: Settings,
        shared: Arc<Shared>,
        rx: mpsc::Receiver<Msg>,
        ready: mpsc::SyncSender<Result<(), String>>,
    }
    impl ecache_model::backend::BackendJob for Job {
        type Output = ();
        fn run<B: ecache_model::kernels::KernelBackend>(self, device: &B::Device) {
            let s = &self.settings;
            let model = match ecache_model::load_model::<B>(&s.model_dir, device, s.dtype) {
                Ok(model) => model,
                Err(e) => {
                    let _ = self
                        .ready
                        .send(Err(format!("model {}: {e}", s.model_dir.display())));
                    return;
                }
            };
            let _ = self.ready.send(Ok(()));
            Scheduler::new(model.as_ref(), &self.settings, device, self.shared).run(self.rx);
        }
    }
    let backend = settings.backend;
    let failed = ready.clone();
    let job = Job {
        settings,
        shared,
        rx,
        ready,
    };
    if let Err(e) = ecache_model::backend::on_backend(backend, job) {
        let _ = failed.send(Err(e.to_string()));
    }
}

/// A running request.
struct Live<B: Backend> {
    req: Box<Prepared>,
    seq: Sequence<B>,
    rng: SeededRng,
    tokens: Vec<u32>,
    text: TextStream,
    nll: Vec<f64>,
    /// The token the next decode step feeds.
    next: u32,
    image_after_prefill: Vec<usize>,
    started: Instant,
    prefill_seconds: f64,
    first_token: Option<Instant>,
}

/// Image features of recent pictures, by the hash of their pixels.
struct FeatureCache<B: Backend> {
    entries: VecDeque<(u64, Tensor<B, 2>)>,
    capacity: usize,
}

struct Scheduler<'m, B: ecache_model::kernels::KernelBackend> {
    model: &'m dyn VisionLanguageModel<B>,
    runner: Runner<'m, B>,
    device: B::Device,
    dtype: DType,
    shared: Arc<Shared>,
    admission: Admission<Box<Prepared>>,
    live: Vec<Live<B>>,
    features: FeatureCache<B>,
    deadline: Option<Instant>,
}

impl<'m, B: ecache_model::kernels::KernelBackend> Scheduler<'m, B> {
    fn new(
        model: &'m dyn VisionLanguageModel<B>,
        settings: &'m Settings,
        device: &B::Device,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            model,
            runner: Runner::new(model.decoder(), model.text(), device),
            device: device.clone(),
            dtype: settings.dtype,
            admission: Admission::new(shared.cap, settings.max_batch),
            shared,
            live: Vec::new(),
            features: FeatureCache {
                entries: VecDeque::new(),
                capacity: settings.image_cache,
            },
            deadline: None,
        }
    }

    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            if self.live.is_empty() && self.admission.waiting() == 0 {
                if self.deadline.is_some() {
                    break;
                }
                match rx.recv() {
                    Ok(msg) => self.receive(msg),
                    Err(_) => break,
                }
            }
            while let Ok(msg) = rx.try_recv() {
                self.receive(msg);
            }
            if self.deadline.is_some_and(|d| Instant::now() >= d) {
                self.fail_all("the engine shut down before this request finished");
                break;
            }
            self.drop_cancelled();
            if let Some(req) = self.admission.admit() {
                self.shared.counters.queued.fetch_sub(1, Ordering::SeqCst);
                // The reservation is visible before the request's first token is.
                self.publish();
                self.start(req);
            }
            if !self.live.is_empty() {
                self.step();
            }
            self.publish();
        }
        self.publish();
    }

    fn receive(&mut self, msg: Msg) {
        match msg {
            Msg::Submit(req) => self.admission.push(req),
            Msg::Shutdown { deadline } => self.deadline = Some(deadline),
        }
    }

    /// Drops waiting and running requests whose clients are gone.
    fn drop_cancelled(&mut self) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        for _ in self.admission.drop_unwanted() {
            c.queued.fetch_sub(1, Ordering::SeqCst);
            c.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        let mut i = 0;
        while i < self.live.len() {
            if self.live[i].req.tx.is_closed() {
                let gone = self.live.swap_remove(i);
                self.leave(&gone);
                c.cancelled.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(id = gone.req.id, "request cancelled by its client");
            } else {
                i += 1;
            }
        }
    }

    /// Prefills a request and has it join the batch (or finish at once).
    fn start(&mut self, req: Box<Prepared>) {
        let started = Instant::now();
        let prefilled = self.prefill(&req);
        self.shared
            .counters
            .prefill_micros
            .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
        match prefilled {
            Ok((seq, row)) => {
                let image_after_prefill = seq.held().1;
                let mut live = Live {
                    rng: SeededRng::new(req.seed),
                    text: TextStream::new(&req.stop),
                    req,
                    seq,
                    tokens: Vec::new(),
                    nll: Vec::new(),
                    next: 0,
                    image_after_prefill,
                    started,
                    prefill_seconds: started.elapsed().as_secs_f64(),
                    first_token: None,
                };
                let c = &self.shared.counters;
                c.prompt_tokens
                    .fetch_add(live.req.prompt_tokens as u64, Ordering::Relaxed);
                // Running before its first token is out (leave() undoes it).
                let active = c.active.fetch_add(1, Ordering::Relaxed) + 1;
                c.peak_active.fetch_max(active, Ordering::Relaxed);
                c.kv_in_use
                    .fetch_add(live.seq.kv_bytes(), Ordering::Relaxed);
                c.kv_allocated
                    .fetch_add(live.seq.kv_bytes_allocated(), Ordering::Relaxed);
                match self.advance(&mut live, &row) {
                    Some(reason) => self.finish(live, reason),
                    None => self.live.push(live),
                }
            }
            Err(e) => {
                self.admission.release(req.reservation);
                self.publish();
                self.shared.counters.failed.fetch_add(1, Ordering::Relaxed);
                let _ = req.tx.send(Event::Failed(format!("prefill failed: {e}")));
            }
        }
    }

    fn prefill(&mut self, req: &Prepared) -> ecache_model::Result<(Sequence<B>, Vec<f32>)> {
        let image = req.pixels.as_ref();
        let features = image.map(|p| self.features(p)).transpose()?;
        let grids: Vec<[usize; 3]> = image.map(|p| p.pixels.grid).into_iter().collect();
        let prompt = self.model.prompt(
            &req.ids,
            features.into_iter().collect(),
            &grids,
            &self.device,
        )?;
        let mut seq = Sequence::new(
            self.model.text(),
            req.policy.as_ref(),
            req.policy_config.positions,
            &self.device,
            self.dtype,
        );
        seq.set_capacity_after_prefill(req.layer_slots.clone());
        let logits = self
            .runner
            .prefill_prompt_last(&mut seq, req.policy.as_ref(), prompt)?;
        let row = rows_of(logits)?.remove(0);
        Ok((seq, row))
    }

    /// The image's features, from the cache when the same pixels were seen recently.
    fn features(&mut self, pixels: &Pixels) -> ecache_model::Result<Tensor<B, 2>> {
        let cache = &mut self.features;
        if let Some(at) = cache.entries.iter().position(|(k, _)| *k == pixels.key) {
            let entry = cache.entries.remove(at).expect("found");
            let features = entry.1.clone();
            cache.entries.push_back(entry);
            return Ok(features);
        }
        let features = self
            .model
            .image_features(&pixels.pixels, &self.device, self.dtype)?;
        if cache.capacity > 0 {
            cache.entries.push_back((pixels.key, features.clone()));
            if cache.entries.len() > cache.capacity {
                cache.entries.pop_front();
            }
        }
        Ok(features)
    }

    /// One decode step for every running sequence.
    fn step(&mut self) {
        let tokens: Vec<u32> = self.live.iter().map(|l| l.next).collect();
        let mut batch: Vec<(&mut Sequence<B>, &dyn ecache_core::CachePolicy)> = self
            .live
            .iter_mut()
            .map(|l| (&mut l.seq, l.req.policy.as_ref()))
            .collect();
        let logits = match self.runner.decode(&mut batch, &tokens) {
            Ok(logits) => logits,
            Err(e) => {
                self.fail_all(&format!("decode step failed: {e}"));
                return;
            }
        };
        let rows = match rows_of(logits) {
            Ok(rows) => rows,
            Err(e) => {
                self.fail_all(&format!("reading the logits failed: {e}"));
                return;
            }
        };
        let live = std::mem::take(&mut self.live);
        for (mut l, row) in live.into_iter().zip(rows) {
            match self.advance(&mut l, &row) {
                Some(reason) => self.finish(l, reason),
                None => self.live.push(l),
            }
        }
    }

    /// Consumes one row of logits: scores the next answer token or samples a new one,
    /// sends what the client sees, and says whether the request is done.
    fn advance(&self, l: &mut Live<B>, row: &[f32]) -> Option<FinishReason> {
        let first = l.first_token.is_none();
        if first {
            l.first_token = Some(Instant::now());
        }
        if let Some(answer) = &l.req.score {
            let target = answer[l.nll.len()];
            l.nll.push(nll(row, target));
            if l.nll.len() == answer.len() {
                return Some(FinishReason::Length);
            }
            l.next = target;
            return None;
        }
        let sampling = Sampling {
            max_new_tokens: l.req.max_new_tokens,
            temperature: l.req.temperature,
            top_p: l.req.top_p,
            seed: l.req.seed,
        };
        let token = sample(row, &sampling, &mut l.rng);
        l.tokens.push(token);
        self.shared
            .counters
            .tokens_generated
            .fetch_add(1, Ordering::Relaxed);
        let eos = !l.req.ignore_eos && self.shared.info.eos.contains(&token);
        let (mut text, mut reason) = if eos {
            (String::new(), Some(FinishReason::Stop))
        } else {
            let tokenizer = self.shared.frontend.tokenizer();
            match l.text.push(token, |ids| tokenizer.decode(ids)) {
                Ok(d) => (d.text, d.stopped.then_some(FinishReason::Stop)),
                Err(e) => {
                    tracing::warn!(id = l.req.id, "detokenising failed: {e}");
                    (String::new(), None)
                }
            }
        };
        if reason.is_none() && l.tokens.len() >= l.req.max_new_tokens {
            reason = Some(FinishReason::Length);
        }
        if reason.is_some() {
            text.push_str(&l.text.finish());
        }
        // A closed channel is a cancellation, noticed at the next iteration.
        let _ = l.req.tx.send(Event::Token { id: token, text });
        l.next = token;
        reason
    }

    fn finish(&mut self, l: Live<B>, reason: FinishReason) {
        self.leave(&l);
        let (slots, images) = l.seq.held();
        let submitted = l.req.submitted;
        let first = l.first_token.unwrap_or(l.started);
        let completion = Completion {
            text: l.text.answer().to_string(),
            usage: Usage {
                prompt_tokens: l.req.prompt_tokens,
                completion_tokens: l.tokens.len(),
            },
            tokens: l.tokens,
            finish_reason: reason,
            nll: l.nll,
            stats: Stats {
                policy: l.req.policy_config.name.clone(),
                budget: l.req.policy_config.budget,
                image_tokens: l.req.image_tokens,
                slots_per_layer: slots,
                image_slots_after_prefill: l.image_after_prefill,
                image_slots_at_end: images,
                kv_bytes: l.seq.kv_bytes(),
                kv_reserved: l.req.reservation,
                queued_seconds: (l.started - submitted).as_secs_f64(),
                prefill_seconds: l.prefill_seconds,
                decode_seconds: first.elapsed().as_secs_f64(),
                first_token_seconds: (first - submitted).as_secs_f64(),
            },
        };
        self.shared
            .counters
            .finished
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(id = l.req.id, reason = reason.as_str(), "request finished");
        let _ = l.req.tx.send(Event::Done(Box::new(completion)));
    }

    /// Fails every running and waiting request.
    fn fail_all(&mut self, why: &str) {
        let shared = self.shared.clone();
        let c = &shared.counters;
        for l in std::mem::take(&mut self.live) {
            self.leave(&l);
            c.failed.fetch_add(1, Ordering::Relaxed);
            let _ = l.req.tx.send(Event::Failed(why.to_string()));
        }
        for req in self.admission.drain() {
            c.queued.fetch_sub(1, Ordering::SeqCst);
            c.failed.fetch_add(1, Ordering::Relaxed);
            let _ = req.tx.send(Event::Failed(why.to_string()));
        }
    }

    /// A running request leaves: its reservation is free again, and the gauges say so
    /// before its client hears that it ended.
    fn leave(&mut self, l: &Live<B>) {
        self.admission.release(l.req.reservation);
        let c = &self.shared.counters;
        let sub = |a: &std::sync::atomic::AtomicUsize, n: usize| {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        };
        sub(&c.active, 1);
        sub(&c.kv_reserved, l.req.reservation);
        sub(&c.kv_in_use, l.seq.kv_bytes());
        sub(&c.kv_allocated, l.seq.kv_bytes_allocated());
    }

    /// Publishes the gauges.
    fn publish(&self) {
        let c = &self.shared.counters;
        let in_use: usize = self.live.iter().map(|l| l.seq.kv_bytes()).sum();
        let allocated: usize = self.live.iter().map(|l| l.seq.kv_bytes_allocated()).sum();
        c.active.store(self.live.len(), Ordering::Relaxed);
        c.kv_in_use.store(in_use, Ordering::Relaxed);
        c.kv_allocated.store(allocated, Ordering::Relaxed);
        c.kv_reserved
            .store(self.admission.reserved(), Ordering::Relaxed);
        c.peak_active.fetch_max(self.live.len(), Ordering::Relaxed);
        c.peak_kv_in_use.fetch_max(in_use, Ordering::Relaxed);
    }
}
