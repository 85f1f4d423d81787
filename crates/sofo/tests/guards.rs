//! Non-finite values never reach the weights; checkpoints are atomic.

mod common;

use common::*;
use sofo::optim::{Sofo, SofoConfig};
use sofo::Tensor;

#[test]
fn a_nan_in_the_loss_leaves_the_parameters_untouched() {
    let (model, mut params, mut batch) = tiny_rnn(3, 5);
    batch.targets.data_mut()[7] = f64::NAN;
    let before: Vec<Vec<f64>> = params.iter().map(|p| p.value.to_f64_vec()).collect();
    let s = Sofo::new(SofoConfig {
        k: 4,
        ..SofoConfig::default()
    })
    .unwrap();
    let rep = s.step(&model, &mut params, &batch, 0, 0).unwrap();
    assert!(!rep.applied);
    let after: Vec<Vec<f64>> = params.iter().map(|p| p.value.to_f64_vec()).collect();
    assert_eq!(before, after);

    // an infinite input: the same
    let (model, mut params, mut batch) = tiny_rnn(3, 5);
    batch.inputs.as_mut().unwrap().data_mut()[3] = f64::INFINITY;
    let rep = s.step(&model, &mut params, &batch, 0, 0).unwrap();
    assert!(!rep.applied);
    assert!(params.all_finite());

    // and a finite batch is applied and changes the parameters
    let (model, mut params, batch) = tiny_rnn(3, 5);
    let rep = s.step(&model, &mut params, &batch, 0, 0).unwrap();
    assert!(rep.applied && rep.loss.is_finite());
    let moved: Vec<Vec<f64>> = params.iter().map(|p| p.value.to_f64_vec()).collect();
    let (_, fresh, _) = tiny_rnn(3, 5);
    assert_ne!(
        moved,
        fresh
            .iter()
            .map(|p| p.value.to_f64_vec())
            .collect::<Vec<_>>()
    );
}

#[test]
fn checkpoints_refuse_non_finite_weights_and_keep_the_old_file() {
    let (_, mut params, _) = tiny_rnn(2, 2);
    let dir = std::env::temp_dir().join(format!("sofo-guard-{}", std::process::id()));
    let path = dir.join("w.safetensors");
    sofo::checkpoint::save(&params, &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    params.get_mut("W").unwrap().value.data_mut()[0] = f64::NAN;
    assert!(sofo::checkpoint::save(&params, &path).is_err());
    assert_eq!(std::fs::read(&path).unwrap(), good);
    // round trip
    let (_, mut fresh, _) = tiny_rnn(2, 2);
    fresh.get_mut("b").unwrap().value = Tensor::zeros(&[4]);
    sofo::checkpoint::load_into(&mut fresh, &path).unwrap();
    let (_, orig, _) = tiny_rnn(2, 2);
    for (a, b) in fresh.iter().zip(orig.iter()) {
        assert_eq!(a.value.to_f64_vec(), b.value.to_f64_vec(), "{}", a.name);
    }
    // a shape mismatch is an error naming the tensor
    let mut wrong = sofo::params::ParamSet::new(vec![sofo::params::Param {
        name: "W".into(),
        value: Tensor::<f64>::zeros(&[3, 3]),
        mode: sofo::params::ParamMode::Free,
    }]);
    let e = sofo::checkpoint::load_into(&mut wrong, &path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`W`") || e.contains("unknown tensor"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
