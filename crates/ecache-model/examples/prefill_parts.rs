//! What one decoder layer's prefill costs, part by part, on the CPU backend at llava-mid's
//! shape (900 tokens, hidden 1024, 16 heads of 64, intermediate 2816): the GEMMs, the fused
//! causal attention, and the element-wise passes between them. Compare with
//! `python3 tools/bench_transformers.py --parts --threads 2`.
//!
//! Run: `cargo run --release -p ecache-model --example prefill_parts` (`DTYPE=f16` or
//! `DTYPE=bf16` for half precision; the projections then also show burn's own matmul in
//! that type beside [`KernelBackend::gemm`], which the model uses).

mod common;

use burn::backend::Flex;
use burn::nn::RmsNormConfig;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Distribution, Tensor};
use common::best_ms as time;
use ecache_model::kernels::KernelBackend;

fn main() {
    let device = Default::default();
    let (t, hidden, heads, d, inter) = (900, 1024, 16, 64, 2816);
    let dtype = match std::env::var("DTYPE").as_deref() {
        Ok("f16") => DType::F16,
        Ok("bf16") => DType::BF16,
        _ => DType::F32,
    };
    let normal = Distribution::Normal(0.0, 1.0);
    let x = Tensor::<Flex, 3>::random([1, t, hidden], normal, &device).cast(dtype);
    let w = Tensor::<Flex, 2>::random([hidden, hidden], normal, &device).cast(dtype);
    let w_up = Tensor::<Flex, 2>::random([hidden, inter], normal, &device).cast(dtype);
    let w_down = Tensor::<Flex, 2>::random([inter, hidden], normal, &device).cast(dtype);
    let gate = Tensor::<Flex, 3>::random([1, t, inter], normal, &device).cast(dtype);
    let q = Tensor::<Flex, 4>::random([1, heads, t, d], normal, &device).cast(dtype);
    let k = Tensor::<Flex, 4>::random([1, heads, t, d], normal, &device).cast(dtype);
    let v = Tensor::<Flex, 4>::random([1, heads, t, d], normal, &device).cast(dtype);
    let mut norm = RmsNormConfig::new(hidden).init::<Flex>(&device);
    norm.gamma = norm.gamma.map(|g| g.cast(dtype));
    let (x2, gate2) = (
        x.clone().reshape([t, hidden]),
        gate.clone().reshape([t, inter]),
    );
    let options = AttentionModuleOptions {
        scale: Some(0.125),
        softcap: None,
        is_causal: true,
    };
    let rows: Vec<(&str, f64, usize)> = vec![
        (
            "q, k, v, o projections (GEMM)",
            time(5, || Flex::gemm(x2.clone(), w.clone())),
            4,
        ),
        (
            "gate, up projections (GEMM)",
            time(5, || Flex::gemm(x2.clone(), w_up.clone())),
            2,
        ),
        (
            "down projection (GEMM)",
            time(5, || Flex::gemm(gate2.clone(), w_down.clone())),
            1,
        ),
        (
            "causal attention (fused)",
            time(5, || {
                attention(q.clone(), k.clone(), v.clone(), None, None, options)
            }),
            1,
        ),
        (
            "RMSNorm (kernel)",
            time(10, || ecache_model::kernels::rms_norm(&norm, x.clone())),
            2,
        ),
        (
            "SwiGLU (kernel)",
            time(10, || Flex::swiglu(gate.clone(), gate.clone())),
            1,
        ),
        ("residual add", time(10, || x.clone() + x.clone()), 2),
        (
            "heads merged ([1, h, t, d] -> [1, t, h d])",
            time(10, || {
                q.clone()
                    .swap_dims(1, 2)
                    .reshape([1, t, heads * d])
                    .slice([0..1, 0..1, 0..1])
                    .into_scalar()
            }),
            1,
        ),
    ];
    if dtype != DType::F32 {
        // Not in the sum: what the projections cost through burn's matmul in this type.
        let burns = [
            time(5, || x2.clone().matmul(w.clone())) * 4.0,
            time(5, || x2.clone().matmul(w_up.clone())) * 2.0,
            time(5, || gate2.clone().matmul(w_down.clone())),
        ];
        println!(
            "projections per layer through burn's {dtype:?} matmul: {:.2} ms (not in the sum)",
            burns.iter().sum::<f64>()
        );
    }
    let mut total = 0.0;
    println!("| part | ms each | per layer | ms per layer |");
    println!("|---|---:|---:|---:|");
    for (name, ms, n) in rows {
        println!("| {name} | {ms:.2} | {n} | {:.2} |", ms * n as f64);
        total += ms * n as f64;
    }
    println!("| sum | | | {total:.2} |");
}
