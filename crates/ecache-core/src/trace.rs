//! Runs a policy over given attention scores without a model: the slot positions it keeps
//! and the merges it makes, step by step. `ecache trace` and the policy property tests use
//! it; it drives the same [`SlotTable::decide`] and [`SlotTable::apply`] as the engine.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::budget::TargetAt;
use crate::error::{Error, Result};
use crate::policy::{AttentionRows, CachePolicy, Phase};
use crate::slots::{SlotKind, SlotTable, StepContext};

/// Scores of one layer, indexed by absolute position.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerScores {
    /// Importance column sums of the prompt's `T` slots (needed by policies that read
    /// prefill importance; may be left out for the others).
    #[serde(default)]
    pub prefill_scores: Vec<f32>,
    /// Row `k`: attention of decode step `k`'s query over positions `0..=T+k`.
    #[serde(default)]
    pub decode_scores: Vec<Vec<f32>>,
    /// The head-mean causal attention rows of the last `m` prompt queries, `T` entries
    /// each: row `r` is query `T - m + r` (entries past it are 0). SnapKV reads its
    /// window from them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_rows: Option<Vec<Vec<f32>>>,
}

/// What the policy did to one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerTrace {
    /// Positions kept after prefill, ascending.
    pub after_prefill: Vec<usize>,
    /// Anchor position to the positions merged into it (any step).
    pub merged_into: BTreeMap<usize, Vec<usize>>,
    /// Positions kept after each decode step.
    pub after_step: Vec<Vec<usize>>,
}

/// Which layer of how many a trace runs (per-layer budgets depend on both).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerOf {
    /// Decoder layer index.
    pub layer: usize,
    /// `L`: decoder layers.
    pub layers: usize,
}

impl LayerOf {
    /// The one layer of a one-layer model.
    pub const SINGLE: LayerOf = LayerOf {
        layer: 0,
        layers: 1,
    };
}

/// Runs `policy` over the one layer of a one-layer model: a prompt of `prompt_len` text
/// slots, then `decode_steps` steps each appending the next position.
pub fn trace_layer(
    policy: &dyn CachePolicy,
    prompt_len: usize,
    decode_steps: usize,
    scores: &LayerScores,
) -> Result<LayerTrace> {
    let kinds = vec![SlotKind::Text; prompt_len];
    trace_layer_kinds(policy, LayerOf::SINGLE, &kinds, decode_steps, scores)
}

/// [`trace_layer`] for layer `of` and a prompt whose slots have the given kinds
/// (`kinds.len()` is the prompt's length; image slots where the prompt held an image).
pub fn trace_layer_kinds(
    policy: &dyn CachePolicy,
    of: LayerOf,
    kinds: &[SlotKind],
    decode_steps: usize,
    scores: &LayerScores,
) -> Result<LayerTrace> {
    let LayerOf { layer, layers } = of;
    let prompt_len = kinds.len();
    let needs = policy.needs();
    let rows = prefill_rows(policy, of, prompt_len, scores)?;
    let given = !scores.prefill_scores.is_empty();
    if (needs.prefill_importance || given) && scores.prefill_scores.len() != prompt_len {
        return Err(Error::shape(
            format!("layer {layer} prefill_scores"),
            prompt_len,
            scores.prefill_scores.len(),
        ));
    }
    if needs.decode_attention && scores.decode_scores.len() < decode_steps {
        return Err(Error::shape(
            format!("layer {layer} decode_scores rows"),
            decode_steps,
            scores.decode_scores.len(),
        ));
    }
    let mut table = SlotTable::new(needs.tracks_scores());
    let positions: Vec<usize> = (0..prompt_len).collect();
    table.push(&positions, kinds)?;
    if needs.prefill_importance {
        table.accumulate(&scores.prefill_scores)?;
    }
    let mut merged_into = BTreeMap::new();
    let mut step =
        |table: &mut SlotTable, phase: Phase, tokens_seen: usize| -> Result<Vec<usize>> {
            let ctx = StepContext {
                layer,
                layers,
                phase,
                tokens_seen,
                prompt_len,
            };
            let rows = match phase {
                Phase::Prefill => rows
                    .as_deref()
                    .and_then(|r| AttentionRows::new(r, prompt_len)),
                Phase::Decode { .. } => None,
            };
            let plan = table.decide_with_rows(policy, ctx, rows)?;
            for (anchor, members) in plan.merges_at(table.positions()) {
                merged_into
                    .entry(anchor)
                    .or_insert_with(Vec::new)
                    .extend(members);
            }
            table.apply(&plan)?;
            Ok(table.positions().to_vec())
        };
    let after_prefill = step(&mut table, Phase::Prefill, prompt_len)?;
    let mut after_step = Vec::with_capacity(decode_steps);
    for k in 0..decode_steps {
        let position = prompt_len + k;
        table.push(&[position], &[SlotKind::Text])?;
        if needs.decode_attention {
            let row = &scores.decode_scores[k];
            if row.len() != position + 1 {
                return Err(Error::shape(
                    format!("layer {layer} decode_scores[{k}] (positions 0..={position})"),
                    position + 1,
                    row.len(),
                ));
            }
            let aligned: Vec<f32> = table.positions().iter().map(|&p| row[p]).collect();
            table.accumulate(&aligned)?;
        }
        after_step.push(step(
            &mut table,
            Phase::Decode { step: k + 1 },
            position + 1,
        )?);
    }
    for members in merged_into.values_mut() {
        members.sort_unstable();
    }
    Ok(LayerTrace {
        after_prefill,
        merged_into,
        after_step,
    })
}

/// The layer's `prefill_rows`, flattened, when the policy reads any; a clear error when
/// they are missing, ragged or fewer than the policy reads.
fn prefill_rows(
    policy: &dyn CachePolicy,
    of: LayerOf,
    prompt_len: usize,
    scores: &LayerScores,
) -> Result<Option<Vec<f32>>> {
    if policy.needs().prefill_rows == 0 {
        return Ok(None);
    }
    let at = TargetAt {
        layer: of.layer,
        layers: of.layers,
        prompt_len,
        tokens_seen: prompt_len,
    };
    let read = policy.prefill_rows_read(at);
    let name = policy.name();
    let given = scores.prefill_rows.as_deref().unwrap_or(&[]);
    if given.len() < read {
        let what = if scores.prefill_rows.is_none() {
            "missing".to_string()
        } else {
            format!("{} rows", given.len())
        };
        return Err(Error::shape(
            format!(
                "layer {} prefill_rows ({name} reads the attention rows of the last {read} prompt queries; {what})",
                of.layer
            ),
            format!("at least {read} rows"),
            given.len(),
        ));
    }
    let mut flat = Vec::with_capacity(given.len() * prompt_len);
    for (r, row) in given.iter().enumerate() {
        if row.len() != prompt_len {
            return Err(Error::shape(
                format!(
                    "layer {} prefill_rows[{r}] (one entry per prompt slot)",
                    of.layer
                ),
                prompt_len,
                row.len(),
            ));
        }
        flat.extend_from_slice(row);
    }
    Ok(Some(flat))
}

/// Slots a policy promised to protect, for [`check_trace`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protected {
    /// Leading slots that must survive every step.
    pub sinks: usize,
    /// Trailing prompt slots that must survive prefill.
    pub protected_tail: usize,
}

/// Checks the promises every budgeted policy makes, on a trace: after each step the length
/// is `min(length, target(N))`, sinks survive, the protected tail survives prefill, kept
/// positions are strictly ascending and each was present before the step. Policy authors
/// can run it on their own policy; the message says which step broke which promise.
pub fn check_trace(
    policy: &dyn CachePolicy,
    prompt_len: usize,
    trace: &LayerTrace,
    protected: Protected,
) -> std::result::Result<(), String> {
    check_trace_of(policy, LayerOf::SINGLE, prompt_len, trace, protected)
}

/// [`check_trace`] for layer `of` of a model (per-layer targets).
pub fn check_trace_of(
    policy: &dyn CachePolicy,
    of: LayerOf,
    prompt_len: usize,
    trace: &LayerTrace,
    protected: Protected,
) -> std::result::Result<(), String> {
    let target = |n: usize| {
        let at = TargetAt {
            layer: of.layer,
            layers: of.layers,
            prompt_len,
            tokens_seen: n,
        };
        policy.target(at).unwrap_or(usize::MAX)
    };
    let check_step = |name: &str, before: &[usize], after: &[usize], n: usize| {
        let expected = before.len().min(target(n));
        if after.len() != expected {
            return Err(format!(
                "{name}: {} slots kept, expected min({}, target({n})) = {expected}",
                after.len(),
                before.len()
            ));
        }
        if after.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "{name}: positions not strictly ascending: {after:?}"
            ));
        }
        if let Some(p) = after.iter().find(|p| before.binary_search(p).is_err()) {
            return Err(format!(
                "{name}: position {p} was not in the cache before the step"
            ));
        }
        let sinks = protected.sinks.min(before.len());
        if after.len() < sinks || after[..sinks] != before[..sinks] {
            return Err(format!("{name}: a sink was removed: {after:?}"));
        }
        Ok(())
    };
    let prompt: Vec<usize> = (0..prompt_len).collect();
    check_step("prefill", &prompt, &trace.after_prefill, prompt_len)?;
    let tail = protected.protected_tail.min(prompt_len);
    if let Some(p) =
        (prompt_len - tail..prompt_len).find(|p| trace.after_prefill.binary_search(p).is_err())
    {
        return Err(format!("prefill: protected tail position {p} was removed"));
    }
    let mut before = trace.after_prefill.clone();
    for (k, after) in trace.after_step.iter().enumerate() {
        before.push(prompt_len + k);
        check_step(
            &format!("decode step {}", k + 1),
            &before,
            after,
            prompt_len + k + 1,
        )?;
        before.clone_from(after);
    }
    Ok(())
}
