//! Delayed addition (tasks.md §5): a stream of U(0, 1) numbers and a marker
//! channel with two marks, at t1 < 10 and t1 < t2 ≤ T/2; the target is the
//! sum of the two marked numbers, scored (MSE) at the last step only.

use super::Task;
use crate::models::Batch;
use crate::{Error, Result};
use rand::RngExt;
use sofo_tensor::{rng, Float, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct AdditionTask {
    /// Steps per trial T.
    pub steps: usize,
    /// Seed of the held-out trials.
    pub test_seed: u64,
}

impl AdditionTask {
    pub fn new(steps: usize) -> Self {
        AdditionTask {
            steps,
            test_seed: 0xADD,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps < 22 {
            return Err(Error::config(
                "addition.steps",
                self.steps,
                "at least 22 (marks at t1 < 10 < t2 ≤ T/2)",
            ));
        }
        Ok(())
    }

    /// Inputs `[T, M, 2]` (number, marker) and the sums `[M]`.
    pub fn generate(&self, trials: usize, seed: u64, stream: u64) -> (Vec<f64>, Vec<f64>) {
        let t_len = self.steps;
        let mut u = vec![0.0; t_len * trials * 2];
        let mut sums = vec![0.0; trials];
        for m in 0..trials {
            let mut g = rng::generator(seed, rng::substream(stream, m as u64));
            for t in 0..t_len {
                u[(t * trials + m) * 2] = g.random::<f64>();
            }
            let t1 = g.random_range(0..10usize);
            let t2 = g.random_range(t1 + 1..=t_len / 2 - 1);
            for t in [t1, t2] {
                u[(t * trials + m) * 2 + 1] = 1.0;
                sums[m] += u[(t * trials + m) * 2];
            }
        }
        (u, sums)
    }

    fn batch<T: Float>(&self, trials: usize, seed: u64, stream: u64) -> Result<Batch<T>> {
        if trials == 0 {
            return Err(Error::config("batch", trials, "at least 1"));
        }
        let (u, sums) = self.generate(trials, seed, stream);
        let t = self.steps;
        let mut y = vec![0.0; t * trials];
        let mut w = vec![0.0; t * trials];
        y[(t - 1) * trials..].copy_from_slice(&sums);
        w[(t - 1) * trials..].iter_mut().for_each(|v| *v = 1.0);
        Ok(Batch {
            steps: t,
            trials,
            inputs: Some(Tensor::from_f64_slice(&[t, trials, 2], &u)?),
            initial: None,
            targets: Tensor::from_f64_slice(&[t, trials, 1], &y)?,
            weights: Some(Tensor::from_f64_slice(&[t, trials], &w)?),
            loss_norm: trials as f64,
            noise_seed: rng::substream(seed, stream),
        })
    }
}

impl<T: Float> Task<T> for AdditionTask {
    fn name(&self) -> &'static str {
        "addition"
    }

    fn train_batch(&self, seed: u64, iteration: u64, trials: usize) -> Result<Batch<T>> {
        self.batch(trials, seed, rng::substream(0xADD0, iteration))
    }

    fn test_batch(&self, trials: usize) -> Result<Batch<T>> {
        self.batch(trials, self.test_seed, 0x7E57)
    }

    fn metric_name(&self) -> Option<&'static str> {
        Some("share within 0.04")
    }

    /// The share of trials whose reported sum is within 0.04 of the truth.
    fn metric(&self, outputs: &[Tensor<T>], batch: &Batch<T>) -> Option<f64> {
        let pred = outputs.last()?.to_f64_vec();
        let m = batch.trials;
        let truth = &batch.targets.to_f64_vec()[(batch.steps - 1) * m..];
        let ok = pred
            .iter()
            .zip(truth)
            .filter(|(p, t)| (*p - *t).abs() < 0.04)
            .count();
        Some(ok as f64 / m as f64)
    }
}
