//! `ecache eval ppl|rouge|all`: the paper's quality protocol over a dataset, for lists of
//! policies and budgets in one run, through the engine: every request of a chunk of items
//! (the full cache's greedy output, and per policy the teacher-forced score and the greedy
//! output) is in flight at once and the engine batches them; an item's image features are
//! computed once and reused by every policy (the engine's feature cache); the full cache's
//! greedy outputs are the ROUGE-L references.

use std::path::{Path, PathBuf};

use anyhow::Result;
use ecache_core::{PolicyConfig, RunConfig};
use ecache_engine::{Completion, Engine, ImageInput, Request, RequestHandle, Task};
use serde::{Deserialize, Serialize};

use crate::BadInput;
use crate::dataset::Item;
use crate::generate::{engine_config, engine_error, load_engine};
pub use crate::records::{ItemRecord, Records, rows_from_records};
use crate::rouge::rouge_l;
use crate::shard::Shard;

/// Which metrics to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Teacher-forced perplexity of the reference answers.
    Ppl,
    /// Greedy outputs: ROUGE-L against the full cache's, and against the references.
    Rouge,
    /// Both.
    All,
}

impl Metric {
    /// Whether perplexity is computed.
    pub fn ppl(self) -> bool {
        self != Metric::Rouge
    }
    /// Whether greedy outputs are generated (ROUGE-L, exact match).
    pub fn generates(self) -> bool {
        self != Metric::Ppl
    }
}

/// One evaluation run.
pub struct EvalRequest {
    pub model_dir: PathBuf,
    pub items: Vec<Item>,
    /// One entry per (policy, budget, parameters) to evaluate.
    pub runs: Vec<PolicyConfig>,
    pub config: RunConfig,
    pub metric: Metric,
    pub pad_to_square: bool,
    /// Most sequences per batch.
    pub batch: usize,
    /// Report and skip unusable items instead of stopping before any work.
    pub keep_going: bool,
    /// Where finished batches are recorded as the run goes, so that a rerun of an
    /// interrupted evaluation resumes (see [`Progress`]); `None` keeps nothing.
    pub progress_file: Option<PathBuf>,
    /// Stop (as if interrupted) once this many items are done: for testing resumption.
    pub stop_after_items: Option<usize>,
    /// Evaluate only this shard of the items (every N-th from I).
    pub shard: Option<Shard>,
}

/// What an interrupted evaluation had finished: the batches done and the metric sums so
/// far, with a fingerprint of everything that determines them (model, items, runs, metric,
/// generation settings, batching), so that only the same evaluation resumes from it.
#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    fingerprint: String,
    done: Vec<usize>,
    records: Vec<Vec<ItemRecord>>,
}

/// Everything that determines an evaluation's numbers: model, items, runs, metric,
/// generation settings and batching (a shard's is its whole evaluation's).
fn fingerprint(request: &EvalRequest, items: &[&Item]) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    request.model_dir.hash(&mut h);
    for item in items {
        (&item.image, &item.question, &item.answer, &item.kind).hash(&mut h);
    }
    for run in &request.runs {
        (&run.name, run.budget.to_bits(), params_label(run)).hash(&mut h);
    }
    let g = &request.config.generation;
    format!(
        "v2 {:016x} {:?} max_new_tokens={} batch={} dtype={:?} backend={:?}",
        h.finish(),
        request.metric,
        g.max_new_tokens,
        request.batch,
        request.config.model.dtype,
        request.config.model.backend
    )
}

/// The fingerprint of the whole evaluation, every item included (a shard's included).
pub fn evaluation_fingerprint(request: &EvalRequest) -> String {
    let items: Vec<&Item> = request.items.iter().collect();
    fingerprint(request, &items)
}

/// The progress recorded for this very evaluation, if any.
fn resume_from(request: &EvalRequest, fingerprint: &str) -> Option<Progress> {
    let path = request.progress_file.as_ref()?;
    let text = std::fs::read_to_string(path).ok()?;
    match serde_json::from_str::<Progress>(&text) {
        Ok(p) if p.fingerprint == fingerprint && p.records.len() == request.runs.len() => Some(p),
        _ => {
            eprintln!(
                "ignoring {}: it records a different evaluation",
                path.display()
            );
            None
        }
    }
}

/// Results of one (policy, budget, parameters).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalRow {
    pub policy: String,
    pub budget: f64,
    /// The policy's parameters, `key=value` joined by spaces (empty for defaults).
    pub params: String,
    pub items: usize,
    /// Answer tokens scored for PPL.
    pub scored_tokens: usize,
    /// Tokens generated greedily.
    pub generated_tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    /// ROUGE-L F1 against the full cache's greedy output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
    /// Share of `short` items (all items when none has a kind) answered exactly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact: Option<f64>,
    /// ROUGE-L F1 against the reference answer over `description` items (all items when
    /// none has a kind).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_truth: Option<f64>,
    /// Share of the prompt's image slots still held after the prefill, and at the end of
    /// the greedy generations, averaged over layers and items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_kept_after_prefill: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_kept_at_end: Option<f64>,
}

/// The (policy, budget) grid: `full` once at budget 1; `[policy.params]` of the config go
/// to the policy of the same name only. No policies means the config's policy, no budgets
/// the config's budget.
pub fn grid(config: &RunConfig, policies: &[String], budgets: &[f64]) -> Vec<PolicyConfig> {
    let own_policy = [config.policy.name.clone()];
    let own_budget = [config.policy.budget];
    let policies = if policies.is_empty() {
        &own_policy[..]
    } else {
        policies
    };
    let budgets = if budgets.is_empty() {
        &own_budget[..]
    } else {
        budgets
    };
    let mut runs = Vec::new();
    for name in policies {
        let budgets: &[f64] = if name == "full" { &[1.0] } else { budgets };
        for &budget in budgets {
            let mut run = PolicyConfig::new(name, budget);
            run.positions = config.policy.positions;
            run.layer_budgets = config.policy.layer_budgets;
            run.pyramid_beta = config.policy.pyramid_beta;
            if *name == config.policy.name {
                run.params = config.policy.params.clone();
            }
            runs.push(run);
        }
    }
    runs
}

/// Why the grid drops the policy parameters given (`--set` or the config's), if it does:
/// they belong to the config's policy, and no run of the grid is that policy.
pub fn unused_params(config: &RunConfig, runs: &[PolicyConfig]) -> Option<String> {
    let own = &config.policy;
    (!own.params.is_empty() && !runs.iter().any(|r| r.name == own.name)).then(|| {
        format!(
            "the policy parameters {:?} belong to policy `{}`, which the runs ({}) do not include; \
             name it with --policy",
            own.params.keys().collect::<Vec<_>>(),
            own.name,
            runs.iter()
                .map(|r| r.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

/// Runs the evaluation through an engine on the configured backend.
pub fn run(request: &EvalRequest) -> Result<Vec<EvalRow>> {
    run_on(request, &engine_for(request)?)
}

/// [`run`]'s item records instead of its rows (what a shard writes).
pub fn run_records(request: &EvalRequest) -> Result<Records> {
    records_on(request, &engine_for(request)?)
}

fn engine_for(request: &EvalRequest) -> Result<Engine> {
    let mut config = engine_config(request.model_dir.clone(), &request.config);
    config.max_batch = request.batch.max(1);
    config.max_queue = usize::MAX;
    config.pad_to_square = request.pad_to_square;
    config.image_cache = request.batch.max(8);
    load_engine(config)
}

/// Whitespace-normalised, lower-case text for exact matching.
pub fn normalise(text: &str) -> String {
    text.split_whitespace()
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(" ")
}

fn run_on(request: &EvalRequest, engine: &Engine) -> Result<Vec<EvalRow>> {
    let records = records_on(request, engine)?;
    Ok(rows_from_records(
        &request.runs,
        request.metric,
        &records.per_run,
    ))
}

/// Runs the evaluation and returns its item records (only the shard's items when
/// `request.shard` is set).
pub fn records_on(request: &EvalRequest, engine: &Engine) -> Result<Records> {
    // Every input is checked before any computation; with keep_going a bad item is
    // reported and skipped instead.
    let mut items: Vec<&Item> = Vec::with_capacity(request.items.len());
    let mut indices: Vec<usize> = Vec::with_capacity(request.items.len());
    for (index, item) in request.items.iter().enumerate() {
        if request.shard.is_some_and(|s| !s.takes(index)) {
            continue;
        }
        let checked = check_item(
            item,
            engine,
            if request.metric.generates() {
                request.config.generation.max_new_tokens
            } else {
                0
            },
        );
        match checked {
            Ok(()) => {
                items.push(item);
                indices.push(index);
            }
            Err(problem) if request.keep_going => eprintln!("skipped: {problem}"),
            Err(problem) => return Err(BadInput(problem).into()),
        }
    }
    if items.is_empty() {
        return Err(BadInput("no usable dataset items".into()).into());
    }
    let kinded = request.items.iter().any(|i| i.kind.is_some());
    let counts_exact = |i: &Item| !kinded || i.kind.as_deref() == Some("short");
    let counts_truth = |i: &Item| !kinded || i.kind.as_deref() == Some("description");
    let fingerprint = match request.shard {
        Some(shard) => format!("{} shard {shard}", fingerprint(request, &items)),
        None => fingerprint(request, &items),
    };
    let mut done = Vec::new();
    let mut records: Vec<Vec<ItemRecord>> = vec![Vec::new(); request.runs.len()];
    if let Some(p) = resume_from(request, &fingerprint) {
        done = p.done;
        records = p.records;
    }
    let mut items_done = 0;
    let progress = indicatif::ProgressBar::new((items.len() * request.runs.len()) as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let chunks: Vec<&[&Item]> = items.chunks(request.batch.max(1)).collect();
    let index_chunks: Vec<&[usize]> = indices.chunks(request.batch.max(1)).collect();
    if !done.is_empty() {
        let finished: usize = done
            .iter()
            .filter_map(|&c| chunks.get(c))
            .map(|c| c.len())
            .sum();
        eprintln!(
            "resuming: {finished} of {} items already evaluated",
            items.len()
        );
        progress.inc((finished * request.runs.len()) as u64);
    }
    let ask = |item: &Item, policy: &PolicyConfig, task: Task| -> Result<RequestHandle> {
        let mut r = Request::text(item.question.clone());
        r.image = Some(ImageInput::Path(item.image.clone()));
        r.max_new_tokens = request.config.generation.max_new_tokens;
        r.policy = Some(policy.clone());
        r.task = task;
        engine
            .submit(r)
            .map_err(|e| engine_error(ecache_engine::EngineError::Submit(e)))
    };
    let wait = |handles: Vec<RequestHandle>| -> Result<Vec<Completion>> {
        handles
            .into_iter()
            .map(|h| h.wait().map_err(engine_error))
            .collect()
    };
    let full = PolicyConfig::new("full", 1.0);
    for (c, chunk) in chunks.iter().enumerate() {
        if done.contains(&c) {
            continue;
        }
        // Everything of the chunk is submitted before anything is read: the engine
        // batches it all.
        let references = if request.metric.generates() {
            Some(
                chunk
                    .iter()
                    .map(|item| ask(item, &full, Task::Generate))
                    .collect::<Result<Vec<_>>>()?,
            )
        } else {
            None
        };
        let mut scored = Vec::with_capacity(request.runs.len());
        let mut generated = Vec::with_capacity(request.runs.len());
        for run in &request.runs {
            let score = |item: &&Item| {
                let answer = item.answer.clone();
                ask(item, run, Task::Score { answer })
            };
            scored.push(if request.metric.ppl() {
                chunk.iter().map(score).collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            });
            generated.push(if request.metric.generates() {
                chunk
                    .iter()
                    .map(|item| ask(item, run, Task::Generate))
                    .collect::<Result<Vec<_>>>()?
            } else {
                Vec::new()
            });
        }
        let reference: Option<Vec<String>> = references
            .map(|r| Ok::<_, anyhow::Error>(wait(r)?.into_iter().map(|c| c.text).collect()))
            .transpose()?;
        for (r, (scored, generated)) in scored.into_iter().zip(generated).enumerate() {
            let run = &request.runs[r];
            progress.set_message(format!("{} {}", run.name, run.budget));
            let mut chunk_records: Vec<ItemRecord> = index_chunks[c]
                .iter()
                .map(|&item| ItemRecord {
                    item,
                    ..ItemRecord::default()
                })
                .collect();
            for (record, c) in chunk_records.iter_mut().zip(wait(scored)?) {
                record.nll = c.nll.iter().sum::<f64>();
                record.scored = c.nll.len();
            }
            if let Some(reference) = &reference {
                for (k, (g, reference)) in wait(generated)?.iter().zip(reference).enumerate() {
                    let item = chunk[k];
                    let record = &mut chunk_records[k];
                    record.generated = g.tokens.len();
                    let share = |slots: &[usize]| {
                        slots.iter().sum::<usize>() as f64
                            / (slots.len() * g.stats.image_tokens).max(1) as f64
                    };
                    record.image_prefill = Some(share(&g.stats.image_slots_after_prefill));
                    record.image_end = Some(share(&g.stats.image_slots_at_end));
                    record.rouge = Some(rouge_l(&g.text, reference));
                    record.exact = counts_exact(item)
                        .then(|| (normalise(&g.text) == normalise(&item.answer)) as u8 as f64);
                    record.truth = counts_truth(item).then(|| rouge_l(&g.text, &item.answer));
                }
            }
            records[r].extend(chunk_records);
            progress.inc(chunk.len() as u64);
        }
        done.push(c);
        if let Some(path) = &request.progress_file {
            let record = Progress {
                fingerprint: fingerprint.clone(),
                done: done.clone(),
                records: records.clone(),
            };
            write_atomically(path, &serde_json::to_string(&record)?)?;
        }
        items_done += chunk.len();
        if request.stop_after_items.is_some_and(|n| items_done >= n) {
            progress.finish_and_clear();
            anyhow::bail!("stopped after {items_done} items (--stop-after-items)");
        }
    }
    progress.finish_and_clear();
    Ok(Records { per_run: records })
}

/// What is wrong with an item, if anything: its image is missing or unreadable, its
/// question or answer does not encode, or the prompt and the answer (or the `generated`
/// new tokens) exceed the model's context. The engine checks each request it would
/// submit ([`Engine::estimate`]), whatever the model's architecture.
fn check_item(item: &Item, engine: &Engine, generated: usize) -> Result<(), String> {
    let name = format!("item {:?}", item.question);
    if !item.image.exists() {
        return Err(format!(
            "image {} of dataset {name} does not exist",
            item.image.display()
        ));
    }
    let request = |task: Task, max_new_tokens: usize| {
        let mut r = Request::text(item.question.clone());
        r.image = Some(ImageInput::Path(item.image.clone()));
        r.task = task;
        r.max_new_tokens = max_new_tokens.max(1);
        r
    };
    let answer = Task::Score {
        answer: item.answer.clone(),
    };
    let mut checks = vec![request(answer, 1)];
    if generated > 0 {
        checks.push(request(Task::Generate, generated));
    }
    for r in checks {
        engine.estimate(r).map_err(|e| format!("{name}: {e}"))?;
    }
    Ok(())
}

/// `key=value` pairs of a run's parameters, sorted, after its layer budgets when they are
/// not uniform (`layer_budgets=pyramid pyramid_beta=20`).
pub fn params_label(run: &PolicyConfig) -> String {
    let spread = match run.layer_budgets {
        ecache_core::LayerBudgets::Uniform => None,
        ecache_core::LayerBudgets::Pyramid => Some(format!(
            "layer_budgets=pyramid pyramid_beta={}",
            run.pyramid_beta
        )),
    };
    spread
        .into_iter()
        .chain(
            run.params
                .iter()
                .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"'))),
        )
        .collect::<Vec<_>>()
        .join(" ")
}

/// A markdown table of the rows.
pub fn table(rows: &[EvalRow]) -> String {
    let mut out = String::from(
        "| policy | budget | params | PPL | ROUGE-L vs full | exact | ROUGE-L vs reference | image slots kept (prefill / end) |\n|---|---:|---|---:|---:|---:|---:|---:|\n",
    );
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.policy,
            r.budget,
            r.params,
            fmt(r.ppl),
            fmt(r.rouge_l),
            fmt(r.exact),
            fmt(r.rouge_truth),
            match (r.image_kept_after_prefill, r.image_kept_at_end) {
                (Some(a), Some(b)) => format!("{a:.3} / {b:.3}"),
                _ => "-".into(),
            },
        );
    }
    out
}

/// Writes `text` to `path` through a temporary file and a rename, so that an interrupted
/// run never leaves a half-written file.
pub fn write_atomically(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .map_err(|e| BadInput(format!("cannot write {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path)
        .map_err(|e| BadInput(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_of_a_policy_the_grid_leaves_out_are_reported() {
        let mut config = RunConfig::with_policy(PolicyConfig::new("full", 1.0));
        config.policy.set_param("protected_tail", "10").unwrap();
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let runs = grid(&config, &names(&["elastic"]), &[0.2]);
        assert!(
            runs[0].params.is_empty(),
            "parameters stay with their policy"
        );
        let why = unused_params(&config, &runs).expect("reported");
        assert!(
            why.contains("protected_tail") && why.contains("`full`"),
            "{why}"
        );
        config.policy.name = "elastic".into();
        let runs = grid(&config, &names(&["elastic", "h2o"]), &[0.2]);
        assert_eq!(
            runs[0]
                .params
                .get("protected_tail")
                .and_then(|v| v.as_integer()),
            Some(10)
        );
        assert!(runs[1].params.is_empty());
        assert_eq!(unused_params(&config, &runs), None);
    }
}
