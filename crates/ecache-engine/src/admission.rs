//! Admission: what a request may hold, and which waiting requests start.
//!
//! A request reserves the KV memory it can grow to under its own policy, and holds the
//! reservation until it leaves; it starts only when that fits under the cap beside the
//! reservations of the running ones. Reserving by the worst case, not by the current
//! length, is what keeps the cap true later in every sequence's life.
//!
//! Admission is first in, first out: a request that does not fit waits at the head of the
//! queue, and those behind it wait too, so a large request is never overtaken forever.
//! Every request's reservation fits under the cap on its own (that is checked when it is
//! submitted), so the head starts at the latest when the running requests have left.

use std::collections::VecDeque;

use ecache_core::{CachePolicy, TargetAt};

/// The shape of a model's KV cache: what one slot costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Bytes per element of the cache's dtype.
    pub dtype_bytes: usize,
}

impl KvLayout {
    /// Bytes of one slot in one layer: a key and a value.
    pub fn slot_bytes(&self) -> usize {
        2 * self.kv_heads * self.head_dim * self.dtype_bytes
    }

    /// Bytes of `slots` slots in every layer.
    pub fn bytes(&self, slots: usize) -> usize {
        slots * self.layers * self.slot_bytes()
    }

    /// Bytes of `per_layer[l]` slots in layer `l`.
    pub fn bytes_per_layer(&self, per_layer: &[usize]) -> usize {
        per_layer.iter().sum::<usize>() * self.slot_bytes()
    }
}

/// The most slots each of `layers` layers holds at any time for a prompt of `prompt_len`
/// slots and up to `max_new_tokens` new tokens under `policy` (per-layer budgets give each
/// layer its own).
///
/// After the prefill a layer holds `min(T, target(T))`. The last new token is never fed
/// back, so at most `N = T + max_new_tokens - 1` tokens are processed; a decode step that
/// brings the count to `n` appends one slot to at most `target(n - 1)` before the policy
/// decides, and `target` never decreases (the policy's promise, checked by the policy
/// tests). So `max(min(T, target(T)), min(N, target(N - 1) + 1))` bounds every moment
/// between layer decisions. The prefill also holds the whole prompt in the layer being
/// computed until that layer's decision; that transient is not part of the reservation
/// (see `docs/serving.md`).
pub fn reserved_slots(
    policy: &dyn CachePolicy,
    layers: usize,
    prompt_len: usize,
    max_new_tokens: usize,
) -> Vec<usize> {
    (0..layers.max(1))
        .map(|layer| {
            let at = TargetAt {
                layer,
                layers: layers.max(1),
                prompt_len,
                tokens_seen: prompt_len,
            };
            let held = |n: usize, extra: usize| {
                policy
                    .target(at.with_tokens(n))
                    .map_or(n + extra, |t| (n + extra).min(t + extra))
            };
            let seen = prompt_len + max_new_tokens.max(1) - 1;
            let after_prefill = held(prompt_len, 0);
            if seen > prompt_len {
                after_prefill.max(held(seen - 1, 1))
            } else {
                after_prefill
            }
        })
        .collect()
}

/// A request waiting to start: its reservation, and whether it is still wanted.
pub trait Waiting {
    /// Bytes it reserves.
    fn reservation(&self) -> usize;
    /// False once its client is gone.
    fn wanted(&self) -> bool;
}

impl<T: Waiting + ?Sized> Waiting for Box<T> {
    fn reservation(&self) -> usize {
        (**self).reservation()
    }
    fn wanted(&self) -> bool {
        (**self).wanted()
    }
}

/// The queue and the reservations of the running requests.
#[derive(Debug)]
pub struct Admission<W> {
    queue: VecDeque<W>,
    cap: usize,
    max_batch: usize,
    reserved: usize,
    running: usize,
}

impl<W: Waiting> Admission<W> {
    /// Admission under `cap` bytes and at most `max_batch` running requests.
    pub fn new(cap: usize, max_batch: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            cap,
            max_batch: max_batch.max(1),
            reserved: 0,
            running: 0,
        }
    }

    /// Whether a request of this reservation can ever start.
    pub fn fits_alone(&self, reservation: usize) -> bool {
        reservation <= self.cap
    }

    /// Queues a request at the back.
    pub fn push(&mut self, w: W) {
        self.queue.push_back(w);
    }

    /// Requests waiting.
    pub fn waiting(&self) -> usize {
        self.queue.len()
    }

    /// Requests running.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Bytes reserved by the running requests.
    pub fn reserved(&self) -> usize {
        self.reserved
    }

    /// Drops the waiting requests that are no longer wanted and returns them.
    pub fn drop_unwanted(&mut self) -> Vec<W> {
        let (keep, gone): (VecDeque<W>, VecDeque<W>) =
            self.queue.drain(..).partition(|w| w.wanted());
        self.queue = keep;
        gone.into()
    }

    /// The head of the queue, if it may start now: it fits beside the running requests
    /// and the batch has room. Its reservation is taken.
    pub fn admit(&mut self) -> Option<W> {
        let head = self.queue.front()?;
        if self.running >= self.max_batch || self.reserved + head.reservation() > self.cap {
            return None;
        }
        let w = self.queue.pop_front()?;
        self.reserved += w.reservation();
        self.running += 1;
        Some(w)
    }

    /// A running request left: its reservation is free again.
    pub fn release(&mut self, reservation: usize) {
        self.reserved -= reservation.min(self.reserved);
        self.running = self.running.saturating_sub(1);
    }

    /// Takes every waiting request (at shutdown).
    pub fn drain(&mut self) -> Vec<W> {
        self.queue.drain(..).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecache_core::{Decision, LayerView, Needs};

    #[derive(Debug)]
    struct W(usize, bool);
    impl Waiting for W {
        fn reservation(&self) -> usize {
            self.0
        }
        fn wanted(&self) -> bool {
            self.1
        }
    }

    /// A policy keeping `fraction` of `n` slots (at least 3), or everything.
    struct Frac(Option<f64>);
    impl CachePolicy for Frac {
        fn name(&self) -> &str {
            "frac"
        }
        fn needs(&self) -> Needs {
            Needs::default()
        }
        fn decide(&self, _: &LayerView<'_>) -> Decision {
            Decision::KeepAll
        }
        fn target(&self, at: TargetAt) -> Option<usize> {
            let n = at.tokens_seen;
            self.0.map(|f| ((f * n as f64) as usize).max(3))
        }
    }

    #[test]
    fn reservations_follow_the_policys_target() {
        let layout = KvLayout {
            layers: 4,
            kv_heads: 2,
            head_dim: 64,
            dtype_bytes: 4,
        };
        assert_eq!(layout.slot_bytes(), 1024);
        // Full: every token but the last new one, 100 + 48 - 1.
        assert_eq!(reserved_slots(&Frac(None), 4, 100, 48), vec![147; 4]);
        assert_eq!(layout.bytes(147), 147 * 4 * 1024);
        assert_eq!(layout.bytes_per_layer(&[147; 4]), layout.bytes(147));
        // A fifth: target(146) = 29, plus the slot appended before each decision.
        assert_eq!(reserved_slots(&Frac(Some(0.2)), 1, 100, 48)[0], 30);
        // One new token is never fed: only the prompt, compressed.
        assert_eq!(reserved_slots(&Frac(Some(0.2)), 1, 100, 1)[0], 20);
        // One decode step: target(100) = 20 held, and the step's slot on top.
        assert_eq!(reserved_slots(&Frac(Some(0.2)), 1, 100, 2)[0], 21);
        // A prompt shorter than the minimum target is held whole.
        assert_eq!(reserved_slots(&Frac(Some(0.2)), 1, 2, 1)[0], 2);
        assert_eq!(reserved_slots(&Frac(Some(0.2)), 1, 2, 3)[0], 4);
    }

    /// Pyramid budgets reserve each layer's own target: more below, less above, about
    /// the uniform total.
    #[test]
    fn pyramid_reservations_are_per_layer() {
        let mut config = ecache_core::PolicyConfig::new("local", 0.2);
        config.layer_budgets = ecache_core::LayerBudgets::Pyramid;
        config.pyramid_beta = 3.0;
        let pyramid = ecache_policy_local::build(&config).unwrap();
        let uniform =
            ecache_policy_local::build(&ecache_core::PolicyConfig::new("local", 0.2)).unwrap();
        // w = (2 / 4) * (3 - 2 * l / 3): 1.5, 1.1667, 0.8333, 0.5 of floor(0.2 * n).
        // One decode step: target_l(100) held and the step's slot on top.
        let per_layer = reserved_slots(pyramid.as_ref(), 4, 100, 2);
        assert_eq!(per_layer, vec![31, 24, 17, 11]);
        assert_eq!(reserved_slots(uniform.as_ref(), 4, 100, 2), vec![21; 4]);
        let layout = KvLayout {
            layers: 4,
            kv_heads: 1,
            head_dim: 1,
            dtype_bytes: 1,
        };
        assert_eq!(layout.bytes_per_layer(&per_layer), 2 * (31 + 24 + 17 + 11));
    }

    #[test]
    fn admission_is_fifo_under_the_cap_and_the_batch_limit() {
        let mut a = Admission::new(100, 3);
        for r in [40, 50, 20, 10] {
            a.push(W(r, true));
        }
        assert_eq!(a.admit().map(|w| w.0), Some(40));
        assert_eq!(a.admit().map(|w| w.0), Some(50));
        // 20 does not fit beside 90; 10 behind it waits too (no overtaking).
        assert!(a.admit().is_none());
        assert_eq!(a.waiting(), 2);
        a.release(40);
        assert_eq!(a.admit().map(|w| w.0), Some(20));
        assert_eq!(a.admit().map(|w| w.0), Some(10), "70 + 10 + 20 under 100");
        assert_eq!(a.reserved(), 80);
        assert_eq!(a.running(), 3);
        a.push(W(1, true));
        assert!(a.admit().is_none(), "batch of 3 is full");
        a.release(50);
        assert_eq!(a.admit().map(|w| w.0), Some(1));
        assert!(!a.fits_alone(101) && a.fits_alone(100));
    }

    #[test]
    fn requests_whose_client_left_are_dropped_from_the_queue() {
        let mut a = Admission::new(10, 4);
        a.push(W(20, true));
        a.push(W(5, false));
        a.push(W(6, true));
        let gone = a.drop_unwanted();
        assert_eq!(gone.len(), 1);
        assert_eq!(a.waiting(), 2);
        assert_eq!(a.drain().len(), 2);
    }
}
