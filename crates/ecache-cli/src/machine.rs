//! The machine a figure was measured on: figures differ between machines, so every bench
//! report names its CPU, the widest SIMD level it offers and the threads available.

use serde::Serialize;

/// What a bench report says about where it ran.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo` on Linux).
    pub cpu: String,
    /// The widest SIMD instruction set the CPU offers (`avx512f`, `avx2`, `neon`, ...).
    pub simd: String,
    /// Threads available to the process.
    pub threads: usize,
    /// Memory bandwidth measured on the spot by a STREAM-like triad over every thread
    /// (GB/s), when measured ([`Machine::measured`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_gb_s: Option<f64>,
}

impl Machine {
    /// This machine.
    pub fn here() -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|s| s.trim().to_string())
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        Self {
            cpu,
            simd: simd().into(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            bandwidth_gb_s: None,
        }
    }

    /// This machine, with its memory bandwidth measured now (about a second).
    pub fn measured() -> Self {
        Self {
            bandwidth_gb_s: Some(triad_gb_s(16 << 20, 5)),
            ..Self::here()
        }
    }
}

/// STREAM's triad, `a[i] = b[i] + s * c[i]` over `len` f32 elements split across the
/// threads, best of `reps` passes; the bytes counted are STREAM's (two arrays read, one
/// written: `12 * len`). The arrays (three times 64 MiB at the default length) are far
/// larger than any cache.
pub fn triad_gb_s(len: usize, reps: usize) -> f64 {
    use rayon::prelude::*;
    let b = vec![1.0f32; len];
    let c = vec![2.0f32; len];
    let mut a = vec![0.0f32; len];
    let chunk = len.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let mut best = f64::INFINITY;
    for rep in 0..reps {
        let s = 3.0 + rep as f32;
        let start = std::time::Instant::now();
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk))
            .zip(c.par_chunks(chunk))
            .for_each(|((a, b), c)| {
                for ((a, b), c) in a.iter_mut().zip(b).zip(c) {
                    *a = b + s * c;
                }
            });
        best = best.min(start.elapsed().as_secs_f64());
        std::hint::black_box(&a);
    }
    12.0 * len as f64 / best / 1e9
}

fn simd() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            return "avx512f";
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            return "avx2";
        }
        if std::arch::is_x86_feature_detected!("sse4.1") {
            return "sse4.1";
        }
        "sse2"
    }
    #[cfg(target_arch = "aarch64")]
    {
        "neon"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "none"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plausible figure (between a slow laptop's and a large server's), from a triad
    /// that did write its output.
    #[test]
    fn the_triad_measures_a_plausible_bandwidth() {
        let gb_s = triad_gb_s(4 << 20, 2);
        assert!((0.5..2000.0).contains(&gb_s), "{gb_s}");
    }
}
