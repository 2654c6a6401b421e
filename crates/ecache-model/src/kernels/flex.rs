//! The flex backend's kernels: its buffers handed to [`super::cpu`].

use burn::backend::Flex;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_flex::FlexTensor;
use half::{bf16, f16};

use super::cpu::{self, Weights};
use super::decode_attention::{self, CacheView};
use super::rope::{self, RopeShape};
use super::{KernelBackend, activation, norm};

/// Rows up to which the skinny product is used. In isolation it beats flex's GEMM up to 64
/// rows on a 4096 x 11008 weight and up to about 24 on 1024 x 2816 (`cargo run --release
/// -p ecache-model --example skinny_rate [k n]`); inside a decode step it wins further (a
/// 32-sequence step at 1024 wide: 138 ms through it, 248 through GEMM; `step_cost`).
pub const SKINNY_ROWS: usize = 64;

/// Weights below which flex's GEMM stays: a matrix that fits in cache is not read from
/// memory at every step, and GEMM's microkernels compute faster than the skinny product's
/// (the demo model's 256 x 688 projections: 2.9 against 3.6 ms for a 16-sequence step).
pub const SKINNY_MIN_WEIGHTS: usize = 1 << 20;

impl KernelBackend for Flex {
    fn skinny_rows(k: usize, n: usize) -> usize {
        if k * n < SKINNY_MIN_WEIGHTS {
            0
        } else {
            SKINNY_ROWS
        }
    }

    fn skinny_matmul(x: Tensor<Flex, 2>, w: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let [m, k] = x.dims();
        let n = w.dims()[1];
        let dtype = x.dtype();
        let weights = w.clone().into_primitive().tensor();
        let Some((stored, transposed)) = weight_slice(&weights, k, n) else {
            return x.matmul(w);
        };
        let rows: Vec<f32> = x
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("converted to f32");
        let mut out = vec![0.0f32; m * n];
        if transposed {
            cpu::skinny_matmul_t(&rows, m, k, stored, n, &mut out);
        } else {
            cpu::skinny_matmul(&rows, m, k, stored, n, &mut out);
        }
        let device = Default::default();
        Tensor::<Flex, 2>::from_data(TensorData::new(out, [m, n]), &device).cast(dtype)
    }

    fn gemm(x: Tensor<Flex, 2>, w: Tensor<Flex, 2>) -> Tensor<Flex, 2> {
        let dtype = x.dtype();
        if !matches!(dtype, DType::F16 | DType::BF16) || w.dtype() != dtype {
            return x.matmul(w);
        }
        let [m, k] = x.dims();
        let n = w.dims()[1];
        let (xp, wp) = (primitive(&x), primitive(&w));
        let (Some(xs), Some((ws, transposed))) = (as_f32(&xp), weight_slice(&wp, k, n)) else {
            return x.matmul(w);
        };
        let device = Default::default();
        let wide_x =
            Tensor::<Flex, 2>::from_data(TensorData::new(xs.into_owned(), [m, k]), &device);
        // A transposed weight is stored as `[n, k]`.
        let stored = if transposed { [n, k] } else { [k, n] };
        let wide_w =
            Tensor::<Flex, 2>::from_data(TensorData::new(ws.to_f32_vec(), stored), &device);
        let wide_w = if transposed {
            wide_w.transpose()
        } else {
            wide_w
        };
        let y = primitive(&wide_x.matmul(wide_w));
        let ys = contiguous_f32(&y).expect("a fresh f32 product is contiguous");
        rounded_from(ys, vec![m, n], dtype)
    }

    fn decode_attention(
        q: &Tensor<Flex, 4>,
        keys: &[Tensor<Flex, 4>],
        values: &[Tensor<Flex, 4>],
        scale: f64,
    ) -> Option<Tensor<Flex, 4>> {
        let [_, heads, batch, d] = q.dims();
        let dtype = q.dtype();
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
            || keys.len() != batch
            || values.len() != batch
            || keys.iter().chain(values).any(|t| t.dtype() != dtype)
        {
            return None;
        }
        let kv_heads = keys.first()?.dims()[1];
        let key_bufs: Vec<FlexTensor> = keys.iter().map(primitive).collect();
        let value_bufs: Vec<FlexTensor> = values.iter().map(primitive).collect();
        let key_views = key_bufs
            .iter()
            .map(|t| view(t, kv_heads, d))
            .collect::<Option<Vec<_>>>()?;
        let value_views = value_bufs
            .iter()
            .map(|t| view(t, kv_heads, d))
            .collect::<Option<Vec<_>>>()?;
        // In f32 whatever the model's type: a query row is small, the cache is read as stored.
        let queries: Vec<f32> = q.clone().cast(DType::F32).into_data().into_vec().ok()?;
        let out = decode_attention::decode_attention(
            &queries,
            heads,
            kv_heads,
            d,
            &key_views,
            &value_views,
            scale as f32,
        );
        let device = Default::default();
        Some(
            Tensor::<Flex, 4>::from_data(TensorData::new(out, [1, heads, batch, d]), &device)
                .cast(dtype),
        )
    }

    fn grouped_attention(
        q: &Tensor<Flex, 4>,
        keys: &Tensor<Flex, 4>,
        values: &Tensor<Flex, 4>,
        causal: bool,
        scale: f64,
    ) -> Option<Tensor<Flex, 4>> {
        let [batch, heads, _, d] = q.dims();
        let [kv_batch, kv_heads, slots, kv_d] = keys.dims();
        if kv_heads == 0
            || heads % kv_heads != 0
            || [kv_batch, kv_d] != [batch, d]
            || values.dims() != [batch, kv_heads, slots, d]
            || keys.dtype() != q.dtype()
            || values.dtype() != q.dtype()
        {
            return None;
        }
        let options = burn::tensor::ops::AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: causal,
        };
        let out = burn_flex::ops::attention::attention_blocked(
            primitive(q),
            primitive(keys),
            primitive(values),
            options,
        );
        Some(Tensor::from_primitive(TensorPrimitive::Float(out)))
    }

    fn causal_attention_with_sums(
        q: &Tensor<Flex, 4>,
        keys: &Tensor<Flex, 4>,
        values: &Tensor<Flex, 4>,
        scale: f64,
    ) -> Option<(Tensor<Flex, 4>, Tensor<Flex, 2>)> {
        let [batch, heads, t, _] = q.dims();
        let kv_heads = keys.dims()[1];
        // Other dtypes: the vendored kernel answers `None`.
        if kv_heads == 0
            || heads % kv_heads != 0
            || keys.dims()[..3] != [batch, kv_heads, t]
            || values.dims()[..3] != [batch, kv_heads, t]
        {
            return None;
        }
        // Grouped-query heads are read in place by the vendored kernel.
        let options = burn::tensor::ops::AttentionModuleOptions {
            scale: Some(scale),
            softcap: None,
            is_causal: true,
        };
        let (out, sums) = burn_flex::ops::attention::attention_blocked_column_sums(
            primitive(q),
            primitive(keys),
            primitive(values),
            options,
        )?;
        // Per-head sums, [batch, heads, t] -> their mean over heads, [batch, t].
        let sums = Tensor::<Flex, 3>::from_data(
            TensorData::new(sums, [batch, heads, t]),
            &Default::default(),
        );
        Some((
            Tensor::from_primitive(TensorPrimitive::Float(out)),
            sums.mean_dim(1).reshape([batch, t]),
        ))
    }

    fn rms_norm(x: &Tensor<Flex, 2>, gamma: &Tensor<Flex, 1>, eps: f64) -> Option<Tensor<Flex, 2>> {
        let (xp, gp) = (primitive(x), primitive(gamma));
        let (xs, gs) = (as_f32(&xp)?, as_f32(&gp)?);
        let mut out = vec![0.0f32; xs.len()];
        norm::rms_norm(&xs, &gs, eps as f32, &mut out);
        Some(from_f32(out, x.dims().to_vec(), x.dtype()))
    }

    fn swiglu(gate: Tensor<Flex, 3>, up: Tensor<Flex, 3>) -> Tensor<Flex, 3> {
        let u = primitive(&up);
        if matches!(up.dtype(), DType::F16 | DType::BF16) {
            // Half precision: in f32 and back, one rounding at the end.
            let g = primitive(&gate);
            if let (Some(gs), Some(us)) = (as_f32(&g), as_f32(&u))
                && gs.len() == us.len()
                && gate.dtype() == up.dtype()
            {
                let mut out = vec![0.0f32; gs.len()];
                activation::swiglu(&gs, &us, &mut out);
                return from_f32(out, up.dims().to_vec(), up.dtype());
            }
        }
        let Some(us) = contiguous_f32(&u) else {
            return burn::tensor::activation::silu(gate) * up;
        };
        // In place in the gate's buffer when nothing else holds it (a projection's fresh
        // output): no new buffer to zero and write.
        let mut g = gate.into_primitive().tensor();
        if g.is_unique() && contiguous_f32(&g).is_some_and(|gs| gs.len() == us.len()) {
            let start = g.layout().start_offset();
            let n = us.len();
            activation::swiglu_in_place(&mut g.storage_mut::<f32>()[start..start + n], us);
            return Tensor::from_primitive(TensorPrimitive::Float(g));
        }
        let Some(gs) = contiguous_f32(&g).filter(|gs| gs.len() == us.len()) else {
            let gate = Tensor::from_primitive(TensorPrimitive::Float(g));
            return burn::tensor::activation::silu(gate) * up;
        };
        let mut out = vec![0.0f32; gs.len()];
        activation::swiglu(gs, us, &mut out);
        Tensor::from_data(
            TensorData::new(out, u.layout().shape().clone()),
            &Default::default(),
        )
    }

    fn rope(
        x: &Tensor<Flex, 4>,
        cos: &Tensor<Flex, 4>,
        sin: &Tensor<Flex, 4>,
    ) -> Option<Tensor<Flex, 4>> {
        let [batch, t, heads, d] = x.dims();
        if cos.dims() != [batch, t, 1, d] || sin.dims() != [batch, t, 1, d] {
            return None;
        }
        let (xt, ct, st) = (primitive(x), primitive(cos), primitive(sin));
        let (xs, cs, ss) = (as_f32(&xt)?, as_f32(&ct)?, as_f32(&st)?);
        let mut out = vec![0.0f32; xs.len()];
        rope::rope(&xs, &cs, &ss, RopeShape { batch, t, heads, d }, &mut out);
        Some(from_f32(out, vec![batch, heads, t, d], x.dtype()))
    }
}

/// The elements of a contiguous f32, f16 or bf16 tensor in f32: borrowed when stored in f32,
/// else widened (a decode step's activations are a few thousand elements).
fn as_f32(t: &FlexTensor) -> Option<std::borrow::Cow<'_, [f32]>> {
    let range = contiguous_range(t)?;
    Some(match t.dtype() {
        DType::F32 => std::borrow::Cow::Borrowed(t.storage::<f32>().get(range)?),
        DType::F16 => {
            std::borrow::Cow::Owned(Weights::F16(t.storage::<f16>().get(range)?).to_f32_vec())
        }
        DType::BF16 => {
            std::borrow::Cow::Owned(Weights::Bf16(t.storage::<bf16>().get(range)?).to_f32_vec())
        }
        _ => return None,
    })
}

/// A tensor of `shape` in `dtype` (f32, f16 or bf16) from f32 values, rounded once.
fn from_f32<const D: usize>(values: Vec<f32>, shape: Vec<usize>, dtype: DType) -> Tensor<Flex, D> {
    match dtype {
        DType::F16 | DType::BF16 => rounded_from(&values, shape, dtype),
        _ => Tensor::from_data(TensorData::new(values, shape), &Default::default()),
    }
}

/// A tensor of `shape` in `dtype` (f16 or bf16) from f32 values, each rounded once to
/// nearest even (`half`'s conversion).
fn rounded_from<const D: usize>(
    values: &[f32],
    shape: Vec<usize>,
    dtype: DType,
) -> Tensor<Flex, D> {
    let data = if dtype == DType::F16 {
        TensorData::new(rounded::<f16>(values), shape)
    } else {
        TensorData::new(rounded::<bf16>(values), shape)
    };
    Tensor::from_data(data, (&Default::default(), dtype))
}

/// `values` rounded to `T` (f16 or bf16), in parallel blocks ([`cpu::in_blocks`]).
fn rounded<T>(values: &[f32]) -> Vec<T>
where
    T: Copy + Default + Send + Sync,
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![T::default(); values.len()];
    cpu::in_blocks(&mut out, |at, dst| {
        dst.convert_from_f32_slice(&values[at..at + dst.len()])
    });
    out
}

/// The elements of an f32 tensor laid out contiguously in row-major order.
fn contiguous_f32(t: &FlexTensor) -> Option<&[f32]> {
    if t.dtype() != DType::F32 {
        return None;
    }
    t.storage::<f32>().get(contiguous_range(t)?)
}

/// Where a tensor laid out contiguously in row-major order lies in its storage.
fn contiguous_range(t: &FlexTensor) -> Option<std::ops::Range<usize>> {
    let layout = t.layout();
    let start = layout.start_offset();
    layout
        .is_contiguous()
        .then(|| start..start + layout.num_elements())
}

fn primitive<const D: usize>(t: &Tensor<Flex, D>) -> FlexTensor {
    t.clone().into_primitive().tensor()
}

/// A `[k, n]` weight buffer the skinny product reads: row-major (`false`, as the loader
/// stores linear layers), or stored transposed as `[n, k]` row-major (`true`: a tied LM
/// head, the embedding table seen transposed).
fn weight_slice(t: &FlexTensor, k: usize, n: usize) -> Option<(Weights<'_>, bool)> {
    let layout = t.layout();
    let strides = layout.strides();
    let transposed = match strides {
        [a, b] if *a == n as isize && *b == 1 => false,
        [a, b] if *a == 1 && *b == k as isize => true,
        _ => return None,
    };
    let start = layout.start_offset();
    let range = start..start + k * n;
    let weights = match t.dtype() {
        DType::F32 => Weights::F32(t.storage::<f32>().get(range)?),
        DType::F16 => Weights::F16(t.storage::<f16>().get(range)?),
        DType::BF16 => Weights::Bf16(t.storage::<bf16>().get(range)?),
        _ => return None,
    };
    Some((weights, transposed))
}

/// One sequence's `[1, kv_heads, len, d]` cache view (f32, f16 or bf16) whose rows are
/// contiguous.
fn view(t: &FlexTensor, kv_heads: usize, d: usize) -> Option<CacheView<'_>> {
    let data = match t.dtype() {
        DType::F32 => Weights::F32(t.storage::<f32>()),
        DType::F16 => Weights::F16(t.storage::<f16>()),
        DType::BF16 => Weights::Bf16(t.storage::<bf16>()),
        _ => return None,
    };
    let layout = t.layout();
    let dims = layout.shape().to_vec();
    let strides = layout.strides();
    if dims.len() != 4 || dims[1] != kv_heads || dims[3] != d || strides[3] != 1 {
        return None;
    }
    let (head_stride, row_stride) = (
        usize::try_from(strides[1]).ok()?,
        usize::try_from(strides[2]).ok()?,
    );
    Some(CacheView {
        data,
        offset: layout.start_offset(),
        head_stride,
        row_stride,
        len: dims[2],
    })
}

#[cfg(test)]
mod tests {
    use burn::module::Param;
    use burn::nn::Linear;
    use burn::tensor::{Distribution, activation};

    use super::*;
    use crate::kernels::linear;

    /// An f32 tensor's values rounded to `dtype` (f16 or bf16, to nearest even, as `half`
    /// does) and back: what a kernel computing in f32 and rounding once returns.
    fn rounded<const D: usize>(t: Tensor<Flex, D>, dtype: DType) -> Vec<f32> {
        let values: Vec<f32> = t.into_data().to_vec().unwrap();
        match dtype {
            DType::F16 => values.iter().map(|&v| f16::from_f32(v).to_f32()).collect(),
            _ => values.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        }
    }

    /// A tensor's values in f32.
    fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
        t.cast(DType::F32).into_data().to_vec().unwrap()
    }

    fn max_diff(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        (a.cast(DType::F32) - b.cast(DType::F32))
            .abs()
            .max()
            .into_scalar()
    }

    /// A decode-sized product through the skinny kernel equals burn's own, for weights
    /// stored row-major and stored transposed (a tied LM head), in f32 and half precision.
    #[test]
    fn linear_through_the_skinny_kernel_equals_burns() {
        let device = Default::default();
        let (k, n) = (1024, 1100);
        assert!(k * n >= SKINNY_MIN_WEIGHTS);
        for rows in [1, 5, 16, SKINNY_ROWS] {
            let x = Tensor::<Flex, 2>::random([rows, k], Distribution::Normal(0.0, 1.0), &device);
            let row_major =
                Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 0.05), &device);
            let transposed =
                Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.05), &device)
                    .transpose();
            let bias = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
            for w in [row_major, transposed] {
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let layer = Linear {
                        weight: Param::from_tensor(w.clone().cast(dtype)),
                        bias: Some(Param::from_tensor(bias.clone().cast(dtype))),
                    };
                    let input = x.clone().cast(dtype);
                    let ours = linear(&layer, input.clone());
                    let theirs = input.matmul(layer.weight.val())
                        + layer.bias.as_ref().unwrap().val().unsqueeze_dim(0);
                    let tolerance = if dtype == DType::F32 { 1e-4 } else { 0.1 };
                    let diff = max_diff(ours.clone(), theirs);
                    assert!(diff < tolerance, "{rows} rows {dtype:?}: {diff}");
                    assert_eq!(ours.dtype(), dtype);
                }
            }
        }
    }

    /// A prefill-sized product of half-precision operands is the f32 product of their
    /// widened values rounded once to nearest even, bit for bit, for weights stored
    /// row-major and transposed; `linear` takes that path above the skinny rows.
    #[test]
    fn half_gemm_is_the_f32_product_rounded_once() {
        let device = Default::default();
        let (m, k, n) = (SKINNY_ROWS + 36, 1024, 1100);
        let x = Tensor::<Flex, 2>::random([m, k], Distribution::Normal(0.0, 1.0), &device);
        let row_major = Tensor::<Flex, 2>::random([k, n], Distribution::Normal(0.0, 0.05), &device);
        let transposed =
            Tensor::<Flex, 2>::random([n, k], Distribution::Normal(0.0, 0.05), &device).transpose();
        for w in [row_major, transposed] {
            for dtype in [DType::F16, DType::BF16] {
                let (xh, wh) = (x.clone().cast(dtype), w.clone().cast(dtype));
                let wide = xh
                    .clone()
                    .cast(DType::F32)
                    .matmul(wh.clone().cast(DType::F32));
                let got = Flex::gemm(xh.clone(), wh.clone());
                assert_eq!(got.dtype(), dtype);
                let (got, want) = (values(got), rounded(wide, dtype));
                let differ = got.iter().zip(&want).filter(|(a, b)| a != b).count();
                assert_eq!(
                    differ,
                    0,
                    "{dtype:?}: {differ} of {} values differ",
                    want.len()
                );
                let layer = Linear {
                    weight: Param::from_tensor(wh.clone()),
                    bias: None,
                };
                let through_linear = linear(&layer, xh.clone());
                assert!(
                    values(through_linear) == values(Flex::gemm(xh, wh)),
                    "{dtype:?}"
                );
            }
        }
    }

    /// The fused SwiGLU equals burn's `silu(gate) * up`: in place on a gate nothing else
    /// holds, into a new buffer when the gate is shared, and through the fallback on a
    /// transposed view; a shared gate keeps its values.
    #[test]
    fn swiglu_equals_silu_times_up() {
        let device = Default::default();
        let gate =
            Tensor::<Flex, 3>::random([2, 300, 700], Distribution::Normal(0.0, 4.0), &device);
        let up = Tensor::<Flex, 3>::random([2, 300, 700], Distribution::Normal(0.0, 1.0), &device);
        let want = activation::silu(gate.clone()) * up.clone();
        let before: Vec<f32> = gate.clone().into_data().to_vec().unwrap();
        let got = Flex::swiglu(gate.clone(), up.clone());
        let diff: f32 = (got - want.clone()).abs().max().into_scalar();
        assert!(diff < 1e-5, "shared gate: {diff}");
        assert_eq!(gate.clone().into_data().to_vec::<f32>().unwrap(), before);
        let fresh = gate.clone() * 1.0;
        let got = Flex::swiglu(fresh, up.clone());
        let diff: f32 = (got - want).abs().max().into_scalar();
        assert!(diff < 1e-5, "unique gate: {diff}");
        let (gate_t, up_t) = (gate.clone().swap_dims(1, 2), up.clone().swap_dims(1, 2));
        let want = activation::silu(gate_t.clone()) * up_t.clone();
        let diff: f32 = (Flex::swiglu(gate_t, up_t) - want)
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "transposed: {diff}");
        // Half precision: the f32 kernel on the widened inputs, rounded once.
        for dtype in [DType::F16, DType::BF16] {
            let (g, u) = (gate.clone().cast(dtype), up.clone().cast(dtype));
            let got = Flex::swiglu(g.clone(), u.clone());
            assert_eq!(got.dtype(), dtype);
            let want = Flex::swiglu(g.cast(DType::F32), u.cast(DType::F32));
            assert!(values(got) == rounded(want, dtype), "{dtype:?}");
        }
    }

    /// Grouped-query heads read in place equal burn's attention over the heads repeated,
    /// causal (more keys than queries: a chunk after cached slots) and over every key, in
    /// f32 and f16.
    #[test]
    fn grouped_attention_equals_attention_over_repeated_heads() {
        let device = Default::default();
        let (heads, kv_heads, t, slots, d) = (6, 2, 40, 70, 16);
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<Flex, 4>::random([2, heads, t, d], normal, &device);
        let k = Tensor::<Flex, 4>::random([2, kv_heads, slots, d], normal, &device);
        let v = Tensor::<Flex, 4>::random([2, kv_heads, slots, d], normal, &device);
        for dtype in [DType::F32, DType::F16] {
            let (q, k, v) = (
                q.clone().cast(dtype),
                k.clone().cast(dtype),
                v.clone().cast(dtype),
            );
            for causal in [true, false] {
                let got = Flex::grouped_attention(&q, &k, &v, causal, 0.3).expect("flex kernel");
                assert_eq!(got.dtype(), dtype);
                let rep = heads / kv_heads;
                let want = burn::tensor::module::attention(
                    q.clone(),
                    crate::llama::repeat_kv(k.clone(), rep),
                    crate::llama::repeat_kv(v.clone(), rep),
                    None,
                    None,
                    burn::tensor::ops::AttentionModuleOptions {
                        scale: Some(0.3),
                        softcap: None,
                        is_causal: causal,
                    },
                );
                let diff: f32 = (got.cast(DType::F32) - want.cast(DType::F32))
                    .abs()
                    .max()
                    .into_scalar();
                let tolerance = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
                assert!(diff < tolerance, "{dtype:?}, causal {causal}: {diff}");
            }
        }
    }

    /// RMSNorm through the kernel equals burn's `RmsNorm` on a contiguous f32 input, a
    /// transposed input takes burn's own, and half-precision input is the f32 kernel's result
    /// on the widened values, rounded once, in its own dtype.
    #[test]
    fn rms_norm_equals_burns() {
        let device = Default::default();
        let mut norm = burn::nn::RmsNormConfig::new(1000)
            .with_epsilon(1e-5)
            .init::<Flex>(&device);
        norm.gamma = Param::from_tensor(Tensor::random(
            [1000],
            Distribution::Normal(1.0, 0.5),
            &device,
        ));
        let x = Tensor::<Flex, 3>::random([2, 37, 1000], Distribution::Normal(0.0, 3.0), &device);
        let got = crate::kernels::rms_norm(&norm, x.clone());
        let diff: f32 = (got - norm.forward(x.clone())).abs().max().into_scalar();
        assert!(diff < 1e-5, "contiguous: {diff}");
        assert!(Flex::rms_norm(&x.clone().reshape([74, 1000]), &norm.gamma.val(), 1e-5).is_some());
        let t = Tensor::<Flex, 3>::random([2, 1000, 37], Distribution::Normal(0.0, 3.0), &device)
            .swap_dims(1, 2);
        let diff: f32 = (crate::kernels::rms_norm(&norm, t.clone()) - norm.forward(t))
            .abs()
            .max()
            .into_scalar();
        assert!(diff < 1e-5, "transposed: {diff}");
        // Half precision: the kernel in f32 on the widened inputs, rounded once.
        for dtype in [DType::F16, DType::BF16] {
            let mut half_norm = norm.clone();
            half_norm.gamma = Param::from_tensor(norm.gamma.val().cast(dtype));
            let half = crate::kernels::rms_norm(&half_norm, x.clone().cast(dtype));
            assert_eq!(half.dtype(), dtype);
            let mut wide_norm = norm.clone();
            wide_norm.gamma = Param::from_tensor(half_norm.gamma.val().cast(DType::F32));
            let want = crate::kernels::rms_norm(&wide_norm, x.clone().cast(dtype).cast(DType::F32));
            assert!(values(half) == rounded(want, dtype), "{dtype:?}");
        }
    }

    /// The RoPE kernel equals the burn operations it replaces, bit for bit (the same
    /// products and sum per element), over several sequences, heads and tokens, both at a
    /// size run on one thread and at one split across threads; a strided input falls back.
    #[test]
    fn rope_equals_the_burn_operations() {
        let device = Default::default();
        for [batch, t, heads, d] in [[2, 5, 3, 8], [1, 300, 16, 64]] {
            let normal = Distribution::Normal(0.0, 1.0);
            let x = Tensor::<Flex, 4>::random([batch, t, heads, d], normal, &device);
            let cos = Tensor::<Flex, 4>::random([batch, t, 1, d], normal, &device);
            let sin = Tensor::<Flex, 4>::random([batch, t, 1, d], normal, &device);
            let got = Flex::rope(&x, &cos, &sin).expect("contiguous f32");
            let rotated = Tensor::cat(
                vec![
                    x.clone().narrow(3, d / 2, d / 2),
                    x.clone().narrow(3, 0, d / 2),
                ],
                3,
            );
            let want = (x.clone() * cos.clone().repeat_dim(2, heads)
                + rotated * sin.clone().repeat_dim(2, heads))
            .swap_dims(1, 2);
            assert_eq!(got.dims(), [batch, heads, t, d]);
            let (got, want): (Vec<f32>, Vec<f32>) = (
                got.into_data().to_vec().unwrap(),
                want.into_data().to_vec().unwrap(),
            );
            assert_eq!(got, want, "{batch} x {t} x {heads} x {d}");
            // Half precision: the f32 kernel on the widened inputs, rounded once.
            for dtype in [DType::F16, DType::BF16] {
                let half = |t: &Tensor<Flex, 4>| t.clone().cast(dtype);
                let got = Flex::rope(&half(&x), &half(&cos), &half(&sin)).expect("half");
                assert_eq!(got.dtype(), dtype);
                let wide = |t: &Tensor<Flex, 4>| half(t).cast(DType::F32);
                let want = Flex::rope(&wide(&x), &wide(&cos), &wide(&sin)).unwrap();
                let label = format!("{dtype:?} {batch} x {t} x {heads} x {d}");
                assert!(values(got) == rounded(want, dtype), "{label}");
            }
            assert!(Flex::rope(&x.swap_dims(1, 2), &cos, &sin).is_none());
        }
    }

    /// Three sequences of different lengths, grouped-query heads, keys in buffers with
    /// spare rows: the kernel equals softmax attention written out per sequence.
    #[test]
    fn decode_attention_equals_attention_written_out() {
        let device = Default::default();
        let (heads, kv_heads, d, cap) = (8, 2, 16, 40);
        let lens = [5, 40, 17];
        let q =
            Tensor::<Flex, 4>::random([1, heads, 3, d], Distribution::Normal(0.0, 1.0), &device);
        let buffers: Vec<_> = (0..3)
            .map(|_| {
                [0, 1].map(|_| {
                    Tensor::<Flex, 4>::random(
                        [1, kv_heads, cap, d],
                        Distribution::Normal(0.0, 1.0),
                        &device,
                    )
                })
            })
            .collect();
        let keys: Vec<_> = buffers
            .iter()
            .zip(lens)
            .map(|(b, l)| b[0].clone().narrow(2, 0, l))
            .collect();
        let values: Vec<_> = buffers
            .iter()
            .zip(lens)
            .map(|(b, l)| b[1].clone().narrow(2, 0, l))
            .collect();
        let scale = 0.25;
        let got = Flex::decode_attention(&q, &keys, &values, scale).expect("f32 views");
        for b in 0..3 {
            let rep = heads / kv_heads;
            let expand = |t: &Tensor<Flex, 4>| {
                let [_, g, l, d] = t.dims();
                t.clone()
                    .unsqueeze_dim::<5>(2)
                    .repeat_dim(2, rep)
                    .reshape([1, g * rep, l, d])
            };
            let qb = q.clone().narrow(2, b, 1);
            let probs = activation::softmax(qb.matmul(expand(&keys[b]).swap_dims(2, 3)) * scale, 3);
            let want = probs.matmul(expand(&values[b]));
            let diff: f32 = (got.clone().narrow(2, b, 1) - want)
                .abs()
                .max()
                .into_scalar();
            assert!(diff < 1e-5, "sequence {b}: {diff}");
        }
        // Half-precision caches are read as stored and computed in f32: the same result as
        // the f32 kernel on the rounded values, returned in the model's type.
        for dtype in [DType::F16, DType::BF16] {
            let half = |ts: &[Tensor<Flex, 4>]| ts.iter().map(|t| t.clone().cast(dtype)).collect();
            let (keys, values): (Vec<_>, Vec<_>) = (half(&keys), half(&values));
            let q = q.clone().cast(dtype);
            let got = Flex::decode_attention(&q, &keys, &values, scale).expect("half views");
            assert_eq!(got.dtype(), dtype);
            let wide = |ts: &[Tensor<Flex, 4>]| -> Vec<_> {
                ts.iter().map(|t| t.clone().cast(DType::F32)).collect()
            };
            let want = Flex::decode_attention(
                &q.clone().cast(DType::F32),
                &wide(&keys),
                &wide(&values),
                scale,
            )
            .expect("f32 views")
            .cast(dtype);
            let diff: f32 = (got.cast(DType::F32) - want.cast(DType::F32))
                .abs()
                .max()
                .into_scalar();
            assert_eq!(diff, 0.0, "{dtype:?}");
        }
    }
}
