//! A short smoke of every fuzz target on stable: the harnesses of fuzz/src/lib.rs run over
//! the stored seeds, every regression input found by fuzzing, and a few hundred seeded
//! mutations of each seed (bit flips, truncations, spliced bytes). The long runs are
//! `cargo fuzz run NAME` (docs/reliability.md).

#[path = "../../../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod harness;

use ecache_model::generate::SeededRng;

fn inputs(target: &str) -> Vec<Vec<u8>> {
    let root = harness::repository().join("fuzz");
    let mut out = Vec::new();
    for folder in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(folder).join(target)) else {
            continue;
        };
        let mut paths: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
        paths.sort();
        for path in paths {
            out.push(std::fs::read(path).unwrap());
        }
    }
    assert!(!out.is_empty(), "no seeds for {target}");
    out
}

/// `count` mutations of `seed`, reproducible from `rng`.
fn mutations(seed: &[u8], rng: &mut SeededRng, count: usize) -> Vec<Vec<u8>> {
    let mut below = |n: usize| ((rng.next_f64() * n as f64) as usize).min(n.saturating_sub(1));
    (0..count)
        .map(|_| {
            let mut m = seed.to_vec();
            for _ in 0..1 + below(4) {
                if m.is_empty() {
                    m.push(below(256) as u8);
                    continue;
                }
                let at = below(m.len());
                match below(4) {
                    0 => m[at] ^= 1 << below(8),
                    1 => m.truncate(at),
                    2 => m.insert(at, [0u8, 0xff, b'"', b'[', b'\n'][below(5)]),
                    _ => {
                        let from = below(m.len());
                        let piece: Vec<u8> = m[from..(from + 8).min(m.len())].to_vec();
                        m.splice(at..at, piece);
                    }
                }
            }
            m
        })
        .collect()
}

fn smoke(target: &str, run: fn(&[u8]), per_seed: usize) {
    let mut rng = SeededRng::new(0xF0CC);
    let mut count = 0;
    for seed in inputs(target) {
        run(&seed);
        for m in mutations(&seed, &mut rng, per_seed) {
            run(&m);
            count += 1;
        }
    }
    assert!(count > 0);
}

#[test]
fn config_target() {
    smoke("config", harness::config, 300);
}

#[test]
fn safetensors_target() {
    smoke("safetensors", harness::safetensors, 150);
}

#[test]
fn image_target() {
    smoke("image", harness::image, 100);
}

#[test]
fn dataset_target() {
    smoke("dataset", harness::dataset, 300);
}
