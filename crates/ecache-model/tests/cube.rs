//! The CubeCL skinny product (src/kernels/cube.rs) against burn's own matmul, on whatever
//! CubeCL runtime the build has: wgpu (`--features wgpu`; CI runs it on Mesa's software
//! Vulkan driver) or CUDA (`--features cuda`). Both through burn's fusion layer (what the
//! model runs on) and on the plain `CubeBackend`.
#![cfg(any(feature = "wgpu", feature = "cuda"))]

use burn::backend::Flex;
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
/// `CUBE_ROWS`, inner dimension not a multiple of the 8 slices), in `dtype`, for weights
/// stored `[k, n]` and for transposed views of `[n, k]` ones (a tied LM head).
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
        let stored = Tensor::<B, 2>::random([k, n], uniform, &device).cast(dtype);
        let transposed = Tensor::<B, 2>::random([n, k], uniform, &device)
            .cast(dtype)
            .transpose();
        for w in [stored, transposed] {
            let ours = B::skinny_matmul(x.clone(), w.clone());
            assert_eq!(ours.dims(), [m, n]);
            assert_eq!(ours.dtype(), dtype);
            let theirs = on_flex(x.clone()).matmul(on_flex(w));
            worst = worst.max(max_difference(on_flex(ours), theirs));
        }
    }
    worst
}

/// `t`'s values on the flex backend, in f32: the reference products run there, away from
/// CubeCL's matmul autotuner (whose one-row kernels are what the CubeCL paths avoid).
fn on_flex<B: KernelBackend, const D: usize>(t: Tensor<B, D>) -> Tensor<Flex, D> {
    Tensor::from_data(t.cast(DType::F32).into_data(), &Default::default())
}

fn max_difference<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem()
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

/// Attention's products with one query row (or one key) on the CubeCL backends equal the
/// plain product, at widths that grow by one as a decode's do (with remainders against
/// every plane size), for one and several query rows per key head.
#[test]
fn attention_products_with_one_row_equal_the_product() {
    fn worst<B: KernelBackend>() -> f32 {
        let device = Default::default();
        B::seed(&device, 2);
        let uniform = Distribution::Uniform(-1.0, 1.0);
        let mut worst = 0.0f32;
        for slots in 33..=42 {
            for (m, k, n) in [(1, 16, slots), (1, slots, 16), (3, 16, slots), (4, 16, 1)] {
                let a = Tensor::<B, 4>::random([2, 3, m, k], uniform, &device);
                let b = Tensor::<B, 4>::random([2, 3, n, k], uniform, &device).swap_dims(2, 3);
                let ours = B::attention_matmul(a.clone(), b.clone());
                assert_eq!(ours.dims(), [2, 3, m, n]);
                let theirs = on_flex(a).matmul(on_flex(b));
                worst = worst.max(max_difference(on_flex(ours), theirs));
            }
        }
        worst
    }
    for (name, diff) in [("fused", worst::<Fused>()), ("plain", worst::<Plain>())] {
        assert!(diff < 1e-5, "{name}: {diff}");
    }
}

/// A model's linear layer takes the kernel at a decode step's rows, whatever the weight's
/// size, and keeps its bias.
#[test]
fn linear_layers_take_the_cube_kernel_at_decode_shapes() {
    let device = Default::default();
    let (k, n) = (1024, 1100);
    assert_eq!(Fused::skinny_rows(k, n), CUBE_ROWS);
    assert_eq!(Fused::skinny_rows(64, 64), CUBE_ROWS);
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

/// A decoder whose LM head is tied to its embeddings (Qwen2-VL-2B, Qwen2.5-VL-3B; the head
/// is a transposed view of the embedding table): on the CubeCL backend its logits, step
/// after step, equal the CPU backend's for the same weights (exported and reloaded).
#[test]
fn a_tied_lm_head_agrees_with_the_cpu_backend_step_after_step() {
    use burn::tensor::TensorData;
    use ecache_model::config::{HfLlamaConfig, TextKind};
    use ecache_model::llama::LlamaDecoder;

    type Cpu = burn::backend::Flex;
    let hf: HfLlamaConfig = serde_json::from_str(
        r#"{"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4}"#,
    )
    .unwrap();
    let config = hf.validate(true, TextKind::Llama).unwrap();
    let device = Default::default();
    let cube = LlamaDecoder::<Fused>::init(&config, &device, DType::F32, 3);
    let dir = std::env::temp_dir().join(format!("ecache-tied-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut exporter = ecache_model::export::Exporter::default();
    cube.export(&mut exporter);
    exporter.save(&dir.join("model.safetensors")).unwrap();
    let mut checkpoint = ecache_model::weights::Checkpoint::open(&dir).unwrap();
    let mut loader = ecache_model::layers::Loader::<Cpu> {
        checkpoint: &mut checkpoint,
        device: &Default::default(),
        dtype: DType::F32,
    };
    let cpu = LlamaDecoder::<Cpu>::load(&config, &mut loader).unwrap();
    for step in 0..3 {
        let values: Vec<f32> = (0..64)
            .map(|i| ((i * 7 + step * 13) % 17) as f32 / 17.0 - 0.5)
            .collect();
        let on = |data: Vec<f32>| TensorData::new(data, [1, 1, 64]);
        let a: Vec<f32> = cube
            .head(Tensor::from_data(on(values.clone()), &device))
            .into_data()
            .into_vec()
            .unwrap();
        let b: Vec<f32> = cpu
            .head(Tensor::from_data(on(values), &Default::default()))
            .into_data()
            .into_vec()
            .unwrap();
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        assert!(worst < 1e-4, "step {step}: max difference {worst}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
