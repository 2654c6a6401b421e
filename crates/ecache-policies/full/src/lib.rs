//! # ecache-policy-full
//!
//! The full cache: never removes a slot. The reference every other policy is measured
//! against. It needs no attention scores and ignores the budget.

use ecache_core::{
    CachePolicy, Decision, LayerView, Needs, PolicyConfig, Registry, Result, TargetAt, parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "full";

/// The full cache.
#[derive(Debug, Clone, Copy, Default)]
pub struct FullCache;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {}

impl CachePolicy for FullCache {
    fn name(&self) -> &str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs::default()
    }

    fn decide(&self, _view: &LayerView<'_>) -> Decision {
        Decision::KeepAll
    }

    fn target(&self, _at: TargetAt) -> Option<usize> {
        None
    }
}

/// Builds the policy from its config section; it takes no parameters.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let Params {} = parse_params(NAME, &config.params)?;
    Ok(Box::new(FullCache))
}

/// Adds `full` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
