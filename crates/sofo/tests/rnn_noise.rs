//! Noise in the rate RNN (issue 6, item 4): statistics of the injected
//! noise at the given dt/τ against the exact Ornstein–Uhlenbeck moments,
//! gradients with the noise on (forward = reverse = finite differences),
//! determinism per batch seed and independence of how trials are split.

mod common;

use common::*;
use sofo::models::{
    gradient_pass, record_outputs, Activation, Batch, ConstrainedRnn, Constraints, Model, Noise,
    RateRnn,
};
use sofo::optim::{Damping, Sofo, SofoConfig, TangentKind};
use sofo::params::ParamSet;
use sofo::Tensor;

const N: usize = 8;

/// W = 0, b = x0 = 5, C = I, d = 0, relu: y_t = x_t exactly (x stays far
/// above 0), so the outputs are the state; B = I when `input_gain`.
fn probe(alpha: f64, noise: Noise, input_gain: f64) -> (ConstrainedRnn, ParamSet<f64>) {
    let rnn = RateRnn {
        n: N,
        inputs: N,
        outputs: N,
        alpha,
        activation: Activation::Relu,
        learn_x0: true,
        gain: 1.0,
    };
    let m = ConstrainedRnn::new(rnn, Constraints::default())
        .unwrap()
        .with_noise(noise)
        .unwrap();
    let mut p: ParamSet<f64> = m.init(1).unwrap();
    let eye = |s: f64| {
        let mut t = Tensor::<f64>::zeros(&[N, N]);
        for i in 0..N {
            t.data_mut()[i * N + i] = s;
        }
        t
    };
    p.get_mut("W").unwrap().value = Tensor::zeros(&[N, N]);
    p.get_mut("B").unwrap().value = eye(input_gain);
    p.get_mut("C").unwrap().value = eye(1.0);
    p.get_mut("b").unwrap().value = Tensor::full(&[N], 5.0);
    p.get_mut("x0").unwrap().value = Tensor::full(&[N], 5.0);
    p.get_mut("d").unwrap().value = Tensor::zeros(&[N]);
    (m, p)
}

fn quiet_batch(t: usize, m: usize, seed: u64) -> Batch<f64> {
    Batch {
        steps: t,
        trials: m,
        inputs: Some(Tensor::zeros(&[t, m, N])),
        initial: None,
        targets: Tensor::zeros(&[t, m, N]),
        weights: None,
        loss_norm: (t * m * N) as f64,
        noise_seed: seed,
    }
}

/// Sample mean, variance and the covariance of steps `t` and `t - 1`.
fn moments(ys: &[Tensor<f64>], t: usize) -> (f64, f64, f64) {
    let a = ys[t].data();
    let b = ys[t - 1].data();
    let n = a.len() as f64;
    let ma = a.iter().sum::<f64>() / n;
    let mb = b.iter().sum::<f64>() / n;
    let var = a.iter().map(|v| (v - ma) * (v - ma)).sum::<f64>() / (n - 1.0);
    let cov = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / (n - 1.0);
    (ma, var, cov)
}

/// The OU process x_t = (1 − α) x_{t−1} + s ξ_t from x_0 = 0: Var after
/// `k` steps is s² (1 − ρ^{2k}) / (1 − ρ²), ρ = 1 − α; for s = σ√(2α) the
/// stationary value is σ² · 2/(2 − α).
fn ou_var(s: f64, alpha: f64, k: usize) -> f64 {
    let rho = 1.0 - alpha;
    s * s * (1.0 - rho.powi(2 * k as i32)) / (1.0 - rho * rho)
}

const TRIALS: usize = 3000; // 24000 samples per step: the variance to ±0.9 % (1 SE)

fn check(what: &str, got: f64, want: f64, se: f64) {
    eprintln!("{what}: {got:.5} vs {want:.5} (SE {se:.5})");
    assert!(
        (got - want).abs() < 4.0 * se,
        "{what}: {got:.5} vs {want:.5} (4 SE = {:.5})",
        4.0 * se
    );
}

#[test]
fn additive_state_noise_is_an_ou_process_with_the_right_variance() {
    for (alpha, sigma) in [(0.2, 0.3), (0.05, 0.5), (1.0, 0.2)] {
        let (m, p) = probe(
            alpha,
            Noise {
                state: sigma,
                ..Noise::default()
            },
            1.0,
        );
        let t = 80;
        let (_, ys) = record_outputs(&m, &p, &quiet_batch(t, TRIALS, 11)).unwrap();
        let n = (TRIALS * N) as f64;
        let s = sigma * (2.0 * alpha).sqrt();
        for step in [10, t - 1] {
            // y at step index `step` has had step + 1 increments
            let var = ou_var(s, alpha, step + 1);
            let (mean, v, cov) = moments(&ys, step);
            let what = format!("α {alpha}, σ {sigma}, step {step}");
            check(&format!("{what}: mean"), mean, 5.0, (var / n).sqrt());
            check(
                &format!("{what}: variance"),
                v,
                var,
                var * (2.0 / (n - 1.0)).sqrt(),
            );
            // increments independent of the past: Cov(x_t, x_{t−1}) = ρ Var_{t−1}
            let prev = ou_var(s, alpha, step);
            check(
                &format!("{what}: lag-1 covariance"),
                cov,
                (1.0 - alpha) * prev,
                (var * prev / n).sqrt() * 1.5,
            );
        }
        // and the stationary value is σ²·2/(2 − α)
        let stationary = sigma * sigma * 2.0 / (2.0 - alpha);
        assert!((ou_var(s, alpha, 10_000) - stationary).abs() < 1e-12);
    }
}

#[test]
fn input_noise_enters_through_b_with_the_state_noise_scaling() {
    // α B σ√(2/α) ξ = σ√(2α) ξ with B = I: the same OU as state noise
    for (alpha, sigma) in [(0.2, 0.3), (0.1, 0.2)] {
        let (m, p) = probe(
            alpha,
            Noise {
                input: sigma,
                ..Noise::default()
            },
            1.0,
        );
        let t = 60;
        let (_, ys) = record_outputs(&m, &p, &quiet_batch(t, TRIALS, 12)).unwrap();
        let n = (TRIALS * N) as f64;
        let var = ou_var(sigma * (2.0 * alpha).sqrt(), alpha, t);
        let (mean, v, _) = moments(&ys, t - 1);
        check("input noise: mean", mean, 5.0, (var / n).sqrt());
        check(
            "input noise: variance",
            v,
            var,
            var * (2.0 / (n - 1.0)).sqrt(),
        );
        // B = 0: the input noise has nowhere to go
        let (m0, p0) = probe(
            alpha,
            Noise {
                input: sigma,
                ..Noise::default()
            },
            0.0,
        );
        let (_, ys) = record_outputs(&m0, &p0, &quiet_batch(5, 4, 12)).unwrap();
        assert!(ys.iter().all(|y| y.data().iter().all(|&v| v == 5.0)));
    }
}

#[test]
fn multiplicative_rate_noise_has_mean_one_and_variance_two_sigma_squared_over_alpha() {
    let (alpha, sigma) = (0.2, 0.05);
    let (m, p) = probe(
        alpha,
        Noise {
            rates: sigma,
            ..Noise::default()
        },
        1.0,
    );
    // x stays at 5 (W = 0), the rates are 5 (1 + σ√(2/α) ξ)
    let t = 6;
    let (_, ys) = record_outputs(&m, &p, &quiet_batch(t, TRIALS, 13)).unwrap();
    let n = (TRIALS * N) as f64;
    let var = 25.0 * sigma * sigma * 2.0 / alpha;
    for step in [0, t - 1] {
        let (mean, v, cov) = moments(&ys, step.max(1));
        check("rate noise: mean", mean, 5.0, (var / n).sqrt());
        check(
            "rate noise: variance",
            v,
            var,
            var * (2.0 / (n - 1.0)).sqrt(),
        );
        // white: no correlation between steps
        check("rate noise: lag-1 covariance", cov, 0.0, var / n.sqrt());
    }
}

/// The memory task's model with every noise on.
fn noisy(seed: u64) -> (ConstrainedRnn, ParamSet<f64>, Batch<f64>) {
    let (rnn, params, mut batch) = tiny_rnn(5, 6);
    batch.noise_seed = seed;
    let m = ConstrainedRnn::new(rnn, Constraints::default())
        .unwrap()
        .with_noise(Noise {
            state: 0.3,
            rates: 0.1,
            input: 0.2,
            state_multiplicative: 0.05,
            rates_additive: 0.05,
        })
        .unwrap();
    (m, params, batch)
}

#[test]
fn gradients_with_noise_agree_forward_reverse_and_finite_differences() {
    let (m, params, batch) = noisy(9);
    let (loss, grads) = gradient_pass(&m, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (_, jtg) = ggn_and_gradient(&m, &params, &batch);
    let d = max_rel_diff(&g, &jtg);
    assert!(d < 1e-12, "reverse vs forward gradient with noise: {d:e}");
    assert!((loss - loss_at(&m, &params, &batch)).abs() < 1e-13 * loss);
    // finite differences of the loss (the noise is fixed by the seed)
    let s = Sofo::new(SofoConfig {
        k: 3,
        tangents: TangentKind::UnitNorm,
        damping: Damping::None,
        ..SofoConfig::default()
    })
    .unwrap();
    let tg = s.sample_tangents(&params, 2, 0).unwrap();
    let sk = s.sketch(&m, &params, &tg, &batch).unwrap();
    let p = params.trainable_count();
    for k in 0..3 {
        let v = &tg.flat.data()[k * p..(k + 1) * p];
        let h = 1e-5;
        let fd = (loss_at(&m, &shifted(&params, v, h), &batch)
            - loss_at(&m, &shifted(&params, v, -h), &batch))
            / (2.0 * h);
        assert!(
            (fd - sk.c[k]).abs() < 1e-8 * (1.0 + fd.abs()),
            "direction {k}: fd {fd} vs C {}",
            sk.c[k]
        );
    }
}

#[test]
fn noise_is_fixed_by_the_batch_seed_and_independent_of_the_split() {
    let (m, params, batch) = noisy(9);
    let l1 = loss_at(&m, &params, &batch);
    assert_eq!(l1, loss_at(&m, &params, &batch), "same seed, same loss");
    let (_, _, other) = noisy(10);
    assert_ne!(
        l1,
        loss_at(&m, &params, &other),
        "another seed, other noise"
    );
    let quiet = ConstrainedRnn::new(m.rnn.clone(), Constraints::default()).unwrap();
    assert_ne!(l1, loss_at(&quiet, &params, &batch), "the noise matters");
    let whole = grouped_sketch(&m, &params, &batch, 1);
    for parts in [2, 5] {
        let split = grouped_sketch(&m, &params, &batch, parts);
        assert!((whole.loss - split.loss).abs() < 1e-14 * whole.loss);
        assert!(max_rel_diff(&whole.c, &split.c) < 1e-13);
        assert!(max_rel_diff(&whole.g, &split.g) < 1e-13);
    }
    // bad values name the field
    let e = m
        .clone()
        .with_noise(Noise {
            rates: -1.0,
            ..Noise::default()
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("noise.rates"), "{e}");
}

/// Multiplicative state noise x_t = ((1 − α) x_{t−1} + α b)(1 + s ξ_t),
/// s = σ√(2α), from x_0 = b = 5: the mean stays 5 and the variance follows
/// V_t = (1 − α)²(1 + s²) V_{t−1} + 25 s², V_0 = 0. Additive rate noise
/// r_t = x_t + σ√(2/α) ξ_t leaves x alone (W = 0): the output is 5 plus
/// noise of variance 2σ²/α.
#[test]
fn multiplicative_state_and_additive_rate_noise_have_their_moments() {
    let (alpha, sigma) = (0.2, 0.1);
    let (m, p) = probe(
        alpha,
        Noise {
            state_multiplicative: sigma,
            ..Noise::default()
        },
        1.0,
    );
    let t = 30;
    let (_, ys) = record_outputs(&m, &p, &quiet_batch(t, TRIALS, 21)).unwrap();
    let n = (TRIALS * N) as f64;
    let s = sigma * (2.0 * alpha).sqrt();
    // vs[k]: the variance after k + 1 steps (the output of step k)
    let mut vs = vec![25.0 * s * s];
    for k in 1..t {
        vs.push((1.0 - alpha).powi(2) * (1.0 + s * s) * vs[k - 1] + 25.0 * s * s);
    }
    for step in [1, t - 1] {
        let (mean, var, _) = moments(&ys, step);
        let want = vs[step];
        let what = format!("multiplicative state, step {step}");
        check(&format!("{what}: mean"), mean, 5.0, (want / n).sqrt());
        check(
            &format!("{what}: variance"),
            var,
            want,
            want * (2.0 / (n - 1.0)).sqrt(),
        );
    }
    let (m, p) = probe(
        alpha,
        Noise {
            rates_additive: sigma,
            ..Noise::default()
        },
        1.0,
    );
    let (_, ys) = record_outputs(&m, &p, &quiet_batch(5, TRIALS, 22)).unwrap();
    let want = 2.0 * sigma * sigma / alpha;
    let (mean, var, cov) = moments(&ys, 4);
    check("additive rates: mean", mean, 5.0, (want / n).sqrt());
    check(
        "additive rates: variance",
        var,
        want,
        want * (2.0 / (n - 1.0)).sqrt(),
    );
    // fresh noise each step, not fed back (W = 0): no correlation in time
    check(
        "additive rates: lag-1 covariance",
        cov,
        0.0,
        want / n.sqrt() * 1.5,
    );
    // both differentiate alike forward and reverse with the noise on
    let (rnn, params, batch) = tiny_rnn(3, 6);
    let m = ConstrainedRnn::new(rnn, Constraints::default())
        .unwrap()
        .with_noise(Noise {
            state_multiplicative: 0.2,
            rates_additive: 0.1,
            ..Noise::default()
        })
        .unwrap();
    let mut batch = batch;
    batch.noise_seed = 5;
    let (_, grads) = gradient_pass(&m, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (_, jtg) = ggn_and_gradient(&m, &params, &batch);
    assert!(max_rel_diff(&g, &jtg) < 1e-12);
}

/// The noise of many steps at once (what a model hands a GPU engine in one
/// block) is step by step the noise of each step, for any group of trials,
/// and stops at the trial's end.
#[test]
fn noise_of_many_steps_is_each_steps_noise() {
    let batch = quiet_batch(10, 6, 42);
    let groups = batch.split(2).unwrap();
    for trials in [batch.all(), groups[1]] {
        for range in [None, Some((0.5, 1.5))] {
            let block = trials.noise_steps(3, 4, 5, range).unwrap();
            assert_eq!(block.shape(), &[4, trials.trials(), 5]);
            for i in 0..4 {
                let step = trials.noise(3 + i, 5, range).unwrap();
                let n = step.numel();
                assert_eq!(
                    &block.data()[i * n..(i + 1) * n],
                    step.data(),
                    "step {}",
                    3 + i
                );
            }
            // cut at T = 10: steps 8 and 9 only
            assert_eq!(trials.noise_steps(8, 64, 5, range).unwrap().shape()[0], 2);
        }
    }
}
