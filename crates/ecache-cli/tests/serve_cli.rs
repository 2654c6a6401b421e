//! `ecache serve` and `ecache bench-serve` as a user runs them, on the embedded demo model
//! and the loopback interface only.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A plain HTTP/1.1 GET; the status line and the body.
fn get(addr: &str, path: &str) -> (String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.lines().next().unwrap_or_default().to_string();
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    (status, body)
}

#[test]
fn serve_answers_on_loopback_and_stops_cleanly_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ecache"))
        .args(["serve", "--port", "0", "--kv-memory", "4MiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    assert!(line.contains("KV cap 4.0 MiB"), "{line}");
    let (status, body) = get(&addr, "/health");
    assert!(status.contains("200"), "{status}");
    assert!(body.contains("ok"), "{body}");
    let (status, body) = get(&addr, "/v1/models");
    assert!(
        status.contains("200") && body.contains("ecache-demo"),
        "{body}"
    );
    let (status, _) = get(&addr, "/nowhere");
    assert!(status.contains("404"), "{status}");
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "still running");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn bad_serve_flags_exit_with_2() {
    for (args, needle) in [
        (&["--kv-memory", "lots"][..], "--kv-memory"),
        (&["--max-batch", "0"][..], "--max-batch"),
        (&["--policy", "nope"][..], "unknown policy"),
        (&["--host", "not an address"][..], "--host"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_ecache"))
            .arg("serve")
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn bench_serve_reports_each_policy_under_one_cap() {
    let dir = std::env::temp_dir().join(format!("ecache-bench-serve-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("serve.json");
    let out = Command::new(env!("CARGO_BIN_EXE_ecache"))
        .args([
            "bench-serve",
            "--policies",
            "full,elastic",
            "--requests",
            "12",
            "--concurrency",
            "12",
            "--max-tokens",
            "24",
            "--warmup",
            "1",
            "--baseline-requests",
            "2",
            "--output",
            json.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("| elastic | 0.2 | http |"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert!(
        report["machine"]["cpu"].is_string() && report["machine"]["threads"].as_u64() > Some(0)
    );
    let cap = report["kv_cap_bytes"].as_u64().unwrap();
    let rows = report["rows"].as_array().unwrap();
    let modes: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| (r["policy"].as_str().unwrap(), r["mode"].as_str().unwrap()))
        .collect();
    assert_eq!(
        modes,
        [
            ("full", "http"),
            ("elastic", "http"),
            ("full", "sequential")
        ]
    );
    for r in rows {
        assert!(r["tokens_per_s"].as_f64() > Some(0.0), "{r}");
        // Time not spent prefilling is shorter than the whole run.
        assert!(
            r["decode_tokens_per_s"].as_f64() > r["tokens_per_s"].as_f64(),
            "{r}"
        );
        assert!(r["kv_peak_bytes"].as_u64() <= Some(cap), "{r}");
        assert!(
            r["ttft_p50_s"].as_f64() <= r["latency_p50_s"].as_f64(),
            "{r}"
        );
    }
    assert_eq!(rows[0]["requests"], 12);
    // The cap holds four and a half full-cache requests; a fifth of the cache, far more.
    assert_eq!(rows[0]["max_concurrent"], 4);
    assert!(rows[1]["max_concurrent"].as_u64() >= Some(8), "{}", rows[1]);
    assert_eq!(rows[2]["max_concurrent"], 1);
    std::fs::remove_dir_all(&dir).ok();
}
