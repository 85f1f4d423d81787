//! Models, each written once against the op vocabulary [`Ops`].

mod arm;
mod constrained;
mod init;
mod leaky_rnn;
mod lorenz;
mod rate_rnn;
mod reach_rnn;
mod reservoir;

pub use arm::{ArmState, TwoJointArm};
pub use constrained::{
    read_mask, ConstrainedRnn, Constraints, DaleTransform, LowRank, Noise, Regularizers,
    TimeConstants,
};
pub use leaky_rnn::LeakyRnn;
pub use lorenz::LorenzModel;
pub use rate_rnn::{Activation, RateRnn};
pub use reach_rnn::ReachRnn;
pub use reservoir::ReservoirRnn;

use crate::loss::{Observer, Sketch};
use crate::params::ParamSet;
use crate::{Error, Result};
use rayon::prelude::*;
use sofo_ad::{Dual, Fwd, Ops, Rev, Var};
use sofo_tensor::{parallel, rng, Float, Tensor};

/// `leak + scale · (r · w + Σ rest + bias)` for the rates r = φ(x) (⊙ c,
/// the rates' noise) given as `rates = (x, φ, c, r)`: from r where the
/// model computed it, else from x (and c) through
/// [`Ops::linear_of_unary`] (an engine that applies φ as it reads x and
/// says so with [`Ops::fuses_unary_into_linear`]; φ(x)'s tangents are then
/// never stored). The terms are in the same order either way.
#[allow(clippy::type_complexity)]
pub(crate) fn linear_of_rates<T: Float, E: Ops<T>>(
    e: &mut E,
    rates: (&E::V, sofo_ad::Unary, Option<&E::V>, Option<&E::V>),
    leak: Option<(&E::V, T)>,
    scale: T,
    w: &E::V,
    rest: &[(&E::V, &E::V)],
    bias: Option<&E::V>,
) -> Result<E::V> {
    let (x, phi, c, r) = rates;
    Ok(match r {
        Some(r) => {
            let mut terms = Vec::with_capacity(rest.len() + 1);
            terms.push((r, w));
            terms.extend_from_slice(rest);
            e.linear(leak, scale, &terms, bias)?
        }
        None => e.linear_of_unary(leak, scale, (x, phi, c, w), rest, bias)?,
    })
}

/// A batch of trials for a sequence model.
#[derive(Debug, Clone)]
pub struct Batch<T: Float> {
    /// Number of time steps T.
    pub steps: usize,
    /// Number of trials M.
    pub trials: usize,
    /// Inputs [T, M, I], if the model has any.
    pub inputs: Option<Tensor<T>>,
    /// Model-specific initial condition [M, S] (e.g. the Lorenz start).
    pub initial: Option<Tensor<T>>,
    /// Targets [T, M, O].
    pub targets: Tensor<T>,
    /// Loss weights [T, M]; a step whose weights are all zero is not observed.
    pub weights: Option<Tensor<T>>,
    /// The normaliser n of the weighted MSE over the whole trial.
    pub loss_norm: f64,
    /// Seed of the batch's process noise, for models that have any. The noise
    /// of (step, trial) depends on this seed, the step and the trial's index
    /// in the batch only, so it is the same however the trials are split.
    pub noise_seed: u64,
}

impl<T: Float> Batch<T> {
    /// All trials.
    pub fn all(&self) -> Trials<'_, T> {
        Trials {
            batch: self,
            start: 0,
            len: self.trials,
        }
    }

    /// The trials split into `parts` consecutive groups (sizes differ by at
    /// most one). Views, not copies: memory stays flat in T.
    pub fn split(&self, parts: usize) -> Result<Vec<Trials<'_, T>>> {
        let m = self.trials;
        if parts == 0 || parts > m {
            return Err(Error::config(
                "parts",
                parts,
                format!("1 to {m} (the trials)"),
            ));
        }
        let mut out = Vec::with_capacity(parts);
        let mut start = 0;
        for i in 0..parts {
            let len = m / parts + usize::from(i < m % parts);
            out.push(Trials {
                batch: self,
                start,
                len,
            });
            start += len;
        }
        Ok(out)
    }
}

/// A view of consecutive trials of a batch: what a model runs on. Each
/// accessor copies one step's rows only, so nothing proportional to T is
/// allocated while a model runs.
#[derive(Debug, Clone, Copy)]
pub struct Trials<'a, T: Float> {
    pub batch: &'a Batch<T>,
    pub start: usize,
    pub len: usize,
}

impl<T: Float> Trials<'_, T> {
    pub fn steps(&self) -> usize {
        self.batch.steps
    }
    pub fn trials(&self) -> usize {
        self.len
    }

    /// Rows [start, start + len) of step t of a [T, M, X] tensor, as [len, X].
    fn rows(&self, x: &Tensor<T>, t: usize) -> Result<Tensor<T>> {
        let s = x.shape();
        let width: usize = s[2..].iter().product();
        let m = self.batch.trials;
        let off = (t * m + self.start) * width;
        let mut shape = vec![self.len];
        shape.extend_from_slice(&s[2..]);
        Ok(Tensor::from_vec(
            &shape,
            x.data()[off..off + self.len * width].to_vec(),
        )?)
    }

    /// Inputs of step t, [len, I].
    pub fn input(&self, t: usize) -> Result<Option<Tensor<T>>> {
        match &self.batch.inputs {
            None => Ok(None),
            Some(u) => Ok(Some(self.rows(u, t)?)),
        }
    }

    /// Inputs of step t as a constant of `e`, [len, I]: the same values as
    /// [`Trials::input`], taken as a block of the batch's input tensor so
    /// that an engine on a GPU copies many steps' inputs at once.
    pub fn input_on<E: Ops<T>>(&self, e: &mut E, t: usize) -> Result<Option<E::V>> {
        let Some(u) = &self.batch.inputs else {
            return Ok(None);
        };
        let s = u.shape();
        if t >= self.batch.steps || s.len() < 2 {
            return Err(Error::config(
                "step",
                t,
                format!("below {}", self.batch.steps),
            ));
        }
        let width: usize = s[2..].iter().product();
        let mut shape = vec![self.len];
        shape.extend_from_slice(&s[2..]);
        let off = (t * self.batch.trials + self.start) * width;
        Ok(Some(e.constant_block(u, off, &shape)?))
    }

    /// The initial condition, [len, S].
    pub fn initial(&self) -> Result<Option<Tensor<T>>> {
        match &self.batch.initial {
            None => Ok(None),
            Some(x) => Ok(Some(x.slice(0, self.start, self.len)?)),
        }
    }

    /// Seeded noise of step t for these trials, [len, width]: U(lo, hi), or
    /// N(0, 1) when `range` is `None`. Each trial's row comes from its own
    /// stream (see [`Batch::noise_seed`]). A constant with respect to θ.
    pub fn noise(&self, t: usize, width: usize, range: Option<(f64, f64)>) -> Result<Tensor<T>> {
        let mut out = Tensor::<T>::scratch(&[self.len, width]);
        self.fill_noise(t, width, range, out.data_mut());
        Ok(out)
    }

    /// Step t's noise ([`Trials::noise`]) into `out` (len · width values).
    fn fill_noise(&self, t: usize, width: usize, range: Option<(f64, f64)>, out: &mut [T]) {
        use rand::RngExt;
        for (j, row) in out.chunks_mut(width.max(1)).enumerate() {
            let trial = (self.start + j) as u64;
            let mut g = rng::generator(self.batch.noise_seed, rng::substream(t as u64, trial));
            for v in row {
                let x = match range {
                    Some((lo, hi)) => lo + (hi - lo) * g.random::<f64>(),
                    None => g.sample(rand_distr::StandardNormal),
                };
                *v = T::from_f64(x);
            }
        }
    }

    /// The noise of steps [t0, t0 + steps) (cut at the trial's end), [steps,
    /// len, width]: step t's block is [`Trials::noise`]`(t, ..)`, so that a
    /// model can hand its engine the blocks of many steps at once
    /// ([`Ops::constant_block`]).
    pub fn noise_steps(
        &self,
        t0: usize,
        steps: usize,
        width: usize,
        range: Option<(f64, f64)>,
    ) -> Result<Tensor<T>> {
        let steps = steps.min(self.batch.steps.saturating_sub(t0));
        let mut out = Tensor::<T>::scratch(&[steps, self.len, width]);
        let block = (self.len * width).max(1);
        // each step's block from its own streams: the same numbers however
        // the steps are shared out (a GPU pass draws many steps on the host
        // at once, in one group of trials)
        if sofo_tensor::parallel::threads() > 1 && steps > 1 {
            out.data_mut()
                .par_chunks_mut(block)
                .enumerate()
                .for_each(|(i, step)| self.fill_noise(t0 + i, width, range, step));
        } else {
            for (i, step) in out.data_mut().chunks_mut(block).enumerate() {
                self.fill_noise(t0 + i, width, range, step);
            }
        }
        Ok(out)
    }

    /// Whether step t carries any loss for these trials.
    pub fn observed(&self, t: usize) -> bool {
        match &self.batch.weights {
            None => true,
            Some(w) => {
                let m = self.batch.trials;
                w.data()[t * m + self.start..t * m + self.start + self.len]
                    .iter()
                    .any(|&v| v != T::zero())
            }
        }
    }

    /// The little loss of step t: weighted MSE against the targets, with the
    /// whole batch's normaliser (so the groups' losses add up).
    pub fn step_loss(&self, t: usize) -> Result<crate::loss::WeightedMse<T>> {
        let target = self.rows(&self.batch.targets, t)?;
        let weights = match &self.batch.weights {
            None => None,
            Some(w) => {
                let m = self.batch.trials;
                let off = t * m + self.start;
                Some(Tensor::from_vec(
                    &[self.len, 1],
                    w.data()[off..off + self.len].to_vec(),
                )?)
            }
        };
        Ok(crate::loss::WeightedMse {
            target,
            weights,
            n: self.batch.loss_norm,
        })
    }
}

/// A differentiable model: parameters and a run over a batch that observes
/// its little losses.
///
/// Trials must not interact: [`observe_pass`] splits a batch by trials
/// across threads.
pub trait Model<T: Float>: Sync {
    /// Fresh parameters, seeded.
    fn init(&self, seed: u64) -> Result<ParamSet<T>>;
    /// Work on the parameters alone, done once per pass and shared by every
    /// group of trials (transposes, slices). `params` are in the order of
    /// [`Model::init`]; the default passes them through.
    fn prepare<E: Ops<T>>(&self, _e: &mut E, params: &[E::V]) -> Result<Vec<E::V>> {
        Ok(params.to_vec())
    }
    /// Runs the batch on prepared parameters, observing its little losses.
    fn run<E: Ops<T>>(
        &self,
        e: &mut E,
        prepared: &[E::V],
        trials: &Trials<'_, T>,
        obs: &mut dyn Observer<T, E>,
    ) -> Result<()>;
    /// Flops of one forward-K pass with `k` tangents on `batch` (benchmarks).
    fn sofo_flops(&self, k: usize, batch: &Batch<T>) -> f64;
}

/// One forward pass with `k` tangents (`k = 0`: primal only) and the sketch
/// of its observed losses. The trials are split into one group per worker
/// thread; each group runs single-threaded kernels through all T steps, so
/// the time loop has no synchronisation at all, and the groups' sketches are
/// summed in group order (deterministic for a given thread count).
pub fn observe_pass<T: Float, M: Model<T>>(
    model: &M,
    k: usize,
    params: Vec<Dual<T>>,
    batch: &Batch<T>,
) -> Result<Sketch> {
    let mut e = Fwd::new(k);
    let prepared = model.prepare(&mut e, &params)?;
    // what the time loop needs is in `prepared`: free the parameters'
    // tangents (for the rate RNN, W's in their untransposed layout)
    for d in params {
        if let Some(t) = d.tangent {
            t.free();
        }
    }
    let parts = parallel::threads().min(batch.trials).max(1);
    let run = |b: &Trials<'_, T>| -> Result<Sketch> {
        let mut e = Fwd::new(k);
        let mut sk = Sketch::new(k);
        model.run(&mut e, &prepared, b, &mut sk)?;
        Ok(sk)
    };
    if parts == 1 {
        return run(&batch.all())?.finish();
    }
    let groups = batch.split(parts)?;
    let sketches: Vec<Result<Sketch>> = groups
        .par_iter()
        .map(|b| parallel::serial(|| run(b)))
        .collect();
    let mut total = Sketch::new(k);
    for s in sketches {
        total.add(&s?);
    }
    total.finish()
}

/// The loss and its gradient by backpropagation through time: the model
/// runs on a reverse-mode tape, each observed little loss seeds the backward
/// pass with ∂ℓ/∂y, and one sweep gives ∂c/∂θ for every parameter tensor.
/// Trials are split into one group per thread (a tape each) and the groups'
/// gradients summed in group order, as in [`observe_pass`].
pub fn gradient_pass<T: Float, M: Model<T>>(
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
) -> Result<(f64, Vec<Tensor<T>>)> {
    let parts = parallel::threads().min(batch.trials).max(1);
    let run = |b: &Trials<'_, T>| -> Result<(f64, Vec<Tensor<T>>)> {
        let mut r = Rev::<T>::new();
        let leaves: Vec<Var> = params.iter().map(|p| r.leaf(p.value.clone())).collect();
        let prepared = model.prepare(&mut r, &leaves)?;
        let mut seeds = GradientSeeds {
            loss: 0.0,
            seeds: vec![],
        };
        model.run(&mut r, &prepared, b, &mut seeds)?;
        let g = r.backward(seeds.seeds)?;
        let grads = leaves
            .iter()
            .zip(params.iter())
            .map(|(l, p)| {
                g[l.id()]
                    .clone()
                    .unwrap_or_else(|| Tensor::zeros(p.value.shape()))
            })
            .collect();
        Ok((seeds.loss, grads))
    };
    if parts == 1 {
        return run(&batch.all());
    }
    let groups = batch.split(parts)?;
    let results: Vec<Result<(f64, Vec<Tensor<T>>)>> = groups
        .par_iter()
        .map(|b| parallel::serial(|| run(b)))
        .collect();
    let mut total: Option<(f64, Vec<Tensor<T>>)> = None;
    for r in results {
        let (l, g) = r?;
        total = Some(match total {
            None => (l, g),
            Some((tl, mut tg)) => {
                for (a, b) in tg.iter_mut().zip(&g) {
                    a.axpy(T::one(), b)?;
                }
                (tl + l, tg)
            }
        });
    }
    Ok(total.expect("at least one group"))
}

/// Under reverse mode, an observation records the loss and the seed ∂ℓ/∂y.
struct GradientSeeds<T: Float> {
    loss: f64,
    seeds: Vec<(Var, Tensor<T>)>,
}

impl<T: Float> Observer<T, Rev<T>> for GradientSeeds<T> {
    fn observe(
        &mut self,
        e: &mut Rev<T>,
        y: &Var,
        loss: &dyn crate::loss::LittleLoss<T>,
    ) -> Result<()> {
        let yv = e.value_of(y);
        self.loss += loss.value(yv)?;
        self.seeds
            .push((y.clone(), loss.gradient(yv)?.convert::<T>()));
        Ok(())
    }
}

/// The loss and the model's outputs at every observed step (primal
/// evaluation on the CPU): for task metrics and pictures.
pub fn record_outputs<T: Float, M: Model<T>>(
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
) -> Result<(f64, Vec<Tensor<T>>)> {
    let mut e = Fwd::primal();
    let duals: Vec<Dual<T>> = params
        .iter()
        .map(|p| Dual::constant(p.value.clone()))
        .collect();
    let prepared = model.prepare(&mut e, &duals)?;
    let mut rec = Recorder {
        loss: 0.0,
        outputs: vec![],
    };
    model.run(&mut e, &prepared, &batch.all(), &mut rec)?;
    Ok((rec.loss, rec.outputs))
}

struct Recorder<T: Float> {
    loss: f64,
    outputs: Vec<Tensor<T>>,
}

impl<T: Float> Observer<T, Fwd> for Recorder<T> {
    fn observe(
        &mut self,
        _e: &mut Fwd,
        y: &Dual<T>,
        loss: &dyn crate::loss::LittleLoss<T>,
    ) -> Result<()> {
        self.loss += loss.value(&y.primal)?;
        self.outputs.push(y.primal.clone());
        Ok(())
    }
}
