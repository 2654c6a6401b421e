//! Operations the decoder runs through its backend, each with a plain-burn fallback: the
//! way burn intends a backend to be extended with kernels of one's own. The model is
//! generic over [`KernelBackend`]; a backend with a faster kernel overrides the method,
//! every other backend gets the fallback.
//!
//! - [`KernelBackend::skinny_matmul`]: a product with few rows (a decode step's batch),
//!   streaming each weight once for all rows. On flex: [`flex`]; on CUDA and wgpu: `cube`
//!   (with the `cuda` or `wgpu` feature).
//! - [`KernelBackend::gemm`]: a product with many rows (a prefill's). On flex, f16 and bf16
//!   operands go through the f32 GEMM and are rounded once: [`flex`].
//! - [`KernelBackend::decode_attention`]: one query row per sequence over that sequence's own
//!   cache, every sequence and head in one pass. On flex: [`flex`].
//! - [`KernelBackend::swiglu`]: the MLP's `silu(gate) * up` in one pass. On flex:
//!   [`activation`].
//! - [`KernelBackend::rope`]: rotate-half RoPE written heads-first in one pass. On flex:
//!   [`rope`].
//! - [`KernelBackend::grouped_attention`]: attention without a mask, grouped-query heads
//!   read in place. On flex: the vendored crate's blocked kernel.
//! - [`KernelBackend::causal_attention_with_sums`]: a prompt's causal attention and the
//!   head-mean column sums of its probabilities (a scored policy's importance) in one
//!   pass. On flex: the vendored crate's blocked kernel.
//! - [`KernelBackend::rms_norm`]: RMSNorm a row at a time in one pass. On flex: [`norm`].
//! - [`KernelBackend::attention_matmul`]: attention's two products. On CUDA and wgpu, a
//!   product with a single row or column is [`matmul_by_reduction`].

pub mod activation;
pub mod cpu;
#[cfg(feature = "cube")]
pub mod cube;
pub mod decode_attention;
pub mod flex;
#[cfg(target_arch = "x86_64")]
mod half_avx512;
pub mod norm;
pub mod rope;

use burn::nn::{Linear, RmsNorm};
use burn::tensor::{DType, Tensor, activation::silu, backend::Backend};

/// A backend the model runs on, with the kernels it may override.
pub trait KernelBackend: Backend {
    /// The most rows for which [`KernelBackend::skinny_matmul`] is used with a `[k, n]`
    /// weight (0: never).
    fn skinny_rows(k: usize, n: usize) -> usize {
        let _ = (k, n);
        0
    }

    /// `x · w` for an `x` of few rows.
    ///
    /// # Shapes
    /// - `x`: `[m, k]`, `w`: `[k, n]` -> `[m, n]`
    fn skinny_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// `x · w` for an `x` of many rows (a prefill's linear layers). The fallback is burn's
    /// matmul in the tensors' own type; flex widens half-precision operands to f32 and
    /// rounds the product once, for its f32 GEMM is about twice as fast as its f16 one.
    ///
    /// # Shapes
    /// - `x`: `[m, k]`, `w`: `[k, n]` -> `[m, n]`
    fn gemm(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        x.matmul(w)
    }

    /// Attention of one query row per sequence over that sequence's keys and values, or
    /// `None` when the backend has no such kernel (or not for these dtypes and layouts):
    /// the caller then writes attention out per sequence. Query head `h` reads key/value
    /// head `h / (heads / kv_heads)`.
    ///
    /// # Shapes
    /// - `q`: `[1, heads, B, d]` (sequence `b`'s query in row `b`)
    /// - `keys[b]`, `values[b]`: `[1, kv_heads, len_b, d]`
    /// - returns `[1, heads, B, d]`
    fn decode_attention(
        q: &Tensor<Self, 4>,
        keys: &[Tensor<Self, 4>],
        values: &[Tensor<Self, 4>],
        scale: f64,
    ) -> Option<Tensor<Self, 4>> {
        let _ = (q, keys, values, scale);
        None
    }

    /// The gated MLP's activation, `silu(gate) * up` element by element.
    ///
    /// # Shapes
    /// - `gate`, `up`: `[batch, t, intermediate]` -> `[batch, t, intermediate]`
    fn swiglu(gate: Tensor<Self, 3>, up: Tensor<Self, 3>) -> Tensor<Self, 3> {
        silu(gate) * up
    }

    /// Rotate-half RoPE with the head axis moved before the token axis, or `None` when
    /// the backend has no such kernel (or not for these dtypes and layouts): the caller
    /// then rotates with burn operations. `sin` has the first half of each row negated.
    ///
    /// # Shapes
    /// - `x`: `[batch, t, heads, d]`; `cos`, `sin`: `[batch, t, 1, d]`
    /// - returns `[batch, heads, t, d]`
    fn rope(
        x: &Tensor<Self, 4>,
        cos: &Tensor<Self, 4>,
        sin: &Tensor<Self, 4>,
    ) -> Option<Tensor<Self, 4>> {
        let _ = (x, cos, sin);
        None
    }

    /// Attention without a mask, causal (the last query row sees every key) or over every
    /// key, with grouped-query heads read where they lie instead of repeated per query head;
    /// or `None` when the backend has no such kernel: the caller then repeats the heads and
    /// runs burn's `attention`.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, t, d]`; `keys`, `values`: `[batch, kv_heads, slots, d]` (query
    ///   head `i` reads key/value head `i / (heads / kv_heads)`)
    /// - returns `[batch, heads, t, d]`
    fn grouped_attention(
        q: &Tensor<Self, 4>,
        keys: &Tensor<Self, 4>,
        values: &Tensor<Self, 4>,
        causal: bool,
        scale: f64,
    ) -> Option<Tensor<Self, 4>> {
        let _ = (q, keys, values, causal, scale);
        None
    }

    /// Causal attention of a prompt over itself and the head-mean column sums of its
    /// probabilities (`sum_i mean_h p[b, h, i, j]`, what [`ecache_core::importance`]
    /// accumulates), or `None` when the backend has no such kernel (or not for these
    /// dtypes): the caller then writes attention out in blocks.
    ///
    /// # Shapes
    /// - `q`: `[batch, heads, t, d]`; `keys`, `values`: `[batch, kv_heads, t, d]` (query
    ///   head `i` reads key/value head `i / (heads / kv_heads)`)
    /// - returns `[batch, heads, t, d]` and `[batch, t]`
    fn causal_attention_with_sums(
        q: &Tensor<Self, 4>,
        keys: &Tensor<Self, 4>,
        values: &Tensor<Self, 4>,
        scale: f64,
    ) -> Option<(Tensor<Self, 4>, Tensor<Self, 2>)> {
        let _ = (q, keys, values, scale);
        None
    }

    /// RMSNorm of each row, `x / sqrt(mean(x^2) + eps) * gamma`, or `None` when the
    /// backend has no such kernel (or not for this dtype and layout): the caller then runs
    /// burn's `RmsNorm`.
    ///
    /// # Shapes
    /// - `x`: `[rows, d]`; `gamma`: `[d]` -> `[rows, d]`
    fn rms_norm(x: &Tensor<Self, 2>, gamma: &Tensor<Self, 1>, eps: f64) -> Option<Tensor<Self, 2>> {
        let _ = (x, gamma, eps);
        None
    }

    /// Attention's products, scores `q · kᵀ` and output `p · v`. The fallback is burn's
    /// matmul; CubeCL backends take [`matmul_by_reduction`] for a single query row.
    ///
    /// # Shapes
    /// - `a`: `[batch, groups, m, k]`, `b`: `[batch, groups, k, n]` -> `[batch, groups, m, n]`
    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        a.matmul(b)
    }
}

/// `a · b` where `a` has one row or `b` one column, as a broadcast multiply summed over the
/// inner axis (in f32, like a matmul's accumulator), and burn's matmul otherwise.
///
/// CubeCL backends use it because burn 0.21's matmul autotuner (cubecl 0.10) caches its
/// choice under a key that shapes of different validity share: a vector-matrix kernel that
/// needs the width to be a multiple of the plane size can win at one width and then be
/// launched at another, which panics and poisons the device. A decode step's attention
/// width grows by one each step, so every decode would sooner or later meet it. A reduction
/// has no such constraint, and at one row it reads the same bytes as the product.
///
/// # Shapes
/// - `a`: `[batch, groups, m, k]`, `b`: `[batch, groups, k, n]` -> `[batch, groups, m, n]`
pub fn matmul_by_reduction<B: Backend>(a: Tensor<B, 4>, b: Tensor<B, 4>) -> Tensor<B, 4> {
    let m = a.dims()[2];
    let n = b.dims()[3];
    let dtype = a.dtype();
    let wide = |t: Tensor<B, 4>| t.cast(DType::F32);
    if m == 1 {
        // [.., k, 1] * [.., k, n], summed over k.
        (wide(a.swap_dims(2, 3)) * wide(b)).sum_dim(2).cast(dtype)
    } else if n == 1 {
        // [.., m, k] * [.., 1, k], summed over k.
        (wide(a) * wide(b.swap_dims(2, 3))).sum_dim(3).cast(dtype)
    } else {
        a.matmul(b)
    }
}

impl KernelBackend for burn::backend::NdArray {}

// CUDA and wgpu (burn's `CubeBackend` behind its fusion layer): `cube`.

/// Training differentiates through the fallbacks.
impl<B: KernelBackend, C: burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy>
    KernelBackend for burn::backend::Autodiff<B, C>
{
}

/// A linear layer's forward, through [`KernelBackend::skinny_matmul`] when `x` has at most
/// [`KernelBackend::skinny_rows`] rows for this weight (all dimensions but the last), else
/// through [`KernelBackend::gemm`].
///
/// # Shapes
/// - `x`: `[..., in]` -> `[..., out]`
pub fn linear<B: KernelBackend, const D: usize>(
    layer: &Linear<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    let n = layer.weight.dims()[1];
    if rows == 0 {
        return layer.forward(x);
    }
    let weight = layer.weight.val();
    let x = x.reshape([rows, k]);
    let mut y = if rows > B::skinny_rows(k, n) {
        B::gemm(x, weight)
    } else {
        B::skinny_matmul(x, weight)
    };
    if let Some(bias) = &layer.bias {
        y = y + bias.val().unsqueeze_dim(0);
    }
    let mut out = dims;
    out[D - 1] = n;
    y.reshape(out)
}

/// An RMSNorm layer's forward, through [`KernelBackend::rms_norm`] where the backend has
/// it, else burn's own.
///
/// # Shapes
/// - `x`: `[..., d]` -> `[..., d]`
pub fn rms_norm<B: KernelBackend, const D: usize>(
    norm: &RmsNorm<B>,
    x: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = x.dims();
    let d = dims[D - 1];
    let rows: usize = dims[..D - 1].iter().product();
    match B::rms_norm(
        &x.clone().reshape([rows, d]),
        &norm.gamma.val(),
        norm.epsilon,
    ) {
        Some(y) => y.reshape(dims),
        None => norm.forward(x),
    }
}
