//! Biological constraints on a rate RNN, as parameterisations inside the
//! model (never clamping after a step): every optimiser sees the same
//! constrained problem, and SOFO's tangents live in the raw parameters.
//!
//! - Dale's law: each presynaptic unit j is excitatory or inhibitory; the
//!   effective weights are W = |W̃| · diag(s) (s_j = ±1), and optionally the
//!   same for the readout C. Signs cannot flip, whatever the step.
//! - Connectivity masks: fixed zero patterns on W, B and C; the effective
//!   weights are the raw ones times the mask, so masked entries are exactly
//!   zero after any training.

use super::{Batch, Model, RateRnn, Trials};
use crate::loss::Observer;
use crate::params::ParamSet;
use crate::{Error, Result};
use rand::RngExt;
use sofo_ad::{Dual, Fwd, Ops};
use sofo_tensor::{rng, Float, Tensor};

/// Which constraints, with their fixed patterns.
#[derive(Debug, Clone, Default)]
pub struct Constraints {
    /// Sign of each presynaptic unit (+1 excitatory, −1 inhibitory).
    pub dale: Option<Vec<f64>>,
    /// Apply Dale's law to the readout C too.
    pub dale_readout: bool,
    /// 1 where a connection exists, 0 where not: W [N, N], B [N, I], C [O, N].
    pub mask_w: Option<Vec<f64>>,
    pub mask_b: Option<Vec<f64>>,
    pub mask_c: Option<Vec<f64>>,
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
        if !(density > 0.0 && density <= 1.0) {
            return Err(Error::config(
                "constraints.density",
                density,
                "0 < density ≤ 1",
            ));
        }
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
            mask_w,
            mask_b: None,
            mask_c: None,
        })
    }
}

/// A rate RNN under [`Constraints`]. The checkpoint holds the raw
/// parameters (`W` is W̃); [`ConstrainedRnn::effective`] gives the weights
/// the network uses.
#[derive(Debug, Clone)]
pub struct ConstrainedRnn {
    pub rnn: RateRnn,
    pub constraints: Constraints,
}

impl ConstrainedRnn {
    pub fn new(rnn: RateRnn, constraints: Constraints) -> Result<Self> {
        let (n, i, o) = (rnn.n, rnn.inputs, rnn.outputs);
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
        Ok(ConstrainedRnn { rnn, constraints })
    }

    /// The factor the raw tensor is multiplied by (after |·| under Dale):
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
            e.abs(raw)?
        } else {
            raw.clone()
        };
        let f = e.constant(Tensor::from_f64_slice(&shape, &f)?)?;
        Ok(e.mul(&base, &f)?)
    }

    /// The effective [W, B, C] from the raw parameters (in the op
    /// vocabulary, so every engine differentiates through them).
    fn effective<T: Float, E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        let (n, i, o) = (self.rnn.n, self.rnn.inputs, self.rnn.outputs);
        let c = &self.constraints;
        let w = self.effective_one(e, &p[0], [n, n], &c.mask_w, c.dale.is_some())?;
        let b = self.effective_one(e, &p[1], [n, i], &c.mask_b, false)?;
        let cc = self.effective_one(e, &p[3], [o, n], &c.mask_c, c.dale_readout)?;
        let mut out = p.to_vec();
        out[0] = w;
        out[1] = b;
        out[3] = cc;
        Ok(out)
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

    /// The weights the network uses, named as the raw ones (W, B, b, C, d).
    pub fn effective_weights<T: Float>(
        &self,
        params: &ParamSet<T>,
    ) -> Result<Vec<(String, Tensor<T>)>> {
        let mut e = Fwd::primal();
        let duals: Vec<Dual<T>> = params
            .iter()
            .map(|p| Dual::constant(p.value.clone()))
            .collect();
        let eff = self.effective(&mut e, &duals)?;
        Ok(params
            .iter()
            .zip(eff)
            .map(|(p, d)| (p.name.clone(), d.primal))
            .collect())
    }
}

impl<T: Float> Model<T> for ConstrainedRnn {
    /// The rate RNN's initialisation. Under Dale's law the inhibitory
    /// columns are scaled by N_E/N_I so that every row of the effective W
    /// sums to zero in expectation (no outlier in the spectrum at start);
    /// then, under Dale's law or a mask, W̃ is rescaled so that the spectral
    /// radius of the effective W is the gain g (|·| and masks change the
    /// variance that g sets for a dense Gaussian W).
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        let mut ps = Model::<T>::init(&self.rnn, seed)?;
        let constrained = self.constraints.dale.is_some() || self.constraints.mask_w.is_some();
        if let Some(s) = &self.constraints.dale {
            let ne = s.iter().filter(|&&v| v > 0.0).count() as f64;
            let ni = s.len() as f64 - ne;
            if ne > 0.0 && ni > 0.0 {
                let n = self.rnn.n;
                let w = &mut ps.get_mut("W").expect("the rate RNN has W").value;
                for (k, v) in w.data_mut().iter_mut().enumerate() {
                    if s[k % n] < 0.0 {
                        *v *= T::from_f64(ne / ni);
                    }
                }
            }
        }
        if constrained && self.rnn.gain > 0.0 {
            let r = self.spectral_radius(&ps)?;
            if r > 0.0 {
                let w = &mut ps.get_mut("W").expect("the rate RNN has W").value;
                *w = w.scale(T::from_f64(self.rnn.gain / r));
            }
        }
        Ok(ps)
    }

    fn prepare<E: Ops<T>>(&self, e: &mut E, params: &[E::V]) -> Result<Vec<E::V>> {
        let eff = self.effective(e, params)?;
        self.rnn.prepare(e, &eff)
    }

    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        prepared: &[E::V],
        trials: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        self.rnn.run(e, prepared, trials, obs)
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        Model::<T>::sofo_flops(&self.rnn, k, batch)
    }
}
