//! Running work that is generic over burn backends on the backend a config names.

use burn::tensor::DType;
use ecache_core::{BackendKind, Precision};

use crate::error::Result;
use crate::kernels::KernelBackend;

/// Work that runs on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: KernelBackend>(self, device: &B::Device) -> Self::Output;
}

/// Runs `job` on `kind`'s default device; a backend this build lacks is an error. On the CPU
/// backends the calling thread first joins a rayon pool of its own
/// ([`crate::threads::join_own_pool`]), so that the kernels' parallel loops do not put it to
/// sleep each time.
pub fn on_backend<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output> {
    if matches!(kind, BackendKind::Flex | BackendKind::Ndarray) {
        crate::threads::join_own_pool();
    }
    match kind {
        BackendKind::Flex => Ok(job.run::<burn::backend::Flex>(&Default::default())),
        BackendKind::Ndarray => Ok(job.run::<burn::backend::NdArray>(&Default::default())),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => Ok(job.run::<burn::backend::Cuda>(&Default::default())),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => {
            drop(job);
            Err(missing("cuda"))
        }
        #[cfg(feature = "wgpu")]
        BackendKind::Wgpu => Ok(job.run::<burn::backend::Wgpu>(&Default::default())),
        #[cfg(not(feature = "wgpu"))]
        BackendKind::Wgpu => {
            drop(job);
            Err(missing("wgpu"))
        }
    }
}

/// The error for a backend whose feature this build lacks.
#[cfg(not(all(feature = "cuda", feature = "wgpu")))]
fn missing(feature: &str) -> crate::error::ModelError {
    crate::error::ModelError::Config(format!(
        "backend `{feature}`: this build lacks the `{feature}` feature \
         (cargo build --release -p ecache-cli --features {feature})"
    ))
}

/// Burn dtype of a configured precision.
pub fn dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}
