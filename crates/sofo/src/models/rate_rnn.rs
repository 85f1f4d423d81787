//! The standard rate RNN:
//!   x_t = x_{t−1} + α(−x_{t−1} + W φ(x_{t−1}) + B u_t + b),  y_t = C φ(x_t) + d
//! with α = dt/τ. Tensors `W` [N,N], `B` [N,I], `b` [N], `C` [O,N], `d` [O]
//! and, when learned, `x0` [N].

use super::init::{check_rnn, param, rnn_weights};
use super::{linear_of_rates, Batch, Model, Trials};
use crate::loss::Observer;
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_ad::{Ops, Unary};
use sofo_tensor::{Float, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Tanh,
    Relu,
    Softplus,
}

impl Activation {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tanh" => Ok(Activation::Tanh),
            "relu" => Ok(Activation::Relu),
            "softplus" => Ok(Activation::Softplus),
            _ => Err(Error::config("activation", s, "tanh, relu or softplus")),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Activation::Tanh => "tanh",
            Activation::Relu => "relu",
            Activation::Softplus => "softplus",
        }
    }
    pub(crate) fn op(self) -> Unary {
        match self {
            Activation::Tanh => Unary::Tanh,
            Activation::Relu => Unary::Relu,
            Activation::Softplus => Unary::Softplus,
        }
    }
}

#[derive(Debug, Clone)]
pub struct RateRnn {
    pub n: usize,
    pub inputs: usize,
    pub outputs: usize,
    /// α = dt/τ
    pub alpha: f64,
    pub activation: Activation,
    /// Learn the initial state x0 (else x0 = 0).
    pub learn_x0: bool,
    /// Gain g of the initial recurrent weights, W ~ N(0, g²/N).
    pub gain: f64,
}

impl RateRnn {
    pub fn validate(&self) -> Result<()> {
        check_rnn(self.n, self.alpha, self.gain)?;
        if self.outputs == 0 {
            return Err(Error::config("model.outputs", self.outputs, "at least 1"));
        }
        Ok(())
    }
}

impl<T: Float> Model<T> for RateRnn {
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        self.validate()?;
        let (n, i, o) = (self.n, self.inputs, self.outputs);
        let mut ps = rnn_weights(n, i, o, self.gain, seed);
        ps.push(param("d", Tensor::zeros(&[o])));
        if self.learn_x0 {
            ps.push(param("x0", Tensor::zeros(&[n])));
        }
        Ok(ParamSet::new(ps))
    }

    /// Row convention (x · Wᵀ): the weights are transposed once per pass.
    /// Prepared: [Wᵀ, Bᵀ, b, Cᵀ, d, (x0)].
    fn prepare<E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        let mut out = vec![
            e.transpose(&p[0], 0, 1)?,
            e.transpose(&p[1], 0, 1)?,
            p[2].clone(),
            e.transpose(&p[3], 0, 1)?,
            p[4].clone(),
        ];
        if self.learn_x0 {
            out.push(p[5].clone());
        }
        Ok(out)
    }

    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        let m = batch.trials();
        let a = T::from_f64(self.alpha);
        let (wt, bt, ct) = (&p[0], &p[1], &p[3]);
        let mut x = if self.learn_x0 {
            e.broadcast_to(&p[5], &[m, self.n])?
        } else {
            e.constant(Tensor::zeros(&[m, self.n]))?
        };
        let phi = self.activation.op();
        // r = φ(x) for the two linear ops that read it: computed once, or,
        // where the engine applies φ as it reads x (for the recurrence's
        // W, and so for the readout), never stored
        let fused = e.fuses_unary_into_linear(self.n, self.n);
        let mut r = if fused { None } else { Some(e.unary(&x, phi)?) };
        for t in 0..batch.steps() {
            let ut = batch.input_on(e, t)?;
            let input = ut.as_ref().map(|u| (u, bt));
            let leak = Some((&x, T::one() - a));
            let rates = (&x, phi, None, r.as_ref());
            x = linear_of_rates(e, rates, leak, a, wt, input.as_slice(), Some(&p[2]))?;
            if !fused {
                r = Some(e.unary(&x, phi)?);
            }
            if batch.observed(t) {
                let rates = (&x, phi, None, r.as_ref());
                let y = linear_of_rates(e, rates, None, T::one(), ct, &[], Some(&p[4]))?;
                obs.observe(e, &y, &batch.step_loss(t)?)?;
            }
        }
        Ok(())
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        // the convention of the benchmark: 4·K·M·N²·T
        4.0 * (k * batch.trials * self.n * self.n * batch.steps) as f64
    }
}
