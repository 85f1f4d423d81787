//! `sofo bench`: seconds per SOFO iteration on fixed configurations, the
//! same ones the JAX anchor times (../shared/anchors).

use clap::Args;
use sofo::models::{Activation, Batch, LeakyRnn, LorenzModel, Model, RateRnn, ReachRnn};
use sofo::optim::{Adam, AdamConfig, Damping, Optimizer, Sofo, SofoConfig, TangentKind};
use sofo::params::ParamSet;
use sofo::tasks::{KalmanTask, LorenzData, LorenzTask, ReachTask, Task};
use sofo::{Device, Result};
use sofo_tensor::{rng, Tensor};
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// One JSON object per line per configuration.
    #[arg(long)]
    json: bool,
    /// Timed iterations per configuration (after 2 warm-up iterations; SOFO
    /// then runs 3 more that time its phases: draw, pass, step).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Run only the configurations whose name contains this.
    #[arg(long)]
    only: Option<String>,
    /// Where the passes run: cpu, cuda or cuda:N. On a GPU the long
    /// configurations (rnn-reach, rnn-kalman, reach2, kalman-long) run too.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The GPU's f32 GEMMs: f32 or tf32 (tensor cores, JAX's default).
    #[arg(long, default_value = "f32", value_name = "f32|tf32")]
    gpu_matmul: String,
    /// Time the chosen configurations at these trial lengths instead of
    /// their own (e.g. 32,256,1024,4096): memory and time against T.
    #[arg(long, value_delimiter = ',', value_name = "T,T,..")]
    steps: Vec<usize>,
    /// sofo, adam (BPTT), all, or pass: one forward-K pass and its sketch
    /// alone (no tangent draw, no step; on a GPU its inputs uploaded before
    /// the clock starts), the part whose cost grows with T.
    #[arg(long, default_value = "all")]
    method: String,
    /// Peak extra memory of one iteration against T, SOFO and Adam-BPTT.
    #[arg(long)]
    memory: bool,
}

impl BenchArgs {
    /// Timed iterations per configuration (at least one).
    fn timed_iters(&self) -> usize {
        self.iters.max(1)
    }
}

struct Record {
    method: &'static str,
    /// Peak bytes of device memory held during the timed iterations (GPU).
    peak_device_bytes: Option<usize>,
    name: &'static str,
    n: usize,
    m: usize,
    k: usize,
    t: usize,
    median: f64,
    min: f64,
    flops: f64,
    /// SOFO: seconds per iteration drawing the directions, in the pass, in
    /// the step (`sofo::optim::SofoPhases`), from iterations run after the
    /// timed ones.
    phases: Option<[f64; 3]>,
}

fn random_batch(t: usize, m: usize, i: usize, o: usize, seed: u64) -> Result<Batch<f32>> {
    let mut u = Tensor::<f32>::scratch(&[t, m, i]);
    rng::fill_normal(u.data_mut(), seed, 1);
    let mut y = Tensor::<f32>::scratch(&[t, m, o]);
    rng::fill_normal(y.data_mut(), seed, 2);
    Ok(Batch {
        steps: t,
        trials: m,
        inputs: Some(u),
        initial: None,
        targets: y,
        weights: None,
        loss_norm: (t * m * o) as f64,
        noise_seed: 0,
    })
}

/// The anchor's SOFO settings: orthonormal tangents, damping 1e-3 relative
/// to the largest eigenvalue, lr 0.1.
fn anchor_sofo(k: usize, device: &Device) -> Result<Sofo> {
    Ok(Sofo::new(SofoConfig {
        k,
        tangents: TangentKind::Orthonormal,
        damping: Damping::RelativeLargest(1e-3),
        sqrt: false,
        lr: 0.1,
    })?
    .on(device.clone()))
}

/// Median and minimum seconds of `run(setup(), i)` over `iters` runs after
/// 2 warm-up runs (`setup` is not timed) and, on a GPU, the peak device
/// bytes held during the timed runs.
fn time_runs<S>(
    device: &Device,
    iters: usize,
    mut setup: impl FnMut() -> Result<S>,
    mut run: impl FnMut(S, u64) -> Result<()>,
) -> Result<(f64, f64, Option<usize>)> {
    for it in 0..2 {
        run(setup()?, it)?;
    }
    let mut times = Vec::with_capacity(iters);
    #[cfg(feature = "cuda")]
    let base = {
        sofo_tensor::cuda::reset_device_peak();
        sofo_tensor::cuda::device_memory().0
    };
    for it in 0..iters {
        let s = setup()?;
        let t0 = Instant::now();
        run(s, 2 + it as u64)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    #[cfg(feature = "cuda")]
    let peak =
        matches!(device, Device::Cuda(_)).then(|| sofo_tensor::cuda::device_memory().1 - base);
    #[cfg(not(feature = "cuda"))]
    let peak = {
        let _ = device;
        None
    };
    Ok((times[times.len() / 2], times[0], peak))
}

/// [`time_runs`] of an optimiser's iterations.
fn time_steps<M: Model<f32>, O: Optimizer<f32>>(
    device: &Device,
    opt: &mut O,
    model: &M,
    params: &mut ParamSet<f32>,
    batch: &Batch<f32>,
    iters: usize,
) -> Result<(f64, f64, Option<usize>)> {
    time_runs(
        device,
        iters,
        || Ok(()),
        |(), it| opt.step(model, params, batch, 0, it).map(|_| ()),
    )
}

/// Times SOFO with the anchor's settings on `batch` from fresh parameters.
fn time_sofo<M: Model<f32>>(
    device: &Device,
    model: &M,
    batch: &Batch<f32>,
    k: usize,
    iters: usize,
    name: &'static str,
    n: usize,
) -> Result<Record> {
    let mut params = model.init(0)?;
    let mut opt = anchor_sofo(k, device)?;
    let (median, min, peak_device_bytes) =
        time_steps(device, &mut opt, model, &mut params, batch, iters)?;
    let phases = Some(sofo_phases(
        &mut opt,
        model,
        &mut params,
        batch,
        iters as u64 + 2,
    )?);
    Ok(Record {
        method: "sofo",
        peak_device_bytes,
        name,
        n,
        m: batch.trials,
        k,
        t: batch.steps,
        median,
        min,
        flops: model.sofo_flops(k, batch),
        phases,
    })
}

/// Iterations whose phases are timed, after the timed ones.
const PHASE_ITERS: u64 = 3;

/// Where SOFO's iterations spend their time: seconds per iteration drawing
/// the directions, in the pass, in the step, over [`PHASE_ITERS`] more
/// iterations (numbered from `first`; on a GPU each phase ends with the
/// device synchronised).
fn sofo_phases<M: Model<f32>>(
    opt: &mut Sofo,
    model: &M,
    params: &mut ParamSet<f32>,
    batch: &Batch<f32>,
    first: u64,
) -> Result<[f64; 3]> {
    opt.time_phases(true);
    let run = (first..first + PHASE_ITERS)
        .try_for_each(|it| opt.step(model, params, batch, 0, it).map(|_| ()));
    opt.time_phases(false);
    run?;
    let p = opt.phases();
    let per = |s: f64| s / p.iterations.max(1) as f64;
    Ok([per(p.draw_s), per(p.pass_s), per(p.step_s)])
}

/// SOFO iterations, or with `--method pass` its forward-K pass alone.
fn time_forward<M: Model<f32>>(
    a: &BenchArgs,
    device: &Device,
    model: &M,
    batch: &Batch<f32>,
    k: usize,
    name: &'static str,
    n: usize,
) -> Result<Record> {
    let iters = a.timed_iters();
    if a.method == "pass" {
        time_pass(device, model, batch, k, iters, name, n)
    } else {
        time_sofo(device, model, batch, k, iters, name, n)
    }
}

/// Times Adam through BPTT on `model` and `batch`: median and minimum of
/// `iters` iterations after 2 warm-up ones.
fn time_adam<M: Model<f32>>(
    device: &Device,
    model: &M,
    batch: &Batch<f32>,
    iters: usize,
    name: &'static str,
    n: usize,
) -> Result<Record> {
    let mut params = model.init(0)?;
    let mut adam = Adam::<f32>::new(AdamConfig::default())?.on(device.clone());
    let (median, min, peak_device_bytes) =
        time_steps(device, &mut adam, model, &mut params, batch, iters)?;
    Ok(Record {
        method: "adam",
        peak_device_bytes,
        name,
        n,
        m: batch.trials,
        k: 0,
        t: batch.steps,
        median,
        min,
        flops: 0.0,
        phases: None,
    })
}

/// Times one forward-K pass with its sketch (`Device::pass_with`) on
/// random tangents: median and minimum of `iters` after 2 warm-up passes.
/// The tangents are made and put where the device reads them before the
/// clock starts (a SOFO iteration draws them on the device: uploading the
/// K tangents of N = 400's W, 82 MB, inside the clock made the pass
/// slower than a whole SOFO iteration on an H200).
fn time_pass<M: Model<f32>>(
    device: &Device,
    model: &M,
    batch: &Batch<f32>,
    k: usize,
    iters: usize,
    name: &'static str,
    n: usize,
) -> Result<Record> {
    let params = model.init(0)?;
    let inputs = || -> Result<sofo::PassInputs<f32>> {
        let duals = params
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let shape = sofo_ad::layout::tangent_shape(p.value.shape(), k);
                let mut t = Tensor::<f32>::scratch(&shape);
                rng::fill_normal(t.data_mut(), 7, i as u64);
                sofo::Dual {
                    primal: p.value.clone(),
                    tangent: Some(t.scale(0.01)),
                }
            })
            .collect();
        device.pass_inputs(duals)
    };
    let (median, min, peak_device_bytes) = time_runs(device, iters, inputs, |d, _| {
        device.pass_with(model, k, d, batch).map(|_| ())
    })?;
    Ok(Record {
        method: "pass",
        peak_device_bytes,
        name,
        n,
        m: batch.trials,
        k,
        t: batch.steps,
        median,
        min,
        flops: model.sofo_flops(k, batch),
        phases: None,
    })
}

/// Peak bytes the tensor layer holds during one iteration, beyond what it
/// held before (host memory: the CPU backend).
fn peak_extra_bytes<M: Model<f32>, O: Optimizer<f32>>(
    opt: &mut O,
    model: &M,
    params: &mut ParamSet<f32>,
    batch: &Batch<f32>,
) -> Result<usize> {
    opt.step(model, params, batch, 0, 0)?;
    sofo_tensor::memory::clear_pools();
    let before = sofo_tensor::memory::stats();
    sofo_tensor::memory::reset_peak();
    opt.step(model, params, batch, 0, 1)?;
    Ok(sofo_tensor::memory::stats().peak_bytes - before.live_bytes - before.pooled_bytes)
}

fn rnn(n: usize) -> RateRnn {
    RateRnn {
        n,
        inputs: 3,
        outputs: 3,
        alpha: 0.1,
        activation: Activation::Tanh,
        learn_x0: false,
        gain: 0.9,
    }
}

/// `sofo bench --memory`: SOFO and Adam-BPTT on the rate RNN N=128 M=64
/// K=64 against T, one JSON object per line with `peak_extra_bytes`.
fn memory(a: &BenchArgs, device: &Device) -> Result<()> {
    let ts = if a.steps.is_empty() {
        vec![32, 256, 1024, 4096, 16384]
    } else {
        a.steps.clone()
    };
    let model = rnn(128);
    for method in ["sofo", "adam"] {
        for &t in &ts {
            let mut params = model.init(0)?;
            let batch = random_batch(t, 64, 3, 3, 0)?;
            let bytes = if method == "sofo" {
                peak_extra_bytes(&mut anchor_sofo(64, device)?, &model, &mut params, &batch)?
            } else {
                peak_extra_bytes(
                    &mut Adam::<f32>::new(AdamConfig::default())?,
                    &model,
                    &mut params,
                    &batch,
                )?
            };
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"method": method, "n": 128, "m": 64, "k": 64, "t": t, "peak_extra_bytes": bytes})
                );
            } else {
                println!(
                    "{method:<5} T={t:<6} peak extra {:.2} MiB",
                    bytes as f64 / 1048576.0
                );
            }
        }
    }
    Ok(())
}

pub fn run(a: BenchArgs) -> Result<()> {
    sofo_tensor::parallel::set_threads(a.threads);
    let threads = sofo_tensor::parallel::threads();
    let device = Device::open_with(&a.device, &a.gpu_matmul)?;
    let on_gpu = !matches!(device, Device::Cpu);
    if !["sofo", "adam", "all", "pass"].contains(&a.method.as_str()) {
        return Err(sofo::Error::config(
            "--method",
            &a.method,
            "sofo, adam, all or pass",
        ));
    }
    if a.memory {
        return memory(&a, &device);
    }
    let want = |name: &str| a.only.as_ref().is_none_or(|o| name.contains(o.as_str()));
    let iters = a.timed_iters();
    // the anchors' rate-RNN configurations, then the sizes of the double
    // reach (T = 1000) and of the long-horizon Kalman filter (T = 5000),
    // which are GPU work (timed on the CPU only when named with --only)
    let configs = [
        ("rnn-n128", 128, 64, 64, 50, false),
        ("rnn-n400", 400, 128, 128, 32, false),
        ("rnn-reach", 64, 256, 128, 1000, true),
        ("rnn-kalman", 100, 256, 128, 5000, true),
    ];
    let runs = configs.iter().flat_map(|&(name, n, m, k, t, long)| {
        let ts = if a.steps.is_empty() {
            vec![t]
        } else {
            a.steps.clone()
        };
        ts.into_iter().map(move |t| (name, n, m, k, t, long))
    });
    for (name, n, m, k, t, long) in runs {
        // the long configurations run on the CPU only when named with --only
        if !want(name) || (long && !on_gpu && a.only.is_none()) {
            continue;
        }
        let model = rnn(n);
        let batch = random_batch(t, m, 3, 3, 0)?;
        // Adam through BPTT on the same model and batch
        if a.method == "adam" || a.method == "all" {
            let r = time_adam(&device, &model, &batch, iters, name, n)?;
            emit(&a, &r, threads, &device);
        }
        if a.method == "adam" {
            continue;
        }
        let r = time_forward(&a, &device, &model, &batch, k, name, n)?;
        emit(&a, &r, threads, &device);
    }
    if want("lorenz") && a.method != "adam" {
        let task = LorenzTask {
            data: LorenzData::generate(1, 3500, 500, 32, 0.01)?,
        };
        let model = LorenzModel { hidden: 400 };
        let batch = Task::<f32>::train_batch(&task, 0, 0, 128)?;
        let r = time_forward(&a, &device, &model, &batch, 128, "lorenz", 400)?;
        emit(&a, &r, threads, &device);
    }
    // the paper's long tasks with their own models and batches: the arm in
    // the loop (reach2) and the leaky network over T = 5000 (kalman-long);
    // GPU work, timed on the CPU only when named with --only
    let long_ok = on_gpu || a.only.is_some();
    if want("reach2") && long_ok {
        let task = ReachTask::double();
        let model = ReachRnn::paper(task.inputs());
        let batch = Task::<f32>::train_batch(&task, 0, 0, 256)?;
        // BPTT through the arm as well: its step and hand are one node each
        if a.method == "adam" || a.method == "all" {
            let r = time_adam(&device, &model, &batch, iters, "reach2", model.n)?;
            emit(&a, &r, threads, &device);
        }
        if a.method != "adam" {
            let r = time_forward(&a, &device, &model, &batch, 128, "reach2", model.n)?;
            emit(&a, &r, threads, &device);
        }
    }
    if want("kalman-long") && a.method != "adam" && long_ok {
        let task = KalmanTask::long();
        let model = LeakyRnn::kalman(100);
        let batch = Task::<f32>::train_batch(&task, 0, 0, 256)?;
        let r = time_forward(&a, &device, &model, &batch, 128, "kalman-long", model.n)?;
        emit(&a, &r, threads, &device);
    }
    Ok(())
}

/// Freed buffers the GPU keeps for reuse (not in `peak_device_bytes`).
fn pooled_bytes(device: &Device) -> Option<usize> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Some(d.pooled_bytes()),
        _ => None,
    }
}

/// How the device's SOFO passes ran so far (GPU): whether graphs are on,
/// and the passes run call by call, captured, replayed, fallen back.
fn graph_passes(device: &Device) -> Option<serde_json::Value> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let s = sofo::cuda::sofo_graph_stats(d);
            Some(serde_json::json!({
                "on": d.graphs(), "direct": s.direct, "captured": s.captured,
                "replayed": s.replayed, "fallbacks": s.fallbacks,
            }))
        }
        _ => None,
    }
}

fn emit(a: &BenchArgs, r: &Record, threads: usize, device: &Device) {
    let gflops = (r.flops > 0.0).then(|| r.flops / r.median / 1e9);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "method": r.method,
                "name": r.name, "n": r.n, "m": r.m, "k": r.k, "t": r.t,
                "seconds_per_iter": r.median, "min_seconds_per_iter": r.min,
                "gflops": gflops, "threads": threads, "iters": a.iters,
                "device": device.describe(),
                "peak_device_bytes": r.peak_device_bytes,
                "pooled_device_bytes": pooled_bytes(device),
                "graph_passes": graph_passes(device),
                "phases": r.phases.map(|[draw, pass, step]| serde_json::json!({
                    "draw_s": draw, "pass_s": pass, "step_s": step,
                    "iters": PHASE_ITERS,
                })),
            })
        );
    } else {
        println!(
            "{:<5} {:<10} N={:<4} M={:<4} K={:<4} T={:<4}  {:.4} s/iter (min {:.4})  {}{}  [{}, {} threads]",
            r.method,
            r.name,
            r.n,
            r.m,
            r.k,
            r.t,
            r.median,
            r.min,
            gflops.map_or(String::new(), |g| format!("{g:.1} GFLOP/s")),
            r.phases.map_or(String::new(), |[draw, pass, step]| format!(
                "  (draw {:.2} ms, pass {:.2} ms, step {:.2} ms)",
                draw * 1e3,
                pass * 1e3,
                step * 1e3
            )),
            device.describe(),
            threads
        );
    }
}
