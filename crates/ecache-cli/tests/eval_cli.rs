//! `ecache eval` on the tiny fixture: the full cache's PPL is transformers' PPL; ROUGE-L of
//! the full cache against itself is 1; results land in JSON.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha")
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecache-eval-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("image.png"), dir.join("image.png")).unwrap();
    dir
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
        .unwrap()
}

fn eval(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ecache"))
        .arg("eval")
        .args(args)
        .arg("--model")
        .arg(fixture())
        .output()
        .unwrap()
}

/// A dataset in its own scratch directory: the fixture's question with each ending, its
/// answer, and the kinds if given.
fn dataset(name: &str, endings: &[&str], kinds: Option<&[&str]>) -> (PathBuf, PathBuf) {
    let dir = scratch().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixture().join("image.png"), dir.join("image.png")).unwrap();
    let e = expected();
    let lines: Vec<String> = endings
        .iter()
        .enumerate()
        .map(|(i, extra)| {
            let mut item = serde_json::json!({"image": "image.png",
                "question": format!("{}{extra}", e["question"].as_str().unwrap()),
                "answer": e["answer"]});
            if let Some(kinds) = kinds {
                item["kind"] = kinds[i].into();
            }
            item.to_string()
        })
        .collect();
    let path = dir.join("ds.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    (dir, path)
}

/// `ecache eval all` over `dataset` at batch 1 with 4 new tokens, into `output`.
fn eval_all(
    dataset: &std::path::Path,
    policies: &str,
    budgets: &str,
    output: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let args = [
        "all",
        "--dataset",
        dataset.to_str().unwrap(),
        "--policies",
        policies,
        "--budgets",
        budgets,
        "--max-new-tokens",
        "4",
        "--batch",
        "1",
        "--output",
        output.to_str().unwrap(),
    ];
    eval(&[&args[..], extra].concat())
}

#[test]
fn full_cache_perplexity_is_transformers_perplexity() {
    let dir = scratch();
    let e = expected();
    let item =
        serde_json::json!({"image": "image.png", "question": e["question"], "answer": e["answer"]});
    std::fs::write(
        dir.join("ds.json"),
        serde_json::to_string(&vec![item]).unwrap(),
    )
    .unwrap();
    let output = dir.join("results.json");
    let out = eval(&[
        "ppl",
        "--dataset",
        dir.join("ds.json").to_str().unwrap(),
        "--policies",
        "full,elastic,h2o,local",
        "--budgets",
        "0.5",
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 4);
    let ppl = rows[0]["ppl"].as_f64().unwrap();
    let want = e["ppl"].as_f64().unwrap();
    // Through the whole path (our preprocessing, Pillow's resize re-implemented): the
    // parity tests' 1e-5.
    assert!(((ppl - want) / want).abs() < 1e-5, "{ppl} vs {want}");
    assert_eq!(
        rows[0]["scored_tokens"],
        serde_json::json!(e["answer_ids"].as_array().unwrap().len())
    );
    for row in &rows[1..] {
        assert_ne!(
            row["ppl"].as_f64().unwrap(),
            ppl,
            "a 50% cache changes the model's predictions"
        );
    }
    assert!(String::from_utf8_lossy(&out.stdout).contains("| elastic | 0.5 |"));
}

#[test]
fn rouge_of_the_full_cache_is_one_and_bad_datasets_are_named() {
    let dir = scratch();
    let e = expected();
    let line =
        serde_json::json!({"image": "image.png", "question": e["question"], "answer": e["answer"]})
            .to_string();
    std::fs::write(dir.join("ds.jsonl"), format!("{line}\n{line}\n")).unwrap();
    let out = eval(&[
        "rouge",
        "--dataset",
        dir.join("ds.jsonl").to_str().unwrap(),
        "--policies",
        "full",
        "--max-new-tokens",
        "6",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("| full | 1 |  | - | 1.0000 |"));

    std::fs::write(
        dir.join("bad.jsonl"),
        format!("{line}\n{{\"image\": \"image.png\"}}\n"),
    )
    .unwrap();
    let out = eval(&["ppl", "--dataset", dir.join("bad.jsonl").to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bad.jsonl line 2"), "{err}");

    let missing =
        serde_json::json!({"image": "nope.png", "question": "q", "answer": "a"}).to_string();
    std::fs::write(dir.join("missing.jsonl"), missing).unwrap();
    let out = eval(&[
        "ppl",
        "--dataset",
        dir.join("missing.jsonl").to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("nope.png"), "{err}");
}

#[test]
fn all_metrics_do_not_depend_on_batching() {
    let dir = scratch();
    let e = expected();
    let q = e["question"].as_str().unwrap();
    let lines: Vec<String> = [
        (q, e["answer"].as_str().unwrap(), "description"),
        (q, "a b c", "short"),
        ("what is it ?", "nothing", "short"),
    ]
    .iter()
    .map(|(q, a, k)| {
        serde_json::json!({"image": "image.png", "question": q, "answer": a, "kind": k}).to_string()
    })
    .collect();
    std::fs::write(dir.join("kinds.jsonl"), lines.join("\n")).unwrap();
    let run = |batch: &str| {
        let output = dir.join(format!("all-{batch}.json"));
        let out = eval(&[
            "all",
            "--dataset",
            dir.join("kinds.jsonl").to_str().unwrap(),
            "--policies",
            "full,elastic,h2o",
            "--budgets",
            "0.3",
            "--max-new-tokens",
            "5",
            "--batch",
            batch,
            "--output",
            output.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&output).unwrap()).unwrap();
        rows
    };
    let one = run("1");
    let many = run("3");
    let rows = one.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    for key in ["ppl", "rouge_l", "exact", "rouge_truth"] {
        assert!(rows.iter().all(|r| r[key].is_number()), "{key}: {one}");
    }
    assert_eq!(
        rows[0]["rouge_l"].as_f64().unwrap(),
        1.0,
        "full against itself"
    );
    for (a, b) in rows.iter().zip(many.as_array().unwrap()) {
        for key in ["ppl", "rouge_l", "exact", "rouge_truth"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!((x - y).abs() < 1e-6 * x.abs().max(1.0), "{key}: {x} vs {y}");
        }
        assert_eq!(a["generated_tokens"], b["generated_tokens"]);
    }
}

#[test]
fn an_interrupted_evaluation_resumes_where_it_stopped() {
    // Five items of three prompt lengths: batches of 1 make five steps to interrupt.
    let endings = ["", " please", " now please", "", " please"];
    let (dir, dataset) = dataset("resume", &endings, None);
    let run = |output: &std::path::Path, extra: &[&str]| {
        eval_all(&dataset, "full,h2o", "0.5", output, extra)
    };
    let whole = dir.join("whole.json");
    assert!(run(&whole, &[]).status.success());

    let resumed = dir.join("resumed.json");
    let progress = dir.join("resumed.progress.json");
    let out = run(&resumed, &["--stop-after-items", "2"]);
    assert!(!out.status.success());
    assert!(!resumed.exists(), "no results file until the run completes");
    assert!(progress.exists(), "finished batches are recorded");
    let out = run(&resumed, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming: 2 of 5 items"), "{stderr}");
    assert!(
        !progress.exists(),
        "the record goes once the results are written"
    );
    let read = |p: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    assert_eq!(read(&whole), read(&resumed));

    // A record of another evaluation is not resumed from.
    std::fs::write(
        &progress,
        r#"{"fingerprint": "other", "done": [0, 1, 2], "sums": []}"#,
    )
    .unwrap();
    let out = run(&resumed, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("records a different evaluation"),
        "{stderr}"
    );
    assert_eq!(read(&whole), read(&resumed));
}

/// Shards of an evaluation merge into exactly the rows of one run (batch 1, so that every
/// item is computed alone either way); incomplete, repeated or foreign shards are refused.
#[test]
fn shards_merge_into_the_unsharded_results() {
    let endings = ["", " please", " now", " now please", ""];
    let kinds = ["description", "short", "short", "description", "short"];
    let (dir, dataset) = dataset("shards", &endings, Some(&kinds));
    let run = |output: &std::path::Path, extra: &[&str]| {
        let out = eval_all(&dataset, "full,elastic,snapkv", "0.5", output, extra);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let whole = dir.join("whole.json");
    run(&whole, &[]);
    let shard = |i: usize| dir.join(format!("shard-{i}.json"));
    for i in 1..=3 {
        run(&shard(i), &["--shard", &format!("{i}/3")]);
    }
    let merge = |files: &[std::path::PathBuf], output: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_ecache"))
            .args(["eval", "merge"])
            .args(files)
            .arg("--output")
            .arg(output)
            .output()
            .unwrap()
    };
    let merged = dir.join("merged.json");
    // Any order of the shards.
    let out = merge(&[shard(3), shard(1), shard(2)], &merged);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(&merged), read(&whole), "byte for byte");
    let rows: serde_json::Value = serde_json::from_str(&read(&merged)).unwrap();
    assert_eq!(rows[1]["items"], 5);

    let refused = |files: &[std::path::PathBuf], needle: &str| {
        let out = merge(files, &dir.join("refused.json"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{needle}: {err}");
    };
    refused(&[shard(1), shard(3)], "missing shards: 2/3");
    refused(
        &[shard(1), shard(2), shard(2), shard(3)],
        "shard 2/3 is given twice",
    );
    let other = dir.join("other.json");
    let out = eval_all(
        &dataset,
        "full,elastic,snapkv",
        "0.4",
        &other,
        &["--shard", "2/3"],
    );
    assert!(out.status.success());
    refused(&[shard(1), other, shard(3)], "different evaluations");
    refused(&[whole], "not a shard");
    let out = eval(&[
        "all",
        "--dataset",
        dataset.to_str().unwrap(),
        "--shard",
        "4/3",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("I/N"));
}
