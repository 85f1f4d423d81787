// Index loops mirror the formulas.
#![allow(clippy::needless_range_loop)]

//! Regularisers as little losses (issue 6, item 8): their gradient and
//! curvature enter SOFO's sketch exactly (checked against the loss itself
//! where the loss is exactly quadratic, and against 2λ‖·‖² for the weight
//! penalty), forward = reverse, and the total is counted once however the
//! trials are split into groups.

mod common;

use common::*;
use sofo::models::{
    gradient_pass, Activation, Batch, ConstrainedRnn, Constraints, Model, RateRnn, Regularizers,
};
use sofo::optim::{Damping, Sofo, SofoConfig, TangentKind};
use sofo::params::{ParamMode, ParamSet};
use sofo::Tensor;

fn sofo(k: usize) -> Sofo {
    Sofo::new(SofoConfig {
        k,
        tangents: TangentKind::Raw,
        damping: Damping::None,
        ..SofoConfig::default()
    })
    .unwrap()
}

fn with(reg: Regularizers, rnn: RateRnn) -> ConstrainedRnn {
    ConstrainedRnn::new(rnn, Constraints::default())
        .unwrap()
        .with_regularizers(reg)
        .unwrap()
}

/// relu far above 0 with W, B, C, d pinned: the rates are affine in the
/// trainable (b, x0), so the loss, regularisers included, is exactly
/// quadratic in them, and c(θ + εVz) = c + ε Cᵀz + (ε²/2) zᵀG̃z checks
/// gradient and curvature at every scale.
fn linear_regime() -> (RateRnn, ParamSet<f64>, Batch<f64>) {
    let (n, i, o, t, m) = (6, 2, 2, 7, 5);
    let rnn = RateRnn {
        n,
        inputs: i,
        outputs: o,
        alpha: 0.2,
        activation: Activation::Relu,
        learn_x0: true,
        gain: 0.5,
    };
    let mut p: ParamSet<f64> = Model::<f64>::init(&rnn, 2).unwrap();
    p.get_mut("W").unwrap().value = randn(&[n, n], 3, 0).scale(0.1);
    p.get_mut("b").unwrap().value = Tensor::full(&[n], 5.0);
    p.get_mut("x0").unwrap().value = Tensor::full(&[n], 5.0);
    for name in ["W", "B", "C", "d"] {
        p.set_mode(name, ParamMode::Pinned).unwrap();
    }
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(randn(&[t, m, i], 4, 1).scale(0.3)),
        initial: None,
        targets: randn(&[t, m, o], 4, 2),
        weights: None,
        loss_norm: (t * m * o) as f64,
        noise_seed: 0,
    };
    (rnn, p, batch)
}

#[test]
fn rate_regularisers_are_exactly_the_sketched_quadratic() {
    let (rnn, params, batch) = linear_regime();
    let regs = [
        Regularizers {
            rates_l2: 0.3,
            ..Regularizers::default()
        },
        Regularizers {
            rate_target_weight: 0.7,
            rate_target: 4.0,
            ..Regularizers::default()
        },
        Regularizers {
            weights_l2: 0.2,
            rates_l2: 0.3,
            rate_target_weight: 0.7,
            rate_target: 4.0,
        },
    ];
    let base = loss_at(&with(Regularizers::default(), rnn.clone()), &params, &batch);
    let p = params.trainable_count();
    assert_eq!(p, 12);
    let k = 5;
    for reg in regs {
        let m = with(reg, rnn.clone());
        let s = sofo(k);
        let tg = s.sample_tangents(&params, 3, 0).unwrap();
        let sk = s.sketch(&m, &params, &tg, &batch).unwrap();
        assert!(
            sk.loss > base + 1e-3,
            "{reg:?}: the regulariser adds to the loss"
        );
        let z = randn(&[k], 8, 0).into_vec();
        let mut vz = vec![0.0; p];
        for a in 0..k {
            for i in 0..p {
                vz[i] += tg.flat.data()[a * p + i] * z[a];
            }
        }
        for eps in [0.1, 0.5, 1.0] {
            let lhs = loss_at(&m, &shifted(&params, &vz, eps), &batch);
            let ctz: f64 = (0..k).map(|a| sk.c[a] * z[a]).sum();
            let ztgz: f64 = (0..k)
                .map(|a| (0..k).map(|b| z[a] * sk.g[a * k + b] * z[b]).sum::<f64>())
                .sum();
            let rhs = sk.loss + eps * ctz + 0.5 * eps * eps * ztgz;
            assert!(
                (lhs - rhs).abs() < 1e-11 * lhs.abs().max(1.0),
                "{reg:?}, eps {eps}: {lhs} vs {rhs}"
            );
        }
    }
}

#[test]
fn the_weight_penalty_adds_two_lambda_to_the_curvature_of_w() {
    let (rnn, params, batch) = tiny_rnn(3, 5);
    let lambda = 0.37;
    let plain = with(Regularizers::default(), rnn.clone());
    let reg = with(
        Regularizers {
            weights_l2: lambda,
            ..Regularizers::default()
        },
        rnn.clone(),
    );
    let k = 6;
    let s = sofo(k);
    let tg = s.sample_tangents(&params, 5, 0).unwrap();
    let a = s.sketch(&plain, &params, &tg, &batch).unwrap();
    let b = s.sketch(&reg, &params, &tg, &batch).unwrap();
    let p = params.trainable_count();
    let w = params.get("W").unwrap().value.data().to_vec(); // W first in θ
    let v = tg.flat.data();
    let nw = w.len();
    let norm2: f64 = w.iter().map(|x| x * x).sum();
    assert!((b.loss - a.loss - lambda * norm2).abs() < 1e-13 * b.loss);
    for i in 0..k {
        let want_c: f64 = 2.0 * lambda * (0..nw).map(|j| v[i * p + j] * w[j]).sum::<f64>();
        assert!((b.c[i] - a.c[i] - want_c).abs() < 1e-12 * (1.0 + want_c.abs()));
        for j in 0..k {
            let want: f64 =
                2.0 * lambda * (0..nw).map(|q| v[i * p + q] * v[j * p + q]).sum::<f64>();
            let got = b.g[i * k + j] - a.g[i * k + j];
            assert!(
                (got - want).abs() < 1e-10 * (1.0 + want.abs()),
                "G̃[{i},{j}]: {got} vs {want}"
            );
        }
    }
}

fn all_on(rnn: RateRnn) -> ConstrainedRnn {
    with(
        Regularizers {
            weights_l2: 0.1,
            rates_l2: 0.2,
            rate_target_weight: 0.5,
            rate_target: 0.3,
        },
        rnn,
    )
}

#[test]
fn regularisers_are_counted_once_however_the_trials_are_split() {
    let (rnn, params, batch) = tiny_rnn(6, 5);
    let m = all_on(rnn);
    let whole = grouped_sketch(&m, &params, &batch, 1);
    for parts in [2, 3, 6] {
        let split = grouped_sketch(&m, &params, &batch, parts);
        assert!(
            (whole.loss - split.loss).abs() < 1e-14 * whole.loss,
            "{parts} groups: loss {} vs {}",
            split.loss,
            whole.loss
        );
        assert!(max_rel_diff(&whole.c, &split.c) < 1e-13);
        assert!(max_rel_diff(&whole.g, &split.g) < 1e-13);
    }
    assert!((whole.loss - loss_at(&m, &params, &batch)).abs() < 1e-14 * whole.loss);
}

#[test]
fn regularised_gradients_and_curvature_satisfy_the_identities() {
    let (rnn, params, batch) = tiny_rnn(3, 5);
    let m = all_on(rnn);
    // forward = reverse
    let (_, grads) = gradient_pass(&m, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (ggn, jtg) = ggn_and_gradient(&m, &params, &batch);
    assert!(max_rel_diff(&g, &jtg) < 1e-12);
    // G̃ = Vᵀ (Σ JᵀHJ) V over every little loss, regularisers included
    let p = params.trainable_count();
    let k = 5;
    let s = sofo(k);
    let tg = s.sample_tangents(&params, 7, 0).unwrap();
    let sk = s.sketch(&m, &params, &tg, &batch).unwrap();
    let v = tg.flat.data();
    let mut want = vec![0.0; k * k];
    for a in 0..k {
        for b in 0..k {
            for i in 0..p {
                for j in 0..p {
                    want[a * k + b] += v[a * p + i] * ggn[i * p + j] * v[b * p + j];
                }
            }
        }
    }
    assert!(max_rel_diff(&sk.g, &want) < 1e-12);
    // C against central differences of the regularised loss
    let h = 1e-5;
    for a in 0..k {
        let d = &v[a * p..(a + 1) * p];
        let fd = (loss_at(&m, &shifted(&params, d, h), &batch)
            - loss_at(&m, &shifted(&params, d, -h), &batch))
            / (2.0 * h);
        assert!(
            (fd - sk.c[a]).abs() < 1e-7 * (1.0 + fd.abs()),
            "{fd} vs {}",
            sk.c[a]
        );
    }
    let e = m
        .with_regularizers(Regularizers {
            rates_l2: -1.0,
            ..Regularizers::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("regularizers.rates_l2"), "{e}");
}

/// The regularisers' values against a hand computation: with W = 0, B = 0
/// and x0 = 0 every trial's state is x_t = b (1 − (1 − α)^{t+1}), so the
/// rates r_t = tanh(x_t) are known in closed form.
#[test]
fn regulariser_values_match_their_definitions() {
    let (n, t_len, m, alpha) = (3, 6, 4, 0.3);
    let rnn = RateRnn {
        n,
        inputs: 1,
        outputs: 1,
        alpha,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.0,
    };
    let mut params: ParamSet<f64> = Model::<f64>::init(&rnn, 0).unwrap();
    let b = [0.4, -0.9, 1.3];
    params.get_mut("W").unwrap().value = Tensor::zeros(&[n, n]);
    params.get_mut("B").unwrap().value = Tensor::zeros(&[n, 1]);
    params.get_mut("b").unwrap().value = Tensor::from_vec(&[n], b.to_vec()).unwrap();
    let batch = Batch {
        steps: t_len,
        trials: m,
        inputs: Some(randn(&[t_len, m, 1], 1, 1)),
        initial: None,
        targets: randn(&[t_len, m, 1], 1, 2),
        weights: None,
        loss_norm: (t_len * m) as f64,
        noise_seed: 0,
    };
    let rate = |t: usize, j: usize| (b[j] * (1.0 - (1.0 - alpha).powi(t as i32 + 1))).tanh();
    let base = loss_at(&with(Regularizers::default(), rnn.clone()), &params, &batch);
    let (l2, target, weight) = (0.3, 0.25, 0.8);
    // λ · mean of r² over steps, trials and units (trials are identical)
    let mut sq = 0.0;
    for t in 0..t_len {
        for j in 0..n {
            sq += rate(t, j) * rate(t, j);
        }
    }
    let want = l2 * sq / (t_len * n) as f64;
    let reg = Regularizers {
        rates_l2: l2,
        ..Regularizers::default()
    };
    let got = loss_at(&with(reg, rnn.clone()), &params, &batch) - base;
    assert!((got - want).abs() < 1e-12, "rates_l2: {got} vs {want}");
    // λ · mean over trials and units of (mean rate over the trial − target)²
    let mut dev = 0.0;
    for j in 0..n {
        let mean = (0..t_len).map(|t| rate(t, j)).sum::<f64>() / t_len as f64;
        dev += (mean - target) * (mean - target);
    }
    let want = weight * dev / n as f64;
    let reg = Regularizers {
        rate_target_weight: weight,
        rate_target: target,
        ..Regularizers::default()
    };
    let got = loss_at(&with(reg, rnn.clone()), &params, &batch) - base;
    assert!((got - want).abs() < 1e-12, "rate target: {got} vs {want}");
    // λ‖W‖² on a nonzero W
    let w = randn(&[n, n], 5, 0);
    params.get_mut("W").unwrap().value = w.clone();
    let base = loss_at(&with(Regularizers::default(), rnn.clone()), &params, &batch);
    let reg = Regularizers {
        weights_l2: 0.6,
        ..Regularizers::default()
    };
    let got = loss_at(&with(reg, rnn), &params, &batch) - base;
    let want = 0.6 * w.data().iter().map(|v| v * v).sum::<f64>();
    assert!((got - want).abs() < 1e-12, "weights_l2: {got} vs {want}");
}
