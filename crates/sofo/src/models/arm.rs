//! The planar two-joint arm of tasks.md §2 (torque-driven, Li & Todorov
//! parameters), written once in the op vocabulary so that it runs in the
//! loop of a network under the primal, forward-K and reverse engines.
//!
//! State: joint angles θ = (θ1, θ2) and velocities θ̇, each `[M, 2]`.
//!
//! ```text
//! M(θ) = [[A1 + 2 A2 cos θ2, A3 + A2 cos θ2], [A3 + A2 cos θ2, A3]]
//! c(θ, θ̇) = A2 sin θ2 · [−θ̇2 (2 θ̇1 + θ̇2), θ̇1²]
//! θ̈ = M(θ)⁻¹ (τ − c − B θ̇)
//! θ ← θ + dt θ̇,  θ̇ ← θ̇ + dt θ̈            (explicit Euler)
//! ```
//!
//! with A1 = I1 + I2 + M2 L1², A2 = M2 L1 S2, A3 = I2. M(θ)⁻¹ is the 2×2
//! inverse by cofactors (det M = A1 A3 − A3² − A2² cos² θ2 > 0 for these
//! parameters, so it never vanishes).

use crate::Result;
use sofo_ad::{Ops, Pointwise};
use sofo_tensor::Float;

/// Arm parameters (SI units).
#[derive(Debug, Clone, PartialEq)]
pub struct TwoJointArm {
    /// Link lengths L1, L2 (m).
    pub l1: f64,
    pub l2: f64,
    /// Link masses M1, M2 (kg).
    pub m1: f64,
    pub m2: f64,
    /// Moments of inertia I1, I2 (kg·m²).
    pub i1: f64,
    pub i2: f64,
    /// Centre of mass of link 2, S2 (m).
    pub s2: f64,
    /// Joint viscosity B (N·m·s/rad), row-major 2×2.
    pub viscosity: [f64; 4],
    /// Euler step (s).
    pub dt: f64,
}

impl TwoJointArm {
    /// tasks.md §2 at the network's dt = 2 ms.
    pub fn li_todorov() -> Self {
        TwoJointArm {
            l1: 0.30,
            l2: 0.33,
            m1: 1.4,
            m2: 1.0,
            i1: 0.025,
            i2: 0.045,
            s2: 0.16,
            viscosity: [0.05, 0.025, 0.025, 0.05],
            dt: 0.002,
        }
    }

    /// (A1, A2, A3).
    pub fn inertia_constants(&self) -> (f64, f64, f64) {
        (
            self.i1 + self.i2 + self.m2 * self.l1 * self.l1,
            self.m2 * self.l1 * self.s2,
            self.i2,
        )
    }

    /// The start posture of tasks.md §2: θ1 = 20°, θ2 = 140°, at rest.
    pub fn start_angles() -> [f64; 2] {
        [20f64.to_radians(), 140f64.to_radians()]
    }

    /// Hand position (x, y) at joint angles θ, in plain f64.
    pub fn hand_position(&self, theta: [f64; 2]) -> [f64; 2] {
        let s = theta[0] + theta[1];
        [
            self.l1 * theta[0].cos() + self.l2 * s.cos(),
            self.l1 * theta[0].sin() + self.l2 * s.sin(),
        ]
    }

    /// The central spot: the hand at the start posture.
    pub fn central_spot(&self) -> [f64; 2] {
        self.hand_position(Self::start_angles())
    }

    /// Kinetic energy ½ θ̇ᵀ M(θ) θ̇ (plain f64; for tests and reports).
    pub fn kinetic_energy(&self, theta: [f64; 2], vel: [f64; 2]) -> f64 {
        let (a1, a2, a3) = self.inertia_constants();
        let c2 = theta[1].cos();
        let (m11, m12, m22) = (a1 + 2.0 * a2 * c2, a3 + a2 * c2, a3);
        0.5 * (m11 * vel[0] * vel[0] + 2.0 * m12 * vel[0] * vel[1] + m22 * vel[1] * vel[1])
    }

    /// Joint accelerations (θ̈1, θ̈2), each `[M, 1]`, under torques (τ1, τ2).
    pub fn acceleration<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        s: &ArmState<E::V>,
        tau: [&E::V; 2],
    ) -> Result<[E::V; 2]> {
        let (a1, a2, a3) = self.inertia_constants();
        let (c2, s2) = (e.cos(&s.theta[1])?, e.sin(&s.theta[1])?);
        let [v1, v2] = &s.vel;

        // the mass matrix: m11 = A1 + 2 A2 c2, m12 = A3 + A2 c2, m22 = A3
        let m11 = e.mul_scalar(&c2, 2.0 * a2)?;
        let m11 = e.add_scalar(&m11, a1)?;
        let m12 = e.mul_scalar(&c2, a2)?;
        let m12 = e.add_scalar(&m12, a3)?;
        let m12sq = e.square(&m12)?;
        let det = e.mul_scalar(&m11, a3)?;
        let det = e.sub(&det, &m12sq)?;

        // rhs = τ − c − B θ̇ with c = A2 s2 · [−v2 (2 v1 + v2), v1²]
        let a2s2 = e.mul_scalar(&s2, a2)?;
        let two_v1 = e.mul_scalar(v1, 2.0)?;
        let sum = e.add(&two_v1, v2)?;
        let cor1 = e.mul(v2, &sum)?;
        let cor1 = e.mul(&cor1, &a2s2)?;
        let v1sq = e.square(v1)?;
        let cor2 = e.mul(&v1sq, &a2s2)?;
        let b = self.viscosity;
        let visc = |e: &mut E, x: f64, y: f64| -> Result<E::V> {
            let p = e.mul_scalar(v1, x)?;
            let q = e.mul_scalar(v2, y)?;
            Ok(e.add(&p, &q)?)
        };
        let visc1 = visc(e, b[0], b[1])?;
        let visc2 = visc(e, b[2], b[3])?;
        let r1 = e.add(tau[0], &cor1)?; // −c1 = +A2 s2 v2 (2 v1 + v2)
        let r1 = e.sub(&r1, &visc1)?;
        let r2 = e.sub(tau[1], &cor2)?;
        let r2 = e.sub(&r2, &visc2)?;

        // M⁻¹ rhs by cofactors: [A3 r1 − m12 r2, m11 r2 − m12 r1] / det
        let t1 = e.mul_scalar(&r1, a3)?;
        let t2 = e.mul(&m12, &r2)?;
        let n1 = e.sub(&t1, &t2)?;
        let t3 = e.mul(&m11, &r2)?;
        let t4 = e.mul(&m12, &r1)?;
        let n2 = e.sub(&t3, &t4)?;
        Ok([e.div(&n1, &det)?, e.div(&n2, &det)?])
    }

    /// One explicit Euler step: the new state.
    pub fn step<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        s: &ArmState<E::V>,
        tau: [&E::V; 2],
    ) -> Result<ArmState<E::V>> {
        let acc = self.acceleration(e, s, tau)?;
        let euler = |e: &mut E, x: &E::V, dx: &E::V| -> Result<E::V> {
            let d = e.mul_scalar(dx, self.dt)?;
            Ok(e.add(x, &d)?)
        };
        Ok(ArmState {
            theta: [
                euler(e, &s.theta[0], &s.vel[0])?,
                euler(e, &s.theta[1], &s.vel[1])?,
            ],
            vel: [euler(e, &s.vel[0], &acc[0])?, euler(e, &s.vel[1], &acc[1])?],
        })
    }

    /// Hand position and velocity `[M, 4]` = (x, y, ẋ, ẏ); the velocity is
    /// the Jacobian of the position times θ̇.
    pub fn hand<T: Float, E: Ops<T>>(&self, e: &mut E, s: &ArmState<E::V>) -> Result<E::V> {
        let [x, y, vx, vy] = self.hand_columns(e, s)?;
        Ok(e.concat(&[&x, &y, &vx, &vy], 1)?)
    }

    /// One Euler step as an elementwise program ([`Ops::pointwise`]): inputs
    /// (θ1, θ2, θ̇1, θ̇2, τ1, τ2), outputs the new (θ1, θ2, θ̇1, θ̇2) — run on a
    /// state `[M, 4]` and torques `[M, 2]`, it gives the new state `[M, 4]`:
    /// one kernel on a GPU instead of ≈ 40 launches.
    pub fn step_program(&self) -> Result<Pointwise> {
        Pointwise::record(6, |rec, r| {
            let s = ArmState {
                theta: [r[0], r[1]],
                vel: [r[2], r[3]],
            };
            let n = self.step::<f64, _>(rec, &s, [&r[4], &r[5]])?;
            Ok(vec![n.theta[0], n.theta[1], n.vel[0], n.vel[1]])
        })
    }

    /// [`TwoJointArm::hand`] as an elementwise program: the state `[M, 4]`
    /// in, (x, y, ẋ, ẏ) `[M, 4]` out.
    pub fn hand_program(&self) -> Result<Pointwise> {
        Pointwise::record(4, |rec, r| {
            let s = ArmState {
                theta: [r[0], r[1]],
                vel: [r[2], r[3]],
            };
            Ok(self.hand_columns::<f64, _>(rec, &s)?.to_vec())
        })
    }

    /// The hand's (x, y, ẋ, ẏ), each `[M, 1]`.
    pub fn hand_columns<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        s: &ArmState<E::V>,
    ) -> Result<[E::V; 4]> {
        let [th1, th2] = &s.theta;
        let [v1, v2] = &s.vel;
        let th12 = e.add(th1, th2)?;
        let (c1, s1) = (e.cos(th1)?, e.sin(th1)?);
        let (c12, s12) = (e.cos(&th12)?, e.sin(&th12)?);
        let v12 = e.add(v1, v2)?;

        let lin = |e: &mut E, a: &E::V, ca: f64, b: &E::V, cb: f64| -> Result<E::V> {
            let a = e.mul_scalar(a, ca)?;
            let b = e.mul_scalar(b, cb)?;
            Ok(e.add(&a, &b)?)
        };
        let x = lin(e, &c1, self.l1, &c12, self.l2)?;
        let y = lin(e, &s1, self.l1, &s12, self.l2)?;
        // ẋ = −L1 s1 θ̇1 − L2 s12 (θ̇1 + θ̇2);  ẏ = L1 c1 θ̇1 + L2 c12 (θ̇1 + θ̇2)
        let s1v = e.mul(&s1, v1)?;
        let s12v = e.mul(&s12, &v12)?;
        let vx = lin(e, &s1v, -self.l1, &s12v, -self.l2)?;
        let c1v = e.mul(&c1, v1)?;
        let c12v = e.mul(&c12, &v12)?;
        let vy = lin(e, &c1v, self.l1, &c12v, self.l2)?;
        Ok([x, y, vx, vy])
    }
}

/// The arm's state as four `[M, 1]` columns (θ1, θ2) and (θ̇1, θ̇2): kept
/// apart so that a step needs no slicing or concatenation.
#[derive(Debug, Clone)]
pub struct ArmState<V> {
    pub theta: [V; 2],
    pub vel: [V; 2],
}

impl<V: Clone> ArmState<V> {
    /// From θ and θ̇ `[M, 2]`.
    pub fn from_pairs<T: Float, E: Ops<T, V = V>>(e: &mut E, theta: &V, vel: &V) -> Result<Self> {
        Ok(ArmState {
            theta: [e.slice(theta, 1, 0, 1)?, e.slice(theta, 1, 1, 1)?],
            vel: [e.slice(vel, 1, 0, 1)?, e.slice(vel, 1, 1, 1)?],
        })
    }

    /// (θ1, θ2, θ̇1, θ̇2) as one `[M, 4]` value.
    pub fn joined<T: Float, E: Ops<T, V = V>>(&self, e: &mut E) -> Result<V> {
        Ok(e.concat(
            &[&self.theta[0], &self.theta[1], &self.vel[0], &self.vel[1]],
            1,
        )?)
    }
}
