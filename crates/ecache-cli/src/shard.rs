//! Studies that outgrow one machine: `ecache eval --shard I/N` evaluates every N-th item
//! from item I (1-based) and writes its item records; `ecache eval merge` checks that the
//! shards are one evaluation's, complete and disjoint, and sums their records in item
//! order, which is exactly what one unsharded run sums.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Result;
use ecache_core::PolicyConfig;
use serde::{Deserialize, Serialize};

use crate::BadInput;
use crate::eval::{EvalRow, ItemRecord, Metric, rows_from_records};

/// Shard `index` of `count` (1-based): items `index - 1`, `index - 1 + count`, ...
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    /// Whether item `item` (0-based) belongs to this shard.
    pub fn takes(&self, item: usize) -> bool {
        item % self.count == self.index - 1
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Shard {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("--shard {text:?}: expected I/N with 1 <= I <= N, e.g. 2/8");
        let (i, n) = text.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || count == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

/// What a shard run writes: enough to rebuild the whole evaluation's rows exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardFile {
    /// `I/N`.
    pub shard: String,
    /// The whole evaluation's fingerprint (model, every item, runs, metric, settings):
    /// only shards of one evaluation merge.
    pub evaluation: String,
    pub metric: Metric,
    /// The runs, in order, as their rows name them.
    pub runs: Vec<PolicyConfig>,
    /// Per run, this shard's item records.
    pub records: Vec<Vec<ItemRecord>>,
}

impl ShardFile {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BadInput(format!("cannot read shard {}: {e}", path.display())))?;
        serde_json::from_str(&text).map_err(|e| {
            BadInput(format!(
                "{} is not a shard of `ecache eval --shard` ({e})",
                path.display()
            ))
            .into()
        })
    }
}

/// The rows of the evaluation the shard files together cover: every shard of `1..=N`
/// exactly once, all of one evaluation, no item twice.
pub fn merge(paths: &[PathBuf]) -> Result<Vec<EvalRow>> {
    if paths.is_empty() {
        return Err(BadInput("eval merge: give the shard files to merge".into()).into());
    }
    let shards: Vec<(PathBuf, ShardFile, Shard)> = paths
        .iter()
        .map(|p| {
            let file = ShardFile::read(p)?;
            let shard: Shard = file
                .shard
                .parse()
                .map_err(|e| BadInput(format!("{}: {e}", p.display())))?;
            Ok((p.clone(), file, shard))
        })
        .collect::<Result<_>>()?;
    let (first_path, first, first_shard) = &shards[0];
    let count = first_shard.count;
    let mut seen: Vec<Option<&PathBuf>> = vec![None; count];
    for (path, file, shard) in &shards {
        if file.evaluation != first.evaluation
            || file.metric != first.metric
            || file.runs != first.runs
            || shard.count != count
        {
            return Err(BadInput(format!(
                "{} and {} are shards of different evaluations (model, items, runs, metric, settings or shard count differ)",
                first_path.display(),
                path.display()
            ))
            .into());
        }
        if file.records.len() != file.runs.len() {
            return Err(BadInput(format!(
                "{}: records for {} runs, {} runs named",
                path.display(),
                file.records.len(),
                file.runs.len()
            ))
            .into());
        }
        if let Some(other) = seen[shard.index - 1].replace(path) {
            return Err(BadInput(format!(
                "shard {shard} is given twice: {} and {}",
                other.display(),
                path.display()
            ))
            .into());
        }
        for records in &file.records {
            if let Some(r) = records.iter().find(|r| !shard.takes(r.item)) {
                return Err(BadInput(format!(
                    "{}: item {} does not belong to shard {shard}",
                    path.display(),
                    r.item
                ))
                .into());
            }
        }
    }
    let missing: Vec<String> = (1..=count)
        .filter(|i| seen[i - 1].is_none())
        .map(|i| format!("{i}/{count}"))
        .collect();
    if !missing.is_empty() {
        return Err(BadInput(format!("missing shards: {}", missing.join(", "))).into());
    }
    let per_run: Vec<Vec<ItemRecord>> = (0..first.runs.len())
        .map(|r| {
            shards
                .iter()
                .flat_map(|(_, f, _)| f.records[r].iter().cloned())
                .collect()
        })
        .collect();
    Ok(rows_from_records(&first.runs, first.metric, &per_run))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_split_every_item_once() {
        let shards: Vec<Shard> = (1..=3).map(|i| format!("{i}/3").parse().unwrap()).collect();
        for item in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.takes(item)).count(), 1);
        }
        assert!(shards[1].takes(1) && shards[1].takes(4) && !shards[1].takes(2));
        for bad in ["0/3", "4/3", "1/0", "3", "a/b", "1/3/4"] {
            let err = bad.parse::<Shard>().unwrap_err();
            assert!(err.contains("I/N"), "{bad}: {err}");
        }
    }
}
