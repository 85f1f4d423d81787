//! The training loop: batches, SOFO steps, metrics, checkpoints, and the
//! guard that keeps non-finite values out of the weights.

use crate::checkpoint;
use crate::device::Device;
use crate::models::{record_outputs, Batch, Model};
use crate::optim::Optimizer;
use crate::params::ParamSet;
use crate::tasks::Task;
use crate::Result;
use sofo_ad::Dual;
use sofo_tensor::Float;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The loss of `params` on `batch` (primal evaluation on the CPU).
pub fn evaluate<T: Float, M: Model<T>>(
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
) -> Result<f64> {
    evaluate_on(&Device::Cpu, model, params, batch)
}

/// The loss of `params` on `batch` (primal evaluation on `device`).
pub fn evaluate_on<T: Float, M: Model<T>>(
    device: &Device,
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
) -> Result<f64> {
    let duals: Vec<Dual<T>> = params
        .iter()
        .map(|p| Dual::constant(p.value.clone()))
        .collect();
    Ok(device.pass(model, 0, duals, batch)?.loss)
}

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub iterations: usize,
    pub batch: usize,
    pub seed: u64,
    /// Evaluate on the test batch every this many iterations (and at the end).
    pub eval_every: usize,
    pub test_trials: usize,
    /// Run directory for metrics.csv and weights.safetensors.
    pub out: Option<PathBuf>,
    /// Where held-out evaluations run.
    pub device: Device,
}

/// One row of metrics.csv.
#[derive(Debug, Clone)]
pub struct MetricsRow {
    pub iteration: usize,
    pub loss: f64,
    pub wall_s: f64,
    pub test_loss: Option<f64>,
    pub max_eigenvalue: f64,
    pub applied: bool,
    /// The task's metric, where it has one, at evaluation points.
    pub metric: Option<f64>,
}

/// `metric`: the task's own score on the held-out trials (see
/// [`Task::metric`]), at the evaluation points.
pub const METRICS_HEADER: &str = "iteration,loss,wall_s,test_loss,max_eigenvalue,applied,metric";

impl MetricsRow {
    pub fn csv(&self) -> String {
        format!(
            "{},{:.9e},{:.6},{},{:.6e},{},{}",
            self.iteration,
            self.loss,
            self.wall_s,
            self.test_loss
                .map(|v| format!("{v:.9e}"))
                .unwrap_or_default(),
            self.max_eigenvalue,
            self.applied as u8,
            self.metric.map(|v| format!("{v:.6}")).unwrap_or_default()
        )
    }
}

/// Trains `params` with `optimizer`. `on_row` sees every row as it is
/// written (for a progress display); `stop` is polled between iterations
/// (Ctrl-C).
pub fn train<T: Float, M: Model<T>, K: Task<T>, O: Optimizer<T>>(
    model: &M,
    task: &K,
    params: &mut ParamSet<T>,
    optimizer: &mut O,
    opts: &TrainOptions,
    mut on_row: impl FnMut(&MetricsRow),
    stop: impl Fn() -> bool,
) -> Result<Vec<MetricsRow>> {
    let mut csv = match &opts.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)?;
            let mut f = std::fs::File::create(dir.join("metrics.csv"))?;
            writeln!(f, "{METRICS_HEADER}")?;
            Some(f)
        }
        None => None,
    };
    let test = task.test_batch(opts.test_trials)?;
    let start = Instant::now();
    let mut rows = Vec::with_capacity(opts.iterations);
    for it in 0..opts.iterations {
        if stop() {
            break;
        }
        let batch = task.train_batch(opts.seed, it as u64, opts.batch)?;
        let rep = optimizer.step(model, params, &batch, opts.seed, it as u64)?;
        let last = it + 1 == opts.iterations;
        let eval_now = opts.eval_every > 0 && ((it + 1) % opts.eval_every == 0 || last);
        // one held-out pass gives the loss and, for the task's metric, the
        // outputs (on the CPU: the recording pass; elsewhere the device's)
        let (test_loss, metric) = if !eval_now {
            (None, None)
        } else if task.metric_name().is_some() && matches!(opts.device, Device::Cpu) {
            let (loss, ys) = record_outputs(model, params, &test)?;
            (Some(loss), task.metric(&ys, &test))
        } else {
            // a diverged model scores NaN; the run goes on (its steps are skipped)
            let loss = match evaluate_on(&opts.device, model, params, &test) {
                Ok(l) => l,
                Err(crate::Error::NonFinite(_)) => f64::NAN,
                Err(e) => return Err(e),
            };
            let metric = match task.metric_name() {
                Some(_) => task.metric(&record_outputs(model, params, &test)?.1, &test),
                None => None,
            };
            (Some(loss), metric)
        };
        let row = MetricsRow {
            iteration: it,
            loss: rep.loss,
            wall_s: start.elapsed().as_secs_f64(),
            test_loss,
            max_eigenvalue: rep.max_eigenvalue,
            applied: rep.applied,
            metric,
        };
        if let Some(f) = csv.as_mut() {
            writeln!(f, "{}", row.csv())?;
            f.flush()?;
        }
        on_row(&row);
        rows.push(row);
    }
    if let Some(dir) = &opts.out {
        save_weights(params, dir)?;
    }
    Ok(rows)
}

pub fn save_weights<T: Float>(params: &ParamSet<T>, dir: &Path) -> Result<()> {
    checkpoint::save(params, &dir.join("weights.safetensors"))
}
