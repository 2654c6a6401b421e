//! CPU kernels on plain slices, SIMD through `macerator` (runtime dispatch between
//! AVX-512, AVX2, SSE, NEON and a scalar fallback), threads through `rayon`. The flex
//! backend feeds them its buffers ([`super::flex`]); tests hold them to naive loops.

use half::{bf16, f16};
use macerator::{Scalar, Simd, vload_unaligned, vstore_unaligned};
use rayon::prelude::*;

/// Multiply-adds below which a kernel runs on the calling thread alone.
pub const PARALLEL_WORK: usize = 1 << 18;

/// Values per block when a tensor is widened or rounded in parallel ([`in_blocks`]).
pub const CONVERT_BLOCK: usize = 1 << 16;

/// Fills `out` by `fill(offset, block)` over blocks of [`CONVERT_BLOCK`] values, in parallel.
/// An `out` of one block (a decode step's activations) is filled on the calling thread: there
/// a parallel loop costs more than the conversion it splits (and from outside rayon's pool, a
/// sleep and a wake-up of the caller).
pub fn in_blocks<T: Send>(out: &mut [T], fill: impl Fn(usize, &mut [T]) + Sync) {
    if out.len() <= CONVERT_BLOCK {
        fill(0, out);
    } else {
        out.par_chunks_mut(CONVERT_BLOCK)
            .enumerate()
            .for_each(|(i, dst)| fill(i * CONVERT_BLOCK, dst));
    }
}

/// Weights of a `[k, n]` matrix, row-major (`n` contiguous), in their stored type.
#[derive(Debug, Clone, Copy)]
pub enum Weights<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    Bf16(&'a [bf16]),
}

impl<'a> Weights<'a> {
    fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::Bf16(w) => w.len(),
        }
    }

    /// Asks the CPU to start loading elements `at..at + len` (a hint: no effect on results;
    /// nothing outside x86-64).
    #[inline(always)]
    fn prefetch(&self, at: usize, len: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let (ptr, bytes) = match self {
                Weights::F32(v) => (v[at..at + len].as_ptr().cast::<i8>(), len * 4),
                Weights::F16(v) => (v[at..at + len].as_ptr().cast::<i8>(), len * 2),
                Weights::Bf16(v) => (v[at..at + len].as_ptr().cast::<i8>(), len * 2),
            };
            let mut offset = 0;
            while offset < bytes {
                // SAFETY: a prefetch is a hint and never faults; the address lies in the slice.
                unsafe {
                    std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                        ptr.add(offset),
                    )
                };
                offset += 64;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (at, len);
    }

    /// Every element in f32, widened in parallel blocks ([`in_blocks`]) where stored in
    /// half precision (exact: every f16 and bf16 value is an f32 value).
    pub fn to_f32_vec(self) -> Vec<f32> {
        let fill = |at: usize, dst: &mut [f32]| match self {
            Weights::F32(v) => dst.copy_from_slice(&v[at..at + dst.len()]),
            Weights::F16(v) => widen::f16(&v[at..at + dst.len()], dst),
            Weights::Bf16(v) => widen::bf16(&v[at..at + dst.len()], dst),
        };
        let mut out = vec![0.0f32; self.len()];
        in_blocks(&mut out, fill);
        out
    }

    /// Elements `at..at + len` in f32: borrowed where stored in f32, else widened into
    /// `buffer` (at least `len` long).
    pub(super) fn f32_run<'b>(self, at: usize, len: usize, buffer: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Weights::F32(v) => &v[at..at + len],
            Weights::F16(v) => {
                widen::f16(&v[at..at + len], &mut buffer[..len]);
                &buffer[..len]
            }
            Weights::Bf16(v) => {
                widen::bf16(&v[at..at + len], &mut buffer[..len]);
                &buffer[..len]
            }
        }
    }
}

/// Columns of a tile: its weights (`UNROLL x COLUMNS` floats) stay in L1.
pub(super) const COLUMNS: usize = 256;

/// Weight rows of a tile: every accumulator is loaded and stored once per `UNROLL`
/// multiply-adds.
pub(super) const UNROLL: usize = 8;

/// Rows of `x` whose accumulators (two vectors each) stay in registers across a tile: eight
/// accumulators, two weight vectors and a broadcast fit AVX2's sixteen registers.
pub(super) const BLOCK_ROWS: usize = 4;

/// `out = x · w` for an `x` of few rows: every weight is read once for all rows, column
/// blocks run in parallel, and half-precision weights are widened to f32 a block at a time
/// (accumulation is in f32).
///
/// # Shapes
/// - `x`: `[m, k]` row-major; `w`: `[k, n]` row-major; `out`: `[m, n]` row-major
pub fn skinny_matmul(x: &[f32], m: usize, k: usize, w: Weights<'_>, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w.len(), k * n, "w is [k, n]");
    assert_eq!(out.len(), m * n, "out is [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    // Each task takes a range of weight rows, a contiguous stretch of memory read in order,
    // and sums its share of every output; the shares are added at the end.
    let tasks = if m * k * n < PARALLEL_WORK {
        1
    } else {
        rayon::current_num_threads().clamp(1, k.div_ceil(UNROLL).max(1))
    };
    let per_task = k.div_ceil(tasks).div_ceil(UNROLL) * UNROLL;
    let partials: Vec<Vec<f32>> = (0..tasks)
        .into_par_iter()
        .map(|t| {
            let (k0, k1) = ((t * per_task).min(k), ((t + 1) * per_task).min(k));
            let mut acc = vec![0.0f32; m * n];
            #[cfg(target_arch = "x86_64")]
            if !matches!(w, Weights::F32(_)) && super::half_avx512::available() {
                // SAFETY: AVX-512F is present; shapes are checked above.
                unsafe {
                    if matches!(w, Weights::Bf16(_)) {
                        super::half_avx512::rows_range::<true>(x, m, k, w, n, k0, k1, &mut acc)
                    } else {
                        super::half_avx512::rows_range::<false>(x, m, k, w, n, k0, k1, &mut acc)
                    }
                }
                return acc;
            }
            let mut scratch = vec![0.0f32; UNROLL * COLUMNS];
            rows_range(x, m, k, w, n, k0, k1, &mut acc, &mut scratch);
            acc
        })
        .collect();
    out.fill(0.0);
    for partial in partials {
        for (o, p) in out.iter_mut().zip(partial) {
            *o += p;
        }
    }
}

/// Tiles ahead of the one being folded whose weights are prefetched (half-precision
/// weights, which are widened a tile at a time): the hardware prefetcher alone left the
/// short rows of a decode's weights (4-11 KiB) waiting on memory. On llama-h1024x8's weights
/// at one row (`examples/decode_stream`): f16 16.2-17.0 -> 14.0-15.5 ms; one and two tiles
/// ahead measured alike. f32 weights at up to [`BLOCK_ROWS`] rows of `x` take whole-width
/// bands without hints, which measured faster (see [`rows_range`]); at more rows each tile
/// takes long enough for the hardware prefetcher, and hints cost time there (`[8 x 4096] x
/// [4096 x 11008]`: 7.99-8.47 ms with them, 6.49-6.85 without).
const PREFETCH_TILES: usize = 2;

/// Weight rows of a band at one row of `x` ([`band_one`]): sixteen broadcasts of `x` stay in
/// registers (AVX-512 has 32), and the row of accumulators is loaded and stored once per
/// sixteen rows of weights.
const BAND_ONE: usize = 16;

/// Starts loading the weights of the tile [`PREFETCH_TILES`] after tile `(kk, j0)` of a
/// task's rows `..k1` (tiles run along a block of `UNROLL` rows, then to the next block).
#[inline(always)]
pub(super) fn prefetch_ahead(w: &Weights<'_>, n: usize, k1: usize, kk: usize, j0: usize) {
    let (mut pk, mut pj) = (kk, j0);
    for _ in 0..PREFETCH_TILES {
        (pk, pj) = if pj + COLUMNS < n {
            (pk, pj + COLUMNS)
        } else {
            (pk + UNROLL, 0)
        };
    }
    if pk < k1 {
        let width = COLUMNS.min(n - pj);
        for r in pk..(pk + UNROLL).min(k1) {
            w.prefetch(r * n + pj, width);
        }
    }
}

/// Weight rows `k0..k1` of [`skinny_matmul`], folded into `acc` (`[m, n]`).
///
/// - f32 weights and up to [`BLOCK_ROWS`] rows of `x`: whole-width bands, every weight row
///   read once from end to end in sequential streams the hardware prefetcher follows, with
///   no hints and no tile set-up every `COLUMNS` columns ([`band_one`] at one row, where
///   [`BAND_ONE`] rows remain; else [`Tile::fold`] over `UNROLL` rows of the whole width).
/// - Otherwise tiles of `UNROLL` weight rows by `COLUMNS` columns, widened from half
///   precision into `scratch` and prefetched [`PREFETCH_TILES`] ahead when stored so, and
///   kept in L1 while every block of `BLOCK_ROWS` rows of `x` folds them.
///
/// Every path adds the same products in the same order (weight row by weight row into each
/// output), so each gives the same bits.
///
/// Whole-width bands against tiles, within one process, alternated round by round (Intel
/// Xeon model 207, 2 threads, six `[4096 x 11008]` f32 weights streamed, 1 GB, past the L3;
/// ms per weight, best of five rounds of eight): 2 rows 7.61-8.49 against 8.50-8.93 (faster
/// in 6 of 6), 3 rows 8.54-8.84 against 8.95-9.31 (5 of 5), 4 rows 8.09-8.69 against
/// 8.70-9.05 (6 of 6); 8 rows 12.50-14.32 against 11.99-12.93, slower, so two blocks of `x`
/// keep the tiles, whose weights stay in L1 between the blocks.
#[allow(clippy::too_many_arguments)]
#[macerator::with_simd]
fn rows_range<'a, S: Simd>(
    x: &'a [f32],
    m: usize,
    k: usize,
    w: Weights<'a>,
    n: usize,
    k0: usize,
    k1: usize,
    acc: &'a mut [f32],
    scratch: &'a mut [f32],
) {
    // f32 weights at up to `BLOCK_ROWS` rows of `x`: one tile of the whole width, unhinted.
    let (columns, prefetch) = match w {
        Weights::F32(_) if m <= BLOCK_ROWS => (n, false),
        Weights::F32(_) => (COLUMNS, false),
        _ => (COLUMNS, true),
    };
    let mut kk = k0;
    while kk < k1 {
        if let (Weights::F32(w), 1) = (w, m)
            && k1 - kk >= BAND_ONE
        {
            band_one::<S, BAND_ONE>(x, w, n, kk, k1, acc);
            kk += BAND_ONE;
            continue;
        }
        let rows = UNROLL.min(k1 - kk);
        let mut j0 = 0;
        while j0 < n {
            let width = columns.min(n - j0);
            if prefetch {
                prefetch_ahead(&w, n, k1, kk, j0);
            }
            let mut slices: [&[f32]; UNROLL] = [&[]; UNROLL];
            for (r, (slice, buffer)) in slices
                .iter_mut()
                .zip(scratch.chunks_mut(COLUMNS))
                .enumerate()
                .take(rows)
            {
                // f32 weights are borrowed, whatever the width; only half-precision ones,
                // which are never wider than `COLUMNS`, fill the buffer.
                *slice = w.f32_run((kk + r) * n + j0, width, buffer);
            }
            let tile = Tile {
                rows: &slices[..rows],
                k,
                n,
                kk,
                j0,
            };
            let mut i0 = 0;
            while i0 < m {
                let block = BLOCK_ROWS.min(m - i0);
                match block {
                    4 => tile.fold::<S, 4, 2>(acc, x, i0),
                    3 => tile.fold::<S, 3, 2>(acc, x, i0),
                    2 => tile.fold::<S, 2, 4>(acc, x, i0),
                    _ => tile.fold::<S, 1, 4>(acc, x, i0),
                }
                i0 += block;
            }
            j0 += width;
        }
        kk += rows;
    }
}

/// Weight rows `kk..kk + R` of `w` (`[k, n]`, f32) times one row of `x`, added into `acc`
/// (`[1, n]`) across every column, with the band's `R` values of `x` broadcast once: the
/// tiles' sums (each output adds the same products weight row by weight row, so the same
/// bits) in `R` sequential streams, without hints.
///
/// Whole-width bands against tiles, alternated across processes (Intel Xeon model 207,
/// 2 threads; medians): `[1 x 4096] x [4096 x 11008]` (`examples/skinny_rate`) 7.1 ms
/// against 7.7 and 6.5 against 7.5. Within one process, alternated round by round: bands
/// with the tiles' hints slower than without in 12 rounds of 12 (7.10-10.81 ms against
/// 6.52-6.98); and sixteen rows against eight, six `[4096 x 11008]` weights streamed (1 GB,
/// past the L3), 6.11-7.05 ms a weight against 6.25-7.47 (faster in 13 rounds of 14), and
/// two `[8192 x 11008]` weights 13.27-14.22 against 13.46-15.15 (5 of 6); twelve rows fell
/// between (docs/performance.md, seventh sitting).
#[inline(always)]
fn band_one<S: Simd, const R: usize>(
    x: &[f32],
    w: &[f32],
    n: usize,
    kk: usize,
    k1: usize,
    acc: &mut [f32],
) {
    const V: usize = 4;
    assert!(kk + R <= k1 && k1 * n <= w.len() && acc.len() >= n && x.len() >= k1);
    let rows: [&[f32]; R] = std::array::from_fn(|r| &w[(kk + r) * n..(kk + r + 1) * n]);
    let s: [_; R] = std::array::from_fn(|r| x[kk + r].splat::<S>());
    let lanes = f32::lanes::<S>();
    let step = V * lanes;
    let simd_len = n / step * step;
    let out = &mut acc[..n];
    let mut j = 0;
    while j < simd_len {
        // SAFETY: j + step <= simd_len <= n, the length of `out` and of every row.
        unsafe {
            let mut a: [_; V] =
                std::array::from_fn(|v| vload_unaligned::<S, f32>(out.as_ptr().add(j + v * lanes)));
            for (row, s) in rows.iter().zip(s) {
                for (v, a) in a.iter_mut().enumerate() {
                    *a = s.mul_add(
                        vload_unaligned::<S, f32>(row.as_ptr().add(j + v * lanes)),
                        *a,
                    );
                }
            }
            for (v, a) in a.iter().enumerate() {
                vstore_unaligned::<S, f32>(out.as_mut_ptr().add(j + v * lanes), *a);
            }
        }
        j += step;
    }
    for j in simd_len..n {
        let mut sum = out[j];
        for (r, row) in rows.iter().enumerate() {
            sum += x[kk + r] * row[j];
        }
        out[j] = sum;
    }
}

/// Weight rows `kk..kk + rows.len()`, columns `j0..j0 + rows[0].len()` of a `[k, n]`
/// product.
pub(super) struct Tile<'a> {
    pub(super) rows: &'a [&'a [f32]],
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) kk: usize,
    pub(super) j0: usize,
}

impl Tile<'_> {
    /// `acc[i] += sum_r x[i, kk + r] * rows[r]` for the `R` rows `i0..i0 + R`: `V` vectors
    /// of columns at a time, their `R x V` accumulators in registers across the tile's rows.
    #[inline(always)]
    pub(super) fn fold<S: Simd, const R: usize, const V: usize>(
        &self,
        acc: &mut [f32],
        x: &[f32],
        i0: usize,
    ) {
        let (k, n, kk, j0) = (self.k, self.n, self.kk, self.j0);
        let width = self.rows[0].len();
        assert!((i0 + R - 1) * n + j0 + width <= acc.len());
        assert!((i0 + R - 1) * k + kk + self.rows.len() <= x.len());
        assert!(self.rows.iter().all(|row| row.len() == width));
        let lanes = f32::lanes::<S>();
        let step = V * lanes;
        let simd_len = width / step * step;
        let mut j = 0;
        while j < simd_len {
            // SAFETY: the asserts above bound every index: j + step <= width, i < i0 + R,
            // r < rows.len().
            unsafe {
                let at = |i: usize, v: usize| acc.as_ptr().add((i0 + i) * n + j0 + j + v * lanes);
                let mut a: [[_; V]; R] = std::array::from_fn(|i| {
                    std::array::from_fn(|v| vload_unaligned::<S, f32>(at(i, v)))
                });
                for (r, row) in self.rows.iter().enumerate() {
                    let w: [_; V] = std::array::from_fn(|v| {
                        vload_unaligned::<S, f32>(row.as_ptr().add(j + v * lanes))
                    });
                    for (i, a) in a.iter_mut().enumerate() {
                        let s = x.get_unchecked((i0 + i) * k + kk + r).splat::<S>();
                        for v in 0..V {
                            a[v] = s.mul_add(w[v], a[v]);
                        }
                    }
                }
                for (i, a) in a.iter().enumerate() {
                    for (v, a) in a.iter().enumerate() {
                        vstore_unaligned::<S, f32>(at(i, v).cast_mut(), *a);
                    }
                }
            }
            j += step;
        }
        for i in i0..i0 + R {
            for j in simd_len..width {
                let mut sum = acc[i * n + j0 + j];
                for (r, row) in self.rows.iter().enumerate() {
                    sum += x[i * k + kk + r] * row[j];
                }
                acc[i * n + j0 + j] = sum;
            }
        }
    }
}

/// Output columns one task of [`skinny_matmul_t`] computes.
const COLUMNS_T: usize = 32;

/// Weight elements widened to f32 at a time by [`skinny_matmul_t`] (per column).
const CHUNK: usize = 512;

/// `out = x · w` with `w` stored transposed, as Hugging Face checkpoints store a linear
/// layer's weight (`[n, k]`: each output column's `k` weights contiguous): every weight is
/// read once, in memory order, for all rows; tasks take groups of output columns; each
/// computes four columns by up to four rows at a time in registers, half-precision weights
/// widened to f32 a chunk at a time. Used for a tied LM head (the embedding table seen
/// transposed); the loader stores linear layers row-major, for [`skinny_matmul`].
///
/// # Shapes
/// - `x`: `[m, k]` row-major; `w_t`: `[n, k]` row-major; `out`: `[m, n]` row-major
pub fn skinny_matmul_t(x: &[f32], m: usize, k: usize, w_t: Weights<'_>, n: usize, out: &mut [f32]) {
    assert_eq!(x.len(), m * k, "x is [m, k]");
    assert_eq!(w_t.len(), k * n, "w_t is [n, k]");
    assert_eq!(out.len(), m * n, "out is [m, n]");
    if m == 0 || n == 0 {
        return;
    }
    let min_len = if m * k * n < PARALLEL_WORK {
        usize::MAX
    } else {
        1
    };
    let columns: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLUMNS_T))
        .into_par_iter()
        .with_min_len(min_len)
        .map(|t| {
            let j0 = t * COLUMNS_T;
            let width = COLUMNS_T.min(n - j0);
            let mut acc = vec![0.0f32; width * m];
            columns_t(x, m, k, w_t, j0, width, &mut acc);
            (j0, acc)
        })
        .collect();
    for (j0, acc) in columns {
        let width = acc.len() / m;
        for c in 0..width {
            for i in 0..m {
                out[i * n + j0 + c] = acc[c * m + i];
            }
        }
    }
}

/// Columns `j0..j0 + width` of [`skinny_matmul_t`], column-major into `acc` (`[width, m]`).
#[macerator::with_simd]
fn columns_t<'a, S: Simd>(
    x: &'a [f32],
    m: usize,
    k: usize,
    w_t: Weights<'a>,
    j0: usize,
    width: usize,
    acc: &'a mut [f32],
) {
    let mut widened = [[0.0f32; CHUNK]; 4];
    let mut c = 0;
    while c < width {
        let cols = 4.min(width - c);
        let mut k0 = 0;
        while k0 < k {
            let len = CHUNK.min(k - k0);
            let mut w: [&[f32]; 4] = [&[]; 4];
            for (q, (slot, buffer)) in w.iter_mut().zip(widened.iter_mut()).enumerate().take(cols) {
                *slot = w_t.f32_run((j0 + c + q) * k + k0, len, buffer);
            }
            let mut i = 0;
            while i < m {
                let rows = 4.min(m - i);
                let mut xs: [&[f32]; 4] = [&[]; 4];
                for (r, slot) in xs.iter_mut().enumerate().take(rows) {
                    *slot = &x[(i + r) * k + k0..(i + r) * k + k0 + len];
                }
                let sums = dots::<S>(&xs[..rows], &w[..cols]);
                for q in 0..cols {
                    for r in 0..rows {
                        acc[(c + q) * m + i + r] += sums[r][q];
                    }
                }
                i += rows;
            }
            k0 += len;
        }
        c += cols;
    }
}

/// The dot products of up to four rows with up to four columns, all of one length.
#[inline(always)]
fn dots<S: Simd>(xs: &[&[f32]], ws: &[&[f32]]) -> [[f32; 4]; 4] {
    let lanes = f32::lanes::<S>();
    let len = xs[0].len();
    let simd_len = len / lanes * lanes;
    let zero = 0.0f32.splat::<S>();
    let mut acc = [[zero; 4]; 4];
    let mut j = 0;
    while j < simd_len {
        // SAFETY: j + lanes <= len, the length of every slice.
        unsafe {
            let w: [_; 4] = std::array::from_fn(|q| {
                if q < ws.len() {
                    vload_unaligned::<S, f32>(ws[q].as_ptr().add(j))
                } else {
                    zero
                }
            });
            for (r, x) in xs.iter().enumerate() {
                let v = vload_unaligned::<S, f32>(x.as_ptr().add(j));
                for q in 0..4 {
                    acc[r][q] = v.mul_add(w[q], acc[r][q]);
                }
            }
        }
        j += lanes;
    }
    let mut out = [[0.0f32; 4]; 4];
    for r in 0..xs.len() {
        for q in 0..ws.len() {
            let mut total = macerator::ReduceAdd::reduce_add(acc[r][q]);
            for t in simd_len..len {
                total += xs[r][t] * ws[q][t];
            }
            out[r][q] = total;
        }
    }
    out
}

/// Half-precision to f32, sixteen at a time with AVX-512 (`vcvtph2ps`, and a zero-extend
/// and shift for bf16), eight with AVX2 and F16C, else through `half` (which also uses
/// F16C when present, but calls a function per eight values).
mod widen {
    use half::{bf16, f16};

    pub fn f16(src: &[f16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature is present; lengths are equal.
                unsafe { x86::f16_avx512(src, dst) };
                return;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("f16c")
            {
                // SAFETY: as above.
                unsafe { x86::f16_f16c(src, dst) };
                return;
            }
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }

    pub fn bf16(src: &[bf16], dst: &mut [f32]) {
        assert_eq!(src.len(), dst.len());
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the feature is present; lengths are equal.
                unsafe { x86::bf16_avx512(src, dst) };
                return;
            }
        }
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, dst);
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use half::{bf16, f16};
        use std::arch::x86_64::*;

        /// # Safety
        /// AVX-512F must be present; `dst` as long as `src`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn f16_avx512(src: &[f16], dst: &mut [f32]) {
            let n = src.len() / 16 * 16;
            let mut i = 0;
            while i < n {
                // SAFETY: i + 16 <= len for both slices; unaligned loads and stores.
                unsafe {
                    let v = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                    _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(v));
                }
                i += 16;
            }
            for j in n..src.len() {
                dst[j] = src[j].to_f32();
            }
        }

        /// # Safety
        /// AVX2 and F16C must be present; `dst` as long as `src`.
        #[target_feature(enable = "avx2,f16c")]
        pub unsafe fn f16_f16c(src: &[f16], dst: &mut [f32]) {
            let n = src.len() / 8 * 8;
            let mut i = 0;
            while i < n {
                // SAFETY: i + 8 <= len for both slices; unaligned loads and stores.
                unsafe {
                    let v = _mm_loadu_si128(src.as_ptr().add(i).cast());
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), _mm256_cvtph_ps(v));
                }
                i += 8;
            }
            for j in n..src.len() {
                dst[j] = src[j].to_f32();
            }
        }

        /// # Safety
        /// AVX-512F must be present; `dst` as long as `src`.
        #[target_feature(enable = "avx512f")]
        pub unsafe fn bf16_avx512(src: &[bf16], dst: &mut [f32]) {
            let n = src.len() / 16 * 16;
            let mut i = 0;
            while i < n {
                // SAFETY: i + 16 <= len for both slices; unaligned loads and stores.
                unsafe {
                    let v = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                    let wide = _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v));
                    _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_castsi512_ps(wide));
                }
                i += 16;
            }
            for j in n..src.len() {
                dst[j] = src[j].to_f32();
            }
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(crate) fn numbers(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for kk in 0..k {
                for j in 0..n {
                    out[i * n + j] += x[i * k + kk] as f64 * w[kk * n + j] as f64;
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    /// Shapes with remainders everywhere: rows, the unrolled weight rows, column blocks and
    /// SIMD lanes; one to four rows of `x` (one row: whole bands for f32 weights) over full
    /// and short bands, on one task and on several (`1 x 300 x 1029` passes `PARALLEL_WORK`).
    #[test]
    fn skinny_matmul_matches_a_naive_product_in_every_weight_type() {
        for (m, k, n) in [
            (1, 1, 1),
            (1, 37, 1029),
            (1, 300, 1029),
            (2, 20, 300),
            (4, 17, 130),
            (3, 7, 5),
            (3, 40, 300),
            (8, 64, 300),
            (5, 130, 517),
            (16, 33, 1029),
        ] {
            let x = numbers(m * k, 1);
            let w = numbers(k * n, 2);
            let want = naive(&x, m, k, &w, n);
            let mut out = vec![0.0; m * n];
            skinny_matmul(&x, m, k, Weights::F32(&w), n, &mut out);
            let err = out
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-4, "f32 {m}x{k}x{n}: {err}");
            // Half weights: the same product of the rounded weights.
            let w16: Vec<f16> = w.iter().map(|&v| f16::from_f32(v)).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let rounded16: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let roundedb: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            for (weights, rounded, name) in [
                (Weights::F16(&w16), &rounded16, "f16"),
                (Weights::Bf16(&wb), &roundedb, "bf16"),
            ] {
                let want = naive(&x, m, k, rounded, n);
                skinny_matmul(&x, m, k, weights, n, &mut out);
                let err = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-4, "{name} {m}x{k}x{n}: {err}");
                // Every path (whole-width bands, tiles, the half-precision tiles) adds the
                // same products in the same order: the rounded weights stored as f32 give
                // the same bits.
                let mut as_f32 = vec![0.0; m * n];
                skinny_matmul(&x, m, k, Weights::F32(rounded), n, &mut as_f32);
                let differ = out
                    .iter()
                    .zip(&as_f32)
                    .filter(|(a, b)| a.to_bits() != b.to_bits());
                assert_eq!(differ.count(), 0, "{name} against f32, {m}x{k}x{n}");
            }
        }
    }

    /// Each block gets its own offset, on one block and on several with a short last one;
    /// `to_f32_vec` over several blocks widens every element in place.
    #[test]
    fn in_blocks_hands_each_block_its_offset() {
        for len in [10, CONVERT_BLOCK, 3 * CONVERT_BLOCK + 7] {
            let mut out = vec![usize::MAX; len];
            in_blocks(&mut out, |at, dst| {
                for (i, o) in dst.iter_mut().enumerate() {
                    *o = at + i;
                }
            });
            assert!(out.iter().enumerate().all(|(i, &o)| o == i), "len {len}");
        }
        let values: Vec<f16> = (0..2 * CONVERT_BLOCK + 3)
            .map(|i| f16::from_f32((i % 2048) as f32))
            .collect();
        let wide = Weights::F16(&values).to_f32_vec();
        assert!(
            wide.iter()
                .enumerate()
                .all(|(i, &v)| v == (i % 2048) as f32)
        );
    }

    /// Widening is exact, every path and every length (tails included).
    #[test]
    fn widening_half_precision_is_exact() {
        // Every bit pattern (NaNs stay NaN), at lengths around the vector widths.
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let same = |o: f32, x: f32| (o.is_nan() && x.is_nan()) || o.to_bits() == x.to_bits();
        for len in [0, 1, 7, 8, 15, 16, 17, 100, all.len()] {
            let h: Vec<f16> = all[..len].iter().map(|&b| f16::from_bits(b)).collect();
            let b: Vec<bf16> = all[..len].iter().map(|&b| bf16::from_bits(b)).collect();
            let mut out = vec![0.0; len];
            widen::f16(&h, &mut out);
            assert!(
                out.iter().zip(&h).all(|(o, x)| same(*o, x.to_f32())),
                "f16 {len}"
            );
            widen::bf16(&b, &mut out);
            assert!(
                out.iter().zip(&b).all(|(o, x)| same(*o, x.to_f32())),
                "bf16 {len}"
            );
        }
    }

    /// The transposed layout gives the same product.
    #[test]
    fn skinny_matmul_t_matches_a_naive_product_in_every_weight_type() {
        for (m, k, n) in [
            (1, 1, 1),
            (3, 7, 5),
            (3, 40, 300),
            (8, 64, 300),
            (5, 1030, 37),
            (16, 33, 1029),
        ] {
            let x = numbers(m * k, 4);
            let w = numbers(k * n, 5);
            let mut w_t = vec![0.0; k * n];
            for kk in 0..k {
                for j in 0..n {
                    w_t[j * k + kk] = w[kk * n + j];
                }
            }
            let mut out = vec![0.0; m * n];
            let rounded = |f: fn(f32) -> f32| w.iter().map(|&v| f(v)).collect::<Vec<_>>();
            let t16: Vec<f16> = w_t.iter().map(|&v| f16::from_f32(v)).collect();
            let tb: Vec<bf16> = w_t.iter().map(|&v| bf16::from_f32(v)).collect();
            for (weights, plain, name) in [
                (Weights::F32(&w_t), w.clone(), "f32"),
                (
                    Weights::F16(&t16),
                    rounded(|v| f16::from_f32(v).to_f32()),
                    "f16",
                ),
                (
                    Weights::Bf16(&tb),
                    rounded(|v| bf16::from_f32(v).to_f32()),
                    "bf16",
                ),
            ] {
                let want = naive(&x, m, k, &plain, n);
                skinny_matmul_t(&x, m, k, weights, n, &mut out);
                let err = out
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f32::max);
                assert!(err < 1e-4, "{name} {m}x{k}x{n}: {err}");
            }
        }
    }
}
