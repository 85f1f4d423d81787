//! The SOFO optimiser (method.md, Algorithm 1).
//!
//! One iteration: draw K directions V in parameter space; run the model once
//! under forward-K with V as the parameter tangents, collecting the sketch
//! (c, C = Vᵀ∇c, G̃ = VᵀGV); solve the damped Newton system in span(V); move
//! θ ← θ − η V U (S + γ)⁻¹ Uᵀ C. Each stage is public so a step can be
//! checked from outside: [`Sofo::sample_tangents`] or [`Sofo::tangents_from`],
//! [`Sofo::sketch`], [`Sofo::propose`], [`Sofo::apply`].

use super::phases::{Laps, PhaseClock, SofoPhases};
use crate::device::Device;
use crate::loss::Sketch;
use crate::models::{Batch, Model};
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_ad::layout::{split3, tangent_shape};
use sofo_ad::Dual;
use sofo_tensor::backend::{Cpu, Gemm, Kernels, Mat};
use sofo_tensor::{eigen, rng, Float, Tensor};
use std::sync::Mutex;

/// How the K random directions are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TangentKind {
    /// Orthonormal across all parameter tensors together (VVᵀ = I).
    Orthonormal,
    /// Each direction scaled to unit norm.
    UnitNorm,
    /// Raw N(0, 1) entries.
    Raw,
}

impl TangentKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "orthonormal" => Ok(TangentKind::Orthonormal),
            "unit-norm" => Ok(TangentKind::UnitNorm),
            "raw" => Ok(TangentKind::Raw),
            _ => Err(Error::config(
                "sofo.tangents",
                s,
                "orthonormal, unit-norm or raw",
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TangentKind::Orthonormal => "orthonormal",
            TangentKind::UnitNorm => "unit-norm",
            TangentKind::Raw => "raw",
        }
    }
}

/// Damping γ added to the eigenvalues of G̃.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Damping {
    None,
    /// γ = λ · largest eigenvalue (the paper's choice).
    RelativeLargest(f64),
    /// γ = λ · smallest eigenvalue (clamped at 0).
    RelativeSmallest(f64),
}

#[derive(Debug, Clone)]
pub struct SofoConfig {
    /// Number of tangents K.
    pub k: usize,
    pub tangents: TangentKind,
    pub damping: Damping,
    /// Use (S + γ)^{-1/2} instead of (S + γ)^{-1}.
    pub sqrt: bool,
    /// Learning rate η (1 = the exact Gauss-Newton step in the subspace).
    pub lr: f64,
}

impl Default for SofoConfig {
    fn default() -> Self {
        SofoConfig {
            k: 64,
            tangents: TangentKind::Orthonormal,
            damping: Damping::RelativeLargest(1e-5),
            sqrt: false,
            lr: 1.0,
        }
    }
}

impl SofoConfig {
    pub fn validate(&self) -> Result<()> {
        if self.k == 0 {
            return Err(Error::config("sofo.tangents", self.k, "K ≥ 1"));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(Error::config("sofo.lr", self.lr, "a finite value > 0"));
        }
        match self.damping {
            Damping::RelativeLargest(l) | Damping::RelativeSmallest(l)
                if !(l >= 0.0 && l.is_finite()) =>
            {
                Err(Error::config("sofo.damping", l, "a finite value ≥ 0"))
            }
            _ => Ok(()),
        }
    }
}

/// K directions in parameter space.
#[derive(Debug, Clone)]
pub struct Tangents<T: Float> {
    pub k: usize,
    /// [K, P]: row k is direction k over the trainable parameters, in order.
    pub flat: Tensor<T>,
    /// Per parameter tensor: its K tangents in the forward engine's layout
    /// (`None` for pinned tensors).
    pub per_param: Vec<Option<Tensor<T>>>,
}

/// The solution of one sketch, before it is applied.
#[derive(Debug, Clone)]
pub struct Proposal<T: Float> {
    /// Coefficients of the step in the tangent basis: Δ = Σ_k coeff_k V_k.
    pub coeff: Vec<f64>,
    /// Δ per parameter tensor (`None` for pinned); θ ← θ − η Δ.
    pub step: Vec<Option<Tensor<T>>>,
    /// Eigenvalues of G̃, ascending.
    pub eigenvalues: Vec<f64>,
    /// γ used.
    pub damping: f64,
}

/// What one iteration did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub loss: f64,
    /// Largest eigenvalue of G̃.
    pub max_eigenvalue: f64,
    /// Whether the update was applied (false: a non-finite value was caught).
    pub applied: bool,
}

pub struct Sofo {
    pub config: SofoConfig,
    /// Where the forward-K passes run (default: the CPU).
    pub device: Device,
    /// Whether the iterations time their phases ([`Sofo::time_phases`]).
    phases: Mutex<PhaseClock>,
}

impl Sofo {
    pub fn new(config: SofoConfig) -> Result<Self> {
        config.validate()?;
        Ok(Sofo {
            config,
            device: Device::Cpu,
            phases: Mutex::default(),
        })
    }

    /// Starts (from zero) or stops timing where this optimiser's iterations
    /// spend their time ([`SofoPhases`]). On a GPU each timed iteration
    /// synchronises the device three more times: a diagnosis, not the
    /// timing of the iterations themselves.
    pub fn time_phases(&self, on: bool) {
        self.phases
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set(on);
    }

    /// The phases' sums since [`Sofo::time_phases`] last turned timing on.
    pub fn phases(&self) -> SofoPhases {
        self.phases.lock().unwrap_or_else(|e| e.into_inner()).sums()
    }

    /// An iteration's phase laps (`sync` waits for the device's work).
    pub(crate) fn laps(&self, sync: impl FnOnce() -> Result<()>) -> Result<Laps<'_>> {
        Laps::start(&self.phases, sync)
    }

    /// Runs the passes on `device`.
    pub fn on(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    /// Draws the tangents of iteration `iteration` from `seed`.
    pub fn sample_tangents<T: Float>(
        &self,
        params: &ParamSet<T>,
        seed: u64,
        iteration: u64,
    ) -> Result<Tangents<T>> {
        let k = self.config.k;
        let p = params.trainable_count();
        let free = params.free_count();
        if self.config.tangents != TangentKind::Raw && k > free {
            return Err(Error::config(
                "sofo.tangents",
                k,
                format!("K ≤ {free}, the trainable entries that are not frozen"),
            ));
        }
        let mut flat = Tensor::<T>::scratch(&[k, p]);
        rng::fill_normal(flat.data_mut(), seed, rng::substream(0x7A46, iteration));
        // directions live in the trainable entries only
        params.zero_frozen(flat.data_mut(), k);
        match self.config.tangents {
            TangentKind::Raw => {}
            TangentKind::UnitNorm => {
                for row in flat.data_mut().chunks_mut(p.max(1)) {
                    let nrm = row
                        .iter()
                        .map(|v| v.to_f64() * v.to_f64())
                        .sum::<f64>()
                        .sqrt();
                    let s = T::from_f64(1.0 / nrm);
                    row.iter_mut().for_each(|v| *v *= s);
                }
            }
            TangentKind::Orthonormal => {
                let ortho = orthonormalize(&flat, k, p)?;
                std::mem::replace(&mut flat, ortho).free();
            }
        }
        self.tangents_from(params, flat)
    }

    /// Tangents supplied by the caller: `flat` is [K, P] over the trainable
    /// parameters in order.
    pub fn tangents_from<T: Float>(
        &self,
        params: &ParamSet<T>,
        flat: Tensor<T>,
    ) -> Result<Tangents<T>> {
        let p = params.trainable_count();
        if flat.rank() != 2 || flat.shape()[1] != p {
            return Err(Error::config(
                "tangents",
                format!("shape {:?}", flat.shape()),
                format!("[K, {p}] (K directions over the P trainable scalars)"),
            ));
        }
        let k = flat.shape()[0];
        let mut per_param = Vec::with_capacity(params.len());
        let mut off = 0;
        for prm in params.iter() {
            if !prm.mode.trainable() {
                per_param.push(None);
                continue;
            }
            // gather straight into the layout [a, K, l]: row (a, k) of the
            // tangents is the slice [a·l, (a+1)·l) of direction k
            let shape = prm.value.shape();
            let (a, _, l) = split3(shape, k);
            let mut t = Tensor::<T>::scratch(&tangent_shape(shape, k));
            let fd = flat.data();
            for (row, dst) in t.data_mut().chunks_mut(l.max(1)).enumerate() {
                let (ai, kk) = (row / k, row % k);
                let src = kk * p + off + ai * l;
                dst.copy_from_slice(&fd[src..src + l]);
            }
            debug_assert_eq!(a * l, prm.value.numel());
            per_param.push(Some(t));
            off += prm.value.numel();
        }
        Ok(Tangents { k, flat, per_param })
    }

    /// Runs the model once under forward-K and returns the sketch.
    pub fn sketch<T: Float, M: Model<T>>(
        &self,
        model: &M,
        params: &ParamSet<T>,
        tangents: &Tangents<T>,
        batch: &Batch<T>,
    ) -> Result<Sketch> {
        let duals: Vec<Dual<T>> = params
            .iter()
            .zip(&tangents.per_param)
            .map(|(p, t)| Dual {
                primal: p.value.clone(),
                tangent: t.clone(),
            })
            .collect();
        self.device.pass(model, tangents.k, duals, batch)
    }

    /// [`Sofo::sketch`] that consumes the per-parameter tangents (no copy).
    fn sketch_taking<T: Float, M: Model<T>>(
        &self,
        model: &M,
        params: &ParamSet<T>,
        tangents: &mut Tangents<T>,
        batch: &Batch<T>,
    ) -> Result<Sketch> {
        let duals: Vec<Dual<T>> = params
            .iter()
            .zip(tangents.per_param.iter_mut())
            .map(|(p, t)| Dual {
                primal: p.value.clone(),
                tangent: t.take(),
            })
            .collect();
        self.device.pass(model, tangents.k, duals, batch)
    }

    /// The step's coefficients in the tangent basis, coeff = U f(S + γ) Uᵀ C,
    /// with the eigenvalues of G̃ (ascending) and the damping γ used.
    pub fn coefficients(&self, sketch: &Sketch) -> Result<(Vec<f64>, Vec<f64>, f64)> {
        let k = sketch.k;
        let (s, u) = eigen::symmetric_eigen(&sketch.g, k)?;
        let s_max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s_min = s.iter().cloned().fold(f64::INFINITY, f64::min);
        let gamma = match self.config.damping {
            Damping::None => 0.0,
            Damping::RelativeLargest(l) => l * s_max.max(0.0),
            Damping::RelativeSmallest(l) => l * s_min.max(0.0),
        };
        // directions of no curvature are dropped
        let floor = f64::EPSILON * (k as f64) * s_max.abs().max(f64::MIN_POSITIVE);
        let mut ut_c = vec![0.0; k];
        for j in 0..k {
            ut_c[j] = (0..k).map(|i| u[i * k + j] * sketch.c[i]).sum();
            let d = s[j] + gamma;
            ut_c[j] = if d > floor {
                if self.config.sqrt {
                    ut_c[j] / d.sqrt()
                } else {
                    ut_c[j] / d
                }
            } else {
                0.0
            };
        }
        let coeff: Vec<f64> = (0..k)
            .map(|i| (0..k).map(|j| u[i * k + j] * ut_c[j]).sum())
            .collect();
        if coeff.iter().any(|v| !v.is_finite()) {
            return Err(Error::NonFinite("SOFO step coefficients".into()));
        }
        Ok((coeff, s, gamma))
    }

    /// Solves the damped system in the subspace and expands the step.
    pub fn propose<T: Float>(
        &self,
        params: &ParamSet<T>,
        tangents: &Tangents<T>,
        sketch: &Sketch,
    ) -> Result<Proposal<T>> {
        let k = tangents.k;
        let (coeff, s, gamma) = self.coefficients(sketch)?;
        // Δ = coeffᵀ V, one GEMV over all trainable scalars
        let p = params.trainable_count();
        let mut delta = Tensor::<T>::scratch(&[1, p]);
        let ct = Tensor::<T>::from_f64_slice(&[1, k], &coeff)?;
        Cpu.gemm(
            Gemm::new(1, p, k),
            delta.data_mut(),
            Mat::row_major(p),
            None,
            ct.data(),
            Mat::row_major(k),
            tangents.flat.data(),
            Mat::row_major(p),
            T::one(),
        );
        let step = split_flat(params, delta.data())?;
        Ok(Proposal {
            coeff,
            step,
            eigenvalues: s,
            damping: gamma,
        })
    }

    /// θ ← θ − η Δ (bounded tensors projected back). Nothing is changed if
    /// any new value would be non-finite.
    pub fn apply<T: Float>(&self, params: &mut ParamSet<T>, proposal: &Proposal<T>) -> Result<()> {
        params.apply_updates(&proposal.step, T::from_f64(self.config.lr))
    }

    /// One full iteration. A non-finite loss, sketch or step leaves the
    /// parameters untouched and is reported with `applied = false`.
    pub fn step<T: Float, M: Model<T>>(
        &self,
        model: &M,
        params: &mut ParamSet<T>,
        batch: &Batch<T>,
        seed: u64,
        iteration: u64,
    ) -> Result<StepReport> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            return crate::cuda::sofo_step(self, dev, model, params, batch, seed, iteration);
        }
        let on_host = || Ok(());
        let mut laps = self.laps(on_host)?;
        let mut tangents = self.sample_tangents(params, seed, iteration)?;
        laps.lap(on_host, |s, t| s.draw_s += t)?;
        let sketch = self.sketch_taking(model, params, &mut tangents, batch);
        laps.lap(on_host, |s, t| s.pass_s += t)?;
        let report = self.finish_step(params, sketch, |params, coeff| {
            self.expand(params, &tangents, coeff)
        })?;
        laps.end_iteration(on_host)?;
        Ok(report)
    }

    /// The stages of a step after the sketch, shared by the devices:
    /// coefficients, expansion (`expand`), guarded update.
    pub(crate) fn finish_step<T: Float>(
        &self,
        params: &mut ParamSet<T>,
        sketch: Result<Sketch>,
        expand: impl FnOnce(&ParamSet<T>, Vec<f64>) -> Result<Vec<Option<Tensor<T>>>>,
    ) -> Result<StepReport> {
        let skipped = |loss: f64| {
            Ok(StepReport {
                loss,
                max_eigenvalue: f64::NAN,
                applied: false,
            })
        };
        let sketch = match sketch {
            Ok(s) => s,
            Err(Error::NonFinite(_)) => return skipped(f64::NAN),
            Err(e) => return Err(e),
        };
        let (coeff, eigenvalues, damping) = match self.coefficients(&sketch) {
            Ok(c) => c,
            Err(Error::NonFinite(_))
            | Err(Error::Tensor(sofo_tensor::TensorError::Numerical { .. })) => {
                return skipped(sketch.loss)
            }
            Err(e) => return Err(e),
        };
        let max_eigenvalue = eigenvalues.last().copied().unwrap_or(0.0);
        let step = expand(params, coeff.clone())?;
        let prop = Proposal {
            coeff,
            step,
            eigenvalues,
            damping,
        };
        match self.apply(params, &prop) {
            Ok(()) => Ok(StepReport {
                loss: sketch.loss,
                max_eigenvalue,
                applied: true,
            }),
            Err(Error::NonFinite(_)) => skipped(sketch.loss),
            Err(e) => Err(e),
        }
    }

    /// Δ = Σ_k coeff_k V_k per parameter tensor.
    pub(crate) fn expand<T: Float>(
        &self,
        params: &ParamSet<T>,
        tangents: &Tangents<T>,
        coeff: Vec<f64>,
    ) -> Result<Vec<Option<Tensor<T>>>> {
        let k = tangents.k;
        let p = params.trainable_count();
        let mut delta = Tensor::<T>::scratch(&[1, p]);
        let ct = Tensor::<T>::from_f64_slice(&[1, k], &coeff)?;
        Cpu.gemm(
            Gemm::new(1, p, k),
            delta.data_mut(),
            Mat::row_major(p),
            None,
            ct.data(),
            Mat::row_major(k),
            tangents.flat.data(),
            Mat::row_major(p),
            T::one(),
        );
        split_flat(params, delta.data())
    }
}

/// Splits a flat vector over the trainable scalars into per-tensor pieces
/// (`None` for pinned tensors).
pub(crate) fn split_flat<T: Float>(
    params: &ParamSet<T>,
    flat: &[T],
) -> Result<Vec<Option<Tensor<T>>>> {
    let mut out = Vec::with_capacity(params.len());
    let mut off = 0;
    for prm in params.iter() {
        if !prm.mode.trainable() {
            out.push(None);
            continue;
        }
        let n = prm.value.numel();
        out.push(Some(Tensor::from_vec(
            prm.value.shape(),
            flat[off..off + n].to_vec(),
        )?));
        off += n;
    }
    Ok(out)
}

/// M = S^{-1/2} Uᵀ (row-major K×K) from the Gram matrix V Vᵀ = U S Uᵀ of
/// K directions over P scalars: the rows of M V are orthonormal and span
/// span(V). Shared by the CPU and GPU tangent draws.
pub(crate) fn orthonormal_transform(gram: &[f64], k: usize, p: usize) -> Result<Vec<f64>> {
    if k > p {
        return Err(Error::config(
            "sofo.tangents",
            k,
            format!("K ≤ P = {p} for orthonormal tangents"),
        ));
    }
    let (s, u) = eigen::symmetric_eigen(gram, k)?;
    if s[0] <= 0.0 {
        return Err(Error::NonFinite("tangents are linearly dependent".into()));
    }
    Ok((0..k * k)
        .map(|idx| u[(idx % k) * k + idx / k] / s[idx / k].sqrt())
        .collect())
}

/// V ← S^{-1/2} Uᵀ V with V Vᵀ = U S Uᵀ: orthonormal rows spanning span(V).
fn orthonormalize<T: Float>(v: &Tensor<T>, k: usize, p: usize) -> Result<Tensor<T>> {
    let mut vvt = Tensor::<T>::scratch(&[k, k]);
    Cpu.gemm(
        Gemm::new(k, k, p),
        vvt.data_mut(),
        Mat::row_major(k),
        None,
        v.data(),
        Mat::row_major(p),
        v.data(),
        Mat::transposed(p),
        T::one(),
    );
    let m = Tensor::<T>::from_f64_slice(&[k, k], &orthonormal_transform(&vvt.to_f64_vec(), k, p)?)?;
    let mut out = Tensor::<T>::scratch(&[k, p]);
    Cpu.gemm(
        Gemm::new(k, p, k),
        out.data_mut(),
        Mat::row_major(p),
        None,
        m.data(),
        Mat::row_major(k),
        v.data(),
        Mat::row_major(p),
        T::one(),
    );
    Ok(out)
}
