//! The CubeCL skinny product (src/kernels/cube.rs) against burn's own matmul, on whatever
//! CubeCL runtime the build has: wgpu (`--features wgpu`; CI runs it on Mesa's software
//! Vulkan driver) or CUDA (`--features cuda`). Both through burn's fusion layer (what the
//! model runs on) and on the plain `CubeBackend`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::module::Param;
use burn::nn::Linear;
use burn::tensor::{DType, Distribution, ElementConversion, Tensor};
use ecache_model::kernels::cube::CUBE_ROWS;
use ecache_model::kernels::{KernelBackend, linear};

#[cfg(feature = "cuda")]
type Fused = burn::backend::Cuda;
#[cfg(feature = "cuda")]
type Plain = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Fused = burn::backend::Wgpu;
#[cfg(all(feature = "wgpu", not(feature = "cuda")))]
type Plain = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// The largest difference between `B::skinny_matmul` and `matmul` over shapes with
/// remainders in every dimension (columns not a multiple of 32, rows over one block of
/// `CUBE_ROWS`, inner dimension not a multiple of the 8 slices), in `dtype`.
fn worst_difference<B: KernelBackend>(dtype: DType) -> f32 {
    let device = Default::default();
    B::seed(&device, 1);
    let uniform = Distribution::Uniform(-0.5, 0.5);
    let mut worst = 0.0f32;
    for (m, k, n) in [
        (1, 64, 300),
        (3, 130, 517),
        (CUBE_ROWS, 1027, 1029),
        (11, 96, 33),
    ] {
        let x = Tensor::<B, 2>::random([m, k], uniform, &device).cast(dtype);
        let w = Tensor::<B, 2>::random([k, n], uniform, &device).cast(dtype);
        let ours = B::skinny_matmul(x.clone(), w.clone());
        assert_eq!(ours.dims(), [m, n]);
        assert_eq!(ours.dtype(), dtype);
        let theirs = x.matmul(w);
        let diff: f32 = (ours.cast(DType::F32) - theirs.cast(DType::F32))
            .abs()
            .max()
            .into_scalar()
            .elem();
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn cube_skinny_product_equals_burns_matmul() {
    for (name, diff) in [
        ("fused f32", worst_difference::<Fused>(DType::F32)),
        ("plain f32", worst_difference::<Plain>(DType::F32)),
    ] {
        assert!(diff < 1e-4, "{name}: {diff}");
    }
    // f16 operands, f32 accumulation: within f16's rounding of the result.
    let diff = worst_difference::<Fused>(DType::F16);
    assert!(diff < 2e-2, "fused f16: {diff}");
}

/// A model's linear layer takes the kernel for a weight of 1 Mi elements and a decode
/// step's rows, and keeps its bias.
#[test]
fn linear_layers_take_the_cube_kernel_at_decode_shapes() {
    let device = Default::default();
    let (k, n) = (1024, 1100);
    assert_eq!(Fused::skinny_rows(k, n), CUBE_ROWS);
    assert_eq!(Fused::skinny_rows(64, 64), 0);
    let layer = Linear::<Fused> {
        weight: Param::from_tensor(Tensor::random(
            [k, n],
            Distribution::Normal(0.0, 0.05),
            &device,
        )),
        bias: Some(Param::from_tensor(Tensor::random(
            [n],
            Distribution::Normal(0.0, 1.0),
            &device,
        ))),
    };
    let x = Tensor::<Fused, 3>::random([1, 3, k], Distribution::Normal(0.0, 1.0), &device);
    let ours = linear(&layer, x.clone());
    let theirs = layer.forward(x);
    let diff: f32 = (ours - theirs).abs().max().into_scalar();
    assert!(diff < 1e-4, "{diff}");
}
