//! SOFO against FORCE on one reservoir (tasks.md §4): the fixed network of
//! a [`ForceConfig`] as a [`ReservoirRnn`], and the flip-flop comparison.
//!
//! Both methods train the readout W of the same network (same J, F, B from
//! the config's seed) from W = 0 on the same training trials (the flip-flop
//! task's batches under one seed, each trial started from the same initial
//! state), and are scored with learning off on the same held-out trials.
//! SOFO takes one step per batch; FORCE runs each batch once with RLS on
//! (its M trials side by side, the samples of a step fed in trial order, see
//! [`Force`]).

use super::force::{Force, ForceConfig};
use super::{Damping, Optimizer, Sofo, SofoConfig, StepReport};
use crate::models::{record_outputs, Batch, Model, ReservoirRnn};
use crate::params::ParamSet;
use crate::tasks::{correct_bits, FlipFlopTask, Task};
use crate::{Error, Result};
use sofo_tensor::{Float, Tensor};
use std::time::Instant;

/// The network of `net` as a model: its J, F, B, dt and x0 scale.
pub fn reservoir_model(net: &Force) -> Result<ReservoirRnn> {
    let cfg = net.config();
    let n = cfg.n;
    ReservoirRnn::new(
        cfg.dt,
        cfg.x0_scale,
        &Tensor::from_vec(&[n, n], net.recurrent_dense())?,
        Tensor::from_vec(&[cfg.outputs, n], net.feedback().to_vec())?,
        Tensor::from_vec(&[cfg.inputs, n], net.input_weights().to_vec())?,
    )
}

/// The network of `cfg` as a model (the J, F, B of `Force::new(cfg, ·)`).
pub fn reservoir_of(cfg: &ForceConfig) -> Result<ReservoirRnn> {
    reservoir_model(&Force::new(cfg.clone(), 1)?)
}

/// Settings of one SOFO-against-FORCE run on the flip-flop.
#[derive(Debug, Clone)]
pub struct FlipFlopComparison {
    /// The network (its `inputs` and `outputs` must equal `task.bits`).
    pub network: ForceConfig,
    pub task: FlipFlopTask,
    /// Trials per training batch.
    pub batch: usize,
    /// Training batches, for each method.
    pub iterations: usize,
    /// Held-out trials (the task's fixed test batch).
    pub test_trials: usize,
    pub sofo: SofoConfig,
    /// Seed of the training batches and of SOFO's tangents.
    pub seed: u64,
}

impl FlipFlopComparison {
    /// tasks.md §4: `ForceConfig::flip_flop(g, bits)` (N = 1000), T = 200,
    /// batch 32, SOFO with K = 128, lr 1, damping 1e-5. §4 fixes no budget:
    /// 100 batches, 128 held-out trials.
    ///
    /// Measured at N = 150 and 400 (g = 0.5): with lr 1 the first step from
    /// W = 0 (the least-squares readout of the input-driven rates, the
    /// feedback acting only through W) overshoots, the fed-back output
    /// saturates the reservoir and the test MSE goes from 0.6 to 19 (N = 150)
    /// or 6400 (N = 400); lr 0.05–0.3 learns (tests/reservoir.rs).
    pub fn new(g: f64, bits: usize) -> Self {
        FlipFlopComparison {
            network: ForceConfig::flip_flop(g, bits),
            task: FlipFlopTask::new(bits, 200),
            batch: 32,
            iterations: 100,
            test_trials: 128,
            sofo: SofoConfig {
                k: 128,
                lr: 1.0,
                damping: Damping::RelativeLargest(1e-5),
                ..SofoConfig::default()
            },
            seed: 0,
        }
    }

    /// Checks every setting; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        self.network.validate()?;
        self.task.validate()?;
        self.sofo.validate()?;
        let bits = self.task.bits;
        if self.network.inputs != bits {
            return Err(Error::config(
                "force.inputs",
                self.network.inputs,
                format!("{bits} (the flip-flop's bits)"),
            ));
        }
        if self.network.outputs != bits {
            return Err(Error::config(
                "force.outputs",
                self.network.outputs,
                format!("{bits} (the flip-flop's bits)"),
            ));
        }
        if self.batch == 0 {
            return Err(Error::config("batch", self.batch, "at least 1"));
        }
        if self.test_trials == 0 {
            return Err(Error::config("test_trials", self.test_trials, "at least 1"));
        }
        Ok(())
    }
}

/// Held-out performance with learning off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    /// Share of (step, trial, bit) outputs that round to the target
    /// ([`correct_bits`]).
    pub correct_bits: f64,
    /// Mean over (step, trial, bit) of (y − target)².
    pub mse: f64,
}

impl Score {
    /// The score of outputs against targets, both `[T, M, O]` flattened.
    pub fn of(outputs: &[f64], targets: &[f64]) -> Self {
        let se: f64 = outputs
            .iter()
            .zip(targets)
            .map(|(y, f)| (y - f) * (y - f))
            .sum();
        Score {
            correct_bits: correct_bits(outputs, targets),
            mse: se / targets.len().max(1) as f64,
        }
    }
}

/// One method's run.
#[derive(Debug, Clone)]
pub struct MethodOutcome {
    pub test: Score,
    /// Per training batch: SOFO's loss before its step; FORCE's a-priori
    /// MSE (RLS on) over the batch.
    pub train_loss: Vec<f64>,
    /// Wall time of the training alone.
    pub train_seconds: f64,
}

#[derive(Debug, Clone)]
pub struct ComparisonOutcome {
    /// W = 0 (the start of both methods).
    pub untrained: Score,
    pub sofo: MethodOutcome,
    pub force: MethodOutcome,
}

/// Trains the readout of `model` with `optimizer`, one step on each of
/// `iterations` flip-flop batches of `trials` trials under `seed`. Returns
/// the step reports.
pub fn train_readout<T: Float, O: Optimizer<T>>(
    model: &ReservoirRnn,
    task: &FlipFlopTask,
    optimizer: &mut O,
    params: &mut ParamSet<T>,
    trials: usize,
    iterations: usize,
    seed: u64,
) -> Result<Vec<StepReport>> {
    (0..iterations)
        .map(|it| {
            let b: Batch<T> = task.train_batch(seed, it as u64, trials)?;
            optimizer.step(model, params, &b, seed, it as u64)
        })
        .collect()
}

/// Trains `net` by FORCE on the same batches as [`train_readout`] (`net`
/// has `trials` trials): each batch starts from the model's initial states
/// for it (the step count restarts, so RLS runs at the same steps of every
/// batch) and runs once with learning on. `model` must be `net`'s network
/// (it supplies the initial states). Returns each batch's mean a-priori MSE.
pub fn train_force(
    net: &mut Force,
    model: &ReservoirRnn,
    task: &FlipFlopTask,
    iterations: usize,
    seed: u64,
) -> Result<Vec<f64>> {
    (0..iterations)
        .map(|it| force_iteration(net, model, task, seed, it as u64))
        .collect()
}

/// FORCE on training batch `iteration` (under `seed`) of the task, learning
/// on: the mean squared error while it learns.
pub fn force_iteration(
    net: &mut Force,
    model: &ReservoirRnn,
    task: &FlipFlopTask,
    seed: u64,
    iteration: u64,
) -> Result<f64> {
    let b: Batch<f64> = task.train_batch(seed, iteration, net.trials())?;
    start_force(net, model, &b)?;
    Ok(net.train(&b.targets, b.inputs.as_ref())?.mean_mse())
}

/// Resets the step count and sets the batch's initial states.
fn start_force(net: &mut Force, model: &ReservoirRnn, b: &Batch<f64>) -> Result<()> {
    net.reset(0);
    net.set_state(model.initial_states(b)?.data())
}

/// The model's held-out score on `test` (every step observed).
pub fn score_model<T: Float>(
    model: &ReservoirRnn,
    params: &ParamSet<T>,
    test: &Batch<T>,
) -> Result<Score> {
    let (_, ys) = record_outputs(model, params, test)?;
    let out: Vec<f64> = ys.iter().flat_map(|y| y.to_f64_vec()).collect();
    Ok(Score::of(&out, &test.targets.to_f64_vec()))
}

/// FORCE's held-out score on `test` with learning off: a copy of the
/// network with `test`'s trial count and `readout` W (`[N, O]`), started
/// from the model's initial states for `test`.
pub fn score_force(
    cfg: &ForceConfig,
    readout: &[f64],
    model: &ReservoirRnn,
    test: &Batch<f64>,
) -> Result<Score> {
    let out = force_outputs(cfg, readout, model, test)?;
    Ok(Score::of(out.data(), test.targets.data()))
}

/// FORCE's outputs `[T, M, O]` on `test` with learning off (see
/// [`score_force`]).
pub fn force_outputs(
    cfg: &ForceConfig,
    readout: &[f64],
    model: &ReservoirRnn,
    test: &Batch<f64>,
) -> Result<Tensor<f64>> {
    let mut net = Force::new(cfg.clone(), test.trials)?;
    net.set_readout(readout)?;
    start_force(&mut net, model, test)?;
    net.run(test.steps, test.inputs.as_ref())
}

/// Runs both methods on the network of `cmp.network` and scores them on the
/// same held-out trials. SOFO runs in precision `T` (FORCE in f64; the
/// trials are the same, the initial states rounded to `T`).
pub fn compare_flip_flop<T: Float>(cmp: &FlipFlopComparison) -> Result<ComparisonOutcome> {
    cmp.validate()?;
    let mut net = Force::new(cmp.network.clone(), cmp.batch)?;
    let model = reservoir_model(&net)?;
    let test64: Batch<f64> = cmp.task.test_batch(cmp.test_trials)?;
    let test: Batch<T> = cmp.task.test_batch(cmp.test_trials)?;

    let mut params: ParamSet<T> = model.init(cmp.seed)?;
    let untrained = score_model(&model, &params, &test)?;

    let mut sofo = Sofo::new(cmp.sofo.clone())?;
    let start = Instant::now();
    let reports = train_readout(
        &model,
        &cmp.task,
        &mut sofo,
        &mut params,
        cmp.batch,
        cmp.iterations,
        cmp.seed,
    )?;
    let sofo_seconds = start.elapsed().as_secs_f64();
    let sofo_outcome = MethodOutcome {
        test: score_model(&model, &params, &test)?,
        train_loss: reports.iter().map(|r| r.loss).collect(),
        train_seconds: sofo_seconds,
    };

    let start = Instant::now();
    let force_loss = train_force(&mut net, &model, &cmp.task, cmp.iterations, cmp.seed)?;
    let force_seconds = start.elapsed().as_secs_f64();
    let force_outcome = MethodOutcome {
        test: score_force(&cmp.network, net.readout(), &model, &test64)?,
        train_loss: force_loss,
        train_seconds: force_seconds,
    };
    Ok(ComparisonOutcome {
        untrained,
        sofo: sofo_outcome,
        force: force_outcome,
    })
}
