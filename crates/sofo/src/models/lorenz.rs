//! The Lorenz model of tasks.md §1: the network state is the 3-d state y,
//!   y_{t+1} = y_t A + relu([y_t, 1] C) W,
//! A 3×3 (init I), C 4×H (init N(0, 1/4)), W H×3 (init N(0, 0.01/H)).
//! It runs autonomously from `batch.initial` and is observed where the
//! batch's weights are non-zero (the last step, for sparse supervision).

use super::{Batch, Model, Trials};
use crate::loss::Observer;
use crate::params::{Param, ParamMode, ParamSet};
use crate::{Error, Result};
use sofo_ad::{Ops, Unary};
use sofo_tensor::{rng, Float, Tensor};

#[derive(Debug, Clone)]
pub struct LorenzModel {
    /// Hidden units H (400 in the paper, giving P = 2809).
    pub hidden: usize,
}

impl<T: Float> Model<T> for LorenzModel {
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        if self.hidden == 0 {
            return Err(Error::config("model.hidden", self.hidden, "at least 1"));
        }
        let h = self.hidden;
        let mut a = Tensor::<T>::zeros(&[3, 3]);
        for i in 0..3 {
            a.data_mut()[i * 3 + i] = T::one();
        }
        let mut c = Tensor::<T>::scratch(&[4, h]);
        rng::fill_normal(c.data_mut(), seed, 11);
        let c = c.scale(T::from_f64(0.5));
        let mut w = Tensor::<T>::scratch(&[h, 3]);
        rng::fill_normal(w.data_mut(), seed, 12);
        let w = w.scale(T::from_f64((0.01 / h as f64).sqrt()));
        let p = |name: &str, value| Param {
            name: name.to_string(),
            value,
            mode: ParamMode::Free,
        };
        Ok(ParamSet::new(vec![p("A", a), p("C", c), p("W", w)]))
    }

    /// Prepared: `[A, C[:3], C[3], W]`.
    fn prepare<E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        let c_in = e.slice(&p[1], 0, 0, 3)?;
        let c_bias = e.slice(&p[1], 0, 3, 1)?;
        let c_bias = e.reshape(&c_bias, &[self.hidden])?;
        Ok(vec![p[0].clone(), c_in, c_bias, p[2].clone()])
    }

    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        let init = batch
            .initial()?
            .ok_or_else(|| Error::config("batch.initial", "none", "initial states [M, 3]"))?;
        let (c_in, c_bias) = (&p[1], &p[2]);
        let mut y = e.constant(init)?;
        // where the engine applies relu as it reads `pre` (the readout's
        // kernel on a GPU), h = relu(pre) and its [M, K, H] tangents are
        // never stored; elsewhere the ops as they always ran
        let readout = e.shape(&p[3]);
        let fused = e.fuses_unary_into_linear(readout[0], readout[1]);
        for t in 0..batch.steps() {
            let pre = e.linear(None, T::one(), &[(&y, c_in)], Some(c_bias))?;
            y = if fused {
                let hidden = (&pre, Unary::Relu, None, &p[3]);
                e.linear_of_unary(None, T::one(), hidden, &[(&y, &p[0])], None)?
            } else {
                let h = e.relu(&pre)?;
                e.linear(None, T::one(), &[(&y, &p[0]), (&h, &p[3])], None)?
            };
            if batch.observed(t) {
                obs.observe(e, &y, &batch.step_loss(t)?)?;
            }
        }
        Ok(())
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        // per step: [M·K,3]·[3,H] and [M·K,H]·[H,3] plus the parameter-tangent
        // products of the same sizes, 2 flops per multiply-add
        let (m, h) = (batch.trials as f64, self.hidden as f64);
        2.0 * 2.0 * (k as f64) * m * (3.0 * h + h * 3.0 + 9.0) * batch.steps as f64
    }
}
