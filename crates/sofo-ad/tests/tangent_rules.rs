//! Every tangent rule of the forward-K engine [`Fwd`] against central finite
//! differences, in f64.
//!
//! Method (see [`compare_jvp`]): each input that carries tangents gets K = 3
//! random directions `v_1..v_K` (drawn in the canonical layout `[K, shape…]`
//! and handed to the engine in its own layout via `from_canonical` +
//! `Fwd::dual`). The op runs once under `Fwd::new(K)`; its output tangents,
//! brought back to canonical `[K, shape…]`, are compared for every k to
//! `(f(x + h·v_k) − f(x − h·v_k)) / 2h`, with `f` evaluated by the primal
//! engine `Fwd::primal()` on constant (tangent-free) inputs. Inputs without
//! tangents are passed as `Dual::constant` and are not perturbed, so the same
//! check also covers the "tangent None contributes zero" rule.
//!
//! All randomness comes from a small splitmix64 + Box–Muller generator with
//! fixed seeds, so every run checks exactly the same numbers.

use sofo_ad::layout::{from_canonical, tangent_shape, to_canonical};
use sofo_ad::{Binary, Dual, Fwd, Ops, Result, Tensor, Unary};

/// Number of tangents carried by the forward engine in these tests.
const K: usize = 3;
/// Finite-difference step.
const H: f64 = 1e-6;
/// Relative tolerance of the JVP/finite-difference comparison.
///
/// Why 1e-6 · (1 + max(|jvp|∞, |f|∞)): the central difference with step h has
/// truncation error h²/6 · |f'''| · |v|³ ≈ 1e-12 · O(10) for the smooth ops and
/// O(1) inputs used here, and rounding error of about c · ε · |f| / h, where
/// ε ≈ 2.2e-16 and c counts the roundings accumulated in one evaluation of f
/// (≲ 100 for the sizes here, sums/GEMMs included), i.e. ≲ 2e-8 · |f|. Both
/// are ≥ 50× below the tolerance (measured: the worst of the ~1300 checks
/// here uses 2e-4 of it). A wrong tangent rule (wrong factor, wrong
/// sign, wrong layout, a dropped term) is off by O(|jvp|), i.e. ~1e6× the
/// tolerance; `harness_detects_wrong_tangents` checks that the harness does
/// flag such errors.
const RTOL: f64 = 1e-6;

// ---------------------------------------------------------------------------
// Deterministic random numbers: splitmix64 + Box–Muller.

struct Rng {
    state: u64,
    spare: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            spare: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1].
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }

    /// Standard normal (Box–Muller, both values used).
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        let r = (-2.0 * self.uniform().ln()).sqrt();
        let th = 2.0 * std::f64::consts::PI * self.uniform();
        self.spare = Some(r * th.sin());
        r * th.cos()
    }

    fn sample(&mut self, d: Dist) -> f64 {
        match d {
            Dist::Normal(s) => s * self.normal(),
            Dist::Uniform(lo, hi) => lo + (hi - lo) * self.uniform(),
            Dist::AwayFromZero(m) => {
                let v = m + self.normal().abs();
                if self.coin() {
                    v
                } else {
                    -v
                }
            }
        }
    }

    fn tensor(&mut self, shape: &[usize], d: Dist) -> Tensor<f64> {
        Tensor::from_fn(shape, |_| self.sample(d))
    }

    /// A shape of `rank` axes with extents in 1..=max_extent.
    fn shape(&mut self, rank: usize, max_extent: usize) -> Vec<usize> {
        (0..rank).map(|_| 1 + self.below(max_extent)).collect()
    }
}

/// How the entries of a test input are drawn.
#[derive(Debug, Clone, Copy)]
enum Dist {
    /// N(0, s²).
    Normal(f64),
    /// Uniform on [lo, hi].
    Uniform(f64, f64),
    /// ±(m + |N(0, 1)|): at least m away from zero (relu kinks, denominators).
    AwayFromZero(f64),
}

const N1: Dist = Dist::Normal(1.0);

// ---------------------------------------------------------------------------
// The harness.

/// Outcome of one JVP vs finite-difference comparison.
#[derive(Debug)]
struct Comparison {
    /// max over k and elements of |fd − jvp|.
    max_err: f64,
    /// The allowed error.
    tol: f64,
    /// max |jvp| (0 when no input has tangents).
    max_jvp: f64,
    /// Whether the output carried `tangent: None`.
    tangent_none: bool,
}

/// max(m, |v|), but NaN-propagating (`f64::max` drops NaNs, which would let
/// a NaN tangent pass every comparison).
fn worst(m: f64, v: f64) -> f64 {
    if m.is_nan() || v.is_nan() {
        f64::NAN
    } else {
        m.max(v.abs())
    }
}

fn max_abs(xs: &[f64]) -> f64 {
    xs.iter().fold(0.0, |m, &v| worst(m, v))
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m, (x, y)| worst(m, x - y))
}

/// Runs `f` under `Fwd::new(K)` with random tangents on the inputs flagged in
/// `has_t`, and compares its output tangents with central differences of `f`
/// under `Fwd::primal()`. Structural problems (tangent shape, primal values
/// that differ between the engines, a tangent where none can be) panic with
/// `label`; the numerical comparison is returned.
fn compare_jvp<F>(
    label: &str,
    inputs: &[Tensor<f64>],
    has_t: &[bool],
    seed: u64,
    f: F,
) -> Comparison
where
    F: Fn(&mut Fwd, &[Dual<f64>]) -> Result<Dual<f64>>,
{
    assert_eq!(inputs.len(), has_t.len(), "{label}: one flag per input");
    let mut rng = Rng::new(seed);
    let mut eng = Fwd::new(K);

    // K directions per tangent-carrying input, canonical [K, shape…].
    let dirs: Vec<Option<Tensor<f64>>> = inputs
        .iter()
        .zip(has_t)
        .map(|(x, &t)| {
            t.then(|| {
                let mut s = vec![K];
                s.extend_from_slice(x.shape());
                rng.tensor(&s, N1)
            })
        })
        .collect();
    let duals: Vec<Dual<f64>> = inputs
        .iter()
        .zip(&dirs)
        .map(|(x, d)| match d {
            Some(d) => eng
                .dual(x.clone(), from_canonical(d, K).unwrap())
                .unwrap_or_else(|e| panic!("{label}: Fwd::dual: {e}")),
            None => Dual::constant(x.clone()),
        })
        .collect();
    let out = f(&mut eng, &duals).unwrap_or_else(|e| panic!("{label}: forward-K run: {e}"));
    let shape = out.primal.shape().to_vec();
    let n = out.primal.numel();

    // The primal engine must agree on the value and carry no tangent.
    let consts: Vec<Dual<f64>> = inputs.iter().map(|x| Dual::constant(x.clone())).collect();
    let p0 = f(&mut Fwd::primal(), &consts).unwrap_or_else(|e| panic!("{label}: primal run: {e}"));
    assert!(
        p0.tangent.is_none(),
        "{label}: primal engine made a tangent"
    );
    assert_eq!(
        p0.primal.shape(),
        shape.as_slice(),
        "{label}: primal shapes differ"
    );
    let f0 = p0.primal.to_f64_vec();
    let max_f = max_abs(&f0);
    let pdiff = max_abs_diff(&f0, &out.primal.to_f64_vec());
    assert!(
        pdiff <= 1e-13 * (1.0 + max_f),
        "{label}: forward-K primal differs from the primal engine by {pdiff:e}"
    );

    if !has_t.iter().any(|&t| t) {
        // all inputs constant: no tangent may come out
        return Comparison {
            max_err: 0.0,
            tol: 0.0,
            max_jvp: 0.0,
            tangent_none: out.tangent.is_none(),
        };
    }

    let tangent_none = out.tangent.is_none();
    let jvp = match &out.tangent {
        Some(t) => {
            assert_eq!(
                t.shape(),
                tangent_shape(&shape, K).as_slice(),
                "{label}: tangent shape for a primal of shape {shape:?}"
            );
            to_canonical(t, &shape, K).unwrap().to_f64_vec()
        }
        None => vec![0.0; K * n],
    };
    let max_jvp = max_abs(&jvp);

    let eval = |k: usize, sign: f64| -> Vec<f64> {
        let xs: Vec<Dual<f64>> = inputs
            .iter()
            .zip(&dirs)
            .map(|(x, d)| match d {
                None => Dual::constant(x.clone()),
                Some(d) => {
                    let m = x.numel();
                    let dk = &d.data()[k * m..(k + 1) * m];
                    let mut y = x.clone();
                    for (v, &dv) in y.data_mut().iter_mut().zip(dk) {
                        *v += sign * H * dv;
                    }
                    Dual::constant(y)
                }
            })
            .collect();
        let y = f(&mut Fwd::primal(), &xs).unwrap_or_else(|e| panic!("{label}: fd run: {e}"));
        assert_eq!(y.primal.shape(), shape.as_slice());
        y.primal.to_f64_vec()
    };

    let mut max_err: f64 = 0.0;
    for k in 0..K {
        let plus = eval(k, 1.0);
        let minus = eval(k, -1.0);
        for j in 0..n {
            let fd = (plus[j] - minus[j]) / (2.0 * H);
            max_err = worst(max_err, fd - jvp[k * n + j]);
        }
    }
    Comparison {
        max_err,
        tol: RTOL * (1.0 + max_jvp.max(max_f)),
        max_jvp,
        tangent_none,
    }
}

/// [`compare_jvp`], asserting agreement. With no tangent-carrying input the
/// output must carry `tangent: None`; otherwise the JVP must be nonzero (so
/// that no check passes vacuously).
fn check_jvp<F>(label: &str, inputs: &[Tensor<f64>], has_t: &[bool], seed: u64, f: F)
where
    F: Fn(&mut Fwd, &[Dual<f64>]) -> Result<Dual<f64>>,
{
    let c = compare_jvp(label, inputs, has_t, seed, f);
    if !has_t.iter().any(|&t| t) {
        assert!(
            c.tangent_none,
            "{label}: all inputs constant but the output has a tangent"
        );
        return;
    }
    assert!(
        c.max_err <= c.tol,
        "{label} (tangents on {has_t:?}): |fd - jvp| = {:e} > tol {:e} (max |jvp| = {:e})",
        c.max_err,
        c.tol,
        c.max_jvp
    );
    assert!(
        c.max_jvp > 1e-6,
        "{label} (tangents on {has_t:?}): vacuous check, the JVP is zero"
    );
}

/// [`check_jvp`] for every subset of inputs carrying tangents (the empty
/// subset included: it must give `tangent: None`).
fn check_all_subsets<F>(label: &str, inputs: &[Tensor<f64>], seed: u64, f: F)
where
    F: Fn(&mut Fwd, &[Dual<f64>]) -> Result<Dual<f64>>,
{
    let n = inputs.len();
    assert!(n <= 8);
    for mask in 0..(1u32 << n) {
        let has_t: Vec<bool> = (0..n).map(|i| mask >> i & 1 == 1).collect();
        check_jvp(
            &format!("{label} mask {mask:#b}"),
            inputs,
            &has_t,
            seed.wrapping_add(mask as u64),
            &f,
        );
    }
}

/// `r` is an error (not a panic) whose message names `op`.
fn expect_err<V: std::fmt::Debug>(r: Result<V>, op: &str) {
    match r {
        Ok(v) => panic!("expected an error from {op}, got {v:?}"),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains(op),
                "error message {msg:?} does not name the op {op:?}"
            );
        }
    }
}

/// A dual with random tangents, for the error and None-vs-zero tests.
fn rand_dual(rng: &mut Rng, e: &Fwd, shape: &[usize]) -> Dual<f64> {
    let x = rng.tensor(shape, N1);
    let t = rng.tensor(&tangent_shape(shape, e.k()), N1);
    e.dual(x, t).unwrap()
}

fn zero_dual(e: &Fwd, x: &Tensor<f64>) -> Dual<f64> {
    e.dual(x.clone(), Tensor::zeros(&tangent_shape(x.shape(), e.k())))
        .unwrap()
}

// ---------------------------------------------------------------------------
// The harness itself.

#[test]
fn rng_is_deterministic_and_roughly_normal() {
    let mut a = Rng::new(7);
    let mut b = Rng::new(7);
    let xs: Vec<f64> = (0..20000).map(|_| a.normal()).collect();
    let ys: Vec<f64> = (0..20000).map(|_| b.normal()).collect();
    assert_eq!(xs, ys);
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64;
    assert!(mean.abs() < 0.05, "mean {mean}");
    assert!((var - 1.0).abs() < 0.05, "var {var}");
}

#[test]
fn harness_detects_wrong_tangents() {
    let mut rng = Rng::new(1);
    let x = rng.tensor(&[3, 4], N1);
    // a tangent off by 0.1 %
    let c = compare_jvp("scaled", std::slice::from_ref(&x), &[true], 2, |e, xs| {
        let mut y = e.tanh(&xs[0])?;
        y.tangent = y.tangent.map(|t| t.scale(1.001));
        Ok(y)
    });
    assert!(c.max_err > 100.0 * c.tol, "{c:?}");
    // right numbers in the wrong layout (canonical data as layout)
    let c = compare_jvp("layout", std::slice::from_ref(&x), &[true], 3, |e, xs| {
        let mut y = e.tanh(&xs[0])?;
        let shape = y.primal.shape().to_vec();
        y.tangent = match y.tangent {
            Some(t) => {
                let c = to_canonical(&t, &shape, K)?;
                Some(Tensor::from_vec(&tangent_shape(&shape, K), c.into_vec())?)
            }
            None => None,
        };
        Ok(y)
    });
    assert!(c.max_err > 100.0 * c.tol, "{c:?}");
    // a dropped tangent
    let c = compare_jvp("dropped", &[x], &[true], 4, |e, xs| {
        let mut y = e.exp(&xs[0])?;
        y.tangent = None;
        Ok(y)
    });
    assert!(c.tangent_none);
    assert!(c.max_err > 100.0 * c.tol, "{c:?}");
}

#[test]
fn dual_rejects_wrong_tangent_shape() {
    let e = Fwd::new(K);
    let x = Tensor::<f64>::zeros(&[2, 5]);
    // canonical [K, 2, 5] is not the engine's layout [2, K, 5]
    expect_err(e.dual(x.clone(), Tensor::zeros(&[K, 2, 5])), "Fwd::dual");
    expect_err(e.dual(x, Tensor::zeros(&[2, K + 1, 5])), "Fwd::dual");
    expect_err(
        e.dual(Tensor::<f64>::scalar(1.0), Tensor::zeros(&[1, K])),
        "Fwd::dual",
    );
}

#[test]
fn layout_round_trips() {
    let mut rng = Rng::new(11);
    for shape in [vec![], vec![4], vec![2, 3], vec![2, 3, 4]] {
        let mut cs = vec![K];
        cs.extend_from_slice(&shape);
        let c = rng.tensor(&cs, N1);
        let t = from_canonical(&c, K).unwrap();
        assert_eq!(t.shape(), tangent_shape(&shape, K).as_slice());
        let back = to_canonical(&t, &shape, K).unwrap();
        assert_eq!(back.shape(), c.shape());
        assert_eq!(back.data(), c.data());
        // element [k, i.., j] sits at [i.., k, j]
        if shape.len() == 2 {
            let (a, b) = (shape[0], shape[1]);
            for k in 0..K {
                for i in 0..a {
                    for j in 0..b {
                        assert_eq!(c.data()[(k * a + i) * b + j], t.data()[(i * K + k) * b + j]);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Elementwise ops.

const UNARY_OPS: [(Unary, Dist); 14] = [
    (Unary::Neg, N1),
    (Unary::Abs, Dist::AwayFromZero(0.1)),
    (Unary::Exp, N1),
    (Unary::Log, Dist::Uniform(0.3, 3.0)),
    (Unary::Tanh, Dist::Normal(1.5)),
    (Unary::Relu, Dist::AwayFromZero(0.1)),
    (Unary::Softplus, Dist::Normal(3.0)),
    (Unary::Sigmoid, Dist::Normal(3.0)),
    (Unary::Square, N1),
    (Unary::Sqrt, Dist::Uniform(0.3, 3.0)),
    (Unary::Sin, Dist::Normal(3.0)),
    (Unary::Cos, Dist::Normal(3.0)),
    (Unary::AddScalar(0.7), N1),
    (Unary::MulScalar(-1.3), N1),
];

#[test]
fn unary_ops() {
    let mut rng = Rng::new(100);
    for (op, dist) in UNARY_OPS {
        let mut shapes = vec![vec![], vec![7], vec![3, 4], vec![2, 3, 4]];
        for _ in 0..4 {
            let r = rng.below(5);
            shapes.push(rng.shape(r, 5));
        }
        for shape in shapes {
            let mut x = rng.tensor(&shape, dist);
            if op == Unary::Relu {
                // at least one active unit, so the check is not vacuous
                x.data_mut()[0] = x.data()[0].abs();
            }
            let label = format!("{op:?} on {shape:?}");
            check_jvp(&label, &[x], &[true], rng.next_u64(), |e, xs| {
                e.unary(&xs[0], op)
            });
        }
    }
}

#[test]
fn unary_conveniences() {
    type UnFn = fn(&mut Fwd, &Dual<f64>) -> Result<Dual<f64>>;
    let table: [(&str, UnFn, Dist); 11] = [
        ("neg", |e, x| e.neg(x), N1),
        ("exp", |e, x| e.exp(x), N1),
        ("log", |e, x| e.log(x), Dist::Uniform(0.3, 3.0)),
        ("tanh", |e, x| e.tanh(x), N1),
        ("relu", |e, x| e.relu(x), Dist::AwayFromZero(0.1)),
        ("softplus", |e, x| e.softplus(x), Dist::Normal(3.0)),
        ("sigmoid", |e, x| e.sigmoid(x), Dist::Normal(3.0)),
        ("square", |e, x| e.square(x), N1),
        ("sqrt", |e, x| e.sqrt(x), Dist::Uniform(0.3, 3.0)),
        ("add_scalar", |e, x| e.add_scalar(x, -2.5), N1),
        ("mul_scalar", |e, x| e.mul_scalar(x, 0.25), N1),
    ];
    let mut rng = Rng::new(101);
    for (name, op, dist) in table {
        let mut x = rng.tensor(&[4, 6], dist);
        x.data_mut()[0] = x.data()[0].abs();
        check_jvp(name, &[x], &[true], rng.next_u64(), |e, xs| op(e, &xs[0]));
    }
}

#[test]
fn softplus_and_sigmoid_far_from_zero() {
    // the overflow-safe forms must keep the right derivatives in the tails
    let x = Tensor::from_f64_slice(&[6], &[-30.0, -12.0, -0.5, 0.5, 12.0, 30.0]).unwrap();
    for op in [Unary::Softplus, Unary::Sigmoid, Unary::Tanh] {
        check_jvp(
            &format!("{op:?} tails"),
            std::slice::from_ref(&x),
            &[true],
            5,
            |e, xs| e.unary(&xs[0], op),
        );
    }
}

const BINARY_OPS: [Binary; 4] = [Binary::Add, Binary::Sub, Binary::Mul, Binary::Div];

fn binary_inputs(rng: &mut Rng, op: Binary, sa: &[usize], sb: &[usize]) -> Vec<Tensor<f64>> {
    let db = if op == Binary::Div {
        Dist::AwayFromZero(0.5)
    } else {
        N1
    };
    vec![rng.tensor(sa, N1), rng.tensor(sb, db)]
}

#[test]
fn binary_same_shape() {
    let mut rng = Rng::new(200);
    let mut shapes = vec![vec![], vec![6], vec![3, 4], vec![2, 3, 4]];
    for _ in 0..4 {
        let r = 1 + rng.below(4);
        shapes.push(rng.shape(r, 5));
    }
    for op in BINARY_OPS {
        for s in &shapes {
            let xs = binary_inputs(&mut rng, op, s, s);
            let label = format!("{op:?} {s:?}");
            check_all_subsets(&label, &xs, rng.next_u64(), |e, v| {
                e.binary(&v[0], &v[1], op)
            });
        }
    }
}

/// A shape that broadcasts to `full`: some leading axes dropped, some
/// extents set to 1.
fn broadcastable_from(rng: &mut Rng, full: &[usize]) -> Vec<usize> {
    let drop = rng.below(full.len() + 1);
    full[drop..]
        .iter()
        .map(|&d| if rng.coin() { 1 } else { d })
        .collect()
}

#[test]
fn binary_broadcasting() {
    let mut rng = Rng::new(300);
    let mut pairs: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![4, 5], vec![5]),
        (vec![5], vec![4, 5]),
        (vec![3, 1, 5], vec![4, 5]),
        (vec![4, 5], vec![3, 1, 5]),
        (vec![4, 5], vec![1]),
        (vec![1], vec![4, 5]),
        (vec![2, 3, 4], vec![]),
        (vec![], vec![2, 3, 4]),
        (vec![4, 1], vec![1, 5]),
        (vec![2, 1, 4], vec![2, 3, 1]),
        (vec![3, 4], vec![3, 1]),
        (vec![1, 1], vec![3]),
    ];
    for _ in 0..8 {
        let r = 1 + rng.below(4);
        let full = rng.shape(r, 4);
        let a = broadcastable_from(&mut rng, &full);
        let b = broadcastable_from(&mut rng, &full);
        pairs.push((a, b));
    }
    for op in BINARY_OPS {
        for (sa, sb) in &pairs {
            let xs = binary_inputs(&mut rng, op, sa, sb);
            let label = format!("{op:?} {sa:?} with {sb:?}");
            check_all_subsets(&label, &xs, rng.next_u64(), |e, v| {
                e.binary(&v[0], &v[1], op)
            });
        }
    }
}

#[test]
fn binary_conveniences() {
    let mut rng = Rng::new(301);
    let a = rng.tensor(&[3, 4], N1);
    let b = rng.tensor(&[4], Dist::AwayFromZero(0.5));
    let xs = [a, b];
    check_jvp("add", &xs, &[true, true], 1, |e, v| e.add(&v[0], &v[1]));
    check_jvp("sub", &xs, &[true, true], 2, |e, v| e.sub(&v[0], &v[1]));
    check_jvp("mul", &xs, &[true, true], 3, |e, v| e.mul(&v[0], &v[1]));
    check_jvp("div", &xs, &[true, true], 4, |e, v| e.div(&v[0], &v[1]));
}

#[test]
fn binary_shape_mismatch_is_an_error() {
    let mut rng = Rng::new(302);
    let mut e = Fwd::new(K);
    for (op, name) in [
        (Binary::Add, "add"),
        (Binary::Sub, "sub"),
        (Binary::Mul, "mul"),
        (Binary::Div, "div"),
    ] {
        for (sa, sb) in [
            (vec![4, 5], vec![4]),
            (vec![2, 3], vec![3, 2]),
            (vec![3, 4, 5], vec![2, 5]),
        ] {
            let a = rand_dual(&mut rng, &e, &sa);
            let b = rand_dual(&mut rng, &e, &sb);
            expect_err(e.binary(&a, &b, op), name);
            // also with constants and with one side constant
            let ac = Dual::constant(a.primal.clone());
            expect_err(e.binary(&ac, &b, op), name);
            let bc = Dual::constant(b.primal.clone());
            expect_err(e.binary(&ac, &bc, op), name);
        }
    }
}

// ---------------------------------------------------------------------------
// matmul and linear.

#[test]
fn matmul() {
    let mut rng = Rng::new(400);
    let mut cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![3, 4], vec![4, 5]),
        (vec![2, 3, 4], vec![4, 5]),
        (vec![4], vec![4, 5]),
        (vec![1, 4], vec![4, 1]),
        (vec![5, 1], vec![1, 3]),
        (vec![2, 2, 3, 4], vec![4, 2]),
    ];
    for _ in 0..4 {
        let r = 1 + rng.below(3);
        let sa = rng.shape(r, 5);
        let kd = *sa.last().unwrap();
        let n = 1 + rng.below(5);
        cases.push((sa, vec![kd, n]));
    }
    for (sa, sb) in cases {
        let xs = [rng.tensor(&sa, N1), rng.tensor(&sb, N1)];
        let label = format!("matmul {sa:?} · {sb:?}");
        check_all_subsets(&label, &xs, rng.next_u64(), |e, v| e.matmul(&v[0], &v[1]));
    }
}

#[test]
fn matmul_shape_mismatch_is_an_error() {
    let mut rng = Rng::new(401);
    let mut e = Fwd::new(K);
    for (sa, sb) in [
        (vec![3, 4], vec![5, 6]),
        (vec![3, 4], vec![4]),
        (vec![3, 4], vec![2, 4, 5]),
        (vec![], vec![4, 5]),
        (vec![2, 3, 4], vec![3, 4]),
    ] {
        let a = rand_dual(&mut rng, &e, &sa);
        let b = rand_dual(&mut rng, &e, &sb);
        expect_err(e.matmul(&a, &b), "matmul");
        let ac = Dual::constant(a.primal.clone());
        expect_err(e.matmul(&ac, &b), "matmul");
        let bc = Dual::constant(b.primal.clone());
        expect_err(e.matmul(&a, &bc), "matmul");
        expect_err(e.matmul(&ac, &bc), "matmul");
    }
}

/// Shape of one call of `linear`: batch axes, the inner dimension of each
/// term, the output width, and whether there is a leak and a bias.
#[derive(Debug, Clone)]
struct LinCfg {
    batch: Vec<usize>,
    ks: Vec<usize>,
    n: usize,
    leak: bool,
    bias: bool,
}

const LEAK_C: f64 = 0.9;
const SCALE: f64 = 0.7;

impl LinCfg {
    /// Inputs in the order a_1, w_1, (a_2, w_2), (leak x), (bias).
    fn inputs(&self, rng: &mut Rng) -> Vec<Tensor<f64>> {
        let with_last = |d: usize| {
            let mut s = self.batch.clone();
            s.push(d);
            s
        };
        let mut v = vec![];
        for &k in &self.ks {
            v.push(rng.tensor(&with_last(k), N1));
            v.push(rng.tensor(&[k, self.n], N1));
        }
        if self.leak {
            v.push(rng.tensor(&with_last(self.n), N1));
        }
        if self.bias {
            v.push(rng.tensor(&[self.n], N1));
        }
        v
    }

    fn run(&self, e: &mut Fwd, xs: &[Dual<f64>]) -> Result<Dual<f64>> {
        let nt = self.ks.len();
        let terms: Vec<(&Dual<f64>, &Dual<f64>)> =
            (0..nt).map(|i| (&xs[2 * i], &xs[2 * i + 1])).collect();
        let mut i = 2 * nt;
        let leak = if self.leak {
            i += 1;
            Some((&xs[i - 1], LEAK_C))
        } else {
            None
        };
        let bias = self.bias.then(|| &xs[i]);
        e.linear(leak, SCALE, &terms, bias)
    }

    /// The same map from matmul, add and mul_scalar.
    fn reference(&self, e: &mut Fwd, xs: &[Dual<f64>]) -> Result<Dual<f64>> {
        let nt = self.ks.len();
        let mut acc = e.matmul(&xs[0], &xs[1])?;
        for i in 1..nt {
            let p = e.matmul(&xs[2 * i], &xs[2 * i + 1])?;
            acc = e.add(&acc, &p)?;
        }
        let mut i = 2 * nt;
        if self.leak {
            i += 1;
        }
        if self.bias {
            acc = e.add(&acc, &xs[i])?;
        }
        let mut y = e.mul_scalar(&acc, SCALE)?;
        if self.leak {
            let l = e.mul_scalar(&xs[2 * nt], LEAK_C)?;
            y = e.add(&l, &y)?;
        }
        Ok(y)
    }
}

fn linear_configs(rng: &mut Rng) -> Vec<LinCfg> {
    let mut out = vec![];
    for batch in [vec![3], vec![2, 3], vec![]] {
        for two in [false, true] {
            for leak in [false, true] {
                for bias in [false, true] {
                    let ks = if two {
                        vec![1 + rng.below(4), 1 + rng.below(4)]
                    } else {
                        vec![1 + rng.below(4)]
                    };
                    out.push(LinCfg {
                        batch: batch.clone(),
                        ks,
                        n: 1 + rng.below(4),
                        leak,
                        bias,
                    });
                }
            }
        }
    }
    out
}

#[test]
fn linear_every_tangent_subset() {
    let mut rng = Rng::new(500);
    for cfg in linear_configs(&mut rng) {
        let xs = cfg.inputs(&mut rng);
        let label = format!("linear {cfg:?}");
        check_all_subsets(&label, &xs, rng.next_u64(), |e, v| cfg.run(e, v));
    }
}

#[test]
fn linear_matches_its_composition() {
    // Same value and same tangents as matmul + add + mul_scalar, so the fused
    // op computes the documented map and not just a self-consistent one.
    let mut rng = Rng::new(501);
    for cfg in linear_configs(&mut rng) {
        let xs = cfg.inputs(&mut rng);
        let e = Fwd::new(K);
        let duals: Vec<Dual<f64>> = xs
            .iter()
            .map(|x| rand_dual(&mut rng, &e, x.shape()))
            .collect();
        let duals: Vec<Dual<f64>> = duals
            .into_iter()
            .zip(xs)
            .map(|(d, x)| Dual {
                primal: x,
                tangent: d.tangent,
            })
            .collect();
        let y = cfg.run(&mut Fwd::new(K), &duals).unwrap();
        let r = cfg.reference(&mut Fwd::new(K), &duals).unwrap();
        assert_eq!(y.primal.shape(), r.primal.shape());
        let scale = 1.0 + max_abs(&r.primal.to_f64_vec());
        let d = max_abs_diff(&y.primal.to_f64_vec(), &r.primal.to_f64_vec());
        assert!(d <= 1e-12 * scale, "{cfg:?}: primal differs by {d:e}");
        let (yt, rt) = (y.tangent.unwrap(), r.tangent.unwrap());
        assert_eq!(yt.shape(), rt.shape());
        let scale = 1.0 + max_abs(&rt.to_f64_vec());
        let d = max_abs_diff(&yt.to_f64_vec(), &rt.to_f64_vec());
        assert!(d <= 1e-12 * scale, "{cfg:?}: tangent differs by {d:e}");
    }
}

#[test]
fn linear_bad_shapes_are_errors() {
    let mut rng = Rng::new(502);
    let mut e = Fwd::new(K);
    let mut d = |s: &[usize]| rand_dual(&mut rng, &Fwd::new(K), s);
    let a = d(&[3, 4]);
    let w = d(&[4, 5]);
    let a2 = d(&[3, 2]);
    let w2 = d(&[2, 5]);
    let x = d(&[3, 5]);
    let b = d(&[5]);
    // sanity: the well-formed call works
    e.linear(Some((&x, 0.5)), 1.0, &[(&a, &w), (&a2, &w2)], Some(&b))
        .unwrap();
    // no terms
    expect_err(e.linear(None, 1.0, &[], None), "linear");
    // weight not of rank 2
    expect_err(e.linear(None, 1.0, &[(&a, &d(&[4]))], None), "linear");
    expect_err(e.linear(None, 1.0, &[(&a, &d(&[1, 4, 5]))], None), "linear");
    // inner dimensions disagree
    expect_err(e.linear(None, 1.0, &[(&a, &d(&[3, 5]))], None), "linear");
    expect_err(
        e.linear(None, 1.0, &[(&a, &w), (&a2, &d(&[3, 5]))], None),
        "linear",
    );
    // second term's output width disagrees
    expect_err(
        e.linear(None, 1.0, &[(&a, &w), (&a2, &d(&[2, 6]))], None),
        "linear",
    );
    // second term's batch shape disagrees
    expect_err(
        e.linear(None, 1.0, &[(&a, &w), (&d(&[4, 2]), &w2)], None),
        "linear",
    );
    expect_err(
        e.linear(None, 1.0, &[(&a, &w), (&d(&[1, 3, 2]), &w2)], None),
        "linear",
    );
    expect_err(
        e.linear(None, 1.0, &[(&a, &w), (&d(&[2]), &w2)], None),
        "linear",
    );
    // scalar input
    expect_err(e.linear(None, 1.0, &[(&d(&[]), &w)], None), "linear");
    // bias and leak shapes
    expect_err(e.linear(None, 1.0, &[(&a, &w)], Some(&d(&[4]))), "linear");
    expect_err(
        e.linear(None, 1.0, &[(&a, &w)], Some(&d(&[1, 5]))),
        "linear",
    );
    expect_err(
        e.linear(Some((&d(&[3, 4]), 0.5)), 1.0, &[(&a, &w)], None),
        "linear",
    );
    expect_err(
        e.linear(Some((&d(&[5]), 0.5)), 1.0, &[(&a, &w)], None),
        "linear",
    );
}

// ---------------------------------------------------------------------------
// Reductions and shape ops.

/// Every subset of the axes of a rank-r shape, in a shuffled order.
fn axis_subsets(rng: &mut Rng, r: usize) -> Vec<Vec<usize>> {
    (0..1u32 << r)
        .map(|m| {
            let mut axes: Vec<usize> = (0..r).filter(|&i| m >> i & 1 == 1).collect();
            if axes.len() > 1 && rng.coin() {
                axes.reverse();
            }
            axes
        })
        .collect()
}

#[test]
fn sum_and_mean_over_axes() {
    let mut rng = Rng::new(600);
    let mut shapes = vec![vec![5], vec![3, 4], vec![2, 3, 4], vec![1, 3, 1]];
    for _ in 0..3 {
        let r = 1 + rng.below(4);
        shapes.push(rng.shape(r, 4));
    }
    for s in shapes {
        for axes in axis_subsets(&mut rng, s.len()) {
            let x = rng.tensor(&s, N1);
            check_jvp(
                &format!("sum {s:?} over {axes:?}"),
                std::slice::from_ref(&x),
                &[true],
                rng.next_u64(),
                |e, v| e.sum(&v[0], &axes),
            );
            check_jvp(
                &format!("mean {s:?} over {axes:?}"),
                &[x],
                &[true],
                rng.next_u64(),
                |e, v| e.mean(&v[0], &axes),
            );
        }
    }
    // a scalar summed over no axes
    let x = Tensor::scalar(0.3);
    check_jvp("sum scalar", &[x], &[true], 1, |e, v| e.sum(&v[0], &[]));
}

#[test]
fn sum_bad_axis_is_an_error() {
    let mut rng = Rng::new(601);
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[2, 3]);
    expect_err(e.sum(&x, &[2]), "sum");
    expect_err(e.sum(&x, &[0, 5]), "sum");
    expect_err(e.mean(&x, &[2]), "sum");
}

#[test]
fn concat_along_axes() {
    let mut rng = Rng::new(700);
    let cases: Vec<(Vec<Vec<usize>>, usize)> = vec![
        (vec![vec![2, 3], vec![4, 3]], 0),
        (vec![vec![2, 3], vec![2, 5]], 1),
        (vec![vec![2, 3, 4], vec![2, 1, 4], vec![2, 2, 4]], 1),
        (vec![vec![2, 3, 4], vec![2, 3, 2]], 2),
        (vec![vec![1, 3, 4], vec![2, 3, 4]], 0),
        (vec![vec![3], vec![4], vec![1]], 0),
        (vec![vec![2, 3]], 1),
    ];
    for (shapes, axis) in cases {
        let xs: Vec<Tensor<f64>> = shapes.iter().map(|s| rng.tensor(s, N1)).collect();
        let label = format!("concat {shapes:?} axis {axis}");
        check_all_subsets(&label, &xs, rng.next_u64(), |e, v| {
            let refs: Vec<&Dual<f64>> = v.iter().collect();
            e.concat(&refs, axis)
        });
    }
}

#[test]
fn concat_bad_shapes_are_errors() {
    let mut rng = Rng::new(701);
    let mut e = Fwd::new(K);
    let a = rand_dual(&mut rng, &e, &[2, 3]);
    let b = rand_dual(&mut rng, &e, &[2, 4]);
    let c = rand_dual(&mut rng, &e, &[2, 3, 1]);
    expect_err(e.concat(&[&a, &b], 0), "concat");
    expect_err(e.concat(&[&a, &c], 1), "concat");
    expect_err(e.concat(&[&a, &a], 2), "concat");
    expect_err(e.concat(&[] as &[&Dual<f64>], 0), "concat");
    let bc = Dual::constant(b.primal.clone());
    expect_err(e.concat(&[&a, &bc], 0), "concat");
}

#[test]
fn slice_along_axes() {
    let mut rng = Rng::new(800);
    let cases: Vec<(Vec<usize>, usize, usize, usize)> = vec![
        (vec![5, 4], 0, 1, 3),
        (vec![5, 4], 1, 2, 2),
        (vec![2, 5, 3], 1, 0, 4),
        (vec![2, 5, 3], 2, 1, 1),
        (vec![2, 5, 3], 0, 1, 1),
        (vec![6], 0, 2, 3),
        (vec![3, 4], 1, 0, 4),
    ];
    for (s, axis, start, len) in cases {
        let x = rng.tensor(&s, N1);
        check_jvp(
            &format!("slice {s:?} axis {axis} [{start}, +{len})"),
            &[x],
            &[true],
            rng.next_u64(),
            |e, v| e.slice(&v[0], axis, start, len),
        );
    }
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[3, 4]);
    expect_err(e.slice(&x, 1, 2, 3), "slice");
    expect_err(e.slice(&x, 2, 0, 1), "slice");
}

#[test]
fn reshape_shapes() {
    let mut rng = Rng::new(900);
    let cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![2, 3, 4], vec![6, 4]),
        (vec![2, 3, 4], vec![4, 6]),
        (vec![2, 3, 4], vec![24]),
        (vec![2, 3, 4], vec![2, 12]),
        (vec![2, 3, 4], vec![4, 3, 2]),
        (vec![6], vec![2, 3]),
        (vec![1], vec![]),
        (vec![], vec![1, 1]),
        (vec![3, 4], vec![12, 1]),
    ];
    for (s, t) in cases {
        let x = rng.tensor(&s, N1);
        check_jvp(
            &format!("reshape {s:?} to {t:?}"),
            &[x],
            &[true],
            rng.next_u64(),
            |e, v| e.reshape(&v[0], &t),
        );
    }
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[2, 3]);
    expect_err(e.reshape(&x, &[5]), "reshape");
}

#[test]
fn transpose_axes() {
    let mut rng = Rng::new(1000);
    let cases: Vec<(Vec<usize>, usize, usize)> = vec![
        // rank-2 fast path
        (vec![3, 5], 0, 1),
        (vec![3, 5], 1, 0),
        (vec![1, 4], 0, 1),
        (vec![3, 5], 1, 1),
        // general path
        (vec![2, 3, 4], 0, 2),
        (vec![2, 3, 4], 0, 1),
        (vec![2, 3, 4], 2, 1),
        (vec![2, 3, 4, 2], 1, 3),
        (vec![5], 0, 0),
    ];
    for (s, a, b) in cases {
        let x = rng.tensor(&s, N1);
        check_jvp(
            &format!("transpose {s:?} ({a}, {b})"),
            &[x],
            &[true],
            rng.next_u64(),
            |e, v| e.transpose(&v[0], a, b),
        );
    }
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[2, 3]);
    expect_err(e.transpose(&x, 0, 2), "transpose");
}

#[test]
fn broadcast_to_shapes() {
    let mut rng = Rng::new(1100);
    let mut cases: Vec<(Vec<usize>, Vec<usize>)> = vec![
        (vec![5], vec![4, 5]),
        (vec![1], vec![3, 4]),
        (vec![], vec![2, 3]),
        (vec![], vec![]),
        (vec![3, 1], vec![3, 4]),
        (vec![3, 1, 5], vec![2, 3, 4, 5]),
        (vec![4, 1], vec![2, 4, 3]),
        (vec![2, 3], vec![2, 3]),
    ];
    for _ in 0..4 {
        let r = 1 + rng.below(4);
        let full = rng.shape(r, 4);
        let from = broadcastable_from(&mut rng, &full);
        cases.push((from, full));
    }
    for (s, t) in cases {
        let x = rng.tensor(&s, N1);
        check_jvp(
            &format!("broadcast_to {s:?} to {t:?}"),
            &[x],
            &[true],
            rng.next_u64(),
            |e, v| e.broadcast_to(&v[0], &t),
        );
    }
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[3]);
    expect_err(e.broadcast_to(&x, &[4, 5]), "broadcast_to");
    let x = rand_dual(&mut rng, &e, &[2, 3]);
    expect_err(e.broadcast_to(&x, &[3]), "broadcast_to");
}

#[test]
fn softmax_and_log_softmax() {
    let mut rng = Rng::new(1200);
    let mut shapes = vec![vec![5], vec![3, 6], vec![2, 3, 4], vec![4, 1]];
    for _ in 0..3 {
        let r = 1 + rng.below(3);
        shapes.push(rng.shape(r, 6));
    }
    for s in shapes {
        for scale in [1.0, 8.0] {
            let x = rng.tensor(&s, Dist::Normal(scale));
            let l = *s.last().unwrap();
            for log in [false, true] {
                let label = format!("softmax (log {log}) {s:?} scale {scale}");
                let f = |e: &mut Fwd, v: &[Dual<f64>]| {
                    if log {
                        e.log_softmax(&v[0])
                    } else {
                        e.softmax(&v[0])
                    }
                };
                if l > 1 {
                    check_jvp(&label, std::slice::from_ref(&x), &[true], rng.next_u64(), f);
                } else {
                    // over one class the output is constant (1, or 0 for
                    // log_softmax): the JVP must be exactly zero
                    let c = compare_jvp(&label, std::slice::from_ref(&x), &[true], 1, f);
                    assert!(c.max_jvp == 0.0 && c.max_err <= c.tol, "{label}: {c:?}");
                }
            }
            // the primals are what they claim to be
            let mut p = Fwd::primal();
            let xc = Dual::constant(x);
            let sm = p.softmax(&xc).unwrap().primal.to_f64_vec();
            let ls = p.log_softmax(&xc).unwrap().primal.to_f64_vec();
            for (row, lrow) in sm.chunks(l).zip(ls.chunks(l)) {
                assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
                for (a, b) in row.iter().zip(lrow) {
                    assert!((a.ln() - b).abs() < 1e-9 * (1.0 + b.abs()));
                }
            }
        }
    }
    let mut e = Fwd::new(K);
    let x = rand_dual(&mut rng, &e, &[]);
    expect_err(e.softmax(&x), "softmax");
    expect_err(e.log_softmax(&x), "softmax");
}

// ---------------------------------------------------------------------------
// Tangent None.

#[test]
fn constant_inputs_give_no_tangent() {
    let mut rng = Rng::new(1300);
    let mut e = Fwd::new(K);
    let mut c = |s: &[usize]| Dual::constant(rng.tensor(s, Dist::Uniform(0.5, 2.0)));
    let a = c(&[3, 4]);
    let b = c(&[4]);
    let w = c(&[4, 2]);
    let x = c(&[3, 2]);
    let bias = c(&[2]);
    let mut outs: Vec<(String, Dual<f64>)> = vec![];
    for (op, _) in UNARY_OPS {
        outs.push((format!("{op:?}"), e.unary(&a, op).unwrap()));
    }
    for op in BINARY_OPS {
        outs.push((format!("{op:?}"), e.binary(&a, &b, op).unwrap()));
    }
    outs.push(("matmul".into(), e.matmul(&a, &w).unwrap()));
    outs.push((
        "linear".into(),
        e.linear(Some((&x, 0.5)), 0.3, &[(&a, &w)], Some(&bias))
            .unwrap(),
    ));
    outs.push(("sum".into(), e.sum(&a, &[1]).unwrap()));
    outs.push(("sum all".into(), e.sum(&a, &[0, 1]).unwrap()));
    outs.push(("mean".into(), e.mean(&a, &[0]).unwrap()));
    outs.push(("concat".into(), e.concat(&[&a, &a], 0).unwrap()));
    outs.push(("slice".into(), e.slice(&a, 1, 1, 2).unwrap()));
    outs.push(("reshape".into(), e.reshape(&a, &[12]).unwrap()));
    outs.push(("transpose".into(), e.transpose(&a, 0, 1).unwrap()));
    let a3 = e.reshape(&a, &[3, 2, 2]).unwrap();
    outs.push(("transpose3".into(), e.transpose(&a3, 0, 2).unwrap()));
    outs.push(("broadcast_to".into(), e.broadcast_to(&b, &[2, 4]).unwrap()));
    outs.push(("softmax".into(), e.softmax(&a).unwrap()));
    outs.push(("log_softmax".into(), e.log_softmax(&a).unwrap()));
    for (name, y) in outs {
        assert!(
            y.tangent.is_none(),
            "{name}: constant inputs gave a tangent"
        );
    }
}

#[test]
fn none_tangent_equals_zero_tangent() {
    // An input with `tangent: None` must act exactly like one with all-zero
    // tangents, in every op with more than one input.
    let mut rng = Rng::new(1400);
    let e = Fwd::new(K);
    type Multi = Box<dyn Fn(&mut Fwd, &[Dual<f64>]) -> Result<Dual<f64>>>;
    let mut cases: Vec<(&str, Vec<Vec<usize>>, Multi)> = vec![];
    for op in BINARY_OPS {
        cases.push((
            "binary",
            vec![vec![3, 4], vec![4]],
            Box::new(move |e, v| e.binary(&v[0], &v[1], op)),
        ));
        cases.push((
            "binary",
            vec![vec![1], vec![2, 3]],
            Box::new(move |e, v| e.binary(&v[0], &v[1], op)),
        ));
    }
    cases.push((
        "matmul",
        vec![vec![2, 3, 4], vec![4, 5]],
        Box::new(|e, v| e.matmul(&v[0], &v[1])),
    ));
    cases.push((
        "linear",
        vec![
            vec![3, 4],
            vec![4, 2],
            vec![3, 1],
            vec![1, 2],
            vec![3, 2],
            vec![2],
        ],
        Box::new(|e, v| {
            e.linear(
                Some((&v[4], 0.5)),
                0.3,
                &[(&v[0], &v[1]), (&v[2], &v[3])],
                Some(&v[5]),
            )
        }),
    ));
    cases.push((
        "concat",
        vec![vec![2, 3], vec![2, 1], vec![2, 2]],
        Box::new(|e, v| e.concat(&[&v[0], &v[1], &v[2]], 1)),
    ));
    for (name, shapes, f) in cases {
        let xs: Vec<Tensor<f64>> = shapes
            .iter()
            .map(|s| rng.tensor(s, Dist::AwayFromZero(0.5)))
            .collect();
        let n = xs.len();
        for mask in 1..(1u32 << n) - 1 {
            let with_t = |i: usize| mask >> i & 1 == 1;
            let live: Vec<Dual<f64>> = xs
                .iter()
                .map(|x| rand_dual(&mut rng, &e, x.shape()))
                .zip(&xs)
                .map(|(d, x)| Dual {
                    primal: x.clone(),
                    tangent: d.tangent,
                })
                .collect();
            let with_none: Vec<Dual<f64>> = (0..n)
                .map(|i| {
                    if with_t(i) {
                        live[i].clone()
                    } else {
                        Dual::constant(xs[i].clone())
                    }
                })
                .collect();
            let with_zero: Vec<Dual<f64>> = (0..n)
                .map(|i| {
                    if with_t(i) {
                        live[i].clone()
                    } else {
                        zero_dual(&e, &xs[i])
                    }
                })
                .collect();
            let a = f(&mut Fwd::new(K), &with_none).unwrap();
            let b = f(&mut Fwd::new(K), &with_zero).unwrap();
            let (ta, tb) = (a.tangent.unwrap(), b.tangent.unwrap());
            assert_eq!(ta.shape(), tb.shape());
            let d = max_abs_diff(&ta.to_f64_vec(), &tb.to_f64_vec());
            let scale = 1.0 + max_abs(&tb.to_f64_vec());
            assert!(
                d <= 1e-14 * scale,
                "{name} {shapes:?} mask {mask:#b}: {d:e}"
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Compositions.

/// A vanilla tanh RNN, `h ← tanh(h W + u_t U + b)` for `steps` steps from
/// `h0`, read out through `log_softmax(h C)` against one-hot targets
/// (cross-entropy, averaged over the batch). Inputs: h0 [B, n], u [T, B, m],
/// W [n, n], U [m, n], b [n], C [n, c], targets [B, c].
fn tanh_rnn(e: &mut Fwd, v: &[Dual<f64>], steps: usize, readout: bool) -> Result<Dual<f64>> {
    let (h0, u, w, uu, b, c, y) = (&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6]);
    let bsz = h0.primal.shape()[0];
    let m = u.primal.shape()[2];
    let mut h = h0.clone();
    for t in 0..steps {
        let ut = e.slice(u, 0, t, 1)?;
        let ut = e.reshape(&ut, &[bsz, m])?;
        let pre = e.linear(None, 1.0, &[(&h, w), (&ut, uu)], Some(b))?;
        h = e.tanh(&pre)?;
    }
    if !readout {
        return Ok(h);
    }
    let logits = e.matmul(&h, c)?;
    let lp = e.log_softmax(&logits)?;
    let ll = e.mul(&lp, y)?;
    let s = e.sum(&ll, &[0, 1])?;
    let s = e.neg(&s)?;
    e.mul_scalar(&s, 1.0 / bsz as f64)
}

fn rnn_inputs(
    rng: &mut Rng,
    bsz: usize,
    n: usize,
    m: usize,
    c: usize,
    steps: usize,
) -> Vec<Tensor<f64>> {
    let g = 1.0 / (n as f64).sqrt();
    let mut y = Tensor::zeros(&[bsz, c]);
    for i in 0..bsz {
        let j = rng.below(c);
        y.data_mut()[i * c + j] = 1.0;
    }
    vec![
        rng.tensor(&[bsz, n], Dist::Normal(0.5)),
        rng.tensor(&[steps, bsz, m], N1),
        rng.tensor(&[n, n], Dist::Normal(1.5 * g)),
        rng.tensor(&[m, n], Dist::Normal(0.5)),
        rng.tensor(&[n], Dist::Normal(0.1)),
        rng.tensor(&[n, c], N1),
        y,
    ]
}

#[test]
fn tanh_rnn_two_steps() {
    let mut rng = Rng::new(1500);
    let xs = rnn_inputs(&mut rng, 3, 4, 2, 3, 2);
    let patterns: [(&str, [bool; 7]); 5] = [
        ("params", [false, false, true, true, true, true, false]),
        (
            "recurrent weights",
            [false, false, true, false, false, false, false],
        ),
        (
            "initial state",
            [true, false, false, false, false, false, false],
        ),
        ("inputs", [false, true, false, false, false, false, false]),
        ("everything", [true, true, true, true, true, true, true]),
    ];
    for (name, has_t) in patterns {
        for readout in [false, true] {
            check_jvp(
                &format!("2-step tanh rnn, tangents on {name}, readout {readout}"),
                &xs,
                &has_t,
                rng.next_u64(),
                |e, v| tanh_rnn(e, v, 2, readout),
            );
        }
    }
}

#[test]
fn tanh_rnn_longer_and_every_subset() {
    let mut rng = Rng::new(1501);
    let xs = rnn_inputs(&mut rng, 2, 3, 2, 2, 6);
    check_all_subsets("6-step tanh rnn", &xs[..6], rng.next_u64(), |e, v| {
        let mut all = v.to_vec();
        all.push(Dual::constant(xs[6].clone()));
        tanh_rnn(e, &all, 6, true)
    });
}

/// A leaky rate network `x ← (1 − α) x + α (W tanh(x) + U u_t + b)`, built
/// with the leak of `linear`; the output is the whole trajectory, stacked by
/// concat. Inputs: x0 [B, n], u [B, T·m], W [n, n], U [m, n], b [n].
fn rate_rnn(e: &mut Fwd, v: &[Dual<f64>], steps: usize, alpha: f64) -> Result<Dual<f64>> {
    let (x0, u, w, uu, b) = (&v[0], &v[1], &v[2], &v[3], &v[4]);
    let m = uu.primal.shape()[0];
    let mut x = x0.clone();
    let mut traj = vec![];
    for t in 0..steps {
        let ut = e.slice(u, 1, t * m, m)?;
        let r = e.tanh(&x)?;
        x = e.linear(
            Some((&x, 1.0 - alpha)),
            alpha,
            &[(&r, w), (&ut, uu)],
            Some(b),
        )?;
        traj.push(x.clone());
    }
    let refs: Vec<&Dual<f64>> = traj.iter().collect();
    e.concat(&refs, 1)
}

#[test]
fn leaky_rate_rnn() {
    let mut rng = Rng::new(1600);
    let (bsz, n, m, steps) = (3, 4, 2, 4);
    let xs = vec![
        rng.tensor(&[bsz, n], N1),
        rng.tensor(&[bsz, steps * m], N1),
        rng.tensor(&[n, n], Dist::Normal(0.8)),
        rng.tensor(&[m, n], N1),
        rng.tensor(&[n], Dist::Normal(0.2)),
    ];
    check_all_subsets("leaky rate rnn", &xs, rng.next_u64(), |e, v| {
        rate_rnn(e, v, steps, 0.2)
    });
}

/// Every op in one expression, so that the layouts of consecutive ops meet.
fn kitchen_sink(e: &mut Fwd, v: &[Dual<f64>]) -> Result<Dual<f64>> {
    let (x, w, z, c, d) = (&v[0], &v[1], &v[2], &v[3], &v[4]);
    // x [2, 3, 4] → [4, 3, 2] → [4, 6]
    let t = e.transpose(x, 0, 2)?;
    let t = e.reshape(&t, &[4, 6])?;
    let t = e.matmul(&t, w)?; // [4, 5]
    let t = e.softplus(&t)?;
    let t = e.concat(&[&t, c], 1)?; // [4, 7]
    let t = e.slice(&t, 1, 1, 5)?; // [4, 5]
    let tt = e.transpose(&t, 0, 1)?; // [5, 4]
    let g = e.sigmoid(&tt)?;
    let g = e.transpose(&g, 1, 0)?; // [4, 5]
    let t = e.mul(&t, &g)?;
    let t = e.broadcast_to(&t, &[3, 4, 5])?;
    let t = e.mul(&t, z)?; // z [3, 1, 5]
    let s = e.softmax(&t)?;
    let s = e.sum(&s, &[0])?; // [4, 5]
    let s = e.add_scalar(&s, 1.0)?;
    let s = e.sqrt(&s)?;
    let q = e.div(&s, d)?; // d [5]
    let q = e.exp(&q)?;
    let q = e.log(&q)?;
    let r = e.relu(&q)?;
    let r = e.square(&r)?;
    let l = e.log_softmax(&r)?;
    let l = e.sub(&l, &q)?;
    let l = e.neg(&l)?;
    let l = e.tanh(&l)?;
    let l = e.mul_scalar(&l, 2.0)?;
    let l2 = e.mean(&l, &[1])?; // [4]
    let l3 = e.reshape(&l2, &[2, 2])?;
    let l3 = e.transpose(&l3, 0, 1)?;
    e.sum(&l3, &[0, 1])
}

#[test]
fn every_op_in_one_chain() {
    let mut rng = Rng::new(1700);
    let xs = vec![
        rng.tensor(&[2, 3, 4], N1),
        rng.tensor(&[6, 5], Dist::Normal(0.5)),
        rng.tensor(&[3, 1, 5], N1),
        rng.tensor(&[4, 2], N1),
        rng.tensor(&[5], Dist::Uniform(0.5, 2.0)),
    ];
    check_all_subsets("kitchen sink", &xs, rng.next_u64(), kitchen_sink);
}

#[test]
fn wide_batch_uses_parallel_paths() {
    // Big enough for the parallel elementwise loops (≥ 2·2^15 elements in
    // the tangents) and the parallel GEMM: the row indexing of scale_rows,
    // softmax and linear must not depend on chunking.
    let mut rng = Rng::new(1800);
    let (bsz, kd, n) = (700, 16, 40);
    let xs = vec![
        rng.tensor(&[bsz, kd], N1),
        rng.tensor(&[kd, n], Dist::Normal(0.25)),
        rng.tensor(&[n], N1),
        rng.tensor(&[bsz, n], N1),
    ];
    // a generic mixing matrix (a constant one would make log_softmax's
    // input constant along rows, and its JVP zero)
    let mix = rng.tensor(&[n, n], Dist::Normal(0.2));
    check_jvp("wide batch", &xs, &[true, true, true, true], 7, |e, v| {
        let p = e.linear(Some((&v[3], 0.5)), 0.5, &[(&v[0], &v[1])], Some(&v[2]))?;
        let h = e.tanh(&p)?;
        let q = e.mul(&h, &v[2])?;
        let q = e.matmul(&q, &Dual::constant(mix.clone()))?;
        e.log_softmax(&q)
    });
}

// ---------------------------------------------------------------------------
// Stale pool memory.

/// Fills the tensor layer's buffer pool for each of `lens` with NaN-filled
/// buffers, so that the next `Tensor::scratch` of that length hands out NaNs:
/// an op that reads scratch memory it did not write then yields NaN, which
/// the comparisons flag. (Buffers under 256 elements are never pooled, so
/// the small-shape tests above cannot see such a bug.)
fn poison_pool(lens: &[usize]) {
    for &len in lens {
        // take what the pool holds of this length, so the NaN buffers fit
        let drained: Vec<Tensor<f64>> = (0..16).map(|_| Tensor::scratch(&[len])).collect();
        let bad: Vec<Tensor<f64>> = (0..16).map(|_| Tensor::full(&[len], f64::NAN)).collect();
        drop(bad);
        drop(drained);
    }
}

type BoxedOp = Box<dyn Fn(&mut Fwd, &[Dual<f64>]) -> Result<Dual<f64>>>;

#[test]
fn stale_pool_memory_is_never_read() {
    // the poisoning works (a length no other test uses): if this fails, the
    // pool of sofo-tensor changed and this test no longer tests anything
    poison_pool(&[257]);
    let t = Tensor::<f64>::scratch(&[257]);
    assert!(t.data().iter().all(|v| v.is_nan()), "pool poisoning failed");
    drop(t);

    let mut rng = Rng::new(1900);
    let pos = Dist::Uniform(0.3, 3.0);
    let (r, c, n) = (12, 24, 20);
    let all2 = vec![vec![true, true], vec![true, false], vec![false, true]];
    let one = vec![vec![true]];
    // (label, inputs, tangent patterns, op)
    type Case = (String, Vec<Tensor<f64>>, Vec<Vec<bool>>, BoxedOp);
    let mut cases: Vec<Case> = vec![];
    for (op, _) in UNARY_OPS {
        cases.push((
            format!("{op:?}"),
            vec![rng.tensor(&[r, c], pos)],
            one.clone(),
            Box::new(move |e, v| e.unary(&v[0], op)),
        ));
    }
    for op in BINARY_OPS {
        for sb in [vec![r, c], vec![c], vec![r, 1]] {
            cases.push((
                format!("{op:?} with {sb:?}"),
                vec![rng.tensor(&[r, c], pos), rng.tensor(&sb, pos)],
                all2.clone(),
                Box::new(move |e, v| e.binary(&v[0], &v[1], op)),
            ));
        }
    }
    for sa in [vec![r, c], vec![3, 4, c], vec![c]] {
        cases.push((
            format!("matmul {sa:?}"),
            vec![rng.tensor(&sa, N1), rng.tensor(&[c, n], N1)],
            all2.clone(),
            Box::new(|e, v| e.matmul(&v[0], &v[1])),
        ));
    }
    cases.push((
        "linear".into(),
        vec![
            rng.tensor(&[r, c], N1),
            rng.tensor(&[c, n], N1),
            rng.tensor(&[r, n], N1),
            rng.tensor(&[n], N1),
        ],
        (1..16u32)
            .map(|m| (0..4).map(|i| m >> i & 1 == 1).collect())
            .collect(),
        Box::new(|e, v| e.linear(Some((&v[2], 0.5)), 0.5, &[(&v[0], &v[1])], Some(&v[3]))),
    ));
    for axes in [vec![0], vec![1], vec![0, 1]] {
        cases.push((
            format!("sum {axes:?}"),
            vec![rng.tensor(&[r, c], N1)],
            one.clone(),
            Box::new(move |e, v| e.sum(&v[0], &axes)),
        ));
    }
    for axis in [0, 1] {
        cases.push((
            format!("concat axis {axis}"),
            vec![rng.tensor(&[r, c], N1), rng.tensor(&[r, c], N1)],
            all2.clone(),
            Box::new(move |e, v| e.concat(&[&v[0], &v[1]], axis)),
        ));
    }
    let x = rng.tensor(&[r, c], N1);
    let x3 = rng.tensor(&[4, 3, c], N1);
    let shape_ops: Vec<(&str, Tensor<f64>, BoxedOp)> = vec![
        (
            "slice",
            x.clone(),
            Box::new(|e, v| e.slice(&v[0], 1, 2, 20)),
        ),
        (
            "reshape",
            x.clone(),
            Box::new(move |e, v| e.reshape(&v[0], &[c, r])),
        ),
        (
            "transpose",
            x.clone(),
            Box::new(|e, v| e.transpose(&v[0], 0, 1)),
        ),
        ("transpose3", x3, Box::new(|e, v| e.transpose(&v[0], 0, 2))),
        (
            "broadcast_to",
            rng.tensor(&[c], N1),
            Box::new(move |e, v| e.broadcast_to(&v[0], &[r, c])),
        ),
        ("softmax", x.clone(), Box::new(|e, v| e.softmax(&v[0]))),
        ("log_softmax", x, Box::new(|e, v| e.log_softmax(&v[0]))),
    ];
    for (name, t, f) in shape_ops {
        cases.push((name.into(), vec![t], one.clone(), f));
    }

    for (name, xs, patterns, f) in cases {
        // every buffer length the op can ask for: its inputs', its output's,
        // and K times those (tangents)
        let consts: Vec<Dual<f64>> = xs.iter().map(|x| Dual::constant(x.clone())).collect();
        let out = f(&mut Fwd::primal(), &consts).unwrap();
        let mut lens: Vec<usize> = xs.iter().map(|x| x.numel()).collect();
        lens.push(out.primal.numel());
        let base = lens.clone();
        lens.extend(base.iter().map(|l| K * l));
        lens.sort_unstable();
        lens.dedup();
        for has_t in patterns {
            check_jvp(
                &format!("{name} on a poisoned pool"),
                &xs,
                &has_t,
                rng.next_u64(),
                |e, v| {
                    poison_pool(&lens);
                    f(e, v)
                },
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Degenerate extents.

#[test]
fn matmul_with_empty_inner_dimension_is_zero() {
    // [m, 0] · [0, n] is the zero matrix (an empty sum), for the value and
    // the tangents, even when the output buffer comes from the pool with old
    // contents.
    let e = Fwd::new(K);
    for (sa, sb) in [
        (vec![20, 0], vec![0, 20]),
        (vec![2, 10, 0], vec![0, 20]),
        (vec![0], vec![0, 300]),
    ] {
        let a = zero_dual(&e, &Tensor::zeros(&sa));
        let b = zero_dual(&e, &Tensor::zeros(&sb));
        for (ta, tb) in [(true, false), (false, true), (true, true), (false, false)] {
            let a = if ta {
                a.clone()
            } else {
                Dual::constant(a.primal.clone())
            };
            let b = if tb {
                b.clone()
            } else {
                Dual::constant(b.primal.clone())
            };
            let mut out_shape = sa.clone();
            *out_shape.last_mut().unwrap() = sb[1];
            let n: usize = out_shape.iter().product();
            poison_pool(&[n, K * n]);
            let y = Fwd::new(K).matmul(&a, &b).unwrap();
            assert_eq!(y.primal.shape(), out_shape.as_slice());
            assert!(
                y.primal.data().iter().all(|&v| v == 0.0),
                "{sa:?} · {sb:?}: value not zero"
            );
            match y.tangent {
                Some(t) => {
                    assert!(ta || tb);
                    assert_eq!(t.shape(), tangent_shape(&out_shape, K).as_slice());
                    assert!(
                        t.data().iter().all(|&v| v == 0.0),
                        "{sa:?} · {sb:?} ({ta}, {tb}): tangent not zero"
                    );
                }
                None => assert!(!ta && !tb),
            }
        }
    }
}

/// `linear_of_unary` is `unary` then `linear` on the host engines, value and
/// tangents bit for bit (the rate RNN relies on it: an engine that applies
/// f as it reads x must give these numbers, and the CPU takes this path
/// only when an engine asks for it), and its tangents match finite
/// differences, each input with tangents or without.
#[test]
fn linear_of_unary_is_unary_then_linear() {
    let mut rng = Rng::new(503);
    let mut e = Fwd::new(K);
    assert!(!Ops::<f64>::fuses_unary_into_linear(&e, 8, 3));
    let mut d = |s: &[usize]| rand_dual(&mut rng, &Fwd::new(K), s);
    let (x, w, u, wu, b, l) = (
        d(&[3, 4]),
        d(&[4, 5]),
        d(&[3, 2]),
        d(&[2, 5]),
        d(&[5]),
        d(&[3, 5]),
    );
    // a factor without tangents (the rates' noise)
    let c = Dual {
        primal: d(&[3, 4]).primal,
        tangent: None,
    };
    for (op, factor) in [Unary::Tanh, Unary::Relu, Unary::Softplus]
        .into_iter()
        .flat_map(|op| [None, Some(&c)].map(|f| (op, f)))
    {
        let first = (&x, op, factor, &w);
        let fused = e
            .linear_of_unary(Some((&l, 0.9)), 0.1, first, &[(&u, &wu)], Some(&b))
            .unwrap();
        let fx = match factor {
            Some(c) => e.unary_mul(&x, op, c).unwrap(),
            None => e.unary(&x, op).unwrap(),
        };
        let plain = e
            .linear(Some((&l, 0.9)), 0.1, &[(&fx, &w), (&u, &wu)], Some(&b))
            .unwrap();
        let what = format!("{op:?}, factor {}", factor.is_some());
        assert_eq!(fused.primal.data(), plain.primal.data(), "{what}: values");
        assert_eq!(
            fused.tangent.as_ref().unwrap().data(),
            plain.tangent.as_ref().unwrap().data(),
            "{what}: tangents"
        );
    }
    let inputs: Vec<Tensor<f64>> = [x, w, u, wu].into_iter().map(|v| v.primal).collect();
    for factor in [None, Some(&c)] {
        check_all_subsets("linear_of_unary", &inputs, 504, |e, v| {
            let first = (&v[0], Unary::Tanh, factor, &v[1]);
            e.linear_of_unary(None, 0.7, first, &[(&v[2], &v[3])], None)
        });
    }
}

/// `unary_of_linear` is `leak_c · x + f(scale · (Σ a·W + b))` on the host
/// engine: its value against that formula evaluated entry by entry in f64
/// (the leak outside f, the scale inside), and its tangents against finite
/// differences, each input with tangents or without (the Kalman task's
/// network runs on it, and the GPU's fused kernel is checked against it).
#[test]
fn unary_of_linear_is_f_of_the_affine_map_plus_the_leak() {
    let mut rng = Rng::new(505);
    let mut d = |s: &[usize]| rand_dual(&mut rng, &Fwd::new(K), s);
    let (a, w, u, wu, b, l) = (
        d(&[3, 4]),
        d(&[4, 5]),
        d(&[3, 2]),
        d(&[2, 5]),
        d(&[5]),
        d(&[3, 5]),
    );
    let mut e = Fwd::new(K);
    for (op, f) in [
        (Unary::Relu, (|v: f64| v.max(0.0)) as fn(f64) -> f64),
        (Unary::Tanh, f64::tanh),
    ] {
        let y = e
            .unary_of_linear(Some((&l, 0.6)), 0.3, op, &[(&a, &w), (&u, &wu)], Some(&b))
            .unwrap();
        let (av, wv, uv, wuv) = (
            a.primal.data(),
            w.primal.data(),
            u.primal.data(),
            wu.primal.data(),
        );
        for r in 0..3 {
            for j in 0..5 {
                let dense: f64 = (0..4).map(|i| av[r * 4 + i] * wv[i * 5 + j]).sum();
                let input: f64 = (0..2).map(|q| uv[r * 2 + q] * wuv[q * 5 + j]).sum();
                let want = 0.6 * l.primal.data()[r * 5 + j]
                    + f(0.3 * (dense + input + b.primal.data()[j]));
                let got = y.primal.data()[r * 5 + j];
                assert!(
                    (got - want).abs() <= 1e-12 * (1.0 + want.abs()),
                    "{op:?} [{r}, {j}]: {got} vs {want}"
                );
            }
        }
    }
    let inputs: Vec<Tensor<f64>> = [a, w, u, wu, b, l].into_iter().map(|v| v.primal).collect();
    check_all_subsets("unary_of_linear", &inputs, 506, |e, v| {
        let terms = [(&v[0], &v[1]), (&v[2], &v[3])];
        e.unary_of_linear(Some((&v[5], 0.6)), 0.3, Unary::Tanh, &terms, Some(&v[4]))
    });
}
