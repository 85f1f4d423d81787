//! `sofo`: train recurrent networks with SOFO, and benchmark it.

mod bench;
mod config;

use clap::{Args, Parser, Subcommand};
use config::RunConfig;
use indicatif::{ProgressBar, ProgressStyle};
use sofo::models::{LorenzModel, Model};
use sofo::optim::Sofo;
use sofo::optim::{Adam, Fgd, Optimizer, Sgd};
use sofo::params::ParamSet;
use sofo::tasks::{LorenzData, LorenzTask, Task};
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
    /// Seconds per SOFO iteration and GFLOP/s on fixed configurations.
    Bench(bench::BenchArgs),
    /// List the tasks with their defaults.
    Tasks,
}

#[derive(Args)]
struct TrainArgs {
    /// Task to train on (see `sofo tasks`).
    #[arg(long)]
    task: Option<String>,
    /// Optimiser.
    #[arg(long)]
    optimizer: Option<String>,
    /// Number of iterations.
    #[arg(long, value_name = "N")]
    iterations: Option<usize>,
    /// Trials per batch (M).
    #[arg(long, value_name = "M")]
    batch: Option<usize>,
    /// Number of tangents K (SOFO, FGD).
    #[arg(long, value_name = "K")]
    tangents: Option<usize>,
    /// Learning rate η of the chosen optimiser.
    #[arg(long, value_name = "η", allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Relative damping λ.
    #[arg(long, value_name = "λ", allow_negative_numbers = true)]
    damping: Option<f64>,
    /// Seed of initialisation, tangents and batches.
    #[arg(long, value_name = "S")]
    seed: Option<u64>,
    /// Worker threads (0 = all cores).
    #[arg(long, value_name = "T")]
    threads: Option<usize>,
    /// Where the passes run: cpu, cuda or cuda:N.
    #[arg(long, value_name = "DEV")]
    device: Option<String>,
    /// Settings file (TOML); flags override it.
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Run directory (config.toml, metrics.csv, weights.safetensors).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

fn resolve(a: &TrainArgs) -> Result<RunConfig> {
    let mut c = match &a.config {
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
        None => RunConfig::default(),
    };
    if let Some(v) = &a.task {
        c.task = v.clone();
        if a.out.is_none() && a.config.is_none() {
            c.out = format!("runs/{v}");
        }
    }
    if let Some(v) = &a.optimizer {
        c.optimizer = v.clone();
    }
    if let Some(v) = a.iterations {
        c.iterations = v;
    }
    if let Some(v) = a.batch {
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
    if let Some(v) = a.seed {
        c.seed = v;
    }
    if let Some(v) = a.threads {
        c.threads = v;
    }
    if let Some(v) = &a.device {
        c.device = v.clone();
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
    let out = PathBuf::from(&cfg.out);
    std::fs::create_dir_all(&out)?;
    sofo::checkpoint::write_atomic(&out.join("config.toml"), cfg.to_toml().as_bytes())?;

    let l = &cfg.lorenz;
    let task = LorenzTask {
        data: LorenzData::generate(l.data_seed, l.train_bouts, l.test_bouts, l.bout_len, l.dt)?,
    };
    let model = LorenzModel { hidden: l.hidden };
    let params = <LorenzModel as Model<f32>>::init(&model, cfg.seed)?;
    let device = sofo::Device::open(&cfg.device)?;
    let p = params.trainable_count();
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
    let run = Run {
        cfg: &cfg,
        quiet: a.quiet,
        out,
        device: device.clone(),
    };
    match cfg.optimizer.as_str() {
        "sofo" => run.go(
            &model,
            &task,
            params,
            Sofo::new(cfg.sofo_config()?)?.on(device),
        ),
        "adam" => run.go(&model, &task, params, Adam::<f32>::new(cfg.adam_config()?)?),
        "sgd" => run.go(&model, &task, params, Sgd::<f32>::new(cfg.sgd_config()?)?),
        _ => run.go(
            &model,
            &task,
            params,
            Fgd::new(cfg.fgd_config()?)?.on(device),
        ),
    }
}

/// One training run's settings and outputs.
struct Run<'a> {
    cfg: &'a RunConfig,
    quiet: bool,
    out: PathBuf,
    device: sofo::Device,
}

impl Run<'_> {
    fn go<M: Model<f32>, K: Task<f32>, O: Optimizer<f32>>(
        &self,
        model: &M,
        task: &K,
        mut params: ParamSet<f32>,
        mut opt: O,
    ) -> Result<()> {
        let cfg = self.cfg;
        let threads = sofo_tensor::parallel::threads();
        eprintln!(
            "sofo: task {} | optimizer {} | P = {} | M = {} | {} iterations | {threads} threads | {} | run dir {}",
            task.name(),
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
                bar.set_message(format!("loss {:.4e}  test {:.4e}", row.loss, last_test));
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
        Ok(())
    }
}

fn tasks() {
    let d = RunConfig::default();
    println!("lorenz  Lorenz attractor from sparse (endpoint-only) supervision, tasks.md §1");
    println!(
        "        defaults: hidden {} (P = 2809), bouts {}+{} of {} steps, dt {}, batch {}, K {}, lr {}, damping {:e}, {} iterations",
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Command::Train(a) => run_train(a),
        Command::Bench(a) => bench::run(a),
        Command::Tasks => {
            tasks();
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
