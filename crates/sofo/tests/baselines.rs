//! The first-order baselines: Adam's bias correction, schedules, clipping,
//! and learning on small seeded problems with fixed budgets.

mod common;

use common::*;
use sofo::models::{gradient_pass, LorenzModel, Model};
use sofo::optim::{
    Adam, AdamConfig, Fgd, FgdConfig, LearningRate, Optimizer, Schedule, Sgd, SgdConfig,
};
use sofo::tasks::{LorenzData, LorenzTask, Task};
use sofo::train::evaluate;

#[test]
fn adam_first_step_is_lr_times_the_gradient_sign() {
    // with bias correction, m̂ = g and v̂ = g² after one step: Δ = −lr g/(|g| + ε)
    let (model, params, batch) = tiny_rnn(3, 5);
    let (_, g) = gradient_pass(&model, &params, &batch).unwrap();
    let mut p1 = params.clone();
    let mut adam = Adam::<f64>::new(AdamConfig {
        lr: LearningRate::constant(0.01),
        ..AdamConfig::default()
    })
    .unwrap();
    assert!(adam.step(&model, &mut p1, &batch, 0, 0).unwrap().applied);
    for ((a, b), g) in params.iter().zip(p1.iter()).zip(&g) {
        for ((x, y), gi) in a.value.data().iter().zip(b.value.data()).zip(g.data()) {
            let want = -0.01 * gi / (gi.abs() + 1e-8);
            assert!(
                (y - x - want).abs() < 1e-12,
                "{}: step {} want {want}",
                a.name,
                y - x
            );
        }
    }
}

#[test]
fn schedules_and_clipping() {
    let lr = LearningRate {
        base: 1.0,
        schedule: Schedule::Exponential { decay: 0.5 },
        warmup: 0,
    };
    assert_eq!((lr.at(0), lr.at(1), lr.at(3)), (1.0, 0.5, 0.125));
    let lr = LearningRate {
        base: 2.0,
        schedule: Schedule::Cosine {
            total: 10,
            floor: 0.1,
        },
        warmup: 4,
    };
    assert!((lr.at(0) - 2.0 * 0.25 * (0.1 + 0.9 * 0.5 * (1.0 + 0.0f64.cos()))).abs() < 1e-12);
    assert!((lr.at(10) - 0.2).abs() < 1e-12);
    assert!(
        (lr.at(5) - 2.0 * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos()))).abs()
            < 1e-12
    );
    // clipped SGD without momentum moves by exactly lr·clip
    let (model, params, batch) = tiny_rnn(3, 5);
    let mut p1 = params.clone();
    let mut sgd = Sgd::<f64>::new(SgdConfig {
        lr: LearningRate::constant(0.1),
        momentum: 0.0,
        clip: Some(1e-3),
    })
    .unwrap();
    sgd.step(&model, &mut p1, &batch, 0, 0).unwrap();
    let moved: f64 = params
        .iter()
        .zip(p1.iter())
        .flat_map(|(a, b)| {
            a.value
                .data()
                .iter()
                .zip(b.value.data())
                .map(|(x, y)| (x - y) * (x - y))
                .collect::<Vec<_>>()
        })
        .sum::<f64>()
        .sqrt();
    assert!((moved - 1e-4).abs() < 1e-12, "moved {moved}");
    // bad settings name the field
    let e = Adam::<f64>::new(AdamConfig {
        beta1: 1.0,
        ..AdamConfig::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("adam.beta1"), "{e}");
}

fn lorenz_small() -> (LorenzTask, LorenzModel) {
    (
        LorenzTask {
            data: LorenzData::generate(1, 400, 100, 32, 0.01).unwrap(),
        },
        LorenzModel { hidden: 64 },
    )
}

fn learn<O: Optimizer<f32>>(mut opt: O, iterations: u64) -> (f64, f64) {
    let (task, model) = lorenz_small();
    let mut params = Model::<f32>::init(&model, 0).unwrap();
    let test = Task::<f32>::test_batch(&task, 100).unwrap();
    let before = evaluate(&model, &params, &test).unwrap();
    for it in 0..iterations {
        let b = Task::<f32>::train_batch(&task, 0, it, 32).unwrap();
        opt.step(&model, &mut params, &b, 0, it).unwrap();
    }
    let after = evaluate(&model, &params, &test).unwrap();
    eprintln!("{}: {before:.3} → {after:.3}", opt.name());
    (before, after)
}

// Thresholds: the untrained network's test loss is ≈ 4.6; "learned" here
// means it fell below a quarter of that within the budget (observed values
// in each test's message when it fails, and in the README).

#[test]
fn adam_lowers_the_lorenz_loss() {
    let (before, after) = learn(Adam::<f32>::new(AdamConfig::default()).unwrap(), 100);
    assert!(after < 0.25 * before, "adam: {before:.3} → {after:.3}");
}

#[test]
fn sgd_lowers_the_lorenz_loss() {
    let sgd = Sgd::<f32>::new(SgdConfig {
        lr: LearningRate::constant(1e-2),
        momentum: 0.9,
        clip: Some(1.0),
    })
    .unwrap();
    let (before, after) = learn(sgd, 100);
    assert!(after < 0.25 * before, "sgd: {before:.3} → {after:.3}");
}

#[test]
fn fgd_lowers_the_lorenz_loss() {
    let fgd = Fgd::new(FgdConfig {
        k: 32,
        lr: LearningRate::constant(3e-5),
    })
    .unwrap();
    let (before, after) = learn(fgd, 100);
    assert!(after < 0.25 * before, "fgd: {before:.3} → {after:.3}");
}
