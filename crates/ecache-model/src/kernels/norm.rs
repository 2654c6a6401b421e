//! RMSNorm on plain slices, one pass over each row for its sum of squares and one to write
//! it scaled: burn's `RmsNorm` makes five passes over the whole tensor (a cast, a square, a
//! mean, a division and a product), each writing a tensor out.

use rayon::prelude::*;

use super::cpu::PARALLEL_WORK;

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * gamma` for every row `r` of `gamma.len()`
/// elements (burn's `RmsNorm` formula; the sum of squares is in f32, added in lanes).
///
/// # Shapes
/// - `x`, `out`: `[rows, d]` row-major; `gamma`: `[d]`
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32, out: &mut [f32]) {
    let d = gamma.len();
    assert!(d > 0, "rows have at least one element");
    assert_eq!(x.len() % d, 0, "x is [rows, d]");
    assert_eq!(x.len(), out.len(), "out has x's shape");
    if x.len() < PARALLEL_WORK {
        rows(x, gamma, eps, out);
        return;
    }
    // Tasks of whole rows, about 16 Ki elements each.
    let per_task = d * (16_384 / d).max(1);
    out.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .for_each(|(out, x)| rows(x, gamma, eps, out));
}

/// Rows of [`rms_norm`], compiled for the machine's widest SIMD level (`S` only selects the
/// target features: the loops are plain arithmetic, in lanes the compiler vectorises).
#[allow(clippy::extra_unused_type_parameters)]
#[macerator::with_simd]
fn rows<'a, S: macerator::Simd>(x: &'a [f32], gamma: &'a [f32], eps: f32, out: &'a mut [f32]) {
    const LANES: usize = 16;
    let d = gamma.len();
    for (x, out) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mut lanes = [0.0f32; LANES];
        let mut chunks = x.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (l, v) in lanes.iter_mut().zip(chunk) {
                *l += v * v;
            }
        }
        let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
        let squares = lanes.iter().sum::<f32>() + tail;
        let rms = (squares / d as f32 + eps).sqrt();
        for ((o, v), g) in out.iter_mut().zip(x).zip(gamma) {
            *o = v / rms * g;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::tests::numbers;

    /// Against the formula in f64, row by row; rows of several lengths (lanes and a tail),
    /// enough rows to run in parallel, and a zero row (only `eps` under the root).
    #[test]
    fn rms_norm_matches_the_formula_in_f64() {
        for (rows, d) in [(1, 7), (3, 64), (300, 1000), (5, 4096)] {
            let mut x = numbers(rows * d, 4);
            x[..d].fill(0.0);
            let gamma = numbers(d, 5);
            let eps = 1e-5;
            let mut out = vec![0.0; rows * d];
            rms_norm(&x, &gamma, eps, &mut out);
            for r in 0..rows {
                let row = &x[r * d..(r + 1) * d];
                let mean = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
                let rms = (mean + eps as f64).sqrt();
                for j in 0..d {
                    let want = row[j] as f64 / rms * gamma[j] as f64;
                    let got = out[r * d + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * want.abs().max(1e-3),
                        "[{rows} x {d}] row {r} column {j}: {got} against {want}"
                    );
                }
            }
        }
    }
}
