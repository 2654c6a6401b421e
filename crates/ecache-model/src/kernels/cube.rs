//! CubeCL kernels, compiled by every CubeCL runtime burn builds on (CUDA; wgpu for Vulkan,
//! Metal and DX12). Implemented for burn's `CubeBackend` and carried through its fusion
//! layer as a custom operation, so `burn::backend::Cuda` and `burn::backend::Wgpu` use them
//! as they are. Tested for agreement with burn's own product on whatever CubeCL runtime the
//! build has (`tests/cube.rs`; CI runs it on Mesa's software Vulkan driver).

use burn::tensor::{Shape, Tensor, TensorPrimitive};
use burn_cubecl::element::BoolElement;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeBackend, CubeRuntime, FloatElement, IntElement};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::prelude::{CubeCount, CubeDim};

use super::KernelBackend;
use device::skinny_kernel;

/// Code compiled for the device.
mod device {
    use cubecl::prelude::*;

    /// Units of a cube along x: adjacent output columns, so that a weight row's stretch is
    /// one coalesced read.
    pub const CUBE_COLUMNS: u32 = 32;
    /// Units of a cube along y: slices of the inner dimension, summed through shared memory.
    pub const CUBE_SLICES: u32 = 8;
    /// Rows of `x` every unit accumulates: a weight is read once for this many rows.
    pub const CUBE_ROWS: usize = 8;
    /// Units of a cube.
    pub const CUBE_UNITS: usize = (CUBE_COLUMNS * CUBE_SLICES) as usize;

    /// `out = x · w` for few rows: unit `(c, s)` of cube `(bx, by)` sums, for column
    /// `bx * 32 + c` and rows `by * 8 ..`, the products over `k = s, s + 8, ...` in f32; the
    /// eight slices are added through shared memory. `x` and `out` are contiguous; `w` is
    /// read through its strides, so a transposed view (a tied LM head's embeddings) needs
    /// no copy.
    #[cube(launch)]
    pub fn skinny_kernel<F: Float>(
        x: &Tensor<F>,
        w: &Tensor<F>,
        out: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let m = x.shape(0);
        let k = x.shape(1);
        let n = w.shape(1);
        let (w_row, w_col) = (w.stride(0), w.stride(1));
        let columns = CUBE_DIM_X as usize;
        let slices = CUBE_DIM_Y as usize;
        let col = CUBE_POS_X as usize * columns + UNIT_POS_X as usize;
        let row0 = CUBE_POS_Y as usize * CUBE_ROWS;
        let slice = UNIT_POS_Y as usize;

        let mut acc = Array::<f32>::new(CUBE_ROWS);
        #[unroll]
        for i in 0..CUBE_ROWS {
            acc[i] = 0.0;
        }
        if col < n {
            let mut kk = slice;
            while kk < k {
                let weight = f32::cast_from(w[kk * w_row + col * w_col]);
                #[unroll]
                for i in 0..CUBE_ROWS {
                    if row0 + i < m {
                        acc[i] += f32::cast_from(x[(row0 + i) * k + kk]) * weight;
                    }
                }
                kk += slices;
            }
        }

        let mut partial = SharedMemory::<f32>::new(CUBE_ROWS * CUBE_UNITS);
        #[unroll]
        for i in 0..CUBE_ROWS {
            partial[(i * slices + slice) * columns + UNIT_POS_X as usize] = acc[i];
        }
        sync_cube();
        if slice == 0 && col < n {
            #[unroll]
            for i in 0..CUBE_ROWS {
                if row0 + i < m {
                    let mut total = 0.0f32;
                    for s in 0..slices {
                        total += partial[(i * slices + s) * columns + UNIT_POS_X as usize];
                    }
                    out[(row0 + i) * n + col] = F::cast_from(total);
                }
            }
        }
    }
}

pub use device::CUBE_ROWS;
use device::{CUBE_COLUMNS, CUBE_SLICES};

/// [`skinny_kernel`] on two `CubeBackend` tensors (`w` in any layout).
///
/// # Shapes
/// - `x`: `[m, k]`, `w`: `[k, n]` -> `[m, n]`
pub fn skinny_matmul<R: CubeRuntime>(x: CubeTensor<R>, w: CubeTensor<R>) -> CubeTensor<R> {
    let x = into_contiguous(x);
    let [m, k] = x.meta.shape().dims::<2>();
    let [k_w, n] = w.meta.shape().dims::<2>();
    assert_eq!(k, k_w, "skinny_matmul: x is [m, k], w is [k, n]");
    let client = x.client.clone();
    let dtype = x.dtype;
    let out = empty_device_dtype::<R>(client.clone(), x.device.clone(), Shape::new([m, n]), dtype);
    let cubes = CubeCount::Static(
        n.div_ceil(CUBE_COLUMNS as usize) as u32,
        m.div_ceil(CUBE_ROWS) as u32,
        1,
    );
    skinny_kernel::launch::<R>(
        &client,
        cubes,
        CubeDim::new_2d(CUBE_COLUMNS, CUBE_SLICES),
        x.into_tensor_arg(),
        w.into_tensor_arg(),
        out.clone().into_tensor_arg(),
        dtype.into(),
    );
    out
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> KernelBackend
    for CubeBackend<R, F, I, BT>
{
    /// Every weight: besides streaming a weight once for all rows, the kernel keeps
    /// one-row products away from burn's matmul autotuner (see
    /// [`super::matmul_by_reduction`] for the hazard).
    fn skinny_rows(k: usize, n: usize) -> usize {
        let _ = (k, n);
        if cube_skinny_enabled() { CUBE_ROWS } else { 0 }
    }

    fn skinny_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        let out = skinny_matmul(x.into_primitive().tensor(), w.into_primitive().tensor());
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        super::matmul_by_reduction(a, b)
    }
}

/// `ECACHE_CUBE_SKINNY=0` turns the CubeCL skinny product off (burn's matmul instead): its
/// speed has not been measured on a GPU yet (docs/performance.md). Off, one-row linear
/// products meet burn's autotuner again.
fn cube_skinny_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var("ECACHE_CUBE_SKINNY").map_or(true, |v| v != "0"))
}

/// The fusion layer (what `burn::backend::Cuda` and `Wgpu` are) runs the inner backend's
/// kernel as a custom operation.
impl<B: FusionBackend + KernelBackend> KernelBackend for Fusion<B> {
    fn skinny_rows(k: usize, n: usize) -> usize {
        B::skinny_rows(k, n)
    }

    fn attention_matmul(a: Tensor<Self, 4>, b: Tensor<Self, 4>) -> Tensor<Self, 4> {
        super::matmul_by_reduction(a, b)
    }

    fn skinny_matmul(x: Tensor<Self, 2>, w: Tensor<Self, 2>) -> Tensor<Self, 2> {
        #[derive(Debug)]
        struct Skinny<B> {
            desc: CustomOpIr,
            _backend: std::marker::PhantomData<B>,
        }
        impl<B: FusionBackend + KernelBackend> Operation<B::FusionRuntime> for Skinny<B> {
            fn execute(
                &self,
                handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
            ) {
                let ([x, w], [out]) = self.desc.as_fixed();
                let x = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(
                    handles.get_float_tensor::<B>(x),
                ));
                let w = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(
                    handles.get_float_tensor::<B>(w),
                ));
                let y = B::skinny_matmul(x, w).into_primitive().tensor();
                handles.register_float_tensor::<B>(&out.id, y);
            }
        }

        let x = x.into_primitive().tensor();
        let w = w.into_primitive().tensor();
        let [m, _] = x.shape.dims::<2>();
        let [_, n] = w.shape.dims::<2>();
        let client = x.client.clone();
        let streams = OperationStreams::with_inputs([&x, &w]);
        let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), x.dtype);
        let desc = CustomOpIr::new("ecache_skinny_matmul", &[x.into_ir(), w.into_ir()], &[out]);
        let y = client
            .register(
                streams,
                OperationIr::Custom(desc.clone()),
                Skinny::<B> {
                    desc,
                    _backend: std::marker::PhantomData,
                },
            )
            .output();
        Tensor::from_primitive(TensorPrimitive::Float(y))
    }
}
