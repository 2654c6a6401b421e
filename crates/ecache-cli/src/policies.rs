//! The policies the `ecache` binary knows. A new policy crate adds one line here.

use ecache_core::{Registry, Result};

/// A registry holding `elastic`, `h2o`, `local` and `full`.
pub fn builtin_registry() -> Result<Registry> {
    let mut registry = Registry::new();
    ecache_policy_elastic::register(&mut registry)?;
    ecache_policy_h2o::register(&mut registry)?;
    ecache_policy_local::register(&mut registry)?;
    ecache_policy_full::register(&mut registry)?;
    Ok(registry)
}
