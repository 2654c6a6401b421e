//! The decode-shaped product `[rows, k] x [k, n]` through flex's GEMM and through the
//! skinny kernel (`KernelBackend::skinny_matmul`), with f32, f16 and bf16 weights: the
//! time, and the weights' bytes over the time (the bandwidth it reaches). The crossover
//! sets `kernels::flex::SKINNY_ROWS`.
//!
//! Run: `cargo run --release -p ecache-model --example skinny_rate [k n]` (default 4096 11008;
//! `ROWS=1,8` for those row counts only).

mod common;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_model::kernels::KernelBackend;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (k, n) = match args[..] {
        [k, n] => (k, n),
        _ => (4096, 11008),
    };
    let device = Default::default();
    // `T=1`: stored `[n, k]` and seen transposed; else row-major `[k, n]`.
    let w = if std::env::var("T").is_ok() {
        Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.02), &device).transpose()
    } else {
        Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 0.02), &device)
    };
    let halves = [DType::F16, DType::BF16].map(|d| {
        let stored = if std::env::var("T").is_ok() {
            w.clone().transpose()
        } else {
            w.clone()
        };
        let half = stored.cast(d);
        (
            d,
            if std::env::var("T").is_ok() {
                half.transpose()
            } else {
                half
            },
        )
    });
    // The best of five rounds of eight calls (`common::best_ms`), as
    // `tools/bench_transformers.py --matmul` times torch.
    let time = |f: &dyn Fn()| common::best_ms(8, f);
    let gb_s = |bytes: usize, ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    println!("[rows x {k}] x [{k} x {n}]: ms (GB/s of weights)");
    println!("| rows | flex GEMM f32 | skinny f32 | skinny f16 | skinny bf16 |");
    println!("|---:|---:|---:|---:|---:|");
    // `ROWS=1,8` times only those row counts.
    let rows_list: Vec<usize> = match std::env::var("ROWS") {
        Ok(list) => list
            .split(',')
            .filter_map(|r| r.trim().parse().ok())
            .collect(),
        Err(_) => vec![1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128],
    };
    for rows in rows_list {
        let x = Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
        let gemm = time(&|| {
            let _ = x.clone().matmul(w.clone()).into_data();
        });
        let skinny = time(&|| {
            let _ = Flex::skinny_matmul(x.clone(), w.clone()).into_data();
        });
        let half: Vec<f64> = halves
            .iter()
            .map(|(d, w)| {
                let x = x.clone().cast(*d);
                time(&|| {
                    let _ = Flex::skinny_matmul(x.clone(), w.clone()).into_data();
                })
            })
            .collect();
        println!(
            "| {rows} | {gemm:.2} ({:.1}) | {skinny:.2} ({:.1}) | {:.2} ({:.1}) | {:.2} ({:.1}) |",
            gb_s(4 * k * n, gemm),
            gb_s(4 * k * n, skinny),
            half[0],
            gb_s(2 * k * n, half[0]),
            half[1],
            gb_s(2 * k * n, half[1]),
        );
    }
}
