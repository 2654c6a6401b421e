use ecache_core::TargetAt;
use ecache_core::trace::{LayerScores, Protected, check_trace, trace_layer};
use ecache_core::{CachePolicy, PolicyConfig};
use proptest::prelude::*;

fn build(budget: f64, recent_fraction: f64) -> Box<dyn CachePolicy> {
    let mut c = PolicyConfig::new("h2o", budget);
    c.set_param("recent_fraction", &recent_fraction.to_string())
        .unwrap();
    ecache_policy_h2o::build(&c).unwrap()
}

/// A naive H2O written independently: accumulate by position, remove one slot at a time.
fn naive(t: usize, b: f64, rf: f64, scores: &LayerScores, steps: usize) -> Vec<Vec<usize>> {
    let target = |n: usize| ((b * n as f64 + 1e-9).floor() as usize).max(3);
    let mut total = vec![0.0f32; t + steps];
    total[..t].copy_from_slice(&scores.prefill_scores);
    let mut kept: Vec<usize> = (0..t).collect();
    let mut out = Vec::new();
    let evict = |kept: &mut Vec<usize>, total: &[f32], n: usize| {
        while kept.len() > target(n) {
            let tg = target(n);
            let recent = (((rf * tg as f64) + 0.5).floor() as usize)
                .max(1)
                .min(tg - 1);
            let window = 1..kept.len() - recent;
            let victim = window
                .min_by(|&a, &b| {
                    total[kept[a]]
                        .partial_cmp(&total[kept[b]])
                        .unwrap()
                        .then(a.cmp(&b))
                })
                .unwrap();
            kept.remove(victim);
        }
    };
    evict(&mut kept, &total, t);
    out.push(kept.clone());
    for k in 0..steps {
        kept.push(t + k);
        for &p in &kept {
            total[p] += scores.decode_scores[k][p];
        }
        evict(&mut kept, &total, t + k + 1);
        out.push(kept.clone());
    }
    out
}

fn random_scores(t: usize, steps: usize, seed: u64) -> LayerScores {
    // Small integers make ties common, which exercises the tie rule.
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut next = move || {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((x >> 33) % 5) as f32
    };
    LayerScores {
        prefill_scores: (0..t).map(|_| next()).collect(),
        decode_scores: (0..steps)
            .map(|k| (0..=t + k).map(|_| next()).collect())
            .collect(),
        ..Default::default()
    }
}

#[test]
fn prefill_keeps_heavy_hitters_and_the_recent_window() {
    // T = 10, b = 0.6: target 6, recent = floor(3 + 0.5) = 3 -> positions 7, 8, 9;
    // two heavy hitters among 1..7: scores 9 at 3 and 8 at 5.
    let scores = LayerScores {
        prefill_scores: vec![0.0, 1.0, 2.0, 9.0, 1.0, 8.0, 0.5, 0.0, 0.0, 0.0],
        decode_scores: vec![],
        ..Default::default()
    };
    let tr = trace_layer(build(0.6, 0.5).as_ref(), 10, 0, &scores).unwrap();
    assert_eq!(tr.after_prefill, vec![0, 3, 5, 7, 8, 9]);
}

#[test]
fn equal_scores_remove_the_older_slot_first() {
    let scores = LayerScores {
        prefill_scores: vec![1.0; 10],
        decode_scores: vec![],
        ..Default::default()
    };
    let tr = trace_layer(build(0.6, 0.5).as_ref(), 10, 0, &scores).unwrap();
    assert_eq!(tr.after_prefill, vec![0, 5, 6, 7, 8, 9]);
}

proptest! {
    #[test]
    fn matches_a_naive_one_at_a_time_implementation(
        t in 4usize..80, steps in 0usize..40, b in 0.1f64..=1.0, rf in 0.0f64..=1.0, seed in any::<u64>()
    ) {
        let scores = random_scores(t, steps, seed);
        let policy = build(b, rf);
        let tr = trace_layer(policy.as_ref(), t, steps, &scores).unwrap();
        let expected = naive(t, b, rf, &scores, steps);
        prop_assert_eq!(&tr.after_prefill, &expected[0]);
        for k in 0..steps {
            prop_assert_eq!(&tr.after_step[k], &expected[k + 1], "step {}", k + 1);
        }
        check_trace(policy.as_ref(), t, &tr, Protected { sinks: 1, protected_tail: 1 }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn the_recent_window_is_never_evicted(t in 4usize..80, steps in 1usize..40, b in 0.1f64..0.9, seed in any::<u64>()) {
        let scores = random_scores(t, steps, seed);
        let policy = build(b, 0.5);
        let tr = trace_layer(policy.as_ref(), t, steps, &scores).unwrap();
        let h = ecache_policy_h2o::HeavyHitters::new(ecache_core::Budget::new(b, 1, 1).unwrap(), 0.5).unwrap();
        for (k, kept) in tr.after_step.iter().enumerate() {
            let n = t + k + 1;
            let recent = h.recent(policy.target(TargetAt::single(n, n)).unwrap()).min(n);
            for p in n - recent..n {
                prop_assert!(kept.contains(&p), "step {}: recent position {} evicted from {:?}", k + 1, p, kept);
            }
        }
    }
}
