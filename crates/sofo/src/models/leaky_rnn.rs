//! The leaky relu network of the adaptive Kalman task (tasks.md §3):
//!   z_t = (1 − α) z_{t−1} + α relu(W z_{t−1} + B u_t + b),  ŷ_t = C z_t
//! Unlike [`super::RateRnn`] the readout sees the state itself (no
//! nonlinearity, no bias). Tensors `W` [N,N], `B` [N,I], `b` [N], `C` [O,N]
//! and, when learned, `x0` [N] (the state z_0; else z_0 = 0).

use super::init::{check_rnn, param, rnn_weights};
use super::{Batch, Model, Trials};
use crate::loss::Observer;
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_ad::{Ops, Unary};
use sofo_tensor::{Float, Tensor};

#[derive(Debug, Clone)]
pub struct LeakyRnn {
    pub n: usize,
    pub inputs: usize,
    pub outputs: usize,
    /// Leak α (tasks.md §3: 0.25).
    pub alpha: f64,
    /// Gain g of the initial recurrent weights, W ~ N(0, g²/N).
    pub gain: f64,
    /// Learn the initial state (else z_0 = 0).
    pub learn_x0: bool,
}

impl LeakyRnn {
    /// tasks.md §3: N units, one input (y_t), one output (x̂_t), α = 0.25.
    pub fn kalman(n: usize) -> Self {
        LeakyRnn {
            n,
            inputs: 1,
            outputs: 1,
            alpha: 0.25,
            gain: 0.5,
            learn_x0: false,
        }
    }

    pub fn validate(&self) -> Result<()> {
        // α > 0 also makes α·relu(a) = relu(α·a), which `run` relies on
        check_rnn(self.n, self.alpha, self.gain)?;
        if self.outputs == 0 {
            return Err(Error::config("model.outputs", self.outputs, "at least 1"));
        }
        Ok(())
    }
}

impl<T: Float> Model<T> for LeakyRnn {
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        self.validate()?;
        let (n, i, o) = (self.n, self.inputs, self.outputs);
        let mut ps = rnn_weights(n, i, o, self.gain, seed);
        if self.learn_x0 {
            ps.push(param("x0", Tensor::zeros(&[n])));
        }
        Ok(ParamSet::new(ps))
    }

    /// Row convention (z · Wᵀ): the weights are transposed once per pass.
    /// Prepared: [Wᵀ, Bᵀ, b, Cᵀ, (x0)].
    fn prepare<E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        let mut out = vec![
            e.transpose(&p[0], 0, 1)?,
            e.transpose(&p[1], 0, 1)?,
            p[2].clone(),
            e.transpose(&p[3], 0, 1)?,
        ];
        if self.learn_x0 {
            out.push(p[4].clone());
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
        let mut z = if self.learn_x0 {
            e.broadcast_to(&p[4], &[m, self.n])?
        } else {
            e.constant(Tensor::zeros(&[m, self.n]))?
        };
        let keep = T::from_f64(1.0 - self.alpha);
        for t in 0..batch.steps() {
            // α·relu(a) = relu(α·a) for α > 0: the scale rides in the fused
            // op; relu and the leak in the linear op's kernel on a GPU
            let ut = batch.input_on(e, t)?;
            let mut terms = vec![(&z, wt)];
            terms.extend(ut.iter().map(|u| (u, bt)));
            z = e.unary_of_linear(Some((&z, keep)), a, Unary::Relu, &terms, Some(&p[2]))?;
            if batch.observed(t) {
                let y = e.linear(None, T::one(), &[(&z, ct)], None)?;
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
