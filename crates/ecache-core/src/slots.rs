//! Host-side slot bookkeeping of one layer of one sequence: absolute positions, kinds and
//! importance scores, always aligned with the cache's slots.

use crate::decision::{Decision, Plan};
use crate::error::{Error, Result};
use crate::policy::{AttentionRows, CachePolicy, LayerView, Phase};

/// What produced a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotKind {
    /// A text token of the prompt or a generated token.
    Text,
    /// One of the image's projected patch tokens.
    Image,
}

/// Where a step happens in a sequence: needed by every decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepContext {
    /// Decoder layer index.
    pub layer: usize,
    /// `L`: decoder layers in the model.
    pub layers: usize,
    /// Prefill or decode step.
    pub phase: Phase,
    /// `N`: tokens processed so far.
    pub tokens_seen: usize,
    /// `T`: prompt length.
    pub prompt_len: usize,
}

/// Positions, kinds and (optionally) importance scores of one layer's slots.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlotTable {
    positions: Vec<usize>,
    kinds: Vec<SlotKind>,
    /// Empty unless scores are tracked; then one per slot.
    scores: Vec<f32>,
    tracks_scores: bool,
}

impl SlotTable {
    /// An empty table; `tracks_scores` keeps an importance score per slot.
    pub fn new(tracks_scores: bool) -> Self {
        Self {
            tracks_scores,
            ..Self::default()
        }
    }

    /// Number of slots.
    pub fn len(&self) -> usize {
        self.positions.len()
    }

    /// Whether the table holds no slot.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Absolute position of each slot.
    pub fn positions(&self) -> &[usize] {
        &self.positions
    }

    /// Kind of each slot.
    pub fn kinds(&self) -> &[SlotKind] {
        &self.kinds
    }

    /// Importance per slot, when tracked.
    pub fn scores(&self) -> Option<&[f32]> {
        self.tracks_scores.then_some(self.scores.as_slice())
    }

    /// Checks that [`SlotTable::push`] would accept these slots, without changing anything.
    pub fn check_push(&self, positions: &[usize], kinds: &[SlotKind]) -> Result<()> {
        if positions.len() != kinds.len() {
            return Err(Error::shape("slot kinds", positions.len(), kinds.len()));
        }
        let mut last = self.positions.last().copied();
        for &p in positions {
            if last.is_some_and(|l| p <= l) {
                return Err(Error::shape(
                    "slot positions (strictly increasing)",
                    format!("> {}", last.unwrap_or(0)),
                    p,
                ));
            }
            last = Some(p);
        }
        Ok(())
    }

    /// Appends slots at the given positions (their scores start at 0). Positions must stay
    /// strictly increasing: a slot's position is where RoPE put it, never reused.
    pub fn push(&mut self, positions: &[usize], kinds: &[SlotKind]) -> Result<()> {
        self.check_push(positions, kinds)?;
        self.positions.extend_from_slice(positions);
        self.kinds.extend_from_slice(kinds);
        if self.tracks_scores {
            self.scores.resize(self.positions.len(), 0.0);
        }
        Ok(())
    }

    /// Adds `row[i]` to slot `i`'s score: prefill column sums or a decode attention row.
    /// Does nothing when scores are not tracked.
    pub fn accumulate(&mut self, row: &[f32]) -> Result<()> {
        if !self.tracks_scores {
            return Ok(());
        }
        if row.len() != self.len() {
            return Err(Error::shape("attention row", self.len(), row.len()));
        }
        for (s, r) in self.scores.iter_mut().zip(row) {
            *s += r;
        }
        Ok(())
    }

    /// The view a policy decides on.
    pub fn view(&self, ctx: StepContext) -> LayerView<'_> {
        self.view_with_rows(ctx, None)
    }

    /// The view a policy decides on, with the prefill's last attention rows.
    pub fn view_with_rows<'a>(
        &'a self,
        ctx: StepContext,
        prefill_rows: Option<AttentionRows<'a>>,
    ) -> LayerView<'a> {
        LayerView {
            layer: ctx.layer,
            layers: ctx.layers,
            phase: ctx.phase,
            positions: &self.positions,
            kinds: &self.kinds,
            importance: self.scores(),
            prefill_rows,
            tokens_seen: ctx.tokens_seen,
            prompt_len: ctx.prompt_len,
        }
    }

    /// Asks `policy` for its decision on this layer and validates it.
    pub fn decide(&self, policy: &dyn CachePolicy, ctx: StepContext) -> Result<Plan> {
        self.decide_with_rows(policy, ctx, None)
    }

    /// [`SlotTable::decide`] with the prefill's last attention rows (see
    /// [`crate::Needs::prefill_rows`]); rows that do not cover the slots are refused.
    pub fn decide_with_rows(
        &self,
        policy: &dyn CachePolicy,
        ctx: StepContext,
        prefill_rows: Option<AttentionRows<'_>>,
    ) -> Result<Plan> {
        if let Some(rows) = prefill_rows
            && rows.keys() != self.len()
        {
            return Err(Error::shape(
                format!(
                    "layer {} prefill attention rows (entries per row)",
                    ctx.layer
                ),
                self.len(),
                rows.keys(),
            ));
        }
        let decision = policy.decide(&self.view_with_rows(ctx, prefill_rows));
        if decision == Decision::KeepAll {
            return Ok(Plan::identity(self.len()));
        }
        Plan::new(decision, self.len(), policy.name(), ctx.layer)
    }

    /// Applies a plan: kept slots keep their position and kind; a merged slot's score is the
    /// sum of its members' scores (the attention mass it now stands for).
    pub fn apply(&mut self, plan: &Plan) -> Result<()> {
        if plan.old_len() != self.len() {
            return Err(Error::shape("plan length", self.len(), plan.old_len()));
        }
        if plan.is_identity() {
            return Ok(());
        }
        let kept = plan.kept();
        let positions = kept.iter().map(|&i| self.positions[i]).collect();
        let kinds = kept.iter().map(|&i| self.kinds[i]).collect();
        if self.tracks_scores {
            self.scores = kept
                .iter()
                .enumerate()
                .map(|(n, &i)| {
                    self.scores[i]
                        + plan
                            .merged_into(n)
                            .iter()
                            .map(|&m| self.scores[m])
                            .sum::<f32>()
                })
                .collect();
        }
        self.positions = positions;
        self.kinds = kinds;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::MergeWeighting;

    #[test]
    fn scores_follow_their_slots_through_removal_and_merge() {
        let mut t = SlotTable::new(true);
        t.push(&[0, 1, 2, 3, 4], &[SlotKind::Text; 5]).unwrap();
        t.accumulate(&[1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
        let plan = Plan::new(Decision::Keep(vec![0, 2, 4]), 5, "t", 0).unwrap();
        t.apply(&plan).unwrap();
        assert_eq!(t.positions(), &[0, 2, 4]);
        assert_eq!(t.scores().unwrap(), &[1.0, 3.0, 5.0]);
        let merge = Decision::Merge {
            keep: vec![0, 1],
            into: vec![(2, 1)],
            weighting: MergeWeighting::Mean,
        };
        t.apply(&Plan::new(merge, 3, "t", 0).unwrap()).unwrap();
        assert_eq!(t.positions(), &[0, 2]);
        assert_eq!(t.scores().unwrap(), &[1.0, 8.0]);
        t.push(&[9], &[SlotKind::Text]).unwrap();
        assert_eq!(t.scores().unwrap(), &[1.0, 8.0, 0.0]);
    }

    #[test]
    fn positions_must_increase_and_rows_must_fit() {
        let mut t = SlotTable::new(true);
        t.push(&[0, 1], &[SlotKind::Image; 2]).unwrap();
        assert!(t.push(&[1], &[SlotKind::Text]).is_err());
        assert!(
            t.accumulate(&[1.0])
                .unwrap_err()
                .to_string()
                .contains("attention row")
        );
        assert_eq!(t.len(), 2);
    }
}
