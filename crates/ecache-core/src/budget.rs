//! The budget: what fraction of slots a policy keeps, and `target(N)` (per layer:
//! `target_l(N)`), defined once.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How a budget is spread over the decoder's layers (`[policy] layer_budgets`).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerBudgets {
    /// Every layer keeps the same fraction.
    #[default]
    Uniform,
    /// PyramidKV's idea: lower layers keep more, linearly, with weights of mean 1 (the
    /// spec's `w_l`, slope set by `pyramid_beta`).
    Pyramid,
}

/// Where a slot count is asked for: which layer of how many, after how many tokens of a
/// prompt of which length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetAt {
    /// Decoder layer index.
    pub layer: usize,
    /// Decoder layers in the model (`L`).
    pub layers: usize,
    /// `T`: the prompt's length.
    pub prompt_len: usize,
    /// `N`: tokens processed so far.
    pub tokens_seen: usize,
}

impl TargetAt {
    /// Layer 0 of a one-layer model (per-layer budgets then change nothing), `N` tokens
    /// after a prompt of `T`.
    pub fn single(prompt_len: usize, tokens_seen: usize) -> Self {
        Self {
            layer: 0,
            layers: 1,
            prompt_len,
            tokens_seen,
        }
    }

    /// The same layer and prompt, `tokens_seen` changed.
    pub fn with_tokens(self, tokens_seen: usize) -> Self {
        Self {
            tokens_seen,
            ..self
        }
    }
}

/// A validated cache budget with the protected slot counts that bound it from below.
///
/// `target(N) = max(min_slots, floor(fraction * N + 1e-9))` with
/// `min_slots = sinks + protected_tail + 1` (see `docs/policies.md`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Budget {
    fraction: f64,
    sinks: usize,
    protected_tail: usize,
    spread: LayerBudgets,
    beta: f64,
}

/// `pyramid_beta`'s default.
pub const DEFAULT_PYRAMID_BETA: f64 = 20.0;

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
            spread: LayerBudgets::Uniform,
            beta: DEFAULT_PYRAMID_BETA,
        })
    }

    /// The budget of a `[policy]` section (its `budget`, `layer_budgets` and
    /// `pyramid_beta`) with a policy's protected slot counts.
    pub fn from_config(
        config: &crate::PolicyConfig,
        sinks: usize,
        protected_tail: usize,
    ) -> Result<Self> {
        Self::new(config.budget, sinks, protected_tail)?
            .with_layers(config.layer_budgets, config.pyramid_beta)
    }

    /// The same budget spread over layers as `spread` says; `beta` (>= 1, finite) is the
    /// pyramid's ratio of its first layer's weight to its last's.
    pub fn with_layers(self, spread: LayerBudgets, beta: f64) -> Result<Self> {
        check_beta(beta)?;
        Ok(Self {
            spread,
            beta,
            ..self
        })
    }

    /// How the budget is spread over layers.
    pub fn layer_budgets(&self) -> LayerBudgets {
        self.spread
    }

    /// Layer `layer`'s weight `w_l` of `layers`: 1 when uniform; the pyramid's
    /// `(2 / (beta + 1)) * (beta - (beta - 1) * l / (L - 1))`, mean 1 over the layers.
    pub fn weight(&self, layer: usize, layers: usize) -> f64 {
        match self.spread {
            LayerBudgets::Uniform => 1.0,
            LayerBudgets::Pyramid if layers < 2 => 1.0,
            LayerBudgets::Pyramid => {
                let b = self.beta;
                let l = layer.min(layers - 1) as f64;
                (2.0 / (b + 1.0)) * (b - (b - 1.0) * l / (layers - 1) as f64)
            }
        }
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
    /// A uniform budget's target (per-layer weights ignored); see [`Budget::target_at`].
    pub fn target(&self, tokens_seen: usize) -> usize {
        let scaled = (self.fraction * tokens_seen as f64 + 1e-9).floor() as usize;
        scaled.max(self.min_slots())
    }

    /// `target_l(N) = min(N, max(min_slots, floor(w_l * b * N + 1e-9)))` for the layer
    /// and `N` of `at`; with uniform budgets `max(min_slots, floor(b * N + 1e-9))` as the
    /// first round defined it (not capped by `N`: a cache never holds more than `N`
    /// anyway, and [`Budget::target`] stays what it was).
    pub fn target_at(&self, at: TargetAt) -> usize {
        match self.spread {
            LayerBudgets::Uniform => self.target(at.tokens_seen),
            LayerBudgets::Pyramid => {
                let w = self.weight(at.layer, at.layers);
                let n = at.tokens_seen;
                let scaled = (w * self.fraction * n as f64 + 1e-9).floor() as usize;
                n.min(scaled.max(self.min_slots()))
            }
        }
    }
}

/// Checks a pyramid's `beta`: finite and at least 1.
pub fn check_beta(beta: f64) -> Result<()> {
    if beta >= 1.0 && beta.is_finite() {
        Ok(())
    } else {
        Err(Error::ConfigValue {
            field: "policy.pyramid_beta".into(),
            value: beta.to_string(),
            expected: "a finite number >= 1 (1 spreads the budget uniformly)".into(),
        })
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

    fn pyramid(fraction: f64, beta: f64) -> Budget {
        Budget::new(fraction, 1, 1)
            .unwrap()
            .with_layers(LayerBudgets::Pyramid, beta)
            .unwrap()
    }

    fn at(layer: usize, layers: usize, n: usize) -> TargetAt {
        TargetAt {
            layer,
            layers,
            prompt_len: n,
            tokens_seen: n,
        }
    }

    /// beta = 3, L = 4: w = (2 / 4) * (3 - 2l / 3) = 1.5, 7/6, 5/6, 0.5.
    #[test]
    fn pyramid_matches_hand_computed_values() {
        let b = pyramid(0.2, 3.0);
        let w: Vec<f64> = (0..4).map(|l| b.weight(l, 4)).collect();
        for (got, want) in w.iter().zip([1.5, 7.0 / 6.0, 5.0 / 6.0, 0.5]) {
            assert!((got - want).abs() < 1e-12, "{w:?}");
        }
        let t: Vec<usize> = (0..4).map(|l| b.target_at(at(l, 4, 100))).collect();
        assert_eq!(t, vec![30, 23, 16, 10]);
        // The cap at N, and min_slots below.
        assert_eq!(pyramid(0.9, 3.0).target_at(at(0, 4, 100)), 100);
        assert_eq!(pyramid(0.2, 3.0).target_at(at(3, 4, 10)), 3);
        // One layer: weight 1.
        assert_eq!(pyramid(0.2, 3.0).target_at(at(0, 1, 100)), 20);
    }

    /// beta = 1 is the uniform budget; a pyramid's weights have mean 1 and its targets sum
    /// to within L of L * target(N) whenever no layer is clamped (by min_slots below or N
    /// above): each floor loses less than 1, and so does L * floor(b * N).
    #[test]
    fn pyramid_spreads_the_uniform_total() {
        for layers in [2, 3, 7, 32, 80] {
            for beta in [1.0, 1.5, 5.0, 20.0, 100.0] {
                let mean = (0..layers)
                    .map(|l| pyramid(0.5, beta).weight(l, layers))
                    .sum::<f64>()
                    / layers as f64;
                assert!((mean - 1.0).abs() < 1e-12, "L {layers} beta {beta}");
                for fraction in [0.05, 0.1, 0.2, 0.3, 0.5] {
                    let b = pyramid(fraction, beta);
                    let uniform = Budget::new(fraction, 1, 1).unwrap();
                    for n in [50, 199, 900, 4097] {
                        let targets: Vec<usize> =
                            (0..layers).map(|l| b.target_at(at(l, layers, n))).collect();
                        if beta == 1.0 {
                            assert!(targets.iter().all(|&t| t == uniform.target(n).min(n)));
                        }
                        let clamped = (0..layers).any(|l| {
                            let raw = b.weight(l, layers) * fraction * n as f64;
                            raw < b.min_slots() as f64 || raw > n as f64
                        });
                        if clamped {
                            continue;
                        }
                        let sum: usize = targets.iter().sum();
                        let total = layers * uniform.target(n);
                        assert!(
                            sum.abs_diff(total) < layers,
                            "L {layers} beta {beta} b {fraction} N {n}: {sum} vs {total}"
                        );
                        assert!(targets.windows(2).all(|w| w[0] >= w[1]), "{targets:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn pyramid_beta_below_one_fails() {
        for bad in [0.5, f64::NAN, f64::INFINITY] {
            let err = Budget::new(0.5, 1, 1)
                .unwrap()
                .with_layers(LayerBudgets::Pyramid, bad)
                .unwrap_err();
            assert!(err.to_string().contains("pyramid_beta"), "{err}");
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
