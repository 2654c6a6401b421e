//! What the examples share (a module, not an example: cargo builds only `examples/*.rs` and
//! `examples/*/main.rs` as examples).

use std::time::Instant;

/// Milliseconds per call of `f`, the fastest of five rounds of `reps` calls after one: the
/// round least disturbed by other work on the machine (as `tools/bench_transformers.py`'s
/// `best_ms` times torch).
pub fn best_ms<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    (0..5)
        .map(|_| {
            let start = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(f());
            }
            start.elapsed().as_secs_f64() * 1e3 / reps as f64
        })
        .fold(f64::INFINITY, f64::min)
}
