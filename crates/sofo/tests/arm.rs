#![allow(clippy::needless_range_loop)]
//! The two-joint arm (tasks.md §2): physics against independent plain-f64
//! integrations, its derivatives under forward and reverse mode, the reach
//! trial generator, and the network that drives the arm. f64 throughout.

mod common;

use common::*;
use sofo::models::{gradient_pass, record_outputs, ArmState, Model, ReachRnn, TwoJointArm};
use sofo::optim::{Damping, Sofo, SofoConfig};
use sofo::tasks::{ReachTask, Task};
use sofo::{Dual, Fwd, Ops, Tensor};
use sofo_ad::Rev;

/// One Euler step of the arm through the op vocabulary, primal only.
fn euler(arm: &TwoJointArm, th: [f64; 2], v: [f64; 2], tau: [f64; 2]) -> ([f64; 2], [f64; 2]) {
    let mut e = Fwd::primal();
    let c = |x: f64| Dual::constant(Tensor::from_f64_slice(&[1, 1], &[x]).unwrap());
    let s = ArmState {
        theta: [c(th[0]), c(th[1])],
        vel: [c(v[0]), c(v[1])],
    };
    let n = arm
        .step::<f64, _>(&mut e, &s, [&c(tau[0]), &c(tau[1])])
        .unwrap();
    let g = |d: &Dual<f64>| d.primal.data()[0];
    (
        [g(&n.theta[0]), g(&n.theta[1])],
        [g(&n.vel[0]), g(&n.vel[1])],
    )
}

/// The equations of motion written independently of the model code:
/// solve M(θ) θ̈ = τ − c − Bθ̇ by Cramer's rule.
fn accel_reference(arm: &TwoJointArm, th: [f64; 2], v: [f64; 2], tau: [f64; 2]) -> [f64; 2] {
    let a1 = arm.i1 + arm.i2 + arm.m2 * arm.l1 * arm.l1;
    let a2 = arm.m2 * arm.l1 * arm.s2;
    let a3 = arm.i2;
    let (m11, m12, m21, m22) = (
        a1 + 2.0 * a2 * th[1].cos(),
        a3 + a2 * th[1].cos(),
        a3 + a2 * th[1].cos(),
        a3,
    );
    let c = [
        -a2 * th[1].sin() * v[1] * (2.0 * v[0] + v[1]),
        a2 * th[1].sin() * v[0] * v[0],
    ];
    let b = arm.viscosity;
    let rhs = [
        tau[0] - c[0] - (b[0] * v[0] + b[1] * v[1]),
        tau[1] - c[1] - (b[2] * v[0] + b[3] * v[1]),
    ];
    let det = m11 * m22 - m12 * m21;
    [
        (rhs[0] * m22 - m12 * rhs[1]) / det,
        (m11 * rhs[1] - m21 * rhs[0]) / det,
    ]
}

/// Classic RK4 over the state (θ, θ̇) with torque `tau(t)`.
fn rk4(
    arm: &TwoJointArm,
    th: [f64; 2],
    v: [f64; 2],
    tau: impl Fn(f64) -> [f64; 2],
    h: f64,
    steps: usize,
) -> ([f64; 2], [f64; 2]) {
    let f = |t: f64, s: [f64; 4]| -> [f64; 4] {
        let a = accel_reference(arm, [s[0], s[1]], [s[2], s[3]], tau(t));
        [s[2], s[3], a[0], a[1]]
    };
    let mut s = [th[0], th[1], v[0], v[1]];
    let add = |s: [f64; 4], k: [f64; 4], c: f64| -> [f64; 4] {
        [
            s[0] + c * k[0],
            s[1] + c * k[1],
            s[2] + c * k[2],
            s[3] + c * k[3],
        ]
    };
    for i in 0..steps {
        let t = i as f64 * h;
        let k1 = f(t, s);
        let k2 = f(t + h / 2.0, add(s, k1, h / 2.0));
        let k3 = f(t + h / 2.0, add(s, k2, h / 2.0));
        let k4 = f(t + h, add(s, k3, h));
        for j in 0..4 {
            s[j] += h / 6.0 * (k1[j] + 2.0 * k2[j] + 2.0 * k3[j] + k4[j]);
        }
    }
    ([s[0], s[1]], [s[2], s[3]])
}

fn pulse(t: f64) -> [f64; 2] {
    if t < 0.1 {
        [1.5, -0.8]
    } else {
        [0.0, 0.0]
    }
}

/// Euler through the model's ops with the pulse, `steps` steps of `dt`.
fn euler_run(dt: f64, secs: f64) -> ([f64; 2], [f64; 2]) {
    let arm = TwoJointArm {
        dt,
        ..TwoJointArm::li_todorov()
    };
    let (mut th, mut v) = (TwoJointArm::start_angles(), [0.0, 0.0]);
    let steps = (secs / dt).round() as usize;
    for i in 0..steps {
        (th, v) = euler(&arm, th, v, pulse(i as f64 * dt));
    }
    (th, v)
}

#[test]
fn acceleration_matches_the_equations_of_motion() {
    let arm = TwoJointArm::li_todorov();
    let th = [0.3, 1.9];
    let v = [1.2, -2.1];
    let tau = [0.4, -0.25];
    let (_, v1) = euler(&arm, th, v, tau);
    let got = [(v1[0] - v[0]) / arm.dt, (v1[1] - v[1]) / arm.dt];
    let want = accel_reference(&arm, th, v, tau);
    for j in 0..2 {
        assert!(
            (got[j] - want[j]).abs() < 1e-9 * (1.0 + want[j].abs()),
            "θ̈{j}: {got:?} vs {want:?}"
        );
    }
}

#[test]
fn energy_is_conserved_to_the_order_of_euler_without_torque_or_viscosity() {
    let drift = |dt: f64| {
        let arm = TwoJointArm {
            dt,
            viscosity: [0.0; 4],
            ..TwoJointArm::li_todorov()
        };
        let (mut th, mut v) = ([0.4, 1.2], [2.0, -3.0]);
        let e0 = arm.kinetic_energy(th, v);
        let steps = (0.5 / dt).round() as usize;
        for _ in 0..steps {
            (th, v) = euler(&arm, th, v, [0.0, 0.0]);
        }
        (arm.kinetic_energy(th, v) - e0).abs() / e0
    };
    let (d1, d2, d3) = (drift(2e-3), drift(1e-3), drift(5e-4));
    // first order: the drift halves with dt (explicit Euler gains energy)
    assert!(d1 < 0.1, "relative energy drift over 0.5 s at 2 ms: {d1}");
    for (a, b) in [(d1, d2), (d2, d3)] {
        let ratio = a / b;
        assert!(
            (1.7..2.3).contains(&ratio),
            "drift ratio for halved dt {ratio} ({a} vs {b}), want ≈ 2"
        );
    }
    // and viscosity is what removes energy: with it, far more goes than the
    // Euler drift adds
    let arm = TwoJointArm::li_todorov();
    let (mut th, mut v) = ([0.4, 1.2], [2.0, -3.0]);
    let e0 = arm.kinetic_energy(th, v);
    for _ in 0..250 {
        (th, v) = euler(&arm, th, v, [0.0, 0.0]);
    }
    assert!(arm.kinetic_energy(th, v) < 0.5 * e0);
}

#[test]
fn a_torque_pulse_follows_an_independent_rk4_integration() {
    let secs = 0.5;
    let (th_ref, v_ref) = rk4(
        &TwoJointArm::li_todorov(),
        TwoJointArm::start_angles(),
        [0.0, 0.0],
        pulse,
        1e-5,
        (secs / 1e-5) as usize,
    );
    let err = |(th, v): ([f64; 2], [f64; 2])| {
        let a = (th[0] - th_ref[0]).abs().max((th[1] - th_ref[1]).abs());
        let b = (v[0] - v_ref[0]).abs().max((v[1] - v_ref[1]).abs());
        (a, b)
    };
    // the pulse moves the arm: the comparison is not between two rest states
    assert!((th_ref[0] - TwoJointArm::start_angles()[0]).abs() > 0.3);
    let (ea, ev) = err(euler_run(2e-3, secs));
    // at the network's 2 ms: within 0.02 rad and 0.1 rad/s after 0.5 s
    assert!(ea < 0.02 && ev < 0.1, "Euler at 2 ms: {ea} rad, {ev} rad/s");
    // and converging at first order to the RK4 trajectory
    let (ea2, _) = err(euler_run(1e-3, secs));
    let (ea4, _) = err(euler_run(5e-4, secs));
    assert!(
        (1.6..2.4).contains(&(ea / ea2)) && (1.6..2.4).contains(&(ea2 / ea4)),
        "errors {ea} {ea2} {ea4}: want halving with dt"
    );
}

#[test]
fn hand_velocity_is_the_derivative_of_hand_position() {
    let arm = TwoJointArm::li_todorov();
    let m = 5;
    let th = randn(&[m, 2], 1, 1).map(|v| v + 1.0);
    let v = randn(&[m, 2], 1, 2).scale(2.0);
    let mut e = Fwd::primal();
    let s = ArmState::from_pairs::<f64, _>(
        &mut e,
        &Dual::constant(th.clone()),
        &Dual::constant(v.clone()),
    )
    .unwrap();
    let hand = arm.hand::<f64, _>(&mut e, &s).unwrap().primal;
    let h = 1e-6;
    for j in 0..m {
        let at = |s: f64| {
            let t = [
                th.data()[j * 2] + s * v.data()[j * 2],
                th.data()[j * 2 + 1] + s * v.data()[j * 2 + 1],
            ];
            arm.hand_position(t)
        };
        let (p, q) = (at(h), at(-h));
        for c in 0..2 {
            let fd = (p[c] - q[c]) / (2.0 * h);
            let got = hand.data()[j * 4 + 2 + c];
            assert!(
                (got - fd).abs() < 1e-7 * (1.0 + fd.abs()),
                "trial {j} velocity {c}: {got} vs FD {fd}"
            );
        }
        let pos = arm.hand_position([th.data()[j * 2], th.data()[j * 2 + 1]]);
        assert!((hand.data()[j * 4] - pos[0]).abs() < 1e-15);
        assert!((hand.data()[j * 4 + 1] - pos[1]).abs() < 1e-15);
    }
}

/// Runs `steps` arm steps from (θ, θ̇) under per-step torques and returns the
/// hand states concatenated: a function of (θ0, θ̇0, torques) to differentiate.
fn arm_rollout<E: Ops<f64>>(e: &mut E, arm: &TwoJointArm, x: &[E::V]) -> E::V {
    let mut s = ArmState::from_pairs(e, &x[0], &x[1]).unwrap();
    let mut hands = vec![];
    for tau in &x[2..] {
        let t1 = e.slice(tau, 1, 0, 1).unwrap();
        let t2 = e.slice(tau, 1, 1, 1).unwrap();
        s = arm.step(e, &s, [&t1, &t2]).unwrap();
        hands.push(arm.hand(e, &s).unwrap());
    }
    hands.push(s.joined(e).unwrap());
    let refs: Vec<&E::V> = hands.iter().collect();
    e.concat(&refs, 1).unwrap()
}

/// The arm's step and hand as elementwise programs (one op each; one
/// kernel on a GPU) give, on the host engines, bit for bit what the arm code
/// gives op by op: values and tangents, over several steps.
#[test]
fn the_arm_programs_are_the_arm_code() {
    let arm = TwoJointArm {
        dt: 0.05,
        ..TwoJointArm::li_todorov()
    };
    let (step, hand) = (arm.step_program().unwrap(), arm.hand_program().unwrap());
    // both fit the GPU's pointwise kernel (64 registers: one launch each)
    assert_eq!((step.registers(), hand.registers()), (48, 26));
    let (m, k) = (3, 4);
    let mut e = Fwd::new(k);
    let dual = |shape: &[usize], seed: u64| {
        let mut ts = shape.to_vec();
        ts.insert(1, k);
        Dual {
            primal: randn(shape, seed, 1),
            tangent: Some(randn(&ts, seed, 2)),
        }
    };
    let (theta, vel) = (dual(&[m, 2], 1), dual(&[m, 2], 2));
    let mut s = ArmState::from_pairs(&mut e, &theta, &vel).unwrap();
    let mut joined = e.concat(&[&theta, &vel], 1).unwrap();
    let same = |a: &Dual<f64>, b: &Dual<f64>| {
        assert_eq!(a.primal.data(), b.primal.data());
        assert_eq!(
            a.tangent.as_ref().unwrap().data(),
            b.tangent.as_ref().unwrap().data()
        );
    };
    for t in 0..3 {
        let tau = dual(&[m, 2], 10 + t);
        let t1 = e.slice(&tau, 1, 0, 1).unwrap();
        let t2 = e.slice(&tau, 1, 1, 1).unwrap();
        s = arm.step(&mut e, &s, [&t1, &t2]).unwrap();
        joined = e.pointwise(&step, &[&joined, &tau]).unwrap();
        same(&joined, &s.joined(&mut e).unwrap());
        let h = e.pointwise(&hand, &[&joined]).unwrap();
        same(&h, &arm.hand(&mut e, &s).unwrap());
    }
}

#[test]
fn the_plant_differentiates_alike_in_forward_reverse_and_finite_differences() {
    // a coarse dt so that a few steps move the arm far from linear
    let arm = TwoJointArm {
        dt: 0.05,
        ..TwoJointArm::li_todorov()
    };
    let m = 3;
    let steps = 4;
    let mut inputs = vec![randn(&[m, 2], 2, 1).map(|v| v + 1.0), randn(&[m, 2], 2, 2)];
    for s in 0..steps {
        inputs.push(randn(&[m, 2], 2, 10 + s as u64).scale(0.5));
    }
    let k = 3;
    // forward: K directions on every input
    let dirs: Vec<Tensor<f64>> = (0..inputs.len())
        .map(|i| randn(&[m, k, 2], 3, i as u64))
        .collect();
    let mut f = Fwd::new(k);
    let duals: Vec<Dual<f64>> = inputs
        .iter()
        .zip(&dirs)
        .map(|(x, d)| Dual {
            primal: x.clone(),
            tangent: Some(d.clone()),
        })
        .collect();
    let y = arm_rollout(&mut f, &arm, &duals);
    let width = 4 * steps + 4;
    let ydot = y.tangent.unwrap();
    // finite differences along each direction
    let h = 1e-6;
    for kk in 0..k {
        let shifted = |s: f64| {
            let mut e = Fwd::primal();
            let xs: Vec<Dual<f64>> = inputs
                .iter()
                .zip(&dirs)
                .map(|(x, d)| {
                    let mut x = x.clone();
                    for r in 0..m {
                        for c in 0..2 {
                            x.data_mut()[r * 2 + c] += s * d.data()[(r * k + kk) * 2 + c];
                        }
                    }
                    Dual::constant(x)
                })
                .collect();
            arm_rollout(&mut e, &arm, &xs).primal
        };
        let (p, q) = (shifted(h), shifted(-h));
        for r in 0..m {
            for c in 0..width {
                let fd = (p.data()[r * width + c] - q.data()[r * width + c]) / (2.0 * h);
                let got = ydot.data()[(r * k + kk) * width + c];
                assert!(
                    (got - fd).abs() < 1e-6 * (1.0 + fd.abs()),
                    "direction {kk} row {r} output {c}: {got} vs FD {fd}"
                );
            }
        }
    }
    // reverse: ⟨u, J v⟩ = ⟨Jᵀ u, v⟩ for each direction
    let u = randn(&[m, width], 4, 0);
    let mut rv = Rev::<f64>::new();
    let leaves: Vec<_> = inputs.iter().map(|x| rv.leaf(x.clone())).collect();
    let yr = arm_rollout(&mut rv, &arm, &leaves);
    let g = rv.backward(vec![(yr, u.clone())]).unwrap();
    for kk in 0..k {
        let mut lhs = 0.0;
        for r in 0..m {
            for c in 0..width {
                lhs += u.data()[r * width + c] * ydot.data()[(r * k + kk) * width + c];
            }
        }
        let mut rhs = 0.0;
        for (leaf, d) in leaves.iter().zip(&dirs) {
            let gl = g[leaf.id()].as_ref().unwrap();
            for r in 0..m {
                for c in 0..2 {
                    rhs += gl.data()[r * 2 + c] * d.data()[(r * k + kk) * 2 + c];
                }
            }
        }
        assert!(
            (lhs - rhs).abs() < 1e-10 * (1.0 + lhs.abs()),
            "direction {kk}: ⟨u, Jv⟩ {lhs} vs ⟨Jᵀu, v⟩ {rhs}"
        );
    }
}

#[test]
fn reach_trials_follow_the_spec() {
    let task = ReachTask::double();
    task.validate().unwrap();
    let m = 400;
    let (layouts, b) = task.generate(m, 5, 1).unwrap();
    let centre = task.arm.central_spot();
    let u = b.inputs.as_ref().unwrap().data();
    let y = b.targets.data();
    let w = b.weights.as_ref().unwrap().data();
    let (mut angles, mut dists) = (vec![], vec![]);
    for (j, tr) in layouts.iter().enumerate() {
        let (go1, go2) = (tr.cues[0], tr.cues[1]);
        // go 1 at 0.2 + U(0, 0.4) s, go 2 0.7 s later (steps of 2 ms)
        assert!((100..=300).contains(&go1), "go 1 at step {go1}");
        assert_eq!(go2 - go1, 350);
        for d in &tr.targets {
            let r = d[0].hypot(d[1]);
            let a = d[1].atan2(d[0]).to_degrees();
            let a = if a < -90.0 { a + 360.0 } else { a };
            assert!((0.2..=0.5).contains(&r) && (-36.0..=216.0).contains(&a));
            dists.push(r);
            angles.push(a);
        }
        for t in 0..1000 {
            let row = &u[(t * m + j) * 6..(t * m + j + 1) * 6];
            let want: Vec<f64> = if t < go1 {
                let (a, b) = (tr.targets[0], tr.targets[1]);
                vec![1.0, 1.0, a[0], a[1], b[0], b[1]]
            } else if t < go2 {
                vec![0.0, 1.0, 0.0, 0.0, 0.0, 0.0]
            } else {
                vec![0.0; 6]
            };
            assert_eq!(row, &want[..], "inputs of trial {j} at step {t}");
            let (wt, goal) = if t < go1 {
                (1.0, Some(centre))
            } else if (go1 + 300..go2).contains(&t) {
                let d = tr.targets[0];
                (4.0, Some([centre[0] + d[0], centre[1] + d[1]]))
            } else if t >= go2 + 300 {
                let d = tr.targets[1];
                (4.0, Some([centre[0] + d[0], centre[1] + d[1]]))
            } else {
                (0.0, None)
            };
            assert_eq!(w[t * m + j], wt, "weight of trial {j} at step {t}");
            if let Some(g) = goal {
                let i = (t * m + j) * 4;
                assert_eq!(&y[i..i + 4], &[g[0], g[1], 0.0, 0.0]);
            }
        }
    }
    // uniform draws: means at the centres of their ranges
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let n = angles.len() as f64;
    assert!((mean(&dists) - 0.35).abs() < 4.0 * 0.0866 / n.sqrt());
    assert!((mean(&angles) - 90.0).abs() < 4.0 * 72.7 / n.sqrt());
    // the loss is (10/T)·Σ w‖·‖² per trial
    assert_eq!(b.loss_norm, 1000.0 * m as f64 / 10.0);
    // trials do not depend on the batch size, and batches on the seed
    let (small, _) = task.generate(3, 5, 1).unwrap();
    assert_eq!(&small[..], &layouts[..3]);
    let (other, _) = task.generate(3, 6, 1).unwrap();
    assert_ne!(other[0], layouts[0]);
    // the single reach: one cue, three inputs
    let single = ReachTask::single();
    let (l1, b1) = single.generate(4, 5, 1).unwrap();
    assert_eq!(b1.inputs.as_ref().unwrap().shape(), &[750, 4, 3]);
    assert_eq!(l1[0].cues.len(), 1);
    // too short a trial is refused, naming the field
    let err = ReachTask {
        steps: 500,
        ..ReachTask::double()
    }
    .validate()
    .unwrap_err()
    .to_string();
    assert!(err.contains("reach.steps") && err.contains("500"), "{err}");
}

/// A tiny network and short single-reach trials at a coarse dt.
fn tiny(noise: f64) -> (ReachRnn, ReachTask) {
    let arm = TwoJointArm {
        dt: 0.02,
        ..TwoJointArm::li_todorov()
    };
    let task = ReachTask {
        steps: 36,
        dt: 0.02,
        go_min: 0.05,
        go_jitter: 0.05,
        arm: arm.clone(),
        ..ReachTask::single()
    };
    let model = ReachRnn {
        n: 4,
        inputs: 3,
        alpha: 0.5,
        gain: 0.8,
        noise,
        arm,
    };
    (model, task)
}

#[test]
fn the_reach_network_differentiates_alike_in_forward_reverse_and_finite_differences() {
    let (model, task) = tiny(0.2);
    let mut params: sofo::params::ParamSet<f64> = model.init(1).unwrap();
    // nonzero x0 and biases so that relu units are active and every tensor matters
    for (i, p) in params.iter_mut().enumerate() {
        if ["b", "d", "x0"].contains(&p.name.as_str()) {
            p.value = randn(p.value.shape(), 9, i as u64).map(|v| 0.1 * v.abs() + 0.05);
        }
    }
    let (_, batch) = task.generate(3, 2, 0).unwrap();
    let (_, grads) = gradient_pass(&model, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (_, jtg) = ggn_and_gradient(&model, &params, &batch);
    let d = max_rel_diff(&g, &jtg);
    assert!(d < 1e-10, "reverse vs forward gradient: {d:e}");
    // against central differences along a random direction
    let v: Vec<f64> = randn(&[g.len()], 11, 0).into_vec();
    let h = 1e-5;
    let fd = (loss_at(&model, &shifted(&params, &v, h), &batch)
        - loss_at(&model, &shifted(&params, &v, -h), &batch))
        / (2.0 * h);
    let dot: f64 = g.iter().zip(&v).map(|(a, b)| a * b).sum();
    assert!(
        (dot - fd).abs() < 1e-6 * (1.0 + fd.abs()),
        "∇c·v = {dot} vs FD {fd}"
    );
    // the noise is seeded by the batch: the same batch gives the same loss,
    // another noise seed a different one
    let l0 = loss_at(&model, &params, &batch);
    assert!(l0 < 10.0, "a tame network for the FD check: loss {l0}");
    assert_eq!(l0, loss_at(&model, &params, &batch));
    let mut other = batch.clone();
    other.noise_seed ^= 1;
    assert_ne!(l0, loss_at(&model, &params, &other));
}

#[test]
fn reach_metric_scores_hand_errors() {
    let task = ReachTask::double();
    let m = 6;
    let (layouts, batch) = task.generate(m, 3, 3).unwrap();
    // an "output" that is exactly the target wherever the weight is nonzero,
    // except trial 2, off by 3 cm during the second hold
    let w = batch.weights.as_ref().unwrap().data();
    let y = batch.targets.data();
    let mut outputs = vec![];
    let mut hand_all = vec![];
    for t in 0..1000 {
        let mut row = y[t * m * 4..(t + 1) * m * 4].to_vec();
        if t >= layouts[2].cues[1] + 300 {
            row[2 * 4] += 0.03;
        }
        if w[t * m..(t + 1) * m].iter().any(|&v| v != 0.0) {
            outputs.push(Tensor::<f64>::from_vec(&[m, 4], row.clone()).unwrap());
        }
        hand_all.push(row);
    }
    let share = Task::<f64>::metric(&task, &outputs, &batch).unwrap();
    assert!((share - 5.0 / 6.0).abs() < 1e-12, "share {share}");
    // the report computes errors per window from every step's hand
    // position; targets outside the hold windows are zeros, so only windowed
    // steps matter
    let rep = task.report(&hand_all, 4, &layouts);
    assert!((rep.within_2cm - 5.0 / 6.0).abs() < 1e-12);
    assert!(rep.window_error_cm[0].1 < 1e-9 && rep.window_error_cm[1].1 < 1e-9);
    assert!((rep.window_error_cm[2].1 - 3.0 / 6.0).abs() < 1e-9);
}

#[test]
fn sofo_learns_a_short_single_reach() {
    // 0.8 s trials at 10 ms steps: hold, go at 0.1-0.2 s, reach, hold
    let arm = TwoJointArm {
        dt: 0.01,
        ..TwoJointArm::li_todorov()
    };
    let task = ReachTask {
        steps: 81,
        dt: 0.01,
        go_min: 0.1,
        go_jitter: 0.1,
        arm: arm.clone(),
        ..ReachTask::single()
    };
    let model = ReachRnn {
        n: 32,
        inputs: 3,
        alpha: 0.5,
        gain: 0.5,
        noise: 0.05,
        arm,
    };
    let mut params = Model::<f32>::init(&model, 0).unwrap();
    let test = Task::<f32>::test_batch(&task, 128).unwrap();
    let (still, _) = record_outputs(&model, &params, &test).unwrap();
    let s = Sofo::new(SofoConfig {
        k: 64,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    for it in 0..150 {
        let b = Task::<f32>::train_batch(&task, 0, it, 64).unwrap();
        s.step(&model, &mut params, &b, 0, it).unwrap();
    }
    let (loss, _) = record_outputs(&model, &params, &test).unwrap();
    eprintln!("single reach: held-out loss {still} at start, {loss} after 150 SOFO steps");
    // the network starts near the central spot (small torques), so `still`
    // is what holding still scores; measured: 2.22 → 0.207 (0.093×)
    assert!(loss < 0.15 * still, "loss {loss} vs {still} at start");
}
