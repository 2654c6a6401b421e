//! The plug-in interface: what a policy sees, what it declares it needs, what it returns.

use crate::budget::TargetAt;
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
    /// At prefill, the head-mean causal attention rows of the last this-many prompt
    /// queries (fewer when the prompt is shorter), handed to the decision as
    /// [`LayerView::prefill_rows`] and then dropped: `m x T` numbers, never `T x T`.
    /// 0: none (SnapKV's observation window asks for its `window`).
    pub prefill_rows: usize,
}

impl Needs {
    /// Whether per-slot scores must be kept at all.
    pub fn tracks_scores(&self) -> bool {
        self.prefill_importance || self.decode_attention
    }
}

/// Head-mean attention rows of the last `rows` prompt queries over the prompt's `keys`
/// slots, row-major: row `r` is query `keys - rows + r`; entries past the query are 0.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionRows<'a> {
    data: &'a [f32],
    rows: usize,
    keys: usize,
}

impl<'a> AttentionRows<'a> {
    /// Rows over `keys` slots; `None` unless `data` holds whole rows of `keys` entries.
    pub fn new(data: &'a [f32], keys: usize) -> Option<Self> {
        if keys == 0 || !data.len().is_multiple_of(keys) {
            return None;
        }
        Some(Self {
            data,
            rows: data.len() / keys,
            keys,
        })
    }

    /// Number of rows (the last queries they belong to).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Entries per row: the prompt's slots.
    pub fn keys(&self) -> usize {
        self.keys
    }

    /// The row of the `back`-th last query (0: the prompt's last query), if there are
    /// that many rows.
    pub fn from_end(&self, back: usize) -> Option<&'a [f32]> {
        let r = self.rows.checked_sub(back + 1)?;
        Some(&self.data[r * self.keys..(r + 1) * self.keys])
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
    /// At prefill, the last prompt queries' attention rows when [`Needs::prefill_rows`]
    /// asked for them (their keys are the prompt's slots, in slot order).
    pub prefill_rows: Option<AttentionRows<'a>>,
    /// `L`: decoder layers in the model (per-layer budgets depend on it).
    pub layers: usize,
    /// `N`: tokens processed so far (prompt plus fed-back generated tokens).
    pub tokens_seen: usize,
    /// `T`: the prompt length at prefill, image tokens included.
    pub prompt_len: usize,
}

impl LayerView<'_> {
    /// This layer at this step, for [`CachePolicy::target`] and
    /// [`crate::Budget::target_at`].
    pub fn at(&self) -> TargetAt {
        TargetAt {
            layer: self.layer,
            layers: self.layers,
            prompt_len: self.prompt_len,
            tokens_seen: self.tokens_seen,
        }
    }

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

    /// The most slots layer `at.layer` may hold after `at.tokens_seen` tokens of a
    /// sequence whose prompt had `at.prompt_len`, or `None` when unbounded. It never
    /// decreases as tokens are added. Engines size cache buffers by it; tests check the
    /// policy's promise with it.
    fn target(&self, at: TargetAt) -> Option<usize>;

    /// Whether the policy never removes a slot (no target): its effective budget is 1
    /// whatever its config says.
    fn keeps_everything(&self) -> bool {
        self.target(TargetAt::single(1, 1)).is_none()
    }

    /// How many of the [`LayerView::prefill_rows`] the prefill decision of layer
    /// `at.layer` reads (at most [`Needs::prefill_rows`]): `ecache trace` refuses input
    /// with fewer.
    fn prefill_rows_read(&self, _at: TargetAt) -> usize {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_rows_are_read_from_the_end() {
        let data = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let rows = AttentionRows::new(&data, 3).unwrap();
        assert_eq!(rows.rows(), 2);
        assert_eq!(rows.from_end(0), Some(&data[3..]));
        assert_eq!(rows.from_end(1), Some(&data[..3]));
        assert_eq!(rows.from_end(2), None);
        assert!(AttentionRows::new(&data, 4).is_none());
        assert!(AttentionRows::new(&data, 0).is_none());
    }
}
