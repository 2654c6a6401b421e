//! The embedded demo: where its model lives, training it again, writing held-out scenes,
//! and the quality study of the policies on it.

use std::path::{Path, PathBuf};

use anyhow::Result;
use ecache_core::{PolicyConfig, RunConfig};
use ecache_demo::model_dir::DemoShape;
use ecache_demo::train::{TrainOptions, train};

use crate::BadInput;
use crate::dataset::Item;
use crate::eval::{EvalRequest, EvalRow, Metric, grid, run};
use crate::policies::builtin_registry;
use crate::report::write_study;

/// The demo model committed with the project (`models/ecache-demo`).
pub fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
}

/// Trains the demo model into `out` and writes `training.json` (the log and the held-out
/// check) beside the weights; a bundled scene is written as `scene.png`.
pub fn train_command(out: &Path, options: &TrainOptions) -> Result<()> {
    let shape = DemoShape::default();
    println!(
        "training the demo model ({} image tokens) for {} steps of {} sequences, seed {}",
        shape.image_tokens(),
        options.steps,
        options.batch,
        options.seed
    );
    let (check, log) = train(out, &shape, options, 25, 250, |p| {
        println!(
            "step {:>5}  loss {:.4}  lr {:.2e}  {:>6.0} s{}{}",
            p.step,
            p.loss,
            p.lr,
            p.seconds,
            if options.cue_weight > 0.0 {
                format!("  focus {:.3}  cue {:.3}", p.focus, p.cue)
            } else {
                String::new()
            },
            p.check
                .map(|c| format!(
                    "  held-out: short exact {:.3}, description exact {:.3}, tokens {:.3}, by question {:?}",
                    c.short_exact, c.description_exact, c.description_token_accuracy, c.by_template
                ))
                .unwrap_or_default()
        );
    })?;
    write_bundled_scene(out, options.seed)?;
    let json = serde_json::json!({
        "seed": options.seed,
        "steps": options.steps,
        "batch": options.batch,
        "peak_lr": options.peak_lr,
        "warmup": options.warmup,
        "description_share": options.description_share,
        "turns": options.turns,
        "oracle_steps": options.oracle_steps,
        "oracle_fade": options.oracle_fade,
        "oracle_weight": options.oracle_weight,
        "probe_weight": options.probe_weight,
        "focus_weight": options.focus_weight,
        "focus_layer": options.focus_layer,
        "cue_weight": options.cue_weight,
        "cue_layer": options.cue_layer,
        "question_mix": ecache_demo::language::TEMPLATES.iter().zip(options.question_mix.0).map(|(t, w)| (t.to_string(), w)).collect::<std::collections::BTreeMap<_, _>>(),
        "held_out_teacher_forced": {
            "short_exact": check.short_exact,
            "description_exact": check.description_exact,
            "description_token_accuracy": check.description_token_accuracy,
            "short_exact_by_question": check.by_template.iter().map(|(k, v)| (k.to_string(), *v)).collect::<std::collections::BTreeMap<_, _>>(),
        },
        "log": log.iter().map(|p| serde_json::json!({"step": p.step, "loss": p.loss, "seconds": p.seconds})).collect::<Vec<_>>(),
    });
    crate::eval::write_atomically(
        &out.join("training.json"),
        &(serde_json::to_string_pretty(&json)? + "\n"),
    )?;
    println!("held-out (teacher-forced, greedy-equivalent): {check:?}");
    println!("wrote {}", out.display());
    Ok(())
}

/// The scene `ecache generate` answers about by default: the first held-out scene.
pub fn write_bundled_scene(dir: &Path, seed: u64) -> Result<()> {
    let mut rng = ecache_demo::train::held_out_rng(seed.wrapping_add(1));
    let scene = ecache_demo::scene::Scene::generate(&mut rng);
    let path = dir.join("scene.png");
    scene
        .render()
        .save(&path)
        .map_err(|e| BadInput(format!("cannot write {}: {e}", path.display())))?;
    Ok(())
}

/// What a study evaluates.
pub struct StudyRequest {
    pub model_dir: PathBuf,
    pub out: PathBuf,
    pub scenes: usize,
    pub seed: u64,
    pub config: RunConfig,
    pub batch: usize,
}

/// Writes the held-out scenes under `OUT/data` and reads them back as items.
fn held_out(request: &StudyRequest) -> Result<Vec<Item>> {
    let data = request.out.join("data");
    let path = ecache_demo::dataset::write_held_out(&data, request.scenes, request.seed)?;
    crate::dataset::read(&path)
}

/// The same items, each shown the next scene's picture (the image-blind control: a model
/// that reads the picture must fail it).
fn mismatched(items: &[Item]) -> Vec<Item> {
    let n = items.len();
    items
        .iter()
        .enumerate()
        .map(|(i, item)| Item {
            // Two items per scene: two ahead is the next scene.
            image: items[(i + 2) % n].image.clone(),
            ..item.clone()
        })
        .collect()
}

fn evaluate(
    request: &StudyRequest,
    runs: Vec<PolicyConfig>,
    items: Vec<Item>,
) -> Result<Vec<EvalRow>> {
    let registry = builtin_registry()?;
    for run in &runs {
        registry.build(run)?;
    }
    let eval = EvalRequest {
        model_dir: request.model_dir.clone(),
        items,
        runs,
        config: request.config.clone(),
        metric: Metric::All,
        pad_to_square: false,
        batch: request.batch,
        keep_going: false,
        progress_file: None,
        stop_after_items: None,
        shard: None,
    };
    run(&eval)
}

/// Elastic Cache's settings in a study: the paper's first (no parameters), then the
/// spec's second round (`protect`, `importance`).
const ELASTIC_SETTINGS: [&[(&str, &str)]; 4] = [
    &[],
    &[("protect", "instruction")],
    &[("importance", "mean")],
    &[("protect", "instruction"), ("importance", "mean")],
];

/// The study's runs: `full` once; every other policy at every budget with uniform layer
/// budgets and at each of `pyramid_budgets` with pyramid ones; `elastic` in each of its
/// four `protect x importance` settings.
pub fn study_runs(
    config: &RunConfig,
    policies: &[String],
    budgets: &[f64],
    pyramid_budgets: &[f64],
) -> Result<Vec<PolicyConfig>> {
    let mut runs = Vec::new();
    for name in policies {
        if name == "full" {
            runs.extend(grid(config, std::slice::from_ref(name), &[1.0]));
            continue;
        }
        let settings: &[&[(&str, &str)]] = if name == "elastic" {
            &ELASTIC_SETTINGS
        } else {
            &[&[]]
        };
        for setting in settings {
            let spreads = budgets
                .iter()
                .map(|&b| (b, ecache_core::LayerBudgets::Uniform))
                .chain(
                    pyramid_budgets
                        .iter()
                        .map(|&b| (b, ecache_core::LayerBudgets::Pyramid)),
                );
            for (budget, spread) in spreads {
                let mut run = PolicyConfig::new(name, budget);
                run.positions = config.policy.positions;
                run.layer_budgets = spread;
                run.pyramid_beta = config.policy.pyramid_beta;
                for (k, v) in *setting {
                    run.set_param(k, v)?;
                }
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

/// A row's series in the study's plots: the policy, its parameters, and `pyramid` for
/// pyramid layer budgets (drawn as markers in its uniform series' colour).
fn series_name(row: &EvalRow) -> String {
    let mut pyramid = false;
    let params: Vec<&str> = row
        .params
        .split(' ')
        .filter(|kv| {
            let layer = kv.starts_with("layer_budgets=") || kv.starts_with("pyramid_beta=");
            pyramid |= *kv == "layer_budgets=pyramid";
            !kv.is_empty() && !layer
        })
        .collect();
    let mut name = std::iter::once(row.policy.as_str())
        .chain(params)
        .collect::<Vec<_>>()
        .join(" ");
    if pyramid {
        name += crate::report::PYRAMID_SUFFIX;
    }
    name
}

/// Every policy at every budget: PPL, ROUGE-L against the full cache, task accuracy.
pub fn study_command(
    request: &StudyRequest,
    policies: &[String],
    budgets: &[f64],
    pyramid_budgets: &[f64],
) -> Result<()> {
    let runs = study_runs(&request.config, policies, budgets, pyramid_budgets)?;
    let start = std::time::Instant::now();
    let items = held_out(request)?;
    let rows = evaluate(request, runs, items.clone())?;
    let seconds = start.elapsed().as_secs_f64();
    let blind = evaluate(
        request,
        vec![PolicyConfig::new("full", 1.0)],
        mismatched(&items),
    )?;
    let fmt = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3}"));
    let preamble = format!(
        "{} held-out scenes, one description and one short question each; greedy outputs of at most {} tokens; the sweep took {seconds:.0} s.\n\nImage-blind control (full cache, each question shown the next scene's picture): PPL {}, exact {}, description ROUGE-L against the reference {}.",
        request.scenes,
        request.config.generation.max_new_tokens,
        fmt(blind[0].ppl),
        fmt(blind[0].exact),
        fmt(blind[0].rouge_truth),
    );
    write_study(
        &request.out,
        "Policies on the demo model",
        "budget (fraction of slots kept)",
        &rows,
        |r| r.budget,
        series_name,
        &preamble,
    )?;
    print!("{}", crate::eval::table(&rows));
    println!("{preamble}\nwrote {}", request.out.display());
    Ok(())
}

/// Elastic Cache's own knobs at one budget: offset (x axis) for each sinks and merge mode.
pub fn elastic_sweep_command(
    request: &StudyRequest,
    budget: f64,
    sinks: &[usize],
    offsets: &[usize],
) -> Result<()> {
    let mut runs = Vec::new();
    for merge in ["mean", "weighted"] {
        for &s in sinks {
            for &o in offsets {
                let mut run = PolicyConfig::new("elastic", budget);
                run.positions = request.config.policy.positions;
                run.set_param("sinks", &s.to_string())?;
                run.set_param("offset", &o.to_string())?;
                run.set_param("merge", merge)?;
                runs.push(run);
            }
        }
    }
    let start = std::time::Instant::now();
    let rows = evaluate(request, runs, held_out(request)?)?;
    let preamble = format!(
        "Elastic Cache at budget {budget}: offset (x axis) for each number of sinks and merge mode; {} held-out scenes; {:.0} s.",
        request.scenes,
        start.elapsed().as_secs_f64()
    );
    let param = |r: &EvalRow, key: &str| {
        r.params
            .split(' ')
            .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            .unwrap_or("")
            .to_string()
    };
    write_study(
        &request.out,
        "Elastic Cache knobs on the demo model",
        "offset (slots between the truncation point and the compressed length)",
        &rows,
        |r| param(r, "offset").parse().unwrap_or(0.0),
        |r| format!("sinks={} merge={}", param(r, "sinks"), param(r, "merge")),
        &preamble,
    )?;
    print!("{}", crate::eval::table(&rows));
    println!("{preamble}\nwrote {}", request.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_study_covers_every_setting_once() {
        let config = RunConfig::with_policy(PolicyConfig::new("full", 1.0));
        let names: Vec<String> = ["full", "local", "h2o", "snapkv", "elastic"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let runs = study_runs(&config, &names, &[0.1, 0.2, 0.3], &[0.2, 0.5]).unwrap();
        // full once; local, h2o, snapkv and elastic's four settings at 3 + 2 budgets.
        assert_eq!(runs.len(), 1 + 7 * 5);
        let pyramid = runs
            .iter()
            .filter(|r| r.layer_budgets == ecache_core::LayerBudgets::Pyramid)
            .count();
        assert_eq!(pyramid, 7 * 2);
        let row = |r: &PolicyConfig| EvalRow {
            policy: r.name.clone(),
            budget: r.budget,
            params: crate::eval::params_label(r),
            items: 0,
            scored_tokens: 0,
            generated_tokens: 0,
            ppl: None,
            rouge_l: None,
            exact: None,
            rouge_truth: None,
            image_kept_after_prefill: None,
            image_kept_at_end: None,
        };
        let mut series: Vec<String> = runs.iter().map(|r| series_name(&row(r))).collect();
        series.dedup();
        assert!(series.contains(&"elastic protect=instruction".to_string()));
        assert!(
            series.contains(&"elastic importance=mean protect=instruction pyramid".to_string())
        );
        assert!(series.contains(&"snapkv pyramid".to_string()));
        assert_eq!(series.len(), 1 + 7 * 2);
    }
}
