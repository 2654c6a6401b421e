//! Decode attention on the CPU: one query row per (sequence, head) over that sequence's
//! own cache, read where it lies, with the scores, the softmax and the weighted sum in one
//! pass. Caches in f16 or bf16 are read in their stored type and widened a row at a time;
//! everything is computed in f32.

use macerator::{Scalar, Simd, vload_unaligned};
use rayon::prelude::*;

use super::cpu::{PARALLEL_WORK, Tile, UNROLL, Weights};

/// Where one sequence's keys (or values) for one layer lie in a buffer: `kv_heads` heads
/// of `len` rows of `d` contiguous elements (f32, f16 or bf16), head `g` starting at
/// `offset + g * head_stride`, rows `row_stride` apart.
#[derive(Debug, Clone, Copy)]
pub struct CacheView<'a> {
    pub data: Weights<'a>,
    pub offset: usize,
    pub head_stride: usize,
    pub row_stride: usize,
    pub len: usize,
}

/// Decode attention of `queries.len() / (heads * d)` sequences, each over its own keys and
/// values, every (sequence, head) pair a task: `softmax(q · K^T * scale) · V`, in f32.
/// Query head `h` reads key/value head `h / (heads / kv_heads)`.
///
/// # Shapes
/// - `queries`: `[heads, B, d]`; `keys[b]`, `values[b]`: sequence `b`'s views
/// - returns `[heads, B, d]`
pub fn decode_attention(
    queries: &[f32],
    heads: usize,
    kv_heads: usize,
    d: usize,
    keys: &[CacheView<'_>],
    values: &[CacheView<'_>],
    scale: f32,
) -> Vec<f32> {
    let batch = keys.len();
    assert_eq!(
        queries.len(),
        heads * batch * d,
        "queries are [heads, B, d]"
    );
    assert_eq!(values.len(), batch, "one value view per sequence");
    let rep = (heads / kv_heads.max(1)).max(1);
    let mut out = vec![0.0f32; heads * batch * d];
    // Small passes run on this thread: handing tiny tasks to other threads costs more
    // than it saves.
    let work: usize = keys.iter().map(|k| k.len).sum::<usize>() * heads * d;
    let min_len = if work < PARALLEL_WORK { usize::MAX } else { 1 };
    out.par_chunks_mut(d)
        .with_min_len(min_len)
        .enumerate()
        .for_each(|(task, row)| {
            let (h, b) = (task / batch, task % batch);
            let g = h / rep;
            let (k, v) = (&keys[b], &values[b]);
            let q = &queries[task * d..(task + 1) * d];
            attend(
                row,
                q,
                (k.data, k.offset + g * k.head_stride, k.row_stride),
                (v.data, v.offset + g * v.head_stride, v.row_stride),
                k.len,
                scale,
            );
        });
    out
}

/// One query row over `len` keys and values, each given as (elements, where the first row
/// starts, the distance between rows); rows in half precision are widened as they are read.
#[macerator::with_simd]
fn attend<'a, S: Simd>(
    out: &'a mut [f32],
    q: &'a [f32],
    keys: (Weights<'a>, usize, usize),
    values: (Weights<'a>, usize, usize),
    len: usize,
    scale: f32,
) {
    let d = q.len();
    let (keys, key_at, key_stride) = keys;
    let (values, value_at, value_stride) = values;
    let mut widened = vec![0.0f32; UNROLL * d];
    let mut scores = vec![0.0f32; len];
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let key = keys.f32_run(key_at + j * key_stride, d, &mut widened);
        *s = dot::<S>(q, key) * scale;
        max = max.max(*s);
    }
    let mut sum = 0.0f32;
    for s in &mut scores {
        *s = (*s - max).exp();
        sum += *s;
    }
    for s in &mut scores {
        *s /= sum;
    }
    // The weighted sum of the values is a one-row product `[1, len] x [len, d]`.
    out.fill(0.0);
    let mut j = 0;
    while j < len {
        let count = UNROLL.min(len - j);
        let mut rows: [&[f32]; UNROLL] = [&[]; UNROLL];
        for (r, (row, buffer)) in rows
            .iter_mut()
            .zip(widened.chunks_mut(d))
            .enumerate()
            .take(count)
        {
            *row = values.f32_run(value_at + (j + r) * value_stride, d, buffer);
        }
        let tile = Tile {
            rows: &rows[..count],
            k: len,
            n: d,
            kk: j,
            j0: 0,
        };
        tile.fold::<S, 1, 1>(out, &scores, 0);
        j += count;
    }
}

#[inline(always)]
fn dot<S: Simd>(a: &[f32], b: &[f32]) -> f32 {
    let lanes = f32::lanes::<S>();
    let simd_len = a.len() / lanes * lanes;
    let mut acc = 0.0f32.splat::<S>();
    let mut j = 0;
    while j < simd_len {
        // SAFETY: j + lanes <= a.len() == b.len().
        unsafe {
            acc = vload_unaligned::<S, f32>(a.as_ptr().add(j))
                .mul_add(vload_unaligned(b.as_ptr().add(j)), acc);
        }
        j += lanes;
    }
    let mut total = macerator::ReduceAdd::reduce_add(acc);
    for j in simd_len..a.len() {
        total += a[j] * b[j];
    }
    total
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::*;
    use crate::kernels::cpu::tests::numbers;

    /// Two sequences of different lengths in buffers with spare rows, grouped-query heads;
    /// caches in f32, f16 and bf16 (the reference reads the same rounded values in f64).
    #[test]
    fn decode_attention_matches_softmax_written_out() {
        let (heads, kv_heads, d, cap) = (4, 2, 20, 9);
        let lens = [3usize, 9];
        let queries = numbers(heads * 2 * d, 3);
        let raw: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
            .map(|b| {
                (
                    numbers(kv_heads * cap * d, 10 + b),
                    numbers(kv_heads * cap * d, 20 + b),
                )
            })
            .collect();
        let f16s: Vec<(Vec<f16>, Vec<f16>)> = raw
            .iter()
            .map(|(k, v)| {
                let half = |x: &Vec<f32>| x.iter().map(|&a| f16::from_f32(a)).collect();
                (half(k), half(v))
            })
            .collect();
        let bf16s: Vec<(Vec<bf16>, Vec<bf16>)> = raw
            .iter()
            .map(|(k, v)| {
                let half = |x: &Vec<f32>| x.iter().map(|&a| bf16::from_f32(a)).collect();
                (half(k), half(v))
            })
            .collect();
        for dtype in ["f32", "f16", "bf16"] {
            let stored = |b: usize, values: bool| match dtype {
                "f32" => Weights::F32(if values { &raw[b].1 } else { &raw[b].0 }),
                "f16" => Weights::F16(if values { &f16s[b].1 } else { &f16s[b].0 }),
                _ => Weights::Bf16(if values { &bf16s[b].1 } else { &bf16s[b].0 }),
            };
            // The values the kernel sees, in f32.
            let buffers: Vec<(Vec<f32>, Vec<f32>)> = (0..2)
                .map(|b| {
                    let wide = |w: Weights<'_>| match w {
                        Weights::F32(v) => v.to_vec(),
                        Weights::F16(v) => v.iter().map(|a| a.to_f32()).collect(),
                        Weights::Bf16(v) => v.iter().map(|a| a.to_f32()).collect(),
                    };
                    (wide(stored(b, false)), wide(stored(b, true)))
                })
                .collect();
            let view = |b: usize, values: bool| CacheView {
                data: stored(b, values),
                offset: 0,
                head_stride: cap * d,
                row_stride: d,
                len: lens[b],
            };
            let keys: Vec<_> = (0..2).map(|b| view(b, false)).collect();
            let values: Vec<_> = (0..2).map(|b| view(b, true)).collect();
            check(
                &queries, heads, d, cap, lens, &buffers, &keys, &values, dtype,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        queries: &[f32],
        heads: usize,
        d: usize,
        cap: usize,
        lens: [usize; 2],
        buffers: &[(Vec<f32>, Vec<f32>)],
        keys: &[CacheView<'_>],
        values: &[CacheView<'_>],
        dtype: &str,
    ) {
        let kv_heads = 2;
        let scale = 0.3;
        let got = decode_attention(queries, heads, kv_heads, d, keys, values, scale);
        for h in 0..heads {
            for b in 0..2 {
                let g = h / 2;
                let q = &queries[(h * 2 + b) * d..][..d];
                let (k, v) = (&buffers[b].0[g * cap * d..], &buffers[b].1[g * cap * d..]);
                let s: Vec<f64> = (0..lens[b])
                    .map(|j| {
                        (0..d)
                            .map(|i| q[i] as f64 * k[j * d + i] as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let total: f64 = e.iter().sum();
                for i in 0..d {
                    let want: f64 = (0..lens[b])
                        .map(|j| e[j] / total * v[j * d + i] as f64)
                        .sum();
                    let have = got[(h * 2 + b) * d + i] as f64;
                    assert!(
                        (want - have).abs() < 1e-5,
                        "{dtype}: head {h} sequence {b} dim {i}"
                    );
                }
            }
        }
    }
}
