//! Optimisers: SOFO, and the baselines it is compared with.

mod first_order;
pub mod force;
mod phases;
pub mod reservoir;
mod sofo;

pub use first_order::{Adam, AdamConfig, Fgd, FgdConfig, LearningRate, Schedule, Sgd, SgdConfig};
pub use phases::SofoPhases;
#[cfg(feature = "cuda")]
pub(crate) use sofo::{orthonormal_transform, split_flat};
pub use sofo::{Damping, Proposal, Sofo, SofoConfig, StepReport, TangentKind, Tangents};

use crate::models::{Batch, Model};
use crate::params::ParamSet;
use crate::Result;
use sofo_tensor::Float;

/// One training iteration of some optimiser. A non-finite loss, gradient,
/// curvature or step leaves the parameters untouched (`applied = false`).
pub trait Optimizer<T: Float> {
    fn name(&self) -> &'static str;
    fn step<M: Model<T>>(
        &mut self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        seed: u64,
        iteration: u64,
    ) -> Result<StepReport>;
}

impl<T: Float> Optimizer<T> for Sofo {
    fn name(&self) -> &'static str {
        "sofo"
    }
    fn step<M: Model<T>>(
        &mut self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        seed: u64,
        iteration: u64,
    ) -> Result<StepReport> {
        Sofo::step(self, model, params, batch, seed, iteration)
    }
}
