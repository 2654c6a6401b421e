//! `ecache eval ppl|rouge`: the paper's quality protocol over a dataset, for lists of
//! policies and budgets in one run. Image features are computed once per item and shared by
//! every policy.

use std::path::{Path, PathBuf};

use anyhow::Result;
use burn::tensor::backend::Backend;
use ecache_core::{CachePolicy, PolicyConfig, RunConfig};
use ecache_model::{Sampling, Session, answer_nll, chat_prompt, generate, splice};
use serde::Serialize;

use crate::BadInput;
use crate::backend::{BackendJob, dtype, on_backend};
use crate::dataset::Item;
use crate::generate::{image_features, load_model};
use crate::rouge::rouge_l;

/// Which metric to compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Teacher-forced perplexity of the reference answers.
    Ppl,
    /// ROUGE-L F1 of each policy's greedy output against the full cache's.
    Rouge,
}

/// One evaluation run.
pub struct EvalRequest {
    pub model_dir: PathBuf,
    pub items: Vec<Item>,
    /// One entry per (policy, budget) to evaluate.
    pub runs: Vec<PolicyConfig>,
    pub config: RunConfig,
    pub metric: Metric,
    pub pad_to_square: bool,
}

/// Results of one (policy, budget).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalRow {
    pub policy: String,
    pub budget: f64,
    pub items: usize,
    /// Answer tokens scored (PPL) or tokens generated (ROUGE).
    pub tokens: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rouge_l: Option<f64>,
}

/// The (policy, budget) grid: `full` once at budget 1; `[policy.params]` of the config go
/// to the policy of the same name only.
pub fn grid(config: &RunConfig, policies: &[String], budgets: &[f64]) -> Vec<PolicyConfig> {
    let mut runs = Vec::new();
    for name in policies {
        let budgets: &[f64] = if name == "full" { &[1.0] } else { budgets };
        for &budget in budgets {
            let mut run = PolicyConfig::new(name, budget);
            run.positions = config.policy.positions;
            if *name == config.policy.name {
                run.params = config.policy.params.clone();
            }
            runs.push(run);
        }
    }
    runs
}

/// Runs the evaluation; `policies` are built from `request.runs` by the caller's registry.
pub fn run(
    request: &EvalRequest,
    policies: &[Box<dyn CachePolicy>],
    full: &dyn CachePolicy,
) -> Result<Vec<EvalRow>> {
    on_backend(
        request.config.model.backend,
        Job {
            request,
            policies,
            full,
        },
    )
}

struct Job<'a> {
    request: &'a EvalRequest,
    policies: &'a [Box<dyn CachePolicy>],
    full: &'a dyn CachePolicy,
}

impl BackendJob for Job<'_> {
    type Output = Vec<EvalRow>;
    fn run<B: Backend>(self, device: &B::Device) -> Result<Vec<EvalRow>> {
        run_on::<B>(self.request, self.policies, self.full, device)
    }
}

fn run_on<B: Backend>(
    request: &EvalRequest,
    policies: &[Box<dyn CachePolicy>],
    full: &dyn CachePolicy,
    device: &B::Device,
) -> Result<Vec<EvalRow>> {
    let dir = &request.model_dir;
    let dtype = dtype(request.config.model.dtype);
    let (model, config, tokenizer) = load_model::<B>(dir, device, dtype)?;
    for item in &request.items {
        if !item.image.exists() {
            return Err(BadInput(format!(
                "image {} of dataset item {:?} does not exist",
                item.image.display(),
                item.question
            ))
            .into());
        }
    }
    let g = &request.config.generation;
    let greedy = Sampling {
        max_new_tokens: g.max_new_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: g.seed,
    };
    let positions = request.config.policy.positions;
    let mut nll = vec![0.0f64; policies.len()];
    let mut tokens = vec![0usize; policies.len()];
    let mut rouge = vec![0.0f64; policies.len()];
    let progress = indicatif::ProgressBar::new((request.items.len() * policies.len()) as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    for item in &request.items {
        let features = image_features(
            &model,
            dir,
            &item.image,
            request.pad_to_square,
            device,
            dtype,
        )?;
        let ids = tokenizer
            .encode_prompt(&chat_prompt(&item.question), true)
            .map_err(|e| BadInput(e.to_string()))?;
        let prompt = || {
            splice(
                &model,
                &ids,
                config.image_token_id,
                Some(features.clone()),
                device,
            )
        };
        let session = |policy| {
            Session::new(
                &model.decoder,
                &config.text,
                policy,
                positions,
                1,
                device,
                dtype,
            )
        };
        let eos = &config.text.eos_token_ids;
        let reference = match request.metric {
            Metric::Rouge => {
                let (embeds, kinds) = prompt();
                let out = generate(&mut session(full), embeds, &kinds, &greedy, eos, |_| {})?;
                Some(tokenizer.decode(&out.tokens)?)
            }
            Metric::Ppl => None,
        };
        let answer = tokenizer.encode_answer(&item.answer)?;
        for (i, policy) in policies.iter().enumerate() {
            progress.set_message(policy.name().to_string());
            let (embeds, kinds) = prompt();
            match &reference {
                None => {
                    let values =
                        answer_nll(&mut session(policy.as_ref()), embeds, &kinds, &answer)?;
                    nll[i] += values.iter().sum::<f64>();
                    tokens[i] += values.len();
                }
                Some(reference) => {
                    let out = generate(
                        &mut session(policy.as_ref()),
                        embeds,
                        &kinds,
                        &greedy,
                        eos,
                        |_| {},
                    )?;
                    rouge[i] += rouge_l(&tokenizer.decode(&out.tokens)?, reference);
                    tokens[i] += out.tokens.len();
                }
            }
            progress.inc(1);
        }
    }
    progress.finish_and_clear();
    let n = request.items.len();
    Ok(request
        .runs
        .iter()
        .enumerate()
        .map(|(i, run)| EvalRow {
            policy: run.name.clone(),
            budget: run.budget,
            items: n,
            tokens: tokens[i],
            ppl: (request.metric == Metric::Ppl).then(|| (nll[i] / tokens[i].max(1) as f64).exp()),
            rouge_l: (request.metric == Metric::Rouge).then(|| rouge[i] / n as f64),
        })
        .collect())
}

/// A markdown table of the rows.
pub fn table(rows: &[EvalRow]) -> String {
    let mut out =
        String::from("| policy | budget | PPL | ROUGE-L | tokens |\n|---|---:|---:|---:|---:|\n");
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.4}"));
    for r in rows {
        out += &format!(
            "| {} | {} | {} | {} | {} |\n",
            r.policy,
            r.budget,
            fmt(r.ppl),
            fmt(r.rouge_l),
            r.tokens
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
