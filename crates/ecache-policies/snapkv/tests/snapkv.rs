//! SnapKV against a hand-worked case and a brute-force reading of the spec; its promises
//! through decode steps; and the clear errors of a trace without enough rows.

use ecache_core::trace::{LayerScores, Protected, check_trace, trace_layer};
use ecache_core::{CachePolicy, PolicyConfig, TargetAt};
use proptest::prelude::*;

fn build(budget: f64, params: &[(&str, &str)]) -> Box<dyn CachePolicy> {
    let mut c = PolicyConfig::new("snapkv", budget);
    for (k, v) in params {
        c.set_param(k, v).unwrap();
    }
    ecache_policy_snapkv::build(&c).unwrap()
}

fn rows(rows: Vec<Vec<f32>>) -> LayerScores {
    LayerScores {
        prefill_rows: Some(rows),
        ..Default::default()
    }
}

/// T = 10, budget 0.6: target 6; one sink, window 2 (W' = 2), so K = 3 of slots 1..8.
/// Window means w = [.1, .1, .1, .4, 0, .15, .05, 0]; pooled over 3 (zero padding, / 3):
/// p1..p7 = .1, .2, .1667, .1833, .0667, .0667, .0167, so slots 2, 3, 4 win. Without
/// pooling w's best are 3 and 5, then 1 and 2 tie at .1 and the lower index wins.
#[test]
fn the_worked_case() {
    let r8 = vec![0.1, 0.2, 0.0, 0.4, 0.0, 0.0, 0.1, 0.0, 0.2, 0.0];
    let r9 = vec![0.1, 0.0, 0.2, 0.4, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0];
    let params = [("window", "2"), ("sinks", "1"), ("kernel", "3")];
    let tr = trace_layer(
        build(0.6, &params).as_ref(),
        10,
        0,
        &rows(vec![r8.clone(), r9.clone()]),
    )
    .unwrap();
    assert_eq!(tr.after_prefill, vec![0, 2, 3, 4, 8, 9]);
    assert!(tr.merged_into.is_empty(), "nothing is merged");
    let params = [("window", "2"), ("sinks", "1"), ("kernel", "1")];
    // Extra leading rows are ignored: only the last W' vote.
    let noise = vec![9.0; 10];
    let tr = trace_layer(
        build(0.6, &params).as_ref(),
        10,
        0,
        &rows(vec![noise, r8, r9]),
    )
    .unwrap();
    assert_eq!(tr.after_prefill, vec![0, 1, 3, 5, 8, 9]);
}

/// The spec read literally: w from the full rows, pooling by its formula, a sort for the
/// selection.
fn brute_force(
    all_rows: &[Vec<f32>],
    budget: f64,
    window: usize,
    kernel: usize,
    sinks: usize,
) -> Vec<usize> {
    let t = all_rows.len();
    let target = ((budget * t as f64 + 1e-9).floor() as usize).max(sinks + 1);
    if t <= target {
        return (0..t).collect();
    }
    let wp = window.min(target - sinks);
    let prefix = t - wp;
    let w: Vec<f32> = (0..prefix)
        .map(|j| (t - wp..t).map(|i| all_rows[i][j]).sum::<f32>() / wp as f32)
        .collect();
    let half = (kernel / 2) as isize;
    let p: Vec<f32> = (0..prefix as isize)
        .map(|j| {
            let mut s = 0.0f32;
            for d in -half..=half {
                if (0..prefix as isize).contains(&(j + d)) {
                    s += w[(j + d) as usize];
                }
            }
            s / kernel as f32
        })
        .collect();
    let mut order: Vec<usize> = (sinks..prefix).collect();
    order.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
    order.truncate(target - sinks - wp);
    order.sort_unstable();
    (0..sinks).chain(order).chain(prefix..t).collect()
}

/// Causal rows of small integers (ties are common, and sums exact).
fn random_rows(t: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    (0..t)
        .map(|i| {
            (0..t)
                .map(|j| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    if j <= i { ((x >> 33) % 4) as f32 } else { 0.0 }
                })
                .collect()
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn prefill_matches_brute_force(
        t in 2usize..48,
        budget in 0.05f64..1.0,
        window in 1usize..12,
        kernel in prop::sample::select(vec![1usize, 3, 5, 7]),
        sinks in 0usize..4,
        extra in 0usize..6,
        seed in any::<u64>(),
    ) {
        let all = random_rows(t, seed);
        let (w, k, s) = (window.to_string(), kernel.to_string(), sinks.to_string());
        let policy = build(budget, &[("window", &w), ("kernel", &k), ("sinks", &s)]);
        // The engine hands the last min(W, T) rows; a trace may give more.
        let m = (window + extra).min(t);
        let given = all[t - m..].to_vec();
        let tr = trace_layer(policy.as_ref(), t, 6, &rows(given)).unwrap();
        prop_assert_eq!(&tr.after_prefill, &brute_force(&all, budget, window, kernel, sinks));
        // Decode removes nothing, and every promise holds (the window is kept whole).
        let at = TargetAt::single(t, t);
        let wp = policy.prefill_rows_read(at);
        check_trace(policy.as_ref(), t, &tr, Protected { sinks, protected_tail: wp })
            .map_err(TestCaseError::fail)?;
        for (k, kept) in tr.after_step.iter().enumerate() {
            prop_assert_eq!(kept.len(), tr.after_prefill.len() + k + 1);
        }
    }
}

#[test]
fn a_trace_without_enough_rows_is_refused_clearly() {
    let policy = build(0.5, &[("window", "4")]);
    let missing = trace_layer(policy.as_ref(), 20, 0, &LayerScores::default()).unwrap_err();
    let text = missing.to_string();
    assert!(
        text.contains("prefill_rows") && text.contains("missing"),
        "{text}"
    );
    assert!(text.contains("last 4 prompt queries"), "{text}");
    let short = trace_layer(policy.as_ref(), 20, 0, &rows(vec![vec![0.0; 20]; 3])).unwrap_err();
    assert!(short.to_string().contains("3"), "{short}");
    let ragged = trace_layer(policy.as_ref(), 20, 0, &rows(vec![vec![0.0; 19]; 4])).unwrap_err();
    assert!(ragged.to_string().contains("prefill_rows[0]"), "{ragged}");
    // A prompt within budget reads no rows at all.
    assert!(trace_layer(build(1.0, &[]).as_ref(), 20, 0, &LayerScores::default()).is_ok());
}

#[test]
fn bad_parameters_are_named() {
    for (key, value, needle) in [
        ("window", "0", "window"),
        ("kernel", "4", "odd"),
        ("kernel", "0", "kernel"),
        ("colour", "1", "colour"),
    ] {
        let mut c = PolicyConfig::new("snapkv", 0.5);
        c.set_param(key, value).unwrap();
        let err = ecache_policy_snapkv::build(&c).err().unwrap().to_string();
        assert!(err.contains(needle), "{key}={value}: {err}");
    }
}
