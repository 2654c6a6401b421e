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
    assert!(!elastic.is_empty());
}
