use ecache_core::trace::{LayerScores, trace_layer};
use ecache_core::{PolicyConfig, Registry};
use proptest::prelude::*;

proptest! {
    #[test]
    fn full_never_removes(t in 1usize..200, steps in 0usize..50, b in 0.05f64..=1.0) {
        let policy = ecache_policy_full::build(&PolicyConfig::new("full", b)).unwrap();
        prop_assert!(!policy.needs().tracks_scores());
        prop_assert!(policy.keeps_everything());
        let scores = LayerScores { prefill_scores: vec![1.0; t], ..Default::default() };
        let tr = trace_layer(policy.as_ref(), t, steps, &scores).unwrap();
        prop_assert_eq!(&tr.after_prefill, &(0..t).collect::<Vec<_>>());
        for (k, kept) in tr.after_step.iter().enumerate() {
            prop_assert_eq!(kept, &(0..t + k + 1).collect::<Vec<_>>());
        }
    }
}

#[test]
fn full_takes_no_parameters() {
    let mut r = Registry::new();
    ecache_policy_full::register(&mut r).unwrap();
    let mut c = PolicyConfig::new("full", 1.0);
    c.set_param("sinks", "4").unwrap();
    let err = r.build(&c).err().unwrap().to_string();
    assert!(err.contains("sinks") && err.contains("full"), "{err}");
}
