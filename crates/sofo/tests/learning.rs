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

/// `Sofo::time_phases` on the CPU: each timed iteration is counted, its
/// three phases (draw, pass, step) take time and add up to no more than the
/// iterations' wall time, nothing is added while timing is off, turning it
/// on starts from zero — and timed iterations give the untimed ones'
/// numbers, bit for bit.
#[test]
fn phases_add_up_to_the_iterations() {
    use sofo::optim::SofoPhases;
    let task = small_task();
    let model = LorenzModel { hidden: 32 };
    let params0 = Model::<f32>::init(&model, 3).unwrap();
    let batch = Task::<f32>::train_batch(&task, 3, 0, 16).unwrap();
    let sofo = Sofo::new(SofoConfig {
        k: 8,
        ..SofoConfig::default()
    })
    .unwrap();
    let run = |timed: bool| {
        sofo.time_phases(timed);
        let mut params = params0.clone();
        let t0 = std::time::Instant::now();
        let losses: Vec<u64> = (0..3)
            .map(|it| {
                let r = sofo.step(&model, &mut params, &batch, 3, it).unwrap();
                r.loss.to_bits()
            })
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        sofo.time_phases(false);
        let weights: Vec<Vec<u64>> = params
            .iter()
            .map(|p| p.value.data().iter().map(|v| v.to_bits() as u64).collect())
            .collect();
        (losses, weights, wall)
    };
    let (plain, plain_weights, _) = run(false);
    assert_eq!(sofo.phases(), SofoPhases::default(), "timed while off");
    let (timed, timed_weights, wall) = run(true);
    let p = sofo.phases();
    assert_eq!(p.iterations, 3);
    assert!(p.draw_s > 0.0 && p.pass_s > 0.0 && p.step_s > 0.0, "{p:?}");
    assert!(p.draw_s + p.pass_s + p.step_s <= wall, "{p:?} in {wall} s");
    assert_eq!(plain, timed, "timing changed the losses");
    assert_eq!(plain_weights, timed_weights, "timing changed the weights");
    let mut params = params0.clone();
    sofo.step(&model, &mut params, &batch, 3, 0).unwrap();
    assert_eq!(sofo.phases(), p, "timed while off");
    sofo.time_phases(true);
    assert_eq!(sofo.phases(), SofoPhases::default(), "not reset");
}
