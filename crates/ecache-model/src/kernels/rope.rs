//! Rotate-half RoPE on plain slices, writing heads-first: one pass from a projection's
//! token-major output (`[batch, t, heads, d]`) to the `[batch, heads, t, d]` layout
//! attention reads. Written with burn operations it is two slices, a concatenation, two
//! products, a sum and a transposed copy (about 3 ms a projection at a llava-mid prefill,
//! docs/performance.md).

use rayon::prelude::*;

use super::cpu::PARALLEL_WORK;

/// The shape of a RoPE input: `[batch, t, heads, d]`.
#[derive(Debug, Clone, Copy)]
pub struct RopeShape {
    pub batch: usize,
    pub t: usize,
    pub heads: usize,
    pub d: usize,
}

/// `out[b, h, i, j] = x[b, i, h, j] * cos[b, i, j] + rot(x)[b, i, h, j] * sin[b, i, j]`,
/// where `rot` swaps the halves of a head (`rot(x)[j] = x[j + d/2]` below `d/2`, `x[j -
/// d/2]` from it) and `sin` carries the sign of the rotation (the first half negated).
/// The same products and sum, in the same order, as the burn operations it replaces.
///
/// # Shapes
/// - `x`: `[batch, t, heads, d]`; `cos`, `sin`: `[batch, t, d]`; `out`: `[batch, heads, t, d]`
pub fn rope(x: &[f32], cos: &[f32], sin: &[f32], shape: RopeShape, out: &mut [f32]) {
    let RopeShape { batch, t, heads, d } = shape;
    assert_eq!(x.len(), batch * t * heads * d, "x is [batch, t, heads, d]");
    assert_eq!(cos.len(), batch * t * d, "cos is [batch, t, d]");
    assert_eq!(sin.len(), cos.len(), "sin is [batch, t, d]");
    assert_eq!(out.len(), x.len(), "out is [batch, heads, t, d]");
    assert!(d % 2 == 0, "a head's width is even");
    if out.is_empty() {
        return;
    }
    let head = |(i, out): (usize, &mut [f32])| {
        let (b, h) = (i / heads, i % heads);
        for (row, out) in out.chunks_exact_mut(d).enumerate() {
            let token = b * t + row;
            let from = (token * heads + h) * d;
            let table = token * d..(token + 1) * d;
            rotate(&x[from..from + d], &cos[table.clone()], &sin[table], out);
        }
    };
    if out.len() < PARALLEL_WORK {
        out.chunks_mut(t * d).enumerate().for_each(head);
    } else {
        out.par_chunks_mut(t * d).enumerate().for_each(head);
    }
}

/// One head of one token.
#[allow(clippy::extra_unused_type_parameters)]
#[macerator::with_simd]
fn rotate<S: macerator::Simd>(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (c1, c2) = cos.split_at(half);
    let (s1, s2) = sin.split_at(half);
    let (o1, o2) = out.split_at_mut(half);
    for j in 0..half {
        o1[j] = x1[j] * c1[j] + x2[j] * s1[j];
        o2[j] = x2[j] * c2[j] + x1[j] * s2[j];
    }
}
