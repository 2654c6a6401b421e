//! The one shared selection step of score-based policies: top-K with explicit tie rules.

use std::cmp::Ordering;

/// Which of two equal scores wins a place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TieBreak {
    /// The lower index (older slot) is kept.
    KeepLower,
    /// The higher index (newer slot) is kept; the older one is removed first.
    KeepHigher,
}

/// Returns the `k` indices among `candidates` with the highest `scores`, ascending.
/// NaN scores rank below every number. When `k >= candidates.len()` all are returned.
pub fn top_k(scores: &[f32], candidates: &[usize], k: usize, tie: TieBreak) -> Vec<usize> {
    if k >= candidates.len() {
        let mut all = candidates.to_vec();
        all.sort_unstable();
        return all;
    }
    let mut ranked = candidates.to_vec();
    ranked.sort_by(|&a, &b| {
        compare(scores[b], scores[a]).then(match tie {
            TieBreak::KeepLower => a.cmp(&b),
            TieBreak::KeepHigher => b.cmp(&a),
        })
    });
    ranked.truncate(k);
    ranked.sort_unstable();
    ranked
}

fn compare(a: f32, b: f32) -> Ordering {
    match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        (false, true) => Ordering::Greater,
        _ => a.partial_cmp(&b).unwrap_or(Ordering::Equal),
    }
}

/// For each index in `members`, the nearest index in `anchors` (ascending, non-empty);
/// equidistant members go to the earlier anchor.
pub fn nearest_anchor(members: &[usize], anchors: &[usize]) -> Vec<(usize, usize)> {
    members
        .iter()
        .map(|&j| {
            let right = anchors.partition_point(|&a| a < j);
            let to = match (right.checked_sub(1).map(|l| anchors[l]), anchors.get(right)) {
                (Some(l), Some(&r)) => {
                    if j - l <= r - j {
                        l
                    } else {
                        r
                    }
                }
                (Some(l), None) => l,
                (None, Some(&r)) => r,
                (None, None) => unreachable!("anchors is non-empty"),
            };
            (j, to)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_tie_rules() {
        let s = [1.0, 2.0, 2.0, 0.5, 2.0];
        let c = [0, 1, 2, 3, 4];
        assert_eq!(top_k(&s, &c, 2, TieBreak::KeepLower), vec![1, 2]);
        assert_eq!(top_k(&s, &c, 2, TieBreak::KeepHigher), vec![2, 4]);
        assert_eq!(top_k(&s, &c, 0, TieBreak::KeepLower), Vec::<usize>::new());
        assert_eq!(
            top_k(&[f32::NAN, 0.0], &[0, 1], 1, TieBreak::KeepLower),
            vec![1]
        );
    }

    #[test]
    fn nearest_anchor_prefers_left_on_ties() {
        let pairs = nearest_anchor(&[1, 2, 4, 6, 7], &[3, 5]);
        assert_eq!(pairs, vec![(1, 3), (2, 3), (4, 3), (6, 5), (7, 5)]);
    }
}
