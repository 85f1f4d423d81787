//! Models, each written once against the op vocabulary [`Ops`].

mod lorenz;
mod rate_rnn;

pub use lorenz::LorenzModel;
pub use rate_rnn::{Activation, RateRnn};

use crate::loss::Observer;
use crate::params::ParamSet;
use crate::Result;
use sofo_ad::Ops;
use sofo_tensor::{Float, Tensor};

/// A batch of trials for a sequence model.
#[derive(Debug, Clone)]
pub struct Batch<T: Float> {
    /// Number of time steps T.
    pub steps: usize,
    /// Number of trials M.
    pub trials: usize,
    /// Inputs [T, M, I], if the model has any.
    pub inputs: Option<Tensor<T>>,
    /// Model-specific initial condition [M, S] (e.g. the Lorenz start).
    pub initial: Option<Tensor<T>>,
    /// Targets [T, M, O].
    pub targets: Tensor<T>,
    /// Loss weights [T, M]; a step whose weights are all zero is not observed.
    pub weights: Option<Tensor<T>>,
    /// The normaliser n of the weighted MSE over the whole trial.
    pub loss_norm: f64,
}

impl<T: Float> Batch<T> {
    /// Whether step t carries any loss.
    pub fn observed(&self, t: usize) -> bool {
        match &self.weights {
            None => true,
            Some(w) => w.data()[t * self.trials..(t + 1) * self.trials]
                .iter()
                .any(|&v| v != T::zero()),
        }
    }

    /// Row t of a [T, M, X] tensor, as [M, X].
    pub fn step_of(x: &Tensor<T>, t: usize) -> Result<Tensor<T>> {
        let s = x.shape();
        Ok(x.slice(0, t, 1)?.reshape(&s[1..])?)
    }

    /// The little loss of step t: weighted MSE against targets[t].
    pub fn step_loss(&self, t: usize) -> Result<crate::loss::WeightedMse<T>> {
        let target = Self::step_of(&self.targets, t)?;
        let weights = match &self.weights {
            None => None,
            Some(w) => Some(Self::step_of(w, t)?.reshape(&[self.trials, 1])?),
        };
        Ok(crate::loss::WeightedMse {
            target,
            weights,
            n: self.loss_norm,
        })
    }
}

/// A differentiable model: parameters and a run over a batch that observes
/// its little losses.
pub trait Model<T: Float> {
    /// Fresh parameters, seeded.
    fn init(&self, seed: u64) -> Result<ParamSet<T>>;
    /// Runs the batch. `params` are in the order of [`Model::init`].
    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        params: &[E::V],
        batch: &Batch<T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()>;
    /// Flops of one forward-K pass with `k` tangents on `batch` (benchmarks).
    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64;
}
