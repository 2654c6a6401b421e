//! # ecache-policy-h2o
//!
//! Heavy hitters plus a recent window (Zhang et al., 2023): per layer, slots keep an
//! accumulated attention score (prefill column sums plus every decode row); while a layer
//! exceeds `target(N)`, the lowest-scoring slot outside the sinks and the recent window is
//! removed, the older one first on equal scores.

use ecache_core::selection::{TieBreak, top_k};
use ecache_core::{
    Budget, CachePolicy, Decision, Error, LayerView, Needs, PolicyConfig, Registry, Result,
    TargetAt, parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "h2o";

/// Parameters of `h2o` (`[policy.params]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct H2oParams {
    /// Leading slots never removed.
    #[serde(default = "one")]
    pub sinks: usize,
    /// The recent window is never shorter than this.
    #[serde(default = "one")]
    pub protected_tail: usize,
    /// Share of `target(N)` given to the recent window, in [0, 1].
    #[serde(default = "half")]
    pub recent_fraction: f64,
}

fn one() -> usize {
    1
}

fn half() -> f64 {
    0.5
}

/// The H2O policy.
#[derive(Debug, Clone)]
pub struct HeavyHitters {
    budget: Budget,
    recent_fraction: f64,
}

impl HeavyHitters {
    /// An H2O policy; `recent_fraction` must lie in [0, 1].
    pub fn new(budget: Budget, recent_fraction: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&recent_fraction) {
            return Err(Error::PolicyParam {
                policy: NAME.into(),
                message: format!("recent_fraction = {recent_fraction} is outside [0, 1]"),
            });
        }
        Ok(Self {
            budget,
            recent_fraction,
        })
    }

    /// Length of the recent window at a given target, never past the sinks.
    pub fn recent(&self, target: usize) -> usize {
        let share = (self.recent_fraction * target as f64 + 0.5).floor() as usize;
        share
            .max(self.budget.protected_tail())
            .min(target - self.budget.sinks())
    }
}

impl CachePolicy for HeavyHitters {
    fn name(&self) -> &str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            prefill_importance: true,
            decode_attention: true,
            ..Needs::default()
        }
    }

    fn decide(&self, view: &LayerView<'_>) -> Decision {
        let len = view.len();
        let target = self.budget.target_at(view.at());
        if len <= target {
            return Decision::KeepAll;
        }
        let sinks = self.budget.sinks();
        let recent = self.recent(target);
        let candidates: Vec<usize> = (sinks..len - recent).collect();
        let scores = view.scores_or_zeros();
        // Removing the lowest one at a time, older first on ties, keeps exactly the
        // top (target - sinks - recent) with ties going to the newer slot.
        let heavy = top_k(
            &scores,
            &candidates,
            target - sinks - recent,
            TieBreak::KeepHigher,
        );
        Decision::Keep((0..sinks).chain(heavy).chain(len - recent..len).collect())
    }

    fn target(&self, at: TargetAt) -> Option<usize> {
        Some(self.budget.target_at(at))
    }
}

/// Builds the policy from its config section.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let p: H2oParams = parse_params(NAME, &config.params)?;
    let budget = Budget::from_config(config, p.sinks, p.protected_tail)?;
    Ok(Box::new(HeavyHitters::new(budget, p.recent_fraction)?))
}

/// Adds `h2o` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
