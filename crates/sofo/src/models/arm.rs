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
use sofo_ad::Ops;
use sofo_tensor::{Float, Tensor};

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

    /// Joint accelerations θ̈ `[M, 2]` under torques `tau` `[M, 2]`.
    pub fn acceleration<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        theta: &E::V,
        vel: &E::V,
        tau: &E::V,
    ) -> Result<E::V> {
        let (a1, a2, a3) = self.inertia_constants();
        let th2 = e.slice(theta, 1, 1, 1)?;
        let (c2, s2) = (e.cos(&th2)?, e.sin(&th2)?);
        let (v1, v2) = (e.slice(vel, 1, 0, 1)?, e.slice(vel, 1, 1, 1)?);

        // the mass matrix: m11 = A1 + 2 A2 c2, m12 = A3 + A2 c2, m22 = A3
        let m11 = e.mul_scalar(&c2, 2.0 * a2)?;
        let m11 = e.add_scalar(&m11, a1)?;
        let m12 = e.mul_scalar(&c2, a2)?;
        let m12 = e.add_scalar(&m12, a3)?;
        let m12sq = e.square(&m12)?;
        let det = e.mul_scalar(&m11, a3)?;
        let det = e.sub(&det, &m12sq)?;

        // Coriolis/centripetal: A2 s2 · [−v2 (2 v1 + v2), v1²]
        let a2s2 = e.mul_scalar(&s2, a2)?;
        let two_v1 = e.mul_scalar(&v1, 2.0)?;
        let sum = e.add(&two_v1, &v2)?;
        let cor1 = e.mul(&v2, &sum)?;
        let cor1 = e.mul(&cor1, &a2s2)?;
        let cor1 = e.neg(&cor1)?;
        let v1sq = e.square(&v1)?;
        let cor2 = e.mul(&v1sq, &a2s2)?;
        let cor = e.concat(&[&cor1, &cor2], 1)?;

        // rhs = τ − c − B θ̇ (B symmetric, so θ̇ B in row form)
        let b = e.constant(Tensor::from_f64_slice(&[2, 2], &self.viscosity)?)?;
        let visc = e.matmul(vel, &b)?;
        let rhs = e.sub(tau, &cor)?;
        let rhs = e.sub(&rhs, &visc)?;
        let (r1, r2) = (e.slice(&rhs, 1, 0, 1)?, e.slice(&rhs, 1, 1, 1)?);

        // M⁻¹ rhs by cofactors: [A3 r1 − m12 r2, m11 r2 − m12 r1] / det
        let t1 = e.mul_scalar(&r1, a3)?;
        let t2 = e.mul(&m12, &r2)?;
        let n1 = e.sub(&t1, &t2)?;
        let t3 = e.mul(&m11, &r2)?;
        let t4 = e.mul(&m12, &r1)?;
        let n2 = e.sub(&t3, &t4)?;
        let num = e.concat(&[&n1, &n2], 1)?;
        Ok(e.div(&num, &det)?)
    }

    /// One explicit Euler step: the new (θ, θ̇).
    pub fn step<T: Float, E: Ops<T>>(
        &self,
        e: &mut E,
        theta: &E::V,
        vel: &E::V,
        tau: &E::V,
    ) -> Result<(E::V, E::V)> {
        let acc = self.acceleration(e, theta, vel, tau)?;
        let dtheta = e.mul_scalar(vel, self.dt)?;
        let theta_next = e.add(theta, &dtheta)?;
        let dvel = e.mul_scalar(&acc, self.dt)?;
        let vel_next = e.add(vel, &dvel)?;
        Ok((theta_next, vel_next))
    }

    /// Hand position and velocity `[M, 4]` = (x, y, ẋ, ẏ); the velocity is
    /// the Jacobian of the position times θ̇.
    pub fn hand<T: Float, E: Ops<T>>(&self, e: &mut E, theta: &E::V, vel: &E::V) -> Result<E::V> {
        let th1 = e.slice(theta, 1, 0, 1)?;
        let th2 = e.slice(theta, 1, 1, 1)?;
        let th12 = e.add(&th1, &th2)?;
        let (c1, s1) = (e.cos(&th1)?, e.sin(&th1)?);
        let (c12, s12) = (e.cos(&th12)?, e.sin(&th12)?);
        let v1 = e.slice(vel, 1, 0, 1)?;
        let v2 = e.slice(vel, 1, 1, 1)?;
        let v12 = e.add(&v1, &v2)?;

        let lin = |e: &mut E, a: &E::V, ca: f64, b: &E::V, cb: f64| -> Result<E::V> {
            let a = e.mul_scalar(a, ca)?;
            let b = e.mul_scalar(b, cb)?;
            Ok(e.add(&a, &b)?)
        };
        let x = lin(e, &c1, self.l1, &c12, self.l2)?;
        let y = lin(e, &s1, self.l1, &s12, self.l2)?;
        // ẋ = −L1 s1 θ̇1 − L2 s12 (θ̇1 + θ̇2);  ẏ = L1 c1 θ̇1 + L2 c12 (θ̇1 + θ̇2)
        let s1v = e.mul(&s1, &v1)?;
        let s12v = e.mul(&s12, &v12)?;
        let vx = lin(e, &s1v, -self.l1, &s12v, -self.l2)?;
        let c1v = e.mul(&c1, &v1)?;
        let c12v = e.mul(&c12, &v12)?;
        let vy = lin(e, &c1v, self.l1, &c12v, self.l2)?;
        Ok(e.concat(&[&x, &y, &vx, &vy], 1)?)
    }
}
