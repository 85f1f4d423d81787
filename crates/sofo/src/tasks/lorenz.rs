//! Lorenz attractor from sparse supervision (tasks.md §1).
//!
//! One long RK4 run (σ = 10, ρ = 28, β = 8/3, dt = 0.01) from a seeded start
//! is chopped into bouts of `bout_len + 1` points, shuffled, and split into
//! training and test bouts; every coordinate is z-scored with the run's
//! global mean and std. A trial starts at a bout's first point, runs
//! autonomously `bout_len` steps, and is scored (MSE) on the last point only.

use super::Task;
use crate::models::Batch;
use crate::{Error, Result};
use rand::RngExt;
use sofo_tensor::{rng, Float, Tensor};

const SIGMA: f64 = 10.0;
const RHO: f64 = 28.0;
const BETA: f64 = 8.0 / 3.0;

fn lorenz(s: [f64; 3]) -> [f64; 3] {
    [
        SIGMA * (s[1] - s[0]),
        s[0] * (RHO - s[2]) - s[1],
        s[0] * s[1] - BETA * s[2],
    ]
}

/// One classical RK4 step of the Lorenz system.
pub fn rk4_step(s: [f64; 3], dt: f64) -> [f64; 3] {
    let add =
        |a: [f64; 3], b: [f64; 3], h: f64| [a[0] + h * b[0], a[1] + h * b[1], a[2] + h * b[2]];
    let k1 = lorenz(s);
    let k2 = lorenz(add(s, k1, dt / 2.0));
    let k3 = lorenz(add(s, k2, dt / 2.0));
    let k4 = lorenz(add(s, k3, dt));
    let mut out = s;
    for i in 0..3 {
        out[i] += dt / 6.0 * (k1[i] + 2.0 * k2[i] + 2.0 * k3[i] + k4[i]);
    }
    out
}

/// The z-scored bouts.
#[derive(Debug, Clone)]
pub struct LorenzData {
    pub bout_len: usize,
    /// Training bouts, each `bout_len + 1` points of 3 coordinates.
    pub train: Vec<Vec<[f64; 3]>>,
    pub test: Vec<Vec<[f64; 3]>>,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl LorenzData {
    pub fn generate(
        seed: u64,
        train_bouts: usize,
        test_bouts: usize,
        bout_len: usize,
        dt: f64,
    ) -> Result<Self> {
        if bout_len == 0 {
            return Err(Error::config("task.bout_len", bout_len, "at least 1"));
        }
        if train_bouts == 0 || test_bouts == 0 {
            return Err(Error::config(
                "task.train_bouts/test_bouts",
                format!("{train_bouts}/{test_bouts}"),
                "at least 1 each",
            ));
        }
        if !(dt > 0.0 && dt <= 0.05) {
            return Err(Error::config("task.dt", dt, "0 < dt ≤ 0.05"));
        }
        let mut g = rng::generator(seed, 0x10_4E2);
        let mut s = [
            g.random_range(-15.0..15.0),
            g.random_range(-20.0..20.0),
            g.random_range(5.0..40.0),
        ];
        // settle onto the attractor
        for _ in 0..(10.0 / dt) as usize {
            s = rk4_step(s, dt);
        }
        let n_bouts = train_bouts + test_bouts;
        let pts = bout_len + 1;
        let mut run = Vec::with_capacity(n_bouts * pts);
        for _ in 0..n_bouts * pts {
            run.push(s);
            s = rk4_step(s, dt);
        }
        let n = run.len() as f64;
        let mut mean = [0.0; 3];
        let mut std = [0.0; 3];
        for i in 0..3 {
            mean[i] = run.iter().map(|p| p[i]).sum::<f64>() / n;
            std[i] = (run.iter().map(|p| (p[i] - mean[i]).powi(2)).sum::<f64>() / n).sqrt();
        }
        let mut bouts: Vec<Vec<[f64; 3]>> = run
            .chunks(pts)
            .map(|c| {
                c.iter()
                    .map(|p| [0, 1, 2].map(|i| (p[i] - mean[i]) / std[i]))
                    .collect()
            })
            .collect();
        // Fisher-Yates shuffle, seeded
        for i in (1..bouts.len()).rev() {
            let j = g.random_range(0..=i);
            bouts.swap(i, j);
        }
        let test = bouts.split_off(train_bouts);
        Ok(LorenzData {
            bout_len,
            train: bouts,
            test,
            mean,
            std,
        })
    }
}

pub struct LorenzTask {
    pub data: LorenzData,
}

impl LorenzTask {
    fn batch<T: Float>(&self, bouts: &[&Vec<[f64; 3]>]) -> Result<Batch<T>> {
        let m = bouts.len();
        let t = self.data.bout_len;
        let mut init = Vec::with_capacity(m * 3);
        let mut targets = vec![0.0; t * m * 3];
        let mut weights = vec![0.0; t * m];
        for (j, b) in bouts.iter().enumerate() {
            init.extend_from_slice(&b[0]);
            targets[((t - 1) * m + j) * 3..((t - 1) * m + j + 1) * 3].copy_from_slice(&b[t]);
            weights[(t - 1) * m + j] = 1.0;
        }
        Ok(Batch {
            steps: t,
            trials: m,
            inputs: None,
            initial: Some(Tensor::from_f64_slice(&[m, 3], &init)?),
            targets: Tensor::from_f64_slice(&[t, m, 3], &targets)?,
            weights: Some(Tensor::from_f64_slice(&[t, m], &weights)?),
            loss_norm: (m * 3) as f64,
            noise_seed: 0,
        })
    }
}

impl<T: Float> Task<T> for LorenzTask {
    fn name(&self) -> &'static str {
        "lorenz"
    }

    fn train_batch(&self, seed: u64, iteration: u64, trials: usize) -> Result<Batch<T>> {
        if trials == 0 {
            return Err(Error::config("batch", trials, "at least 1"));
        }
        let mut g = rng::generator(seed, rng::substream(0xBA7C, iteration));
        let n = self.data.train.len();
        let bouts: Vec<&Vec<[f64; 3]>> = (0..trials)
            .map(|_| &self.data.train[g.random_range(0..n)])
            .collect();
        self.batch(&bouts)
    }

    fn test_batch(&self, trials: usize) -> Result<Batch<T>> {
        let n = trials.min(self.data.test.len());
        let bouts: Vec<&Vec<[f64; 3]>> = self.data.test[..n].iter().collect();
        self.batch(&bouts)
    }
}
