//! The MLP's element-wise step on plain slices: SwiGLU (`silu(gate) * up`) in one pass,
//! with an exponential written so that the compiler vectorises it. flex computes SiLU one
//! `expf` call at a time on one thread and multiplies in a second pass; at a llava-mid
//! prefill that was about 9 ms a layer (docs/performance.md, "Prefill: where the rest
//! goes").

use rayon::prelude::*;

use super::cpu::PARALLEL_WORK;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `out[i] = silu(gate[i]) * up[i]`, where `silu(x) = x / (1 + exp(-x))`.
///
/// # Shapes
/// - `gate`, `up`, `out`: the same length
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert_eq!(gate.len(), out.len(), "out has the inputs' length");
    // Only a gate another handle still holds comes here (the model's own runs in place):
    // one copy, then the one kernel.
    out.copy_from_slice(gate);
    swiglu_in_place(out, up);
}

/// [`swiglu`] with the result written over `gate`.
///
/// # Shapes
/// - `gate`, `up`: the same length
pub fn swiglu_in_place(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "gate and up have one length");
    if gate.len() < PARALLEL_WORK {
        swiglu_in_place_run(gate, up);
        return;
    }
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks(CHUNK))
        .for_each(|(gate, up)| swiglu_in_place_run(gate, up));
}

/// One run of [`swiglu_in_place`], compiled for the machine's widest SIMD level; the loop
/// is plain arithmetic, which the compiler vectorises at that width (`S` is unused in the
/// body: it only selects the target features the body is compiled with).
#[allow(clippy::extra_unused_type_parameters)]
#[macerator::with_simd]
fn swiglu_in_place_run<S: macerator::Simd>(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + exp(-*g)) * u;
    }
}

/// `e^x` in f32 within 2 ulp over the whole range (Cephes' `expf` reduction and
/// polynomial): `x = n ln 2 + r` with `|r| <= ln 2 / 2`, `e^r` by a degree-6 polynomial,
/// `2^n` put into the exponent bits. Past the range: 0 for `x < -87.3` (where `e^x` is
/// subnormal), about `3.3e38` for `x > 88.7` (not infinity); NaN stays NaN. Branch-free,
/// so a loop of it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so that `n * LN2_HI` is exact for the `n` in range.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let input = x;
    let x = x.clamp(-87.3, 88.7);
    // The rounded value sits in the low mantissa bits of `shifted`: `n` as an integer
    // without a float-to-int conversion (Rust's `as` saturates and maps NaN to 0, which
    // compiles to scalar code per lane and kept the loop from vectorising).
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // `n` is in -126..=128 here; 2^128 is split in two so that no exponent overflows.
    let n = n_int;
    let half = n >> 1;
    let scale = |e: i32| f32::from_bits(((e + 127) as u32) << 23);
    let y = er * scale(half) * scale(n - half);
    // Below the range the result would be subnormal or 0: flushed to 0 (a select, not a
    // branch).
    if input < -87.3 { 0.0 } else { y }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Units in the last place between `got` and the exact `want` (f64).
    fn ulps(got: f32, want: f64) -> f64 {
        let want32 = want as f32;
        let ulp = (f32::from_bits(want32.to_bits() + 1) - want32) as f64;
        (got as f64 - want).abs() / ulp
    }

    /// Within 2 ulp of f64's `exp` on a dense grid of the whole range; 0 below it (as
    /// `e^-inf`), finite above it.
    #[test]
    fn exp_is_within_two_ulp_of_f64() {
        let mut worst = (0.0, 0.0f32);
        let mut x = -87.0f32;
        while x < 88.5 {
            let e = ulps(exp(x), (x as f64).exp());
            if e > worst.0 {
                worst = (e, x);
            }
            x += 0.000_731;
        }
        assert!(worst.0 <= 2.0, "{} ulp at x = {}", worst.0, worst.1);
        assert_eq!(exp(0.0), 1.0);
        for x in [f32::NEG_INFINITY, -1e30, -200.0, -88.0] {
            assert_eq!(exp(x), 0.0, "exp({x})");
        }
        for x in [89.0, 200.0, f32::INFINITY] {
            let e = exp(x);
            assert!(e.is_finite() && e > 3e38, "exp({x}) = {e}");
        }
        assert!(exp(f32::NAN).is_nan());
    }

    /// SwiGLU against `x / (1 + e^-x) * u` in f64, across the parallel split and the
    /// sequential path, with gates where SiLU saturates.
    #[test]
    fn swiglu_equals_silu_times_up() {
        for n in [1, 37, PARALLEL_WORK + 12_345] {
            let gate: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 2001) as f32 / 10.0 - 100.0)
                .collect();
            let up: Vec<f32> = (0..n).map(|i| ((i * 31) % 17) as f32 - 8.5).collect();
            let mut out = vec![f32::NAN; n];
            swiglu(&gate, &up, &mut out);
            for i in 0..n {
                let (g, u) = (gate[i] as f64, up[i] as f64);
                let want = g / (1.0 + (-g).exp()) * u;
                let diff = (out[i] as f64 - want).abs();
                assert!(
                    diff <= 1e-6 * want.abs().max(1e-3),
                    "element {i} of {n}: silu({g}) * {u} = {want}, got {}",
                    out[i]
                );
            }
        }
    }
}
