//! Running a job generic over burn backends on the backend a config names (the model
//! crate's dispatch, with the command line's errors).

use anyhow::Result;
use ecache_core::BackendKind;
use ecache_model::kernels::KernelBackend;

pub use ecache_model::backend::dtype;

use crate::BadInput;

/// Work that runs on any backend.
pub trait BackendJob {
    type Output;
    fn run<B: KernelBackend>(self, device: &B::Device) -> Result<Self::Output>;
}

struct Adapt<J>(J);

impl<J: BackendJob> ecache_model::backend::BackendJob for Adapt<J> {
    type Output = Result<J::Output>;
    fn run<B: KernelBackend>(self, device: &B::Device) -> Self::Output {
        self.0.run::<B>(device)
    }
}

/// Runs `job` on `kind`'s default device; a backend this build lacks is bad input.
pub fn on_backend<J: BackendJob>(kind: BackendKind, job: J) -> Result<J::Output> {
    ecache_model::backend::on_backend(kind, Adapt(job)).map_err(|e| BadInput(e.to_string()))?
}
