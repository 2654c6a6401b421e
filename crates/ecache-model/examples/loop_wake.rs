//! What a parallel loop costs when the calling thread worked alone for a while before it:
//! the time of one small loop (two shares of a 64 Ki-element slice) on the caller's own
//! pool, after a gap of 0 to 3,000 us in which the caller spins alone and the other workers
//! idle, and the process's context switches over each row. A worker that slept during the
//! gap has to be woken by the loop; rayon-core as the workspace patches it
//! (vendor/rayon-core/PATCHES.md) keeps idle workers circling for 2 ms first, so loops
//! less than that apart find them awake.
//!
//! Run: `cargo run --release -p ecache-model --example loop_wake`.

use std::time::{Duration, Instant};

use rayon::prelude::*;

/// Voluntary and involuntary context switches in a `/proc/.../status` text.
fn count(status: &str) -> u64 {
    status
        .lines()
        .filter(|l| l.contains("ctxt_switches:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
        .sum()
}

/// The process's context switches so far, summed over its threads (Linux; 0 elsewhere).
fn all_switches() -> u64 {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .map(|s| count(&s))
        .sum()
}

fn main() {
    ecache_model::threads::join_own_pool();
    let threads = rayon::current_num_threads();
    let mut v = vec![1.0f32; 1 << 16];
    let share = v.len().div_ceil(threads);
    let loops = 2000;
    println!("{threads} threads, {loops} loops per row");
    println!("| gap (us) | us per loop | context switches per loop |");
    println!("|---:|---:|---:|");
    for gap_us in [0u64, 5, 20, 50, 100, 300, 1000, 3000] {
        let gap = Duration::from_micros(gap_us);
        let before = all_switches();
        let mut total = Duration::ZERO;
        for _ in 0..loops {
            let start = Instant::now();
            v.par_chunks_mut(share)
                .for_each(|c| c.iter_mut().for_each(|x| *x += 1.0));
            total += start.elapsed();
            let idle = Instant::now();
            while idle.elapsed() < gap {
                std::hint::spin_loop();
            }
        }
        let switched = all_switches() - before;
        println!(
            "| {gap_us} | {:.1} | {:.2} |",
            total.as_secs_f64() * 1e6 / loops as f64,
            switched as f64 / loops as f64
        );
    }
    std::hint::black_box(&v);
}
