//! Delayed addition: the generator's marks and sums, and learning.

use sofo::models::{record_outputs, Activation, Model, RateRnn};
use sofo::optim::{Damping, Sofo, SofoConfig};
use sofo::tasks::{AdditionTask, Task};

#[test]
fn marks_and_sums_follow_the_spec() {
    let task = AdditionTask::new(100);
    let m = 500;
    let (u, sums) = task.generate(m, 3, 1);
    let mut first = vec![0usize; 10];
    for j in 0..m {
        let marks: Vec<usize> = (0..100)
            .filter(|&t| u[(t * m + j) * 2 + 1] == 1.0)
            .collect();
        assert_eq!(marks.len(), 2, "trial {j}");
        let (t1, t2) = (marks[0], marks[1]);
        assert!(t1 < 10 && t1 < t2 && t2 < 50, "marks {t1} {t2}");
        first[t1] += 1;
        let want = u[(t1 * m + j) * 2] + u[(t2 * m + j) * 2];
        assert_eq!(sums[j], want);
        assert!((0..100).all(|t| (0.0..1.0).contains(&u[(t * m + j) * 2])));
    }
    // t1 uniform over 0..10: every value drawn
    assert!(first.iter().all(|&c| c > 20), "{first:?}");
    // sums of two U(0,1): mean 1, variance 1/6
    let mean = sums.iter().sum::<f64>() / m as f64;
    assert!(
        (mean - 1.0).abs() < 4.0 * (1.0 / 6.0 / m as f64).sqrt(),
        "mean {mean}"
    );
    let b = Task::<f32>::train_batch(&task, 0, 0, 4).unwrap();
    let w = b.weights.as_ref().unwrap().data();
    assert!(w[..99 * 4].iter().all(|&v| v == 0.0) && w[99 * 4..].iter().all(|&v| v == 1.0));
    assert!(AdditionTask::new(10)
        .validate()
        .unwrap_err()
        .to_string()
        .contains("addition.steps"));
}

#[test]
fn sofo_learns_a_short_delayed_addition() {
    let task = AdditionTask::new(30);
    let model = RateRnn {
        n: 32,
        inputs: 2,
        outputs: 1,
        alpha: 0.25,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.9,
    };
    let mut params = Model::<f32>::init(&model, 0).unwrap();
    let test = Task::<f32>::test_batch(&task, 256).unwrap();
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
    let (loss, y) = record_outputs(&model, &params, &test).unwrap();
    assert_eq!(y.len(), 1, "observed at the last step only");
    let target = &test.targets.to_f64_vec()[29 * 256..];
    let mse = y[0]
        .to_f64_vec()
        .iter()
        .zip(target)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        / 256.0;
    // Predicting the mean sum scores its variance, 1/6 ≈ 0.167; holding one of
    // the two numbers scores 1/12 ≈ 0.083. 0.12 needs memory of a marked
    // number across the delay (observed 0.086-0.09 at this budget; holding
    // both takes far longer, as the task is meant to).
    assert!(mse < 0.12, "MSE {mse}");
    // the recorded pass's loss is the same MSE (weights on the last step only)
    assert!(
        (loss - mse).abs() <= 1e-9 * mse,
        "recorded loss {loss} vs {mse}"
    );
}
