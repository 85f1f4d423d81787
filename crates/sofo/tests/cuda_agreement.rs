//! Backend agreement (feature `cuda`): the GPU gives the CPU's numbers to f32
//! tolerance, op by op, for whole SOFO sketches and steps, and for BPTT.
//! Where there is no GPU every test prints a notice and passes, and the last
//! test reruns them all on the fake GPU of `fake_gpu/` (host stand-ins for
//! the CUDA libraries). SOFO_REQUIRE_GPU makes a missing GPU an error.
#![cfg(feature = "cuda")]

use sofo::loss::{Observer, SoftmaxCrossEntropy, WeightedMse};
use sofo::models::Trials;
use sofo::models::{
    Activation, Batch, ConstrainedRnn, Constraints, DaleTransform, LeakyRnn, LorenzModel, LowRank,
    Model, Noise, RateRnn, ReachRnn, Regularizers, TimeConstants, TwoJointArm,
};
use sofo::optim::{Adam, AdamConfig, Damping, Optimizer, Sofo, SofoConfig};
use sofo::params::{Param, ParamMode, ParamSet};
use sofo::tasks::{FlipFlopTask, KalmanTask, LorenzData, LorenzTask, ReachTask, Task};
use sofo::{Device, Dual, Fwd, Ops, Tensor};
use sofo_ad::cuda::{device_or_skip, CudaDual, CudaFwd};
use sofo_ad::cuda_rev::CudaRev;
use sofo_ad::layout::tangent_shape;
use sofo_ad::{Binary, Unary};
use sofo_ad::{Rev, Var};
use sofo_tensor::cuda::{DenseLinear, ProgramWords};
use sofo_tensor::rng;

mod fake_gpu;

/// The GPU tests run one at a time: the device-memory counters are global.
static GPU: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn randn(shape: &[usize], seed: u64, stream: u64) -> Tensor<f32> {
    let mut t = Tensor::<f32>::scratch(shape);
    rng::fill_normal(t.data_mut(), seed, stream);
    t
}

fn dual(shape: &[usize], k: usize, seed: u64, with_tangent: bool) -> Dual<f32> {
    Dual {
        primal: randn(shape, seed, 1),
        tangent: with_tangent.then(|| randn(&tangent_shape(shape, k), seed, 2)),
    }
}

/// max |a − b| / max(1, max |a|); infinite where either is NaN (a buffer
/// nobody wrote is NaN-poisoned, and `f64::max` would skip it)
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| worse(m, *x as f64 - *y as f64))
        / scale
}

/// max(m, |d|), infinite once a NaN is met
fn worse(m: f64, d: f64) -> f64 {
    if d.is_nan() {
        f64::INFINITY
    } else {
        m.max(d.abs())
    }
}

fn same(cpu: &Dual<f32>, gpu: &Dual<f32>, what: &str) {
    close(cpu, gpu, 1e-5, what);
}

/// `cpu` and `gpu` agree to `tol` ([`rel`], value and tangents); the
/// largest difference.
fn close(cpu: &Dual<f32>, gpu: &Dual<f32>, tol: f64, what: &str) -> f64 {
    assert_eq!(cpu.primal.shape(), gpu.primal.shape(), "{what}: shape");
    let d = rel(cpu.primal.data(), gpu.primal.data());
    assert!(d < tol, "{what}: primal differs by {d:e}");
    match (&cpu.tangent, &gpu.tangent) {
        (None, None) => d,
        (Some(a), Some(b)) => {
            let dt = rel(a.data(), b.data());
            assert!(dt < tol, "{what}: tangents differ by {dt:e}");
            d.max(dt)
        }
        _ => panic!("{what}: one side has tangents, the other not"),
    }
}

/// Uploads `xs`, runs `f` on the GPU engine, downloads the result.
fn on_gpu(
    g: &mut CudaFwd,
    xs: &[&Dual<f32>],
    f: impl FnOnce(&mut CudaFwd, &[CudaDual]) -> sofo_tensor::Result<CudaDual>,
) -> Dual<f32> {
    let up: Vec<CudaDual> = xs.iter().map(|d| g.upload(d).unwrap()).collect();
    let out = f(g, &up).unwrap();
    g.download(&out).unwrap()
}

#[test]
fn every_op_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("every_op_agrees_with_the_cpu") else {
        return;
    };
    let k = 5;
    let mut c = Fwd::new(k);
    let mut g = CudaFwd::new(dev, k);
    let x = dual(&[6, 7], k, 1, true);
    let pos = Dual {
        primal: x.primal.map(|v| v.abs() + 0.5),
        tangent: x.tangent.clone(),
    };
    for op in Unary::all(0.3, -1.7) {
        let input = if matches!(op, Unary::Log | Unary::Sqrt) {
            &pos
        } else {
            &x
        };
        let a = c.unary(input, op).unwrap();
        let b = on_gpu(&mut g, &[input], |g, v| Ops::<f32>::unary(g, &v[0], op));
        same(&a, &b, &format!("{op:?}"));
        // times a constant factor in one pass; a factor with tangents as
        // two ops
        for factor_tangents in [false, true] {
            let f = dual(&[6, 7], k, 9, factor_tangents);
            let a = c.unary_mul(input, op, &f).unwrap();
            let b = on_gpu(&mut g, &[input, &f], |g, v| {
                Ops::<f32>::unary_mul(g, &v[0], op, &v[1])
            });
            same(
                &a,
                &b,
                &format!("{op:?} times a factor ({factor_tangents})"),
            );
        }
    }
    // linear with bias and two terms, with a leak and without, every tangent
    // present or not; outputs of 3 columns (the narrow kernel) and 11 (GEMMs)
    for (n, leak, mask) in [3usize, 11]
        .into_iter()
        .flat_map(|n| [true, false].map(|l| (n, l)))
        .flat_map(|(n, l)| (0..32u32).map(move |m| (n, l, m)))
    {
        let has = |i: u32| mask & (1 << i) != 0;
        let a1 = dual(&[4, 6], k, 10, has(0));
        let w1 = dual(&[6, n], k, 11, has(1));
        let a2 = dual(&[4, 2], k, 12, has(2));
        let w2 = dual(&[2, n], k, 13, has(3));
        let b = dual(&[n], k, 14, has(4));
        let x = dual(&[4, n], k, 15, true);
        let cpu = c
            .linear(
                leak.then_some((&x, 0.8)),
                0.2,
                &[(&a1, &w1), (&a2, &w2)],
                Some(&b),
            )
            .unwrap();
        let gpu = on_gpu(&mut g, &[&a1, &w1, &a2, &w2, &b, &x], |g, v| {
            Ops::<f32>::linear(
                g,
                leak.then_some((&v[5], 0.8)),
                0.2,
                &[(&v[0], &v[1]), (&v[2], &v[3])],
                Some(&v[4]),
            )
        });
        same(
            &cpu,
            &gpu,
            &format!("linear n = {n}, leak {leak}, tangent mask {mask:05b}"),
        );
    }
    // binary ops: equal shapes on the device with either tangent absent, and
    // a broadcasting one through the host
    for op in [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div] {
        for mask in 1..4u32 {
            let a = dual(&[5, 3], k, 30, mask & 1 != 0);
            let b0 = dual(&[5, 3], k, 31, mask & 2 != 0);
            // keep divisors away from zero
            let b = Dual {
                primal: b0.primal.map(|v| v.abs() + 0.5),
                tangent: b0.tangent,
            };
            let cpu = c.binary(&a, &b, op).unwrap();
            let gpu = on_gpu(&mut g, &[&a, &b], |g, v| {
                Ops::<f32>::binary(g, &v[0], &v[1], op)
            });
            same(&cpu, &gpu, &format!("{op:?}, tangent mask {mask:02b}"));
        }
        let col = dual(&[5, 1], k, 32, true);
        let row = Dual {
            primal: dual(&[3], k, 33, false).primal.map(|v| v.abs() + 0.5),
            tangent: None,
        };
        let cpu = c.binary(&col, &row, op).unwrap();
        let gpu = on_gpu(&mut g, &[&col, &row], |g, v| {
            Ops::<f32>::binary(g, &v[0], &v[1], op)
        });
        same(&cpu, &gpu, &format!("{op:?} broadcasting"));
    }
    // concat along the last axis on the device (a piece without tangents
    // among them), along the first through the host
    for mask in 0..8u32 {
        let p1 = dual(&[4, 2], k, 40, mask & 1 != 0);
        let p2 = dual(&[4, 1], k, 41, mask & 2 != 0);
        let p3 = dual(&[4, 3], k, 42, mask & 4 != 0);
        let cpu = c.concat(&[&p1, &p2, &p3], 1).unwrap();
        let gpu = on_gpu(&mut g, &[&p1, &p2, &p3], |g, v| {
            Ops::<f32>::concat(g, &[&v[0], &v[1], &v[2]], 1)
        });
        same(
            &cpu,
            &gpu,
            &format!("concat last axis, tangent mask {mask:03b}"),
        );
    }
    let p1 = dual(&[2, 3], k, 43, true);
    let p2 = dual(&[4, 3], k, 44, false);
    let cpu = c.concat(&[&p1, &p2], 0).unwrap();
    let gpu = on_gpu(&mut g, &[&p1, &p2], |g, v| {
        Ops::<f32>::concat(g, &[&v[0], &v[1]], 0)
    });
    same(&cpu, &gpu, "concat first axis");
    // rank-2 transpose, row broadcast, and ops computed on the host
    let w = dual(&[5, 8], k, 20, true);
    let v = dual(&[8], k, 21, true);
    let y = dual(&[8, 2], k, 22, true);
    let b = on_gpu(&mut g, &[&w], |g, v| Ops::<f32>::transpose(g, &v[0], 0, 1));
    same(&c.transpose(&w, 0, 1).unwrap(), &b, "transpose");
    let b = on_gpu(&mut g, &[&v], |g, v| {
        Ops::<f32>::broadcast_to(g, &v[0], &[3, 8])
    });
    same(&c.broadcast_to(&v, &[3, 8]).unwrap(), &b, "broadcast_to");
    // reshapes: on the device where the last axis stays, through the host
    // where it does not
    for (from, to) in [
        (vec![1, 8], vec![8]),
        (vec![8], vec![1, 1, 8]),
        (vec![2, 3, 4], vec![6, 4]),
        (vec![6, 4], vec![2, 12]),
    ] {
        for tangents in [true, false] {
            let x = dual(&from, k, 24, tangents);
            let b = on_gpu(&mut g, &[&x], |g, v| Ops::<f32>::reshape(g, &v[0], &to));
            let what = format!("reshape {from:?} → {to:?}, tangents {tangents}");
            same(&c.reshape(&x, &to).unwrap(), &b, &what);
        }
    }
    // slices on the device: every axis of ranks 1 to 3, with and without
    // tangents (K sits before the last axis: the last axis is the odd one)
    for (shape, axis, start, len) in [
        (vec![8], 0, 2, 5),
        (vec![5, 8], 0, 1, 3),
        (vec![5, 8], 1, 2, 3),
        (vec![3, 4, 5], 0, 2, 1),
        (vec![3, 4, 5], 1, 1, 2),
        (vec![3, 4, 5], 2, 0, 4),
    ] {
        for tangents in [true, false] {
            let x = dual(&shape, k, 23, tangents);
            let b = on_gpu(&mut g, &[&x], |g, v| {
                Ops::<f32>::slice(g, &v[0], axis, start, len)
            });
            let what = format!("slice {shape:?} axis {axis}, tangents {tangents}");
            same(&c.slice(&x, axis, start, len).unwrap(), &b, &what);
        }
    }
    // pointwise programs in one kernel: the arm's step on a state with and
    // without tangents (a trial's start) under torques with and without, its
    // hand; a program of more registers than the kernel holds, op by op
    let arm = TwoJointArm::li_todorov();
    let (step, hand) = (arm.step_program().unwrap(), arm.hand_program().unwrap());
    for mask in 0..4u32 {
        let state = dual(&[6, 4], k, 50, mask & 1 != 0);
        let tau = dual(&[6, 2], k, 51, mask & 2 != 0);
        let cpu = c.pointwise(&step, &[&state, &tau]).unwrap();
        let gpu = on_gpu(&mut g, &[&state, &tau], |g, v| {
            Ops::<f32>::pointwise(g, &step, &[&v[0], &v[1]])
        });
        same(&cpu, &gpu, &format!("arm step, tangent mask {mask:02b}"));
        let cpu = c.pointwise(&hand, &[&state]).unwrap();
        let gpu = on_gpu(&mut g, &[&state], |g, v| {
            Ops::<f32>::pointwise(g, &hand, &[&v[0]])
        });
        same(&cpu, &gpu, &format!("arm hand, tangent mask {mask:02b}"));
    }
    let long = sofo_ad::Pointwise::record::<sofo_tensor::TensorError>(2, |rec, r| {
        let mut x = r[0];
        for _ in 0..70 {
            x = Ops::<f32>::mul(rec, &x, &r[1])?;
            x = Ops::<f32>::add_scalar(rec, &x, 0.1)?;
        }
        Ok(vec![x, r[1]])
    })
    .unwrap();
    assert!(long.registers() > sofo_tensor::cuda::CudaDevice::PW_REGS);
    let (a, b) = (dual(&[3, 2], k, 52, true), dual(&[3, 2], k, 53, true));
    let b = Dual {
        primal: b.primal.map(|v| v.tanh()),
        tangent: b.tangent,
    };
    let cpu = c.pointwise(&long, &[&a, &b]).unwrap();
    let gpu = on_gpu(&mut g, &[&a, &b], |g, v| {
        Ops::<f32>::pointwise(g, &long, &[&v[0], &v[1]])
    });
    same(&cpu, &gpu, "a program over the kernel's registers");
    // the device refuses words that would read outside the registers, and
    // tangents of an input that has none
    let x = g.upload(&dual(&[3, 2], k, 54, false)).unwrap().primal;
    let dev = g.device().clone();
    let run = |words: &[u32], inputs: usize, steps: usize, tmask: u64| {
        let prog = ProgramWords {
            words,
            inputs,
            steps,
        };
        dev.pointwise(prog, &[(&x, None)], 1, k, tmask, tmask != 0)
            .map(|_| ())
    };
    assert!(
        run(&[32, 0, 1, 0, 2], 2, 1, 0).is_ok(),
        "x0 + x1, out: register 2"
    );
    for (words, inputs, steps, tmask, what) in [
        (&[32, 0, 2, 0, 2][..], 2, 1, 0, "a step reading itself"),
        (
            &[32, 0, 1, 0, 3][..],
            2,
            1,
            0,
            "an output past the registers",
        ),
        (&[32, 0, 1, 0][..], 2, 1, 0, "no output"),
        (&[32, 0, 1][..], 2, 1, 0, "a step cut short"),
        (
            &[32, 0, 1, 0, 2][..],
            3,
            1,
            0,
            "three inputs from two columns",
        ),
        (
            &[32, 0, 1, 0, 2][..],
            2,
            1,
            0b010,
            "tangents of an input without",
        ),
    ] {
        assert!(run(words, inputs, steps, tmask).is_err(), "{what}");
    }
    // 64 registers are the most: 2 inputs and 62 steps run, 63 steps not
    let many = |steps: u32| -> Vec<u32> {
        (0..steps)
            .flat_map(|s| [0, s, 0, 0])
            .chain([steps + 1])
            .collect()
    };
    let most = many(62);
    assert!(run(&most, 2, 62, 0).is_ok(), "64 registers");
    assert!(run(&many(63), 2, 63, 0).is_err(), "65 registers");
    assert!(
        run(&most[..4 * 62], 2, 62, 0).is_err(),
        "no output after 62 steps"
    );
    let b = on_gpu(&mut g, &[&w], |g, v| Ops::<f32>::softmax(g, &v[0]));
    same(&c.softmax(&w).unwrap(), &b, "softmax");
    let b = on_gpu(&mut g, &[&w, &y], |g, v| {
        Ops::<f32>::matmul(g, &v[0], &v[1])
    });
    same(&c.matmul(&w, &y).unwrap(), &b, "matmul");
}

/// A linear op with a dense term (inner dimension over `SMALL_TERM`: a
/// recurrence's r·W) gives the CPU's numbers through the fused
/// `linear_dense` kernel and through `linear_init` and the GEMMs: every
/// tangent present or not (the dense term's a and w, the input term's w, the
/// bias, the leak), with a leak and without, with a term whose input has
/// tangents (a plant's state) after the input term (added by a launch of its
/// own) or before it (folded into the first launch, the input term added),
/// on shapes that leave partial tiles and reduction chunks (130 rows and 67
/// columns: 3 × 2 tiles; inner 37; 66 rows and 68 columns, whose tangent
/// rows the kernel writes as float4, 4 columns in the second tile), and
/// without any tangents (only the value's blocks).
#[test]
fn dense_linear_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("dense_linear_agrees_with_the_cpu") else {
        return;
    };
    let k = 3;
    let mut c = Fwd::new(k);
    let mut g = CudaFwd::new(dev.clone(), k);
    for dense in [DenseLinear::Fused, DenseLinear::Gemm] {
        dev.set_dense_linear(dense);
        // (n = 68: the tangents' rows written as float4, a partial tile)
        for (rows, kd, n) in [(130, 37, 67), (5, 20, 11), (66, 9, 68)] {
            // plant: 0 none, 1 after the input term, 2 before it
            for (leak, plant, mask) in [true, false]
                .into_iter()
                .flat_map(|l| [0, 1, 2].map(|p| (l, p)))
                .flat_map(|(l, p)| (0..32u32).map(move |m| (l, p, m)))
            {
                // the cases with a plant term: every tangent, or none
                if plant > 0 && mask != 0 && mask != 31 {
                    continue;
                }
                let has = |i: u32| mask & (1 << i) != 0;
                let a = dual(&[rows, kd], k, 50, has(0));
                let w = dual(&[kd, n], k, 51, has(1));
                let u = dual(&[rows, 3], k, 52, false);
                let wu = dual(&[3, n], k, 53, has(2));
                let b = dual(&[n], k, 54, has(3));
                let x = dual(&[rows, n], k, 55, has(4));
                let s = dual(&[rows, 2], k, 56, mask != 0);
                let ws = dual(&[2, n], k, 57, false);
                let mut terms = vec![(&a, &w), (&u, &wu)];
                match plant {
                    1 => terms.push((&s, &ws)),
                    2 => terms.insert(1, (&s, &ws)),
                    _ => {}
                }
                let cpu = c
                    .linear(leak.then_some((&x, 0.8)), 0.2, &terms, Some(&b))
                    .unwrap();
                let gpu = on_gpu(&mut g, &[&a, &w, &u, &wu, &b, &x, &s, &ws], |g, v| {
                    let mut terms = vec![(&v[0], &v[1]), (&v[2], &v[3])];
                    match plant {
                        1 => terms.push((&v[6], &v[7])),
                        2 => terms.insert(1, (&v[6], &v[7])),
                        _ => {}
                    }
                    Ops::<f32>::linear(g, leak.then_some((&v[5], 0.8)), 0.2, &terms, Some(&v[4]))
                });
                same(
                    &cpu,
                    &gpu,
                    &format!(
                        "{dense:?} linear [{rows}, {kd}] · [{kd}, {n}], leak {leak}, \
                         plant {plant}, tangent mask {mask:05b}"
                    ),
                );
            }
        }
    }
    dev.set_dense_linear(DenseLinear::Auto);
}

/// In TF32 mode `linear_dense` multiplies on the tensor cores
/// (`linear_dense_tf32`: mma.sync m16n8k8, which the fake GPU emulates
/// from the PTX ISA's fragment layout, so that the kernel's own fragment
/// loads are checked): close to the CPU's f32 numbers (inputs rounded to 10
/// mantissa bits: about 1e-3, where a fragment in the wrong place is off by
/// the whole value) on partial tiles and reduction chunks, every tangent
/// present or not, with the leak and the input term, a rate function read
/// from x (tanh) and one applied to the output (relu) — and not the f32
/// kernel's numbers: TF32 took effect.
#[test]
fn dense_linear_tf32_is_close_to_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("dense_linear_tf32_is_close_to_the_cpu") else {
        return;
    };
    let k = 3;
    let mut c = Fwd::new(k);
    let mut g = CudaFwd::new(dev.clone(), k);
    dev.set_dense_linear(DenseLinear::Fused);
    for (rows, kd, n) in [(130, 37, 67), (66, 9, 68)] {
        for (mask, form) in (0..32u32).flat_map(|m| [0, 1, 2].map(|f| (m, f))) {
            // form 0: linear; 1: linear_of_unary (tanh of a); 2:
            // unary_of_linear (relu of the affine map); every mask for the
            // first shape's linear, none or all tangents elsewhere
            if (rows != 130 || form != 0) && mask != 0 && mask != 31 {
                continue;
            }
            let has = |i: u32| mask & (1 << i) != 0;
            let a = dual(&[rows, kd], k, 80, has(0));
            let w = dual(&[kd, n], k, 81, has(1));
            let u = dual(&[rows, 3], k, 82, false);
            let wu = dual(&[3, n], k, 83, has(2));
            let b = dual(&[n], k, 84, has(3));
            let x = dual(&[rows, n], k, 85, has(4));
            let cpu = match form {
                0 => c.linear(Some((&x, 0.8)), 0.2, &[(&a, &w), (&u, &wu)], Some(&b)),
                1 => c.linear_of_unary(
                    Some((&x, 0.8)),
                    0.2,
                    (&a, Unary::Tanh, None, &w),
                    &[(&u, &wu)],
                    Some(&b),
                ),
                _ => c.unary_of_linear(
                    Some((&x, 0.8)),
                    0.2,
                    Unary::Relu,
                    &[(&a, &w), (&u, &wu)],
                    Some(&b),
                ),
            }
            .unwrap();
            let mut run = |tf32: bool| {
                dev.set_tf32(tf32).unwrap();
                on_gpu(&mut g, &[&a, &w, &u, &wu, &b, &x], |g, v| {
                    let leak = Some((&v[5], 0.8f32));
                    match form {
                        0 => Ops::<f32>::linear(
                            g,
                            leak,
                            0.2,
                            &[(&v[0], &v[1]), (&v[2], &v[3])],
                            Some(&v[4]),
                        ),
                        1 => g.linear_of_unary(
                            leak,
                            0.2,
                            (&v[0], Unary::Tanh, None, &v[1]),
                            &[(&v[2], &v[3])],
                            Some(&v[4]),
                        ),
                        _ => g.unary_of_linear(
                            leak,
                            0.2,
                            Unary::Relu,
                            &[(&v[0], &v[1]), (&v[2], &v[3])],
                            Some(&v[4]),
                        ),
                    }
                })
            };
            let (tf32, f32) = (run(true), run(false));
            let what = format!("form {form}, [{rows}, {kd}] · [{kd}, {n}], mask {mask:05b}");
            close(&cpu, &tf32, 1e-2, &format!("TF32 {what}"));
            same(&cpu, &f32, &format!("f32 {what}"));
            let d = close(&f32, &tf32, 1e-2, &what);
            assert!(
                d > 1e-6,
                "{what}: the TF32 numbers are the f32 ones ({d:e})"
            );
        }
    }
    dev.set_tf32(false).unwrap();
    dev.set_dense_linear(DenseLinear::Auto);
}

/// `linear_of_unary` (a linear op of φ(x), φ′(x) ⊙ ẋ read from x by the
/// kernel) gives the CPU's numbers — the default there, `unary` then
/// `linear` — through each path: the narrow kernel (3 output columns), the
/// fused dense kernel (with an input term, a leak, a partial tile), and the
/// fallback where the kernel cannot read f(x) (the dense term on cuBLAS; a
/// second dense term; a factor with tangents), every tangent of x and w
/// present or not, without a factor and with a constant one (the rates'
/// noise: f(x) ⊙ c), for the four rate functions the kernels apply (tanh,
/// relu, softplus, sigmoid) — and exp, which they do not (unary then
/// linear).
#[test]
fn linear_of_unary_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("linear_of_unary_agrees_with_the_cpu") else {
        return;
    };
    let k = 3;
    let mut c = Fwd::new(k);
    let mut g = CudaFwd::new(dev.clone(), k);
    // the engine reads x where a kernel does — a readout, a dense term the
    // fused kernel takes — not where cuBLAS does (f(x) is stored for the
    // GEMMs there anyway, and the model computes it once for both reads)
    assert!(Ops::<f32>::fuses_unary_into_linear(&g, 400, 3));
    assert!(Ops::<f32>::fuses_unary_into_linear(&g, 64, 64));
    assert!(!Ops::<f32>::fuses_unary_into_linear(&g, 100, 100));
    assert!(!Ops::<f32>::fuses_unary_into_linear(&g, 400, 400));
    dev.set_dense_linear(DenseLinear::Fused);
    assert!(Ops::<f32>::fuses_unary_into_linear(&g, 400, 400));
    dev.set_dense_linear(DenseLinear::Auto);
    let (rows, kd) = (70, 21);
    for (dense, n, second) in [
        (DenseLinear::Auto, 3, false),
        (DenseLinear::Auto, 67, false),
        (DenseLinear::Gemm, 67, false),
        (DenseLinear::Auto, 67, true),
    ] {
        dev.set_dense_linear(dense);
        for (op, mask, leak) in [
            Unary::Tanh,
            Unary::Relu,
            Unary::Softplus,
            Unary::Sigmoid,
            Unary::Exp,
        ]
        .into_iter()
        .flat_map(|op| (0..12u32).map(move |m| (op, m)))
        .flat_map(|(op, m)| [false, true].map(|l| (op, m, l)))
        {
            // bits 0, 1: x's and w's tangents; 2–3: no factor, a constant
            // one, one with tangents
            let factor = mask >> 2;
            let x = dual(&[rows, kd], k, 60, mask & 1 != 0);
            let w = dual(&[kd, n], k, 61, mask & 2 != 0);
            let u = dual(&[rows, 2], k, 62, false);
            let wu = dual(&[2, n], k, 63, true);
            let a2 = dual(&[rows, 12], k, 64, true);
            let w2 = dual(&[12, n], k, 65, true);
            let b = dual(&[n], k, 66, true);
            let l = dual(&[rows, n], k, 67, true);
            let cf = dual(&[rows, kd], k, 68, factor == 2);
            let mut rest = vec![(&u, &wu)];
            if second {
                rest.push((&a2, &w2));
            }
            let leak_of = |l| leak.then_some((l, 0.9f32));
            let first = (&x, op, (factor > 0).then_some(&cf), &w);
            let cpu = c
                .linear_of_unary(leak_of(&l), 0.1, first, &rest, Some(&b))
                .unwrap();
            let gpu = on_gpu(&mut g, &[&x, &w, &u, &wu, &a2, &w2, &b, &l, &cf], |g, v| {
                let mut rest = vec![(&v[2], &v[3])];
                if second {
                    rest.push((&v[4], &v[5]));
                }
                let leak = leak.then_some((&v[7], 0.9f32));
                let first = (&v[0], op, (factor > 0).then_some(&v[8]), &v[1]);
                g.linear_of_unary(leak, 0.1, first, &rest, Some(&v[6]))
            });
            same(
                &cpu,
                &gpu,
                &format!(
                    "{dense:?} {op:?}(x [{rows}, {kd}]) · [{kd}, {n}], second dense term \
                     {second}, leak {leak}, mask {mask:04b}"
                ),
            );
        }
    }
    dev.set_dense_linear(DenseLinear::Auto);
}

/// `unary_of_linear` (f of a linear op, the leak outside f) gives the
/// CPU's numbers — the default there, `linear`, `unary`, `mul_scalar` and
/// `add` — through each path: `linear_dense` applying f, f′ and the leak in
/// its two launches (an input term folded in, partial tiles and reduction
/// chunk: 130 rows and 67 columns, inner 37), without any tangents (the
/// value's launch alone), and the fallbacks op by op (the dense term on
/// cuBLAS; a plant term with tangents, added after the kernel, with 68
/// columns, whose tangent rows the kernel writes as float4; a narrow
/// output; exp, not a rate function), every tangent of the dense term, the
/// input's weights, the bias and the leak's x present or not, for relu,
/// tanh, softplus, sigmoid and exp.
#[test]
fn unary_of_linear_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("unary_of_linear_agrees_with_the_cpu") else {
        return;
    };
    let k = 3;
    let mut c = Fwd::new(k);
    let mut g = CudaFwd::new(dev.clone(), k);
    let (rows, kd) = (130, 37);
    for (dense, n, plant) in [
        (DenseLinear::Fused, 67, false),
        (DenseLinear::Gemm, 67, false),
        // (n = 68: the tangents' rows written as float4)
        (DenseLinear::Fused, 68, true),
        (DenseLinear::Fused, 3, false),
    ] {
        dev.set_dense_linear(dense);
        for (op, mask, leak) in [
            Unary::Relu,
            Unary::Tanh,
            Unary::Softplus,
            Unary::Sigmoid,
            Unary::Exp,
        ]
        .into_iter()
        .flat_map(|op| (0..32u32).map(move |m| (op, m)))
        .flat_map(|(op, m)| [false, true].map(|l| (op, m, l)))
        {
            // every mask for relu on the fused path, a few elsewhere
            let fused = dense == DenseLinear::Fused && n > 8 && !plant && op != Unary::Exp;
            let every_mask = fused && op == Unary::Relu;
            if !every_mask && ![0, 5, 26, 31].contains(&mask) {
                continue;
            }
            let has = |i: u32| mask & (1 << i) != 0;
            let a = dual(&[rows, kd], k, 70, has(0));
            let w = dual(&[kd, n], k, 71, has(1));
            let u = dual(&[rows, 2], k, 72, false);
            let wu = dual(&[2, n], k, 73, has(2));
            let b = dual(&[n], k, 74, has(3));
            let x = dual(&[rows, n], k, 75, has(4));
            let s = dual(&[rows, 2], k, 76, true);
            let ws = dual(&[2, n], k, 77, false);
            let mut terms = vec![(&a, &w), (&u, &wu)];
            if plant {
                terms.push((&s, &ws));
            }
            let cpu = c
                .unary_of_linear(leak.then_some((&x, 0.75)), 0.25, op, &terms, Some(&b))
                .unwrap();
            let before = fake_gpu_counts();
            let gpu = on_gpu(&mut g, &[&a, &w, &u, &wu, &b, &x, &s, &ws], |g, v| {
                let mut terms = vec![(&v[0], &v[1]), (&v[2], &v[3])];
                if plant {
                    terms.push((&v[6], &v[7]));
                }
                let leak = leak.then_some((&v[5], 0.75f32));
                g.unary_of_linear(leak, 0.25, op, &terms, Some(&v[4]))
            });
            if let (true, Some(b), Some(a)) = (fused, before, fake_gpu_counts()) {
                // the value's launch, and the tangents' where there are any
                let tangents = mask & 0b1111 != 0 || (leak && has(4));
                assert_eq!(
                    a[0] - b[0],
                    1 + tangents as u64,
                    "launches, mask {mask:05b}"
                );
            }
            same(
                &cpu,
                &gpu,
                &format!(
                    "{dense:?} {op:?}([{rows}, {kd}] · [{kd}, {n}]), plant {plant}, \
                     leak {leak}, mask {mask:05b}"
                ),
            );
        }
    }
    dev.set_dense_linear(DenseLinear::Auto);
}

fn rnn_case(act: Activation) -> (RateRnn, ParamSet<f32>, Batch<f32>) {
    let model = RateRnn {
        n: 48,
        inputs: 3,
        outputs: 2,
        alpha: 0.1,
        activation: act,
        learn_x0: true,
        gain: 1.1,
    };
    let mut params: ParamSet<f32> = model.init(4).unwrap();
    params.get_mut("x0").unwrap().value = randn(&[48], 9, 0).scale(0.3);
    let (t, m) = (40, 24);
    let mut w = Tensor::<f32>::zeros(&[t, m]);
    for (i, v) in w.data_mut().iter_mut().enumerate() {
        *v = if i < 5 * m { 0.0 } else { 1.0 + (i % 2) as f32 };
    }
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(randn(&[t, m, 3], 5, 1)),
        initial: None,
        targets: randn(&[t, m, 2], 5, 2),
        weights: Some(w),
        loss_norm: (t * m * 2) as f64,
        noise_seed: 0,
    };
    (model, params, batch)
}

/// The Lorenz model (H = 64) on 32 short Lorenz windows.
fn lorenz_case() -> (LorenzModel, ParamSet<f32>, Batch<f32>) {
    let task = LorenzTask {
        data: LorenzData::generate(1, 100, 20, 32, 0.01).unwrap(),
    };
    let model = LorenzModel { hidden: 64 };
    let params = Model::<f32>::init(&model, 0).unwrap();
    let batch = Task::<f32>::train_batch(&task, 0, 0, 32).unwrap();
    (model, params, batch)
}

/// A short single reach (T = 120 at 10 ms) with a small network: the
/// plant's columns, sin/cos, divisions and the seeded rate noise.
fn reach_case() -> (ReachRnn, ParamSet<f32>, Batch<f32>) {
    let task = ReachTask {
        steps: 120,
        dt: 0.01,
        go_min: 0.1,
        go_jitter: 0.1,
        arm: TwoJointArm {
            dt: 0.01,
            ..TwoJointArm::li_todorov()
        },
        ..ReachTask::single()
    };
    let model = ReachRnn {
        n: 32,
        alpha: 0.2,
        arm: task.arm.clone(),
        ..ReachRnn::paper(task.inputs())
    };
    let params = Model::<f32>::init(&model, 0).unwrap();
    let batch = Task::<f32>::train_batch(&task, 0, 0, 16).unwrap();
    (model, params, batch)
}

fn check_sketch_and_step<M: Model<f32>>(
    dev: Device,
    model: &M,
    params: &ParamSet<f32>,
    batch: &Batch<f32>,
    what: &str,
) {
    let cfg = SofoConfig {
        k: 16,
        damping: Damping::RelativeLargest(1e-3),
        ..SofoConfig::default()
    };
    let cpu = Sofo::new(cfg.clone()).unwrap();
    let gpu = Sofo::new(cfg).unwrap().on(dev);
    let tg = cpu.sample_tangents(params, 3, 0).unwrap();
    let a = cpu.sketch(model, params, &tg, batch).unwrap();
    let b = gpu.sketch(model, params, &tg, batch).unwrap();
    let relv = |x: &[f64], y: &[f64]| {
        let s = x.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()));
        x.iter().zip(y).fold(0.0f64, |m, (p, q)| worse(m, p - q)) / s
    };
    // f32 forward passes over T steps: agreement to about 1e-5 relative
    assert!(
        (a.loss - b.loss).abs() <= 1e-5 * a.loss.abs(),
        "{what}: loss {} vs {}",
        a.loss,
        b.loss
    );
    let dc = relv(&a.c, &b.c);
    let dg = relv(&a.g, &b.g);
    assert!(dc < 1e-4, "{what}: C differs by {dc:e}");
    assert!(dg < 1e-4, "{what}: G̃ differs by {dg:e}");
    let pa = cpu.propose(params, &tg, &a).unwrap();
    let pb = gpu.propose(params, &tg, &b).unwrap();
    let sa: Vec<f32> = pa
        .step
        .iter()
        .flatten()
        .flat_map(|t| t.data().to_vec())
        .collect();
    let sb: Vec<f32> = pb
        .step
        .iter()
        .flatten()
        .flat_map(|t| t.data().to_vec())
        .collect();
    let ds = rel(&sa, &sb);
    assert!(ds < 1e-3, "{what}: SOFO step differs by {ds:e}");
    eprintln!(
        "{what}: loss {:e}, C {dc:.1e}, G̃ {dg:.1e}, step {ds:.1e} (relative differences)",
        a.loss
    );
}

#[test]
fn rate_rnn_sketch_and_step_agree() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("rate_rnn_sketch_and_step_agree") else {
        return;
    };
    for act in [Activation::Tanh, Activation::Relu, Activation::Softplus] {
        let (model, params, batch) = rnn_case(act);
        check_sketch_and_step(
            Device::Cuda(dev.clone()),
            &model,
            &params,
            &batch,
            act.name(),
        );
    }
    // with the dense terms on cuBLAS the model computes φ(x) once for the
    // recurrence and the readout (the engine does not read x there)
    dev.set_dense_linear(DenseLinear::Gemm);
    let (model, params, batch) = rnn_case(Activation::Tanh);
    let dev_cuda = Device::Cuda(dev.clone());
    check_sketch_and_step(
        dev_cuda,
        &model,
        &params,
        &batch,
        "tanh, dense terms on cuBLAS",
    );
    dev.set_dense_linear(DenseLinear::Auto);
}

#[test]
fn lorenz_sketch_and_step_agree() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("lorenz_sketch_and_step_agree") else {
        return;
    };
    let (model, params, batch) = lorenz_case();
    check_sketch_and_step(Device::Cuda(dev), &model, &params, &batch, "lorenz");
}

#[test]
fn kalman_network_sketch_and_step_agree() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("kalman_network_sketch_and_step_agree") else {
        return;
    };
    let model = LeakyRnn::kalman(24);
    let params = Model::<f32>::init(&model, 0).unwrap();
    let batch = Task::<f32>::train_batch(&KalmanTask::new(200), 0, 0, 16).unwrap();
    check_sketch_and_step(Device::Cuda(dev), &model, &params, &batch, "kalman");
}

#[test]
fn reach_network_with_the_arm_agrees() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("reach_network_with_the_arm_agrees") else {
        return;
    };
    let (model, params, batch) = reach_case();
    check_sketch_and_step(Device::Cuda(dev), &model, &params, &batch, "reach");
}

#[test]
fn gpu_training_is_deterministic_and_learns() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("gpu_training_is_deterministic_and_learns") else {
        return;
    };
    let (model, params0, batch) = rnn_case(Activation::Tanh);
    let cpu_loss = sofo::train::evaluate(&model, &params0, &batch).unwrap();
    let run = || {
        let mut params = params0.clone();
        let s = Sofo::new(SofoConfig {
            k: 32,
            lr: 0.5,
            damping: Damping::RelativeLargest(1e-3),
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev.clone()));
        let losses = (0..10)
            .map(|it| s.step(&model, &mut params, &batch, 1, it).unwrap().loss)
            .collect::<Vec<f64>>();
        (losses, params)
    };
    let (a, pa) = run();
    let (b, pb) = run();
    assert_eq!(a, b, "same seed, same GPU: same losses");
    for (x, y) in pa.iter().zip(pb.iter()) {
        assert_eq!(
            x.value.to_f64_vec(),
            y.value.to_f64_vec(),
            "same seed, same GPU: same `{}`",
            x.name
        );
    }
    // the first loss is the CPU's at the same parameters
    assert!(
        (a[0] - cpu_loss).abs() < 1e-5 * cpu_loss,
        "{} vs {cpu_loss}",
        a[0]
    );
    // random targets: 10 steps in K = 32 of P = 2642 directions remove ~10 %
    // of the loss (observed 14 % on an H200)
    assert!(a[9] < 0.95 * a[0], "loss {} → {}", a[0], a[9]);
}

/// A pass from inputs uploaded beforehand (`Device::pass_inputs`, what
/// `sofo bench --method pass` times) gives `Device::pass`'s sketch bit for
/// bit, and inputs made for another device are refused by name.
#[test]
fn pass_inputs_belong_to_their_device() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("pass_inputs_belong_to_their_device") else {
        return;
    };
    let (model, params, batch) = rnn_case(Activation::Tanh);
    let k = 4;
    let duals = || -> Vec<Dual<f32>> {
        params
            .iter()
            .enumerate()
            .map(|(i, p)| Dual {
                primal: p.value.clone(),
                tangent: Some(randn(&tangent_shape(p.value.shape(), k), 60, i as u64)),
            })
            .collect()
    };
    let gpu = Device::Cuda(dev.clone());
    let direct = gpu.pass(&model, k, duals(), &batch).unwrap();
    let inputs = gpu.pass_inputs(duals()).unwrap();
    let uploaded = gpu.pass_with(&model, k, inputs, &batch).unwrap();
    assert_eq!(direct.loss.to_bits(), uploaded.loss.to_bits());
    assert_eq!(direct.c, uploaded.c);
    assert_eq!(direct.g, uploaded.g);
    let host = Device::Cpu.pass_inputs(duals()).unwrap();
    let e = gpu
        .pass_with(&model, k, host, &batch)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("pass inputs") && e.contains("another device"),
        "{e}"
    );
}

/// The phases of SOFO iterations on the device (`Sofo::time_phases`, each
/// phase ended by a device synchronisation): counted per iteration while
/// on, each one's time positive and all three within the iterations' wall
/// time, nothing added while off, reset when turned on again — and the
/// iterations' numbers are those of untimed ones, bit for bit.
#[test]
fn sofo_phases_add_up_to_the_iterations() {
    use sofo::optim::SofoPhases;
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("sofo_phases_add_up_to_the_iterations") else {
        return;
    };
    let (model, params0, batch) = rnn_case(Activation::Tanh);
    let sofo = Sofo::new(SofoConfig {
        k: 8,
        ..SofoConfig::default()
    })
    .unwrap()
    .on(Device::Cuda(dev.clone()));
    let run = |timed: bool| {
        sofo.time_phases(timed);
        let mut params = params0.clone();
        let t0 = std::time::Instant::now();
        let losses: Vec<f64> = (0..2)
            .map(|it| sofo.step(&model, &mut params, &batch, 1, it).unwrap().loss)
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        sofo.time_phases(false);
        (losses, params, wall)
    };
    let (plain, plain_params, _) = run(false);
    assert_eq!(sofo.phases().iterations, 0, "timed while off");
    let (timed, timed_params, wall) = run(true);
    let p = sofo.phases();
    assert_eq!(p.iterations, 2);
    assert!(p.draw_s > 0.0 && p.pass_s > 0.0 && p.step_s > 0.0, "{p:?}");
    assert!(p.draw_s + p.pass_s + p.step_s <= wall, "{p:?} in {wall} s");
    assert_eq!(plain, timed, "timing changed the losses");
    for (x, y) in plain_params.iter().zip(timed_params.iter()) {
        assert_eq!(x.value.to_f64_vec(), y.value.to_f64_vec(), "`{}`", x.name);
    }
    // off: nothing more is added; on again: from zero
    let mut params = params0.clone();
    sofo.step(&model, &mut params, &batch, 1, 0).unwrap();
    assert_eq!(sofo.phases(), p);
    sofo.time_phases(true);
    assert_eq!(sofo.phases(), SofoPhases::default());
}

/// SOFO iterations whose pass runs as a CUDA graph (recorded, captured,
/// then replayed with new parameters, directions and data each time) give
/// the numbers of the same iterations run call by call, bit for bit. A pass
/// that differs from the graph's (weights or not, another T) runs call by
/// call and is recorded anew; one that reads the device on the host mid-way
/// (a loss sketched on the host) is never captured.
/// Three SOFO iterations of `model` on `batch` with CUDA graphs on: the
/// second is captured and the third replayed (no device read on the host
/// inside the pass), with the losses and weights of direct runs, bit for bit.
fn captures_and_replays<M: Model<f32>>(
    model: &M,
    params: &ParamSet<f32>,
    batch: &Batch<f32>,
    what: &str,
) {
    // a device of its own: no graph of another model's pass
    let dev = &device_or_skip(what).expect("a device");
    let run = |graphs: bool| {
        dev.set_graphs(graphs);
        let before = sofo::cuda::sofo_graph_stats(dev);
        let mut p = params.clone();
        let s = Sofo::new(SofoConfig {
            k: 6,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev.clone()));
        let losses: Vec<f64> = (0..3)
            .map(|it| s.step(model, &mut p, batch, 1, it).unwrap().loss)
            .collect();
        let after = sofo::cuda::sofo_graph_stats(dev);
        let ran = [
            after.direct - before.direct,
            after.captured - before.captured,
            after.replayed - before.replayed,
            after.fallbacks - before.fallbacks,
        ];
        (losses, p, ran)
    };
    let (la, pa, graphed) = run(true);
    let (lb, pb, _) = run(false);
    assert_eq!(
        graphed,
        [1, 1, 1, 0],
        "{what}: recorded, captured, replayed"
    );
    same_runs((&la, &pa), (&lb, &pb), what);
}

/// Two runs' losses and final weights, bit for bit (with graphs, without).
fn same_runs(a: (&[f64], &ParamSet<f32>), b: (&[f64], &ParamSet<f32>), what: &str) {
    assert_eq!(a.0, b.0, "{what}: losses with and without graphs");
    for (x, y) in a.1.iter().zip(b.1.iter()) {
        assert_eq!(
            x.value.to_f64_vec(),
            y.value.to_f64_vec(),
            "{what}: `{}` with and without graphs",
            x.name
        );
    }
}

/// The task networks' passes run as CUDA graphs: none of them reads the
/// device on the host (a slice in `prepare` once did, for the reach
/// network), and each replay equals its direct run.
#[test]
fn task_networks_run_as_graphs() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("task_networks_run_as_graphs") else {
        return;
    };
    let (model, params, batch) = rnn_case(Activation::Tanh);
    drop(dev);
    captures_and_replays(&model, &params, &batch, "rate RNN");
    let (model, params, batch) = lorenz_case();
    captures_and_replays(&model, &params, &batch, "lorenz");
    let model = LeakyRnn::kalman(24);
    let params = Model::<f32>::init(&model, 0).unwrap();
    let batch = Task::<f32>::train_batch(&KalmanTask::new(200), 0, 0, 16).unwrap();
    captures_and_replays(&model, &params, &batch, "kalman");
    let (model, params, batch) = reach_case();
    captures_and_replays(&model, &params, &batch, "reach");
}

#[test]
fn graph_replays_match_direct_runs() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("graph_replays_match_direct_runs") else {
        return;
    };
    let (model, params0, weighted) = rnn_case(Activation::Tanh);
    let batch = |seed: u64, t: usize, norm: f64| Batch {
        steps: t,
        trials: 24,
        inputs: Some(randn(&[t, 24, 3], seed, 1)),
        initial: None,
        targets: randn(&[t, 24, 2], seed, 2),
        weights: None,
        loss_norm: norm * (t * 24 * 2) as f64,
        noise_seed: 0,
    };
    let mut batches = vec![weighted];
    batches.extend(
        [
            (6, 40, 1.0),
            (7, 40, 1.0),
            (8, 40, 1.0),
            (9, 52, 1.0),
            (10, 40, 1.0),
            (11, 40, 1.0),
            (12, 40, 1.0),
            // the same buffers and uploads, another kernel scalar (1/n)
            (13, 40, 2.0),
            (14, 40, 2.0),
            (15, 40, 2.0),
        ]
        .map(|(s, t, n)| batch(s, t, n)),
    );
    let stats = || sofo::cuda::sofo_graph_stats(&dev);
    let run = |graphs: bool| {
        dev.set_graphs(graphs);
        let before = stats();
        let mut params = params0.clone();
        let s = Sofo::new(SofoConfig {
            k: 16,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev.clone()));
        let losses: Vec<f64> = batches
            .iter()
            .enumerate()
            .map(|(it, b)| s.step(&model, &mut params, b, 3, it as u64).unwrap().loss)
            .collect();
        let after = stats();
        let ran = [
            after.direct - before.direct,
            after.captured - before.captured,
            after.replayed - before.replayed,
            after.fallbacks - before.fallbacks,
        ];
        (losses, params, ran)
    };
    let (la, pa, graphed) = run(true);
    let (lb, pb, direct) = run(false);
    same_runs((&la, &pa), (&lb, &pb), "the graph test");
    // direct, captured, replayed, fallbacks: recorded (weights); another
    // pass (no weights): fallback, recorded; captured; replayed; T = 52:
    // fallback, recorded; T = 40 captured; replayed twice; another 1/n:
    // fallback, recorded; captured; replayed
    assert_eq!(graphed, [4, 3, 4, 3], "with graphs");
    assert_eq!(direct, [11, 0, 0, 0], "without graphs");

    // a little loss sketched on the host: never captured
    let (model, mut params, batch) = classifier_case();
    let dev = device_or_skip("graph_replays_match_direct_runs").unwrap();
    dev.set_graphs(true);
    let s = Sofo::new(SofoConfig {
        k: 8,
        ..SofoConfig::default()
    })
    .unwrap()
    .on(Device::Cuda(dev.clone()));
    for it in 0..3 {
        s.step(&model, &mut params, &batch, 3, it).unwrap();
    }
    let st = sofo::cuda::sofo_graph_stats(&dev);
    assert_eq!((st.direct, st.captured, st.replayed), (3, 0, 0));
}

/// The fake GPU's counts of the calls made so far: kernel launches (but
/// the poisoning's), GEMMs, copies to the device, to the host, on the
/// device, memsets, graph launches (`None` on a real GPU).
fn fake_gpu_counts() -> Option<[u64; 7]> {
    use std::ffi::{c_char, c_int, c_void};
    extern "C" {
        fn dlopen(name: *const c_char, flags: c_int) -> *mut c_void;
        fn dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_NOLOAD: c_int = 4;
    // SAFETY: only looks up a library already loaded (by cudarc) and calls
    // the fake's counter function with room for its 8 counts.
    unsafe {
        let h = dlopen(c"libcuda.so".as_ptr(), RTLD_NOW | RTLD_NOLOAD);
        if h.is_null() {
            return None;
        }
        let f = dlsym(h, c"fake_gpu_counts".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: extern "C" fn(*mut u64) = std::mem::transmute(f);
        let mut out = [0u64; 8];
        f(out.as_mut_ptr());
        Some([out[0], out[1], out[2], out[3], out[4], out[5], out[6]])
    }
}

/// The fake GPU stands for a GPU's faults where the host would not fault:
/// a kernel that writes past its buffer fails its launch with
/// CUDA_ERROR_ILLEGAL_ADDRESS (found in the 4 KiB of NaN bytes around every
/// allocation), and a GEMM whose C does not fit its buffer fails — so that
/// every agreement test is also a bounds check of the kernels it runs.
/// (A float4 or float2 access that is not aligned fails likewise: a kernel's
/// alignment test cannot be made to fail from here, see `CHECK_ALIGNED`.)
/// On a real GPU there is nothing to check.
#[test]
fn the_fake_gpu_fails_writes_outside_a_buffer() {
    use cudarc::cublas::{sys::cublasOperation_t::CUBLAS_OP_N, CudaBlas, Gemm, GemmConfig};
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(_dev) = device_or_skip("the_fake_gpu_fails_writes_outside_a_buffer") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!("a real GPU: the fake GPU's checks are not here to test");
        return;
    }
    let ctx = CudaContext::new(0).unwrap();
    // SAFETY: one stream, used by this test only.
    unsafe { ctx.disable_event_tracking() };
    let stream = ctx.new_stream().unwrap();
    // the fake runs the kernels compiled into it, whatever the module's text
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src("")).unwrap();
    let fill = module.load_function("fill_nan").unwrap();
    let mut buf = stream.alloc_zeros::<f32>(4).unwrap();
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (32, 1, 1),
        shared_mem_bytes: 0,
    };
    let fill_n = |buf: &mut cudarc::driver::CudaSlice<f32>, n: i64| {
        let mut b = stream.launch_builder(&fill);
        b.arg(buf).arg(&n);
        // SAFETY: the fake GPU runs the kernel on host memory with red zones
        // around it; n = 5 writes into the zone.
        unsafe { b.launch(cfg) }.map(|_| ())
    };
    fill_n(&mut buf, 4).expect("a write inside the buffer");
    let err = fill_n(&mut buf, 5).expect_err("one element past the end");
    assert!(format!("{err:?}").contains("ILLEGAL_ADDRESS"), "{err:?}");
    // the fault was the launch's: the next one inside the buffer runs
    fill_n(&mut buf, 4).expect("a write inside the buffer after the fault");

    let blas = CudaBlas::new(stream.clone()).unwrap();
    let (a, b) = (
        stream.alloc_zeros::<f32>(6).unwrap(),
        stream.alloc_zeros::<f32>(6).unwrap(),
    );
    let gemm = |c: &mut cudarc::driver::CudaSlice<f32>| {
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: 2,
            n: 2,
            k: 3,
            alpha: 1.0f32,
            lda: 2,
            ldb: 3,
            beta: 0.0,
            ldc: 2,
        };
        // SAFETY: the fake checks each operand's extent before it computes.
        unsafe { blas.gemm(cfg, &a, &b, c) }
    };
    gemm(&mut stream.alloc_zeros::<f32>(4).unwrap()).expect("C [2, 2] in 4 elements");
    gemm(&mut stream.alloc_zeros::<f32>(3).unwrap()).expect_err("C [2, 2] in 3 elements");
}

/// Blocks of a host array handed out as device views: each block's values,
/// one upload per 64 blocks (counted on the fake GPU), a new upload where
/// the host values changed, and the same chunk length at the array's end.
#[test]
fn staged_blocks_are_the_host_blocks() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("staged_blocks_are_the_host_blocks") else {
        return;
    };
    use sofo_tensor::cuda::BlockStager;
    let (blocks, n) = (150usize, 3usize);
    let mut whole: Vec<f64> = (0..blocks * n).map(|i| i as f64 * 0.5 - 7.0).collect();
    let mut st = BlockStager::default();
    let uploads = || fake_gpu_counts().map(|c| c[2]);
    let before = uploads();
    for b in 0..blocks {
        let v = st.block(&dev, &whole, b * n, &[1, n]).unwrap();
        assert_eq!(v.shape(), &[1, n]);
        let got = dev.download(&v).unwrap();
        let want: Vec<f32> = whole[b * n..(b + 1) * n]
            .iter()
            .map(|&x| x as f32)
            .collect();
        assert_eq!(got.data(), &want[..], "block {b}");
    }
    if let (Some(a), Some(b)) = (before, uploads()) {
        assert_eq!(b - a, 3, "150 blocks in chunks of 64");
    }
    // block 10's host values change: staged again, from block 10
    whole[10 * n + 1] = 123.0;
    let v = st.block(&dev, &whole, 10 * n, &[n]).unwrap();
    assert_eq!(dev.download(&v).unwrap().data()[1], 123.0);
    let v = st.block(&dev, &whole, 11 * n, &[n]).unwrap();
    assert_eq!(dev.download(&v).unwrap().data()[0], whole[11 * n] as f32);
    // out of range: an error naming the request, not a view past the end
    assert!(st.block(&dev, &whole, blocks * n - 1, &[n]).is_err());
}

/// The small rate RNN of the call-count tests.
fn counted_rnn() -> RateRnn {
    RateRnn {
        n: 16,
        inputs: 3,
        outputs: 2,
        alpha: 0.1,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.9,
    }
}

/// A batch of 8 trials of T steps for the call-count tests: 3 inputs, 2
/// outputs.
fn counted_batch(t: usize) -> Batch<f32> {
    Batch {
        steps: t,
        trials: 8,
        inputs: Some(randn(&[t, 8, 3], 3, 1)),
        initial: None,
        targets: randn(&[t, 8, 2], 3, 2),
        weights: None,
        loss_norm: (t * 8 * 2) as f64,
        noise_seed: 0,
    }
}

/// The device calls of one time step of the rate RNN's SOFO pass, counted
/// on the fake GPU (the difference between T = 138 and T = 10, over 128
/// steps): 3 kernels — the hidden layer's `linear_dense` (r·W, ṙ·W + r·Ẇ
/// with r = φ(x) and ṙ = φ′(x)⊙ẋ read from x, the bias, the leak and the
/// input terms u·B and u·Ḃ, value and tangents); the readout, y = r·C + d
/// with its tangents ṙ·C + r·Ċ + ḋ, a narrow output, r again read from x;
/// the sketch's scaled rows — and no GEMM. With SOFO_GPU_LINEAR=gemm the
/// hidden layer is φ with φ′⊙ẋ, `linear_init` and 3 GEMMs (r·W, ṙ·W, r·Ẇ),
/// as it was before `linear_dense`: 4 kernels and 3 GEMMs. The inputs and targets uploaded once
/// per 64 steps (two chunks of each more) instead of once per step — and
/// none at all when the pass is replayed as a CUDA graph: a replayed
/// iteration makes the same calls at T = 10 and T = 138.
#[test]
fn device_calls_per_time_step() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("device_calls_per_time_step") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!("skipping device_calls_per_time_step: counted on the fake GPU only");
        return;
    }
    let model = counted_rnn();
    let batch = counted_batch;
    // the calls of iteration `it` (after `it` others) on a fresh device
    let calls = |t: usize, graphs: bool, it: u64, dense: DenseLinear| {
        let dev = device_or_skip("device_calls_per_time_step").unwrap();
        dev.set_graphs(graphs);
        dev.set_dense_linear(dense);
        let s = Sofo::new(SofoConfig {
            k: 4,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev));
        let mut params = model.init(0).unwrap();
        let b = batch(t);
        for i in 0..it {
            s.step(&model, &mut params, &b, 0, i).unwrap();
        }
        let before = fake_gpu_counts().unwrap();
        s.step(&model, &mut params, &b, 0, it).unwrap();
        let after = fake_gpu_counts().unwrap();
        std::array::from_fn::<u64, 7, _>(|i| after[i] - before[i])
    };
    drop(dev);
    for (dense, kernels, gemms) in [(DenseLinear::Auto, 3, 0), (DenseLinear::Gemm, 4, 3)] {
        let (short, long) = (calls(10, false, 0, dense), calls(138, false, 0, dense));
        let more: Vec<u64> = (0..7).map(|i| long[i] - short[i]).collect();
        eprintln!("device calls of 128 more steps ({dense:?}): {more:?} (kernels, GEMMs, uploads, downloads, copies, memsets, graphs)");
        assert_eq!(
            more,
            [kernels * 128, gemms * 128, 2 * 2, 0, 0, 0, 0],
            "{dense:?}"
        );
    }
    // replayed (the third iteration: recorded, captured, replayed): the
    // same calls whatever T, one graph launch among them
    let auto = DenseLinear::Auto;
    let (short, long) = (calls(10, true, 2, auto), calls(138, true, 2, auto));
    assert_eq!(short, long, "a replayed iteration's calls");
    assert_eq!(short[6], 1, "one graph launch");
}

/// The kernel launches of 128 more time steps (T = 138 against T = 10) of
/// one SOFO iteration of `model`, call by call on a fresh device, counted on
/// the fake GPU; and that those steps make no GEMM.
fn kernels_of_128_more_steps<M: Model<f32>>(model: &M, batch: impl Fn(usize) -> Batch<f32>) -> u64 {
    let calls = |t: usize| {
        let dev = device_or_skip("kernels_of_128_more_steps").unwrap();
        dev.set_graphs(false);
        let s = Sofo::new(SofoConfig {
            k: 4,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev));
        let mut params = model.init(0).unwrap();
        let before = fake_gpu_counts().unwrap();
        s.step(model, &mut params, &batch(t), 0, 0).unwrap();
        let after = fake_gpu_counts().unwrap();
        std::array::from_fn::<u64, 2, _>(|i| after[i] - before[i])
    };
    let (short, long) = (calls(10), calls(138));
    assert_eq!(long[1], short[1], "GEMMs in the time loop");
    long[0] - short[0]
}

/// The kernels of a time step of the task networks besides the rate RNN
/// (above), counted on the fake GPU over 128 steps:
/// - Lorenz: `linear_init` for the pre-activation (the bias, and y·C_in
///   with both factors' tangents folded in: 3 inner columns); the readout's
///   two narrow launches, the first reading relu(pre) and its tangents from
///   pre (no relu kernel, h's [M, K, H] tangents never stored); the
///   sketch's rows — 4 (6 with y·C_in added by a kernel of its own and h
///   stored);
/// - the Kalman task's leaky network, z ← (1 − α) z + relu(α (z W + u B +
///   b)): `linear_dense` applying relu and the leak as it writes (the
///   value's launch, then the tangents'), the readout, the sketch — 4 (6
///   with relu, the leak's scaling and its add as kernels of their own);
/// - the constrained network with state and rate noise but nothing else
///   reading its rates: `linear_dense` reading φ(x) ⊙ η from x, the state
///   noise's add, the readout, the sketch — 4 (5 with the rates stored by
///   `unary_mul`).
#[test]
fn task_network_kernels_per_time_step() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("task_network_kernels_per_time_step") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!("skipping task_network_kernels_per_time_step: counted on the fake GPU only");
        return;
    }
    drop(dev);
    let lorenz = kernels_of_128_more_steps(&LorenzModel { hidden: 16 }, |t| Batch {
        steps: t,
        trials: 8,
        inputs: None,
        initial: Some(randn(&[8, 3], 4, 1)),
        targets: randn(&[t, 8, 3], 4, 2),
        weights: None,
        loss_norm: (t * 8 * 3) as f64,
        noise_seed: 0,
    });
    let noisy = ConstrainedRnn::new(counted_rnn(), Constraints::default())
        .unwrap()
        .with_noise(Noise {
            state: 0.05,
            rates: 0.1,
            ..Noise::default()
        })
        .unwrap();
    let noisy = kernels_of_128_more_steps(&noisy, |t| Batch {
        noise_seed: 3,
        ..counted_batch(t)
    });
    let kalman = kernels_of_128_more_steps(&LeakyRnn::kalman(16), |t| Batch {
        steps: t,
        trials: 8,
        inputs: Some(randn(&[t, 8, 1], 5, 1)),
        initial: None,
        targets: randn(&[t, 8, 1], 5, 2),
        weights: None,
        loss_norm: (t * 8) as f64,
        noise_seed: 0,
    });
    eprintln!(
        "kernels of 128 more steps: lorenz {lorenz}, kalman {kalman}, constrained with noise {noisy}"
    );
    assert_eq!(lorenz, 4 * 128, "lorenz");
    assert_eq!(kalman, 4 * 128, "kalman");
    assert_eq!(
        noisy,
        4 * 128,
        "constrained, noise on the state and the rates"
    );
}

/// BPTT on the device tape copies the inputs (and any noise) and the
/// targets a chunk of steps at a time too: one Adam iteration of a rate RNN
/// makes 4 more uploads for 128 more steps (two chunks of each), where it
/// made two per step.
#[test]
fn bptt_copies_inputs_and_targets_per_chunk() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("bptt_copies_inputs_and_targets_per_chunk") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!(
            "skipping bptt_copies_inputs_and_targets_per_chunk: counted on the fake GPU only"
        );
        return;
    }
    let model = counted_rnn();
    let uploads = |t: usize| {
        let batch = counted_batch(t);
        let mut adam = Adam::<f32>::new(AdamConfig::default())
            .unwrap()
            .on(Device::Cuda(dev.clone()));
        let mut params = model.init(0).unwrap();
        let before = fake_gpu_counts().unwrap();
        adam.step(&model, &mut params, &batch, 0, 0).unwrap();
        fake_gpu_counts().unwrap()[2] - before[2]
    };
    assert_eq!(
        uploads(138) - uploads(10),
        2 * 2,
        "uploads for 128 more steps"
    );
}

/// The device calls of one SOFO iteration (K = 4) of the test's reach
/// network at T = 120, counted on the fake GPU. The arm plant's column
/// arithmetic was ≈ 70 small kernels per step (8 260 kernels at 3673f91);
/// as two pointwise programs (the arm step, the hand) it is two (874 at
/// 3b78f6e), and with φ and the rate noise's factor in one pass
/// (`unary_mul`) a step is ≈ 6 kernels and 3 GEMMs (754 kernels, 364
/// GEMMs); with the hidden layer in `linear_dense` instead of
/// `linear_init` and 3 GEMMs, ≈ 6 kernels and no GEMM (754 and 4: the
/// GEMMs left are the sketch's); with the rates relu(z) ⊙ η read from z by
/// the kernels of the two linear ops that use them (`linear_of_unary`), ≈ 5
/// kernels (634). Pinned so that a change in the count shows; the README
/// quotes it.
#[test]
fn reach_network_calls_per_iteration() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("reach_network_calls_per_iteration") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!("skipping reach_network_calls_per_iteration: counted on the fake GPU only");
        return;
    }
    let (model, mut params, batch) = reach_case();
    let s = Sofo::new(SofoConfig {
        k: 4,
        ..SofoConfig::default()
    })
    .unwrap()
    .on(Device::Cuda(dev));
    s.step(&model, &mut params, &batch, 0, 0).unwrap();
    let before = fake_gpu_counts().unwrap();
    s.step(&model, &mut params, &batch, 0, 1).unwrap();
    let after = fake_gpu_counts().unwrap();
    let calls: Vec<u64> = (0..7).map(|i| after[i] - before[i]).collect();
    eprintln!("reach network, one iteration: {calls:?} (kernels, GEMMs, uploads, downloads, copies, memsets, graphs)");
    assert_eq!(calls, [634, 4, 18, 3, 6, 1, 0]);
}

/// Peak device bytes of one SOFO iteration: equal at T = 10 and T = 1000
/// (each measured at its second iteration: the first also makes the
/// buffers an iteration keeps on the device, and is run call by call).
#[test]
fn gpu_memory_is_flat_in_t() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("gpu_memory_is_flat_in_t") else {
        return;
    };
    let peak = |t: usize| {
        let model = RateRnn {
            n: 64,
            inputs: 3,
            outputs: 3,
            alpha: 0.1,
            activation: Activation::Tanh,
            learn_x0: false,
            gain: 0.9,
        };
        let mut params: ParamSet<f32> = model.init(0).unwrap();
        let m = 32;
        let batch = Batch {
            steps: t,
            trials: m,
            inputs: Some(randn(&[t, m, 3], 1, 1)),
            initial: None,
            targets: randn(&[t, m, 3], 1, 2),
            weights: None,
            loss_norm: (t * m * 3) as f64,
            noise_seed: 0,
        };
        let s = Sofo::new(SofoConfig {
            k: 32,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev.clone()));
        assert!(s.step(&model, &mut params, &batch, 0, 0).unwrap().applied);
        let (live, _) = sofo_tensor::cuda::device_memory();
        sofo_tensor::cuda::reset_device_peak();
        assert!(s.step(&model, &mut params, &batch, 0, 1).unwrap().applied);
        sofo_tensor::cuda::device_memory().1 - live
    };
    let short = peak(10);
    let long = peak(1000);
    eprintln!("peak device bytes of one iteration: T=10 {short}, T=1000 {long}");
    assert!(short > 0);
    assert_eq!(short, long);
}

/// Per-element trainability on the device: with K = the number of free
/// entries and orthonormal tangents, a SOFO step is the damped Gauss-Newton
/// step restricted to the free entries whatever the directions, so the
/// device step (its own random V, frozen columns zeroed) equals the CPU's.
/// The premise is checked on the CPU first in f64 (two seeds, two bases, one
/// step), so the test says something without a GPU too.
#[test]
fn frozen_entries_give_the_restricted_step_on_both_devices() {
    let model = RateRnn {
        n: 6,
        inputs: 2,
        outputs: 2,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.9,
    };
    let mut params: ParamSet<f64> = model.init(4).unwrap();
    let keep: Vec<bool> = (0..36).map(|i| i % 3 != 0).collect();
    params.set_trainable_entries("W", &keep).unwrap();
    let (t, m) = (10, 8);
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(randn(&[t, m, 2], 6, 1).convert()),
        initial: None,
        targets: randn(&[t, m, 2], 6, 2).convert(),
        weights: None,
        loss_norm: (t * m * 2) as f64,
        noise_seed: 0,
    };
    let free = params.free_count();
    assert_eq!(free, params.trainable_count() - 12);
    let cfg = SofoConfig {
        k: free,
        lr: 1.0,
        damping: Damping::RelativeLargest(1e-2),
        ..SofoConfig::default()
    };
    let w0 = params.get("W").unwrap().value.data().to_vec();
    let step_on = |s: &Sofo, seed: u64| -> Vec<f64> {
        let mut p = params.clone();
        assert!(s.step(&model, &mut p, &batch, seed, 0).unwrap().applied);
        let w = p.get("W").unwrap().value.data();
        for i in (0..36).filter(|&i| !keep[i]) {
            assert_eq!(w[i].to_bits(), w0[i].to_bits(), "frozen W[{i}] moved");
        }
        p.iter().flat_map(|q| q.value.data().to_vec()).collect()
    };
    let max_diff = |a: &[f64], b: &[f64]| a.iter().zip(b).fold(0.0f64, |m, (x, y)| worse(m, x - y));
    let cpu = Sofo::new(cfg.clone()).unwrap();
    let a = step_on(&cpu, 1);
    let b = step_on(&cpu, 2);
    // f64: basis independence to rounding (observed 7e-12 on steps of 0.7)
    let d = max_diff(&a, &b);
    assert!(d < 1e-9, "CPU steps from two bases differ by {d:e}");
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("frozen_entries_give_the_restricted_step_on_both_devices")
    else {
        return;
    };
    let gpu = Sofo::new(cfg).unwrap().on(Device::Cuda(dev));
    let g = step_on(&gpu, 1);
    // the device computes in f32 (f32 CPU steps from two bases differ by
    // ~1e-3 of steps of 0.7 here); a V with frozen components would give
    // another step altogether
    let d = max_diff(&a, &g);
    assert!(d < 1e-2, "device step differs from the CPU's by {d:e}");
}

/// Every op of the vocabulary, in a program that also reuses values, so
/// that gradients add up from several paths.
fn reverse_program<E: Ops<f32>>(e: &mut E, l: &[E::V]) -> sofo_tensor::Result<Vec<E::V>> {
    let (a, w, b, v) = (&l[0], &l[1], &l[2], &l[3]);
    // device rules: linear with leak and bias, unary, equal-shape binary,
    // last-axis concat, rank-2 transpose, reshape, row broadcast
    let h = e.linear(Some((v, 0.3)), 0.7, &[(a, w)], Some(b))?;
    let t = e.tanh(&h)?;
    let s = e.sin(&t)?;
    let c = e.mul(&s, v)?;
    let ev = e.exp(v)?;
    let d = e.div(&c, &ev)?;
    let d = e.sub(&d, &t)?;
    let cat = e.concat(&[&d, &t, &h], 1)?;
    let tr = e.transpose(&cat, 0, 1)?;
    let flat = e.reshape(&tr, &[60])?;
    let bb = e.broadcast_to(b, &[4, 5])?;
    let bd = e.add(&bb, &d)?;
    let sq = e.relu(&bd)?;
    // host rules: sums, slices, softmax, general matmul, broadcasting binary
    let sum = e.sum(&cat, &[0])?;
    let sl = e.slice(&cat, 1, 2, 6)?;
    let sm = e.softmax(&sl)?;
    let lsm = e.log_softmax(&h)?;
    let mm = e.matmul(a, w)?;
    let bc = e.mul(&mm, b)?;
    Ok(vec![flat, sq, sum, sm, lsm, bc])
}

#[test]
fn every_reverse_rule_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("every_reverse_rule_agrees_with_the_cpu") else {
        return;
    };
    let shapes: [&[usize]; 4] = [&[4, 6], &[6, 5], &[5], &[4, 5]];
    let values: Vec<Tensor<f32>> = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, 11, i as u64).scale(0.7))
        .collect();
    let mut cpu = Rev::<f32>::new();
    let leaves: Vec<Var> = values.iter().map(|x| cpu.leaf(x.clone())).collect();
    let outs = reverse_program(&mut cpu, &leaves).unwrap();
    let seeds: Vec<Tensor<f32>> = outs
        .iter()
        .enumerate()
        .map(|(i, o)| randn(Ops::<f32>::shape(&cpu, o), 12, i as u64))
        .collect();
    let ga = cpu
        .backward(outs.iter().cloned().zip(seeds.iter().cloned()).collect())
        .unwrap();
    let mut gpu = CudaRev::new(dev.clone());
    let gleaves: Vec<Var> = values
        .iter()
        .map(|x| gpu.leaf(dev.upload(x).unwrap()))
        .collect();
    let gouts = reverse_program(&mut gpu, &gleaves).unwrap();
    for (o, go) in outs.iter().zip(&gouts) {
        let want = cpu.value_of(o);
        let got = dev.download(gpu.value_of(go)).unwrap();
        let d = rel(want.data(), got.data());
        assert!(d < 1e-5, "forward value differs by {d:e}");
    }
    let gseeds = gouts
        .iter()
        .cloned()
        .zip(seeds.iter().map(|s| dev.upload(s).unwrap()))
        .collect();
    let gb = gpu.backward(gseeds).unwrap();
    for (name, (l, gl)) in ["a", "W", "b", "v"].iter().zip(leaves.iter().zip(&gleaves)) {
        let want = ga[l.id()].as_ref().expect("a gradient on the CPU");
        let got = dev
            .download(gb[gl.id()].as_ref().expect("a gradient on the GPU"))
            .unwrap();
        assert_eq!(want.shape(), got.shape(), "∂/∂{name}: shape");
        let d = rel(want.data(), got.data());
        assert!(d < 1e-5, "∂/∂{name} differs by {d:e}");
        eprintln!("reverse rules: ∂/∂{name} agrees to {d:.1e}");
    }
}

/// The device tape's node for a pointwise program (the arm's step, then
/// its hand): values from the `pointwise` kernel, gradients from
/// `pointwise_grad`, against the CPU tape (whose program node is checked
/// against the ops one by one in `sofo-ad/tests/pointwise.rs`) —
/// with the state, the torques or both wanting gradients, and for a program
/// too long for the kernels (recorded op by op on the device too).
#[test]
fn pointwise_reverse_rule_agrees_with_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("pointwise_reverse_rule_agrees_with_the_cpu") else {
        return;
    };
    let arm = TwoJointArm {
        dt: 0.05,
        ..TwoJointArm::li_todorov()
    };
    let (step, hand) = (arm.step_program().unwrap(), arm.hand_program().unwrap());
    let long = sofo_ad::Pointwise::record::<sofo_tensor::TensorError>(2, |rec, r| {
        let mut x = r[0];
        for _ in 0..40 {
            x = Ops::<f32>::mul(rec, &x, &r[1])?;
            x = Ops::<f32>::add_scalar(rec, &x, 0.1)?;
        }
        Ok(vec![x, r[1]])
    })
    .unwrap();
    let state = randn(&[6, 4], 60, 1).scale(0.5);
    let tau = randn(&[6, 2], 60, 2).scale(0.5);
    let seed = randn(&[6, 4], 60, 3);
    let seed_long = randn(&[6, 4], 60, 4);
    // (the arm's state, the torques) leaves or constants; the long
    // program runs on the torques and the hand's first two columns
    fn run<E: Ops<f32>>(
        e: &mut E,
        x: [&E::V; 2],
        programs: [&sofo_ad::Pointwise; 3],
    ) -> (E::V, E::V) {
        let s = e.pointwise(programs[0], &[x[0], x[1]]).unwrap();
        let h = e.pointwise(programs[1], &[&s]).unwrap();
        let h2 = e.slice(&h, 1, 0, 2).unwrap();
        let y = e.pointwise(programs[2], &[x[1], &h2]).unwrap();
        (h, y)
    }
    for (state_wants, tau_wants) in [(true, true), (true, false), (false, true)] {
        let mut cpu = Rev::<f32>::new();
        let leaf = |r: &mut Rev<f32>, t: &Tensor<f32>, wants: bool| match wants {
            true => r.leaf(t.clone()),
            false => r.constant(t.clone()).unwrap(),
        };
        let x = [
            leaf(&mut cpu, &state, state_wants),
            leaf(&mut cpu, &tau, tau_wants),
        ];
        let (h, y) = run(&mut cpu, [&x[0], &x[1]], [&step, &hand, &long]);
        let ga = cpu
            .backward(vec![(h, seed.clone()), (y, seed_long.clone())])
            .unwrap();
        let mut gpu = CudaRev::new(dev.clone());
        let gleaf = |r: &mut CudaRev, t: &Tensor<f32>, wants: bool| match wants {
            true => r.leaf(dev.upload(t).unwrap()),
            false => r.constant(t.clone()).unwrap(),
        };
        let gx = [
            gleaf(&mut gpu, &state, state_wants),
            gleaf(&mut gpu, &tau, tau_wants),
        ];
        let (gh, gy) = run(&mut gpu, [&gx[0], &gx[1]], [&step, &hand, &long]);
        let gb = gpu
            .backward(vec![
                (gh, dev.upload(&seed).unwrap()),
                (gy, dev.upload(&seed_long).unwrap()),
            ])
            .unwrap();
        for (i, wants) in [state_wants, tau_wants].into_iter().enumerate() {
            let what = format!(
                "∂/∂{} (state {state_wants}, torques {tau_wants})",
                ["state", "torques"][i]
            );
            match wants {
                true => {
                    let want = ga[x[i].id()].as_ref().expect("a gradient on the CPU");
                    let got = dev
                        .download(gb[gx[i].id()].as_ref().expect("one on the GPU"))
                        .unwrap();
                    let d = rel(want.data(), got.data());
                    assert!(d < 1e-5, "{what} differs by {d:e}");
                }
                false => assert!(gb[gx[i].id()].is_none(), "{what}: none wanted"),
            }
        }
    }
}

/// One BPTT gradient on both devices: the loss to f32 accumulation
/// tolerance, every parameter's gradient to 1e-4 of its largest entry.
fn check_gradient<M: Model<f32>>(
    dev: Device,
    model: &M,
    params: &ParamSet<f32>,
    batch: &Batch<f32>,
    what: &str,
) {
    let (la, ga) = Device::Cpu.gradient(model, params, batch).unwrap();
    let (lb, gb) = dev.gradient(model, params, batch).unwrap();
    assert!(
        (la - lb).abs() <= 1e-5 * la.abs(),
        "{what}: BPTT loss {la} vs {lb}"
    );
    let mut worst = 0.0f64;
    for ((p, a), b) in params.iter().zip(&ga).zip(&gb) {
        assert_eq!(a.shape(), b.shape(), "{what}: ∂/∂{} shape", p.name);
        let d = rel(a.data(), b.data());
        assert!(d < 1e-4, "{what}: ∂/∂{} differs by {d:e}", p.name);
        worst = worst.max(d);
    }
    eprintln!("{what}: BPTT loss {la:e}, gradients agree to {worst:.1e}");
}

#[test]
fn bptt_gradient_agrees() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("bptt_gradient_agrees") else {
        return;
    };
    for act in [Activation::Tanh, Activation::Relu, Activation::Softplus] {
        let (model, params, batch) = rnn_case(act);
        check_gradient(
            Device::Cuda(dev.clone()),
            &model,
            &params,
            &batch,
            act.name(),
        );
    }
    let (model, params, batch) = lorenz_case();
    check_gradient(Device::Cuda(dev.clone()), &model, &params, &batch, "lorenz");
    let task = KalmanTask::new(200);
    let model = LeakyRnn::kalman(24);
    let params = Model::<f32>::init(&model, 0).unwrap();
    let batch = Task::<f32>::train_batch(&task, 0, 0, 16).unwrap();
    check_gradient(Device::Cuda(dev.clone()), &model, &params, &batch, "kalman");
    let (model, params, batch) = reach_case();
    check_gradient(Device::Cuda(dev), &model, &params, &batch, "reach");
}

/// Adam on the device tape trains as Adam on the CPU does: same losses to
/// f32 tolerance over a few iterations.
#[test]
fn adam_on_the_gpu_follows_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("adam_on_the_gpu_follows_the_cpu") else {
        return;
    };
    let (model, params, batch) = rnn_case(Activation::Tanh);
    let run = |device: Device| -> Vec<f64> {
        let mut p = params.clone();
        let mut adam = Adam::<f32>::new(AdamConfig::default()).unwrap().on(device);
        (0..5)
            .map(|it| adam.step(&model, &mut p, &batch, 0, it).unwrap().loss)
            .collect()
    };
    let a = run(Device::Cpu);
    let b = run(Device::Cuda(dev));
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x - y).abs() <= 1e-4 * x.abs(),
            "Adam losses {a:?} vs {b:?}"
        );
    }
    assert!(a[4] < a[0], "Adam did not lower the loss: {a:?}");
}

/// With TF32 GEMMs the sketch stays close to the f32 CPU sketch (inputs
/// rounded to 10 mantissa bits: agreement to about 1e-3, not 1e-5), and
/// the device says so.
#[test]
fn tf32_sketch_is_close_to_the_cpu() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    if device_or_skip("tf32_sketch_is_close_to_the_cpu").is_none() {
        return;
    }
    let dev = Device::open_with("cuda", "tf32").unwrap();
    assert!(dev.describe().contains("TF32"), "{}", dev.describe());
    let (model, params, batch) = rnn_case(Activation::Tanh);
    let cfg = SofoConfig {
        k: 16,
        ..SofoConfig::default()
    };
    let cpu = Sofo::new(cfg.clone()).unwrap();
    let gpu = Sofo::new(cfg).unwrap().on(dev);
    let tg = cpu.sample_tangents(&params, 3, 0).unwrap();
    let a = cpu.sketch(&model, &params, &tg, &batch).unwrap();
    let b = gpu.sketch(&model, &params, &tg, &batch).unwrap();
    let relv = |x: &[f64], y: &[f64]| {
        let s = x.iter().fold(f64::MIN_POSITIVE, |m, v| m.max(v.abs()));
        x.iter().zip(y).fold(0.0f64, |m, (p, q)| worse(m, p - q)) / s
    };
    let (dl, dc, dg) = (
        (a.loss - b.loss).abs() / a.loss.abs(),
        relv(&a.c, &b.c),
        relv(&a.g, &b.g),
    );
    eprintln!("tf32: loss {dl:.1e}, C {dc:.1e}, G̃ {dg:.1e} (relative differences)");
    assert!(dl < 1e-2 && dc < 3e-2 && dg < 3e-2, "TF32 sketch too far");
    // and TF32 took effect: f32 GEMMs agree to ~1e-7, TF32 ones to ~1e-4
    assert!(dc.max(dg) > 1e-6, "the TF32 sketch is the f32 one");
}

/// A softmax classifier of each step's inputs, observed through the losses
/// the device does not sketch itself: softmax cross-entropy, and a weighted
/// MSE with one weight per element (the host takes those over).
struct Classifier;

impl Model<f32> for Classifier {
    fn init(&self, seed: u64) -> sofo::Result<ParamSet<f32>> {
        let p = |name: &str, value| Param {
            name: name.to_string(),
            value,
            mode: ParamMode::Free,
        };
        Ok(ParamSet::new(vec![
            p("W", randn(&[3, 4], seed, 1).scale(0.5)),
            p("b", randn(&[4], seed, 2).scale(0.1)),
        ]))
    }

    fn run<E: Ops<f32>>(
        &self,
        e: &mut E,
        p: &[E::V],
        trials: &Trials<'_, f32>,
        obs: &mut dyn Observer<f32, E>,
    ) -> sofo::Result<()> {
        // labels, targets and weights by each trial's index in the batch,
        // and the cross-entropy over the batch's rows: the same losses
        // however the trials are split into groups
        let (m, start, total) = (trials.trials(), trials.start, trials.batch.trials);
        for t in 0..trials.steps() {
            let u = e.constant(trials.input(t)?.expect("inputs"))?;
            let y = e.linear(None, 1.0, &[(&u, &p[0])], Some(&p[1]))?;
            let labels: Vec<usize> = (0..m).map(|i| (start + i + t) % 4).collect();
            let ce = SoftmaxCrossEntropy::from_labels(&labels, 4, total)?;
            obs.observe(e, &y, &ce)?;
            let weights = Tensor::from_vec(
                &[m, 4],
                (0..m * 4)
                    .map(|i| ((start * 4 + i) % 3) as f32 * 0.5)
                    .collect(),
            )?;
            let target = randn(&[total, 4], 30 + t as u64, 0).slice(0, start, m)?;
            obs.observe(
                e,
                &y,
                &WeightedMse {
                    target,
                    weights: Some(weights),
                    n: (total * 4) as f64,
                },
            )?;
        }
        Ok(())
    }

    fn sofo_flops(&self, _k: usize, _batch: &Batch<f32>) -> f64 {
        0.0
    }
}

/// The classifier on a short batch (its softmax loss is sketched on the
/// host under `--device cuda`).
fn classifier_case() -> (Classifier, ParamSet<f32>, Batch<f32>) {
    let model = Classifier;
    let params = model.init(5).unwrap();
    let (t, m) = (6, 10);
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(randn(&[t, m, 3], 31, 0)),
        initial: None,
        targets: Tensor::zeros(&[t, m, 4]),
        weights: None,
        loss_norm: 1.0,
        noise_seed: 0,
    };
    (model, params, batch)
}

#[test]
fn losses_the_device_does_not_sketch_run_on_the_host() {
    let (model, params, batch) = classifier_case();
    // the test model itself runs on the CPU engines
    check_sketch_and_step(Device::Cpu, &model, &params, &batch, "softmax (cpu)");
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("losses_the_device_does_not_sketch_run_on_the_host") else {
        return;
    };
    check_sketch_and_step(
        Device::Cuda(dev.clone()),
        &model,
        &params,
        &batch,
        "softmax",
    );
    check_gradient(Device::Cuda(dev), &model, &params, &batch, "softmax");
}

// ---------------------------------------------------------------------------
// The same tests without a GPU: on the fake GPU of tests/fake_gpu.

/// Without a GPU, every test of this file runs again in a child process
/// whose libcuda, libcublas and libnvrtc are the fake GPU's: the whole
/// device path (cudarc's loading and launches, the launch arguments against
/// each kernel's signature, the cuBLAS calls, device memory, the kernels)
/// is checked against the CPU, though not the hardware itself (numerics of
/// the device's math library, timing, concurrency).
#[test]
fn agreement_tests_pass_on_the_fake_gpu() {
    if std::env::var_os("SOFO_FAKE_GPU").is_some() {
        return; // the child
    }
    if sofo_tensor::cuda::CudaDevice::open(0).is_ok() {
        eprintln!("a GPU is here: the agreement tests ran on it");
        return;
    }
    // a GPU run (gpu-check.sh) must not pass on the fake instead
    assert!(
        std::env::var_os("SOFO_REQUIRE_GPU").is_none(),
        "SOFO_REQUIRE_GPU is set and no GPU opens"
    );
    let Some(dir) = fake_gpu::build() else {
        return;
    };
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--test-threads", "1", "--nocapture"])
        .env("LD_LIBRARY_PATH", fake_gpu::library_path(&dir))
        .env("SOFO_FAKE_GPU", "1")
        // every scratch buffer NaN-filled, as the fake's fresh memory is
        .env("SOFO_GPU_POISON", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "on the fake GPU:\n{text}");
    assert!(
        !text.contains("skipping"),
        "a test did not find the fake GPU:\n{text}"
    );
    // every test of the file ran in the child and passed
    let count = |prefix: &str, suffix: &str| -> Option<usize> {
        let line = text.lines().find(|l| l.starts_with(prefix))?;
        line[prefix.len()..]
            .split(suffix)
            .next()?
            .trim()
            .parse()
            .ok()
    };
    let ran = count("running ", " test").expect("the child's test count");
    let passed = count("test result: ok. ", " passed").expect("the child's result");
    assert!(
        ran >= 13 && passed == ran,
        "{passed} of {ran} passed:\n{text}"
    );
    eprintln!("{text}");
}

/// The constrained network's noise (all five kinds on, with inputs) is
/// drawn and copied to the device a chunk of 64 steps at a time, like the
/// targets: 128 more steps are two more chunks, each a copy per noise kind
/// (the inputs with their noise one of them) and one of the targets — where
/// each step copied its inputs and four kinds of noise before (and with
/// only three arrays' stagers kept, 5 of the 6 were copied again per step).
/// The rate regulariser's zero targets are copied once per pass, not per
/// step.
#[test]
fn constrained_noise_is_copied_per_chunk() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("constrained_noise_is_copied_per_chunk") else {
        return;
    };
    if fake_gpu_counts().is_none() {
        eprintln!("skipping constrained_noise_is_copied_per_chunk: counted on the fake GPU only");
        return;
    }
    drop(dev);
    let model = ConstrainedRnn::new(counted_rnn(), Constraints::default())
        .unwrap()
        .with_noise(Noise {
            state: 0.05,
            rates: 0.1,
            input: 0.05,
            state_multiplicative: 0.05,
            rates_additive: 0.05,
        })
        .unwrap()
        .with_regularizers(Regularizers {
            rates_l2: 1e-3,
            ..Regularizers::default()
        })
        .unwrap();
    let batch = |t: usize| Batch {
        noise_seed: 3,
        ..counted_batch(t)
    };
    let uploads = |t: usize| {
        let dev = device_or_skip("constrained_noise_is_copied_per_chunk").unwrap();
        dev.set_graphs(false);
        let s = Sofo::new(SofoConfig {
            k: 4,
            ..SofoConfig::default()
        })
        .unwrap()
        .on(Device::Cuda(dev));
        let mut params = Model::<f32>::init(&model, 0).unwrap();
        let before = fake_gpu_counts().unwrap();
        s.step(&model, &mut params, &batch(t), 0, 0).unwrap();
        fake_gpu_counts().unwrap()[2] - before[2]
    };
    let more = uploads(138) - uploads(10);
    assert_eq!(more, 2 * (5 + 1), "uploads for 128 more steps");
}

/// The constrained rate network with its options on: Dale's law (softplus)
/// with masks, learned time constants, state/rate/input noise and the three
/// regularisers; a low-rank recurrence with per-unit time constants and
/// the multiplicative state and additive rate noises; and two whose rates
/// nothing but the recurrence and the readout reads — the GPU reads them
/// from x through φ and the rate noise (`Ops::linear_of_unary`): Dale's law
/// with learned time constants, and a scalar α (the leak in the kernel).
fn constrained_cases() -> Vec<(&'static str, ConstrainedRnn)> {
    let rnn = RateRnn {
        n: 24,
        inputs: 2,
        outputs: 2,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: true,
        gain: 0.9,
    };
    let mut c = Constraints::generate(24, Some(0.75), true, 0.5, false, 3).unwrap();
    c.dale_transform = DaleTransform::Softplus;
    let noisy = Noise {
        state: 0.05,
        rates: 0.1,
        input: 0.05,
        ..Noise::default()
    };
    let dale_rates_read_from_x = ConstrainedRnn::new(rnn.clone(), c.clone())
        .unwrap()
        .with_time_constants(TimeConstants::Learned { tau_min: 1.5 })
        .unwrap()
        .with_noise(noisy)
        .unwrap();
    let scalar_rates_read_from_x = ConstrainedRnn::new(rnn.clone(), Constraints::default())
        .unwrap()
        .with_noise(noisy)
        .unwrap();
    let dale = ConstrainedRnn::new(rnn.clone(), c)
        .unwrap()
        .with_time_constants(TimeConstants::Learned { tau_min: 1.5 })
        .unwrap()
        .with_noise(Noise {
            state: 0.05,
            rates: 0.1,
            input: 0.05,
            ..Noise::default()
        })
        .unwrap()
        .with_regularizers(Regularizers {
            weights_l2: 1e-3,
            rates_l2: 1e-3,
            rate_target_weight: 1e-2,
            rate_target: 0.2,
        })
        .unwrap();
    let low_rank = ConstrainedRnn::new(rnn, Constraints::default())
        .unwrap()
        .with_time_constants(TimeConstants::PerUnit(
            (0..24).map(|i| 0.1 + 0.01 * i as f64).collect(),
        ))
        .unwrap()
        .with_low_rank(Some(LowRank {
            rank: 2,
            fixed: true,
        }))
        .unwrap()
        .with_noise(Noise {
            state_multiplicative: 0.05,
            rates_additive: 0.05,
            ..Noise::default()
        })
        .unwrap();
    vec![
        ("dale, masks, learned τ, noise, regularisers", dale),
        ("low rank, per-unit τ, noise", low_rank),
        (
            "dale, masks, learned τ, noise, rates read from x",
            dale_rates_read_from_x,
        ),
        (
            "scalar α, noise, rates read from x",
            scalar_rates_read_from_x,
        ),
    ]
}

#[test]
fn constrained_networks_agree() {
    let _one_at_a_time = GPU.lock().unwrap_or_else(|e| e.into_inner());
    let Some(dev) = device_or_skip("constrained_networks_agree") else {
        return;
    };
    let task = FlipFlopTask::new(2, 40);
    let batch = Task::<f32>::train_batch(&task, 0, 0, 16).unwrap();
    for (what, model) in constrained_cases() {
        let params = Model::<f32>::init(&model, 1).unwrap();
        check_sketch_and_step(Device::Cuda(dev.clone()), &model, &params, &batch, what);
        check_gradient(Device::Cuda(dev.clone()), &model, &params, &batch, what);
    }
}
