//! Seeded trial generators.

mod addition;
mod flipflop;
pub mod kalman;
mod lorenz;
mod reach;
pub mod sine;

pub use addition::AdditionTask;
pub use flipflop::{correct_bits, FlipFlopTask};
pub use kalman::{KalmanTask, KalmanTrials};
pub use lorenz::{LorenzData, LorenzTask};
pub use reach::{HoldWindow, ReachReport, ReachTask, ReachTrial};

use crate::models::Batch;
use crate::Result;
use sofo_tensor::{Float, Tensor};

/// A task: batches of trials for training and held-out ones for testing.
pub trait Task<T: Float> {
    fn name(&self) -> &'static str;
    /// The training batch of `iteration` under `seed`.
    fn train_batch(&self, seed: u64, iteration: u64, trials: usize) -> Result<Batch<T>>;
    /// A fixed held-out batch.
    fn test_batch(&self, trials: usize) -> Result<Batch<T>>;
    /// The name of the task's own score, if it has one.
    fn metric_name(&self) -> Option<&'static str> {
        None
    }
    /// The score of a model's `outputs` (one tensor per observed step) on
    /// `batch`.
    fn metric(&self, _outputs: &[Tensor<T>], _batch: &Batch<T>) -> Option<f64> {
        None
    }
}
