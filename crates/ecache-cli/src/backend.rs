//! Running a job generic over burn backends on the backend a config names.

use anyhow::Result;
use burn::tensor::{DType, backend::Backend};
use ecache_core::{BackendKind, Precision};

use crate::BadInput;

/// Work that runs on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: Backend>(self, device: &B::Device) -> Result<Self::Output>;
}

/// Runs `job` on `kind`'s default device.
pub fn on_backend<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output> {
    match kind {
        BackendKind::Flex => job.run::<burn::backend::Flex>(&Default::default()),
        BackendKind::Ndarray => job.run::<burn::backend::NdArray>(&Default::default()),
        #[cfg(feature = "cuda")]
        BackendKind::Cuda => job.run::<burn::backend::Cuda>(&Default::default()),
        #[cfg(not(feature = "cuda"))]
        BackendKind::Cuda => Err(BadInput(
            "this ecache was built without the `cuda` feature (cargo build --features cuda)".into(),
        )
        .into()),
    }
}

/// Burn dtype of a configured precision.
pub fn dtype(precision: Precision) -> DType {
    match precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    }
}
