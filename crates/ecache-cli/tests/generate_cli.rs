//! `ecache generate` on the tiny transformers fixture, as a user runs it.

use std::path::PathBuf;
use std::process::Command;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llava-mha")
}

fn generate(extra: &[&str]) -> std::process::Output {
    let dir = fixture();
    Command::new(env!("CARGO_BIN_EXE_ecache"))
        .arg("generate")
        .arg("--model")
        .arg(&dir)
        .arg("--image")
        .arg(dir.join("image.png"))
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn full_cache_greedy_answer_matches_transformers() {
    let out = generate(&[
        "--prompt",
        "what is the colour of the circle ?",
        "--policy",
        "full",
        "--max-new-tokens",
        "12",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("expected.json")).unwrap())
            .unwrap();
    let words: Vec<&str> = expected["greedy_text"]
        .as_str()
        .unwrap()
        .split(' ')
        .take(12)
        .collect();
    let first = stdout.lines().next().unwrap();
    assert_eq!(first, words.join(" "), "{stdout}");
    assert!(
        stdout.contains("prompt tokens 27 (image 16), new tokens 12"),
        "{stdout}"
    );
    // The default budget (0.2) does not apply to a cache that keeps everything.
    assert!(stdout.contains("[full budget 1]"), "{stdout}");
}

#[test]
fn elastic_holds_the_budget_and_seeds_repeat() {
    let args = [
        "--prompt",
        "describe the picture .",
        "--policy",
        "elastic",
        "--budget",
        "0.5",
        "--temperature",
        "1.0",
        "--seed",
        "9",
        "--max-new-tokens",
        "8",
    ];
    let a = generate(&args);
    let b = generate(&args);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let (a, b) = (
        String::from_utf8_lossy(&a.stdout),
        String::from_utf8_lossy(&b.stdout),
    );
    assert_eq!(a.lines().next(), b.lines().next());
    // T = 23; 7 of the 8 tokens are fed back, so N = 30 and target(30) = 15.
    assert!(a.contains("slots per layer 15,"), "{a}");
}

#[test]
fn bad_prompts_and_paths_exit_with_2() {
    let cases: [(&[&str], &str); 3] = [
        (&["--prompt", "USER: hello ASSISTANT:"], "no <image> token"),
        (
            &["--prompt", "USER: <image> <image> ASSISTANT:"],
            "2 <image> tokens",
        ),
        (&["--prompt", "hello", "--backend", "tpu"], "--backend"),
    ];
    for (args, needle) in cases {
        let out = generate(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ecache"))
        .args([
            "generate",
            "--model",
            "/nonexistent/model",
            "--prompt",
            "hi",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("/nonexistent/model"), "{err}");
}
