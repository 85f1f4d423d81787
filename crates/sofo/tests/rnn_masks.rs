//! Masks on B and C, masks read from files, the softplus Dale transform and
//! per-element trainability (issue 6, items 1–3): after training with each
//! optimiser (SOFO, Adam, SGD, FGD) masked effective entries are exactly
//! zero, signs are kept, and frozen entries are bit-identical.

mod common;

use common::*;
use sofo::models::{
    gradient_pass, read_mask, Activation, ConstrainedRnn, Constraints, DaleTransform, Model,
    RateRnn,
};
use sofo::optim::{
    Adam, AdamConfig, Damping, Fgd, FgdConfig, LearningRate, Optimizer, Sgd, SgdConfig, Sofo,
    SofoConfig,
};
use sofo::params::ParamSet;

const N: usize = 20;

fn rnn() -> RateRnn {
    RateRnn {
        n: N,
        inputs: 1,
        outputs: 1,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: true,
        gain: 0.9,
    }
}

/// Dale (softplus) on W and C, random masks on W, B (N × 1) and C (1 × N).
fn model(transform: DaleTransform) -> ConstrainedRnn {
    let mut c = Constraints::generate(N, Some(0.75), true, 0.5, false, 3)
        .unwrap()
        .with_io_masks(N, 1, 1, 0.5, 0.6, 3)
        .unwrap();
    c.dale_transform = transform;
    ConstrainedRnn::new(rnn(), c).unwrap()
}

type Step = Box<dyn FnMut(&ConstrainedRnn, &mut ParamSet<f64>, u64)>;

fn optimizers() -> Vec<(&'static str, Step)> {
    let sofo = Sofo::new(SofoConfig {
        k: 24,
        lr: 0.5,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    })
    .unwrap();
    let mut adam = Adam::<f64>::new(AdamConfig {
        lr: LearningRate::constant(0.05),
        ..AdamConfig::default()
    })
    .unwrap();
    let mut sgd = Sgd::<f64>::new(SgdConfig {
        lr: LearningRate::constant(0.5),
        momentum: 0.9,
        clip: None,
    })
    .unwrap();
    let mut fgd = Fgd::new(FgdConfig {
        k: 8,
        lr: LearningRate::constant(0.01),
    })
    .unwrap();
    vec![
        (
            "sofo",
            Box::new(move |m, p, it| {
                sofo.step(m, p, &memory_batch(16, 20, it), 0, it).unwrap();
            }),
        ),
        (
            "adam",
            Box::new(move |m, p, it| {
                adam.step(m, p, &memory_batch(16, 20, it), 0, it).unwrap();
            }),
        ),
        (
            "sgd",
            Box::new(move |m, p, it| {
                sgd.step(m, p, &memory_batch(16, 20, it), 0, it).unwrap();
            }),
        ),
        (
            "fgd",
            Box::new(move |m, p, it| {
                Optimizer::<f64>::step(&mut fgd, m, p, &memory_batch(16, 20, it), 0, it).unwrap();
            }),
        ),
    ]
}

fn check(m: &ConstrainedRnn, params: &ParamSet<f64>, what: &str) {
    let eff = m.effective_weights(params).unwrap();
    let get = |n: &str| eff.iter().find(|(k, _)| k == n).unwrap().1.data().to_vec();
    let c = &m.constraints;
    let s = c.dale.as_ref().unwrap();
    for (name, mask, cols, dale) in [
        ("W", c.mask_w.as_ref().unwrap(), N, true),
        ("B", c.mask_b.as_ref().unwrap(), 1, false),
        ("C", c.mask_c.as_ref().unwrap(), N, true),
    ] {
        let v = get(name);
        let mut kept = 0;
        for (k, (&x, &mk)) in v.iter().zip(mask).enumerate() {
            if mk == 0.0 {
                assert_eq!(x, 0.0, "{what}: masked {name}[{k}] = {x}");
            } else {
                kept += 1;
                if dale {
                    assert!(
                        x * s[k % cols] >= 0.0,
                        "{what}: {name}[{k}] = {x} against Dale"
                    );
                }
            }
        }
        assert!(
            kept > 0 && kept < mask.len(),
            "{what}: {name} mask keeps {kept}"
        );
    }
}

#[test]
fn masks_on_w_b_c_and_dale_survive_every_optimizer() {
    for transform in [DaleTransform::Abs, DaleTransform::Softplus] {
        let m = model(transform);
        let p0: ParamSet<f64> = m.init(0).unwrap();
        check(&m, &p0, "init");
        for (name, mut step) in optimizers() {
            let mut p = p0.clone();
            for it in 0..15 {
                step(&m, &mut p, it);
            }
            let what = format!("{} after {name}", transform.name());
            check(&m, &p, &what);
            assert_ne!(
                p.get("W").unwrap().value.to_f64_vec(),
                p0.get("W").unwrap().value.to_f64_vec(),
                "{what}: W moved"
            );
        }
    }
}

#[test]
fn softplus_dale_starts_at_the_gain_and_differentiates_consistently() {
    let m = model(DaleTransform::Softplus);
    let params: ParamSet<f64> = m.init(4).unwrap();
    let r = m.spectral_radius(&params).unwrap();
    assert!((r - 0.9).abs() < 1e-6, "radius {r}");
    // the same effective start as under |·|
    let abs = model(DaleTransform::Abs);
    let pa: ParamSet<f64> = abs.init(4).unwrap();
    let (ws, wa) = (
        m.effective_weights(&params).unwrap().remove(0).1,
        abs.effective_weights(&pa).unwrap().remove(0).1,
    );
    assert!(max_rel_diff(ws.data(), wa.data()) < 1e-9);
    // strictly signed (softplus > 0) where the mask keeps
    let mask = m.constraints.mask_w.as_ref().unwrap();
    assert!(ws
        .data()
        .iter()
        .zip(mask)
        .all(|(&v, &k)| (k == 0.0) == (v == 0.0)));
    let batch = memory_batch(3, 8, 5);
    let (_, grads) = gradient_pass(&m, &params, &batch).unwrap();
    let g: Vec<f64> = grads.iter().flat_map(|t| t.data().to_vec()).collect();
    let (_, jtg) = ggn_and_gradient(&m, &params, &batch);
    let d = max_rel_diff(&g, &jtg);
    assert!(d < 1e-12, "reverse vs forward through softplus: {d:e}");
    assert!(DaleTransform::parse("exp")
        .unwrap_err()
        .to_string()
        .contains("constraints.dale_transform"));
}

#[test]
fn frozen_entries_are_bit_identical_after_every_optimizer() {
    let m = ConstrainedRnn::new(rnn(), Constraints::default()).unwrap();
    let mut p0: ParamSet<f64> = m.init(0).unwrap();
    // every third entry of W trainable, and half of C
    let tw: Vec<bool> = (0..N * N).map(|k| k % 3 == 0).collect();
    let tc: Vec<bool> = (0..N).map(|k| k % 2 == 0).collect();
    p0.set_trainable_entries("W", &tw).unwrap();
    p0.set_trainable_entries("C", &tc).unwrap();
    // SOFO's tangents have no component along frozen entries
    let s = Sofo::new(SofoConfig {
        k: 8,
        ..SofoConfig::default()
    })
    .unwrap();
    let tg = s.sample_tangents(&p0, 1, 0).unwrap();
    let vw = tg.per_param[0].as_ref().unwrap();
    for (i, v) in vw.data().iter().enumerate() {
        // layout [N rows, K, N cols]
        let (row, col) = (i / (8 * N), i % N);
        if !tw[row * N + col] {
            assert_eq!(*v, 0.0);
        }
    }
    for (name, mut step) in optimizers() {
        let mut p = p0.clone();
        for it in 0..10 {
            step(&m, &mut p, it);
        }
        for (t, mask) in [("W", &tw), ("C", &tc)] {
            let (a, b) = (
                p.get(t).unwrap().value.data(),
                p0.get(t).unwrap().value.data(),
            );
            let mut moved = 0;
            for k in 0..a.len() {
                if mask[k] {
                    moved += (a[k] != b[k]) as usize;
                } else {
                    assert_eq!(
                        a[k].to_bits(),
                        b[k].to_bits(),
                        "{name}: frozen {t}[{k}] moved"
                    );
                }
            }
            assert!(moved > 0, "{name}: no trainable entry of {t} moved");
        }
    }
    // the directions span the free entries only: their count, and K beyond it refused
    let all = p0.trainable_count();
    let frozen = tw.iter().filter(|&&t| !t).count() + tc.iter().filter(|&&t| !t).count();
    assert_eq!(p0.free_count(), all - frozen);
    let too_many = Sofo::new(SofoConfig {
        k: p0.free_count() + 1,
        ..SofoConfig::default()
    })
    .unwrap();
    let e = too_many
        .sample_tangents(&p0, 0, 0)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("sofo.tangents"), "{e}");
    let e = p0
        .set_trainable_entries("W", &[true; 3])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trainable entries of W") && e.contains("400"),
        "{e}"
    );
}

#[test]
fn masks_are_read_from_csv_and_safetensors_with_clear_errors() {
    let dir = std::env::temp_dir().join(format!("sofo-masks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let csv = dir.join("w.csv");
    std::fs::write(&csv, "1,0,1\n0, 1, 1\n\n").unwrap();
    let m = read_mask(&csv, "W", [2, 3], "constraints.masks.W").unwrap();
    assert_eq!(m, vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0]);
    let e = read_mask(&csv, "W", [3, 3], "constraints.masks.W")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("constraints.masks.W") && e.contains("2 rows") && e.contains("[3, 3]"),
        "{e}"
    );
    let e = read_mask(&csv, "W", [2, 2], "f").unwrap_err().to_string();
    assert!(e.contains("3 values on row 1"), "{e}");
    std::fs::write(&csv, "1 0.5\n").unwrap();
    let e = read_mask(&csv, "W", [1, 2], "f").unwrap_err().to_string();
    assert!(e.contains("0.5") && e.contains("0 or 1"), "{e}");
    std::fs::write(&csv, "1 x\n").unwrap();
    let e = read_mask(&csv, "W", [1, 2], "f").unwrap_err().to_string();
    assert!(e.contains("`x`") && e.contains("0 or 1"), "{e}");
    // safetensors: the tensor named like the parameter
    let st = dir.join("m.safetensors");
    let set = ParamSet::new(vec![sofo::params::Param {
        name: "C".into(),
        value: sofo::Tensor::<f32>::from_vec(&[1, 3], vec![1.0, 0.0, 1.0]).unwrap(),
        mode: sofo::params::ParamMode::Pinned,
    }]);
    sofo::checkpoint::save(&set, &st).unwrap();
    assert_eq!(
        read_mask(&st, "C", [1, 3], "f").unwrap(),
        vec![1.0, 0.0, 1.0]
    );
    let e = read_mask(&st, "W", [1, 3], "constraints.masks.W")
        .unwrap_err()
        .to_string();
    assert!(e.contains("named `W`") && e.contains("[\"C\"]"), "{e}");
    let e = read_mask(&st, "C", [3, 1], "f").unwrap_err().to_string();
    assert!(e.contains("[1, 3]") && e.contains("[3, 1]"), "{e}");
    // a vector stands for one row (the trainable entries of b, d, x0, tau)
    let vs = dir.join("v.safetensors");
    let set = ParamSet::new(vec![sofo::params::Param {
        name: "b".into(),
        value: sofo::Tensor::<f32>::from_vec(&[3], vec![0.0, 1.0, 1.0]).unwrap(),
        mode: sofo::params::ParamMode::Pinned,
    }]);
    sofo::checkpoint::save(&set, &vs).unwrap();
    assert_eq!(
        read_mask(&vs, "b", [1, 3], "f").unwrap(),
        vec![0.0, 1.0, 1.0]
    );
    assert!(read_mask(&vs, "b", [3, 1], "f").is_err());
    let e = read_mask(&dir.join("none.csv"), "W", [1, 1], "constraints.masks.W")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("constraints.masks.W") && e.contains("readable"),
        "{e}"
    );
    assert!(Constraints::default()
        .with_io_masks(4, 1, 1, 0.0, 1.0, 0)
        .unwrap_err()
        .to_string()
        .contains("constraints.density_in"));
}
