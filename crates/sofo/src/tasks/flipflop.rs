//! The b-bit flip-flop (Sussillo & Barak 2013; tasks.md §4).
//!
//! Each channel pulses independently with probability `pulse_prob` per
//! step, sign ±1 with equal odds; a pulse lasts `pulse_len` steps and is
//! followed by `refractory` steps without a new pulse on that channel. From
//! the step after a pulse starts, the channel's target is the sign of its
//! last pulse (0 before the first). The loss is the MSE over every step and
//! channel.

use super::Task;
use crate::models::Batch;
use crate::{Error, Result};
use rand::RngExt;
use sofo_tensor::{rng, Float, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct FlipFlopTask {
    /// Channels b.
    pub bits: usize,
    /// Steps per trial T.
    pub steps: usize,
    pub pulse_prob: f64,
    pub pulse_len: usize,
    pub refractory: usize,
    /// Seed of the held-out trials.
    pub test_seed: u64,
}

impl FlipFlopTask {
    /// tasks.md §4: p = 0.02, pulses 2 steps long, 10 refractory steps.
    pub fn new(bits: usize, steps: usize) -> Self {
        FlipFlopTask {
            bits,
            steps,
            pulse_prob: 0.02,
            pulse_len: 2,
            refractory: 10,
            test_seed: 0x7E57,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.bits == 0 {
            return Err(Error::config("flipflop.bits", self.bits, "at least 1"));
        }
        if self.steps < 2 {
            return Err(Error::config("flipflop.steps", self.steps, "at least 2"));
        }
        if !(self.pulse_prob > 0.0 && self.pulse_prob < 1.0) {
            return Err(Error::config(
                "flipflop.pulse_prob",
                self.pulse_prob,
                "0 < p < 1",
            ));
        }
        if self.pulse_len == 0 {
            return Err(Error::config(
                "flipflop.pulse_len",
                self.pulse_len,
                "at least 1",
            ));
        }
        Ok(())
    }

    /// Inputs and targets [T, M, b] of `trials` trials from stream (seed, stream).
    pub fn generate(&self, trials: usize, seed: u64, stream: u64) -> (Vec<f64>, Vec<f64>) {
        let (t_len, b) = (self.steps, self.bits);
        let mut u = vec![0.0; t_len * trials * b];
        let mut y = vec![0.0; t_len * trials * b];
        for m in 0..trials {
            let mut g = rng::generator(seed, rng::substream(stream, m as u64));
            for c in 0..b {
                let mut busy = 0usize; // steps left in a pulse or its refractory time
                let mut state = 0.0;
                let mut sign = 0.0;
                let mut pulse_left = 0usize;
                for t in 0..t_len {
                    let i = (t * trials + m) * b + c;
                    if pulse_left > 0 {
                        u[i] = sign;
                        pulse_left -= 1;
                    } else if busy == 0 && g.random::<f64>() < self.pulse_prob {
                        sign = if g.random::<f64>() < 0.5 { -1.0 } else { 1.0 };
                        u[i] = sign;
                        pulse_left = self.pulse_len - 1;
                        busy = self.pulse_len + self.refractory;
                        // the target flips from the next step on
                        y[i] = state;
                        state = sign;
                        busy -= 1;
                        continue;
                    }
                    busy = busy.saturating_sub(1);
                    y[i] = state;
                }
            }
        }
        (u, y)
    }

    fn batch<T: Float>(&self, trials: usize, seed: u64, stream: u64) -> Result<Batch<T>> {
        if trials == 0 {
            return Err(Error::config("batch", trials, "at least 1"));
        }
        let (u, y) = self.generate(trials, seed, stream);
        let shape = [self.steps, trials, self.bits];
        Ok(Batch {
            steps: self.steps,
            trials,
            inputs: Some(Tensor::from_f64_slice(&shape, &u)?),
            initial: None,
            targets: Tensor::from_f64_slice(&shape, &y)?,
            weights: None,
            loss_norm: (self.steps * trials * self.bits) as f64,
            noise_seed: rng::substream(seed, stream),
        })
    }
}

impl<T: Float> Task<T> for FlipFlopTask {
    fn name(&self) -> &'static str {
        "flipflop"
    }

    fn train_batch(&self, seed: u64, iteration: u64, trials: usize) -> Result<Batch<T>> {
        self.batch(trials, seed, rng::substream(0xF11F, iteration))
    }

    fn test_batch(&self, trials: usize) -> Result<Batch<T>> {
        self.batch(trials, self.test_seed, 0x7E57)
    }

    fn metric_name(&self) -> Option<&'static str> {
        Some("correct bits")
    }

    fn metric(&self, outputs: &[Tensor<T>], batch: &Batch<T>) -> Option<f64> {
        let out: Vec<f64> = outputs.iter().flat_map(|y| y.to_f64_vec()).collect();
        Some(correct_bits(&out, &batch.targets.to_f64_vec()))
    }
}

/// Share of (step, trial, channel) entries whose output, rounded to the
/// nearest of {−1, 0, 1}, equals the target.
pub fn correct_bits(outputs: &[f64], targets: &[f64]) -> f64 {
    let round = |v: f64| {
        if v > 0.5 {
            1.0
        } else if v < -0.5 {
            -1.0
        } else {
            0.0
        }
    };
    let ok = outputs
        .iter()
        .zip(targets)
        .filter(|(o, t)| round(**o) == **t)
        .count();
    ok as f64 / targets.len().max(1) as f64
}
