//! `sofo`: train recurrent networks with SOFO, and benchmark it.

mod bench;
mod config;
mod plot;

use clap::{Args, Parser, Subcommand};
use config::RunConfig;
use indicatif::{ProgressBar, ProgressStyle};
use sofo::models::{record_outputs, ConstrainedRnn, LeakyRnn, Model, ReachRnn};
use sofo::optim::Sofo;
use sofo::optim::{Adam, Fgd, Optimizer, Sgd};
use sofo::params::ParamSet;
use sofo::tasks::{correct_bits, AdditionTask, FlipFlopTask, KalmanTask, ReachTask, Task};
use sofo::train::{train, MetricsRow, TrainOptions};
use sofo::{Error, Result};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "sofo",
    version,
    about = "Train recurrent networks with second-order forward-mode optimisation (SOFO)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a network on a task.
    Train(TrainArgs),
    /// Train several optimisers from the same initial weights on the same
    /// batches; plot and tabulate their losses.
    Compare(CompareArgs),
    /// Re-evaluate a run's saved weights on held-out trials.
    Eval(EvalArgs),
    /// Seconds per SOFO iteration and GFLOP/s on fixed configurations.
    Bench(bench::BenchArgs),
    /// List the tasks with their defaults.
    Tasks,
    /// Where training can run: the CPU's threads and, in a CUDA build, the
    /// CUDA libraries found and each GPU (opened, kernels compiled).
    Devices,
}

#[derive(Args)]
struct EvalArgs {
    /// A run directory (config.toml and weights.safetensors).
    #[arg(long, value_name = "DIR")]
    run: PathBuf,
    /// Seed of fresh held-out trials (flip-flop, addition); default: the
    /// task's own test set.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
}

/// Settings shared by `train` and `compare`.
#[derive(Args, Clone)]
struct RunArgs {
    /// Task to train on (see `sofo tasks`).
    #[arg(long)]
    task: Option<String>,
    /// Number of iterations.
    #[arg(long, value_name = "N")]
    iterations: Option<usize>,
    /// Trials per batch (M).
    #[arg(long, value_name = "M")]
    batch: Option<usize>,
    /// Seed of initialisation, tangents and batches.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Worker threads (0 = all cores).
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Where the passes run (SOFO's and BPTT's): cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEV")]
    device: Option<String>,
    /// The GPU's f32 GEMMs: f32 (default) or tf32 (tensor cores, as JAX).
    #[arg(long, value_name = "f32|tf32")]
    gpu_matmul: Option<String>,
    /// Settings file (TOML); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// Any config field, e.g. --set noise.state=0.1 --set constraints.dale=true
    /// (VALUE in TOML syntax; applied over --config, under the flags above).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Optimisers to compare, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "sofo,adam")]
    optimizers: Vec<String>,
    /// Directory: one run directory per optimiser, compare.png.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Optimiser.
    #[arg(long)]
    optimizer: Option<String>,
    /// Number of tangents K (SOFO, FGD).
    #[arg(long, value_name = "K")]
    tangents: Option<usize>,
    /// Learning rate η of the chosen optimiser.
    #[arg(long, value_name = "η", allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Relative damping λ.
    #[arg(long, value_name = "λ", allow_negative_numbers = true)]
    damping: Option<f64>,
    /// Run directory (config.toml, metrics.csv, weights.safetensors).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

fn resolve(a: &TrainArgs) -> Result<RunConfig> {
    let mut c = match &a.run.config {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                Error::config(
                    "--config",
                    p.display(),
                    format!("a readable TOML file ({e})"),
                )
            })?;
            RunConfig::from_toml(&text, &p.display().to_string())?
        }
        None => RunConfig::defaults_for(a.run.task.as_deref().unwrap_or("lorenz")),
    };
    c.set(&a.run.set)?;
    if let Some(v) = &a.run.task {
        c.task = v.clone();
    }
    if let Some(v) = &a.optimizer {
        c.optimizer = v.clone();
    }
    if let Some(v) = a.run.iterations {
        c.iterations = v;
    }
    if let Some(v) = a.run.batch {
        c.batch = v;
    }
    if let Some(v) = a.tangents {
        match c.optimizer.as_str() {
            "fgd" => c.fgd.tangents = v,
            _ => c.sofo.tangents = v,
        }
    }
    if let Some(v) = a.lr {
        match c.optimizer.as_str() {
            "adam" => c.adam.lr = v,
            "sgd" => c.sgd.lr = v,
            "fgd" => c.fgd.lr = v,
            _ => c.sofo.lr = v,
        }
    }
    if let Some(v) = a.damping {
        c.sofo.damping = v;
    }
    if let Some(v) = a.run.seed {
        c.seed = v;
    }
    if let Some(v) = a.run.threads {
        c.threads = v;
    }
    if let Some(v) = &a.run.device {
        c.device = v.clone();
    }
    if let Some(v) = &a.run.gpu_matmul {
        c.gpu_matmul = v.clone();
    }
    if let Some(v) = &a.out {
        c.out = v.display().to_string();
    }
    c.validate()?;
    Ok(c)
}

fn run_train(a: TrainArgs) -> Result<()> {
    let cfg = resolve(&a)?;
    sofo_tensor::parallel::set_threads(cfg.threads);
    run_config(&cfg, a.run.quiet).map(|_| ())
}

/// Trains as `cfg` says, in `cfg.out`; returns the metrics rows.
fn run_config(cfg: &RunConfig, quiet: bool) -> Result<Vec<MetricsRow>> {
    let out = PathBuf::from(&cfg.out);
    std::fs::create_dir_all(&out)?;
    sofo::checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;
    if cfg.optimizer == "force" {
        return if cfg.task == "flipflop-reservoir" {
            run_force_flipflop(cfg, &out, quiet)
        } else {
            run_force(cfg, &out, quiet)
        };
    }

    let device = sofo::Device::open_with(&cfg.device, &cfg.gpu_matmul)?;
    let run = Run {
        cfg,
        quiet,
        out,
        device,
    };
    match cfg.task.as_str() {
        "addition" => {
            let (task, rnn) = cfg.addition()?;
            let model = cfg.constrained(rnn)?;
            let mut params = Model::<f32>::init(&model, cfg.seed)?;
            cfg.apply_modes(&mut params)?;
            report_start(&model, &params)?;
            let (rows, params) = run.with_optimizer(&model, &task, params)?;
            save_effective(&model, &params, &run.out)?;
            addition_report(&model, &task, &params, &run.out)?;
            Ok(rows)
        }
        "flipflop" => {
            let (task, rnn) = cfg.flipflop()?;
            let model = cfg.constrained(rnn)?;
            let mut params = Model::<f32>::init(&model, cfg.seed)?;
            cfg.apply_modes(&mut params)?;
            report_start(&model, &params)?;
            let (rows, params) = run.with_optimizer(&model, &task, params)?;
            save_effective(&model, &params, &run.out)?;
            flipflop_report(&model, &task, &params, 256, &run.out)?;
            Ok(rows)
        }
        "reach1" | "reach2" => {
            let (task, model) = cfg.reach()?;
            let (rows, params) = run.train(&model, &task)?;
            reach_report(&model, &task, &params, cfg.test_trials, &run.out)?;
            Ok(rows)
        }
        "flipflop-reservoir" => {
            let (task, fc) = cfg.flipflop_reservoir()?;
            let model = sofo::optim::reservoir::reservoir_of(&fc)?;
            eprintln!(
                "reservoir: N = {}, g = {}, J, F and B fixed, only the readout W [N, {}] trained",
                fc.n, fc.g, task.bits
            );
            let (rows, params) = run.train(&model, &task)?;
            flipflop_report(&model, &task, &params, cfg.test_trials, &run.out)?;
            Ok(rows)
        }
        "kalman" | "kalman-long" => {
            let (task, model) = cfg.kalman()?;
            let (rows, params) = run.train(&model, &task)?;
            kalman_report(&model, &task, &params, cfg.test_trials, &run.out)?;
            Ok(rows)
        }
        _ => {
            let (task, model) = cfg.lorenz()?;
            Ok(run.train(&model, &task)?.0)
        }
    }
}

/// The recurrent weights' spectral radius at start, beside the gain.
fn report_start(model: &ConstrainedRnn, params: &ParamSet<f32>) -> Result<()> {
    let r = model.spectral_radius(params)?;
    eprintln!(
        "rate RNN: N = {}, gain g = {}, spectral radius of W at start {r:.3}{}",
        model.rnn.n,
        model.rnn.gain,
        if r > 1.0 { " (chaotic regime)" } else { "" }
    );
    Ok(())
}

/// Under constraints, the weights the network uses go beside the raw ones.
fn save_effective(
    model: &ConstrainedRnn,
    params: &ParamSet<f32>,
    out: &std::path::Path,
) -> Result<()> {
    if !model.reparameterised() {
        return Ok(());
    }
    let eff = model.effective_weights(params)?;
    let set = ParamSet::new(
        eff.into_iter()
            .map(|(name, value)| sofo::params::Param {
                name,
                value,
                mode: sofo::params::ParamMode::Pinned,
            })
            .collect(),
    );
    sofo::checkpoint::save(&set, &out.join("weights_effective.safetensors"))
}

/// Delayed addition's metric and picture on held-out trials: the MSE of
/// the reported sums, the share within 0.04, and predicted against true.
fn addition_report(
    model: &ConstrainedRnn,
    task: &AdditionTask,
    params: &ParamSet<f32>,
    out: &std::path::Path,
) -> Result<()> {
    let test = Task::<f32>::test_batch(task, 256)?;
    let (_, ys) = record_outputs(model, params, &test)?;
    let pred = ys.last().map(|y| y.to_f64_vec()).unwrap_or_default();
    let m = test.trials;
    let truth = test.targets.to_f64_vec()[(task.steps - 1) * m..].to_vec();
    let mse = pred
        .iter()
        .zip(&truth)
        .map(|(p, t)| (p - t) * (p - t))
        .sum::<f64>()
        / m as f64;
    let within = pred
        .iter()
        .zip(&truth)
        .filter(|(p, t)| (*p - *t).abs() < 0.04)
        .count() as f64
        / m as f64;
    plot::scatter(
        &out.join("addition.png"),
        &format!(
            "delayed addition, T = {}: MSE {mse:.4}, {:.1} % within 0.04",
            task.steps,
            100.0 * within
        ),
        "true sum",
        "reported sum",
        &truth.into_iter().zip(pred).collect::<Vec<_>>(),
    )?;
    eprintln!(
        "addition: MSE {mse:.4e} (1/6 = predicting the mean), {:.1} % within 0.04 on 256 held-out trials; wrote {}/addition.png",
        100.0 * within,
        out.display()
    );
    Ok(())
}

/// The flip-flop's metric and picture on held-out trials: the share of
/// correct bits of `model`, and outputs against targets for one trial.
fn flipflop_report<M: Model<f32>>(
    model: &M,
    task: &FlipFlopTask,
    params: &ParamSet<f32>,
    trials: usize,
    out: &std::path::Path,
) -> Result<()> {
    let test = Task::<f32>::test_batch(task, trials)?;
    let (_, ys) = record_outputs(model, params, &test)?;
    let outputs: Vec<f64> = ys.iter().flat_map(|y| y.to_f64_vec()).collect();
    flipflop_picture(task, &test, &outputs, out)
}

/// Prints the share of correct bits of `outputs` ([T, M, b]) on `test` and
/// draws flipflop.png.
fn flipflop_picture<T: sofo::Float>(
    task: &FlipFlopTask,
    test: &sofo::models::Batch<T>,
    outputs: &[f64],
    out: &std::path::Path,
) -> Result<()> {
    let targets = test.targets.to_f64_vec();
    let share = correct_bits(outputs, &targets);
    let (m, b) = (test.trials, task.bits);
    let channel =
        |v: &[f64], c: usize| -> Vec<f64> { (0..task.steps).map(|t| v[(t * m) * b + c]).collect() };
    let inputs = test
        .inputs
        .as_ref()
        .map(|u| u.to_f64_vec())
        .unwrap_or_default();
    // the first three bits of trial 1 (ten stacked panels would be unreadable)
    let traces: Vec<plot::Trace> = (0..b.min(3))
        .map(|c| plot::Trace {
            label: format!("bit {}", c + 1),
            lines: vec![
                ("input".into(), channel(&inputs, c)),
                ("target".into(), channel(&targets, c)),
                ("output".into(), channel(outputs, c)),
            ],
            marks: vec![],
        })
        .collect();
    plot::traces(
        &out.join("flipflop.png"),
        &format!(
            "flip-flop, held-out trial 1: {:.1} % of bits correct over {m} trials",
            100.0 * share
        ),
        &traces,
    )?;
    eprintln!(
        "flip-flop: {:.2} % of bits correct on {m} held-out trials; wrote {}/flipflop.png",
        100.0 * share,
        out.display()
    );
    Ok(())
}

/// The reach's hand errors and picture on held-out trials: the mean hand
/// error in each hold window, the share of trials within 2 cm, and the hand
/// paths of six trials with their targets.
fn reach_report(
    model: &ReachRnn,
    task: &ReachTask,
    params: &ParamSet<f32>,
    trials: usize,
    out: &std::path::Path,
) -> Result<()> {
    let name = Task::<f32>::name(task);
    let mut test = Task::<f32>::test_batch(task, trials)?;
    let (seed, stream) = task.test_stream();
    let layouts: Vec<_> = (0..trials).map(|j| task.trial(seed, stream, j)).collect();
    // every step observed: the whole path, not just the hold windows
    test.weights = None;
    let (_, ys) = record_outputs(model, params, &test)?;
    let hand: Vec<Vec<f64>> = ys.iter().map(|y| y.to_f64_vec()).collect();
    let rep = task.report(&hand, 4, &layouts);
    let centre = task.arm.central_spot();
    // as many as the palette has colours: a repeated colour would pair a
    // path with another trial's targets
    let shown = trials.min(plot::COLOR_COUNT);
    let paths: Vec<plot::ReachPath> = (0..shown)
        .map(|j| plot::ReachPath {
            hand: hand.iter().map(|h| (h[j * 4], h[j * 4 + 1])).collect(),
            targets: (1..=layouts[j].targets.len())
                .map(|i| {
                    let [x, y] = task.goal(&layouts[j], i);
                    (x, y)
                })
                .collect(),
        })
        .collect();
    let errors: Vec<String> = rep
        .window_error_cm
        .iter()
        .map(|(w, e)| format!("{w} {e:.2} cm"))
        .collect();
    plot::reach_paths(
        &out.join("reach.png"),
        &format!(
            "{name}: {:.1} % of {trials} held-out trials within 2 cm",
            100.0 * rep.within_2cm
        ),
        (centre[0], centre[1]),
        &paths,
    )?;
    eprintln!(
        "{name}: mean hand error {}; {:.1} % of {trials} held-out trials within 2 cm in every reach hold; wrote {}/reach.png",
        errors.join(", "),
        100.0 * rep.within_2cm,
        out.display()
    );
    Ok(())
}

/// The Kalman network's per-step MSE on held-out trials beside the two
/// reference filters on the same trials, and a picture of two trials:
/// truth, observations, the network's estimate and the oracle's, with the
/// switch times marked.
fn kalman_report(
    model: &LeakyRnn,
    task: &KalmanTask,
    params: &ParamSet<f32>,
    trials: usize,
    out: &std::path::Path,
) -> Result<()> {
    use sofo::tasks::kalman::oracle_estimates;
    let tr = task.test_trials(trials)?;
    let batch = tr.batch::<f32>()?;
    let (_, ys) = record_outputs(model, params, &batch)?;
    let est: Vec<f64> = ys.iter().flat_map(|y| y.to_f64_vec()).collect();
    let mse = tr.mse(&est);
    let oracle = oracle_estimates(&tr);
    // the oracle's estimates serve the picture and its level
    let refs = sofo::tasks::kalman::KalmanReferences {
        oracle: tr.mse(&oracle),
        prior_mean: tr.prior_mean_mse(),
        observation: tr.observation_mse(),
    };
    let panels: Vec<plot::Trace> = (0..trials.min(2))
        .map(|j| plot::Trace {
            label: format!("held-out trial {}", j + 1),
            lines: vec![
                ("observation y".into(), tr.series(&tr.y, j)),
                ("truth x".into(), tr.series(&tr.x, j)),
                ("network".into(), tr.series(&est, j)),
                ("oracle filter".into(), tr.series(&oracle, j)),
            ],
            marks: tr.segments[j].iter().skip(1).map(|s| s.start).collect(),
        })
        .collect();
    plot::traces(
        &out.join("kalman.png"),
        &format!(
            "{}, T = {}: per-step MSE {mse:.3} (oracle {:.3}, prior-mean filter {:.3}); dashed: switches",
            task.name, task.steps, refs.oracle, refs.prior_mean
        ),
        &panels,
    )?;
    eprintln!(
        "{}: per-step MSE {mse:.4} on {trials} held-out trials; on the same trials the oracle Kalman filter (true parameters and switch times) {:.4}, the prior-mean Kalman filter {:.4}, the raw observation {:.4}; wrote {}/kalman.png",
        task.name,
        refs.oracle,
        refs.prior_mean,
        refs.observation,
        out.display()
    );
    Ok(())
}

/// FORCE on the flip-flop reservoir: RLS on the readout over the task's
/// training batches (the same trials and initial states SOFO gets under the
/// same seed), one metrics row per batch (the MSE while learning), the
/// held-out MSE and share of correct bits with learning off at the
/// evaluation points; weights: readout `W` [N, b].
fn run_force_flipflop(
    cfg: &RunConfig,
    out: &std::path::Path,
    quiet: bool,
) -> Result<Vec<MetricsRow>> {
    use sofo::optim::force::Force;
    use sofo::optim::reservoir::{force_iteration, force_outputs, reservoir_model};
    use sofo::params::{Param, ParamMode};
    let (task, fc) = cfg.flipflop_reservoir()?;
    let mut net = Force::new(fc.clone(), cfg.batch)?;
    let model = reservoir_model(&net)?;
    let test: sofo::models::Batch<f64> = task.test_batch(cfg.test_trials)?;
    eprintln!(
        "sofo: task flipflop-reservoir | optimizer force | N = {} | g = {} | M = {} | {} iterations | run dir {}",
        fc.n,
        fc.g,
        cfg.batch,
        cfg.iterations,
        out.display()
    );
    let mut csv = std::fs::File::create(out.join("metrics.csv"))?;
    use std::io::Write;
    writeln!(csv, "{}", sofo::train::METRICS_HEADER)?;
    let start = std::time::Instant::now();
    let mut rows = Vec::new();
    for it in 0..cfg.iterations {
        let loss = force_iteration(&mut net, &model, &task, cfg.seed, it as u64)?;
        let last = it + 1 == cfg.iterations;
        let eval = last || (cfg.eval_every > 0 && (it + 1) % cfg.eval_every == 0);
        let (test_loss, metric) = if eval {
            let y = force_outputs(&fc, net.readout(), &model, &test)?;
            let s = sofo::optim::reservoir::Score::of(y.data(), test.targets.data());
            (Some(s.mse), Some(s.correct_bits))
        } else {
            (None, None)
        };
        let row = MetricsRow {
            iteration: it,
            loss,
            wall_s: start.elapsed().as_secs_f64(),
            test_loss,
            max_eigenvalue: f64::NAN,
            applied: true,
            metric,
        };
        writeln!(csv, "{}", row.csv())?;
        csv.flush()?;
        if !quiet {
            eprintln!(
                "batch {:>4}: MSE while learning {:.4e}{}",
                it + 1,
                row.loss,
                test_loss.map_or(String::new(), |t| format!(", held-out {t:.4e}"))
            );
        }
        rows.push(row);
    }
    let n = fc.n;
    let params = ParamSet::new(vec![Param {
        name: "W".into(),
        value: sofo::Tensor::<f64>::from_vec(&[n, task.bits], net.readout().to_vec())?
            .convert::<f32>(),
        mode: ParamMode::Free,
    }]);
    sofo::train::save_weights(&params, out)?;
    eprintln!(
        "done: {} batches in {:.1} s; wrote {}/config.toml, metrics.csv, weights.safetensors",
        cfg.iterations,
        start.elapsed().as_secs_f64(),
        out.display()
    );
    let y = force_outputs(&fc, net.readout(), &model, &test)?;
    flipflop_picture(&task, &test, y.data(), out)?;
    Ok(rows)
}

/// FORCE on the sine task: one metrics row per period of the target (the
/// mean squared error while learning), then the test error with learning
/// off; weights: readout `W` [N, 1], recurrent `J` [N, N], feedback `F` [1, N].
fn run_force(cfg: &RunConfig, out: &std::path::Path, quiet: bool) -> Result<Vec<MetricsRow>> {
    use sofo::optim::force::Force;
    use sofo::params::{Param, ParamMode};
    use sofo::tasks::sine::{sine_targets, sine_variance, PERIOD};
    let fc = cfg.force_config()?;
    let steps = (PERIOD / fc.dt).round() as usize;
    let mut net = Force::new(fc.clone(), 1)?;
    eprintln!(
        "sofo: task sine | optimizer force | N = {} | g = {} | {} training periods of {steps} steps | run dir {}",
        fc.n,
        fc.g,
        cfg.force.train_periods,
        out.display()
    );
    let mut csv = std::fs::File::create(out.join("metrics.csv"))?;
    use std::io::Write;
    writeln!(csv, "{}", sofo::train::METRICS_HEADER)?;
    let start = std::time::Instant::now();
    let mut rows = Vec::new();
    let periods = cfg.force.train_periods;
    for it in 0..periods {
        let targets = sine_targets(net.time(), steps, fc.dt);
        let trace = net.train(&targets, None)?;
        let test_loss = if it + 1 == periods {
            let t = sine_targets(net.time(), steps * cfg.force.test_periods, fc.dt);
            Some(net.test(&t, None)?.mean_mse())
        } else {
            None
        };
        let row = MetricsRow {
            iteration: it,
            loss: trace.mean_mse(),
            wall_s: start.elapsed().as_secs_f64(),
            test_loss,
            max_eigenvalue: f64::NAN,
            applied: true,
            metric: None,
        };
        writeln!(csv, "{}", row.csv())?;
        csv.flush()?;
        if !quiet {
            eprintln!("period {:>3}: training MSE {:.4e}", it + 1, row.loss);
        }
        rows.push(row);
    }
    let n = fc.n;
    let t = |name: &str, shape: &[usize], v: Vec<f64>, mode| -> Result<Param<f32>> {
        Ok(Param {
            name: name.into(),
            value: sofo::Tensor::<f64>::from_vec(shape, v)?.convert::<f32>(),
            mode,
        })
    };
    let params = ParamSet::new(vec![
        t("W", &[n, 1], net.readout().to_vec(), ParamMode::Free)?,
        t("J", &[n, n], net.recurrent_dense(), ParamMode::Pinned)?,
        t("F", &[1, n], net.feedback().to_vec(), ParamMode::Pinned)?,
    ]);
    sofo::train::save_weights(&params, out)?;
    let test = rows.last().and_then(|r| r.test_loss).unwrap_or(f64::NAN);
    eprintln!(
        "done: test MSE with learning off {test:.4e} ({:.2e} of the target's variance) in {:.1} s",
        test / sine_variance(),
        start.elapsed().as_secs_f64()
    );
    eprintln!(
        "wrote {}/config.toml, metrics.csv, weights.safetensors",
        out.display()
    );
    Ok(rows)
}

/// The model's parameters as a run saved them (`init` gives their names
/// and shapes).
fn saved<M: Model<f32>>(model: &M, seed: u64, weights: &std::path::Path) -> Result<ParamSet<f32>> {
    let mut params = model.init(seed)?;
    sofo::checkpoint::load_into(&mut params, weights)?;
    Ok(params)
}

fn run_eval(a: EvalArgs) -> Result<()> {
    let cfg_path = a.run.join("config.toml");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
        Error::config(
            "--run",
            a.run.display(),
            format!("a run directory with config.toml ({e})"),
        )
    })?;
    let cfg = RunConfig::from_toml(&text, &cfg_path.display().to_string())?;
    cfg.validate()?;
    let weights = a.run.join("weights.safetensors");
    let out = a.run.join("eval");
    std::fs::create_dir_all(&out)?;
    match cfg.task.as_str() {
        "sine" => {
            use sofo::optim::force::Force;
            use sofo::tasks::sine::{sine_targets, sine_variance, PERIOD};
            let fc = cfg.force_config()?;
            let mut net = Force::new(fc.clone(), 1)?;
            let w = sofo::checkpoint::load::<f64>(&weights)?;
            let readout = w.iter().find(|(n, _)| n == "W").ok_or_else(|| {
                Error::Checkpoint(format!("{}: no tensor `W`", weights.display()))
            })?;
            net.set_readout(readout.1.data())?;
            let steps = (PERIOD / fc.dt).round() as usize;
            // let the network settle onto its own output first, then score
            net.run(steps, None)?;
            let t = sine_targets(net.time(), steps * cfg.force.test_periods, fc.dt);
            let mse = net.test(&t, None)?.mean_mse();
            println!(
                "sine: test MSE with learning off {mse:.4e} ({:.2e} of the target's variance)",
                mse / sine_variance()
            );
        }
        "flipflop" => {
            let (mut task, rnn) = cfg.flipflop()?;
            let model = cfg.constrained(rnn)?;
            let params = saved(&model, cfg.seed, &weights)?;
            if let Some(s) = a.seed {
                task.test_seed = s;
            }
            flipflop_report(&model, &task, &params, 256, &out)?;
        }
        "addition" => {
            let (mut task, rnn) = cfg.addition()?;
            let model = cfg.constrained(rnn)?;
            let params = saved(&model, cfg.seed, &weights)?;
            if let Some(s) = a.seed {
                task.test_seed = s;
            }
            addition_report(&model, &task, &params, &out)?;
        }
        "reach1" | "reach2" => {
            let (mut task, model) = cfg.reach()?;
            let params = saved(&model, cfg.seed, &weights)?;
            if let Some(s) = a.seed {
                task.test_seed = s;
            }
            reach_report(&model, &task, &params, cfg.test_trials, &out)?;
        }
        "flipflop-reservoir" => {
            let (mut task, fc) = cfg.flipflop_reservoir()?;
            let model = sofo::optim::reservoir::reservoir_of(&fc)?;
            let params = saved(&model, cfg.seed, &weights)?;
            if let Some(s) = a.seed {
                task.test_seed = s;
            }
            flipflop_report(&model, &task, &params, cfg.test_trials, &out)?;
        }
        "kalman" | "kalman-long" => {
            let (mut task, model) = cfg.kalman()?;
            let params = saved(&model, cfg.seed, &weights)?;
            if let Some(s) = a.seed {
                task.test_seed = s;
            }
            kalman_report(&model, &task, &params, cfg.test_trials, &out)?;
        }
        _ => {
            let (task, model) = cfg.lorenz()?;
            let params = saved(&model, cfg.seed, &weights)?;
            let test = Task::<f32>::test_batch(&task, cfg.test_trials)?;
            let loss = sofo::train::evaluate(&model, &params, &test)?;
            println!(
                "lorenz: endpoint MSE on {} held-out bouts {loss:.4e}",
                test.trials
            );
        }
    }
    Ok(())
}

fn run_compare(a: CompareArgs) -> Result<()> {
    let base = resolve(&TrainArgs {
        run: a.run.clone(),
        optimizer: None,
        tangents: None,
        lr: None,
        damping: None,
        out: None,
    })?;
    sofo_tensor::parallel::set_threads(base.threads);
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("runs/compare-{}", base.task)));
    if a.optimizers.is_empty() {
        return Err(Error::config(
            "--optimizers",
            "\"\"",
            "a comma-separated list of sofo, adam, sgd, fgd",
        ));
    }
    // check every name before the first run starts
    let mut cfgs = Vec::new();
    for o in &a.optimizers {
        let mut c = base.clone();
        c.optimizer = o.clone();
        c.out = out.join(o).display().to_string();
        c.validate()?;
        cfgs.push(c);
    }
    let mut runs = Vec::new();
    for c in &cfgs {
        runs.push((c.optimizer.clone(), run_config(c, a.run.quiet)?));
    }
    std::fs::create_dir_all(&out)?;
    sofo::checkpoint::write_atomic(&out.join("config.toml"), base.to_toml().as_bytes())?;
    plot::loss_curves(
        &out.join("compare.png"),
        &format!(
            "{}: same initial weights, same batches (seed {})",
            base.task, base.seed
        ),
        &runs,
    )?;
    println!("| optimizer | final loss | best loss | final test loss | s/iter |");
    println!("|---|---|---|---|---|");
    for (name, rows) in &runs {
        let last = rows.last();
        let best = rows
            .iter()
            .map(|r| r.loss)
            .filter(|l| l.is_finite())
            .fold(f64::INFINITY, f64::min);
        let test = rows
            .iter()
            .rev()
            .find_map(|r| r.test_loss)
            .unwrap_or(f64::NAN);
        let per = last.map_or(f64::NAN, |r| r.wall_s / rows.len() as f64);
        println!(
            "| {name} | {:.4e} | {best:.4e} | {test:.4e} | {per:.4} |",
            last.map_or(f64::NAN, |r| r.loss)
        );
    }
    eprintln!(
        "wrote {}/compare.png and one run directory per optimiser",
        out.display()
    );
    Ok(())
}

/// One training run's settings and outputs.
struct Run<'a> {
    cfg: &'a RunConfig,
    quiet: bool,
    out: PathBuf,
    device: sofo::Device,
}

impl Run<'_> {
    /// Fresh parameters under the config's seed and trainability, trained
    /// with the optimiser the config names.
    fn train<M: Model<f32>, K: Task<f32>>(
        &self,
        model: &M,
        task: &K,
    ) -> Result<(Vec<MetricsRow>, ParamSet<f32>)> {
        let mut params = model.init(self.cfg.seed)?;
        self.cfg.apply_modes(&mut params)?;
        self.with_optimizer(model, task, params)
    }

    /// Trains with the optimiser the config names.
    fn with_optimizer<M: Model<f32>, K: Task<f32>>(
        &self,
        model: &M,
        task: &K,
        params: ParamSet<f32>,
    ) -> Result<(Vec<MetricsRow>, ParamSet<f32>)> {
        let cfg = self.cfg;
        let p = params.free_count();
        let k = match cfg.optimizer.as_str() {
            "sofo" => Some(("sofo.tangents", cfg.sofo.tangents)),
            "fgd" => Some(("fgd.tangents", cfg.fgd.tangents)),
            _ => None,
        };
        if let Some((field, k)) = k {
            if k > p {
                return Err(Error::config(field, k, format!("K ≤ P = {p}")));
            }
        }
        let d = self.device.clone();
        match cfg.optimizer.as_str() {
            "sofo" => self.go(model, task, params, Sofo::new(cfg.sofo_config()?)?.on(d)),
            "adam" => self.go(
                model,
                task,
                params,
                Adam::<f32>::new(cfg.adam_config()?)?.on(d),
            ),
            "sgd" => self.go(
                model,
                task,
                params,
                Sgd::<f32>::new(cfg.sgd_config()?)?.on(d),
            ),
            _ => self.go(model, task, params, Fgd::new(cfg.fgd_config()?)?.on(d)),
        }
    }

    fn go<M: Model<f32>, K: Task<f32>, O: Optimizer<f32>>(
        &self,
        model: &M,
        task: &K,
        mut params: ParamSet<f32>,
        mut opt: O,
    ) -> Result<(Vec<MetricsRow>, ParamSet<f32>)> {
        let cfg = self.cfg;
        let threads = sofo_tensor::parallel::threads();
        eprintln!(
            "sofo: task {} | optimizer {} | P = {} | M = {} | {} iterations | {threads} threads | {} | run dir {}",
            cfg.task,
            opt.name(),
            params.trainable_count(),
            cfg.batch,
            cfg.iterations,
            self.device.describe(),
            self.out.display()
        );
        let stop = Arc::new(AtomicBool::new(false));
        {
            let stop = stop.clone();
            // Ctrl-C: finish the iteration in flight, then write the weights.
            let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
        }
        let bar = if self.quiet {
            ProgressBar::hidden()
        } else {
            ProgressBar::new(cfg.iterations as u64)
        };
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        let mut last_test = f64::NAN;
        let mut last_metric = String::new();
        let opts = TrainOptions {
            iterations: cfg.iterations,
            batch: cfg.batch,
            seed: cfg.seed,
            eval_every: cfg.eval_every,
            test_trials: cfg.test_trials,
            out: Some(self.out.clone()),
            device: self.device.clone(),
        };
        let rows = train(
            model,
            task,
            &mut params,
            &mut opt,
            &opts,
            |row: &MetricsRow| {
                if let Some(t) = row.test_loss {
                    last_test = t;
                }
                if let Some(m) = row.metric {
                    last_metric = format!(
                        "  {} {:.1} %",
                        task.metric_name().unwrap_or("metric"),
                        100.0 * m
                    );
                }
                bar.set_message(format!(
                    "loss {:.4e}  test {:.4e}{last_metric}",
                    row.loss, last_test
                ));
                bar.inc(1);
            },
            || stop.load(Ordering::SeqCst),
        )?;
        bar.finish();
        let done = rows.len();
        let skipped = rows.iter().filter(|r| !r.applied).count();
        if let (Some(first), Some(last)) = (rows.first(), rows.last()) {
            let test = rows
                .iter()
                .rev()
                .find_map(|r| r.test_loss)
                .unwrap_or(f64::NAN);
            eprintln!(
                "done: {done} iterations in {:.1} s ({:.3} s/iter) | loss {:.4e} → {:.4e} | test loss {:.4e}{}",
                last.wall_s,
                last.wall_s / done as f64,
                first.loss,
                last.loss,
                test,
                if skipped > 0 { format!(" | {skipped} steps skipped (non-finite)") } else { String::new() }
            );
        }
        eprintln!(
            "wrote {}/config.toml, metrics.csv, weights.safetensors",
            self.out.display()
        );
        Ok((rows, params))
    }
}

fn devices() {
    println!(
        "cpu: {} threads (--threads N to use fewer)",
        sofo_tensor::parallel::threads()
    );
    gpu_devices();
}

#[cfg(not(feature = "cuda"))]
fn gpu_devices() {
    println!("cuda: not in this build (cargo build --release --features cuda)");
}

#[cfg(feature = "cuda")]
fn gpu_devices() {
    use sofo_tensor::cuda::{probe, CudaDevice};
    let p = probe();
    let found = |ok: bool| if ok { "found" } else { "not found" };
    println!(
        "cuda: libcuda {}, libcublas {}, libnvrtc {} (CUDA 13; directories on LD_LIBRARY_PATH)",
        found(p.driver),
        found(p.cublas),
        found(p.nvrtc)
    );
    match p.devices {
        Err(e) => println!("cuda: no GPU usable: {e}"),
        Ok(0) => println!("cuda: the driver sees no GPU"),
        Ok(n) => {
            for i in 0..n {
                match CudaDevice::open(i) {
                    Ok(d) => println!("cuda:{i} {}: ready (kernels compiled)", d.name()),
                    Err(e) => println!("cuda:{i}: cannot be used: {e}"),
                }
            }
        }
    }
}

fn tasks() {
    let d = RunConfig::default();
    println!("lorenz  Lorenz attractor from sparse (endpoint-only) supervision, tasks.md §1");
    println!(
        "        optimizers sofo (default), adam, sgd, fgd; defaults: hidden {} (P = 2809), bouts {}+{} of {} steps, dt {}, batch {}, K {}, lr {}, damping {:e}, {} iterations",
        d.lorenz.hidden,
        d.lorenz.train_bouts,
        d.lorenz.test_bouts,
        d.lorenz.bout_len,
        d.lorenz.dt,
        d.batch,
        d.sofo.tangents,
        d.sofo.lr,
        d.sofo.damping,
        d.iterations
    );
    let f = RunConfig::defaults_for("flipflop");
    println!("flipflop  b-bit flip-flop with a fully trained rate RNN, tasks.md §4 (metric: share of correct bits; picture flipflop.png)");
    println!(
        "        optimizers sofo (default), adam, sgd, fgd; defaults: bits {} (`--set flipflop.bits=10`: the hard version), T {}, N {}, {}, α {}, batch {}, K {}, lr {}, damping {:e}",
        f.flipflop.bits, f.flipflop.steps, f.flipflop.n, f.flipflop.activation, f.flipflop.alpha, f.batch, f.sofo.tangents, f.sofo.lr, f.sofo.damping
    );
    let a = RunConfig::defaults_for("addition");
    println!("addition  delayed addition, loss at the last step only, tasks.md §5 (metric: MSE, share within 0.04; picture addition.png)");
    println!(
        "        optimizers sofo (default), adam, sgd, fgd; defaults: T {}, N {}, {}, α {}, batch {}, K {}, lr {}, damping {:e} (a GPU job: --device cuda)",
        a.addition.steps, a.addition.n, a.addition.activation, a.addition.alpha, a.batch, a.sofo.tangents, a.sofo.lr, a.sofo.damping
    );
    for (name, what) in [
        (
            "reach2",
            "double reach with a two-joint arm in the loop, tasks.md §2",
        ),
        (
            "reach1",
            "single reach (hold, go, reach, hold) with the same arm and network",
        ),
    ] {
        let r = RunConfig::defaults_for(name);
        println!("{name}  {what} (metric: hand error per hold window, share within 2 cm; picture reach.png)");
        println!(
            "        optimizers sofo (default), adam, sgd, fgd; defaults: T {} (2 ms steps), N {}, relu, α {}, gain {}, rate noise {}, batch {}, K {}, lr {}, damping {:e}, {} iterations (a GPU job: --device cuda)",
            r.reach.steps, r.reach.n, r.reach.alpha, r.reach.gain, r.reach.noise, r.batch, r.sofo.tangents, r.sofo.lr, r.sofo.damping, r.iterations
        );
    }
    for (name, what) in [
        (
            "kalman",
            "adaptive Kalman filtering, parameters redrawn at random switch times, tasks.md §3",
        ),
        (
            "kalman-long",
            "the same over the long horizon, where BPTT memory becomes the limit",
        ),
    ] {
        let k = RunConfig::defaults_for(name);
        println!("{name}  {what} (metric: per-step MSE beside the oracle and prior-mean Kalman filters; picture kalman.png)");
        println!(
            "        optimizers sofo (default), adam, sgd, fgd; defaults: T {}, N {}, leaky relu α {}, gain {}, batch {}, K {}, lr {}, damping {:e}, {} iterations",
            k.kalman.steps, k.kalman.n, k.kalman.alpha, k.kalman.gain, k.batch, k.sofo.tangents, k.sofo.lr, k.sofo.damping, k.iterations
        );
    }
    let r = RunConfig::defaults_for("flipflop-reservoir");
    println!("flipflop-reservoir  the flip-flop on a fixed reservoir, only the readout trained, tasks.md §4: SOFO (or adam, sgd, fgd) against FORCE on the same network (metric: share of correct bits; picture flipflop.png)");
    println!(
        "        optimizers sofo (default), force, adam, sgd, fgd; defaults: bits {}, T {}, N {}, g {} (set [force] g = 1.5 for FORCE's home ground), τ = 10 steps, batch {}, K {}, lr {}, damping {:e}, {} iterations; `sofo compare --task flipflop-reservoir --optimizers sofo,force`",
        r.flipflop.bits, r.flipflop.steps, r.force.n, r.force.g, r.batch, r.sofo.tangents, r.sofo.lr, r.sofo.damping, r.iterations
    );
    println!("sine    FORCE sine-wave generation by a reservoir, tasks.md §6");
    println!(
        "        optimizer force; defaults: N {}, p {}, g {}, RLS every {} steps, α {}, {} training periods, {} test periods",
        d.force.n, d.force.p, d.force.g, d.force.rls_every, d.force.alpha, d.force.train_periods, d.force.test_periods
    );
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => run_train(a),
        Command::Compare(a) => run_compare(a),
        Command::Eval(a) => run_eval(a),
        Command::Bench(a) => bench::run(a),
        Command::Tasks => {
            tasks();
            Ok(())
        }
        Command::Devices => {
            devices();
            Ok(())
        }
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
