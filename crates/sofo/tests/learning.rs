//! Learning on a small seeded problem with a fixed budget, and determinism.

use sofo::models::{LorenzModel, Model};
use sofo::optim::{Damping, Sofo, SofoConfig};
use sofo::tasks::{LorenzData, LorenzTask, Task};
use sofo::train::{evaluate, train, MetricsRow, TrainOptions};

fn small_task() -> LorenzTask {
    LorenzTask {
        data: LorenzData::generate(1, 400, 100, 32, 0.01).unwrap(),
    }
}

fn run(seed: u64, iterations: usize) -> (Vec<MetricsRow>, f64, f64) {
    let task = small_task();
    let model = LorenzModel { hidden: 64 };
    let mut params = Model::<f32>::init(&model, seed).unwrap();
    let test = Task::<f32>::test_batch(&task, 100).unwrap();
    let initial = evaluate(&model, &params, &test).unwrap();
    let mut sofo = Sofo::new(SofoConfig {
        k: 32,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    let opts = TrainOptions {
        iterations,
        batch: 32,
        seed,
        eval_every: 0,
        test_trials: 100,
        out: None,
        device: sofo::Device::Cpu,
    };
    let rows = train(
        &model,
        &task,
        &mut params,
        &mut sofo,
        &opts,
        |_| {},
        || false,
    )
    .unwrap();
    let fin = evaluate(&model, &params, &test).unwrap();
    (rows, initial, fin)
}

/// The loss of predicting "no motion" (endpoint = start) on the test bouts:
/// the scale of the problem in z-scored units.
fn stay_put_loss() -> f64 {
    let task = small_task();
    let d = &task.data;
    let n = d.test.len();
    d.test
        .iter()
        .map(|b| {
            (0..3)
                .map(|i| (b[d.bout_len][i] - b[0][i]).powi(2))
                .sum::<f64>()
        })
        .sum::<f64>()
        / (3 * n) as f64
}

#[test]
fn sofo_learns_lorenz_endpoints() {
    let (rows, initial, fin) = run(0, 60);
    let stay = stay_put_loss();
    assert!(rows.iter().all(|r| r.applied));
    // Threshold: 5 % of the stay-put loss. A model that only learned a mean
    // drift would sit near the stay-put loss; 5 % needs the shape of the flow
    // over 32 steps. (Observed with seeds 0-3 at this budget: 1.5-3 %; the
    // untrained network is at 140-300 %.)
    assert!(
        fin < 0.05 * stay,
        "test loss {fin:.3e} not below 5 % of the stay-put loss {stay:.3e} (start {initial:.3e})"
    );
}

#[test]
fn same_seed_same_numbers() {
    let (a, _, fa) = run(7, 4);
    let (b, _, fb) = run(7, 4);
    let la: Vec<u64> = a.iter().map(|r| r.loss.to_bits()).collect();
    let lb: Vec<u64> = b.iter().map(|r| r.loss.to_bits()).collect();
    assert_eq!(la, lb);
    assert_eq!(fa.to_bits(), fb.to_bits());
    let (c, _, _) = run(8, 4);
    assert_ne!(la, c.iter().map(|r| r.loss.to_bits()).collect::<Vec<_>>());
}
