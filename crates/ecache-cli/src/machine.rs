//! The machine a figure was measured on: figures differ between machines, so every bench
//! report names its CPU, the widest SIMD level it offers and the threads available.

use serde::Serialize;

/// What a bench report says about where it ran.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Machine {
    /// The CPU's model name (`/proc/cpuinfo` on Linux).
    pub cpu: String,
    /// The widest SIMD instruction set the CPU offers (`avx512f`, `avx2`, `neon`, ...).
    pub simd: String,
    /// Threads available to the process.
    pub threads: usize,
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
        }
    }
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
