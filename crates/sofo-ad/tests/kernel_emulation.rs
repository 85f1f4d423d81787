//! The GPU kernels' arithmetic, checked without a GPU (feature `cuda`).
//!
//! The NVRTC source of `sofo_tensor::cuda` is compiled for the host by the
//! system C++ compiler with a small shim (`blockIdx`, `threadIdx`, … as
//! variables set before each call; `__syncthreads` a no-op), and each kernel
//! is called once per emulated thread, one thread after the other. Every
//! grid-stride kernel then computes exactly what it computes on a device, so
//! its index arithmetic and formulas are compared here with the CPU forward
//! engine (or a direct transcription of the rule), on odd sizes, and under
//! several launch shapes (one thread, and grids smaller than the data) to
//! check that no element is missed or written twice. The block-reduction
//! kernel (`mse_value`) is emulated with a block of one thread, where the
//! reduction is the serial sum. A kernel whose threads share staged chunks
//! through shared memory (`linear_dense`) needs its block's barriers:
//! `crates/sofo/tests/cuda_agreement.rs` checks it on the fake GPU, which
//! runs a block's threads as fibers.
//!
//! What this cannot see: the cudarc launch arguments of the Rust wrappers
//! and the cuBLAS calls (the agreement tests of
//! `crates/sofo/tests/cuda_agreement.rs` check those, on a GPU or on the
//! fake one), and device-only behaviour.
//! Without a C++ compiler the tests print a notice and pass (unless
//! SOFO_REQUIRE_CXX is set, as CI does).
#![cfg(feature = "cuda")]

use sofo_ad::cuda::code;
use sofo_ad::layout::tangent_shape;
use sofo_ad::{Binary, Dual, Fwd, Ops, Pointwise, Tensor, Unary};
use sofo_tensor::rng;
use std::path::PathBuf;
use std::sync::OnceLock;

mod common;
use common::every_op;

// only its C++ compile step is used here
#[allow(dead_code)]
#[path = "../../sofo/tests/fake_gpu/mod.rs"]
mod fake_gpu;

const SHIM: &str = r#"
#include <math.h>
#include <string.h>
struct EmuDim { unsigned x, y, z; };
// per test thread: the tests run in parallel
static thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;
struct float4 { float x, y, z, w; };  // CUDA built-in vector types
struct float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
extern "C" void emu_set(unsigned b, unsigned t, unsigned bd, unsigned gd) {
    blockIdx = {b, 0, 0}; threadIdx = {t, 0, 0}; blockDim = {bd, 1, 1}; gridDim = {gd, 1, 1};
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static thread_local
#define __syncthreads() ((void)0)
inline float __int_as_float(int i) { float f; memcpy(&f, &i, sizeof f); return f; }
"#;

struct Emu {
    lib: libloading::Library,
}

/// The kernels compiled for the host, once per test binary (`None`: no
/// C++ compiler here).
fn emu() -> Option<&'static Emu> {
    static EMU: OnceLock<Option<Emu>> = OnceLock::new();
    EMU.get_or_init(|| {
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("kernel_emulation");
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        let src = dir.join("kernels.cpp");
        let lib: PathBuf = dir.join("libkernels.so");
        std::fs::write(
            &src,
            format!("{SHIM}\n{}", sofo_tensor::cuda::kernel_source()),
        )
        .expect("write the kernel source");
        fake_gpu::compile(&["-std=c++17", "-O1"], &src, &lib, "kernel emulation")?;
        // SAFETY: a library built just now from our own source.
        let lib = unsafe { libloading::Library::new(&lib) }.expect("load the emulated kernels");
        Some(Emu { lib })
    })
    .as_ref()
}

/// Launch shapes (grid, block): one thread, grids smaller than the data,
/// and a grid larger than it.
const SHAPES: [(u32, u32); 4] = [(1, 1), (2, 3), (3, 64), (40, 32)];

impl Emu {
    /// Runs `call` once per thread of a (grid, block) launch.
    fn launch(&self, grid: u32, block: u32, mut call: impl FnMut()) {
        // SAFETY: the shim's exported setter.
        let set: libloading::Symbol<unsafe extern "C" fn(u32, u32, u32, u32)> =
            unsafe { self.lib.get(b"emu_set") }.expect("emu_set");
        for b in 0..grid {
            for t in 0..block {
                // SAFETY: plain stores into the shim's index variables.
                unsafe { set(b, t, block, grid) };
                call();
            }
        }
    }

    /// The kernel `name` with the signature `F`.
    fn kernel<F>(&self, name: &str) -> libloading::Symbol<'_, F> {
        // SAFETY: callers give the kernel's C signature as F.
        unsafe { self.lib.get(name.as_bytes()) }.unwrap_or_else(|e| panic!("{name}: {e}"))
    }
}

fn randn(shape: &[usize], seed: u64, stream: u64) -> Tensor<f32> {
    let mut t = Tensor::<f32>::scratch(shape);
    rng::fill_normal(t.data_mut(), seed, stream);
    t
}

/// max |a − b| / max(1, max |a|); infinite where either is NaN (an element
/// the kernel never wrote stays NaN, and `f64::max` would skip it)
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths");
    let scale = a.iter().fold(1.0f64, |m, v| m.max(v.abs() as f64));
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let d = (*x as f64 - *y as f64).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    }) / scale
}

fn close(want: &[f32], got: &[f32], what: &str) {
    let d = rel(want, got);
    assert!(d < 2e-6, "{what}: differs from the CPU by {d:e}");
}

/// Inputs where every op is defined (log, sqrt: positive).
fn input_for(op: Unary, shape: &[usize], seed: u64) -> Tensor<f32> {
    let x = randn(shape, seed, 1);
    match op {
        Unary::Log | Unary::Sqrt => x.map(|v| v.abs() + 0.1),
        _ => x,
    }
}

#[test]
fn unary_kernels_match_the_cpu_rules() {
    let Some(emu) = emu() else { return };
    type UnaryFwd = unsafe extern "C" fn(*const f32, *mut f32, *mut f32, i64, i32, f32, i32);
    #[rustfmt::skip]
    type UnaryTangent = unsafe extern "C" fn(
        *const f32, *const f32, *mut f32, *mut f32, i64, i32, i32, i32, f32, *const f32, i32,
    );
    type UnaryGrad = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64, i32, f32);
    let fwd = emu.kernel::<UnaryFwd>("unary_fwd");
    let tan = emu.kernel::<UnaryTangent>("unary_tangent");
    let grad = emu.kernel::<UnaryGrad>("unary_grad");
    // K = 11: a full chunk of tangents per thread and a partial one
    let (shape, k) = ([5usize, 7], 11usize);
    for op in Unary::all(0.7, -1.3) {
        let (c, s) = code(op);
        let x = input_for(op, &shape, 2);
        let t = randn(&tangent_shape(&shape, k), 3, 2);
        let want = Fwd::new(k)
            .unary(
                &Dual {
                    primal: x.clone(),
                    tangent: Some(t.clone()),
                },
                op,
            )
            .unwrap();
        let dwant: Vec<f32> = x
            .data()
            .iter()
            .zip(want.primal.data())
            .map(|(&v, &y)| op.derivative(v, y))
            .collect();
        for (grid, block) in SHAPES {
            let n = x.numel();
            let (mut y, mut d) = (vec![f32::NAN; n], vec![f32::NAN; n]);
            emu.launch(grid, block, || unsafe {
                fwd(
                    x.data().as_ptr(),
                    y.as_mut_ptr(),
                    d.as_mut_ptr(),
                    n as i64,
                    c as i32,
                    s,
                    1,
                )
            });
            close(want.primal.data(), &y, &format!("unary_fwd {op:?} value"));
            close(&dwant, &d, &format!("unary_fwd {op:?} derivative"));
            // f alone, and f times a constant factor (a noise mask) as the
            // CPU's unary then mul
            let factor = randn(&shape, 5, 3);
            let times = Fwd::new(k)
                .mul(&want, &Dual::constant(factor.clone()))
                .unwrap();
            for (has_c, want) in [(0, &want), (1, &times)] {
                let (mut y2, mut out) = (vec![f32::NAN; n], vec![f32::NAN; t.numel()]);
                emu.launch(grid, block, || unsafe {
                    tan(
                        x.data().as_ptr(),
                        t.data().as_ptr(),
                        y2.as_mut_ptr(),
                        out.as_mut_ptr(),
                        n as i64,
                        k as i32,
                        7,
                        c as i32,
                        s,
                        factor.data().as_ptr(),
                        has_c,
                    )
                });
                let what = format!("unary_tangent {op:?} (factor {has_c})");
                close(want.primal.data(), &y2, &format!("{what} value"));
                let wt = want.tangent.as_ref().unwrap().data();
                close(wt, &out, &format!("{what} tangents"));
            }
            // the reverse rule: f′(x) ⊙ gy
            let gy = randn(&shape, 4, 2);
            let gx_want: Vec<f32> = dwant.iter().zip(gy.data()).map(|(d, g)| d * g).collect();
            let mut gx = vec![f32::NAN; n];
            emu.launch(grid, block, || unsafe {
                grad(
                    x.data().as_ptr(),
                    gy.data().as_ptr(),
                    gx.as_mut_ptr(),
                    n as i64,
                    c as i32,
                    s,
                )
            });
            close(&gx_want, &gx, &format!("unary_grad {op:?}"));
        }
    }
}

#[test]
fn binary_kernels_match_the_cpu_rules() {
    let Some(emu) = emu() else { return };
    type BinFwd = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64, i32);
    type BinTan = unsafe extern "C" fn(
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        *mut f32,
        i64,
        i32,
        i32,
        i32,
        i32,
        i32,
        *mut f32,
        i32,
    );
    let fwd = emu.kernel::<BinFwd>("binary_fwd");
    let tan = emu.kernel::<BinTan>("binary_tangent");
    let (shape, k) = ([6usize, 5], 11usize);
    let a = randn(&shape, 4, 1);
    let b = randn(&shape, 4, 2).map(|v| v.abs() + 0.5);
    let ta = randn(&tangent_shape(&shape, k), 4, 3);
    let tb = randn(&tangent_shape(&shape, k), 4, 4);
    for (op, opc) in [
        (Binary::Add, 0),
        (Binary::Sub, 1),
        (Binary::Mul, 2),
        (Binary::Div, 3),
    ] {
        for (has_a, has_b) in [(true, true), (true, false), (false, true)] {
            let da = Dual {
                primal: a.clone(),
                tangent: has_a.then(|| ta.clone()),
            };
            let db = Dual {
                primal: b.clone(),
                tangent: has_b.then(|| tb.clone()),
            };
            let want = Fwd::new(k).binary(&da, &db, op).unwrap();
            for (grid, block) in SHAPES {
                let mut y = vec![f32::NAN; a.numel()];
                emu.launch(grid, block, || unsafe {
                    fwd(
                        a.data().as_ptr(),
                        b.data().as_ptr(),
                        y.as_mut_ptr(),
                        a.numel() as i64,
                        opc,
                    )
                });
                close(want.primal.data(), &y, &format!("binary_fwd {op:?}"));
                // the tangents alone, then with the value in the same launch
                for want_y in [0, 1] {
                    let mut out = vec![f32::NAN; ta.numel()];
                    let mut y2 = vec![f32::NAN; a.numel()];
                    emu.launch(grid, block, || unsafe {
                        tan(
                            a.data().as_ptr(),
                            b.data().as_ptr(),
                            ta.data().as_ptr(),
                            tb.data().as_ptr(),
                            out.as_mut_ptr(),
                            a.numel() as i64,
                            k as i32,
                            5,
                            opc,
                            has_a as i32,
                            has_b as i32,
                            y2.as_mut_ptr(),
                            want_y,
                        )
                    });
                    let what = format!("binary_tangent {op:?} ({has_a}, {has_b}), value {want_y}");
                    close(want.tangent.as_ref().unwrap().data(), &out, &what);
                    if want_y == 1 {
                        close(want.primal.data(), &y2, &what);
                    } else {
                        assert!(
                            y2.iter().all(|v| v.is_nan()),
                            "{what}: value written unasked"
                        );
                    }
                }
            }
        }
        // no tangents at all (K = 0): the value is still written
        let want = Fwd::new(0)
            .binary(&Dual::constant(a.clone()), &Dual::constant(b.clone()), op)
            .unwrap();
        for (grid, block) in SHAPES {
            let mut y = vec![f32::NAN; a.numel()];
            let mut none: [f32; 0] = [];
            emu.launch(grid, block, || unsafe {
                tan(
                    a.data().as_ptr(),
                    b.data().as_ptr(),
                    ta.data().as_ptr(),
                    tb.data().as_ptr(),
                    none.as_mut_ptr(),
                    a.numel() as i64,
                    0,
                    5,
                    opc,
                    1,
                    1,
                    y.as_mut_ptr(),
                    1,
                )
            });
            close(
                want.primal.data(),
                &y,
                &format!("binary_tangent {op:?}, K = 0"),
            );
        }
    }
}

#[test]
fn scale_rows_and_columns_match_the_cpu() {
    let Some(emu) = emu() else { return };
    type ScaleRows = unsafe extern "C" fn(*const f32, *const f32, *mut f32, i64, i32, i32);
    type Cols = unsafe extern "C" fn(*const f32, *mut f32, i64, i32, i32, i32);
    let scale = emu.kernel::<ScaleRows>("scale_rows");
    let copy = emu.kernel::<Cols>("copy_columns");
    let take = emu.kernel::<Cols>("take_columns");
    let (p, k, l) = (5usize, 11usize, 4usize);
    let d = randn(&[p, l], 5, 1);
    let t = randn(&[p, k, l], 5, 2);
    let want: Vec<f32> = (0..p * k * l)
        .map(|i| d.data()[(i / (k * l)) * l + i % l] * t.data()[i])
        .collect();
    // the concat of a [5, 2] and b [5, 3] along the last axis
    let a = randn(&[5, 2], 5, 3);
    let b = randn(&[5, 3], 5, 4);
    let cat = Fwd::primal()
        .concat(&[&Dual::constant(a.clone()), &Dual::constant(b.clone())], 1)
        .unwrap()
        .primal;
    for (grid, block) in SHAPES {
        let mut out = vec![f32::NAN; t.numel()];
        emu.launch(grid, block, || unsafe {
            scale(
                d.data().as_ptr(),
                t.data().as_ptr(),
                out.as_mut_ptr(),
                d.numel() as i64,
                k as i32,
                l as i32,
            )
        });
        close(&want, &out, "scale_rows");
        let mut dst = vec![f32::NAN; 25];
        emu.launch(grid, block, || unsafe {
            copy(a.data().as_ptr(), dst.as_mut_ptr(), 5, 2, 5, 0);
            copy(b.data().as_ptr(), dst.as_mut_ptr(), 5, 3, 5, 2);
        });
        close(cat.data(), &dst, "copy_columns");
        let mut back = vec![f32::NAN; 15];
        emu.launch(grid, block, || unsafe {
            take(cat.data().as_ptr(), back.as_mut_ptr(), 5, 3, 5, 2)
        });
        close(b.data(), &back, "take_columns");
    }
}

#[test]
fn linear_init_matches_its_rule() {
    let Some(emu) = emu() else { return };
    type Init = unsafe extern "C" fn(
        *mut f32,
        *mut f32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        f32,
        f32,
        i64,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        *const f32,
        *const f32,
        *const f32,
        i32,
        i32,
        *const f32,
        i32,
    );
    let init = emu.kernel::<Init>("linear_init");
    let (rows, k, n) = (7usize, 11usize, 5usize);
    let b = randn(&[n], 6, 1);
    let bt = randn(&[k, n], 6, 2);
    let x = randn(&[rows, n], 6, 3);
    let xt = randn(&[rows, k, n], 6, 4);
    // the small term u · w: u [rows, ku] with u̇ [rows, k, ku] or without,
    // w [ku, n], ẇ [ku, k, n]
    let ku = 3usize;
    let u = randn(&[rows, ku], 6, 5);
    let ut = randn(&[rows, k, ku], 6, 8);
    let w = randn(&[ku, n], 6, 6);
    let wt = randn(&[ku, k, n], 6, 7);
    let (c, s) = (0.8f32, 0.25f32);
    for flags in 0..256u32 {
        let f = |bit: u32| (flags >> bit & 1) as i32;
        let (hb, hbt, hx, hxt, want_t) = (f(0), f(1) & f(0), f(2), f(3) & f(2), f(4));
        let (hu, hwt, hut) = (f(5), f(6) & f(5), f(7) & f(5));
        let y_want: Vec<f32> = (0..rows * n)
            .map(|i| {
                let (r, j) = (i / n, i % n);
                let mut v = if hb == 1 { b.data()[j] } else { 0.0 };
                if hu == 1 {
                    for a in 0..ku {
                        v += u.data()[r * ku + a] * w.data()[a * n + j];
                    }
                }
                v *= s;
                if hx == 1 {
                    v += c * x.data()[i];
                }
                v
            })
            .collect();
        let t_want: Vec<f32> = (0..rows * k * n)
            .map(|q| {
                let (r, kk, j) = (q / (k * n), q / n % k, q % n);
                let mut v = if hbt == 1 { bt.data()[kk * n + j] } else { 0.0 };
                if hwt == 1 {
                    for a in 0..ku {
                        v += u.data()[r * ku + a] * wt.data()[(a * k + kk) * n + j];
                    }
                }
                if hut == 1 {
                    for a in 0..ku {
                        v += ut.data()[(r * k + kk) * ku + a] * w.data()[a * n + j];
                    }
                }
                v *= s;
                if hxt == 1 {
                    v += c * xt.data()[q];
                }
                v
            })
            .collect();
        for (grid, block) in SHAPES {
            let mut y = vec![f32::NAN; rows * n];
            let mut t = vec![f32::NAN; rows * k * n];
            emu.launch(grid, block, || unsafe {
                init(
                    y.as_mut_ptr(),
                    t.as_mut_ptr(),
                    b.data().as_ptr(),
                    bt.data().as_ptr(),
                    x.data().as_ptr(),
                    xt.data().as_ptr(),
                    c,
                    s,
                    rows as i64,
                    k as i32,
                    n as i32,
                    hb,
                    hbt,
                    hx,
                    hxt,
                    want_t,
                    u.data().as_ptr(),
                    w.data().as_ptr(),
                    wt.data().as_ptr(),
                    hu * ku as i32,
                    hwt,
                    ut.data().as_ptr(),
                    hut,
                )
            });
            close(
                &y_want,
                &y,
                &format!("linear_init primal, flags {flags:08b}"),
            );
            if want_t == 1 {
                close(
                    &t_want,
                    &t,
                    &format!("linear_init tangents, flags {flags:08b}"),
                );
            } else {
                assert!(t.iter().all(|v| v.is_nan()), "tangents written unasked");
            }
        }
    }
}

#[test]
fn linear_small_add_matches_its_rule() {
    let Some(emu) = emu() else { return };
    type SmallAdd = unsafe extern "C" fn(
        *mut f32,
        *mut f32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        f32,
        i64,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
    );
    let add = emu.kernel::<SmallAdd>("linear_small_add");
    // K = 11 (a full chunk of tangents and a partial one); one column of u,
    // three, the widest (8)
    let (rows, k, n, s) = (7usize, 11usize, 5usize, 0.6f32);
    let y0 = randn(&[rows, n], 10, 1);
    let t0 = randn(&[rows, k, n], 10, 2);
    for ku in [1usize, 3, 8] {
        let u = randn(&[rows, ku], 10, 3);
        let ut = randn(&[rows, k, ku], 10, 4);
        let w = randn(&[ku, n], 10, 5);
        let wt = randn(&[ku, k, n], 10, 6);
        for flags in 0..8u32 {
            let f = |bit: u32| (flags >> bit & 1) as i32;
            let (want_t, has_ut, has_wt) = (f(0), f(1), f(2));
            let y_want: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    let v: f64 = (0..ku)
                        .map(|a| u.data()[r * ku + a] as f64 * w.data()[a * n + j] as f64)
                        .sum();
                    (y0.data()[i] as f64 + s as f64 * v) as f32
                })
                .collect();
            let t_want: Vec<f32> = (0..rows * k * n)
                .map(|i| {
                    let (r, kk, j) = (i / (k * n), i / n % k, i % n);
                    let mut v = 0f64;
                    for a in 0..ku {
                        if has_ut == 1 {
                            v += ut.data()[(r * k + kk) * ku + a] as f64
                                * w.data()[a * n + j] as f64;
                        }
                        if has_wt == 1 {
                            v += u.data()[r * ku + a] as f64
                                * wt.data()[(a * k + kk) * n + j] as f64;
                        }
                    }
                    (t0.data()[i] as f64 + s as f64 * v) as f32
                })
                .collect();
            for (grid, block) in SHAPES {
                let mut y = y0.data().to_vec();
                let mut t = t0.data().to_vec();
                emu.launch(grid, block, || unsafe {
                    add(
                        y.as_mut_ptr(),
                        t.as_mut_ptr(),
                        u.data().as_ptr(),
                        ut.data().as_ptr(),
                        w.data().as_ptr(),
                        wt.data().as_ptr(),
                        s,
                        rows as i64,
                        k as i32,
                        n as i32,
                        ku as i32,
                        want_t,
                        has_ut,
                        has_wt,
                    )
                });
                let what = format!("linear_small_add ku = {ku}, flags {flags:03b}");
                close(&y_want, &y, &format!("{what}: primal"));
                if want_t == 1 {
                    close(&t_want, &t, &format!("{what}: tangents"));
                } else {
                    assert_eq!(t, t0.data(), "{what}: tangents changed unasked");
                }
            }
        }
    }
}

#[test]
fn linear_narrow_matches_its_rule() {
    let Some(emu) = emu() else { return };
    type Narrow = unsafe extern "C" fn(
        *mut f32,
        *mut f32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        f32,
        i64,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        i32,
        *const f32,
        i32,
    );
    let narrow = emu.kernel::<Narrow>("linear_narrow");
    // K = 11 tangents; inner dimensions of 9 (rows read as float4 where they
    // happen to be aligned, the rest one by one) and 12 (every row aligned
    // where the buffer is); one output column, three, the widest (8)
    let (rows, k) = (7usize, 11usize);
    let s = 0.75f32;
    for (kd, n) in [9usize, 12]
        .into_iter()
        .flat_map(|kd| [1usize, 3, 8].map(|n| (kd, n)))
    {
        let a = randn(&[rows, kd], 9, 1);
        let at = randn(&[rows, k, kd], 9, 2);
        let w = randn(&[kd, n], 9, 3);
        let wt = randn(&[kd, k, n], 9, 4);
        let b = randn(&[n], 9, 5);
        let bt = randn(&[k, n], 9, 6);
        // what a previous term left in the outputs (added to unless init)
        let y0 = randn(&[rows, n], 9, 7);
        let t0 = randn(&[rows, k, n], 9, 8);
        // the term's input read as is, or as tanh(a) ⊙ c with tangents
        // tanh′(a) ⊙ at ⊙ c (a readout of rates read from the
        // pre-activation; c the rates' noise, or none)
        let c = randn(&[rows, kd], 9, 9);
        let cases = (0..64u32).flat_map(|f| [(f, false, false), (f, true, false), (f, true, true)]);
        for (flags, act, has_c) in cases {
            let cf = |i: usize| if has_c { c.data()[i] as f64 } else { 1.0 };
            let fa = |i: usize| {
                let v = a.data()[i] as f64;
                if act {
                    v.tanh() * cf(i)
                } else {
                    v
                }
            };
            let da = |i: usize| {
                let v = a.data()[i] as f64;
                if act {
                    (1.0 - v.tanh().powi(2)) * cf(i)
                } else {
                    1.0
                }
            };
            let f = |bit: u32| (flags >> bit & 1) as i32;
            let (want_t, has_at, has_wt, has_b, has_bt, init) =
                (f(0), f(1), f(2), f(3), f(4) & f(3), f(5));
            if init == 0 && has_b == 1 {
                continue; // a bias comes with the first term only
            }
            let y_want: Vec<f32> = (0..rows * n)
                .map(|i| {
                    let (r, o) = (i / n, i % n);
                    let mut v: f64 = (0..kd)
                        .map(|q| fa(r * kd + q) * w.data()[q * n + o] as f64)
                        .sum();
                    if has_b == 1 {
                        v += b.data()[o] as f64;
                    }
                    let v = s as f64 * v;
                    (if init == 1 {
                        v
                    } else {
                        y0.data()[i] as f64 + v
                    }) as f32
                })
                .collect();
            let t_want: Vec<f32> = (0..rows * k * n)
                .map(|i| {
                    let (r, kk, o) = (i / (k * n), i / n % k, i % n);
                    let mut v = 0f64;
                    for q in 0..kd {
                        let aq = r * kd + q;
                        if has_at == 1 {
                            v += da(aq)
                                * at.data()[(r * k + kk) * kd + q] as f64
                                * w.data()[q * n + o] as f64;
                        }
                        if has_wt == 1 {
                            v += fa(aq) * wt.data()[(q * k + kk) * n + o] as f64;
                        }
                    }
                    if has_bt == 1 {
                        v += bt.data()[kk * n + o] as f64;
                    }
                    let v = s as f64 * v;
                    (if init == 1 {
                        v
                    } else {
                        t0.data()[i] as f64 + v
                    }) as f32
                })
                .collect();
            for (grid, block) in SHAPES {
                let mut y = if init == 1 {
                    vec![f32::NAN; rows * n]
                } else {
                    y0.data().to_vec()
                };
                let mut t = if init == 1 {
                    vec![f32::NAN; rows * k * n]
                } else {
                    t0.data().to_vec()
                };
                emu.launch(grid, block, || unsafe {
                    narrow(
                        y.as_mut_ptr(),
                        t.as_mut_ptr(),
                        a.data().as_ptr(),
                        at.data().as_ptr(),
                        w.data().as_ptr(),
                        wt.data().as_ptr(),
                        b.data().as_ptr(),
                        bt.data().as_ptr(),
                        s,
                        rows as i64,
                        k as i32,
                        kd as i32,
                        n as i32,
                        want_t,
                        has_at,
                        has_wt,
                        has_b,
                        has_bt,
                        init,
                        act as i32,
                        code(Unary::Tanh).0 as i32,
                        c.data().as_ptr(),
                        has_c as i32,
                    )
                });
                let what = format!(
                    "linear_narrow kd = {kd}, n = {n}, flags {flags:06b}, tanh {act}, c {has_c}"
                );
                close(&y_want, &y, &format!("{what}: primal"));
                if want_t == 1 {
                    close(&t_want, &t, &format!("{what}: tangents"));
                } else if init == 1 {
                    assert!(
                        t.iter().all(|v| v.is_nan()),
                        "{what}: tangents written unasked"
                    );
                } else {
                    assert_eq!(t, t0.data(), "{what}: tangents changed unasked");
                }
            }
        }
    }
}

#[test]
fn layout_kernels_match_the_cpu() {
    let Some(emu) = emu() else { return };
    type Permute = unsafe extern "C" fn(*const f32, *mut f32, i32, i32, i32);
    type Bcast = unsafe extern "C" fn(*const f32, *mut f32, i64, i64);
    type Gather = unsafe extern "C" fn(*const f32, *mut f32, i64, i64, i32, i32, i32);
    let permute = emu.kernel::<Permute>("permute_210");
    let bcast = emu.kernel::<Bcast>("broadcast_rows");
    let gather = emu.kernel::<Gather>("gather_param");
    let x = randn(&[4, 3, 5], 7, 1);
    let mut want = vec![0f32; 60];
    for (i, w) in want.iter_mut().enumerate() {
        // dst [5, 3, 4]: dst[z, y, x] = src[x, y, z]
        let (z, y, xx) = (i / 12, (i / 4) % 3, i % 4);
        *w = x.data()[(xx * 3 + y) * 5 + z];
    }
    let tr = randn(&[6, 4], 7, 2);
    let tr_want = tr.transpose(0, 1).unwrap();
    let v = randn(&[6], 7, 3);
    let bc_want = v.broadcast_to(&[5, 6]).unwrap();
    // V [K = 3, P = 20]; a parameter [A = 2, L = 4] at offset 7 → [2, 3, 4]
    let vv = randn(&[3, 20], 7, 4);
    let g_want: Vec<f32> = (0..24)
        .map(|i| {
            let (aa, kk, j) = (i / 12, (i / 4) % 3, i % 4);
            vv.data()[kk * 20 + 7 + aa * 4 + j]
        })
        .collect();
    for (grid, block) in SHAPES {
        let mut out = vec![f32::NAN; 60];
        emu.launch(grid, block, || unsafe {
            permute(x.data().as_ptr(), out.as_mut_ptr(), 4, 3, 5)
        });
        close(&want, &out, "permute_210");
        let mut t = vec![f32::NAN; 24];
        emu.launch(grid, block, || unsafe {
            permute(tr.data().as_ptr(), t.as_mut_ptr(), 6, 1, 4)
        });
        close(tr_want.data(), &t, "permute_210 as a transpose");
        let mut b = vec![f32::NAN; 30];
        emu.launch(grid, block, || unsafe {
            bcast(v.data().as_ptr(), b.as_mut_ptr(), 30, 6)
        });
        close(bc_want.data(), &b, "broadcast_rows");
        let mut g = vec![f32::NAN; 24];
        emu.launch(grid, block, || unsafe {
            gather(vv.data().as_ptr(), g.as_mut_ptr(), 20, 7, 2, 3, 4)
        });
        close(&g_want, &g, "gather_param");
    }
}

#[test]
fn normal_fill_is_standard_normal_and_launch_independent() {
    let Some(emu) = emu() else { return };
    type Fill = unsafe extern "C" fn(*mut f32, i64, u64, u64);
    let fill = emu.kernel::<Fill>("normal_fill");
    let n = 20_001usize;
    let draw = |grid: u32, block: u32, seed: u64, stream: u64| {
        let mut out = vec![f32::NAN; n];
        emu.launch(grid, block, || unsafe {
            fill(out.as_mut_ptr(), n as i64, seed, stream)
        });
        out
    };
    let a = draw(1, 1, 3, 9);
    for (grid, block) in SHAPES {
        let b = draw(grid, block, 3, 9);
        let first = a
            .iter()
            .zip(&b)
            .position(|(x, y)| x.to_bits() != y.to_bits());
        assert!(
            first.is_none(),
            "normal_fill depends on the launch shape ({grid}, {block}): first at {first:?}: {:?} vs {:?}",
            first.map(|i| a[i]),
            first.map(|i| b[i])
        );
    }
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    // standard errors: 1/√n ≈ 0.007 for the mean, √(2/n) ≈ 0.01 for the variance
    assert!(mean.abs() < 0.03, "mean {mean}");
    assert!((var - 1.0).abs() < 0.05, "variance {var}");
    let c = draw(1, 1, 3, 10);
    let same = a.iter().zip(&c).filter(|(x, y)| x == y).count();
    assert!(same < 10, "streams 9 and 10 share {same} values");
}

/// The weighted MSE of y [rows, l] with K tangents: the loss, C and G̃ by
/// their definitions, in f64.
fn mse_reference(
    y: &Tensor<f32>,
    t: &Tensor<f32>,
    w: &[f32],
    yd: &Tensor<f32>,
    k: usize,
    n: f64,
) -> (f64, Vec<f64>, Vec<f64>) {
    let l = *y.shape().last().unwrap();
    let rows = y.numel() / l;
    let (mut loss, mut c, mut g) = (0.0, vec![0.0; k], vec![0.0; k * k]);
    for (r, &wr) in w.iter().enumerate().take(rows) {
        let wr = wr as f64;
        for j in 0..l {
            let e = y.data()[r * l + j] as f64 - t.data()[r * l + j] as f64;
            loss += wr * e * e / n;
            for a in 0..k {
                let ya = yd.data()[(r * k + a) * l + j] as f64;
                c[a] += 2.0 * wr * e / n * ya;
                for b in 0..k {
                    g[a * k + b] += 2.0 * wr / n * ya * yd.data()[(r * k + b) * l + j] as f64;
                }
            }
        }
    }
    (loss, c, g)
}

#[test]
fn mse_kernels_give_the_sketch_and_the_seed() {
    let Some(emu) = emu() else { return };
    type Aug = unsafe extern "C" fn(
        *const f32,
        *const f32,
        *const f32,
        i32,
        *const f32,
        i32,
        *mut f64,
        i64,
        i32,
        i32,
        f64,
        i64,
        i64,
    );
    type Seed =
        unsafe extern "C" fn(*const f32, *const f32, *const f32, i32, *mut f32, i64, i32, f64);
    type Value =
        unsafe extern "C" fn(*const f32, *const f32, *const f32, i32, i64, i32, f64, *mut f64);
    let aug = emu.kernel::<Aug>("mse_augmented");
    let seed = emu.kernel::<Seed>("mse_seed");
    let value = emu.kernel::<Value>("mse_value");
    // K + 1 = 11 rows: a full chunk per thread and a partial one
    let (rows, l, k) = (6usize, 3usize, 10usize);
    let y = randn(&[rows, l], 8, 1);
    let t = randn(&[rows, l], 8, 2);
    let yd = randn(&[rows, k, l], 8, 3);
    let w: Vec<f32> = (0..rows).map(|r| [0.0, 1.0, 2.5][r % 3]).collect();
    let n = 40.0;
    let (loss, c, g) = mse_reference(&y, &t, &w, &yd, k, n);
    // two observations side by side in one buffer of 2·rows·l columns, the
    // second with unit weights: A Aᵀ sums both
    let ones = vec![1f32; rows];
    let (loss1, c1, g1) = mse_reference(&y, &t, &ones, &yd, k, n);
    let cols = rows * l;
    let ld = 2 * cols + 5;
    // the K + 1 rows of one observation into columns [col0, col0 + cols) of
    // a buffer with leading dimension ld; weighted or not, tangents or not
    let fill = |out: &mut [f64], weighted: bool, tangents: bool, ld: usize, col0: usize| unsafe {
        aug(
            y.data().as_ptr(),
            t.data().as_ptr(),
            w.as_ptr(),
            weighted as i32,
            if tangents {
                yd.data().as_ptr()
            } else {
                std::ptr::null()
            },
            tangents as i32,
            out.as_mut_ptr(),
            rows as i64,
            k as i32,
            l as i32,
            1.0 / n,
            ld as i64,
            col0 as i64,
        )
    };
    for (grid, block) in SHAPES {
        let mut a = vec![f64::NAN; (k + 1) * ld];
        emu.launch(grid, block, || {
            fill(&mut a, true, true, ld, 0);
            fill(&mut a, false, true, ld, cols);
        });
        let k1 = k + 1;
        let gram: Vec<f64> = (0..k1 * k1)
            .map(|i| {
                let (p, q) = (i / k1, i % k1);
                (0..2 * cols).map(|j| a[p * ld + j] * a[q * ld + j]).sum()
            })
            .collect();
        let near = |x: f64, y: f64, what: &str| {
            assert!(
                (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                "mse_augmented {what}: {x} vs {y}"
            )
        };
        near(0.5 * gram[k * k1 + k], loss + loss1, "loss");
        for j in 0..k {
            near(gram[k * k1 + j], c[j] + c1[j], "C");
            for i in 0..k {
                near(gram[i * k1 + j], g[i * k + j] + g1[i * k + j], "G̃");
            }
        }
        // without tangents the rows above the residual are zeros
        let mut a0 = vec![f64::NAN; (k + 1) * cols];
        emu.launch(grid, block, || fill(&mut a0, true, false, cols, 0));
        assert!(
            a0[..k * cols].iter().all(|&v| v == 0.0),
            "tangent rows not zero"
        );
        let l0: f64 = a0[k * cols..].iter().map(|v| v * v).sum::<f64>() * 0.5;
        near(l0, loss, "loss without tangents");
        // the seed of backpropagation, 2 w (y − t) / n
        let mut gy = vec![f32::NAN; cols];
        emu.launch(grid, block, || unsafe {
            seed(
                y.data().as_ptr(),
                t.data().as_ptr(),
                w.as_ptr(),
                1,
                gy.as_mut_ptr(),
                rows as i64,
                l as i32,
                1.0 / n,
            )
        });
        let gy_want: Vec<f32> = (0..cols)
            .map(|i| (2.0 * w[i / l] as f64 * (y.data()[i] - t.data()[i]) as f64 / n) as f32)
            .collect();
        close(&gy_want, &gy, "mse_seed");
    }
    // the block reduction with a block of one thread is the serial sum
    let mut acc = 0.25f64;
    emu.launch(1, 1, || unsafe {
        value(
            y.data().as_ptr(),
            t.data().as_ptr(),
            w.as_ptr(),
            1,
            rows as i64,
            l as i32,
            1.0 / n,
            &mut acc,
        )
    });
    assert!(
        (acc - 0.25 - loss).abs() < 1e-6 * loss,
        "mse_value {acc} vs {}",
        loss + 0.25
    );
}

#[test]
fn pointwise_runs_a_program_as_the_cpu_does() {
    let Some(emu) = emu() else { return };
    type In = (*const f32, *const f32, i32);
    #[rustfmt::skip]
    type Pw = unsafe extern "C" fn(
        *const u32, i32, i32, i32,
        *const f32, *const f32, i32, *const f32, *const f32, i32,
        *const f32, *const f32, i32, *const f32, *const f32, i32,
        *const f32, *const f32, i32, *const f32, *const f32, i32,
        *const f32, *const f32, i32, *const f32, *const f32, i32,
        *mut f32, *mut f32, i64, i32, i32, u64, i32,
    );
    let pw = emu.kernel::<Pw>("pointwise");
    let program = Pointwise::record(5, every_op::<f32, _>).unwrap();
    let words = sofo_ad::cuda::program_code(&program);
    let n_step = program.steps().len() as i32;
    // width 2 (an element width L > 1), K = 11 (a full and a partial chunk);
    // inputs: (a, b) [4, 4] with tangents, c [4, 2] with, (d, e) [4, 4]
    // without — and with none at all
    let (rows, l, k) = (4usize, 2usize, 11usize);
    let ab = randn(&[rows, 2 * l], 6, 1).map(|v| v * 0.5);
    let c = randn(&[rows, l], 6, 2);
    let de = randn(&[rows, 2 * l], 6, 3);
    let tangents = |w: usize, s: u64| randn(&[rows, k, w], 7, s);
    for with_t in [true, false] {
        let dual = |x: &Tensor<f32>, s: u64| Dual {
            primal: x.clone(),
            tangent: with_t.then(|| tangents(x.shape()[1], s)),
        };
        let xs = [dual(&ab, 1), dual(&c, 2), Dual::constant(de.clone())];
        let refs: Vec<&Dual<f32>> = xs.iter().collect();
        let want = Fwd::new(k).pointwise(&program, &refs).unwrap();
        let has = program.tangent_registers(&[with_t, with_t, with_t, false, false]);
        let tmask = (0..has.len()).fold(0u64, |m, i| m | ((has[i] as u64) << i));
        let want_t = program.outputs().iter().any(|&o| has[o]);
        assert_eq!(want_t, want.tangent.is_some());
        let ptr =
            |t: &Option<Tensor<f32>>| t.as_ref().map_or(std::ptr::null(), |t| t.data().as_ptr());
        let mut ins: Vec<In> = xs
            .iter()
            .map(|x| {
                (
                    x.primal.data().as_ptr(),
                    ptr(&x.tangent),
                    x.primal.shape()[1] as i32,
                )
            })
            .collect();
        ins.resize(8, (std::ptr::null(), std::ptr::null(), 0));
        for (grid, block) in SHAPES {
            let mut y = vec![f32::NAN; rows * 3 * l];
            let mut u = vec![f32::NAN; if want_t { rows * k * 3 * l } else { 0 }];
            emu.launch(grid, block, || unsafe {
                let i = &ins;
                pw(
                    words.as_ptr(),
                    3,
                    n_step,
                    3,
                    i[0].0,
                    i[0].1,
                    i[0].2,
                    i[1].0,
                    i[1].1,
                    i[1].2,
                    i[2].0,
                    i[2].1,
                    i[2].2,
                    i[3].0,
                    i[3].1,
                    i[3].2,
                    i[4].0,
                    i[4].1,
                    i[4].2,
                    i[5].0,
                    i[5].1,
                    i[5].2,
                    i[6].0,
                    i[6].1,
                    i[6].2,
                    i[7].0,
                    i[7].1,
                    i[7].2,
                    y.as_mut_ptr(),
                    u.as_mut_ptr(),
                    (rows * l) as i64,
                    k as i32,
                    l as i32,
                    tmask,
                    want_t as i32,
                )
            });
            let what = format!("pointwise (tangents {with_t}, launch {grid}×{block})");
            close(want.primal.data(), &y, &format!("{what} value"));
            if let Some(t) = &want.tangent {
                close(t.data(), &u, &format!("{what} tangents"));
            }
        }
    }
}

#[test]
fn pointwise_grad_backpropagates_a_program_as_the_cpu_does() {
    let Some(emu) = emu() else { return };
    type In = (*const f32, *mut f32, i32);
    #[rustfmt::skip]
    type PwGrad = unsafe extern "C" fn(
        *const u32, i32, i32, i32,
        *const f32, *mut f32, i32, *const f32, *mut f32, i32,
        *const f32, *mut f32, i32, *const f32, *mut f32, i32,
        *const f32, *mut f32, i32, *const f32, *mut f32, i32,
        *const f32, *mut f32, i32, *const f32, *mut f32, i32,
        *const f32, i64, i32, u64, i32,
    );
    let grad = emu.kernel::<PwGrad>("pointwise_grad");
    let program = Pointwise::record(5, every_op::<f32, _>).unwrap();
    let words = sofo_ad::cuda::program_code(&program);
    let n_step = program.steps().len() as i32;
    // inputs (a, b) [4, 4], c [4, 2], (d, e) [4, 4] at element width 2;
    // each group wanting a gradient or not
    let (rows, l) = (4usize, 2usize);
    let xs = [
        randn(&[rows, 2 * l], 8, 1).map(|v| v * 0.5),
        randn(&[rows, l], 8, 2),
        randn(&[rows, 2 * l], 8, 3),
    ];
    let gy = randn(&[rows, 3 * l], 8, 4);
    for wants in [
        [true, true, true],
        [true, false, false],
        [false, true, false],
        [false, false, true],
    ] {
        let mut r = sofo_ad::Rev::<f32>::new();
        let vars: Vec<sofo_ad::Var> = xs
            .iter()
            .zip(wants)
            .map(|(x, w)| {
                if w {
                    r.leaf(x.clone())
                } else {
                    r.constant(x.clone()).unwrap()
                }
            })
            .collect();
        let refs: Vec<&sofo_ad::Var> = vars.iter().collect();
        let y = r.pointwise(&program, &refs).unwrap();
        let want = r.backward(vec![(y, gy.clone())]).unwrap();
        let cols = [2, 1, 2];
        let col_wants: Vec<bool> = (0..3).flat_map(|i| vec![wants[i]; cols[i]]).collect();
        let has = program.tangent_registers(&col_wants);
        let gmask = (0..has.len()).fold(0u64, |m, i| m | ((has[i] as u64) << i));
        let want_bits = (0..3).fold(0i32, |m, i| m | ((wants[i] as i32) << i));
        for (grid, block) in SHAPES {
            let mut gs: Vec<Vec<f32>> = xs.iter().map(|x| vec![f32::NAN; x.numel()]).collect();
            let mut ins: Vec<In> = xs
                .iter()
                .zip(gs.iter_mut())
                .map(|(x, g)| (x.data().as_ptr(), g.as_mut_ptr(), x.shape()[1] as i32))
                .collect();
            ins.resize(8, (std::ptr::null(), std::ptr::null_mut(), 0));
            emu.launch(grid, block, || unsafe {
                let i = &ins;
                grad(
                    words.as_ptr(),
                    3,
                    n_step,
                    3,
                    i[0].0,
                    i[0].1,
                    i[0].2,
                    i[1].0,
                    i[1].1,
                    i[1].2,
                    i[2].0,
                    i[2].1,
                    i[2].2,
                    i[3].0,
                    i[3].1,
                    i[3].2,
                    i[4].0,
                    i[4].1,
                    i[4].2,
                    i[5].0,
                    i[5].1,
                    i[5].2,
                    i[6].0,
                    i[6].1,
                    i[6].2,
                    i[7].0,
                    i[7].1,
                    i[7].2,
                    gy.data().as_ptr(),
                    (rows * l) as i64,
                    l as i32,
                    gmask,
                    want_bits,
                )
            });
            for i in 0..3 {
                let what =
                    format!("pointwise_grad input {i} (wants {wants:?}, launch {grid}×{block})");
                match want[vars[i].id()].as_ref() {
                    Some(w) => close(w.data(), &gs[i], &what),
                    None => assert!(gs[i].iter().all(|v| v.is_nan()), "{what}: written"),
                }
            }
        }
    }
}
