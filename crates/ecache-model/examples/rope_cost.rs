//! What rotating queries and keys costs on the CPU backend, as the decoder does it
//! ([`RopeTables::apply`]: token-major, tables copied per head count) against the layout it
//! replaced (heads split out first, tables broadcast over the head axis, which made `flex`
//! walk every element through its strided iterator). Both give the same values; the
//! example checks that too.
//!
//! Run: `cargo run --release -p ecache-model --example rope_cost`.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_model::layers::{Rope, RopeTables};

type B = Flex;

/// The replaced layout: `x` `[batch, heads, t, d]` (a transposed view), tables
/// `[batch, 1, t, d]` broadcast over the heads, the rotated half negated on the fly.
fn broadcast_over_heads(x: Tensor<B, 4>, cos: &Tensor<B, 4>, sin: &Tensor<B, 4>) -> Tensor<B, 4> {
    let [b, h, t, d] = x.dims();
    let x1 = x.clone().slice([0..b, 0..h, 0..t, 0..d / 2]);
    let x2 = x.clone().slice([0..b, 0..h, 0..t, d / 2..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Median milliseconds of `reps` runs of `f` (each forced to finish).
fn median_ms(reps: usize, mut f: impl FnMut() -> Tensor<B, 4>) -> (f64, Tensor<B, 4>) {
    let mut out = f();
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        out = f();
        let _ = out.clone().slice([0..1, 0..1, 0..1, 0..1]).into_scalar();
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    (times[reps / 2], out)
}

fn main() {
    let device = Default::default();
    println!("| [batch, heads, t, head_dim] | broadcast over heads ms | token-major ms | ratio |");
    println!("|---|---:|---:|---:|");
    for (b, h, t, d) in [(1, 16, 900, 64), (1, 32, 900, 128), (8, 32, 1, 128)] {
        let proj = Tensor::<B, 3>::random([b, t, h * d], Distribution::Normal(0.0, 1.0), &device);
        let rope = Rope::new(d, 10_000.0);
        let positions: Vec<Vec<usize>> = (0..b).map(|i| (i..i + t).collect()).collect();
        let tables: RopeTables<B> = rope.tables(&positions, &[h], &device, DType::F32);
        // The replaced layout's tables, built as it built them.
        // (rounded as `Rope` rounds them: f32 frequencies and angles)
        let angle = |p: usize, i: usize| {
            let inv = 1.0 / 10_000f32.powf((2 * (i % (d / 2))) as f32 / d as f32);
            (inv * p as f32) as f64
        };
        let table = |f: fn(f64) -> f64| {
            let values: Vec<f32> = positions
                .iter()
                .flat_map(|row| {
                    row.iter()
                        .flat_map(move |&p| (0..d).map(move |i| f(angle(p, i)) as f32))
                })
                .collect();
            Tensor::<B, 1>::from_floats(values.as_slice(), &device).reshape([b, 1, t, d])
        };
        let (cos, sin) = (table(f64::cos), table(f64::sin));
        let reps = if t == 1 { 200 } else { 15 };
        let (before, old) = median_ms(reps, || {
            broadcast_over_heads(
                proj.clone().reshape([b, t, h, d]).swap_dims(1, 2),
                &cos,
                &sin,
            )
        });
        let (now, new) = median_ms(reps, || tables.apply(proj.clone().reshape([b, t, h, d])));
        let diff: f32 = (old - new).abs().max().into_scalar();
        assert!(diff < 1e-4, "the two layouts disagree by {diff}");
        println!(
            "| [{b}, {h}, {t}, {d}] | {before:.3} | {now:.3} | {:.1}x |",
            before / now
        );
    }
}
