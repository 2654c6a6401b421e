use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_core::trace::{
    LayerOf, LayerScores, Protected, check_trace, trace_layer, trace_layer_kinds,
};
use ecache_core::{
    CachePolicy, CacheShape, LayerCache, Phase, PolicyConfig, SlotKind, StepContext, TargetAt,
};
use proptest::prelude::*;

fn build(budget: f64, params: &[(&str, &str)]) -> Box<dyn CachePolicy> {
    let mut c = PolicyConfig::new("elastic", budget);
    for (k, v) in params {
        c.set_param(k, v).unwrap();
    }
    ecache_policy_elastic::build(&c).unwrap()
}

fn scores(prefill: Vec<f32>) -> LayerScores {
    LayerScores {
        prefill_scores: prefill,
        decode_scores: vec![],
        ..Default::default()
    }
}

#[test]
fn the_worked_example_of_the_spec() {
    let s = scores(vec![0.0, 5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 0.0]);
    let tr = trace_layer(build(0.7, &[]).as_ref(), 10, 0, &s).unwrap();
    assert_eq!(tr.after_prefill, vec![0, 1, 3, 5, 7, 8, 9]);
    let merges: Vec<(usize, Vec<usize>)> = tr.merged_into.into_iter().collect();
    assert_eq!(merges, vec![(1, vec![2]), (3, vec![4]), (5, vec![6])]);
}

/// Brute force: sort candidates by (score descending, index ascending), take K.
fn brute_anchors(s: &[f32], sinks: usize, tail: usize, k: usize) -> Vec<usize> {
    let mut c: Vec<usize> = (sinks..s.len() - tail).collect();
    c.sort_by(|&a, &b| s[b].partial_cmp(&s[a]).unwrap().then(a.cmp(&b)));
    let mut top: Vec<usize> = c.into_iter().take(k).collect();
    top.sort_unstable();
    top
}

fn int_scores(t: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..t)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 7) as f32
        })
        .collect()
}

proptest! {
    #[test]
    fn anchors_are_the_brute_force_top_k_and_merges_go_to_the_nearest(
        t in 3usize..120, b in 0.05f64..=1.0, sinks in 0usize..4, seed in any::<u64>()
    ) {
        let s = int_scores(t, seed);
        let policy = build(b, &[("sinks", &sinks.to_string())]);
        let tr = trace_layer(policy.as_ref(), t, 0, &scores(s.clone())).unwrap();
        let target = policy.target(TargetAt::single(t, t)).unwrap();
        if t <= target {
            prop_assert_eq!(&tr.after_prefill, &(0..t).collect::<Vec<_>>());
            return Ok(());
        }
        let anchors = brute_anchors(&s, sinks, 1, target - sinks - 1);
        let expected: Vec<usize> = (0..sinks).chain(anchors.iter().copied()).chain([t - 1]).collect();
        prop_assert_eq!(&tr.after_prefill, &expected);
        let mut merged: Vec<usize> = Vec::new();
        for (anchor, members) in &tr.merged_into {
            prop_assert!(anchors.contains(anchor));
            for &m in members {
                let best = anchors.iter().map(|&a| a.abs_diff(m)).min().unwrap();
                let first_best = *anchors.iter().find(|&&a| a.abs_diff(m) == best).unwrap();
                prop_assert_eq!(*anchor, first_best, "member {} should go to {}", m, first_best);
                merged.push(m);
            }
        }
        merged.sort_unstable();
        let others: Vec<usize> = (sinks..t - 1).filter(|c| !anchors.contains(c)).collect();
        prop_assert_eq!(merged, others);
    }

    #[test]
    fn budget_and_protection_hold(t in 1usize..150, steps in 0usize..60, b in 0.05f64..=1.0, offset in 0usize..40) {
        let policy = build(b, &[("offset", &offset.to_string())]);
        let tr = trace_layer(policy.as_ref(), t, steps, &scores(int_scores(t, t as u64))).unwrap();
        check_trace(policy.as_ref(), t, &tr, Protected { sinks: 1, protected_tail: 1 }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn decode_removes_first_in_first_out_from_the_truncation_point(
        t in 8usize..120, steps in 1usize..80, b in 0.1f64..0.9, offset in 0usize..30
    ) {
        let policy = build(b, &[("offset", &offset.to_string())]);
        let tr = trace_layer(policy.as_ref(), t, steps, &scores(int_scores(t, 7))).unwrap();
        let l0 = tr.after_prefill.len();
        let p = l0.saturating_sub(offset).max(1);
        // Everything before P stays forever; what follows P is the FIFO queue.
        let mut queue: Vec<usize> = tr.after_prefill[p..].to_vec();
        for (k, kept) in tr.after_step.iter().enumerate() {
            queue.push(t + k);
            let cut = queue.len() - (kept.len() - p);
            queue.drain(..cut);
            prop_assert_eq!(&kept[..p], &tr.after_prefill[..p]);
            prop_assert_eq!(&kept[p..], &queue[..], "step {}", k + 1);
        }
    }
}

/// A prompt of `t` slots with image slots `image.0..image.1` (none when empty).
fn kinds(t: usize, image: (usize, usize)) -> Vec<SlotKind> {
    (0..t)
        .map(|i| {
            if (image.0..image.1).contains(&i) {
                SlotKind::Image
            } else {
                SlotKind::Text
            }
        })
        .collect()
}

proptest! {
    /// Every `protect` x `importance` setting against brute force: `R'` from the slots
    /// after the last image slot (spec: `min(max(R, I), target(T) - S)`), importance the sum
    /// or the sum over `T - j`, anchors the top `K = target(T) - S - R'` by (importance
    /// descending, index ascending), and every other candidate merged into an anchor.
    #[test]
    fn protect_and_importance_follow_the_spec(
        t in 3usize..120, b in 0.05f64..=1.0, sinks in 0usize..4, tail in 1usize..4,
        image_start in 0usize..60, image_len in 0usize..60, seed in any::<u64>(),
        instruction in any::<bool>(), mean in any::<bool>(),
    ) {
        let image = (image_start.min(t), (image_start + image_len).min(t));
        let prompt = kinds(t, image);
        let s = int_scores(t, seed);
        let protect = if instruction { "instruction" } else { "tail" };
        let importance = if mean { "mean" } else { "sum" };
        let policy = build(b, &[
            ("sinks", &sinks.to_string()),
            ("protected_tail", &tail.to_string()),
            ("protect", protect),
            ("importance", importance),
        ]);
        let tr = trace_layer_kinds(policy.as_ref(), LayerOf::SINGLE, &prompt, 0, &scores(s.clone())).unwrap();
        let target = policy.target(TargetAt::single(t, t)).unwrap();
        if t <= target {
            prop_assert_eq!(&tr.after_prefill, &(0..t).collect::<Vec<_>>());
            return Ok(());
        }
        let after_image = match prompt.iter().rposition(|k| *k == SlotKind::Image) {
            Some(last) => t - 1 - last,
            None => 0,
        };
        let protected = if instruction { tail.max(after_image).min(target - sinks) } else { tail };
        let weights: Vec<f32> = if mean {
            s.iter().enumerate().map(|(j, x)| x / (t - j) as f32).collect()
        } else {
            s.clone()
        };
        let anchors = brute_anchors(&weights, sinks, protected, target - sinks - protected);
        let expected: Vec<usize> = (0..sinks)
            .chain(anchors.iter().copied())
            .chain(t - protected..t)
            .collect();
        prop_assert_eq!(&tr.after_prefill, &expected);
        prop_assert_eq!(tr.after_prefill.len(), target);
        let merged: usize = tr.merged_into.values().map(Vec::len).sum();
        let dropped = t - target;
        prop_assert_eq!(merged, if anchors.is_empty() { 0 } else { dropped });
    }
}

/// The question after an image survives prefill under `protect = "instruction"` and is
/// merged away under the paper's tail of one, on scores where late slots receive little
/// summed attention (as the study found).
#[test]
fn instruction_protection_keeps_the_question_the_tail_loses() {
    let t = 40;
    // Slots 1..=24 an image, 25..40 the question; summed attention falls with the index.
    let prompt = kinds(t, (1, 25));
    let s: Vec<f32> = (0..t).map(|j| (t - j) as f32).collect();
    let question: Vec<usize> = (25..t).collect();
    let keeps_question = |protect: &str| {
        let policy = build(0.5, &[("protect", protect)]);
        let tr = trace_layer_kinds(
            policy.as_ref(),
            LayerOf::SINGLE,
            &prompt,
            0,
            &scores(s.clone()),
        )
        .unwrap();
        question.iter().all(|q| tr.after_prefill.contains(q))
    };
    assert!(keeps_question("instruction"));
    assert!(!keeps_question("tail"));
}

/// Under `importance = "mean"` a late slot with as much attention per query as an early
/// one but fewer queries wins over it; under `sum` it loses.
#[test]
fn mean_importance_does_not_penalise_late_slots() {
    let t = 10;
    // Slot 2 is seen by 8 queries and receives 8 (1 a query); slot 7 by 3 queries and
    // receives 3.6 (1.2 a query): the sum favours slot 2, the mean slot 7.
    let mut s = vec![0.0f32; t];
    s[2] = 8.0;
    s[7] = 3.6;
    let kept = |importance: &str| {
        // Room for the sink, one anchor and the protected tail of one.
        let policy = build(0.3, &[("importance", importance)]);
        let target = policy.target(TargetAt::single(t, t)).unwrap();
        assert_eq!(target, 3, "sink, one anchor, tail");
        trace_layer(policy.as_ref(), t, 0, &scores(s.clone()))
            .unwrap()
            .after_prefill
    };
    assert_eq!(kept("sum"), vec![0, 2, 9]);
    assert_eq!(kept("mean"), vec![0, 7, 9]);
}

#[test]
fn an_absolute_truncation_point_overrides_the_offset() {
    let policy = build(0.5, &[("truncation_point", "3")]);
    let tr = trace_layer(policy.as_ref(), 20, 3, &scores(int_scores(20, 3))).unwrap();
    // target(20) = 10, target(21) = 10: step 1 removes the slot at index 3.
    let mut expected = tr.after_prefill.clone();
    expected.remove(3);
    expected.push(20);
    assert_eq!(tr.after_step[0], expected);
    let mut c = PolicyConfig::new("elastic", 0.5);
    c.set_param("sinks", "4").unwrap();
    c.set_param("truncation_point", "2").unwrap();
    let err = ecache_policy_elastic::build(&c).err().unwrap().to_string();
    assert!(err.contains("truncation_point"), "{err}");
}

/// Applies elastic prefill to real tensors and checks every merged slot against a naive
/// mean (or importance-weighted mean) of its members.
fn merged_slots_match_naive(merge: &str) {
    type B = Flex;
    let device = Default::default();
    let (t, heads, dim) = (24, 3, 5);
    let policy = build(0.4, &[("merge", merge)]);
    let shape = CacheShape {
        batch: 2,
        kv_heads: heads,
        head_dim: dim,
    };
    let mut cache = LayerCache::<B>::new(shape, 8, true, DType::F32, &device);
    let keys = Tensor::<B, 4>::random([2, heads, t, dim], Distribution::Normal(0.0, 1.0), &device);
    let values =
        Tensor::<B, 4>::random([2, heads, t, dim], Distribution::Normal(0.0, 1.0), &device);
    let positions: Vec<usize> = (0..t).collect();
    cache
        .append(
            keys.clone(),
            values.clone(),
            &[&positions, &positions],
            &[SlotKind::Image; 24],
        )
        .unwrap();
    let s: Vec<f32> = int_scores(t, 11).iter().map(|x| x + 0.5).collect();
    cache.table_mut(1).unwrap().accumulate(&s).unwrap();
    let ctx = StepContext {
        layer: 0,
        layers: 1,
        phase: Phase::Prefill,
        tokens_seen: t,
        prompt_len: t,
    };
    let plan = cache
        .table(1)
        .unwrap()
        .decide(policy.as_ref(), ctx)
        .unwrap();
    assert!(plan.has_merges());
    cache.apply(1, &plan).unwrap();
    assert_eq!(cache.len(0), t, "sequence 0 is untouched");
    assert_eq!(cache.len(1), policy.target(TargetAt::single(t, t)).unwrap());
    for (tensor, got) in [(keys, cache.keys()), (values, cache.values())] {
        let old: Vec<f32> = tensor.into_data().into_vec().unwrap();
        let new: Vec<f32> = got.into_data().into_vec().unwrap();
        let cap = cache.max_len();
        for (i, &anchor) in plan.kept().iter().enumerate() {
            let members: Vec<usize> = std::iter::once(anchor)
                .chain(plan.merged_into(i).iter().copied())
                .collect();
            let weights: Vec<f32> = if merge == "weighted" {
                let total: f32 = members.iter().map(|&m| s[m]).sum();
                members.iter().map(|&m| s[m] / total).collect()
            } else {
                vec![1.0 / members.len() as f32; members.len()]
            };
            for h in 0..heads {
                for d in 0..dim {
                    let reference: f32 = members
                        .iter()
                        .zip(&weights)
                        .map(|(&m, w)| w * old[((heads + h) * t + m) * dim + d])
                        .sum();
                    let value = new[((heads + h) * cap + i) * dim + d];
                    assert!(
                        (value - reference).abs() < 1e-5,
                        "slot {i} head {h} dim {d}: {value} vs {reference}"
                    );
                }
            }
        }
    }
}

#[test]
fn merged_slots_are_the_mean_of_their_members() {
    merged_slots_match_naive("mean");
}

#[test]
fn weighted_merge_uses_importance() {
    merged_slots_match_naive("weighted");
}
