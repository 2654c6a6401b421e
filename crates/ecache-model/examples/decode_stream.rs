//! The skinny product over every weight of one decode step of a shape, one row of `x`, in
//! the order a step reads them, with the weights in f32, f16 and bf16: the weights' set is
//! larger than the caches (llama-h1024x8: 0.53 GB in f32), so each pass streams it from
//! memory as a decode step does, which `skinny_rate` (one weight read again and again) does
//! not. Beside it, a plain read of the same f32 bytes on every thread (a SIMD sum, without
//! the product's prefetching), for reference.
//!
//! Run: `cargo run --release -p ecache-model --example decode_stream [hidden intermediate
//! vocab layers]` (default llama-h1024x8: 1024 2816 32000 8; llava-mid: 1024 2816 32064 12).

use std::collections::BTreeMap;
use std::time::Instant;

use ecache_model::kernels::cpu::{Weights, skinny_matmul};
use half::{bf16, f16};
use macerator::{Scalar, Simd, vload_unaligned};
use rayon::prelude::*;

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (h, inter, vocab, layers) = match args[..] {
        [h, i, v, l] => (h, i, v, l),
        _ => (1024, 2816, 32000, 8),
    };
    // q, k, v, o; gate, up; down; then the LM head: `[k, n]` each.
    let mut shapes = Vec::new();
    for _ in 0..layers {
        shapes.extend([(h, h); 4]);
        shapes.extend([(h, inter), (h, inter), (inter, h)]);
    }
    shapes.push((h, vocab));
    let f32s: Vec<Vec<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(s, &(k, n))| {
            (0..k * n)
                .map(|j| ((j + s) % 97) as f32 * 1e-3 - 0.05)
                .collect()
        })
        .collect();
    let f16s: Vec<Vec<f16>> = f32s
        .iter()
        .map(|w| w.iter().map(|&v| f16::from_f32(v)).collect())
        .collect();
    let bf16s: Vec<Vec<bf16>> = f32s
        .iter()
        .map(|w| w.iter().map(|&v| bf16::from_f32(v)).collect())
        .collect();
    let elements: usize = shapes.iter().map(|(k, n)| k * n).sum();
    let x = vec![0.5f32; h.max(inter)];
    let mut outs: Vec<Vec<f32>> = shapes.iter().map(|&(_, n)| vec![0.0; n]).collect();
    let threads = rayon::current_num_threads();
    println!(
        "{} weights, {:.3} G elements, {threads} threads; the best of 5 passes after one",
        shapes.len(),
        elements as f64 / 1e9
    );
    println!("| weights | ms per pass | GB/s | by shape (ms) |");
    println!("|---|---:|---:|---|");
    for dtype in ["f32", "f16", "bf16"] {
        let bytes = elements * if dtype == "f32" { 4 } else { 2 };
        let mut best = (f64::INFINITY, BTreeMap::new());
        for _ in 0..6 {
            let mut by_shape: BTreeMap<(usize, usize), f64> = BTreeMap::new();
            let start = Instant::now();
            for (s, (&(k, n), out)) in shapes.iter().zip(outs.iter_mut()).enumerate() {
                let w = match dtype {
                    "f32" => Weights::F32(&f32s[s]),
                    "f16" => Weights::F16(&f16s[s]),
                    _ => Weights::Bf16(&bf16s[s]),
                };
                let one = Instant::now();
                skinny_matmul(&x[..k], 1, k, w, n, out);
                *by_shape.entry((k, n)).or_default() += one.elapsed().as_secs_f64() * 1e3;
            }
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if ms < best.0 {
                best = (ms, by_shape);
            }
        }
        let shapes_ms: Vec<String> = best
            .1
            .iter()
            .map(|((k, n), ms)| format!("{k}x{n} {ms:.2}"))
            .collect();
        println!(
            "| {dtype} skinny | {:.2} | {:.1} | {} |",
            best.0,
            bytes as f64 / best.0 / 1e6,
            shapes_ms.join(", ")
        );
    }
    let mut best = f64::INFINITY;
    let mut total = 0.0;
    for _ in 0..6 {
        let start = Instant::now();
        for w in &f32s {
            total += w
                .par_chunks(w.len().div_ceil(threads))
                .map(sum)
                .sum::<f32>();
        }
        best = best.min(start.elapsed().as_secs_f64() * 1e3);
    }
    std::hint::black_box(total);
    println!(
        "| f32 read (sum) | {best:.2} | {:.1} | |",
        elements as f64 * 4.0 / best / 1e6
    );
}

/// The sum of `v`, eight vectors at a time.
#[macerator::with_simd]
#[allow(clippy::needless_lifetimes)] // the macro needs the lifetime named
fn sum<'a, S: Simd>(v: &'a [f32]) -> f32 {
    let lanes = f32::lanes::<S>();
    let step = 8 * lanes;
    let mut acc = [0.0f32.splat::<S>(); 8];
    let mut i = 0;
    while i + step <= v.len() {
        for (a, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + step <= v.len().
            *acc += unsafe { vload_unaligned::<S, f32>(v.as_ptr().add(i + a * lanes)) };
        }
        i += step;
    }
    let mut total: f32 = acc.into_iter().map(macerator::ReduceAdd::reduce_add).sum();
    total += v[i..].iter().sum::<f32>();
    total
}
