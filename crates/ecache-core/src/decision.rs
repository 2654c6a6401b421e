//! What a policy decides for one layer, and the validated plan the cache applies.

use crate::error::{Error, Result};

/// How the members of a merge group are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeWeighting {
    /// Plain mean, the anchor counted once like every member.
    #[default]
    Mean,
    /// Each slot weighted by its importance score; falls back to the mean when the
    /// group's scores sum to zero.
    Importance,
}

/// A policy's decision for one layer of one sequence. Indices are slot indices into the
/// current cache (not positions).
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Leave the cache as it is.
    KeepAll,
    /// Keep exactly these slots (strictly ascending); remove the rest.
    Keep(Vec<usize>),
    /// Keep `keep` (strictly ascending) and fold each `(from, into)` pair's `from` slot into
    /// the kept slot `into`; slots in neither are removed.
    Merge {
        keep: Vec<usize>,
        into: Vec<(usize, usize)>,
        weighting: MergeWeighting,
    },
}

impl Decision {
    /// Keep every slot except those in `remove` (any order, duplicates ignored).
    pub fn remove(len: usize, remove: &[usize]) -> Decision {
        let mut drop = vec![false; len];
        for &i in remove {
            if i < len {
                drop[i] = true;
            }
        }
        if !drop.iter().any(|&d| d) {
            return Decision::KeepAll;
        }
        Decision::Keep((0..len).filter(|&i| !drop[i]).collect())
    }
}

/// A validated decision: new slot `i` is built from `groups[i]`, a list of old slot indices
/// whose first entry is the slot kept in place (its position and kind carry over).
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    old_len: usize,
    kept: Vec<usize>,
    /// Per kept slot, the extra slots merged into it (empty for a plain keep).
    merged: Vec<Vec<usize>>,
    weighting: MergeWeighting,
}

impl Plan {
    /// Checks `decision` against a cache of `old_len` slots.
    pub fn new(decision: Decision, old_len: usize, policy: &str, layer: usize) -> Result<Plan> {
        let invalid = |reason: String| Error::InvalidDecision {
            policy: policy.to_string(),
            layer,
            reason,
        };
        let (kept, into, weighting) = match decision {
            Decision::KeepAll => return Ok(Plan::identity(old_len)),
            Decision::Keep(keep) => (keep, Vec::new(), MergeWeighting::Mean),
            Decision::Merge {
                keep,
                into,
                weighting,
            } => (keep, into, weighting),
        };
        check_ascending(&kept, old_len).map_err(|r| invalid(format!("kept slots: {r}")))?;
        let mut merged = vec![Vec::new(); kept.len()];
        let mut used = vec![false; old_len];
        for &k in &kept {
            used[k] = true;
        }
        for &(from, to) in &into {
            if from >= old_len {
                return Err(invalid(format!(
                    "merge source {from} is outside the cache of {old_len} slots"
                )));
            }
            if used[from] {
                return Err(invalid(format!(
                    "slot {from} is kept or merged more than once"
                )));
            }
            used[from] = true;
            let Ok(target) = kept.binary_search(&to) else {
                return Err(invalid(format!(
                    "slot {from} is merged into {to}, which is not kept"
                )));
            };
            merged[target].push(from);
        }
        for group in &mut merged {
            group.sort_unstable();
        }
        Ok(Plan {
            old_len,
            kept,
            merged,
            weighting,
        })
    }

    /// The plan that changes nothing.
    pub fn identity(len: usize) -> Plan {
        Plan {
            old_len: len,
            kept: (0..len).collect(),
            merged: vec![Vec::new(); len],
            weighting: MergeWeighting::Mean,
        }
    }

    /// Slot count before the plan.
    pub fn old_len(&self) -> usize {
        self.old_len
    }

    /// Slot count after the plan.
    pub fn new_len(&self) -> usize {
        self.kept.len()
    }

    /// Old indices of the kept slots, ascending.
    pub fn kept(&self) -> &[usize] {
        &self.kept
    }

    /// For kept slot `i` (new index), the old slots merged into it.
    pub fn merged_into(&self, i: usize) -> &[usize] {
        &self.merged[i]
    }

    /// How merge groups are weighted.
    pub fn weighting(&self) -> MergeWeighting {
        self.weighting
    }

    /// Whether the plan leaves the cache unchanged.
    pub fn is_identity(&self) -> bool {
        self.kept.len() == self.old_len
    }

    /// Whether any slot is folded into another.
    pub fn has_merges(&self) -> bool {
        self.merged.iter().any(|g| !g.is_empty())
    }

    /// The merges by position: for each kept slot that absorbs others, its position and
    /// the positions folded into it (ascending), `positions` being the old slots'.
    pub fn merges_at(&self, positions: &[usize]) -> Vec<(usize, Vec<usize>)> {
        self.kept
            .iter()
            .zip(&self.merged)
            .filter(|(_, members)| !members.is_empty())
            .map(|(&k, members)| {
                (
                    positions[k],
                    members.iter().map(|&m| positions[m]).collect(),
                )
            })
            .collect()
    }

    /// Old indices removed without being merged anywhere, ascending.
    pub fn dropped(&self) -> Vec<usize> {
        let mut used = vec![false; self.old_len];
        for (i, &k) in self.kept.iter().enumerate() {
            used[k] = true;
            for &m in &self.merged[i] {
                used[m] = true;
            }
        }
        (0..self.old_len).filter(|&i| !used[i]).collect()
    }

    /// Per new slot, the old slots it is built from (the kept one first) with their
    /// normalised weights. `scores` are the old slots' importance, needed for
    /// [`MergeWeighting::Importance`].
    pub fn weighted_groups(&self, scores: Option<&[f32]>) -> Vec<Vec<(usize, f32)>> {
        self.kept
            .iter()
            .zip(&self.merged)
            .map(|(&anchor, extra)| {
                let members: Vec<usize> = std::iter::once(anchor)
                    .chain(extra.iter().copied())
                    .collect();
                let uniform = 1.0 / members.len() as f32;
                let raw: Option<Vec<f32>> = match (self.weighting, scores) {
                    (MergeWeighting::Importance, Some(s)) => {
                        let w: Vec<f32> = members.iter().map(|&m| s[m].max(0.0)).collect();
                        let total: f32 = w.iter().sum();
                        (total > 0.0 && total.is_finite())
                            .then(|| w.iter().map(|x| x / total).collect())
                    }
                    _ => None,
                };
                match raw {
                    Some(w) => members.into_iter().zip(w).collect(),
                    None => members.into_iter().map(|m| (m, uniform)).collect(),
                }
            })
            .collect()
    }
}

fn check_ascending(indices: &[usize], len: usize) -> std::result::Result<(), String> {
    for (n, &i) in indices.iter().enumerate() {
        if i >= len {
            return Err(format!("index {i} is outside the cache of {len} slots"));
        }
        if n > 0 && indices[n - 1] >= i {
            return Err(format!(
                "indices must be strictly ascending, found {} before {i}",
                indices[n - 1]
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_plan_groups_members_under_their_anchor() {
        let d = Decision::Merge {
            keep: vec![0, 1, 3],
            into: vec![(2, 1), (4, 3)],
            weighting: MergeWeighting::Mean,
        };
        let p = Plan::new(d, 6, "t", 0).unwrap();
        assert_eq!(p.kept(), &[0, 1, 3]);
        assert_eq!(p.merged_into(1), &[2]);
        assert_eq!(p.merged_into(2), &[4]);
        assert_eq!(p.dropped(), vec![5]);
        let g = p.weighted_groups(None);
        assert_eq!(g[1], vec![(1, 0.5), (2, 0.5)]);
    }

    #[test]
    fn importance_weights_are_normalised_and_fall_back_to_mean() {
        let d = Decision::Merge {
            keep: vec![0, 2],
            into: vec![(1, 0), (3, 2)],
            weighting: MergeWeighting::Importance,
        };
        let p = Plan::new(d, 4, "t", 0).unwrap();
        let g = p.weighted_groups(Some(&[3.0, 1.0, 0.0, 0.0]));
        assert_eq!(g[0], vec![(0, 0.75), (1, 0.25)]);
        assert_eq!(
            g[1],
            vec![(2, 0.5), (3, 0.5)],
            "zero mass falls back to the mean"
        );
    }

    #[test]
    fn invalid_decisions_are_reported() {
        let cases = [
            (Decision::Keep(vec![1, 0]), "strictly ascending"),
            (Decision::Keep(vec![0, 9]), "outside the cache"),
            (
                Decision::Merge {
                    keep: vec![0],
                    into: vec![(1, 2)],
                    weighting: MergeWeighting::Mean,
                },
                "not kept",
            ),
            (
                Decision::Merge {
                    keep: vec![0, 1],
                    into: vec![(1, 0)],
                    weighting: MergeWeighting::Mean,
                },
                "more than once",
            ),
        ];
        for (d, needle) in cases {
            let err = Plan::new(d, 4, "demo", 3).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("demo") && err.contains("layer 3"),
                "{err}"
            );
        }
    }

    #[test]
    fn remove_helper_keeps_the_complement() {
        assert_eq!(Decision::remove(5, &[1, 3]), Decision::Keep(vec![0, 2, 4]));
        assert_eq!(Decision::remove(5, &[]), Decision::KeepAll);
    }
}
