//! The budget: what fraction of slots a policy keeps, and `target(N)`, defined once.

use crate::error::{Error, Result};

/// A validated cache budget with the protected slot counts that bound it from below.
///
/// `target(N) = max(min_slots, floor(fraction * N + 1e-9))` with
/// `min_slots = sinks + protected_tail + 1` (see `docs/policies.md`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    fraction: f64,
    sinks: usize,
    protected_tail: usize,
}

impl Budget {
    /// A budget keeping `fraction` of the slots, with `sinks` leading slots and
    /// `protected_tail` trailing prompt slots protected.
    ///
    /// Fails when `fraction` is not in (0, 1] (NaN included).
    pub fn new(fraction: f64, sinks: usize, protected_tail: usize) -> Result<Self> {
        check_fraction(fraction)?;
        Ok(Self {
            fraction,
            sinks,
            protected_tail,
        })
    }

    /// The fraction of slots kept, in (0, 1].
    pub fn fraction(&self) -> f64 {
        self.fraction
    }

    /// Number of leading slots never removed or merged.
    pub fn sinks(&self) -> usize {
        self.sinks
    }

    /// Number of trailing prompt slots protected at prefill.
    pub fn protected_tail(&self) -> usize {
        self.protected_tail
    }

    /// The smallest target: sinks, protected tail and one more slot.
    pub fn min_slots(&self) -> usize {
        self.sinks + self.protected_tail + 1
    }

    /// Whether this budget keeps everything (`fraction == 1`).
    pub fn is_full(&self) -> bool {
        self.fraction >= 1.0
    }

    /// Slots a layer may hold once `tokens_seen` tokens have been processed.
    ///
    /// The epsilon keeps `0.7 * 10` at 7 despite binary rounding.
    pub fn target(&self, tokens_seen: usize) -> usize {
        let scaled = (self.fraction * tokens_seen as f64 + 1e-9).floor() as usize;
        scaled.max(self.min_slots())
    }
}

/// Checks that a budget fraction lies in (0, 1].
pub fn check_fraction(fraction: f64) -> Result<()> {
    if fraction > 0.0 && fraction <= 1.0 {
        Ok(())
    } else {
        Err(Error::InvalidBudget { value: fraction })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_matches_hand_computed_values() {
        let b = Budget::new(0.7, 1, 1).unwrap();
        assert_eq!(b.target(10), 7);
        assert_eq!(b.target(2), 3, "never below sinks + tail + 1");
        let b = Budget::new(0.2, 4, 1).unwrap();
        assert_eq!(b.target(900), 180);
        assert_eq!(b.target(901), 180);
        assert_eq!(b.target(905), 181);
    }

    #[test]
    fn full_budget_targets_every_token() {
        let b = Budget::new(1.0, 1, 1).unwrap();
        for n in 3..500 {
            assert_eq!(b.target(n), n);
        }
    }

    #[test]
    fn fractions_outside_unit_interval_fail() {
        for bad in [0.0, -0.1, 1.0001, f64::NAN, f64::INFINITY] {
            let err = Budget::new(bad, 1, 1).unwrap_err();
            assert!(err.to_string().contains("outside (0, 1]"), "{err}");
        }
    }
}
