//! The CPU backend's matrix-multiply rate at the prefill's shapes (llava-mid: 900 tokens,
//! hidden 1024, intermediate 2816), to tell how much of a prefill is the backend's GEMM;
//! and a decode-shaped projection for 8 sequences, as burn's `Linear` runs it on a 3-D
//! input (the weight broadcast over the batch) and as one `[8, in]` product.
//!
//! Run: `cargo run --release -p ecache-model --example matmul_rate`.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{Distribution, Tensor};

fn main() {
    let device = Default::default();
    for (m, k, n) in [
        (900, 1024, 1024),
        (900, 1024, 2816),
        (900, 2816, 1024),
        (900, 1024, 32064),
    ] {
        let a = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
        let _: f32 = a.clone().matmul(b.clone()).sum().into_scalar();
        let reps = 10;
        let start = Instant::now();
        for _ in 0..reps {
            let _: f32 = a
                .clone()
                .matmul(b.clone())
                .slice([0..1, 0..1])
                .into_scalar();
        }
        let seconds = start.elapsed().as_secs_f64() / reps as f64;
        let gflops = 2.0 * m as f64 * k as f64 * n as f64 / seconds / 1e9;
        println!(
            "[{m} x {k}] x [{k} x {n}] f32: {:.2} ms, {gflops:.1} GFLOP/s",
            seconds * 1e3
        );
    }
    let (batch, k, n) = (8, 4096, 11008);
    let w = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 1.0), &device);
    let x = Tensor::<Flex, 3>::random([batch, 1, k], Distribution::Normal(0.0, 1.0), &device);
    let time = |f: &dyn Fn() -> f32| {
        f();
        let start = Instant::now();
        for _ in 0..5 {
            f();
        }
        start.elapsed().as_secs_f64() / 5.0 * 1e3
    };
    let broadcast = time(&|| {
        let y = x.clone().matmul(w.clone().unsqueeze::<3>());
        y.slice([0..1, 0..1, 0..1]).into_scalar()
    });
    let flat = time(&|| {
        let y = x.clone().reshape([batch, k]).matmul(w.clone());
        y.slice([0..1, 0..1]).into_scalar()
    });
    println!(
        "decode projection, {batch} sequences, [{k} x {n}] f32: weight broadcast over the batch {broadcast:.1} ms, one [{batch} x {k}] product {flat:.1} ms ({:.1}x)",
        broadcast / flat
    );
}
