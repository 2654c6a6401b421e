//! `ecache trace` as a user runs it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn ecache() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ecache"))
}

fn example_input() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/trace-input.json")
}

/// `ecache trace ARGS --input INPUT`, which must succeed: its JSON output.
fn trace_ok(args: &[&str], input: &Path) -> serde_json::Value {
    let out = ecache()
        .arg("trace")
        .args(args)
        .arg("--input")
        .arg(input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A fresh scratch directory for this test process.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ecache-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn traces_the_worked_example() {
    let json = trace_ok(
        &["--policy", "elastic", "--budget", "0.7"],
        &example_input(),
    );
    let layer = &json["layers"][0];
    assert_eq!(
        layer["after_prefill"],
        serde_json::json!([0, 1, 3, 5, 7, 8, 9])
    );
    assert_eq!(
        layer["merged_into"],
        serde_json::json!({"1": [2], "3": [4], "5": [6]})
    );
    // target(11) = 7 with L0 = 7 and offset 24: P = sinks = 1, so position 1 goes first.
    assert_eq!(
        layer["after_step"][0],
        serde_json::json!([0, 3, 5, 7, 8, 9, 10])
    );
    assert_eq!(json["layers"].as_array().unwrap().len(), 2);
}

#[test]
fn set_overrides_parameters_and_config_supplies_the_policy() {
    let config = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../configs/local.toml");
    let config = config.to_str().unwrap();
    let json = trace_ok(
        &["--budget", "0.5", "--set", "sinks=2", "--config", config],
        &example_input(),
    );
    assert_eq!(
        json["layers"][1]["after_prefill"],
        serde_json::json!([0, 1, 7, 8, 9])
    );
}

/// Slot kinds in the input: `protect=instruction` keeps every slot after the last image
/// slot, where the paper's tail of one lets the question go; a `kinds` of the wrong length
/// is refused with both lengths named.
#[test]
fn kinds_let_instruction_protection_be_traced() {
    let dir = scratch("trace-kinds");
    let input = dir.join("kinds.json");
    // Slot 0 text, 1..7 image, 7..10 the question; summed attention falls with the index.
    std::fs::write(
        &input,
        r#"{"prompt_len": 10,
            "kinds": ["text", "image", "image", "image", "image", "image", "image",
                      "text", "text", "text"],
            "layers": [{"prefill_scores": [10, 9, 8, 7, 6, 5, 4, 3, 2, 1]}]}"#,
    )
    .unwrap();
    let kept = |protect: &str| {
        let set = format!("protect={protect}");
        let args = ["--policy", "elastic", "--budget", "0.5", "--set", &set];
        trace_ok(&args, &input)["layers"][0]["after_prefill"].clone()
    };
    // target(10) = 5: the sink, anchors, and the tail.
    assert_eq!(kept("tail"), serde_json::json!([0, 1, 2, 3, 9]));
    assert_eq!(kept("instruction"), serde_json::json!([0, 1, 7, 8, 9]));
    let wrong = dir.join("wrong.json");
    std::fs::write(
        &wrong,
        r#"{"prompt_len": 3, "kinds": ["text"], "layers": [{"prefill_scores": [1, 2, 3]}]}"#,
    )
    .unwrap();
    let out = ecache()
        .args(["trace", "--policy", "elastic", "--budget", "0.5", "--input"])
        .arg(&wrong)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kinds has 1 entries, prompt_len is 3"),
        "{err}"
    );
}

/// SnapKV reads `prefill_rows`; `--config` spreads the budget as a pyramid, and each
/// layer then keeps its own share; without rows the trace is refused, exit 2.
#[test]
fn prefill_rows_and_pyramid_budgets_are_traced() {
    let dir = scratch("trace-snapkv");
    let input = dir.join("rows.json");
    // Two layers, T = 10, the last two queries' rows (row 0 is query 8).
    let layer = r#"{"prefill_rows": [[0.1, 0.2, 0, 0.4, 0, 0, 0.1, 0, 0.2, 0],
                                      [0.1, 0, 0.2, 0.4, 0, 0.3, 0, 0, 0, 0]]}"#;
    std::fs::write(
        &input,
        format!(r#"{{"prompt_len": 10, "decode_steps": 2, "layers": [{layer}, {layer}]}}"#),
    )
    .unwrap();
    let params = ["--set", "window=2", "--set", "sinks=1", "--set", "kernel=3"];
    let uniform = [&["--policy", "snapkv", "--budget", "0.6"][..], &params].concat();
    let json = trace_ok(&uniform, &input);
    for l in 0..2 {
        assert_eq!(
            json["layers"][l]["after_prefill"],
            serde_json::json!([0, 2, 3, 4, 8, 9])
        );
        // Decode removes nothing.
        assert_eq!(
            json["layers"][l]["after_step"][1].as_array().unwrap().len(),
            8
        );
    }
    // Pyramid, beta 3, two layers: w = 1.5 and 0.5 of 0.4 * 10, targets 6 and 2; the
    // upper layer's W' = min(2, 2 - 1) = 1 keeps the last query's row's vote.
    let config = dir.join("pyramid.toml");
    std::fs::write(
        &config,
        "[policy]\nname = \"snapkv\"\nbudget = 0.4\nlayer_budgets = \"pyramid\"\npyramid_beta = 3.0\n",
    )
    .unwrap();
    let pyramid = [&["--config", config.to_str().unwrap()][..], &params].concat();
    let json = trace_ok(&pyramid, &input);
    assert_eq!(
        json["layers"][0]["after_prefill"],
        serde_json::json!([0, 2, 3, 4, 8, 9])
    );
    assert_eq!(
        json["layers"][1]["after_prefill"],
        serde_json::json!([0, 9])
    );
    // The same from flags.
    let flags = [
        &[
            "--policy",
            "snapkv",
            "--budget",
            "0.4",
            "--layer-budgets",
            "pyramid",
        ][..],
        &[
            "--pyramid-beta",
            "3",
            "--set",
            "window=2",
            "--set",
            "sinks=1",
        ],
    ]
    .concat();
    assert_eq!(
        trace_ok(&flags, &input)["layers"][1]["after_prefill"],
        serde_json::json!([0, 9])
    );
    let out = ecache()
        .args(["trace", "--policy", "snapkv", "--budget", "0.5", "--input"])
        .arg(example_input())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("prefill_rows") && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn bad_input_exits_with_2_and_a_named_cause() {
    let dir = scratch("trace");
    let short = dir.join("short.json");
    std::fs::write(
        &short,
        r#"{"prompt_len": 4, "layers": [{"prefill_scores": [1, 2]}]}"#,
    )
    .unwrap();
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"prompt_len": 4, "layers": ["#).unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--policy".into(),
                "nope".into(),
                "--budget".into(),
                "0.5".into(),
            ],
            "known policies",
        ),
        (vec!["--budget".into(), "0".into()], "outside (0, 1]"),
        (
            vec![
                "--budget".into(),
                "0.5".into(),
                "--set".into(),
                "offset".into(),
            ],
            "KEY=VALUE",
        ),
        (
            vec![
                "--budget".into(),
                "0.5".into(),
                "--set".into(),
                "colour=3".into(),
            ],
            "colour",
        ),
        (
            vec![
                "--budget".into(),
                "0.5".into(),
                "--layer-budgets".into(),
                "cone".into(),
            ],
            "cone",
        ),
        (
            vec![
                "--budget".into(),
                "0.5".into(),
                "--set".into(),
                "pyramid_beta=0.5".into(),
            ],
            "pyramid_beta",
        ),
    ];
    for (args, needle) in cases {
        let out = ecache()
            .arg("trace")
            .args(&args)
            .arg("--input")
            .arg(example_input())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    for (file, needle) in [(short, "prefill_scores"), (broken, "broken.json")] {
        let out = ecache()
            .args(["trace", "--budget", "0.5", "--input"])
            .arg(&file)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains(needle), "{err}");
    }
}
