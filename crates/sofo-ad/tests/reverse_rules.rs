//! Identity 2 of method.md: every reverse rule is the transpose of the
//! forward rule, ⟨u, J v⟩ = ⟨Jᵀ u, v⟩, for every op, in f64; and the two
//! engines compute the same primal values.

use sofo_ad::layout::tangent_shape;
use sofo_ad::{Binary, Dual, Fwd, Ops, Result, Rev, Tensor, Unary};
use sofo_tensor::rng;

fn randn(shape: &[usize], seed: u64) -> Tensor<f64> {
    let mut t = Tensor::<f64>::scratch(shape);
    rng::fill_normal(t.data_mut(), seed, 77);
    t
}

#[derive(Debug, Clone)]
enum Case {
    Unary(Unary),
    Binary(Binary),
    Matmul,
    Linear {
        leak: bool,
        bias: bool,
    },
    Sum(Vec<usize>),
    Mean(Vec<usize>),
    Concat(usize),
    Slice(usize, usize, usize),
    Reshape(Vec<usize>),
    Transpose(usize, usize),
    Broadcast(Vec<usize>),
    Softmax,
    LogSoftmax,
    /// A two-step leaky tanh RNN with a softmax readout: composition.
    Rnn,
}

fn apply<E: Ops<f64>>(c: &Case, e: &mut E, x: &[E::V]) -> Result<E::V> {
    match c {
        Case::Unary(u) => e.unary(&x[0], *u),
        Case::Binary(b) => e.binary(&x[0], &x[1], *b),
        Case::Matmul => e.matmul(&x[0], &x[1]),
        Case::Linear { leak, bias } => {
            // x: a1, w1, a2, w2, [b], [x]
            let mut i = 4;
            let b = if *bias {
                i += 1;
                Some(&x[i - 1])
            } else {
                None
            };
            let l = if *leak { Some((&x[i], 0.7)) } else { None };
            e.linear(l, 0.3, &[(&x[0], &x[1]), (&x[2], &x[3])], b)
        }
        Case::Sum(a) => e.sum(&x[0], a),
        Case::Mean(a) => e.mean(&x[0], a),
        Case::Concat(a) => e.concat(&[&x[0], &x[1], &x[2]], *a),
        Case::Slice(a, s, l) => e.slice(&x[0], *a, *s, *l),
        Case::Reshape(s) => e.reshape(&x[0], s),
        Case::Transpose(a, b) => e.transpose(&x[0], *a, *b),
        Case::Broadcast(s) => e.broadcast_to(&x[0], s),
        Case::Softmax => e.softmax(&x[0]),
        Case::LogSoftmax => e.log_softmax(&x[0]),
        Case::Rnn => {
            // x: h0 [3,4], W [4,4], U [3,2] inputs, B [2,4], b [4], C [4,5]
            let u0 = e.slice(&x[2], 0, 0, 3)?;
            let mut h = e.linear(Some((&x[0], 0.8)), 0.2, &[(&u0, &x[3])], Some(&x[4]))?;
            for _ in 0..2 {
                let r = e.tanh(&h)?;
                h = e.linear(
                    Some((&h, 0.8)),
                    0.2,
                    &[(&r, &x[1]), (&u0, &x[3])],
                    Some(&x[4]),
                )?;
            }
            let r = e.tanh(&h)?;
            let y = e.matmul(&r, &x[5])?;
            let ls = e.log_softmax(&y)?;
            let sq = e.square(&ls)?;
            e.sum(&sq, &[1])
        }
    }
}

fn check(case: Case, shapes: &[&[usize]], seed: u64) {
    let xs: Vec<Tensor<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = randn(s, seed * 31 + i as u64);
            match case {
                Case::Unary(Unary::Log) | Case::Unary(Unary::Sqrt) => t.map(|v| v.abs() + 0.5),
                Case::Unary(Unary::Relu) | Case::Unary(Unary::Abs) => {
                    t.map(|v| if v.abs() < 0.1 { v + 0.3 } else { v })
                }
                Case::Binary(Binary::Div) if i == 1 => t.map(|v| v.signum() * (v.abs() + 0.5)),
                _ => t,
            }
        })
        .collect();
    let vs: Vec<Tensor<f64>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, seed * 57 + 100 + i as u64))
        .collect();

    // forward: J v with K = 1 (the layout of one tangent is the primal's order)
    let mut f = Fwd::new(1);
    let duals: Vec<Dual<f64>> = xs
        .iter()
        .zip(&vs)
        .map(|(x, v)| {
            let t = v.clone().reshape(&tangent_shape(x.shape(), 1)).unwrap();
            f.dual(x.clone(), t).unwrap()
        })
        .collect();
    let out = apply(&case, &mut f, &duals).unwrap();
    let jv = out
        .tangent
        .as_ref()
        .expect("output has a tangent")
        .data()
        .to_vec();

    // reverse: Jᵀ u
    let mut r = Rev::<f64>::new();
    let leaves: Vec<_> = xs.iter().map(|x| r.leaf(x.clone())).collect();
    let y = apply(&case, &mut r, &leaves).unwrap();
    assert_eq!(
        r.value_of(&y).shape(),
        out.primal.shape(),
        "{case:?}: shapes"
    );
    let dp = r
        .value_of(&y)
        .data()
        .iter()
        .zip(out.primal.data())
        .fold(0.0f64, |m, (a, b)| {
            // NaN-propagating: `f64::max` would drop a NaN
            let d = (a - b).abs();
            if d.is_nan() || m.is_nan() {
                f64::NAN
            } else {
                m.max(d)
            }
        });
    assert!(
        dp <= 1e-12 * (1.0 + out.primal.data().iter().fold(0.0f64, |m, v| m.max(v.abs()))),
        "{case:?}: primal values differ by {dp:e}"
    );
    let u = randn(out.primal.shape(), seed * 91 + 7);
    let grads = r.backward(vec![(y, u.clone())]).unwrap();

    let lhs: f64 = u.data().iter().zip(&jv).map(|(a, b)| a * b).sum();
    let rhs: f64 = leaves
        .iter()
        .zip(&vs)
        .map(|(l, v)| match &grads[l.id()] {
            Some(g) => g
                .data()
                .iter()
                .zip(v.data())
                .map(|(a, b)| a * b)
                .sum::<f64>(),
            None => 0.0,
        })
        .sum();
    // both sides are sums of a few hundred products: rounding ~1e-15 relative
    assert!(
        (lhs - rhs).abs() <= 1e-12 * (1.0 + lhs.abs() + rhs.abs()),
        "{case:?} shapes {shapes:?}: ⟨u, Jv⟩ = {lhs} but ⟨Jᵀu, v⟩ = {rhs}"
    );
    assert!(lhs.abs() > 1e-8, "{case:?}: degenerate check");
}

#[test]
fn unary_ops() {
    for (i, u) in Unary::all(0.4, -2.5).into_iter().enumerate() {
        check(Case::Unary(u), &[&[3, 5]], i as u64);
        check(Case::Unary(u), &[&[2, 3, 4]], 50 + i as u64);
    }
}

#[test]
fn binary_ops_with_broadcasting() {
    let pairs: &[(&[usize], &[usize])] = &[
        (&[3, 4], &[3, 4]),
        (&[3, 4], &[4]),
        (&[4], &[3, 4]),
        (&[2, 1, 4], &[3, 1]),
        (&[3, 4], &[1]),
    ];
    for (i, b) in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div]
        .into_iter()
        .enumerate()
    {
        for (j, (a, c)) in pairs.iter().enumerate() {
            check(Case::Binary(b), &[a, c], (i * 10 + j) as u64);
        }
    }
}

#[test]
fn matmul_and_linear() {
    check(Case::Matmul, &[&[3, 4], &[4, 5]], 1);
    check(Case::Matmul, &[&[2, 3, 4], &[4, 5]], 2);
    check(Case::Matmul, &[&[4], &[4, 5]], 3);
    for (i, (leak, bias)) in [(false, false), (true, false), (false, true), (true, true)]
        .into_iter()
        .enumerate()
    {
        let mut s: Vec<&[usize]> = vec![&[3, 4], &[4, 5], &[3, 2], &[2, 5]];
        if bias {
            s.push(&[5]);
        }
        if leak {
            s.push(&[3, 5]);
        }
        check(Case::Linear { leak, bias }, &s, 10 + i as u64);
    }
}

#[test]
fn reductions_and_shape_ops() {
    check(Case::Sum(vec![0]), &[&[3, 4]], 1);
    check(Case::Sum(vec![1, 2]), &[&[2, 3, 4]], 2);
    check(Case::Sum(vec![0, 1]), &[&[3, 4]], 3);
    check(Case::Mean(vec![1]), &[&[3, 4]], 4);
    check(Case::Concat(0), &[&[2, 3], &[1, 3], &[3, 3]], 5);
    check(Case::Concat(1), &[&[2, 3], &[2, 1], &[2, 2]], 6);
    check(Case::Slice(1, 1, 2), &[&[3, 4]], 7);
    check(Case::Slice(0, 2, 1), &[&[3, 4, 2]], 8);
    check(Case::Reshape(vec![6, 2]), &[&[3, 4]], 9);
    check(Case::Transpose(0, 1), &[&[3, 4]], 10);
    check(Case::Transpose(0, 2), &[&[2, 3, 4]], 11);
    check(Case::Broadcast(vec![3, 4]), &[&[4]], 12);
    check(Case::Broadcast(vec![2, 3, 4]), &[&[3, 1]], 13);
    check(Case::Softmax, &[&[3, 5]], 14);
    check(Case::LogSoftmax, &[&[3, 5]], 15);
}

#[test]
fn a_composed_rnn() {
    check(
        Case::Rnn,
        &[&[3, 4], &[4, 4], &[3, 2], &[2, 4], &[4], &[4, 5]],
        1,
    );
}

#[test]
fn constants_get_no_gradient_and_seeds_add_up() {
    let mut r = Rev::<f64>::new();
    let a = r.leaf(randn(&[2, 3], 1));
    let c = r.constant(randn(&[2, 3], 2)).unwrap();
    let y = r.mul(&a, &c).unwrap();
    let g = r
        .backward(vec![
            (y.clone(), Tensor::full(&[2, 3], 1.0)),
            (y, Tensor::full(&[2, 3], 2.0)),
        ])
        .unwrap();
    assert!(g[c.id()].is_none());
    let want: Vec<f64> = r.value_of(&c).data().iter().map(|v| 3.0 * v).collect();
    assert_eq!(g[a.id()].as_ref().unwrap().data(), want.as_slice());
    // a seed of the wrong shape is an error
    let y2 = r.tanh(&a).unwrap();
    assert!(r.backward(vec![(y2, Tensor::zeros(&[3, 2]))]).is_err());
}
