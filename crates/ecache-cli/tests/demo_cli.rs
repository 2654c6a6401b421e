//! The README's main command: `ecache generate` with no arguments answers about the bundled
//! scene with the embedded demo model under Elastic Cache and under the full cache.

use std::process::Command;

#[test]
fn generate_without_arguments_runs_the_embedded_demo() {
    let out = Command::new(env!("CARGO_BIN_EXE_ecache"))
        .arg("generate")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = |prefix: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting {prefix:?} in\n{stdout}"))
            .trim()
            .to_string()
    };
    assert_eq!(line("question: "), "describe the image in detail .");
    let elastic = line("elastic (budget 0.2): ");
    let full = line("full (budget 1): ");
    let memory = line("memory: ");
    let saved: f64 = memory
        .rsplit(' ')
        .nth(1)
        .and_then(|w| w.trim_end_matches('%').parse().ok())
        .unwrap_or_else(|| panic!("{memory}"));
    // A 20% budget keeps about a fifth of the slots (plus the sink and the recent token).
    assert!((70.0..=82.0).contains(&saved), "{memory}");
    assert!(full.starts_with("there are"), "{full}");
    // The demo protects its question from the prefill merge, so Elastic Cache answers the
    // question asked (a description), right or wrong in its details.
    assert!(line("demo: ").contains("protect = instruction"), "{stdout}");
    assert!(elastic.starts_with("there are"), "{elastic}");
}

/// The answer lines of `ecache generate` on the embedded model with `extra` flags.
fn answers(extra: &[&str]) -> Vec<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_ecache"))
        .args(["generate", "--max-new-tokens", "24"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .filter(|l| l.contains("(budget "))
        .map(str::to_string)
        .collect()
}

#[test]
fn the_same_seed_repeats_and_greedy_agrees_across_cpu_backends() {
    let sampled = ["--temperature", "0.9", "--top-p", "0.95", "--seed", "7"];
    let first = answers(&sampled);
    assert_eq!(first.len(), 2, "{first:?}");
    assert_eq!(first, answers(&sampled), "same seed, same tokens");
    let flex = answers(&["--backend", "flex"]);
    let ndarray = answers(&["--backend", "ndarray"]);
    assert_eq!(flex, ndarray, "greedy answers of flex and ndarray");
}
