use ecache_core::trace::{LayerScores, Protected, check_trace, trace_layer};
use ecache_core::{PolicyConfig, Registry};
use proptest::prelude::*;

fn build(budget: f64, sinks: usize) -> Box<dyn ecache_core::CachePolicy> {
    let mut c = PolicyConfig::new("local", budget);
    c.set_param("sinks", &sinks.to_string()).unwrap();
    ecache_policy_local::build(&c).unwrap()
}

fn run(budget: f64, sinks: usize, t: usize, steps: usize) -> ecache_core::trace::LayerTrace {
    let scores = LayerScores {
        prefill_scores: vec![0.0; t],
        decode_scores: vec![],
        ..Default::default()
    };
    trace_layer(build(budget, sinks).as_ref(), t, steps, &scores).unwrap()
}

#[test]
fn prefill_keeps_sinks_and_the_most_recent() {
    // T = 10, b = 0.5: target 5 -> sink 0 and positions 6..10.
    let tr = run(0.5, 1, 10, 0);
    assert_eq!(tr.after_prefill, vec![0, 6, 7, 8, 9]);
    assert!(tr.merged_into.is_empty());
    // A budget keeps fewer than all, even at 1 (it has a target): not the full cache.
    assert!(!build(0.5, 1).keeps_everything());
    assert!(!build(1.0, 1).keeps_everything());
}

#[test]
fn decode_removes_the_oldest_non_sink() {
    // T = 10, b = 0.5, sinks 2: targets 5, 5, 6, 6, 7 for N = 10..14.
    let tr = run(0.5, 2, 10, 3);
    assert_eq!(tr.after_prefill, vec![0, 1, 7, 8, 9]);
    assert_eq!(tr.after_step[0], vec![0, 1, 8, 9, 10]);
    assert_eq!(tr.after_step[1], vec![0, 1, 8, 9, 10, 11]);
    assert_eq!(tr.after_step[2], vec![0, 1, 9, 10, 11, 12]);
}

#[test]
fn registry_rejects_unknown_parameters() {
    let mut r = Registry::new();
    ecache_policy_local::register(&mut r).unwrap();
    let mut c = PolicyConfig::new("local", 0.5);
    c.set_param("window", "8").unwrap();
    let err = r.build(&c).err().unwrap().to_string();
    assert!(err.contains("window"), "{err}");
}

proptest! {
    #[test]
    fn budget_and_protection_hold(t in 1usize..160, steps in 0usize..60, b in 0.05f64..=1.0, sinks in 0usize..5) {
        let policy = build(b, sinks);
        let tr = run(b, sinks, t, steps);
        check_trace(policy.as_ref(), t, &tr, Protected { sinks, protected_tail: 1 }).map_err(TestCaseError::fail)?;
        // Local keeps a contiguous recent window after the sinks.
        for kept in std::iter::once(&tr.after_prefill).chain(&tr.after_step) {
            let s = sinks.min(kept.len());
            prop_assert!(kept[s..].windows(2).all(|w| w[1] == w[0] + 1), "{kept:?}");
        }
    }
}
