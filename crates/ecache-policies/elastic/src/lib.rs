//! # ecache-policy-elastic
//!
//! Elastic Cache (Liu et al., ECCV 2024). Prefill: per layer, the `K = target(T) - S - R`
//! most important candidate slots become anchors and every other candidate is merged into
//! its nearest anchor. Decode: whenever a layer exceeds `target(N)`, the slot at the fixed
//! truncation point `P = max(S, L0 - offset)` is removed, first in, first out.
//!
//! Two choices beyond the paper (the spec's "Additions (second round)"): `protect =
//! "instruction"` widens the protected tail to every slot after the last image slot (the
//! question and the template's closing tokens), within what the budget leaves after the
//! sinks; `importance = "mean"` divides a slot's summed attention by the number of prompt
//! queries that can see it, so late slots are not penalised for being seen by fewer.

use std::borrow::Cow;

use ecache_core::selection::{TieBreak, nearest_anchor, top_k};
use ecache_core::{
    Budget, CachePolicy, Decision, Error, LayerView, MergeWeighting, Needs, Phase, PolicyConfig,
    Registry, Result, SlotKind, TargetAt, parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "elastic";

/// How merged slots are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeMode {
    /// Plain mean, anchor included.
    #[default]
    Mean,
    /// Weighted by each slot's importance.
    Weighted,
}

/// Which trailing prompt slots prefill protects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protect {
    /// The last `protected_tail` slots (the paper).
    #[default]
    Tail,
    /// At least the slots after the last image slot (the instruction), never more than the
    /// budget leaves after the sinks.
    Instruction,
}

/// How a slot's importance is read from the attention it received at prefill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Importance {
    /// The sum over heads' mean and every prompt query (the paper).
    #[default]
    Sum,
    /// That sum divided by the `T - j` prompt queries that can see slot `j`.
    Mean,
}

/// Parameters of `elastic` (`[policy.params]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ElasticParams {
    /// Leading slots never removed or merged.
    #[serde(default = "one")]
    pub sinks: usize,
    /// Trailing prompt slots never removed or merged at prefill.
    #[serde(default = "one")]
    pub protected_tail: usize,
    /// `D`: the truncation point sits this many slots before the end of the compressed
    /// prompt.
    #[serde(default = "default_offset")]
    pub offset: usize,
    /// An absolute truncation point (slot index) instead of `offset`.
    #[serde(default)]
    pub truncation_point: Option<usize>,
    /// `mean` (default) or `weighted`.
    #[serde(default)]
    pub merge: MergeMode,
    /// `tail` (default, the paper) or `instruction`.
    #[serde(default)]
    pub protect: Protect,
    /// `sum` (default, the paper) or `mean`.
    #[serde(default)]
    pub importance: Importance,
}

fn one() -> usize {
    1
}

fn default_offset() -> usize {
    24
}

/// The Elastic Cache policy.
#[derive(Debug, Clone)]
pub struct ElasticCache {
    budget: Budget,
    offset: usize,
    truncation_point: Option<usize>,
    merge: MergeMode,
    protect: Protect,
    importance: Importance,
}

impl ElasticCache {
    /// An Elastic Cache policy from a budget and its parameters.
    pub fn new(budget: Budget, params: &ElasticParams) -> Result<Self> {
        if let Some(p) = params.truncation_point
            && p < budget.sinks()
        {
            return Err(Error::PolicyParam {
                policy: NAME.into(),
                message: format!(
                    "truncation_point = {p} would remove attention sinks (sinks = {})",
                    budget.sinks()
                ),
            });
        }
        Ok(Self {
            budget,
            offset: params.offset,
            truncation_point: params.truncation_point,
            merge: params.merge,
            protect: params.protect,
            importance: params.importance,
        })
    }

    /// The fixed truncation point of layer `at.layer` for a prompt of `at.prompt_len`
    /// tokens (`at.tokens_seen` is not read).
    pub fn truncation_point(&self, at: TargetAt) -> usize {
        let prompt_len = at.prompt_len;
        let compressed = prompt_len.min(self.budget.target_at(at.with_tokens(prompt_len)));
        self.truncation_point.unwrap_or_else(|| {
            compressed
                .saturating_sub(self.offset)
                .max(self.budget.sinks())
        })
    }

    /// `R'`: the trailing prompt slots prefill protects in a layer of `len` slots whose
    /// compressed size is `target`.
    fn protected_tail(&self, kinds: &[SlotKind], len: usize, target: usize) -> usize {
        let tail = self.budget.protected_tail();
        match self.protect {
            Protect::Tail => tail,
            Protect::Instruction => {
                let instruction = kinds
                    .iter()
                    .rposition(|k| *k == SlotKind::Image)
                    .map_or(0, |last| len - 1 - last);
                tail.max(instruction)
                    .min(target.saturating_sub(self.budget.sinks()))
            }
        }
    }

    /// Importance per slot at prefill: the accumulated sums, or under `mean` each divided
    /// by the `len - j` prompt queries that can see slot `j`.
    fn importance<'v>(&self, view: &'v LayerView<'_>) -> Cow<'v, [f32]> {
        let scores = view.scores_or_zeros();
        match self.importance {
            Importance::Sum => scores,
            Importance::Mean => {
                let len = scores.len();
                Cow::Owned(
                    scores
                        .iter()
                        .enumerate()
                        .map(|(j, s)| s / (len - j) as f32)
                        .collect(),
                )
            }
        }
    }

    fn prefill(&self, view: &LayerView<'_>) -> Decision {
        let len = view.len();
        let target = self.budget.target_at(view.at());
        if len <= target {
            return Decision::KeepAll;
        }
        let sinks = self.budget.sinks();
        let tail = self.protected_tail(view.kinds, len, target);
        let candidates: Vec<usize> = (sinks..len - tail).collect();
        let scores = self.importance(view);
        let anchors = top_k(
            &scores,
            &candidates,
            target - sinks - tail,
            TieBreak::KeepLower,
        );
        let keep: Vec<usize> = (0..sinks)
            .chain(anchors.iter().copied())
            .chain(len - tail..len)
            .collect();
        if anchors.is_empty() {
            return Decision::Keep(keep);
        }
        let others: Vec<usize> = candidates
            .into_iter()
            .filter(|c| anchors.binary_search(c).is_err())
            .collect();
        Decision::Merge {
            keep,
            into: nearest_anchor(&others, &anchors),
            weighting: match self.merge {
                MergeMode::Mean => MergeWeighting::Mean,
                MergeMode::Weighted => MergeWeighting::Importance,
            },
        }
    }

    fn evict_at_truncation_point(&self, view: &LayerView<'_>) -> Decision {
        let len = view.len();
        let target = self.budget.target_at(view.at());
        if len <= target {
            return Decision::KeepAll;
        }
        let excess = len - target;
        let start = self.truncation_point(view.at()).min(len - excess);
        Decision::Keep((0..start).chain(start + excess..len).collect())
    }
}

impl CachePolicy for ElasticCache {
    fn name(&self) -> &str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            prefill_importance: true,
            ..Needs::default()
        }
    }

    fn decide(&self, view: &LayerView<'_>) -> Decision {
        match view.phase {
            Phase::Prefill => self.prefill(view),
            Phase::Decode { .. } => self.evict_at_truncation_point(view),
        }
    }

    fn target(&self, at: TargetAt) -> Option<usize> {
        Some(self.budget.target_at(at))
    }
}

/// Builds the policy from its config section.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let p: ElasticParams = parse_params(NAME, &config.params)?;
    let budget = Budget::from_config(config, p.sinks, p.protected_tail)?;
    Ok(Box::new(ElasticCache::new(budget, &p)?))
}

/// Adds `elastic` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
