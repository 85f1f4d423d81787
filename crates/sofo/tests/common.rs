#![allow(dead_code, clippy::needless_range_loop)]
//! Shared fixtures for the identity tests (f64 throughout).

use sofo::loss::{LittleLoss, Observer};
use sofo::models::{Activation, Batch, Model, RateRnn, Trials};
use sofo::params::{Param, ParamMode, ParamSet};
use sofo::{Dual, Float, Fwd, Ops, Result, Tensor};
use sofo_tensor::rng;

pub fn randn(shape: &[usize], seed: u64, stream: u64) -> Tensor<f64> {
    let mut t = Tensor::<f64>::scratch(shape);
    rng::fill_normal(t.data_mut(), seed, stream);
    t
}

/// A tiny rate RNN with a learned x0, and a batch whose loss weights have
/// zeros (unobserved steps and trials) and non-unit values.
pub fn tiny_rnn(m: usize, t: usize) -> (RateRnn, ParamSet<f64>, Batch<f64>) {
    let model = RateRnn {
        n: 4,
        inputs: 2,
        outputs: 2,
        alpha: 0.2,
        activation: Activation::Tanh,
        learn_x0: true,
        gain: 1.2,
    };
    let mut params: ParamSet<f64> = model.init(3).unwrap();
    // non-zero biases and x0 so every parameter matters
    for (i, p) in params.iter_mut().enumerate() {
        if p.name == "b" || p.name == "d" || p.name == "x0" {
            p.value = randn(p.value.shape(), 5, i as u64).scale(0.5);
        }
    }
    let mut w = Tensor::<f64>::zeros(&[t, m]);
    for (i, v) in w.data_mut().iter_mut().enumerate() {
        *v = if i < m {
            0.0
        } else {
            0.5 + (i % 3) as f64 * 0.5
        };
    }
    let batch = Batch {
        steps: t,
        trials: m,
        inputs: Some(randn(&[t, m, 2], 7, 1)),
        initial: None,
        targets: randn(&[t, m, 2], 7, 2),
        weights: Some(w),
        loss_norm: (t * m * 2) as f64,
        noise_seed: 0,
    };
    (model, params, batch)
}

/// Records the Jacobian rows of every observed output: run with the full
/// basis as tangents (K = P), each observation's tangents are J restricted
/// to that output; also keeps the loss gradients and Hessians.
pub struct JacobianRecorder {
    pub p: usize,
    /// Per observation: (J [n_out, P], gradient [n_out], H [n_out, n_out]).
    pub blocks: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)>,
}

impl Observer<f64, Fwd> for JacobianRecorder {
    fn observe(&mut self, _e: &mut Fwd, y: &Dual<f64>, loss: &dyn LittleLoss<f64>) -> Result<()> {
        let n = y.primal.numel();
        let l = *y.primal.shape().last().unwrap();
        let rows = n / l;
        let p = self.p;
        let yd = y.tangent.as_ref().unwrap().data();
        let mut j = vec![0.0; n * p];
        for r in 0..rows {
            for k in 0..p {
                for c in 0..l {
                    j[(r * l + c) * p + k] = yd[(r * p + k) * l + c];
                }
            }
        }
        let g = loss.gradient(&y.primal)?.into_vec();
        let h = loss.hessian(&y.primal)?;
        self.blocks.push((j, g, h));
        Ok(())
    }
}

/// (JᵀHJ [P, P], ∇c = Jᵀg [P]) of `model` at `params` on `batch`.
pub fn ggn_and_gradient<M: Model<f64>>(
    model: &M,
    params: &ParamSet<f64>,
    batch: &Batch<f64>,
) -> (Vec<f64>, Vec<f64>) {
    let p = params.trainable_count();
    let mut eye = Tensor::<f64>::zeros(&[p, p]);
    for i in 0..p {
        eye.data_mut()[i * p + i] = 1.0;
    }
    let sofo = sofo::optim::Sofo::new(sofo::optim::SofoConfig::default()).unwrap();
    let tg = sofo.tangents_from(params, eye).unwrap();
    let duals: Vec<Dual<f64>> = params
        .iter()
        .zip(&tg.per_param)
        .map(|(q, t)| Dual {
            primal: q.value.clone(),
            tangent: t.clone(),
        })
        .collect();
    let mut rec = JacobianRecorder { p, blocks: vec![] };
    let mut e = Fwd::new(p);
    let prepared = model.prepare(&mut e, &duals).unwrap();
    model
        .run(&mut e, &prepared, &batch.all(), &mut rec)
        .unwrap();
    let mut ggn = vec![0.0; p * p];
    let mut grad = vec![0.0; p];
    for (j, g, h) in &rec.blocks {
        let n = g.len();
        // HJ
        let mut hj = vec![0.0; n * p];
        for a in 0..n {
            for b in 0..n {
                let hab = h[a * n + b];
                if hab != 0.0 {
                    for k in 0..p {
                        hj[a * p + k] += hab * j[b * p + k];
                    }
                }
            }
        }
        for a in 0..n {
            for k in 0..p {
                grad[k] += j[a * p + k] * g[a];
                for l in 0..p {
                    ggn[k * p + l] += j[a * p + k] * hj[a * p + l];
                }
            }
        }
    }
    (ggn, grad)
}

/// The loss at `params` (primal run).
pub fn loss_at<M: Model<f64>>(model: &M, params: &ParamSet<f64>, batch: &Batch<f64>) -> f64 {
    sofo::train::evaluate(model, params, batch).unwrap()
}

/// params + eps · v, v flat over the trainable scalars.
pub fn shifted(params: &ParamSet<f64>, v: &[f64], eps: f64) -> ParamSet<f64> {
    let mut out = params.clone();
    let mut off = 0;
    for q in out.iter_mut() {
        if !q.mode.trainable() {
            continue;
        }
        let n = q.value.numel();
        for (i, x) in q.value.data_mut().iter_mut().enumerate() {
            *x += eps * v[off + i];
        }
        off += n;
    }
    out
}

/// A model linear in θ: y_t = u_t W + b with MSE (for identity 6).
pub struct LinearReadout {
    pub inputs: usize,
    pub outputs: usize,
}

impl Model<f64> for LinearReadout {
    fn init(&self, seed: u64) -> Result<ParamSet<f64>> {
        Ok(ParamSet::new(vec![
            Param {
                name: "W".into(),
                value: randn(&[self.inputs, self.outputs], seed, 1),
                mode: ParamMode::Free,
            },
            Param {
                name: "b".into(),
                value: randn(&[self.outputs], seed, 2),
                mode: ParamMode::Free,
            },
        ]))
    }
    fn run<E: Ops<f64>>(
        &self,
        e: &mut E,
        p: &[E::V],
        batch: &Trials<'_, f64>,
        obs: &mut dyn Observer<f64, E>,
    ) -> Result<()> {
        for t in 0..batch.steps() {
            let u = e.constant(batch.input(t)?.unwrap())?;
            let y = e.linear(None, 1.0, &[(&u, &p[0])], Some(&p[1]))?;
            if batch.observed(t) {
                obs.observe(e, &y, &batch.step_loss(t)?)?;
            }
        }
        Ok(())
    }
    fn sofo_flops(&self, _k: usize, _batch: &Batch<f64>) -> f64 {
        0.0
    }
}

/// max |a − b|, NaN where either holds a NaN (`f64::max` would drop it)
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).fold(0.0, |m: f64, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    })
}

pub fn max_rel_diff(a: &[f64], b: &[f64]) -> f64 {
    let scale = a
        .iter()
        .chain(b)
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(1e-300);
    // NaN-propagating: `f64::max` would drop a NaN and pass the comparison
    a.iter().zip(b).fold(0.0f64, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() || m.is_nan() {
            f64::NAN
        } else {
            m.max(d)
        }
    }) / scale
}

/// A one-bit memory task: a ±1 pulse at step 2; report its sign from step 5
/// on (steps before are not scored). Predicting 0 scores 1.
pub fn memory_batch<T: Float>(m: usize, t: usize, seed: u64) -> Batch<T> {
    let signs = randn(&[m], seed, 0);
    let mut u = Tensor::<T>::zeros(&[t, m, 1]);
    let mut y = Tensor::<T>::zeros(&[t, m, 1]);
    let mut w = Tensor::<T>::zeros(&[t, m]);
    for j in 0..m {
        let s = T::from_f64(if signs.data()[j] > 0.0 { 1.0 } else { -1.0 });
        u.data_mut()[2 * m + j] = s;
        for step in 5..t {
            y.data_mut()[step * m + j] = s;
            w.data_mut()[step * m + j] = T::one();
        }
    }
    Batch {
        steps: t,
        trials: m,
        inputs: Some(u),
        initial: None,
        targets: y,
        weights: Some(w),
        loss_norm: (m * (t - 5)) as f64,
        noise_seed: 0,
    }
}

/// The SOFO sketch (K = 4 seeded tangents) of `batch` run as `parts`
/// groups of trials, summed: what `observe_pass` does on `parts` threads.
pub fn grouped_sketch<M: Model<f64>>(
    m: &M,
    params: &ParamSet<f64>,
    batch: &Batch<f64>,
    parts: usize,
) -> sofo::loss::Sketch {
    use sofo::loss::Sketch;
    let s = sofo::optim::Sofo::new(sofo::optim::SofoConfig {
        k: 4,
        ..sofo::optim::SofoConfig::default()
    })
    .unwrap();
    let tg = s.sample_tangents(params, 3, 0).unwrap();
    let duals: Vec<Dual<f64>> = params
        .iter()
        .zip(&tg.per_param)
        .map(|(q, t)| Dual {
            primal: q.value.clone(),
            tangent: t.clone(),
        })
        .collect();
    let mut e = Fwd::new(4);
    let prepared = m.prepare(&mut e, &duals).unwrap();
    let mut total = Sketch::new(4);
    for g in batch.split(parts).unwrap() {
        let mut sk = Sketch::new(4);
        m.run(&mut e, &prepared, &g, &mut sk).unwrap();
        total.add(&sk);
    }
    total.finish().unwrap()
}
