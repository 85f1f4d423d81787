//! Elementwise programs ([`Pointwise`]): recorded from ordinary op-vocabulary
//! code, and run by the host engines as exactly the ops recorded — so their
//! values, tangents and gradients are bit for bit those of the code itself
//! (the GPU kernel that runs a program in one launch is checked against
//! these engines in `kernel_emulation.rs` and `cuda_agreement.rs`).

use sofo_ad::{Dual, Fwd, Ops, Pointwise, Result, Rev, Tensor};

mod common;
use common::every_op;
use sofo_tensor::rng;

const M: usize = 5;
const K: usize = 4;

fn program() -> Pointwise {
    Pointwise::record(5, |rec, r| {
        let ins: Vec<_> = r.to_vec();
        every_op::<f64, _>(rec, &ins)
    })
    .unwrap()
}

fn normal(shape: &[usize], stream: u64) -> Tensor<f64> {
    let mut t = Tensor::zeros(shape);
    rng::fill_normal(t.data_mut(), 7, stream);
    t
}

/// (a, b, c) with K tangents each, d and e without, each `[M, w]`.
fn inputs(e: &Fwd, w: usize) -> Vec<Dual<f64>> {
    (0..5)
        .map(|i| {
            let v = normal(&[M, w], i);
            if i < 3 {
                e.dual(v, normal(&[M, K, w], 10 + i)).unwrap()
            } else {
                Dual::constant(v)
            }
        })
        .collect()
}

fn same(got: &Dual<f64>, want: &Dual<f64>) {
    assert_eq!(got.primal.shape(), want.primal.shape());
    assert_eq!(got.primal.data(), want.primal.data(), "values");
    let (g, w) = (got.tangent.as_ref(), want.tangent.as_ref());
    assert_eq!(g.map(|t| t.data()), w.map(|t| t.data()), "tangents");
}

#[test]
fn a_program_computes_what_its_code_computes_bit_for_bit() {
    let p = program();
    assert_eq!((p.inputs(), p.outputs().len()), (5, 3));
    assert_eq!(p.registers(), 5 + p.steps().len());
    let mut e = Fwd::new(K);
    for w in [1, 3] {
        let x = inputs(&e, w);
        let outs = every_op::<f64, _>(&mut e, &x).unwrap();
        let refs: Vec<&Dual<f64>> = outs.iter().collect();
        let want = e.concat(&refs, 1).unwrap();
        // the inputs one by one, and as column blocks of wider values
        let xr: Vec<&Dual<f64>> = x.iter().collect();
        same(&e.pointwise(&p, &xr).unwrap(), &want);
        let ab = e.concat(&[&x[0], &x[1]], 1).unwrap();
        let abc = e.concat(&[&x[0], &x[1], &x[2]], 1).unwrap();
        same(
            &e.pointwise(&p, &[&ab, &x[2], &x[3], &x[4]]).unwrap(),
            &want,
        );
        let de = e.concat(&[&x[3], &x[4]], 1).unwrap();
        same(&e.pointwise(&p, &[&abc, &de]).unwrap(), &want);
        // the output that depends on d and e alone has zero tangents, as in concat
        let got = e.pointwise(&p, &xr).unwrap();
        let t = got.tangent.unwrap();
        for (i, v) in t.data().iter().enumerate() {
            if i % (3 * w) >= 2 * w {
                assert_eq!(*v, 0.0);
            }
        }
    }
    // no tangents anywhere: none out
    let x: Vec<Dual<f64>> = (0..5).map(|i| Dual::constant(normal(&[M, 1], i))).collect();
    let xr: Vec<&Dual<f64>> = x.iter().collect();
    assert!(e.pointwise(&p, &xr).unwrap().tangent.is_none());
}

#[test]
fn tangents_flow_to_the_registers_that_read_them() {
    let p = program();
    let has = p.tangent_registers(&[true, true, true, false, false]);
    let outs: Vec<bool> = p.outputs().iter().map(|&o| has[o]).collect();
    assert_eq!(outs, [true, true, false]);
    let has = p.tangent_registers(&[false, false, false, true, false]);
    let outs: Vec<bool> = p.outputs().iter().map(|&o| has[o]).collect();
    // r = q − a reads d through p; p = acc·d; d·e
    assert_eq!(outs, [true, true, true]);
}

/// The host tape runs a program as one node; its values and gradients are
/// those of the code's ops one by one: inputs of the element width, and
/// inputs cut into columns (a [M, 3] value giving three inputs) that are
/// also used after the program.
#[test]
fn a_program_backpropagates_as_its_code_does() {
    let p = program();
    // (values, gradients of a, b, c) for the program or the code, the
    // inputs (a, b, c) separate [M, 2] or joined [M, 3] at width 1
    let run = |use_program: bool, joined: bool| {
        let mut e = Rev::<f64>::new();
        let w = if joined { 1 } else { 2 };
        let leaves: Vec<_> = if joined {
            vec![e.leaf(normal(&[M, 3], 0))]
        } else {
            (0..3).map(|i| e.leaf(normal(&[M, w], i))).collect()
        };
        let d = e.constant(normal(&[M, w], 3)).unwrap();
        let f = e.constant(normal(&[M, w], 4)).unwrap();
        let mut ins: Vec<_> = leaves.iter().collect();
        ins.extend([&d, &f]);
        let y = if use_program {
            e.pointwise(&p, &ins).unwrap()
        } else {
            let mut cols = vec![];
            for x in &ins {
                let width = e.shape(x)[1];
                for c in 0..width / w {
                    cols.push(if width == w {
                        (*x).clone()
                    } else {
                        e.slice(x, 1, c * w, w).unwrap()
                    });
                }
            }
            let outs = every_op::<f64, _>(&mut e, &cols).unwrap();
            let refs: Vec<_> = outs.iter().collect();
            e.concat(&refs, 1).unwrap()
        };
        // a later use of the first input
        let later = e.mul(&leaves[0], &leaves[0]).unwrap();
        let value = e.value_of(&y).data().to_vec();
        let seeds = vec![
            (y, normal(&[M, 3 * w], 99)),
            (later, normal(e.value_of(&leaves[0]).shape(), 98)),
        ];
        let g = e.backward(seeds).unwrap();
        let grads: Vec<Vec<f64>> = leaves
            .iter()
            .map(|x| g[x.id()].clone().unwrap().data().to_vec())
            .collect();
        (value, grads)
    };
    for joined in [false, true] {
        assert_eq!(run(true, joined), run(false, joined), "joined {joined}");
    }
    // an input no output reads gets no gradient, as from the ops
    let square_first = Pointwise::record::<sofo_ad::TensorError>(2, |rec, r| {
        Ok(vec![Ops::<f64>::mul(rec, &r[0], &r[0])?])
    })
    .unwrap();
    let mut e = Rev::<f64>::new();
    let (a, b) = (e.leaf(normal(&[M, 1], 1)), e.leaf(normal(&[M, 1], 2)));
    let y = e.pointwise(&square_first, &[&a, &b]).unwrap();
    let g = e.backward(vec![(y, normal(&[M, 1], 3))]).unwrap();
    assert!(g[a.id()].is_some() && g[b.id()].is_none());
}

#[test]
fn what_is_not_elementwise_is_refused_by_name() {
    let err = |f: &dyn Fn(&mut sofo_ad::Recorder, &[sofo_ad::Reg]) -> Result<sofo_ad::Reg>| {
        Pointwise::record::<sofo_ad::TensorError>(2, |rec, r| Ok(vec![f(rec, r)?]))
            .unwrap_err()
            .to_string()
    };
    let msg = err(&|rec, r| Ops::<f64>::matmul(rec, &r[0], &r[1]));
    assert!(msg.contains("matmul is not an elementwise op"), "{msg}");
    let msg = err(&|rec, _| Ops::<f64>::constant(rec, Tensor::zeros(&[1])));
    assert!(msg.contains("a constant"), "{msg}");
    let msg = err(&|rec, r| Ops::<f64>::concat(rec, &[&r[0], &r[1]], 0));
    assert!(msg.contains("concat"), "{msg}");
    let msg = Pointwise::record::<sofo_ad::TensorError>(2, |_, _| Ok(vec![]))
        .unwrap_err()
        .to_string();
    assert!(msg.contains("at least one output"), "{msg}");

    // inputs that do not split into the program's column blocks
    let p = program();
    let mut e = Fwd::primal();
    let c = |s: &[usize]| Dual::constant(Tensor::<f64>::zeros(s));
    let (a3, b3, a2, other_rows) = (c(&[M, 3]), c(&[M, 3]), c(&[M, 2]), c(&[M + 1, 1]));
    for xs in [
        vec![&a3],
        vec![&a3, &b3, &a2],
        vec![&a2, &other_rows, &a2, &a2],
    ] {
        let msg = e.pointwise(&p, &xs).unwrap_err().to_string();
        assert!(msg.contains("pointwise"), "{msg}");
    }
}
