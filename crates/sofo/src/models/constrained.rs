//! Biological constraints and options of a rate RNN, as parameterisations
//! inside the model (never clamping after a step): every optimiser sees the
//! same constrained problem, and SOFO's tangents live in the raw parameters.
//!
//! - Dale's law: each presynaptic unit j is excitatory or inhibitory; the
//!   effective weights are W = f(W̃) · diag(s) (s_j = ±1, f = |·| or
//!   softplus), and optionally the same for the readout C. Signs cannot
//!   flip, whatever the step.
//! - Connectivity masks: fixed zero patterns on W, B and C (random with a
//!   density, or read from a file, see [`read_mask`]); the effective weights
//!   are the raw ones times the mask, so masked entries are exactly zero
//!   after any training.
//! - Noise ([`Noise`]): additive and multiplicative state noise, additive
//!   and multiplicative rate noise, and input noise, drawn per (step, trial) from the batch's noise seed
//!   ([`Trials::noise`]), so constants with respect to θ and the same
//!   however the trials are split.
//! - Time constants ([`TimeConstants`]): one α = dt/τ, one per unit, or
//!   learned per unit (positive by parameterisation).
//! - Low rank ([`LowRank`]): W = m nᵀ/N (+ a fixed random part).
//! - Regularisers ([`Regularizers`]): observed as little losses, so SOFO's
//!   G̃ holds their curvature.

use super::{linear_of_rates, Batch, Model, RateRnn, Trials};
use crate::loss::{Observer, WeightedMse};
use crate::params::{Param, ParamMode, ParamSet};
use crate::{Error, Result};
use rand::RngExt;
use sofo_ad::{Dual, Fwd, Ops, Unary};
use sofo_tensor::{rng, Float, Tensor};
use std::path::Path;

/// How Dale's law makes the raw weights non-negative before the signs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DaleTransform {
    /// |W̃|: a weight can reach exactly zero.
    #[default]
    Abs,
    /// softplus(W̃) = log(1 + e^W̃): smooth, strictly positive.
    Softplus,
}

impl DaleTransform {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "abs" => Ok(DaleTransform::Abs),
            "softplus" => Ok(DaleTransform::Softplus),
            _ => Err(Error::config(
                "constraints.dale_transform",
                format!("\"{s}\""),
                "abs or softplus",
            )),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DaleTransform::Abs => "abs",
            DaleTransform::Softplus => "softplus",
        }
    }
    fn op(self) -> Unary {
        match self {
            DaleTransform::Abs => Unary::Abs,
            DaleTransform::Softplus => Unary::Softplus,
        }
    }
}

/// Which constraints, with their fixed patterns.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// Sign of each presynaptic unit (+1 excitatory, −1 inhibitory).
    pub dale: Option<Vec<f64>>,
    /// Apply Dale's law to the readout C too.
    pub dale_readout: bool,
    /// |·| or softplus under Dale's law.
    pub dale_transform: DaleTransform,
    /// 1 where a connection exists, 0 where not: W [N, N], B [N, I], C [O, N].
    pub mask_w: Option<Vec<f64>>,
    pub mask_b: Option<Vec<f64>>,
    pub mask_c: Option<Vec<f64>>,
}

fn random_mask(len: usize, density: f64, seed: u64, stream: u64) -> Vec<f64> {
    let mut g = rng::generator(seed, stream);
    (0..len)
        .map(|_| {
            if density >= 1.0 || g.random::<f64>() < density {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

fn check_density(field: &str, density: f64) -> Result<()> {
    if !(density > 0.0 && density <= 1.0) {
        return Err(Error::config(field, density, "0 < density ≤ 1"));
    }
    Ok(())
}

impl Constraints {
    /// Seeded patterns: the first round(fraction·N) units excitatory (when
    /// `excitatory` is Some), W kept with probability `density`, no
    /// self-connections unless `autapses`.
    pub fn generate(
        n: usize,
        excitatory: Option<f64>,
        dale_readout: bool,
        density: f64,
        autapses: bool,
        seed: u64,
    ) -> Result<Self> {
        if let Some(f) = excitatory {
            if !(0.0..=1.0).contains(&f) {
                return Err(Error::config(
                    "constraints.excitatory",
                    f,
                    "a fraction in [0, 1]",
                ));
            }
        }
        check_density("constraints.density", density)?;
        let dale = excitatory.map(|f| {
            let ne = (f * n as f64).round() as usize;
            (0..n).map(|j| if j < ne { 1.0 } else { -1.0 }).collect()
        });
        let mask_w = if density < 1.0 || !autapses {
            let mut g = rng::generator(seed, 0xD41E);
            Some(
                (0..n * n)
                    .map(|k| {
                        let keep = density >= 1.0 || g.random::<f64>() < density;
                        if keep && (autapses || k / n != k % n) {
                            1.0
                        } else {
                            0.0
                        }
                    })
                    .collect(),
            )
        } else {
            None
        };
        Ok(Constraints {
            dale,
            dale_readout: dale_readout && excitatory.is_some(),
            dale_transform: DaleTransform::Abs,
            mask_w,
            mask_b: None,
            mask_c: None,
        })
    }

    /// Seeded random masks on the input weights B [N, I] (each kept with
    /// probability `density_in`) and the readout C [O, N] (`density_out`);
    /// a density of 1 leaves the tensor dense.
    pub fn with_io_masks(
        mut self,
        n: usize,
        inputs: usize,
        outputs: usize,
        density_in: f64,
        density_out: f64,
        seed: u64,
    ) -> Result<Self> {
        check_density("constraints.density_in", density_in)?;
        check_density("constraints.density_out", density_out)?;
        if density_in < 1.0 {
            self.mask_b = Some(random_mask(n * inputs, density_in, seed, 0xD41F));
        }
        if density_out < 1.0 {
            self.mask_c = Some(random_mask(outputs * n, density_out, seed, 0xD420));
        }
        Ok(self)
    }
}

/// A 0/1 pattern of shape `[rows, cols]` from a file: a CSV (or
/// whitespace-separated) text file with `rows` lines of `cols` numbers, or
/// a `.safetensors` file holding a tensor named `name`. Errors name `field`,
/// the file and what is wrong (shape, a value other than 0 or 1).
pub fn read_mask(path: &Path, name: &str, shape: [usize; 2], field: &str) -> Result<Vec<f64>> {
    let [rows, cols] = shape;
    let file = path.display();
    let values: Vec<f64> = if path.extension().is_some_and(|e| e == "safetensors") {
        let tensors = crate::checkpoint::load::<f64>(path).map_err(|e| {
            Error::config(
                field,
                format!("\"{file}\""),
                format!("a readable file ({e})"),
            )
        })?;
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let (_, t) = tensors.iter().find(|(n, _)| n == name).ok_or_else(|| {
            Error::config(
                field,
                format!("\"{file}\" (tensors {names:?})"),
                format!("a safetensors file with a tensor named `{name}`"),
            )
        })?;
        // a vector [cols] stands for one row (b, d, x0, tau)
        if t.shape() != [rows, cols] && !(rows == 1 && t.shape() == [cols]) {
            return Err(Error::config(
                field,
                format!("\"{file}\": `{name}` of shape {:?}", t.shape()),
                format!("shape [{rows}, {cols}]"),
            ));
        }
        t.data().to_vec()
    } else {
        let text = std::fs::read_to_string(path).map_err(|e| {
            Error::config(
                field,
                format!("\"{file}\""),
                format!("a readable file ({e})"),
            )
        })?;
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        if lines.len() != rows {
            return Err(Error::config(
                field,
                format!("\"{file}\" with {} rows", lines.len()),
                format!("{rows} rows of {cols} values (shape [{rows}, {cols}])"),
            ));
        }
        let mut v = Vec::with_capacity(rows * cols);
        for (i, l) in lines.iter().enumerate() {
            let row: Vec<&str> = l
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .collect();
            if row.len() != cols {
                return Err(Error::config(
                    field,
                    format!("\"{file}\" with {} values on row {}", row.len(), i + 1),
                    format!("{cols} values per row (shape [{rows}, {cols}])"),
                ));
            }
            for s in row {
                v.push(s.parse::<f64>().map_err(|_| {
                    Error::config(
                        field,
                        format!("\"{file}\": `{s}` on row {}", i + 1),
                        "0 or 1",
                    )
                })?);
            }
        }
        v
    };
    if let Some((k, x)) = values
        .iter()
        .enumerate()
        .find(|(_, &x)| x != 0.0 && x != 1.0)
    {
        return Err(Error::config(
            field,
            format!("\"{file}\": {x} at [{}, {}]", k / cols, k % cols),
            "0 or 1",
        ));
    }
    Ok(values)
}

/// Process and input noise, each a white noise discretised for the step
/// dt = α·τ (Euler–Maruyama). For state noise σ is the stationary standard
/// deviation the noise alone gives an isolated unit (exactly σ·√(2/(2 − α))
/// at step α); for rate noise it is relative (a fraction of the rate), for
/// input noise in units of the input. All off (0) by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Noise {
    /// Additive state noise: x ← x + σ·√(2α_i)·ξ (α_i the unit's dt/τ_i).
    pub state: f64,
    /// Multiplicative rate noise: r ← r ⊙ max(0, 1 + σ·√(2/α)·ξ), the rates
    /// the network transmits (recurrence and readout); the clip keeps a
    /// unit's sign.
    pub rates: f64,
    /// Input noise: u ← u + σ·√(2/α)·ξ.
    pub input: f64,
    /// Multiplicative state noise: x ← x ⊙ (1 + σ·√(2α_i)·ξ) after the
    /// update (a geometric perturbation of each unit's state).
    pub state_multiplicative: f64,
    /// Additive rate noise: r ← r + σ·√(2/α)·ξ on the transmitted rates.
    pub rates_additive: f64,
}

impl Noise {
    pub fn any(&self) -> bool {
        self.state > 0.0
            || self.rates > 0.0
            || self.input > 0.0
            || self.state_multiplicative > 0.0
            || self.rates_additive > 0.0
    }
    pub fn validate(&self) -> Result<()> {
        for (f, v) in [
            ("noise.state", self.state),
            ("noise.rates", self.rates),
            ("noise.input", self.input),
            ("noise.state_multiplicative", self.state_multiplicative),
            ("noise.rates_additive", self.rates_additive),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(f, v, "a finite σ ≥ 0 (0 = off)"));
            }
        }
        Ok(())
    }
}

/// Regularisers, each observed as a little loss (a weighted MSE against a
/// constant), so its gradient and curvature enter SOFO's C and G̃ like the
/// task loss's. All off (0) by default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Regularizers {
    /// λ‖W‖² on the effective recurrent weights.
    pub weights_l2: f64,
    /// λ · mean over steps, trials and units of r².
    pub rates_l2: f64,
    /// λ · mean over trials and units of (r̄ − target)², r̄ a unit's mean
    /// rate over the trial.
    pub rate_target_weight: f64,
    /// The target mean rate.
    pub rate_target: f64,
}

impl Regularizers {
    pub fn any(&self) -> bool {
        self.weights_l2 > 0.0 || self.rates_l2 > 0.0 || self.rate_target_weight > 0.0
    }
    pub fn validate(&self) -> Result<()> {
        for (f, v) in [
            ("regularizers.weights_l2", self.weights_l2),
            ("regularizers.rates_l2", self.rates_l2),
            ("regularizers.rate_target_weight", self.rate_target_weight),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::config(f, v, "a finite λ ≥ 0 (0 = off)"));
            }
        }
        if !self.rate_target.is_finite() {
            return Err(Error::config(
                "regularizers.rate_target",
                self.rate_target,
                "a finite rate",
            ));
        }
        Ok(())
    }
}

/// The units' time constants, as α = dt/τ.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum TimeConstants {
    /// The model's α for every unit.
    #[default]
    Scalar,
    /// A fixed α_i per unit, 0 < α_i ≤ 1.
    PerUnit(Vec<f64>),
    /// Learned per unit: τ_i/dt = tau_min + softplus(τ̃_i), the tensor `tau`
    /// holding τ̃ (started at the model's α); tau_min ≥ 1 keeps α_i ≤ 1.
    Learned { tau_min: f64 },
}

impl TimeConstants {
    pub fn is_learned(&self) -> bool {
        matches!(self, TimeConstants::Learned { .. })
    }
}

/// A low-rank recurrence W = m nᵀ/N with m, n [N, rank] trained, plus a
/// fixed random part W0 ~ N(0, g²/N) (the model's gain, a pinned tensor)
/// when `fixed` is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LowRank {
    pub rank: usize,
    pub fixed: bool,
}

/// A rate RNN under [`Constraints`] with the options above. The checkpoint
/// holds the raw parameters (`W` is W̃; under [`LowRank`] `m`, `n` and
/// `W0`; learned time constants `tau`); [`ConstrainedRnn::effective_weights`]
/// gives the weights the network uses.
#[derive(Debug, Clone)]
pub struct ConstrainedRnn {
    pub rnn: RateRnn,
    pub constraints: Constraints,
    pub noise: Noise,
    pub regularizers: Regularizers,
    pub time_constants: TimeConstants,
    pub low_rank: Option<LowRank>,
}

fn inv_softplus(y: f64) -> f64 {
    // log(e^y − 1), stable for large y; y > 0
    let y = y.max(1e-12);
    if y > 30.0 {
        y
    } else {
        y.exp_m1().ln()
    }
}

impl ConstrainedRnn {
    pub fn new(rnn: RateRnn, constraints: Constraints) -> Result<Self> {
        let m = ConstrainedRnn {
            rnn,
            constraints,
            noise: Noise::default(),
            regularizers: Regularizers::default(),
            time_constants: TimeConstants::default(),
            low_rank: None,
        };
        m.validate()?;
        Ok(m)
    }

    pub fn with_noise(mut self, noise: Noise) -> Result<Self> {
        self.noise = noise;
        self.validate()?;
        Ok(self)
    }

    pub fn with_regularizers(mut self, r: Regularizers) -> Result<Self> {
        self.regularizers = r;
        self.validate()?;
        Ok(self)
    }

    pub fn with_time_constants(mut self, t: TimeConstants) -> Result<Self> {
        self.time_constants = t;
        self.validate()?;
        Ok(self)
    }

    pub fn with_low_rank(mut self, l: Option<LowRank>) -> Result<Self> {
        self.low_rank = l;
        self.validate()?;
        Ok(self)
    }

    /// Checks every option against the network's sizes; errors name the
    /// config field.
    pub fn validate(&self) -> Result<()> {
        let rnn = &self.rnn;
        rnn.validate()?;
        let (n, i, o) = (rnn.n, rnn.inputs, rnn.outputs);
        let constraints = &self.constraints;
        let check = |name: &str, v: &Option<Vec<f64>>, len: usize| -> Result<()> {
            match v {
                Some(v) if v.len() != len => Err(Error::config(
                    name,
                    format!("{} entries", v.len()),
                    format!("{len}"),
                )),
                _ => Ok(()),
            }
        };
        check("constraints.dale", &constraints.dale, n)?;
        check("constraints.mask_w", &constraints.mask_w, n * n)?;
        check("constraints.mask_b", &constraints.mask_b, n * i)?;
        check("constraints.mask_c", &constraints.mask_c, o * n)?;
        self.noise.validate()?;
        self.regularizers.validate()?;
        match &self.time_constants {
            TimeConstants::Scalar => {}
            TimeConstants::PerUnit(a) => {
                if a.len() != n {
                    return Err(Error::config(
                        "time_constants.alpha",
                        format!("{} values", a.len()),
                        format!("one α = dt/τ per unit ({n})"),
                    ));
                }
                if let Some(v) = a.iter().find(|&&v| !(v > 0.0 && v <= 1.0)) {
                    return Err(Error::config(
                        "time_constants.alpha",
                        v,
                        "0 < α ≤ 1 for every unit",
                    ));
                }
            }
            TimeConstants::Learned { tau_min } => {
                if !(*tau_min >= 1.0 && tau_min.is_finite()) {
                    return Err(Error::config(
                        "time_constants.tau_min",
                        tau_min,
                        "τ_min/dt ≥ 1 (so that α ≤ 1)",
                    ));
                }
                if 1.0 / rnn.alpha <= *tau_min {
                    return Err(Error::config(
                        "time_constants.tau_min",
                        tau_min,
                        format!(
                            "below the starting τ/dt = 1/α = {} (τ = τ_min + softplus(τ̃) > τ_min)",
                            1.0 / rnn.alpha
                        ),
                    ));
                }
            }
        }
        if let Some(l) = &self.low_rank {
            if l.rank == 0 || l.rank > n {
                return Err(Error::config(
                    "low_rank.rank",
                    l.rank,
                    format!("1 to N = {n} (0 = full rank: leave low_rank off)"),
                ));
            }
            if constraints.dale.is_some() {
                return Err(Error::config(
                    "constraints.dale",
                    "true with a low-rank W",
                    "false: Dale's law is not defined for W = m nᵀ/N",
                ));
            }
        }
        Ok(())
    }

    fn learned_tau(&self) -> bool {
        matches!(self.time_constants, TimeConstants::Learned { .. })
    }

    /// Names of the raw parameters, in order.
    pub fn param_names(&self) -> Vec<&'static str> {
        let mut v = match self.low_rank {
            Some(l) if l.fixed => vec!["m", "n", "W0"],
            Some(_) => vec!["m", "n"],
            None => vec!["W"],
        };
        v.extend(["B", "b", "C", "d"]);
        if self.rnn.learn_x0 {
            v.push("x0");
        }
        if self.learned_tau() {
            v.push("tau");
        }
        v
    }

    /// The factor the raw tensor is multiplied by (after f under Dale):
    /// sign of the presynaptic unit (column) times the mask.
    fn factor(
        &self,
        rows: usize,
        cols: usize,
        mask: &Option<Vec<f64>>,
        signs: Option<&Vec<f64>>,
    ) -> Option<Vec<f64>> {
        if mask.is_none() && signs.is_none() {
            return None;
        }
        Some(
            (0..rows * cols)
                .map(|k| mask.as_ref().map_or(1.0, |m| m[k]) * signs.map_or(1.0, |s| s[k % cols]))
                .collect(),
        )
    }

    fn effective_one<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        raw: &E::V,
        shape: [usize; 2],
        mask: &Option<Vec<f64>>,
        dale: bool,
    ) -> Result<E::V> {
        let signs = if dale {
            self.constraints.dale.as_ref()
        } else {
            None
        };
        let Some(f) = self.factor(shape[0], shape[1], mask, signs) else {
            return Ok(raw.clone());
        };
        let base = if signs.is_some() {
            e.unary(raw, self.constraints.dale_transform.op())?
        } else {
            raw.clone()
        };
        let f = e.constant(Tensor::from_f64_slice(&shape, &f)?)?;
        Ok(e.mul(&base, &f)?)
    }

    /// The effective [W, B, b, C, d, (x0)] from the raw parameters, and the
    /// per-unit α [N] unless it is the model's scalar (in the op
    /// vocabulary, so every engine differentiates through them).
    fn effective<T: Float, E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Effective<E::V>> {
        let (n, i, o) = (self.rnn.n, self.rnn.inputs, self.rnn.outputs);
        let c = &self.constraints;
        let (w, rest) = match self.low_rank {
            Some(l) => {
                let nt = e.transpose(&p[1], 0, 1)?;
                let mn = e.matmul(&p[0], &nt)?;
                let mut w = e.mul_scalar(&mn, 1.0 / n as f64)?;
                if l.fixed {
                    w = e.add(&w, &p[2])?;
                }
                (w, if l.fixed { 3 } else { 2 })
            }
            None => (p[0].clone(), 1),
        };
        let w = self.effective_one(e, &w, [n, n], &c.mask_w, c.dale.is_some())?;
        let b = self.effective_one(e, &p[rest], [n, i], &c.mask_b, false)?;
        let cc = self.effective_one(e, &p[rest + 2], [o, n], &c.mask_c, c.dale_readout)?;
        let mut out = vec![w, b, p[rest + 1].clone(), cc, p[rest + 3].clone()];
        let mut next = rest + 4;
        if self.rnn.learn_x0 {
            out.push(p[next].clone());
            next += 1;
        }
        let alpha = match &self.time_constants {
            TimeConstants::Scalar => None,
            TimeConstants::PerUnit(a) => Some(e.constant(Tensor::from_f64_slice(&[n], a)?)?),
            TimeConstants::Learned { tau_min } => {
                // α = 1 / (τ_min + softplus(τ̃))
                let sp = e.softplus(&p[next])?;
                let tau = e.add_scalar(&sp, *tau_min)?;
                let one = e.constant(Tensor::full(&[n], T::one()))?;
                Some(e.div(&one, &tau)?)
            }
        };
        Ok((out, alpha))
    }

    /// The spectral radius of the effective recurrent weights: about the
    /// gain g for a dense random start (the circular law); above 1 the
    /// untrained network is chaotic.
    pub fn spectral_radius<T: Float>(&self, params: &ParamSet<T>) -> Result<f64> {
        let eff = self.effective_weights(params)?;
        let w = &eff[0].1;
        Ok(sofo_tensor::eigen::spectral_radius(
            &w.to_f64_vec(),
            self.rnn.n,
        )?)
    }

    /// The weights the network uses: W, B, b, C, d, (x0), and `alpha` `[N]`
    /// when the time constants are per unit or learned.
    pub fn effective_weights<T: Float>(
        &self,
        params: &ParamSet<T>,
    ) -> Result<Vec<(String, Tensor<T>)>> {
        let mut e = Fwd::primal();
        let duals: Vec<Dual<T>> = params
            .iter()
            .map(|p| Dual::constant(p.value.clone()))
            .collect();
        let (eff, alpha) = self.effective(&mut e, &duals)?;
        let mut names = vec!["W", "B", "b", "C", "d"];
        if self.rnn.learn_x0 {
            names.push("x0");
        }
        let mut out: Vec<(String, Tensor<T>)> = names
            .into_iter()
            .zip(eff)
            .map(|(n, d)| (n.to_string(), d.primal))
            .collect();
        if let Some(a) = alpha {
            out.push(("alpha".into(), a.primal));
        }
        Ok(out)
    }

    /// Whether the effective weights differ from the raw parameters.
    pub fn reparameterised(&self) -> bool {
        let c = &self.constraints;
        c.dale.is_some()
            || c.mask_w.is_some()
            || c.mask_b.is_some()
            || c.mask_c.is_some()
            || self.low_rank.is_some()
            || self.time_constants != TimeConstants::Scalar
    }
}

/// The effective [W, B, b, C, d, (x0)] and the per-unit α, if any.
type Effective<V> = (Vec<V>, Option<V>);

/// The constants the noise of a chunk of steps adds, each kind
/// `[steps, m, cols]` (`None`: off): the inputs with their noise, the state
/// increment, the state factor, the rate factor (clipped at 0) and the rate
/// increment. Under learned time constants the state kinds are the unit
/// draws ξ, scaled by √(2α(θ)) in the pass.
struct NoiseChunk<T: Float> {
    t0: usize,
    steps: usize,
    input: Option<Tensor<T>>,
    state: Option<Tensor<T>>,
    state_multiplicative: Option<Tensor<T>>,
    rates: Option<Tensor<T>>,
    rates_additive: Option<Tensor<T>>,
}

impl ConstrainedRnn {
    /// The noise of steps [t0, t0 + steps) (cut at the trial's end): one
    /// draw per (step, trial) for every kind — state [0, N), rates [N, 2N),
    /// inputs [2N, 2N + I), multiplicative state [2N + I, 3N + I), additive
    /// rates [3N + I, 4N + I) — scaled for the step.
    fn noise_chunk<T: Float>(
        &self,
        batch: &Trials<'_, T>,
        t0: usize,
        steps: usize,
    ) -> Result<NoiseChunk<T>> {
        let (noise, n, inputs) = (&self.noise, self.rnn.n, self.rnn.inputs);
        let alpha = self.rnn.alpha;
        let xi = batch.noise_steps(t0, steps, 4 * n + inputs, None)?;
        let steps = xi.shape()[0];
        let (mult_at, radd_at) = (2 * n + inputs, 3 * n + inputs);
        let learned = self.time_constants.is_learned();
        // σ·√(2α_i) per unit (1 under learned α: scaled in the pass)
        let unit_scale = |s: f64| -> Vec<f64> {
            (0..n)
                .map(|j| match &self.time_constants {
                    TimeConstants::Scalar => s * (2.0 * alpha).sqrt(),
                    TimeConstants::PerUnit(al) => s * (2.0 * al[j]).sqrt(),
                    TimeConstants::Learned { .. } => 1.0,
                })
                .collect()
        };
        let on = |s: f64| s > 0.0;
        let input = match on(noise.input) && batch.batch.inputs.is_some() {
            true => {
                let in_scale = noise.input * (2.0 / alpha).sqrt();
                let mut data = Vec::with_capacity(steps * batch.trials() * inputs);
                for t in t0..t0 + steps {
                    let u = batch.input(t)?.expect("the batch has inputs");
                    data.extend_from_slice(u.data());
                }
                let mut u = Tensor::from_vec(&[steps, batch.trials(), inputs], data)?;
                u.axpy(T::one(), &columns(&xi, 2 * n, inputs, 0.0, |_| in_scale)?)?;
                Some(u)
            }
            false => None,
        };
        let state = match on(noise.state) {
            true => {
                let sc = unit_scale(noise.state);
                Some(columns(&xi, 0, n, 0.0, |j| sc[j])?)
            }
            false => None,
        };
        let state_multiplicative = match on(noise.state_multiplicative) {
            true => {
                let sc = unit_scale(noise.state_multiplicative);
                let shift = if learned { 0.0 } else { 1.0 };
                Some(columns(&xi, mult_at, n, shift, |j| sc[j])?)
            }
            false => None,
        };
        let rates = match on(noise.rates) {
            // clipped at 0: a negative factor would flip the sign a unit
            // transmits (and Dale's law with it)
            true => {
                let s = noise.rates * (2.0 / alpha).sqrt();
                Some(columns(&xi, n, n, 1.0, |_| s)?.map(|v| v.max(T::zero())))
            }
            false => None,
        };
        let rates_additive = match on(noise.rates_additive) {
            true => {
                let s = noise.rates_additive * (2.0 / alpha).sqrt();
                Some(columns(&xi, radd_at, n, 0.0, |_| s)?)
            }
            false => None,
        };
        Ok(NoiseChunk {
            t0,
            steps,
            input,
            state,
            state_multiplicative,
            rates,
            rates_additive,
        })
    }
}

/// Columns [start, start + len) of a [.., width] host tensor, column j
/// scaled by `scale(j)` and shifted by `shift`.
fn columns<T: Float>(
    x: &Tensor<T>,
    start: usize,
    len: usize,
    shift: f64,
    scale: impl Fn(usize) -> f64,
) -> Result<Tensor<T>> {
    let width = x.shape()[x.rank() - 1];
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("rank ≥ 1") = len;
    let s: Vec<T> = (0..len).map(|j| T::from_f64(scale(j))).collect();
    let mut out = Tensor::<T>::scratch(&shape);
    for (r, row) in out.data_mut().chunks_mut(len.max(1)).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = T::from_f64(shift) + s[j] * x.data()[r * width + start + j];
        }
    }
    Ok(out)
}

impl<T: Float> Model<T> for ConstrainedRnn {
    /// The rate RNN's initialisation. Under Dale's law the inhibitory
    /// columns are scaled by N_E/N_I so that every row of the effective W
    /// sums to zero in expectation (no outlier in the spectrum at start);
    /// then, under Dale's law or a mask, W̃ is rescaled so that the spectral
    /// radius of the effective W is the gain g (|·| and masks change the
    /// variance that g sets for a dense Gaussian W). Under the softplus
    /// transform W̃ = softplus⁻¹(|W|) gives the same effective start.
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        self.validate()?;
        let mut ps = Model::<T>::init(&self.rnn, seed)?;
        let n = self.rnn.n;
        let c = &self.constraints;
        if let Some(l) = self.low_rank {
            // m, n ~ N(0, 1): W = m nᵀ/N has entries of variance rank/N²
            let normal = |stream: u64| {
                let mut t = Tensor::<T>::scratch(&[n, l.rank]);
                rng::fill_normal(t.data_mut(), seed, stream);
                t
            };
            let w0 = ps.get("W").expect("the rate RNN has W").value.clone();
            let mut out = vec![
                Param {
                    name: "m".into(),
                    value: normal(0x10A),
                    mode: ParamMode::Free,
                },
                Param {
                    name: "n".into(),
                    value: normal(0x10B),
                    mode: ParamMode::Free,
                },
            ];
            if l.fixed {
                out.push(Param {
                    name: "W0".into(),
                    value: w0,
                    mode: ParamMode::Pinned,
                });
            }
            out.extend(ps.iter().skip(1).cloned());
            ps = ParamSet::new(out);
        } else {
            let constrained = c.dale.is_some() || c.mask_w.is_some();
            if let Some(s) = &c.dale {
                let ne = s.iter().filter(|&&v| v > 0.0).count() as f64;
                let ni = s.len() as f64 - ne;
                if ne > 0.0 && ni > 0.0 {
                    let w = &mut ps.get_mut("W").expect("the rate RNN has W").value;
                    for (k, v) in w.data_mut().iter_mut().enumerate() {
                        if s[k % n] < 0.0 {
                            *v *= T::from_f64(ne / ni);
                        }
                    }
                }
            }
            if constrained && self.rnn.gain > 0.0 {
                // the radius under |·| (what softplus reproduces below); the
                // time constants play no part (and a learned τ has no tensor
                // yet)
                let abs = ConstrainedRnn {
                    constraints: Constraints {
                        dale_transform: DaleTransform::Abs,
                        ..c.clone()
                    },
                    time_constants: TimeConstants::Scalar,
                    ..self.clone()
                };
                let r = abs.spectral_radius(&ps)?;
                if r > 0.0 {
                    let w = &mut ps.get_mut("W").expect("the rate RNN has W").value;
                    *w = w.scale(T::from_f64(self.rnn.gain / r));
                }
            }
            if c.dale.is_some() && c.dale_transform == DaleTransform::Softplus {
                let mut names = vec!["W"];
                if c.dale_readout {
                    names.push("C");
                }
                for name in names {
                    let w = &mut ps.get_mut(name).expect("the rate RNN has W and C").value;
                    *w = w.map(|v| T::from_f64(inv_softplus(v.to_f64().abs())));
                }
            }
        }
        if self.learned_tau() {
            let TimeConstants::Learned { tau_min } = self.time_constants else {
                unreachable!()
            };
            let raw = inv_softplus(1.0 / self.rnn.alpha - tau_min);
            let mut v: Vec<Param<T>> = ps.iter().cloned().collect();
            v.push(Param {
                name: "tau".into(),
                value: Tensor::full(&[n], T::from_f64(raw)),
                mode: ParamMode::Free,
            });
            ps = ParamSet::new(v);
        }
        Ok(ps)
    }

    /// Prepared: the rate RNN's [Wᵀ, Bᵀ, b, Cᵀ, d, (x0)] of the effective
    /// weights, then α `[N]` when it is per unit.
    fn prepare<E: Ops<T>>(&self, e: &mut E, params: &[E::V]) -> Result<Vec<E::V>> {
        let (eff, alpha) = self.effective(e, params)?;
        let mut out = self.rnn.prepare(e, &eff)?;
        out.extend(alpha);
        Ok(out)
    }

    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        let noise = &self.noise;
        let reg = &self.regularizers;
        if !noise.any() && !reg.any() && self.time_constants == TimeConstants::Scalar {
            return self.rnn.run(e, p, batch, obs);
        }
        let (m, n) = (batch.trials(), self.rnn.n);
        let total = batch.batch.trials as f64;
        let steps = batch.steps();
        let alpha = self.rnn.alpha;
        let a = T::from_f64(alpha);
        let (wt, bt, bias, ct, d) = (&p[0], &p[1], &p[2], &p[3], &p[4]);
        let av = p.get(5 + usize::from(self.rnn.learn_x0));
        if reg.weights_l2 > 0.0 {
            // this group's share of λ‖W‖², so that the groups add up to it once
            let share = m as f64 / total;
            let target = Tensor::zeros(e.shape(wt));
            obs.observe(
                e,
                wt,
                &WeightedMse {
                    target,
                    weights: None,
                    n: 1.0 / (reg.weights_l2 * share),
                },
            )?;
        }
        let mut x = if self.rnn.learn_x0 {
            e.broadcast_to(&p[5], &[m, n])?
        } else {
            e.constant(Tensor::zeros(&[m, n]))?
        };
        let phi = self.rnn.activation.op();
        // r = φ(x) (⊙ the rate noise η) for the recurrence and the readout:
        // computed once, or, where the engine applies φ and η as it reads x
        // and nothing else reads r (no additive rate noise, no rate
        // regulariser), never stored
        let fused = e.fuses_unary_into_linear(n, n)
            && noise.rates_additive == 0.0
            && reg.rates_l2 == 0.0
            && reg.rate_target_weight == 0.0;
        let mut r = if fused { None } else { Some(e.unary(&x, phi)?) };
        // η of the rates at x, where r is read from x
        let mut eta: Option<E::V> = None;
        let inputs = self.rnn.inputs;
        // the noise's constants a chunk of steps at a time (a GPU copies a
        // chunk's blocks at once; the host takes one step per chunk), as many
        // steps as the engine takes of the widest array, the draw
        let chunk_steps = e.block_steps(m * (4 * n + inputs)).max(1);
        let mut chunk: Option<NoiseChunk<T>> = None;
        let mut rsum: Option<E::V> = None;
        for t in 0..steps {
            if noise.any() && chunk.as_ref().is_none_or(|c| t >= c.t0 + c.steps) {
                chunk = Some(self.noise_chunk(batch, t, chunk_steps)?);
            }
            // kind `x` of the chunk at step t, [m, cols]
            let block = |e: &mut E, x: &Tensor<T>, cols: usize| -> Result<E::V> {
                let t0 = chunk.as_ref().map_or(t, |c| c.t0);
                Ok(e.constant_block(x, (t - t0) * m * cols, &[m, cols])?)
            };
            let kinds = chunk.as_ref();
            let u = match kinds.and_then(|c| c.input.as_ref()) {
                Some(u) => Some(block(e, u, inputs)?),
                None => batch.input_on(e, t)?,
            };
            let input = u.as_ref().map(|u| (u, bt));
            let input = input.as_slice();
            let rates = (&x, phi, eta.as_ref(), r.as_ref());
            x = match av {
                None => {
                    let leak = Some((&x, T::one() - a));
                    linear_of_rates(e, rates, leak, a, wt, input, Some(bias))?
                }
                Some(av) => {
                    // x + α ⊙ (−x + W r + B u + b)
                    let pre = linear_of_rates(e, rates, None, T::one(), wt, input, Some(bias))?;
                    let diff = e.sub(&pre, &x)?;
                    let step = e.mul(&diff, av)?;
                    e.add(&x, &step)?
                }
            };
            if let Some(z) = kinds.and_then(|c| c.state.as_ref()) {
                let z = block(e, z, n)?;
                let inc = match self.time_constants.is_learned() {
                    false => z,
                    true => {
                        // σ·√(2α(θ))·ξ: ξ is constant, the scale depends on θ
                        let av = av.expect("learned α is prepared");
                        let sq = e.sqrt(av)?;
                        let sq = e.mul_scalar(&sq, noise.state * 2f64.sqrt())?;
                        e.mul(&z, &sq)?
                    }
                };
                x = e.add(&x, &inc)?;
            }
            if let Some(z) = kinds.and_then(|c| c.state_multiplicative.as_ref()) {
                let z = block(e, z, n)?;
                let factor = match self.time_constants.is_learned() {
                    false => z,
                    true => {
                        // 1 + σ·√(2α(θ))·ξ
                        let av = av.expect("learned α is prepared");
                        let sq = e.sqrt(av)?;
                        let sq = e.mul_scalar(&sq, noise.state_multiplicative * 2f64.sqrt())?;
                        let z = e.mul(&z, &sq)?;
                        e.add_scalar(&z, 1.0)?
                    }
                };
                x = e.mul(&x, &factor)?;
            }
            let eta_t = match kinds.and_then(|c| c.rates.as_ref()) {
                Some(eta) => Some(block(e, eta, n)?),
                None => None,
            };
            if fused {
                eta = eta_t;
            } else {
                let mut rt = match &eta_t {
                    Some(eta) => e.unary_mul(&x, phi, eta)?,
                    None => e.unary(&x, phi)?,
                };
                if let Some(z) = kinds.and_then(|c| c.rates_additive.as_ref()) {
                    let z = block(e, z, n)?;
                    rt = e.add(&rt, &z)?;
                }
                r = Some(rt);
            }
            // r is stored wherever a regulariser reads it (`fused` is off)
            let stored = || {
                r.as_ref()
                    .expect("the rates are stored for the regularisers")
            };
            if reg.rates_l2 > 0.0 {
                obs.observe(
                    e,
                    stored(),
                    &WeightedMse {
                        target: Tensor::zeros(&[m, n]),
                        weights: None,
                        n: steps as f64 * total * n as f64 / reg.rates_l2,
                    },
                )?;
            }
            if reg.rate_target_weight > 0.0 {
                rsum = Some(match rsum {
                    None => stored().clone(),
                    Some(s) => e.add(&s, stored())?,
                });
            }
            if batch.observed(t) {
                let rates = (&x, phi, eta.as_ref(), r.as_ref());
                let y = linear_of_rates(e, rates, None, T::one(), ct, &[], Some(d))?;
                obs.observe(e, &y, &batch.step_loss(t)?)?;
            }
        }
        if let Some(s) = rsum {
            let mean = e.mul_scalar(&s, 1.0 / steps as f64)?;
            obs.observe(
                e,
                &mean,
                &WeightedMse {
                    target: Tensor::full(&[m, n], T::from_f64(reg.rate_target)),
                    weights: None,
                    n: total * n as f64 / reg.rate_target_weight,
                },
            )?;
        }
        Ok(())
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        Model::<T>::sofo_flops(&self.rnn, k, batch)
    }
}
