//! The first-order baselines: Adam and SGD with momentum on the BPTT
//! gradient, and forward-gradient descent (FGD) on SOFO's tangents; with
//! learning-rate schedules and gradient-norm clipping (method.md,
//! "Baselines").

use super::sofo::{Sofo, SofoConfig, StepReport, TangentKind};
use super::Optimizer;
use crate::models::{Batch, Model};
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_tensor::{Float, Tensor};

/// How the learning rate changes with the iteration.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant,
    /// lr · decay^iteration
    Exponential {
        decay: f64,
    },
    /// From lr down to lr · floor over `total` iterations, half a cosine.
    Cosine {
        total: usize,
        floor: f64,
    },
}

/// A learning rate: base value, schedule, and an optional linear warm-up.
#[derive(Debug, Clone, PartialEq)]
pub struct LearningRate {
    pub base: f64,
    pub schedule: Schedule,
    /// Iterations of linear warm-up from 0 (0 = none).
    pub warmup: usize,
}

impl LearningRate {
    pub fn constant(base: f64) -> Self {
        LearningRate {
            base,
            schedule: Schedule::Constant,
            warmup: 0,
        }
    }

    pub fn at(&self, it: usize) -> f64 {
        let s = match self.schedule {
            Schedule::Constant => 1.0,
            Schedule::Exponential { decay } => decay.powi(it as i32),
            Schedule::Cosine { total, floor } => {
                let x = (it as f64 / total.max(1) as f64).min(1.0);
                floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos())
            }
        };
        let w = if self.warmup > 0 {
            ((it + 1) as f64 / self.warmup as f64).min(1.0)
        } else {
            1.0
        };
        self.base * s * w
    }

    pub fn validate(&self, field: &str) -> Result<()> {
        if !(self.base > 0.0 && self.base.is_finite()) {
            return Err(Error::config(
                format!("{field}.lr"),
                self.base,
                "a finite value > 0",
            ));
        }
        match self.schedule {
            Schedule::Exponential { decay } if !(decay > 0.0 && decay <= 1.0) => Err(
                Error::config(format!("{field}.decay"), decay, "0 < decay ≤ 1"),
            ),
            Schedule::Cosine { floor, .. } if !(0.0..=1.0).contains(&floor) => Err(Error::config(
                format!("{field}.lr_floor"),
                floor,
                "0 ≤ floor ≤ 1",
            )),
            _ => Ok(()),
        }
    }
}

/// x > 0 (false for NaN).
fn positive(x: f64) -> bool {
    x > 0.0
}

/// Scales `grads` so that their global norm is at most `max_norm`.
fn clip<T: Float>(grads: &mut [Tensor<T>], max_norm: Option<f64>) -> f64 {
    let norm = grads
        .iter()
        .flat_map(|g| g.data().iter())
        .map(|v| v.to_f64() * v.to_f64())
        .sum::<f64>()
        .sqrt();
    if let Some(m) = max_norm {
        if norm > m {
            let s = T::from_f64(m / norm);
            for g in grads.iter_mut() {
                g.data_mut().iter_mut().for_each(|v| *v *= s);
            }
        }
    }
    norm
}

/// The clipped BPTT gradient, or `Err(loss)` when it or the loss is not
/// finite (the step is then skipped).
#[allow(clippy::type_complexity)]
fn bptt_gradient<T: Float, M: Model<T>>(
    device: &crate::Device,
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
    max_norm: Option<f64>,
) -> Result<std::result::Result<(f64, Vec<Tensor<T>>), f64>> {
    let (loss, mut grads) = device.gradient(model, params, batch)?;
    if !loss.is_finite() || grads.iter().any(|g| !g.is_finite()) {
        return Ok(Err(loss));
    }
    // what cannot move does not count towards the clipping norm (nor
    // towards Adam's moments)
    for (g, p) in grads.iter_mut().zip(params.iter()) {
        if !p.mode.trainable() {
            g.data_mut().iter_mut().for_each(|v| *v = T::zero());
        } else if let Some(frozen) = params.frozen_entries(&p.name) {
            for (v, &f) in g.data_mut().iter_mut().zip(frozen) {
                if f {
                    *v = T::zero();
                }
            }
        }
    }
    clip(&mut grads, max_norm);
    Ok(Ok((loss, grads)))
}

fn zeros_like<T: Float>(params: &ParamSet<T>) -> Vec<Tensor<T>> {
    params
        .iter()
        .map(|p| Tensor::zeros(p.value.shape()))
        .collect()
}

fn applied(loss: f64) -> Result<StepReport> {
    Ok(StepReport {
        loss,
        max_eigenvalue: f64::NAN,
        applied: true,
    })
}

fn skipped(loss: f64) -> Result<StepReport> {
    Ok(StepReport {
        loss,
        max_eigenvalue: f64::NAN,
        applied: false,
    })
}

#[derive(Debug, Clone)]
pub struct AdamConfig {
    pub lr: LearningRate,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the gradient's global norm to this (None: no clipping).
    pub clip: Option<f64>,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            lr: LearningRate::constant(1e-3),
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: None,
        }
    }
}

/// Adam on the BPTT gradient, with standard bias correction.
pub struct Adam<T: Float> {
    pub config: AdamConfig,
    device: crate::Device,
    m: Vec<Tensor<T>>,
    v: Vec<Tensor<T>>,
    t: i32,
}

impl<T: Float> Adam<T> {
    pub fn new(config: AdamConfig) -> Result<Self> {
        config.lr.validate("adam")?;
        if !(0.0..1.0).contains(&config.beta1) {
            return Err(Error::config("adam.beta1", config.beta1, "0 ≤ β1 < 1"));
        }
        if !(0.0..1.0).contains(&config.beta2) {
            return Err(Error::config("adam.beta2", config.beta2, "0 ≤ β2 < 1"));
        }
        if !positive(config.eps) {
            return Err(Error::config("adam.eps", config.eps, "> 0"));
        }
        if config.clip.is_some_and(|c| !positive(c)) {
            return Err(Error::config("adam.clip", config.clip.unwrap(), "> 0"));
        }
        Ok(Adam {
            config,
            device: crate::Device::Cpu,
            m: vec![],
            v: vec![],
            t: 0,
        })
    }
}

impl<T: Float> Adam<T> {
    /// Backpropagates on `device` (the update itself is a few vector ops
    /// on the host).
    pub fn on(mut self, device: crate::Device) -> Self {
        self.device = device;
        self
    }
}

impl<T: Float> Optimizer<T> for Adam<T> {
    fn name(&self) -> &'static str {
        "adam"
    }

    fn step<M: Model<T>>(
        &mut self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        _seed: u64,
        iteration: u64,
    ) -> Result<StepReport> {
        let (loss, grads) =
            match bptt_gradient(&self.device, model, params, batch, self.config.clip)? {
                Ok(g) => g,
                Err(loss) => return skipped(loss),
            };
        if self.m.is_empty() {
            self.m = zeros_like(params);
            self.v = zeros_like(params);
        }
        let c = &self.config;
        let t = self.t + 1;
        let (b1, b2) = (c.beta1, c.beta2);
        let lr = c.lr.at(iteration as usize);
        let (bc1, bc2) = (1.0 - b1.powi(t), 1.0 - b2.powi(t));
        let mut new_m = Vec::with_capacity(grads.len());
        let mut new_v = Vec::with_capacity(grads.len());
        let mut updates = Vec::with_capacity(grads.len());
        for (i, (p, g)) in params.iter().zip(&grads).enumerate() {
            let m = self.m[i].zip_map(g, "adam", |m, g| {
                T::from_f64(b1 * m.to_f64() + (1.0 - b1) * g.to_f64())
            })?;
            let v = self.v[i].zip_map(g, "adam", |v, g| {
                let g = g.to_f64();
                T::from_f64(b2 * v.to_f64() + (1.0 - b2) * g * g)
            })?;
            updates.push(if p.mode.trainable() {
                Some(m.zip_map(&v, "adam", |m, v| {
                    T::from_f64(lr * (m.to_f64() / bc1) / ((v.to_f64() / bc2).sqrt() + c.eps))
                })?)
            } else {
                None
            });
            new_m.push(m);
            new_v.push(v);
        }
        if params.apply_updates(&updates, T::one()).is_err() {
            return skipped(loss);
        }
        self.m = new_m;
        self.v = new_v;
        self.t = t;
        applied(loss)
    }
}

#[derive(Debug, Clone)]
pub struct SgdConfig {
    pub lr: LearningRate,
    /// Heavy-ball momentum μ: b ← μ b + g; θ ← θ − lr b.
    pub momentum: f64,
    pub clip: Option<f64>,
}

/// SGD with momentum on the BPTT gradient.
pub struct Sgd<T: Float> {
    pub config: SgdConfig,
    device: crate::Device,
    buf: Vec<Tensor<T>>,
}

impl<T: Float> Sgd<T> {
    pub fn new(config: SgdConfig) -> Result<Self> {
        config.lr.validate("sgd")?;
        if !(0.0..1.0).contains(&config.momentum) {
            return Err(Error::config(
                "sgd.momentum",
                config.momentum,
                "0 ≤ momentum < 1",
            ));
        }
        if config.clip.is_some_and(|c| !positive(c)) {
            return Err(Error::config("sgd.clip", config.clip.unwrap(), "> 0"));
        }
        Ok(Sgd {
            config,
            device: crate::Device::Cpu,
            buf: vec![],
        })
    }
}

impl<T: Float> Sgd<T> {
    /// Backpropagates on `device`.
    pub fn on(mut self, device: crate::Device) -> Self {
        self.device = device;
        self
    }
}

impl<T: Float> Optimizer<T> for Sgd<T> {
    fn name(&self) -> &'static str {
        "sgd"
    }

    fn step<M: Model<T>>(
        &mut self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        _seed: u64,
        iteration: u64,
    ) -> Result<StepReport> {
        let (loss, grads) =
            match bptt_gradient(&self.device, model, params, batch, self.config.clip)? {
                Ok(g) => g,
                Err(loss) => return skipped(loss),
            };
        if self.buf.is_empty() {
            self.buf = zeros_like(params);
        }
        let mu = T::from_f64(self.config.momentum);
        let lr = T::from_f64(self.config.lr.at(iteration as usize));
        let mut new_b = Vec::with_capacity(grads.len());
        let mut updates = Vec::with_capacity(grads.len());
        for (i, (p, g)) in params.iter().zip(&grads).enumerate() {
            let b = self.buf[i].zip_map(g, "sgd", |b, g| mu * b + g)?;
            updates.push(p.mode.trainable().then(|| b.scale(lr)));
            new_b.push(b);
        }
        if params.apply_updates(&updates, T::one()).is_err() {
            return skipped(loss);
        }
        self.buf = new_b;
        applied(loss)
    }
}

#[derive(Debug, Clone)]
pub struct FgdConfig {
    /// Tangents per iteration (K = 1 is the classic forward gradient).
    pub k: usize,
    pub lr: LearningRate,
}

/// Forward-gradient descent: with K unit-norm tangents V and C = Vᵀ∇c from
/// one forward-K pass, g ≈ (P/K) V C, and θ ← θ − lr g.
pub struct Fgd {
    pub config: FgdConfig,
    sampler: Sofo,
}

impl Fgd {
    pub fn new(config: FgdConfig) -> Result<Self> {
        config.lr.validate("fgd")?;
        let sampler = Sofo::new(SofoConfig {
            k: config.k,
            tangents: TangentKind::UnitNorm,
            ..SofoConfig::default()
        })
        .map_err(|_| Error::config("fgd.tangents", config.k, "K ≥ 1"))?;
        Ok(Fgd { config, sampler })
    }

    /// Runs the passes on `device`.
    pub fn on(mut self, device: crate::Device) -> Self {
        self.sampler = self.sampler.on(device);
        self
    }
}

impl<T: Float> Optimizer<T> for Fgd {
    fn name(&self) -> &'static str {
        "fgd"
    }

    fn step<M: Model<T>>(
        &mut self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        seed: u64,
        iteration: u64,
    ) -> Result<StepReport> {
        let tg = self.sampler.sample_tangents(params, seed, iteration)?;
        let sketch = match self.sampler.sketch(model, params, &tg, batch) {
            Ok(s) => s,
            Err(Error::NonFinite(_)) => return skipped(f64::NAN),
            Err(e) => return Err(e),
        };
        // E[V VᵀP/K] = I over the entries the directions span (frozen ones
        // excluded)
        let p = params.free_count() as f64;
        let scale = p / tg.k as f64 * self.config.lr.at(iteration as usize);
        let coeff: Vec<f64> = sketch.c.iter().map(|c| c * scale).collect();
        let step = self.sampler.expand(params, &tg, coeff)?;
        if params.apply_updates(&step, T::one()).is_err() {
            return skipped(sketch.loss);
        }
        applied(sketch.loss)
    }
}
