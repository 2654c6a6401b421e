//! What writing a few cache rows costs as the buffer grows: a one-row `slice_assign` into a
//! `[1, 32, capacity, 128]` f32 buffer (a 7B layer's keys), and one removal (a shift of 25
//! rows) in sequence 0 of a cache of batch 1 and batch 4. With an in-place backend both
//! stay flat as the buffer grows; a backend that copies the destination grows with it
//! (vendor/burn-flex/PATCHES.md). Prints a table; the first row of each part is the
//! baseline of the ratios.
//!
//! Run: `cargo run --release -p ecache-core --example slice_assign_cost`.

use std::time::Instant;

use burn::backend::Flex;
use burn::tensor::{DType, Distribution, Tensor};
use ecache_core::{CacheShape, Decision, LayerCache, Plan, SlotKind};

type B = Flex;
const HEADS: usize = 32;
const DIM: usize = 128;

fn one_row_assign_ms(capacity: usize, repeats: usize) -> f64 {
    let device = Default::default();
    let mut buffer = Tensor::<B, 4>::zeros([1, HEADS, capacity, DIM], &device);
    let row = Tensor::<B, 4>::random([1, HEADS, 1, DIM], Distribution::Normal(0., 1.), &device);
    let start = Instant::now();
    for i in 0..repeats {
        buffer = buffer.slice_assign([0..1, 0..HEADS, i..i + 1, 0..DIM], row.clone());
    }
    let _ = buffer.narrow(2, 0, 1).into_data();
    start.elapsed().as_secs_f64() * 1e3 / repeats as f64
}

fn removal_ms(batch: usize, len: usize, repeats: usize) -> f64 {
    let device = Default::default();
    let shape = CacheShape {
        batch,
        kv_heads: HEADS,
        head_dim: DIM,
    };
    let mut cache = LayerCache::<B>::new(shape, len + 1, false, DType::F32, &device);
    let kv = Tensor::<B, 4>::random(
        [batch, HEADS, len, DIM],
        Distribution::Normal(0., 1.),
        &device,
    );
    let positions: Vec<usize> = (0..len).collect();
    cache
        .append(
            kv.clone(),
            kv,
            &vec![&positions[..]; batch],
            &vec![SlotKind::Image; len],
        )
        .expect("append");
    let start = Instant::now();
    for _ in 0..repeats {
        let l = cache.len(0);
        let plan = Plan::new(Decision::remove(l, &[l - 25]), l, "bench", 0).expect("plan");
        cache.apply(0, &plan).expect("apply");
    }
    let _ = cache.keys().narrow(2, 0, 1).into_data();
    start.elapsed().as_secs_f64() * 1e3 / repeats as f64
}

fn main() {
    println!("| one-row slice_assign, capacity | ms | vs capacity 256 |");
    println!("|---:|---:|---:|");
    let base = one_row_assign_ms(256, 50);
    for capacity in [256, 1024, 4096] {
        let ms = one_row_assign_ms(capacity, 50);
        println!("| {capacity} | {ms:.3} | {:.1}x |", ms / base);
    }
    println!();
    println!("| removal of one slot 25 from the end, 206 slots | ms | vs batch 1 |");
    println!("|---:|---:|---:|");
    let base = removal_ms(1, 206, 40);
    for batch in [1, 4] {
        let ms = removal_ms(batch, 206, 40);
        println!("| batch {batch} | {ms:.3} | {:.1}x |", ms / base);
    }
}
