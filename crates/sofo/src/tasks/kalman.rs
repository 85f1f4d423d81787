//! Adaptive Kalman filtering over a long horizon (tasks.md §3).
//!
//! A 1-d latent x with observations y, per trial:
//!   x_{t+1} = x_t + (b − x_t)/τ + σ_ε ε_t,  σ_ε = √(2/τ − 1/τ²)  (stationary variance 1)
//!   y_t = x_t + β ξ_t
//! with (τ, b, β) ~ U(tau_range) × U(b_range) × U(beta_range). A segment
//! keeps its parameters for at least `min_dwell` steps; after that each step
//! redraws them with probability `switch_prob`. At the start of a trial and
//! at every switch, x is drawn afresh from N(b, 1). The network sees y_t and
//! reports x̂_t, scored by the MSE against x_t at every step.
//!
//! Two reference filters (estimate of x_t from y_0..y_t): the oracle that
//! knows each segment's parameters and start, and one that assumes the
//! prior-mean parameters throughout and knows of no switches.

use super::Task;
use crate::models::Batch;
use crate::{Error, Result};
use rand::RngExt;
use sofo_tensor::{rng, Float, Tensor};

/// One stretch of a trial under fixed parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// First step (the step at which x was drawn from N(b, 1)).
    pub start: usize,
    /// Time constant τ ≥ 1.
    pub tau: f64,
    /// Mean b.
    pub b: f64,
    /// Observation noise standard deviation β.
    pub beta: f64,
}

impl Segment {
    /// a = 1 − 1/τ: x_{t+1} − b = a (x_t − b) + σ_ε ε_t.
    pub fn decay(&self) -> f64 {
        1.0 - 1.0 / self.tau
    }

    /// σ_ε = √(2/τ − 1/τ²) = √(1 − a²), so that the stationary variance is 1.
    pub fn process_std(&self) -> f64 {
        (2.0 / self.tau - 1.0 / (self.tau * self.tau))
            .max(0.0)
            .sqrt()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct KalmanTask {
    /// The task's name ("kalman", or "kalman-long" for the long horizon).
    pub name: &'static str,
    /// Steps per trial T.
    pub steps: usize,
    /// Least steps under one set of parameters before a switch may happen.
    pub min_dwell: usize,
    /// Per-step probability of a switch once `min_dwell` steps have passed.
    pub switch_prob: f64,
    pub tau_range: (f64, f64),
    pub b_range: (f64, f64),
    pub beta_range: (f64, f64),
    /// Seed of the held-out trials.
    pub test_seed: u64,
}

/// The trials of one batch with everything a reference filter or a picture
/// needs. Series are step-major, [T, M], like the batches' tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct KalmanTrials {
    pub steps: usize,
    pub trials: usize,
    /// The latent x, [T, M].
    pub x: Vec<f64>,
    /// The observations y, [T, M].
    pub y: Vec<f64>,
    /// Per trial, its segments in order; the first starts at step 0.
    pub segments: Vec<Vec<Segment>>,
    /// The prior-mean parameters of the generating task (centres of its
    /// ranges), for [`prior_mean_estimates`].
    pub prior_mean: Segment,
    /// The batch's [`Batch::noise_seed`].
    pub noise_seed: u64,
}

/// Per-step MSE of the two reference filters and of the raw observation on
/// the same trials.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KalmanReferences {
    pub oracle: f64,
    pub prior_mean: f64,
    pub observation: f64,
}

/// U(lo, hi); a degenerate range gives lo (`random_range` would panic).
fn uniform<R: rand::Rng>(g: &mut R, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * g.random::<f64>()
}

fn normal<R: rand::Rng>(g: &mut R) -> f64 {
    g.sample(rand_distr::StandardNormal)
}

fn check_range(field: &str, (lo, hi): (f64, f64), min: f64, allowed: &str) -> Result<()> {
    if !(lo.is_finite() && hi.is_finite() && lo >= min && lo <= hi) {
        return Err(Error::config(
            format!("kalman.{field}"),
            format!("({lo}, {hi})"),
            allowed,
        ));
    }
    Ok(())
}

impl KalmanTask {
    /// tasks.md §3: τ ~ U[1, 10], b ~ U[−3, 3], β ~ U[0.1, 3]; at least
    /// 100 steps per segment, then a switch with probability 1/100 per step.
    pub fn new(steps: usize) -> Self {
        KalmanTask {
            name: "kalman",
            steps,
            min_dwell: 100,
            switch_prob: 0.01,
            tau_range: (1.0, 10.0),
            b_range: (-3.0, 3.0),
            beta_range: (0.1, 3.0),
            test_seed: 0x7E57,
        }
    }

    /// The long horizon of tasks.md §3, T = 5000.
    pub fn long() -> Self {
        KalmanTask {
            name: "kalman-long",
            ..KalmanTask::new(5000)
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::config("kalman.steps", self.steps, "at least 1"));
        }
        if self.min_dwell == 0 {
            return Err(Error::config(
                "kalman.min_dwell",
                self.min_dwell,
                "at least 1",
            ));
        }
        if !(0.0..=1.0).contains(&self.switch_prob) {
            return Err(Error::config(
                "kalman.switch_prob",
                self.switch_prob,
                "0 ≤ p ≤ 1",
            ));
        }
        // τ < 1 would make the decay 1 − 1/τ negative (and σ_ε² < 0 below 1/2)
        check_range(
            "tau_range",
            self.tau_range,
            1.0,
            "finite (lo, hi) with 1 ≤ lo ≤ hi",
        )?;
        check_range(
            "b_range",
            self.b_range,
            f64::NEG_INFINITY,
            "finite (lo, hi) with lo ≤ hi",
        )?;
        check_range(
            "beta_range",
            self.beta_range,
            0.0,
            "finite (lo, hi) with 0 ≤ lo ≤ hi",
        )?;
        Ok(())
    }

    /// The centres of the parameter ranges (τ = 5.5, b = 0, β = 1.55 by
    /// default), as a segment starting at step 0.
    pub fn prior_mean(&self) -> Segment {
        let mid = |(lo, hi): (f64, f64)| 0.5 * (lo + hi);
        Segment {
            start: 0,
            tau: mid(self.tau_range),
            b: mid(self.b_range),
            beta: mid(self.beta_range),
        }
    }

    /// `trials` trials from stream (seed, stream); trial j uses its own
    /// generator, so it does not depend on how many trials are drawn.
    pub fn generate(&self, trials: usize, seed: u64, stream: u64) -> Result<KalmanTrials> {
        self.validate()?;
        if trials == 0 {
            return Err(Error::config("batch", trials, "at least 1"));
        }
        let t_len = self.steps;
        let mut x = vec![0.0; t_len * trials];
        let mut y = vec![0.0; t_len * trials];
        let mut segments = Vec::with_capacity(trials);
        for m in 0..trials {
            let mut g = rng::generator(seed, rng::substream(stream, m as u64));
            let draw = |g: &mut _, start| Segment {
                start,
                tau: uniform(g, self.tau_range),
                b: uniform(g, self.b_range),
                beta: uniform(g, self.beta_range),
            };
            let mut seg = draw(&mut g, 0);
            let mut segs = vec![seg];
            let mut xt = seg.b + normal(&mut g);
            for t in 0..t_len {
                if t > 0 {
                    if t - seg.start >= self.min_dwell && g.random::<f64>() < self.switch_prob {
                        seg = draw(&mut g, t);
                        segs.push(seg);
                        xt = seg.b + normal(&mut g);
                    } else {
                        xt += (seg.b - xt) / seg.tau + seg.process_std() * normal(&mut g);
                    }
                }
                x[t * trials + m] = xt;
                y[t * trials + m] = xt + seg.beta * normal(&mut g);
            }
            segments.push(segs);
        }
        Ok(KalmanTrials {
            steps: t_len,
            trials,
            x,
            y,
            segments,
            prior_mean: self.prior_mean(),
            noise_seed: rng::substream(seed, stream),
        })
    }

    /// The trials of [`Task::train_batch`] (seed, iteration).
    pub fn train_trials(&self, seed: u64, iteration: u64, trials: usize) -> Result<KalmanTrials> {
        self.generate(trials, seed, rng::substream(0x4A1F, iteration))
    }

    /// The trials of [`Task::test_batch`].
    pub fn test_trials(&self, trials: usize) -> Result<KalmanTrials> {
        self.generate(trials, self.test_seed, 0x7E57)
    }
}

impl KalmanTrials {
    /// Inputs y [T, M, 1], targets x [T, M, 1], every step scored, the loss
    /// normalised by T·M (so it is the per-step MSE).
    pub fn batch<T: Float>(&self) -> Result<Batch<T>> {
        let shape = [self.steps, self.trials, 1];
        Ok(Batch {
            steps: self.steps,
            trials: self.trials,
            inputs: Some(Tensor::from_f64_slice(&shape, &self.y)?),
            initial: None,
            targets: Tensor::from_f64_slice(&shape, &self.x)?,
            weights: None,
            loss_norm: (self.steps * self.trials) as f64,
            noise_seed: self.noise_seed,
        })
    }

    /// Trial j's series from a [T, M] array (x, y or estimates).
    pub fn series(&self, values: &[f64], trial: usize) -> Vec<f64> {
        (0..self.steps)
            .map(|t| values[t * self.trials + trial])
            .collect()
    }

    /// The segment in force at step t of trial j.
    pub fn segment_at(&self, trial: usize, t: usize) -> &Segment {
        let segs = &self.segments[trial];
        let i = segs.partition_point(|s| s.start <= t);
        &segs[i - 1]
    }

    /// Per-step MSE of estimates [T, M] against x.
    pub fn mse(&self, estimates: &[f64]) -> f64 {
        per_step_mse(estimates, &self.x)
    }

    pub fn oracle_mse(&self) -> f64 {
        self.mse(&oracle_estimates(self))
    }

    pub fn prior_mean_mse(&self) -> f64 {
        self.mse(&prior_mean_estimates(self))
    }

    /// The MSE of reporting y_t itself.
    pub fn observation_mse(&self) -> f64 {
        self.mse(&self.y)
    }

    pub fn references(&self) -> KalmanReferences {
        KalmanReferences {
            oracle: self.oracle_mse(),
            prior_mean: self.prior_mean_mse(),
            observation: self.observation_mse(),
        }
    }
}

/// Mean of (a − b)² over all entries.
pub fn per_step_mse(a: &[f64], b: &[f64]) -> f64 {
    let s: f64 = a.iter().zip(b).map(|(p, q)| (p - q) * (p - q)).sum();
    s / a.len().max(1) as f64
}

/// The filtering distribution N(mean_t, var_t) of x_t given y_0..y_t for
/// one trial whose parameters follow `segments` (sorted, the first at step
/// 0). The prior of x_t is N(b, 1) at a segment's start, independent of the
/// past (the generator redraws x there), and within a segment the prediction
///   m ← b + a (m − b),  P ← a² P + σ_ε²;
/// then every step updates with y_t:
///   k = P / (P + β²),  m ← m + k (y_t − m),  P ← (1 − k) P.
///
/// Panics if `segments` is empty or the first does not start at step 0.
pub fn filter_trial(segments: &[Segment], y: &[f64]) -> (Vec<f64>, Vec<f64>) {
    assert!(
        segments.first().is_some_and(|s| s.start == 0),
        "filter_trial: the first segment must start at step 0"
    );
    let mut means = Vec::with_capacity(y.len());
    let mut vars = Vec::with_capacity(y.len());
    let (mut m, mut p) = (0.0, 0.0);
    let mut next = 0;
    let mut seg = segments[0];
    for (t, &yt) in y.iter().enumerate() {
        if next < segments.len() && segments[next].start == t {
            seg = segments[next];
            next += 1;
            m = seg.b;
            p = 1.0;
        } else {
            let a = seg.decay();
            m = seg.b + a * (m - seg.b);
            p = a * a * p + seg.process_std().powi(2);
        }
        let r = seg.beta * seg.beta;
        // P = β = 0 only if σ_ε² underflows (τ huge): then x is known
        let k = if p + r > 0.0 { p / (p + r) } else { 1.0 };
        m += k * (yt - m);
        p *= 1.0 - k;
        means.push(m);
        vars.push(p);
    }
    (means, vars)
}

fn run_filter(trials: &KalmanTrials, segments_of: impl Fn(usize) -> Vec<Segment>) -> Vec<f64> {
    let mut out = vec![0.0; trials.steps * trials.trials];
    for j in 0..trials.trials {
        let (means, _) = filter_trial(&segments_of(j), &trials.series(&trials.y, j));
        for (t, v) in means.into_iter().enumerate() {
            out[t * trials.trials + j] = v;
        }
    }
    out
}

/// The oracle's estimates of x_t from y_0..y_t, [T, M]: it knows every
/// segment's parameters and start.
pub fn oracle_estimates(trials: &KalmanTrials) -> Vec<f64> {
    run_filter(trials, |j| trials.segments[j].clone())
}

/// Estimates [T, M] of a filter that assumes the prior-mean parameters for
/// the whole trial (stationary start N(b̄, 1)) and knows no switches.
pub fn prior_mean_estimates(trials: &KalmanTrials) -> Vec<f64> {
    run_filter(trials, |_| vec![trials.prior_mean])
}

impl<T: Float> Task<T> for KalmanTask {
    fn name(&self) -> &'static str {
        self.name
    }

    fn train_batch(&self, seed: u64, iteration: u64, trials: usize) -> Result<Batch<T>> {
        self.train_trials(seed, iteration, trials)?.batch()
    }

    fn test_batch(&self, trials: usize) -> Result<Batch<T>> {
        self.test_trials(trials)?.batch()
    }

    fn metric_name(&self) -> Option<&'static str> {
        Some("per-step MSE")
    }

    /// The network's per-step MSE over every step and trial.
    fn metric(&self, outputs: &[Tensor<T>], batch: &Batch<T>) -> Option<f64> {
        let out: Vec<f64> = outputs.iter().flat_map(|y| y.to_f64_vec()).collect();
        let target = batch.targets.to_f64_vec();
        if out.len() != target.len() {
            return None;
        }
        Some(per_step_mse(&out, &target))
    }
}
