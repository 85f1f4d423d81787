//! Identity 8: peak memory of a SOFO iteration does not grow with T.
//! Alone in its test binary: the tensor layer's counters are process-wide.

use sofo::models::{Activation, Batch, Model, RateRnn};
use sofo::optim::{Sofo, SofoConfig};
use sofo_tensor::{memory, rng, Tensor};

fn peak_extra_bytes(t: usize) -> usize {
    let model = RateRnn {
        n: 32,
        inputs: 3,
        outputs: 3,
        alpha: 0.1,
        activation: Activation::Tanh,
        learn_x0: true,
        gain: 0.9,
    };
    let m = 8;
    let mut params = Model::<f32>::init(&model, 0).unwrap();
    let mut u = Tensor::<f32>::scratch(&[t, m, 3]);
    rng::fill_normal(u.data_mut(), 1, 1);
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(u),
        initial: None,
        targets: Tensor::zeros(&[t, m, 3]),
        weights: None,
        loss_norm: (t * m * 3) as f64,
        noise_seed: 0,
    };
    let sofo = Sofo::new(SofoConfig {
        k: 16,
        ..SofoConfig::default()
    })
    .unwrap();
    memory::clear_pools();
    let before = memory::stats();
    memory::reset_peak();
    let rep = sofo.step(&model, &mut params, &batch, 0, 0).unwrap();
    assert!(rep.applied);
    let after = memory::stats();
    after.peak_bytes - (before.live_bytes + before.pooled_bytes)
}

#[test]
fn sofo_iteration_memory_is_flat_in_t() {
    // Two worker threads: the groups of trials run concurrently and share
    // the buffer pool, so which buffer is reused depends on timing; the
    // peak may move by a few buffers (observed: up to 5 %), never with T.
    // Keeping even one [M, O] output per step would add 20 % at T = 1000.
    sofo_tensor::parallel::set_threads(2);
    let short = peak_extra_bytes(10);
    let long = peak_extra_bytes(1000);
    assert!(short > 0);
    let ratio = long as f64 / short as f64;
    assert!(
        (0.9..=1.1).contains(&ratio),
        "2 threads: T=10 {short} B, T=1000 {long} B"
    );

    // One thread: the allocation sequence is fixed, so the peaks are equal.
    sofo_tensor::parallel::set_threads(1);
    let short = peak_extra_bytes(10);
    let long = peak_extra_bytes(1000);
    assert!(short > 0);
    assert_eq!(short, long, "1 thread: peak extra bytes at T=10 and T=1000");
}
