//! The fixed random reservoir of tasks.md §4 with a trained linear readout,
//! as a [`Model`]: the network FORCE trains (`optim::force`), here trained
//! by SOFO or a first-order method instead.
//!
//! Row-vector form, state x (`[M, N]`, the z of §4), rates r = tanh x,
//! outputs y = r W (`[M, O]`), inputs u (`[M, I]`), Euler step dt in units
//! of τ:
//!
//! ```text
//! x ← (1 − dt) x + dt (r Jᵀ + y F + u B)
//! ```
//!
//! J (`[N, N]`, `J[i][j]` from unit j to unit i, FORCE's layout), the
//! feedback F (`[O, N]`) and the input weights B (`[I, N]`) are fixed;
//! the only parameter is the readout `W` (`[N, O]`, initially 0). The
//! network of a FORCE config, bit for bit, comes from
//! `optim::reservoir::reservoir_of` (that layer sits above this one).
//!
//! **One step** is FORCE's: x is advanced with the current r and y, then
//! r = tanh x and y = r W are recomputed; that y is step t's output, scored
//! by the batch's little loss of step t. Before step 0, r and y come from
//! the initial state x0. So for the same W and x0 this model and
//! `Force::run` produce the same outputs.
//!
//! **Initial states.** x0 is the batch's `initial` (`[M, N]`) when it has
//! one; otherwise `x0_scale`·N(0, 1) drawn per trial from the batch's noise
//! seed ([`Trials::noise`]), so it does not depend on how the trials are
//! split across threads. [`ReservoirRnn::initial_states`] gives the x0 of a
//! whole batch, to start another simulator (FORCE) from the same states.

use super::{Batch, Model, Trials};
use crate::loss::Observer;
use crate::params::{Param, ParamMode, ParamSet};
use crate::{Error, Result};
use sofo_ad::{Ops, Unary};
use sofo_tensor::{Float, Tensor, TensorError};

/// The noise "step" the initial states are drawn at: no real step uses it.
const X0_NOISE_STEP: usize = usize::MAX;

/// A fixed tanh reservoir with fed-back, trained linear readout.
#[derive(Debug, Clone)]
pub struct ReservoirRnn {
    /// Euler step in units of τ, in (0, 1].
    dt: f64,
    /// x0 ~ x0_scale · N(0, 1) when the batch has no initial states.
    x0_scale: f64,
    /// Jᵀ, `[N, N]`: the row convention multiplies r Jᵀ.
    jt: Tensor<f64>,
    /// F, `[O, N]`.
    feedback: Tensor<f64>,
    /// B, `[I, N]` (I may be 0).
    input_weights: Tensor<f64>,
}

impl ReservoirRnn {
    /// A reservoir from its fixed matrices: `recurrent` J `[N, N]` (`J[i][j]`
    /// from unit j to unit i), `feedback` F `[O, N]`, `input_weights` B
    /// `[I, N]` (`[0, N]` for none).
    pub fn new(
        dt: f64,
        x0_scale: f64,
        recurrent: &Tensor<f64>,
        feedback: Tensor<f64>,
        input_weights: Tensor<f64>,
    ) -> Result<Self> {
        if !(dt > 0.0 && dt <= 1.0) {
            return Err(Error::config("reservoir.dt", dt, "0 < dt ≤ 1 (units of τ)"));
        }
        if !(x0_scale >= 0.0 && x0_scale.is_finite()) {
            return Err(Error::config("reservoir.x0_scale", x0_scale, "finite, ≥ 0"));
        }
        let js = recurrent.shape();
        if js.len() != 2 || js[0] != js[1] || js[0] == 0 {
            return Err(Error::config(
                "reservoir.recurrent",
                format!("shape {js:?}"),
                "a square [N, N] matrix, N ≥ 1",
            ));
        }
        let n = js[0];
        let fs = feedback.shape();
        if fs.len() != 2 || fs[1] != n || fs[0] == 0 {
            return Err(Error::config(
                "reservoir.feedback",
                format!("shape {fs:?}"),
                format!("[O, {n}] with O ≥ 1"),
            ));
        }
        let bs = input_weights.shape();
        if bs.len() != 2 || bs[1] != n {
            return Err(Error::config(
                "reservoir.input_weights",
                format!("shape {bs:?}"),
                format!("[I, {n}] (I = 0 for no inputs)"),
            ));
        }
        Ok(ReservoirRnn {
            dt,
            x0_scale,
            jt: recurrent.transpose(0, 1)?,
            feedback,
            input_weights,
        })
    }

    /// Units N.
    pub fn n(&self) -> usize {
        self.jt.shape()[0]
    }
    /// Readout dimensions O.
    pub fn outputs(&self) -> usize {
        self.feedback.shape()[0]
    }
    /// Input dimensions I.
    pub fn inputs(&self) -> usize {
        self.input_weights.shape()[0]
    }
    pub fn dt(&self) -> f64 {
        self.dt
    }
    pub fn x0_scale(&self) -> f64 {
        self.x0_scale
    }
    /// J, `[N, N]` (`J[i][j]` from unit j to unit i).
    pub fn recurrent(&self) -> Tensor<f64> {
        self.jt.transpose(0, 1).expect("rank 2")
    }
    /// F, `[O, N]`.
    pub fn feedback(&self) -> &Tensor<f64> {
        &self.feedback
    }
    /// B, `[I, N]`.
    pub fn input_weights(&self) -> &Tensor<f64> {
        &self.input_weights
    }

    /// The initial states the model starts `batch` from, `[M, N]`: the
    /// batch's own, or the seeded draw (see the module notes).
    pub fn initial_states<T: Float>(&self, batch: &Batch<T>) -> Result<Tensor<T>> {
        self.x0(&batch.all())
    }

    fn x0<T: Float>(&self, trials: &Trials<'_, T>) -> Result<Tensor<T>> {
        let (m, n) = (trials.trials(), self.n());
        match trials.initial()? {
            Some(x) if x.shape() == [m, n] => Ok(x),
            Some(x) => Err(TensorError::shape(
                "reservoir initial states",
                format!("[{m}, {n}] ([M, N])"),
                format!("{:?}", x.shape()),
            )
            .into()),
            None => Ok(trials
                .noise(X0_NOISE_STEP, n, None)?
                .scale(T::from_f64(self.x0_scale))),
        }
    }
}

impl<T: Float> Model<T> for ReservoirRnn {
    /// `W` = 0, `[N, O]` (the seed is not used: FORCE starts from 0 too).
    fn init(&self, _seed: u64) -> Result<ParamSet<T>> {
        Ok(ParamSet::new(vec![Param {
            name: "W".into(),
            value: Tensor::zeros(&[self.n(), self.outputs()]),
            mode: ParamMode::Free,
        }]))
    }

    /// Prepared: [W, Jᵀ, F, B], the fixed matrices as constants (no
    /// tangents, no gradients), made once per pass.
    fn prepare<E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        Ok(vec![
            p[0].clone(),
            e.constant(self.jt.convert())?,
            e.constant(self.feedback.convert())?,
            e.constant(self.input_weights.convert())?,
        ])
    }

    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        let (w, jt, f, b) = (&p[0], &p[1], &p[2], &p[3]);
        let ni = self.inputs();
        // as FORCE: inputs iff the reservoir has input weights
        match (ni, &batch.batch.inputs) {
            (0, None) => {}
            (0, Some(_)) => {
                return Err(Error::config(
                    "inputs",
                    "given",
                    "none: the reservoir has no input weights",
                ))
            }
            (_, Some(u)) if u.shape().len() == 3 && u.shape()[2] == ni => {}
            (_, u) => {
                return Err(Error::config(
                    "inputs",
                    u.as_ref()
                        .map_or("none".into(), |u| format!("shape {:?}", u.shape())),
                    format!("[T, M, {ni}] inputs (the reservoir has {ni})"),
                ))
            }
        }
        let dt = T::from_f64(self.dt);
        let mut x = e.constant(self.x0(batch)?)?;
        let mut r = e.unary(&x, Unary::Tanh)?;
        let mut y = e.linear(None, T::one(), &[(&r, w)], None)?;
        for t in 0..batch.steps() {
            let u = batch.input_on(e, t)?;
            x = match &u {
                Some(u) => e.linear(
                    Some((&x, T::one() - dt)),
                    dt,
                    &[(&r, jt), (&y, f), (u, b)],
                    None,
                )?,
                None => e.linear(Some((&x, T::one() - dt)), dt, &[(&r, jt), (&y, f)], None)?,
            };
            r = e.unary(&x, Unary::Tanh)?;
            y = e.linear(None, T::one(), &[(&r, w)], None)?;
            if batch.observed(t) {
                obs.observe(e, &y, &batch.step_loss(t)?)?;
            }
        }
        Ok(())
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        // tangent GEMMs per step and trial: ṙ Jᵀ (2KN²), ẏ F and ṙ W + r Ẇ
        // (2KNO each)
        let (n, o) = (self.n() as f64, self.outputs() as f64);
        2.0 * (k * batch.trials * batch.steps) as f64 * (n * n + 3.0 * n * o)
    }
}
