#![allow(clippy::needless_range_loop)]
//! FORCE (Sussillo & Abbott 2009): the RLS identities, the dynamics against a
//! direct transcription of the update equations, the reservoir statistics,
//! learning the sine wave of tasks.md §6, determinism and the checks of the
//! settings. f64 throughout.

use sofo::optim::force::{Force, ForceConfig};
use sofo::tasks::sine::{sine_targets, sine_variance, sine_wave, PERIOD};
use sofo::{Error, Tensor};
use sofo_tensor::parallel;

mod common;
use common::{max_abs_diff, randn};

/// The inverse of a small symmetric positive definite matrix, by Gauss-Jordan
/// elimination with partial pivoting.
fn inverse(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv = vec![0.0; n * n];
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&x, &y| m[x * n + col].abs().total_cmp(&m[y * n + col].abs()))
            .unwrap();
        for j in 0..n {
            m.swap(col * n + j, piv * n + j);
            inv.swap(col * n + j, piv * n + j);
        }
        let d = m[col * n + col];
        for j in 0..n {
            m[col * n + j] /= d;
            inv[col * n + j] /= d;
        }
        for i in 0..n {
            if i != col {
                let f = m[i * n + col];
                for j in 0..n {
                    m[i * n + j] -= f * m[col * n + j];
                    inv[i * n + j] -= f * inv[col * n + j];
                }
            }
        }
    }
    inv
}

/// Ridge regression: P = (αI + Σ r rᵀ)⁻¹ and W = P (α W₀ + Σ r fᵀ) for the
/// rows of `rates` ([S, N]) and `targets` ([S, O]).
fn ridge(
    rates: &[f64],
    targets: &[f64],
    w0: &[f64],
    alpha: f64,
    n: usize,
    o: usize,
) -> (Vec<f64>, Vec<f64>) {
    let mut a = vec![0.0; n * n];
    let mut b = vec![0.0; n * o];
    for i in 0..n {
        a[i * n + i] = alpha;
    }
    for (v, w) in b.iter_mut().zip(w0) {
        *v = alpha * w;
    }
    for (r, f) in rates.chunks_exact(n).zip(targets.chunks_exact(o)) {
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] += r[i] * r[j];
            }
            for q in 0..o {
                b[i * o + q] += r[i] * f[q];
            }
        }
    }
    let p = inverse(&a, n);
    let mut w = vec![0.0; n * o];
    for i in 0..n {
        for q in 0..o {
            w[i * o + q] = (0..n).map(|j| p[i * n + j] * b[j * o + q]).sum();
        }
    }
    (p, w)
}

fn tiny(n: usize, o: usize, inputs: usize, p: f64, rls_every: usize) -> ForceConfig {
    ForceConfig {
        n,
        outputs: o,
        inputs,
        p,
        g: 1.5,
        dt: 0.1,
        alpha: 0.7,
        rls_every,
        x0_scale: 0.5,
        seed: 11,
    }
}

/// (a) RLS from P₀ = I/α and W₀ is ridge regression on every rate vector fed:
/// P = (αI + Σ r rᵀ)⁻¹ (Sherman–Morrison, one sample at a time) and, since
/// c k = P_new r, P_new⁻¹ W_new = P_old⁻¹ W_old + r fᵀ, so
/// W = P (α W₀ + Σ r fᵀ) exactly. Also: a batch of rows is the same as the
/// rows fed one at a time, in order.
#[test]
fn rls_is_ridge_regression() {
    let (n, o) = (6, 2);
    let cfg = tiny(n, o, 0, 1.0, 1);
    let alpha = cfg.alpha;
    let rates = randn(&[12, n], 3, 1).map(|v| v.tanh());
    let targets = randn(&[12, o], 3, 2);
    let w0 = randn(&[n, o], 3, 3).scale(0.3);

    let mut net = Force::new(cfg.clone(), 3).unwrap();
    net.set_readout(w0.data()).unwrap();
    // four batches of three rows
    for b in 0..4 {
        net.rls_update(
            &rates.data()[b * 3 * n..(b + 1) * 3 * n],
            &targets.data()[b * 3 * o..(b + 1) * 3 * o],
        )
        .unwrap();
    }
    let (p_ref, w_ref) = ridge(rates.data(), targets.data(), w0.data(), alpha, n, o);
    let p = net.inverse_correlation();
    let dp = max_abs_diff(&p, &p_ref);
    let dw = max_abs_diff(net.readout(), &w_ref);
    assert!(dp < 1e-10, "P differs from (αI + Σ r rᵀ)⁻¹ by {dp:e}");
    assert!(dw < 1e-10, "W differs from the ridge solution by {dw:e}");
    // the identity is not vacuous: W moved far from W₀
    assert!(max_abs_diff(net.readout(), w0.data()) > 0.1);

    // one row at a time, in order: the same numbers
    let mut single = Force::new(cfg, 1).unwrap();
    single.set_readout(w0.data()).unwrap();
    for s in 0..12 {
        single
            .rls_update(
                &rates.data()[s * n..(s + 1) * n],
                &targets.data()[s * o..(s + 1) * o],
            )
            .unwrap();
    }
    assert!(max_abs_diff(&single.inverse_correlation(), &p) <= 1e-14);
    assert!(max_abs_diff(single.readout(), net.readout()) <= 1e-14);
}

/// (a') The training loop feeds RLS the rates of every `rls_every`-th step,
/// all trials of that step, against that step's targets: read those rates
/// step by step, and P and W must be the ridge solution on exactly them.
#[test]
fn train_applies_rls_every_k_steps_to_all_trials() {
    let (n, o, m, every) = (8, 2, 3, 2);
    let cfg = tiny(n, o, 0, 1.0, every);
    let mut net = Force::new(cfg.clone(), m).unwrap();
    let targets = randn(&[15, m, o], 4, 1);
    let (mut fed_r, mut fed_f) = (Vec::new(), Vec::new());
    for t in 0..15 {
        let f = targets.slice(0, t, 1).unwrap();
        let tr = net.train(&f, None).unwrap();
        // the reported error is the a-priori one of this step's outputs
        let e: f64 = tr
            .outputs
            .data()
            .iter()
            .zip(f.data())
            .map(|(z, f)| (z - f) * (z - f))
            .sum::<f64>()
            / (m * o) as f64;
        assert!((tr.mse[0] - e).abs() <= 1e-15 * e.max(1.0));
        let phase = net.time() % every as u64; // (Rust 1.85: no is_multiple_of)
        if phase == 0 {
            fed_r.extend_from_slice(net.rates());
            fed_f.extend_from_slice(f.data());
        }
    }
    assert_eq!(fed_r.len(), 7 * m * n, "steps 2, 4, .., 14 learn");
    let (p_ref, w_ref) = ridge(&fed_r, &fed_f, &vec![0.0; n * o], cfg.alpha, n, o);
    assert!(max_abs_diff(&net.inverse_correlation(), &p_ref) < 1e-10);
    assert!(max_abs_diff(net.readout(), &w_ref) < 1e-10);
}

/// A direct transcription of the method: dense J, explicit P, every sum
/// written out. As in the authors' code, the z fed back at a step is the one
/// output at the step before, computed before that step's RLS update.
struct Reference {
    cfg: ForceConfig,
    j: Vec<f64>,
    f: Vec<f64>,
    b: Vec<f64>,
    w: Vec<f64>,
    p: Vec<f64>,
    x: Vec<f64>,
    z: Vec<f64>,
    time: usize,
}

impl Reference {
    fn of(net: &Force) -> Self {
        let cfg = net.config().clone();
        let n = cfg.n;
        let mut p = vec![0.0; n * n];
        for i in 0..n {
            p[i * n + i] = 1.0 / cfg.alpha;
        }
        Reference {
            j: net.recurrent_dense(),
            f: net.feedback().to_vec(),
            b: net.input_weights().to_vec(),
            w: net.readout().to_vec(),
            p,
            x: net.state().to_vec(),
            z: net.output().to_vec(),
            time: net.time() as usize,
            cfg,
        }
    }

    /// One step; `u` is [M, I], `target` [M, O] (learning iff given).
    fn step(&mut self, u: &[f64], target: Option<&[f64]>) -> Vec<f64> {
        let (n, o, ni) = (self.cfg.n, self.cfg.outputs, self.cfg.inputs);
        let m = self.x.len() / n;
        let dt = self.cfg.dt;
        let rates = |x: &[f64]| x.iter().map(|v| v.tanh()).collect::<Vec<_>>();
        let outputs = |r: &[f64], w: &[f64]| {
            let mut z = vec![0.0; m * o];
            for t in 0..m {
                for q in 0..o {
                    z[t * o + q] = (0..n).map(|i| w[i * o + q] * r[t * n + i]).sum();
                }
            }
            z
        };
        let r = rates(&self.x);
        let z = self.z.clone();
        let mut x = self.x.clone();
        for t in 0..m {
            for i in 0..n {
                let mut d: f64 = (0..n).map(|j| self.j[i * n + j] * r[t * n + j]).sum();
                d += (0..o)
                    .map(|q| self.f[q * n + i] * z[t * o + q])
                    .sum::<f64>();
                d += (0..ni)
                    .map(|a| self.b[a * n + i] * u[t * ni + a])
                    .sum::<f64>();
                x[t * n + i] = (1.0 - dt) * self.x[t * n + i] + dt * d;
            }
        }
        self.x = x;
        self.time += 1;
        let r = rates(&self.x);
        let z = outputs(&r, &self.w);
        self.z = z.clone();
        if let Some(f) = target {
            let phase = self.time % self.cfg.rls_every;
            if phase == 0 {
                for t in 0..m {
                    let rt = &r[t * n..(t + 1) * n];
                    let k: Vec<f64> = (0..n)
                        .map(|i| (0..n).map(|j| self.p[i * n + j] * rt[j]).sum())
                        .collect();
                    let c = 1.0 / (1.0 + (0..n).map(|i| rt[i] * k[i]).sum::<f64>());
                    for i in 0..n {
                        for j in 0..n {
                            self.p[i * n + j] -= c * k[i] * k[j];
                        }
                    }
                    for q in 0..o {
                        let zq: f64 = (0..n).map(|i| self.w[i * o + q] * rt[i]).sum();
                        let e = zq - f[t * o + q];
                        for i in 0..n {
                            self.w[i * o + q] -= c * e * k[i];
                        }
                    }
                }
            }
        }
        z
    }
}

/// Row t of a [T, M or 1, W] series, repeated to M rows.
fn row(s: &Tensor<f64>, t: usize, m: usize) -> Vec<f64> {
    let (rows, w) = (s.shape()[1], s.shape()[2]);
    let block = &s.data()[t * rows * w..(t + 1) * rows * w];
    if rows == m {
        block.to_vec()
    } else {
        block.repeat(m)
    }
}

/// The dynamics and the learning rule equal the direct transcription, on the
/// sparse (p < ½) and the dense (p ≥ ½, with zeros) storage of J, with
/// inputs, several outputs, several trials, per-trial and shared targets.
#[test]
fn dynamics_and_learning_match_the_equations() {
    for (p, shared) in [(0.3, true), (0.7, false), (1.0, false)] {
        let (n, o, ni, m, steps) = (40, 2, 3, 3, 24);
        let cfg = tiny(n, o, ni, p, 3);
        let mut net = Force::new(cfg, m).unwrap();
        let mut reference = Reference::of(&net);
        let tm = if shared { 1 } else { m };
        let targets = randn(&[steps, tm, o], 5, 1);
        let inputs = randn(&[steps + 10, tm, ni], 5, 2);
        let tr = net.train(&targets, Some(&inputs)).unwrap();
        let mut ref_out = Vec::new();
        for t in 0..steps {
            ref_out.extend(reference.step(&row(&inputs, t, m), Some(&row(&targets, t, m))));
        }
        let scale = ref_out.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        assert!(scale > 0.1, "outputs should be non-trivial");
        let d = max_abs_diff(tr.outputs.data(), &ref_out);
        assert!(d < 1e-10, "p = {p}: outputs differ by {d:e}");
        assert!(max_abs_diff(net.readout(), &reference.w) < 1e-10);
        assert!(max_abs_diff(&net.inverse_correlation(), &reference.p) < 1e-10);
        assert!(max_abs_diff(net.state(), &reference.x) < 1e-10);

        // learning off: W stays, the outputs still follow the equations
        let w = net.readout().to_vec();
        let later = inputs.slice(0, steps, 10).unwrap();
        let out = net.run(10, Some(&later)).unwrap();
        let mut ref_out = Vec::new();
        for t in 0..10 {
            ref_out.extend(reference.step(&row(&later, t, m), None));
        }
        assert!(max_abs_diff(out.data(), &ref_out) < 1e-10);
        assert_eq!(net.readout(), &w[..]);
    }
}

/// The reservoirs of tasks.md §6 and §4 have the stated statistics.
#[test]
fn reservoir_statistics() {
    // §6: sparse, p = 0.1, kept entries N(0, g²/(pN)); F ~ U(−1, 1)
    let net = Force::new(ForceConfig::sine(), 1).unwrap();
    let (n, p, g) = (1000.0f64, 0.1f64, 1.5f64);
    let nnz = net.recurrent_nnz() as f64;
    let sd = (n * n * p * (1.0 - p)).sqrt(); // binomial: 300
    assert!((nnz - p * n * n).abs() < 5.0 * sd, "nnz {nnz}");
    let j = net.recurrent_dense();
    let kept: Vec<f64> = j.iter().copied().filter(|v| *v != 0.0).collect();
    let var = kept.iter().map(|v| v * v).sum::<f64>() / kept.len() as f64;
    let want = g * g / (p * n);
    // the sample variance of 1e5 normals is within 2% with overwhelming odds
    assert!((var / want - 1.0).abs() < 0.02, "var {var} vs {want}");
    let f = net.feedback();
    assert_eq!(f.len(), 1000);
    assert!(f.iter().all(|v| (-1.0..1.0).contains(v)));
    let fv = f.iter().map(|v| v * v).sum::<f64>() / 1000.0;
    assert!((fv - 1.0 / 3.0).abs() < 0.05, "U(−1,1) variance {fv}");
    assert!(net.readout().iter().all(|v| *v == 0.0));
    // x0 ~ 0.5 N(0, 1)
    let xv = net.state().iter().map(|v| v * v).sum::<f64>() / 1000.0;
    assert!((xv - 0.25).abs() < 0.05, "x0 variance {xv}");

    // §4: dense J ~ N(0, g²/N) at g = 0.5, 3 inputs and outputs
    let net = Force::new(ForceConfig::flip_flop(0.5, 3), 2).unwrap();
    let j = net.recurrent_dense();
    assert_eq!(net.recurrent_nnz(), 1_000_000);
    let var = j.iter().map(|v| v * v).sum::<f64>() / j.len() as f64;
    assert!((var / (0.25 / 1000.0) - 1.0).abs() < 0.01);
    assert_eq!(net.input_weights().len(), 3000);
    assert_eq!(net.feedback().len(), 3000);
    assert!(net.input_weights().iter().all(|v| (-1.0..1.0).contains(v)));
}

/// The target of §6: periodic with period 120 τ, and `sine_targets` indexes
/// step s at t = s·dt starting after `start`.
#[test]
fn sine_target() {
    for i in 0..50 {
        let t = i as f64 * 3.7;
        assert!((sine_wave(t + PERIOD) - sine_wave(t)).abs() < 1e-12);
    }
    // variance over one period (mean 0), numerically
    let k = 12_000;
    let (mut s1, mut s2) = (0.0, 0.0);
    for i in 0..k {
        let v = sine_wave(i as f64 * PERIOD / k as f64);
        s1 += v;
        s2 += v * v;
    }
    assert!((s1 / k as f64).abs() < 1e-12);
    assert!((s2 / k as f64 - sine_variance()).abs() < 1e-12);
    let f = sine_targets(5, 3, 0.1);
    assert_eq!(f.shape(), &[3, 1, 1]);
    for i in 0..3 {
        assert_eq!(f.data()[i], sine_wave((6 + i) as f64 * 0.1));
    }
}

/// (b) FORCE learns the sine wave at g = 1.5, N = 1000, the settings of
/// tasks.md §6, trained for 1440 τ (14 400 steps, 12 periods: the training
/// length of the authors' code), then tested with learning off for 2 periods
/// continuing the phase.
///
/// Threshold: test MSE < 1% of the target's variance (R² > 0.99): the output
/// must reproduce the waveform, in phase, on its own. A network that has
/// learned nothing scores 1 (z = 0, checked before training); one that
/// generates the right waveform with a period 1% too long drifts to 0.02
/// periods behind over the 2 test periods and scores 1.4%; a 10% amplitude
/// error scores 1%. Measured with this protocol: seed 0 (tested) 9.8e-5;
/// seeds 1–7: 1.3e-4, 1.7e-3, 1.1e-4, 8.4e-2, 4.6e-6, 2.7e-3, 6.7e-4 — seed
/// 4 is not yet stable after 12 periods (2.7e-4 after 16), so FORCE's
/// test-phase stability at this training length is typical, not certain. The
/// training error (a-priori, RLS on) must also be below 1e-3 of the variance
/// after the first period (measured 9.6e-5).
#[test]
fn force_learns_the_sine_wave() {
    let dt = 0.1;
    let period = (PERIOD / dt).round() as usize; // 1200 steps
    let mut net = Force::new(ForceConfig::sine(), 1).unwrap();
    let v = sine_variance();

    let mut before = net.clone();
    let untrained = before.test(&sine_targets(0, period, dt), None).unwrap();
    assert!(
        (untrained.mean_mse() / v - 1.0).abs() < 1e-12,
        "z = 0 before training"
    );

    let tr = net
        .train(&sine_targets(net.time(), 12 * period, dt), None)
        .unwrap();
    let late: f64 = tr.mse[period..].iter().sum::<f64>() / (11 * period) as f64;
    let test = net
        .test(&sine_targets(net.time(), 2 * period, dt), None)
        .unwrap();
    let rel = test.mean_mse() / v;
    println!(
        "FORCE sine: training MSE/var after period 1 {:.2e}, test MSE/var {rel:.2e}",
        late / v
    );
    assert!(late / v < 1e-3, "training error {late:e}");
    assert!(rel < 1e-2, "test MSE / var(f) = {rel:e}");
}

/// (c) The same seed gives bit-identical outputs and weights, on one thread
/// or several; another seed gives another network.
#[test]
fn deterministic() {
    for p in [0.1, 1.0] {
        let cfg = ForceConfig {
            n: 400,
            p,
            ..ForceConfig::sine()
        };
        let go = |cfg: &ForceConfig| {
            let mut net = Force::new(cfg.clone(), 4).unwrap();
            let tr = net.train(&sine_targets(0, 300, 0.1), None).unwrap();
            let out = net.run(100, None).unwrap();
            (
                tr.outputs,
                out,
                net.readout().to_vec(),
                net.inverse_correlation(),
            )
        };
        let a = go(&cfg);
        let b = go(&cfg);
        let c = parallel::serial(|| go(&cfg));
        for other in [&b, &c] {
            assert_eq!(a.0.data(), other.0.data());
            assert_eq!(a.1.data(), other.1.data());
            assert_eq!(a.2, other.2);
            assert_eq!(a.3, other.3);
        }
        let d = go(&ForceConfig { seed: 1, ..cfg });
        assert!(max_abs_diff(a.1.data(), d.1.data()) > 1e-3);
    }
}

/// (d) Bad settings are refused with an error that names the field.
#[test]
fn bad_settings_name_the_field() {
    let base = tiny(10, 1, 0, 0.5, 2);
    let cases: Vec<(ForceConfig, &str)> = vec![
        (
            ForceConfig {
                n: 0,
                ..base.clone()
            },
            "force.n",
        ),
        (
            ForceConfig {
                outputs: 0,
                ..base.clone()
            },
            "force.outputs",
        ),
        (
            ForceConfig {
                p: 0.0,
                ..base.clone()
            },
            "force.p",
        ),
        (
            ForceConfig {
                p: 1.5,
                ..base.clone()
            },
            "force.p",
        ),
        (
            ForceConfig {
                p: f64::NAN,
                ..base.clone()
            },
            "force.p",
        ),
        (
            ForceConfig {
                g: -0.1,
                ..base.clone()
            },
            "force.g",
        ),
        (
            ForceConfig {
                g: f64::INFINITY,
                ..base.clone()
            },
            "force.g",
        ),
        (
            ForceConfig {
                dt: 0.0,
                ..base.clone()
            },
            "force.dt",
        ),
        (
            ForceConfig {
                dt: 1.5,
                ..base.clone()
            },
            "force.dt",
        ),
        (
            ForceConfig {
                alpha: 0.0,
                ..base.clone()
            },
            "force.alpha",
        ),
        (
            ForceConfig {
                alpha: -1.0,
                ..base.clone()
            },
            "force.alpha",
        ),
        (
            ForceConfig {
                rls_every: 0,
                ..base.clone()
            },
            "force.rls_every",
        ),
        (
            ForceConfig {
                x0_scale: -1.0,
                ..base.clone()
            },
            "force.x0_scale",
        ),
    ];
    for (cfg, want) in cases {
        match Force::new(cfg.clone(), 1) {
            Err(e @ Error::Config { .. }) => {
                let Error::Config { ref field, .. } = e else {
                    unreachable!()
                };
                assert_eq!(field, want, "{cfg:?}");
                assert!(e.to_string().contains(want), "{e}");
            }
            other => panic!("{cfg:?}: expected a config error, got {other:?}"),
        }
    }
    // the edges are allowed
    for cfg in [
        ForceConfig {
            p: 1.0,
            dt: 1.0,
            g: 0.0,
            ..base.clone()
        },
        ForceConfig {
            rls_every: 1,
            x0_scale: 0.0,
            ..base.clone()
        },
    ] {
        Force::new(cfg, 1).unwrap();
    }
    assert!(matches!(
        Force::new(base.clone(), 0),
        Err(Error::Config { field, .. }) if field == "force.trials"
    ));

    // shapes and inputs
    let mut net = Force::new(base.clone(), 2).unwrap();
    assert!(matches!(
        net.train(&Tensor::zeros(&[5, 3, 1]), None),
        Err(Error::Tensor(_))
    ));
    assert!(matches!(
        net.train(&Tensor::zeros(&[5, 2, 2]), None),
        Err(Error::Tensor(_))
    ));
    assert!(matches!(
        net.run(5, Some(&Tensor::zeros(&[5, 2, 1]))),
        Err(Error::Config { field, .. }) if field == "inputs"
    ));
    assert!(net.rls_update(&[0.0; 10], &[0.0; 2]).is_err());
    let mut with_inputs = Force::new(ForceConfig { inputs: 2, ..base }, 2).unwrap();
    assert!(matches!(
        with_inputs.run(5, None),
        Err(Error::Config { field, .. }) if field == "inputs"
    ));
    assert!(matches!(
        with_inputs.run(5, Some(&Tensor::zeros(&[4, 2, 2]))),
        Err(Error::Tensor(_))
    ));
    assert_eq!(with_inputs.time(), 0, "a refused call runs nothing");
}
