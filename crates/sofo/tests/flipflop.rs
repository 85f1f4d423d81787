//! The flip-flop generator's statistics and semantics, and learning.

use sofo::models::{record_outputs, Activation, Model, RateRnn};
use sofo::optim::{Damping, Sofo, SofoConfig};
use sofo::tasks::{correct_bits, FlipFlopTask, Task};

/// Pulse starts per channel and trial: (step, sign).
fn pulses(task: &FlipFlopTask, u: &[f64], trials: usize, m: usize, c: usize) -> Vec<(usize, f64)> {
    let b = task.bits;
    let mut out = vec![];
    let mut prev = 0.0;
    for t in 0..task.steps {
        let v = u[(t * trials + m) * b + c];
        if v != 0.0 && prev == 0.0 {
            out.push((t, v));
        }
        prev = v;
    }
    out
}

#[test]
fn pulses_targets_and_rates_follow_the_spec() {
    let task = FlipFlopTask::new(3, 400);
    let trials = 200;
    let (u, y) = task.generate(trials, 5, 1);
    let b = task.bits;
    let (mut starts, mut free_steps, mut plus) = (0usize, 0usize, 0usize);
    for m in 0..trials {
        for c in 0..b {
            let p = pulses(&task, &u, trials, m, c);
            for (k, &(t0, s)) in p.iter().enumerate() {
                // each pulse lasts exactly pulse_len steps
                for dt in 0..task.pulse_len.min(task.steps - t0) {
                    assert_eq!(u[((t0 + dt) * trials + m) * b + c], s);
                }
                // the next one waits for pulse + refractory steps
                if let Some(&(t1, _)) = p.get(k + 1) {
                    assert!(
                        t1 >= t0 + task.pulse_len + task.refractory,
                        "gap {t0} → {t1}"
                    );
                }
                plus += (s > 0.0) as usize;
            }
            starts += p.len();
            // steps at which a pulse could start
            let mut busy_until = 0;
            for t in 0..task.steps {
                if t >= busy_until {
                    free_steps += 1;
                    if p.iter().any(|&(t0, _)| t0 == t) {
                        busy_until = t + task.pulse_len + task.refractory;
                    }
                }
            }
            // the target is the sign of the last pulse started strictly before t
            for t in 0..task.steps {
                let want = p.iter().rfind(|&&(t0, _)| t0 < t).map_or(0.0, |&(_, s)| s);
                assert_eq!(
                    y[(t * trials + m) * b + c],
                    want,
                    "trial {m} channel {c} step {t}"
                );
            }
        }
    }
    // rate per free step: 0.02 ± 4 standard errors
    let rate = starts as f64 / free_steps as f64;
    let se = (0.02 * 0.98 / free_steps as f64).sqrt();
    assert!(
        (rate - 0.02).abs() < 4.0 * se,
        "pulse rate {rate} over {free_steps} free steps"
    );
    let frac = plus as f64 / starts as f64;
    assert!(
        (frac - 0.5).abs() < 4.0 * (0.25 / starts as f64).sqrt(),
        "share of + pulses {frac}"
    );
}

#[test]
fn batches_are_seeded_and_shaped() {
    let task = FlipFlopTask::new(3, 50);
    let a = Task::<f32>::train_batch(&task, 1, 0, 4).unwrap();
    let b = Task::<f32>::train_batch(&task, 1, 0, 4).unwrap();
    let c = Task::<f32>::train_batch(&task, 1, 1, 4).unwrap();
    assert_eq!(a.inputs.as_ref().unwrap().shape(), [50, 4, 3]);
    assert_eq!(a.targets.shape(), [50, 4, 3]);
    assert_eq!(
        a.inputs.as_ref().unwrap().data(),
        b.inputs.as_ref().unwrap().data()
    );
    assert_ne!(
        a.inputs.as_ref().unwrap().data(),
        c.inputs.as_ref().unwrap().data()
    );
    assert!(FlipFlopTask {
        bits: 0,
        ..task.clone()
    }
    .validate()
    .unwrap_err()
    .to_string()
    .contains("flipflop.bits"));
    assert_eq!(
        correct_bits(&[0.9, -0.6, 0.2, 0.7], &[1.0, -1.0, 0.0, -1.0]),
        0.75
    );
}

#[test]
fn sofo_learns_a_two_bit_flip_flop() {
    let task = FlipFlopTask {
        pulse_prob: 0.05,
        ..FlipFlopTask::new(2, 60)
    };
    let model = RateRnn {
        n: 32,
        inputs: 2,
        outputs: 2,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.9,
    };
    let mut params = Model::<f32>::init(&model, 0).unwrap();
    let test = Task::<f32>::test_batch(&task, 64).unwrap();
    let score = |params: &sofo::params::ParamSet<f32>| {
        let (_, ys) = record_outputs(&model, params, &test).unwrap();
        let out: Vec<f64> = ys.iter().flat_map(|y| y.to_f64_vec()).collect();
        correct_bits(&out, &test.targets.to_f64_vec())
    };
    let before = score(&params);
    let s = Sofo::new(SofoConfig {
        k: 64,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    for it in 0..60 {
        let b = Task::<f32>::train_batch(&task, 0, it, 32).unwrap();
        s.step(&model, &mut params, &b, 0, it).unwrap();
    }
    let after = score(&params);
    // untrained 0.32 (mostly the zeros before first pulses), trained 0.974
    assert!(after > 0.9, "correct bits {before:.3} → {after:.3}");
}
