// Index loops mirror the formulas of method.md.
#![allow(clippy::needless_range_loop)]

//! Identity 7: each little loss's gradient and curvature against finite
//! differences of its value; and the sketch Ẏᵀ H Ẏ against the dense H.

mod common;

use common::*;
use sofo::loss::{LittleLoss, SoftmaxCrossEntropy, WeightedMse};
use sofo::Tensor;

fn fd_check(loss: &dyn LittleLoss<f64>, y: &Tensor<f64>) {
    let n = y.numel();
    let h = 1e-4;
    let at = |d: &[(usize, f64)]| {
        let mut z = y.clone();
        for &(i, e) in d {
            z.data_mut()[i] += e;
        }
        loss.value(&z).unwrap()
    };
    let g = loss.gradient(y).unwrap();
    let hs = loss.hessian(y).unwrap();
    let scale = hs.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-12);
    for i in 0..n {
        let fd = (at(&[(i, h)]) - at(&[(i, -h)])) / (2.0 * h);
        assert!(
            (fd - g.data()[i]).abs() < 1e-7 * (1.0 + fd.abs()),
            "gradient {i}: {fd} vs {}",
            g.data()[i]
        );
        for j in 0..n {
            // second-order central difference, error O(h²) ≈ 1e-8 relative
            let fd2 = (at(&[(i, h), (j, h)]) - at(&[(i, h), (j, -h)]) - at(&[(i, -h), (j, h)])
                + at(&[(i, -h), (j, -h)]))
                / (4.0 * h * h);
            assert!(
                (fd2 - hs[i * n + j]).abs() < 1e-6 * scale,
                "H[{i},{j}]: fd {fd2} vs {}",
                hs[i * n + j]
            );
        }
    }
    // sketch: Ẏᵀ H Ẏ for random tangents in the engine's layout [rows, K, L]
    let k = 3;
    let shape = y.shape().to_vec();
    let l = *shape.last().unwrap();
    let rows = n / l;
    let yd = randn(&[rows, k, l], 17, 0);
    let mut got = vec![0.0; k * k];
    loss.add_curvature(y, &yd, k, &mut got).unwrap();
    for a in 0..k {
        for b in 0..k {
            let mut want = 0.0;
            for i in 0..n {
                for j in 0..n {
                    let ya = yd.data()[((i / l) * k + a) * l + i % l];
                    let yb = yd.data()[((j / l) * k + b) * l + j % l];
                    want += ya * hs[i * n + j] * yb;
                }
            }
            assert!(
                (got[a * k + b] - want).abs() < 1e-12 * (1.0 + want.abs()),
                "sketch [{a},{b}]"
            );
        }
    }
}

#[test]
fn mse_curvature() {
    let y = randn(&[3, 4], 1, 0);
    fd_check(&WeightedMse::mean(randn(&[3, 4], 1, 1)), &y);
}

#[test]
fn weighted_and_masked_mse_curvature() {
    let y = randn(&[4, 3], 2, 0);
    let w = Tensor::from_vec(&[4, 1], vec![0.0, 1.0, 2.5, 1.0]).unwrap();
    let loss = WeightedMse {
        target: randn(&[4, 3], 2, 1),
        weights: Some(w),
        n: 7.0,
    };
    fd_check(&loss, &y);
    // a masked row contributes nothing
    let mut y2 = y.clone();
    y2.data_mut()[0] += 10.0;
    assert_eq!(loss.value(&y).unwrap(), loss.value(&y2).unwrap());
}

#[test]
fn softmax_cross_entropy_curvature() {
    let y = randn(&[3, 4], 3, 0);
    fd_check(
        &SoftmaxCrossEntropy::from_labels(&[0, 3, 1], 4, 3).unwrap(),
        &y,
    );
    // soft targets
    let t = Tensor::from_vec(&[2, 3], vec![0.2, 0.3, 0.5, 1.0, 0.0, 0.0]).unwrap();
    fd_check(
        &SoftmaxCrossEntropy { target: t, n: 5.0 },
        &randn(&[2, 3], 3, 1),
    );
}

/// Split into groups of trials (as the CPU's threads split a batch), the
/// cross-entropy of each group over the batch's row count adds up to the
/// batch's: value, gradient and curvature.
#[test]
fn softmax_cross_entropy_adds_up_over_groups() {
    let labels = [0, 3, 1, 2, 2];
    let y = randn(&[5, 4], 4, 0);
    let k = 3;
    let yd = randn(&[5, k, 4], 4, 1);
    let whole = SoftmaxCrossEntropy::<f64>::from_labels(&labels, 4, 5).unwrap();
    let (mut g_whole, mut g_parts) = (vec![0.0; k * k], vec![0.0; k * k]);
    whole.add_curvature(&y, &yd, k, &mut g_whole).unwrap();
    let mut value = 0.0;
    let mut grad = vec![];
    for (start, len) in [(0, 2), (2, 3)] {
        let part =
            SoftmaxCrossEntropy::<f64>::from_labels(&labels[start..start + len], 4, 5).unwrap();
        let yp = y.slice(0, start, len).unwrap();
        value += part.value(&yp).unwrap();
        grad.extend(part.gradient(&yp).unwrap().data().to_vec());
        part.add_curvature(&yp, &yd.slice(0, start, len).unwrap(), k, &mut g_parts)
            .unwrap();
    }
    assert!((value - whole.value(&y).unwrap()).abs() < 1e-12);
    let gw = whole.gradient(&y).unwrap();
    for (a, b) in gw.data().iter().zip(&grad) {
        assert!((a - b).abs() < 1e-12, "gradient {a} vs {b}");
    }
    for (a, b) in g_whole.iter().zip(&g_parts) {
        assert!((a - b).abs() < 1e-12, "curvature {a} vs {b}");
    }
    // the normaliser is checked
    let e = SoftmaxCrossEntropy::<f64>::from_labels(&labels, 4, 3)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("softmax_cross_entropy.n") && e.contains('3'),
        "{e}"
    );
    let bad = SoftmaxCrossEntropy::<f64> {
        target: Tensor::zeros(&[5, 4]),
        n: 0.0,
    };
    let e = bad.value(&y).unwrap_err().to_string();
    assert!(e.contains("softmax_cross_entropy.n"), "{e}");
}

#[test]
fn loss_errors_name_the_problem() {
    let loss = WeightedMse::mean(randn(&[3, 4], 1, 1));
    let e = loss.value(&randn(&[4, 3], 1, 0)).unwrap_err().to_string();
    assert!(
        e.contains("mse") && e.contains("[3, 4]") && e.contains("[4, 3]"),
        "{e}"
    );
    let e = SoftmaxCrossEntropy::<f64>::from_labels(&[5], 3, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("label") && e.contains('5'), "{e}");
}
