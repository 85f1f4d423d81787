//! A rate RNN driving the two-joint arm (tasks.md §2):
//!
//! ```text
//! r_t = relu(z_t) ⊙ η_t                     η ~ U[1 − σ', 1 + σ'] clipped at 0
//! τ_t = r_t Cᵀ + d                           joint torques [M, 2]
//! (θ, θ̇)_{t+1} = arm(θ_t, θ̇_t, τ_t)         explicit Euler
//! z_{t+1} = (1 − α) z_t + α (r_t Wᵀ + u_t Bᵀ + [θ, θ̇]_{t+1} Fᵀ + b)
//! ```
//!
//! with α = dt/τ and σ' = `noise`·√(τ/dt). The hand's position and velocity
//! `[M, 4]` after each arm step are the observed outputs. Tensors `W` [N,N],
//! `B` [N,I], `F` [N,4] (proprioceptive feedback of θ1, θ2, θ̇1, θ̇2), `b` [N],
//! `C` [2,N], `d` [2] and the learned initial state `x0` [N]. The noise is
//! drawn from the batch's noise seed (a constant with respect to θ).

use super::arm::TwoJointArm;
use super::init::{check_rnn, normal, param};
use super::{linear_of_rates, Batch, Model, Trials};
use crate::loss::Observer;
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_ad::{Ops, Unary};
use sofo_tensor::{Float, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct ReachRnn {
    pub n: usize,
    pub inputs: usize,
    /// α = dt/τ (§2: 2 ms / 20 ms = 0.1).
    pub alpha: f64,
    /// Gain g of the initial recurrent weights, W ~ N(0, g²/N).
    pub gain: f64,
    /// Multiplicative rate noise: σ' = noise·√(τ/dt) = noise/√α (§2: 0.2);
    /// 0 turns it off.
    pub noise: f64,
    pub arm: TwoJointArm,
}

impl ReachRnn {
    /// tasks.md §2: N = 64, α = 0.1, noise 0.2, a weak start (g = 0.5).
    pub fn paper(inputs: usize) -> Self {
        ReachRnn {
            n: 64,
            inputs,
            alpha: 0.1,
            gain: 0.5,
            noise: 0.2,
            arm: TwoJointArm::li_todorov(),
        }
    }

    pub fn validate(&self) -> Result<()> {
        check_rnn(self.n, self.alpha, self.gain)?;
        if !(self.noise >= 0.0 && self.noise.is_finite()) {
            return Err(Error::config(
                "model.noise",
                self.noise,
                "a finite value ≥ 0",
            ));
        }
        if !(self.arm.dt > 0.0 && self.arm.dt.is_finite()) {
            return Err(Error::config("arm.dt", self.arm.dt, "a finite value > 0"));
        }
        Ok(())
    }

    /// σ', the half-width of the multiplicative noise.
    pub fn noise_width(&self) -> f64 {
        self.noise / self.alpha.sqrt()
    }
}

impl<T: Float> Model<T> for ReachRnn {
    fn init(&self, seed: u64) -> Result<ParamSet<T>> {
        self.validate()?;
        let (n, i) = (self.n, self.inputs);
        let inv_sqrt = |k: usize| 1.0 / (k.max(1) as f64).sqrt();
        Ok(ParamSet::new(vec![
            param("W", normal(&[n, n], self.gain * inv_sqrt(n), seed, 1)),
            param("B", normal(&[n, i], inv_sqrt(i), seed, 2)),
            // θ and θ̇ are O(1) rad and rad/s: the same scale as the inputs
            param("F", normal(&[n, 4], inv_sqrt(4), seed, 4)),
            param("b", Tensor::zeros(&[n])),
            // torques of O(0.1) N·m for O(1) rates move the arm a few cm
            // in the first 100 ms: a gentle start
            param("C", normal(&[2, n], 0.1 * inv_sqrt(n), seed, 3)),
            param("d", Tensor::zeros(&[2])),
            param("x0", Tensor::zeros(&[n])),
        ]))
    }

    /// Prepared: `[Wᵀ, Bᵀ, b, x0, Fᵀ, Cᵀ, d]`.
    fn prepare<E: Ops<T>>(&self, e: &mut E, p: &[E::V]) -> Result<Vec<E::V>> {
        Ok(vec![
            e.transpose(&p[0], 0, 1)?,
            e.transpose(&p[1], 0, 1)?,
            p[3].clone(),
            p[6].clone(),
            e.transpose(&p[2], 0, 1)?,
            e.transpose(&p[4], 0, 1)?,
            p[5].clone(),
        ])
    }

    /// The arm's state is one `[M, 4]` value (θ1, θ2, θ̇1, θ̇2) and the
    /// torques one `[M, 2]`; the arm's step and the hand are elementwise
    /// programs ([`TwoJointArm::step_program`]), each one op.
    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()> {
        let m = batch.trials();
        let a = T::from_f64(self.alpha);
        let (wt, bt, bias) = (&p[0], &p[1], &p[2]);
        let (ft, ct, d) = (&p[4], &p[5], &p[6]);
        let (arm_step, hand_of) = (self.arm.step_program()?, self.arm.hand_program()?);
        let start = TwoJointArm::start_angles();
        let at_rest = [
            T::from_f64(start[0]),
            T::from_f64(start[1]),
            T::zero(),
            T::zero(),
        ];
        let mut arm = e.constant(Tensor::from_vec(
            &[m, 4],
            (0..m).flat_map(|_| at_rest).collect(),
        )?)?;
        let mut z = e.broadcast_to(&p[3], &[m, self.n])?;
        let width = self.noise_width();
        // the noise of as many steps at a time as the engine takes (a GPU
        // copies them in one upload): (first step, its blocks)
        let noise_steps = e.block_steps(m * self.n).max(1);
        let mut noise: Option<(usize, Tensor<T>)> = None;
        // the rates r = relu(z) ⊙ η for the two linear ops that read them:
        // computed once, or, where the engine applies relu and η as it reads
        // z, never stored
        let fused = e.fuses_unary_into_linear(self.n, self.n);
        for t in 0..batch.steps() {
            let eta = if width > 0.0 {
                if noise.as_ref().is_none_or(|(t0, _)| t >= t0 + noise_steps) {
                    let range = Some((1.0 - width, 1.0 + width));
                    let mut eta = batch.noise_steps(t, noise_steps, self.n, range)?;
                    if width > 1.0 {
                        // the clip at 0 only bites when the range reaches below it
                        eta = eta.map(|v| v.max(T::zero()));
                    }
                    noise = Some((t, eta));
                }
                let (t0, eta) = noise.as_ref().expect("drawn above");
                Some(e.constant_block(eta, (t - t0) * m * self.n, &[m, self.n])?)
            } else {
                None
            };
            let r = match (&eta, fused) {
                (_, true) => None,
                (Some(eta), false) => Some(e.unary_mul(&z, Unary::Relu, eta)?),
                (None, false) => Some(e.relu(&z)?),
            };
            let rates = (&z, Unary::Relu, eta.as_ref(), r.as_ref());
            let tau = linear_of_rates(e, rates, None, T::one(), ct, &[], Some(d))?;
            arm = e.pointwise(&arm_step, &[&arm, &tau])?;
            if batch.observed(t) {
                let hand = e.pointwise(&hand_of, &[&arm])?;
                obs.observe(e, &hand, &batch.step_loss(t)?)?;
            }
            let u = batch.input_on(e, t)?;
            let mut rest = vec![(&arm, ft)];
            if let Some(u) = &u {
                rest.push((u, bt));
            }
            let leak = Some((&z, T::one() - a));
            z = linear_of_rates(e, rates, leak, a, wt, &rest, Some(bias))?;
        }
        Ok(())
    }

    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64 {
        4.0 * (k * batch.trials * self.n * self.n * batch.steps) as f64
    }
}
