//! # ecache-policy-text-priority
//!
//! An example plug-in policy that lives outside the built-ins: when a layer is over its
//! budget, remove the oldest image slots first, and only when no image slot is left the
//! oldest text slots after the sinks. Vision tokens are many and redundant; the instruction
//! and the answer are few and precise. It needs no attention scores.
//!
//! See `docs/writing-a-policy.md` for the walk-through.

use ecache_core::{
    Budget, CachePolicy, Decision, LayerView, Needs, PolicyConfig, Registry, Result, SlotKind,
    TargetAt, parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "text-priority";

/// Parameters (`[policy.params]`); unknown keys are rejected.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "one")]
    sinks: usize,
    #[serde(default = "one")]
    protected_tail: usize,
}

fn one() -> usize {
    1
}

/// Evicts image slots before text slots, oldest first.
#[derive(Debug, Clone)]
pub struct TextPriority {
    budget: Budget,
}

impl CachePolicy for TextPriority {
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
        let removable = self.budget.sinks()..len - self.budget.protected_tail().min(len);
        let image = removable
            .clone()
            .filter(|&i| view.kinds[i] == SlotKind::Image);
        let text = removable.filter(|&i| view.kinds[i] == SlotKind::Text);
        let remove: Vec<usize> = image.chain(text).take(len - target).collect();
        Decision::remove(len, &remove)
    }

    fn target(&self, at: TargetAt) -> Option<usize> {
        Some(self.budget.target_at(at))
    }
}

/// Builds the policy from its `[policy]` section.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let p: Params = parse_params(NAME, &config.params)?;
    let budget = Budget::from_config(config, p.sinks, p.protected_tail)?;
    Ok(Box::new(TextPriority { budget }))
}

/// Adds `text-priority` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
