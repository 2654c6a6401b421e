//! # ecache-policy-snapkv
//!
//! SnapKV (Li et al., 2024), as `../shared/spec/cache-policies.md` ("Additions (second
//! round)") defines it: at prefill, per layer, the last `W'` prompt queries (the
//! observation window) vote for the prefix slots by their head-mean attention; the votes
//! are average-pooled over `kernel` neighbours (zero padding, divided by `kernel`
//! everywhere) and the `K = target(T) - S - W'` best candidates are kept beside the sinks
//! and the window. Nothing is merged; decode steps remove nothing.

use ecache_core::selection::{TieBreak, top_k};
use ecache_core::{
    Budget, CachePolicy, Decision, Error, LayerView, Needs, Phase, PolicyConfig, Registry, Result,
    TargetAt, parse_params,
};

/// Registry name of this policy.
pub const NAME: &str = "snapkv";

/// Parameters of `snapkv` (`[policy.params]`).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapKvParams {
    /// `W`: the observation window, the last prompt queries that vote (at least 1).
    #[serde(default = "default_window")]
    pub window: usize,
    /// `k`: the pooling kernel's width (odd, at least 1; 1 = no pooling).
    #[serde(default = "default_kernel")]
    pub kernel: usize,
    /// `S`: leading slots always kept.
    #[serde(default)]
    pub sinks: usize,
}

fn default_window() -> usize {
    32
}

fn default_kernel() -> usize {
    5
}

/// The SnapKV policy.
#[derive(Debug, Clone)]
pub struct SnapKv {
    budget: Budget,
    window: usize,
    kernel: usize,
}

impl SnapKv {
    /// A SnapKV policy; its budget's protected tail must be 0 (`min_slots = S + 1`).
    pub fn new(budget: Budget, window: usize, kernel: usize) -> Result<Self> {
        let bad = |message: String| Error::PolicyParam {
            policy: NAME.into(),
            message,
        };
        if window == 0 {
            return Err(bad("window = 0: at least one query must vote".into()));
        }
        if kernel.is_multiple_of(2) {
            return Err(bad(format!(
                "kernel = {kernel}: the pooling width must be odd (1 = no pooling)"
            )));
        }
        Ok(Self {
            budget,
            window,
            kernel,
        })
    }

    /// `W' = min(W, target(T) - S)`: the window a layer's prefill keeps, for a prompt of
    /// `at.prompt_len` slots.
    pub fn window_kept(&self, at: TargetAt) -> usize {
        let target = self.budget.target_at(at.with_tokens(at.prompt_len));
        self.window.min(target.saturating_sub(self.budget.sinks()))
    }

    /// Pooled window scores `p[j]` for `j` in `[0, prefix)`: the mean of the rows over
    /// the window, then the zero-padded average over `kernel` neighbours.
    fn pooled(&self, view: &LayerView<'_>, window: usize, prefix: usize) -> Vec<f32> {
        let mut w = vec![0.0f32; prefix];
        if let Some(rows) = view.prefill_rows {
            // The engine hands at least `W` rows (or all `T`); a short input only averages
            // the rows it has (`ecache trace` refuses it before this point).
            let used = window.min(rows.rows());
            for row in (0..used).filter_map(|back| rows.from_end(back)) {
                for (acc, a) in w.iter_mut().zip(row) {
                    *acc += a;
                }
            }
            if used > 0 {
                w.iter_mut().for_each(|x| *x /= used as f32);
            }
        }
        // Each pooled value sums its own neighbours, in order (k is small; a sliding sum
        // would round differently from one window to the next and could split ties).
        let half = self.kernel / 2;
        let k = self.kernel as f32;
        (0..prefix)
            .map(|j| {
                w[j.saturating_sub(half)..(j + half + 1).min(prefix)]
                    .iter()
                    .sum::<f32>()
                    / k
            })
            .collect()
    }

    fn prefill(&self, view: &LayerView<'_>) -> Decision {
        let len = view.len();
        let target = self.budget.target_at(view.at());
        if len <= target {
            return Decision::KeepAll;
        }
        let sinks = self.budget.sinks();
        let window = self.window_kept(view.at());
        let prefix = len - window;
        let pooled = self.pooled(view, window, prefix);
        let candidates: Vec<usize> = (sinks..prefix).collect();
        let kept = top_k(
            &pooled,
            &candidates,
            target - sinks - window,
            TieBreak::KeepLower,
        );
        Decision::Keep((0..sinks).chain(kept).chain(prefix..len).collect())
    }
}

impl CachePolicy for SnapKv {
    fn name(&self) -> &str {
        NAME
    }

    fn needs(&self) -> Needs {
        Needs {
            prefill_rows: self.window,
            ..Needs::default()
        }
    }

    fn decide(&self, view: &LayerView<'_>) -> Decision {
        match view.phase {
            Phase::Prefill => self.prefill(view),
            Phase::Decode { .. } => Decision::KeepAll,
        }
    }

    /// `min(T, target(T)) + (N - T)`: the compressed prompt and every generated slot.
    fn target(&self, at: TargetAt) -> Option<usize> {
        let t = at.prompt_len;
        let after_prefill = t.min(self.budget.target_at(at.with_tokens(t)));
        Some(after_prefill + at.tokens_seen.saturating_sub(t))
    }

    fn prefill_rows_read(&self, at: TargetAt) -> usize {
        let target = self.budget.target_at(at.with_tokens(at.prompt_len));
        if at.prompt_len <= target {
            0
        } else {
            self.window_kept(at)
        }
    }
}

/// Builds the policy from its config section.
pub fn build(config: &PolicyConfig) -> Result<Box<dyn CachePolicy>> {
    let p: SnapKvParams = parse_params(NAME, &config.params)?;
    let budget = Budget::from_config(config, p.sinks, 0)?;
    Ok(Box::new(SnapKv::new(budget, p.window, p.kernel)?))
}

/// Adds `snapkv` to a registry.
pub fn register(registry: &mut Registry) -> Result<()> {
    registry.register(NAME, build)
}
