//! The skinny product's tiles over half-precision weights on AVX-512: each weight vector is
//! converted to f32 in registers as it is loaded (`vcvtph2ps` for f16, a zero-extension and
//! shift for bf16) instead of being widened into a buffer and read back. The products and
//! their order are those of [`super::cpu`]'s widening path, so results are bit-identical
//! (`tests::converting_in_registers_matches_widening_first`).

use std::arch::x86_64::*;

use super::cpu::{BLOCK_ROWS, COLUMNS, UNROLL, Weights, prefetch_ahead};

/// Whether this CPU runs [`rows_range`].
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Weight rows `k0..k1` of `w` (`[k, n]`, f16 or bf16 bits) folded into `acc` (`[m, n]`):
/// tiles of `UNROLL` rows by `COLUMNS` columns, `BLOCK_ROWS` rows of `x` at a time, as
/// `cpu::rows_range` does. The walk is written out in both rather than shared through a
/// closure: a closure inside `cpu::rows_range` is not compiled with the SIMD level macerator
/// selects for its body, and the f32 product ran about 4x slower that way (measured with
/// `examples/decode_stream`).
///
/// # Safety
/// AVX-512F must be present ([`available`]); `x` is `[m, k]`, `w` `[k, n]`, `acc` `[m, n]`,
/// and `k0 <= k1 <= k`.
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn rows_range<const BF16: bool>(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights<'_>,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &mut [f32],
) {
    let bits: &[u16] = match w {
        // SAFETY: f16 and bf16 are 16-bit values with u16's layout.
        Weights::F16(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) },
        Weights::Bf16(v) => unsafe { std::slice::from_raw_parts(v.as_ptr().cast(), v.len()) },
        Weights::F32(_) => unreachable!("f32 weights take the generic path"),
    };
    assert!(x.len() >= m * k && bits.len() >= k * n && acc.len() >= m * n && k1 <= k);
    let mut kk = k0;
    while kk < k1 {
        let rows = UNROLL.min(k1 - kk);
        let mut j0 = 0;
        while j0 < n {
            let width = COLUMNS.min(n - j0);
            prefetch_ahead(&w, n, k1, kk, j0);
            let tile = Tile {
                w: bits,
                n,
                k,
                kk,
                rows,
                j0,
                width,
            };
            let mut i0 = 0;
            while i0 < m {
                let block = BLOCK_ROWS.min(m - i0);
                // SAFETY: AVX-512F is present (this function's contract); the assert above
                // bounds every index the tile reads and writes.
                unsafe {
                    match block {
                        4 => tile.fold::<BF16, 4, 2>(acc, x, i0),
                        3 => tile.fold::<BF16, 3, 2>(acc, x, i0),
                        2 => tile.fold::<BF16, 2, 4>(acc, x, i0),
                        _ => tile.fold::<BF16, 1, 4>(acc, x, i0),
                    }
                }
                i0 += block;
            }
            j0 += width;
        }
        kk += rows;
    }
}

/// Sixteen half-precision values at `p` as f32.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<const BF16: bool>(p: *const u16) -> __m512 {
    // SAFETY: the caller guarantees 16 readable values at `p`.
    let v = unsafe { _mm256_loadu_si256(p.cast()) };
    if BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    } else {
        _mm512_cvtph_ps(v)
    }
}

fn to_f32<const BF16: bool>(bits: u16) -> f32 {
    if BF16 {
        half::bf16::from_bits(bits).to_f32()
    } else {
        half::f16::from_bits(bits).to_f32()
    }
}

/// Weight rows `kk..kk + rows`, columns `j0..j0 + width` of a `[k, n]` product.
struct Tile<'a> {
    w: &'a [u16],
    n: usize,
    k: usize,
    kk: usize,
    rows: usize,
    j0: usize,
    width: usize,
}

impl Tile<'_> {
    /// `acc[i] += sum_r x[i, kk + r] * w[kk + r]` over the tile, for rows `i0..i0 + R`, `V`
    /// vectors of sixteen columns at a time (as `cpu`'s fold steps, so that the columns left
    /// to the scalar tail are the same).
    ///
    /// # Safety
    /// AVX-512F must be present; the tile and rows `i0..i0 + R` lie inside `acc`, `x`, `w`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn fold<const BF16: bool, const R: usize, const V: usize>(
        &self,
        acc: &mut [f32],
        x: &[f32],
        i0: usize,
    ) {
        let Tile {
            w,
            n,
            k,
            kk,
            rows,
            j0,
            width,
        } = *self;
        let step = V * 16;
        let simd_len = width / step * step;
        let mut j = 0;
        while j < simd_len {
            // SAFETY: j + step <= width; rows and columns inside the tile (caller).
            unsafe {
                let at = |i: usize, v: usize| (i0 + i) * n + j0 + j + v * 16;
                let mut a = [[_mm512_setzero_ps(); V]; R];
                for (i, a) in a.iter_mut().enumerate() {
                    for (v, a) in a.iter_mut().enumerate() {
                        *a = _mm512_loadu_ps(acc.as_ptr().add(at(i, v)));
                    }
                }
                for r in 0..rows {
                    let row = w.as_ptr().add((kk + r) * n + j0 + j);
                    let mut wv = [_mm512_setzero_ps(); V];
                    for (v, wv) in wv.iter_mut().enumerate() {
                        *wv = load16::<BF16>(row.add(v * 16));
                    }
                    for (i, a) in a.iter_mut().enumerate() {
                        let s = _mm512_set1_ps(*x.get_unchecked((i0 + i) * k + kk + r));
                        for v in 0..V {
                            a[v] = _mm512_fmadd_ps(s, wv[v], a[v]);
                        }
                    }
                }
                for (i, a) in a.iter().enumerate() {
                    for (v, a) in a.iter().enumerate() {
                        _mm512_storeu_ps(acc.as_mut_ptr().add(at(i, v)), *a);
                    }
                }
            }
            j += step;
        }
        for i in i0..i0 + R {
            for j in simd_len..width {
                let mut sum = acc[i * n + j0 + j];
                for r in 0..rows {
                    sum += x[i * k + kk + r] * to_f32::<BF16>(w[(kk + r) * n + j0 + j]);
                }
                acc[i * n + j0 + j] = sum;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use half::{bf16, f16};

    use super::super::cpu::{Weights, skinny_matmul, tests::numbers};

    /// Half-precision weights converted in registers give the bits of the same weights
    /// widened to f32 first and multiplied by the f32 path: both add the same products in
    /// the same order. Shapes cross every edge: rows of `x` past a block, weight rows past
    /// an unrolled tile and a task, columns past a tile and a vector step.
    #[test]
    fn converting_in_registers_matches_widening_first() {
        if !super::available() {
            return;
        }
        for (m, k, n) in [(1, 8, 64), (3, 37, 300), (5, 1030, 1100), (9, 2049, 333)] {
            let x = numbers(m * k, 1);
            let w = numbers(k * n, 2);
            let f16s: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let bf16s: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let product = |w: Weights<'_>| {
                let mut out = vec![0.0; m * n];
                skinny_matmul(&x, m, k, w, n, &mut out);
                out
            };
            let widened: Vec<f32> = f16s.iter().map(|v| v.to_f32()).collect();
            let bits = |v: Vec<f32>| v.into_iter().map(f32::to_bits).collect::<Vec<_>>();
            assert_eq!(
                bits(product(Weights::F16(&f16s))),
                bits(product(Weights::F32(&widened))),
                "f16 [{m} x {k}] x [{k} x {n}]"
            );
            let widened: Vec<f32> = bf16s.iter().map(|v| v.to_f32()).collect();
            assert_eq!(
                bits(product(Weights::Bf16(&bf16s))),
                bits(product(Weights::F32(&widened))),
                "bf16 [{m} x {k}] x [{k} x {n}]"
            );
        }
    }
}
