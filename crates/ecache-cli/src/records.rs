//! What an evaluation sums: one record per item and run, and the rows computed from them
//! in item order (one run, or its shards merged, give the same sums).

use ecache_core::PolicyConfig;
use serde::{Deserialize, Serialize};

use crate::eval::{EvalRow, Metric, params_label};

/// One item's share of one run's metrics: what the rows are summed from, in item order,
/// so that shards merged by [`crate::shard::merge`] give the very sums of one run.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemRecord {
    /// The item's index in the evaluation's item list (before sharding).
    pub item: usize,
    /// Summed negative log-likelihood of its answer tokens, and their count.
    pub nll: f64,
    pub scored: usize,
    /// Tokens generated greedily.
    pub generated: usize,
    /// ROUGE-L against the full cache's output; exact match (counted items only);
    /// ROUGE-L against the reference (counted items only); image slots' shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rouge: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truth: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_prefill: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_end: Option<f64>,
}

/// Every run's item records of an evaluation (or of one shard of it).
#[derive(Debug, Clone)]
pub struct Records {
    /// Items the evaluation covered after skipping unusable ones.
    pub per_run: Vec<Vec<ItemRecord>>,
}

/// The rows of `runs` from their item records (each run's in item order).
pub fn rows_from_records(
    runs: &[PolicyConfig],
    metric: Metric,
    per_run: &[Vec<ItemRecord>],
) -> Vec<EvalRow> {
    runs.iter()
        .zip(per_run)
        .map(|(run, records)| {
            let mut records: Vec<&ItemRecord> = records.iter().collect();
            records.sort_by_key(|r| r.item);
            let n = records.len();
            let sum = |f: &dyn Fn(&ItemRecord) -> Option<f64>| -> (f64, usize) {
                records
                    .iter()
                    .filter_map(|r| f(r))
                    .fold((0.0, 0), |(s, c), x| (s + x, c + 1))
            };
            let nll = records.iter().fold(0.0, |s, r| s + r.nll);
            let scored: usize = records.iter().map(|r| r.scored).sum();
            let share = |(x, count): (f64, usize)| (count > 0).then(|| x / count as f64);
            let per_item = |(x, _): (f64, usize)| x / n.max(1) as f64;
            let generates = metric.generates();
            EvalRow {
                policy: run.name.clone(),
                budget: run.budget,
                params: params_label(run),
                items: n,
                scored_tokens: scored,
                generated_tokens: records.iter().map(|r| r.generated).sum(),
                ppl: metric.ppl().then(|| (nll / scored.max(1) as f64).exp()),
                rouge_l: generates.then(|| per_item(sum(&|r| r.rouge))),
                exact: generates.then(|| share(sum(&|r| r.exact))).flatten(),
                rouge_truth: generates.then(|| share(sum(&|r| r.truth))).flatten(),
                image_kept_after_prefill: generates.then(|| per_item(sum(&|r| r.image_prefill))),
                image_kept_at_end: generates.then(|| per_item(sum(&|r| r.image_end))),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows are summed in item order whatever order the records come in (shards arrive
    /// interleaved): with these values the order decides the float sum.
    #[test]
    fn records_are_summed_in_item_order() {
        let record = |item: usize, nll: f64| ItemRecord {
            item,
            nll,
            scored: 1,
            ..ItemRecord::default()
        };
        let runs = [PolicyConfig::new("full", 1.0)];
        let shuffled = vec![record(0, 1e16), record(2, 1.0), record(1, -1e16)];
        let rows = rows_from_records(&runs, Metric::Ppl, &[shuffled]);
        // In item order: (1e16 - 1e16) + 1 = 1 over 3 tokens; the given order loses the 1.
        assert_eq!(rows[0].ppl, Some((1.0f64 / 3.0).exp()));
        assert_eq!(rows[0].items, 3);
    }
}
