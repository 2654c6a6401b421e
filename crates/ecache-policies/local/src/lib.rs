//! # ecache-policy-local
//!
//! StreamingLLM's local window: the `sinks` first slots plus the most recent
//! `target(N) - sinks` slots. Prefill and decode follow one rule; no attention scores.

use ecache_core::{
    Budget, CachePolicy, Decision, LayerView, Needs, PolicyConfig, Registry, Result, TargetAt,
    parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "local";

/// Parameters of `local` (`[policy.params]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalParams {
    /// Leading slots never removed.
    #[serde(default = "one")]
    pub sinks: usize,
    /// Trailing prompt slots protected at prefill (they are the most recent anyway).
    #[serde(default = "one")]
    pub protected_tail: usize,
}

fn one() -> usize {
    1
}

/// Sinks plus a recent window.
#[derive(Debug, Clone)]
pub struct LocalWindow {
    budget: Budget,
}

impl LocalWindow {
    /// A local window policy for a budget.
    pub fn new(budget: Budget) -> Self {
        Self { budget }
    }
}

impl CachePolicy for LocalWindow {
    fn name(&self) -> &str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn decide(&self, view: &LayerView<'_>) -> Decision {
        let len = view.len();
        let target = self.budget.target_at(view.at());
        if len <= target {
            return Decision::KeepAll;
        }
        let sinks = self.budget.sinks();
        let recent_from = len - (target - sinks);
        Decision::Keep((0..sinks).chain(recent_from..len).collect())
    }

    fn target(&self, at: TargetAt) -> Option<usize> {
        Some(self.budget.target_at(at))
    }
}

/// Builds the policy from its config section.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let p: LocalParams = parse_params(NAME, &config.params)?;
    let budget = Budget::from_config(config, p.sinks, p.protected_tail)?;
    Ok(Box::new(LocalWindow::new(budget)))
}

/// Adds `local` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
