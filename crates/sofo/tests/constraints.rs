//! Dale's law and connectivity masks as parameterisations: signs kept and
//! masked entries exactly zero after training with SOFO and with Adam; the
//! constrained network still learns; gradients through the constraints
//! agree between forward and reverse mode.

mod common;

use common::*;
use sofo::models::{gradient_pass, Activation, ConstrainedRnn, Constraints, Model, RateRnn};
use sofo::optim::{Adam, AdamConfig, Damping, Optimizer, Sofo, SofoConfig};
use sofo::train::evaluate;

fn model(seed: u64) -> ConstrainedRnn {
    let rnn = RateRnn {
        n: 24,
        inputs: 1,
        outputs: 1,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: true,
        gain: 0.9,
    };
    let c = Constraints::generate(24, Some(0.75), true, 0.5, false, seed).unwrap();
    ConstrainedRnn::new(rnn, c).unwrap()
}

fn check_constraints(m: &ConstrainedRnn, params: &sofo::params::ParamSet<f64>, what: &str) {
    let eff = m.effective_weights(params).unwrap();
    let w = &eff.iter().find(|(n, _)| n == "W").unwrap().1;
    let c = &eff.iter().find(|(n, _)| n == "C").unwrap().1;
    let signs = m.constraints.dale.as_ref().unwrap();
    let mask = m.constraints.mask_w.as_ref().unwrap();
    let n = 24;
    let mut nonzero = 0;
    for (k, &v) in w.data().iter().enumerate() {
        if mask[k] == 0.0 {
            assert_eq!(v, 0.0, "{what}: masked W[{},{}] = {v}", k / n, k % n);
        } else {
            assert!(
                v * signs[k % n] >= 0.0,
                "{what}: W[{},{}] = {v} against Dale",
                k / n,
                k % n
            );
            nonzero += (v != 0.0) as usize;
        }
        if k / n == k % n {
            assert_eq!(v, 0.0, "{what}: autapse");
        }
    }
    assert!(
        nonzero > 100,
        "{what}: the constraint must not zero everything"
    );
    for (j, &v) in c.data().iter().enumerate() {
        assert!(
            v * signs[j] >= 0.0,
            "{what}: readout C[0,{j}] = {v} against Dale"
        );
    }
}

#[test]
fn signs_and_masks_survive_training_with_sofo_and_adam() {
    let m = model(1);
    let s = Sofo::new(SofoConfig {
        k: 32,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    let mut a = Adam::<f64>::new(AdamConfig {
        lr: sofo::optim::LearningRate::constant(0.05), // large steps: they would flip signs
        ..AdamConfig::default()
    })
    .unwrap();
    let p0: sofo::params::ParamSet<f64> = m.init(0).unwrap();
    check_constraints(&m, &p0, "init");
    let (mut ps, mut pa) = (p0.clone(), p0.clone());
    for it in 0..30 {
        let b = memory_batch(16, 20, it);
        s.step(&m, &mut ps, &b, 0, it).unwrap();
        a.step(&m, &mut pa, &b, 0, it).unwrap();
    }
    check_constraints(&m, &ps, "after SOFO");
    check_constraints(&m, &pa, "after Adam");
    // and training changed the weights
    assert_ne!(
        ps.get("W").unwrap().value.to_f64_vec(),
        p0.get("W").unwrap().value.to_f64_vec()
    );
}

#[test]
fn a_dale_network_learns_under_sofo() {
    let m = model(2);
    let mut params: sofo::params::ParamSet<f64> = m.init(0).unwrap();
    let test = memory_batch(64, 30, 999);
    let before = evaluate(&m, &params, &test).unwrap();
    let s = Sofo::new(SofoConfig {
        k: 32,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    for it in 0..60 {
        assert!(
            s.step(&m, &mut params, &memory_batch(32, 30, it), 0, it)
                .unwrap()
                .applied
        );
    }
    let after = evaluate(&m, &params, &test).unwrap();
    // predicting 0 scores 1.0; holding the sign needs the recurrence
    assert!(after < 0.1, "loss {before:.3} → {after:.3}");
}

#[test]
fn gradients_through_the_constraints_agree_between_modes() {
    let m = model(3);
    let params: sofo::params::ParamSet<f64> = m.init(4).unwrap();
    let batch = memory_batch(3, 8, 5);
    let (_, grads) = gradient_pass(&m, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (_, jtg) = ggn_and_gradient(&m, &params, &batch);
    let d = max_rel_diff(&g, &jtg);
    assert!(
        d < 1e-12,
        "reverse vs forward gradient through |·| and masks: {d:e}"
    );
    // masked raw entries get no gradient
    let mask = m.constraints.mask_w.as_ref().unwrap();
    for (k, v) in grads[0].data().iter().enumerate() {
        if mask[k] == 0.0 {
            assert_eq!(*v, 0.0);
        }
    }
}

#[test]
fn excitation_and_inhibition_balance_at_start() {
    let m = model(4);
    let params: sofo::params::ParamSet<f64> = m.init(7).unwrap();
    let w = m.effective_weights(&params).unwrap().remove(0).1;
    let n = 24;
    // mean over rows of the row sums: zero in expectation; without the
    // inhibitory scaling it would be ≈ (N_E − N_I)·E|w|·density > 0
    let mean_row_sum: f64 = w.data().iter().sum::<f64>() / n as f64;
    let typical = w.data().iter().map(|v| v.abs()).sum::<f64>() / n as f64;
    assert!(
        mean_row_sum.abs() < 0.25 * typical,
        "mean row sum {mean_row_sum} vs |row| {typical}"
    );
    assert!(Constraints::generate(4, Some(1.5), false, 1.0, true, 0)
        .unwrap_err()
        .to_string()
        .contains("constraints.excitatory"));
    assert!(Constraints::generate(4, None, false, 0.0, true, 0)
        .unwrap_err()
        .to_string()
        .contains("constraints.density"));
}

#[test]
fn the_initial_spectral_radius_follows_the_gain() {
    for g in [0.5, 1.5] {
        let rnn = RateRnn {
            n: 300,
            inputs: 1,
            outputs: 1,
            alpha: 0.1,
            activation: Activation::Tanh,
            learn_x0: false,
            gain: g,
        };
        let m = ConstrainedRnn::new(rnn, Constraints::default()).unwrap();
        let params: sofo::params::ParamSet<f64> = m.init(1).unwrap();
        let r = m.spectral_radius(&params).unwrap();
        // circular law: radius → g as N grows; within 10 % at N = 300
        assert!((r - g).abs() < 0.1 * g, "g = {g}: radius {r}");
    }
}

#[test]
fn constrained_starts_have_the_gain_as_spectral_radius() {
    for g in [0.5, 1.5] {
        let rnn = RateRnn {
            n: 60,
            inputs: 1,
            outputs: 1,
            alpha: 0.1,
            activation: Activation::Relu,
            learn_x0: false,
            gain: g,
        };
        let c = Constraints::generate(60, Some(0.8), false, 0.3, false, 2).unwrap();
        let m = ConstrainedRnn::new(rnn, c).unwrap();
        let params: sofo::params::ParamSet<f64> = m.init(3).unwrap();
        let r = m.spectral_radius(&params).unwrap();
        assert!((r - g).abs() < 1e-9 * g, "g = {g}: radius {r}");
    }
}
