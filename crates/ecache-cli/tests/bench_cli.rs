//! `ecache bench` on the embedded demo model's shape: the report's structure, its KV
//! figures against a hand count, and a protocol the shape cannot hold.

use std::path::PathBuf;
use std::process::Command;

fn demo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/ecache-demo")
}

fn bench(extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ecache"))
        .arg("bench")
        .arg("--shape")
        .arg(demo())
        .args(["--warmup", "0"])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn a_sweep_reports_every_policy_against_the_full_cache_of_the_same_run() {
    let dir = std::env::temp_dir().join(format!("ecache-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let out = bench(&[
        "--batch",
        "2",
        "--prompt-len",
        "120",
        "--gen-len",
        "10",
        "--policies",
        "elastic,local",
        "--budgets",
        "0.5",
        "--output",
        json.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| elastic | 0.5 |"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["full", "elastic", "local"]);
    // Full cache: 4 layers x 2 sequences x 130 slots x (K and V) x 2 KV heads x 64 x 4 bytes.
    assert_eq!(rows[0]["kv_bytes_end"], 4 * 2 * 130 * 2 * 2 * 64 * 4);
    assert_eq!(rows[0]["decode_speedup"], 1.0);
    for row in &rows[1..] {
        let ratio = row["kv_ratio"].as_f64().unwrap();
        assert!((0.45..=0.55).contains(&ratio), "{row}");
        let speedup = row["decode_speedup"].as_f64().unwrap();
        let expected =
            rows[0]["ms_per_step"].as_f64().unwrap() / row["ms_per_step"].as_f64().unwrap();
        assert!((speedup - expected).abs() < 1e-9);
    }
    assert_eq!(report["image_tokens"], 81);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_protocol_longer_than_the_context_is_bad_input() {
    let out = bench(&["--batch", "1", "--prompt-len", "600", "--gen-len", "8"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("600") && stderr.contains("512"), "{stderr}");
}
