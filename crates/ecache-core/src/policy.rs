//! The plug-in interface: what a policy sees, what it declares it needs, what it returns.

use crate::decision::Decision;
use crate::slots::SlotKind;

/// Where in a sequence's life a decision is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Right after the prompt (text and image tokens) went through the layer.
    Prefill,
    /// After decode step `step` (1-based) appended its token's slot.
    Decode { step: usize },
}

/// What a policy needs the engine to compute. The engine skips attention probabilities
/// entirely for a policy that needs neither.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Needs {
    /// Prefill importance: column sums of the head-mean causal attention, per slot.
    pub prefill_importance: bool,
    /// Each decode query's head-mean attention row, accumulated into the slot scores.
    pub decode_attention: bool,
}

impl Needs {
    /// Whether per-slot scores must be kept at all.
    pub fn tracks_scores(&self) -> bool {
        self.prefill_importance || self.decode_attention
    }
}

/// A read-only view of one layer's cache for one sequence.
#[derive(Debug, Clone, Copy)]
pub struct LayerView<'a> {
    /// Decoder layer index.
    pub layer: usize,
    /// Prefill or decode step.
    pub phase: Phase,
    /// Absolute (RoPE) position of each slot, ascending.
    pub positions: &'a [usize],
    /// Text or image, per slot.
    pub kinds: &'a [SlotKind],
    /// Accumulated importance per slot, when the policy's [`Needs`] asked for it.
    pub importance: Option<&'a [f32]>,
    /// `N`: tokens processed so far (prompt plus fed-back generated tokens).
    pub tokens_seen: usize,
    /// `T`: the prompt length at prefill, image tokens included.
    pub prompt_len: usize,
}

impl LayerView<'_> {
    /// Current number of slots.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the layer holds no slot.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Importance per slot, or zeros when the engine computed none (a policy that declared
    /// no need for scores).
    pub fn scores_or_zeros(&self) -> std::borrow::Cow<'_, [f32]> {
        match self.importance {
            Some(s) => std::borrow::Cow::Borrowed(s),
            None => std::borrow::Cow::Owned(vec![0.0; self.len()]),
        }
    }
}

/// A KV cache policy. One instance serves every layer and every sequence of a batch:
/// everything a decision depends on is in the [`LayerView`], and per-slot state (scores)
/// lives in the cache core, so `decide` takes `&self`.
pub trait CachePolicy: Send + Sync {
    /// The registry name (`"elastic"`, `"h2o"`, ...).
    fn name(&self) -> &str;

    /// What the engine must compute for this policy.
    fn needs(&self) -> Needs;

    /// The decision for one layer of one sequence after a prefill or decode step.
    fn decide(&self, view: &LayerView<'_>) -> Decision;

    /// The most slots a layer may hold after `tokens_seen` tokens, or `None` when unbounded.
    /// Engines use it to size cache buffers; tests use it to check the policy's promise.
    fn target(&self, tokens_seen: usize) -> Option<usize>;
}
