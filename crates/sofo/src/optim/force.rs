//! FORCE learning (Sussillo & Abbott 2009): a fixed random reservoir whose
//! linear readout, fed back into the network, is trained online by recursive
//! least squares (method.md, "FORCE"; tasks.md §4 and §6).
//!
//! **Network.** N units with state x (one row per trial, `[M, N]`), rates
//! r = tanh x, outputs z = Wᵀ r (`[M, O]`), optional inputs u (`[M, I]`):
//!
//! ```text
//! x ← (1 − dt) x + dt (J r + Fᵀ z + Bᵀ u)
//! ```
//!
//! with dt in units of the time constant τ. In the row-vector form of
//! tasks.md §4 this is τ dx/dt = −x + J tanh(x) + tanh(x) W F + u B (there
//! the state is called z; here z is the readout, as in §6). J is sparse:
//! each entry is kept with probability p and drawn from N(0, g²/(pN)) (p = 1
//! gives the dense J ~ N(0, g²/N) of §4). The feedback F (`[O, N]`) and the
//! input weights B (`[I, N]`) are U(−1, 1). J, F and B are fixed; only the
//! readout W (`[N, O]`, initially 0) learns. The initial state is
//! `x0_scale`·N(0, 1), independently per trial.
//!
//! **One step** (as in the authors' code): x is advanced with the current r
//! and z, then r = tanh x and z = Wᵀ r are recomputed; z is the step's
//! output. When learning, every `rls_every`-th step (counted from the last
//! [`Force::reset`]) then applies RLS against that step's target f:
//!
//! ```text
//! k = P r;  c = 1 / (1 + rᵀ k);  P ← P − c k kᵀ;  W ← W − c k (Wᵀ r − f)ᵀ;  P₀ = I / α
//! ```
//!
//! One P is shared by all outputs. The z fed back at the next step is the
//! one computed before the update (the update changes W, not z).
//!
//! **Batches.** The M trials run the same network from their own initial
//! states. At an update step the M rate vectors are fed to RLS one after the
//! other, trial 0 first, into the one shared P and W; each trial's error
//! Wᵀ r − f uses W as updated by the trials before it (the a-priori error
//! of sequential RLS). The batch update is thus exactly sequential RLS over
//! the samples in (step, trial) order, and after any sequence of updates
//! from W₀, P₀ = I/α:
//!
//! ```text
//! P = (α I + Σ r rᵀ)⁻¹,   W = P (α W₀ + Σ r fᵀ)
//! ```
//!
//! (the sums over every rate vector fed so far): ridge regression of the
//! targets on all rates seen, whatever the order within a step.
//!
//! **Cost.** J r is a sparse product (CSR) when p < 1/2 and one GEMM over
//! the trials otherwise. Each RLS sample makes one pass over P: the rank-one
//! correction of the previous sample is applied in the same pass that forms
//! k = P r (it is held back until then). All parallel loops split rows of
//! fixed size and reduce in a fixed order: results are identical for any
//! thread count.

use crate::{Error, Result};
use rayon::prelude::*;
use sofo_tensor::backend::{Cpu, Gemm, Kernels, Mat};
use sofo_tensor::{parallel, rng, Tensor, TensorError};

/// RNG streams of the network's random draws (under `ForceConfig::seed`).
const STREAM_MASK: u64 = 0xF0_0001;
const STREAM_J: u64 = 0xF0_0002;
const STREAM_FEEDBACK: u64 = 0xF0_0003;
const STREAM_INPUT: u64 = 0xF0_0004;
const STREAM_X0: u64 = 0xF0_0005;

/// Rows of P per parallel task in the RLS pass.
const P_ROWS: usize = 16;
/// Rows of J per parallel task in the sparse product.
const J_ROWS: usize = 64;

/// Settings of a FORCE reservoir.
#[derive(Debug, Clone, PartialEq)]
pub struct ForceConfig {
    /// Units N.
    pub n: usize,
    /// Readout dimensions O.
    pub outputs: usize,
    /// Input dimensions I (0: no inputs).
    pub inputs: usize,
    /// Connection probability p of J, in (0, 1].
    pub p: f64,
    /// Gain g: kept entries of J are N(0, g²/(pN)).
    pub g: f64,
    /// Euler step in units of τ, in (0, 1].
    pub dt: f64,
    /// P₀ = I/α, α > 0 (a ridge penalty α‖W − W₀‖²).
    pub alpha: f64,
    /// RLS every this many steps (≥ 1).
    pub rls_every: usize,
    /// Initial state x0 ~ x0_scale · N(0, 1) (≥ 0).
    pub x0_scale: f64,
    /// Seed of J, F, B and the initial states.
    pub seed: u64,
}

impl ForceConfig {
    /// The sine-wave generator of tasks.md §6: N = 1000, p = 0.1, g = 1.5,
    /// dt = 0.1 τ, α = 1, RLS every 2 steps, one output, no inputs, and
    /// x0 ~ 0.5·N(0, 1) as in the authors' code.
    pub fn sine() -> Self {
        ForceConfig {
            n: 1000,
            outputs: 1,
            inputs: 0,
            p: 0.1,
            g: 1.5,
            dt: 0.1,
            alpha: 1.0,
            rls_every: 2,
            x0_scale: 0.5,
            seed: 0,
        }
    }

    /// The flip-flop reservoir of tasks.md §4 with `bits` channels: N = 1000,
    /// dense J ~ N(0, g²/N) (p = 1), τ = 10 steps with Euler dt = 1 (dt = 0.1
    /// τ), x0 ~ 0.1·N(0, 1), `bits` inputs and outputs. §4 does not fix α
    /// or the update interval: α = 1, RLS every step.
    pub fn flip_flop(g: f64, bits: usize) -> Self {
        ForceConfig {
            n: 1000,
            outputs: bits,
            inputs: bits,
            p: 1.0,
            g,
            dt: 0.1,
            alpha: 1.0,
            rls_every: 1,
            x0_scale: 0.1,
            seed: 0,
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<()> {
        if self.n == 0 {
            return Err(Error::config("force.n", self.n, "N ≥ 1"));
        }
        if self.outputs == 0 {
            return Err(Error::config("force.outputs", self.outputs, "O ≥ 1"));
        }
        if !(self.p > 0.0 && self.p <= 1.0) {
            return Err(Error::config("force.p", self.p, "0 < p ≤ 1"));
        }
        if !(self.g >= 0.0 && self.g.is_finite()) {
            return Err(Error::config("force.g", self.g, "finite g ≥ 0"));
        }
        if !(self.dt > 0.0 && self.dt <= 1.0) {
            return Err(Error::config(
                "force.dt",
                self.dt,
                "0 < dt ≤ 1 (units of τ)",
            ));
        }
        if !(self.alpha > 0.0 && self.alpha.is_finite()) {
            return Err(Error::config("force.alpha", self.alpha, "finite α > 0"));
        }
        if self.rls_every == 0 {
            return Err(Error::config(
                "force.rls_every",
                self.rls_every,
                "at least 1",
            ));
        }
        if !(self.x0_scale >= 0.0 && self.x0_scale.is_finite()) {
            return Err(Error::config(
                "force.x0_scale",
                self.x0_scale,
                "finite, ≥ 0",
            ));
        }
        Ok(())
    }
}

/// The recurrent matrix J (`J[i][j]`: from unit j to unit i).
#[derive(Debug, Clone)]
enum Recurrent {
    /// Row-major `[N, N]`.
    Dense(Vec<f64>),
    /// Compressed rows: row i's entries are `start[i]..start[i + 1]`.
    Sparse {
        start: Vec<usize>,
        cols: Vec<u32>,
        vals: Vec<f64>,
    },
}

/// Outputs of a stretch of steps and their error against the targets.
#[derive(Debug, Clone)]
pub struct Trace {
    /// Outputs z, `[T, M, O]`.
    pub outputs: Tensor<f64>,
    /// Per step, the mean over trials and outputs of (z − f)², with z the
    /// step's output before any update of that step (the a-priori error).
    pub mse: Vec<f64>,
}

impl Trace {
    /// The mean of `mse` over all steps (0 for no steps).
    pub fn mean_mse(&self) -> f64 {
        if self.mse.is_empty() {
            0.0
        } else {
            self.mse.iter().sum::<f64>() / self.mse.len() as f64
        }
    }
}

/// A FORCE reservoir with M trials and its RLS state.
#[derive(Debug, Clone)]
pub struct Force {
    cfg: ForceConfig,
    trials: usize,
    recurrent: Recurrent,
    /// F, `[O, N]`.
    feedback: Vec<f64>,
    /// B, `[I, N]`.
    input_weights: Vec<f64>,
    /// W, `[N, O]`.
    readout: Vec<f64>,
    /// P, `[N, N]`, short of the held-back rank-one term.
    p: Vec<f64>,
    /// (c, k) of the last RLS sample: the true P is `p − c k kᵀ`.
    pending: Option<(f64, Vec<f64>)>,
    /// x, r = tanh x, `[M, N]`; z = Wᵀ r, `[M, O]`.
    x: Vec<f64>,
    r: Vec<f64>,
    z: Vec<f64>,
    /// Steps since the last reset.
    time: u64,
    /// J r + Fᵀ z + Bᵀ u, `[M, N]`.
    drive: Vec<f64>,
}

impl Force {
    /// Draws J, F and B from `cfg.seed`, sets W = 0, P = I/α, and draws the
    /// initial states of `trials` trials (those of [`Force::reset`]`(0)`).
    pub fn new(cfg: ForceConfig, trials: usize) -> Result<Self> {
        cfg.validate()?;
        if trials == 0 {
            return Err(Error::config("force.trials", trials, "M ≥ 1"));
        }
        let n = cfg.n;
        if n > u32::MAX as usize {
            return Err(Error::config("force.n", n, "N < 2³²"));
        }
        let (o, ni) = (cfg.outputs, cfg.inputs);

        // J: every entry gets a mask draw and a weight draw, so the network
        // is a fixed function of (seed, N, p, g) whatever the storage.
        let std = cfg.g / (cfg.p * n as f64).sqrt();
        let mut mask = vec![0.0; n * n];
        let mut vals = vec![0.0; n * n];
        rng::fill_uniform(&mut mask, 0.0, 1.0, cfg.seed, STREAM_MASK);
        rng::fill_normal(&mut vals, cfg.seed, STREAM_J);
        let dense = cfg.p >= 0.5;
        let recurrent = if dense {
            for (v, &u) in vals.iter_mut().zip(&mask) {
                *v = if u < cfg.p { *v * std } else { 0.0 };
            }
            Recurrent::Dense(vals)
        } else {
            let mut start = Vec::with_capacity(n + 1);
            let mut cols = Vec::new();
            let mut kept = Vec::new();
            start.push(0);
            for i in 0..n {
                for j in 0..n {
                    if mask[i * n + j] < cfg.p {
                        cols.push(j as u32);
                        kept.push(vals[i * n + j] * std);
                    }
                }
                start.push(cols.len());
            }
            Recurrent::Sparse {
                start,
                cols,
                vals: kept,
            }
        };

        let mut feedback = vec![0.0; o * n];
        rng::fill_uniform(&mut feedback, -1.0, 1.0, cfg.seed, STREAM_FEEDBACK);
        let mut input_weights = vec![0.0; ni * n];
        rng::fill_uniform(&mut input_weights, -1.0, 1.0, cfg.seed, STREAM_INPUT);

        let mut p = vec![0.0; n * n];
        for i in 0..n {
            p[i * n + i] = 1.0 / cfg.alpha;
        }
        let mut net = Force {
            trials,
            recurrent,
            feedback,
            input_weights,
            readout: vec![0.0; n * o],
            p,
            pending: None,
            x: vec![0.0; trials * n],
            r: vec![0.0; trials * n],
            z: vec![0.0; trials * o],
            time: 0,
            drive: vec![0.0; trials * n],
            cfg,
        };
        net.reset(0);
        Ok(net)
    }

    /// Redraws the initial states (stream `index` under the seed; `new` uses
    /// 0), recomputes r and z with the current readout, and restarts the step
    /// count. W and P are kept.
    pub fn reset(&mut self, index: u64) {
        rng::fill_normal(&mut self.x, self.cfg.seed, rng::substream(STREAM_X0, index));
        let s = self.cfg.x0_scale;
        self.x.iter_mut().for_each(|v| *v *= s);
        self.refresh();
        self.time = 0;
    }

    /// Sets the state x (`[M, N]`) and recomputes r and z; the step count is
    /// kept.
    pub fn set_state(&mut self, x: &[f64]) -> Result<()> {
        if x.len() != self.x.len() {
            return Err(TensorError::shape(
                "force state",
                format!("{} values ([M, N])", self.x.len()),
                x.len().to_string(),
            )
            .into());
        }
        self.x.copy_from_slice(x);
        self.refresh();
        Ok(())
    }

    pub fn config(&self) -> &ForceConfig {
        &self.cfg
    }
    /// Trials M.
    pub fn trials(&self) -> usize {
        self.trials
    }
    /// Steps since the last reset.
    pub fn time(&self) -> u64 {
        self.time
    }
    /// State x, `[M, N]`.
    pub fn state(&self) -> &[f64] {
        &self.x
    }
    /// Rates r = tanh x, `[M, N]`.
    pub fn rates(&self) -> &[f64] {
        &self.r
    }
    /// Current outputs z = Wᵀ r, `[M, O]` (as of the last step: an RLS
    /// update does not recompute them).
    pub fn output(&self) -> &[f64] {
        &self.z
    }
    /// Readout W, `[N, O]`.
    pub fn readout(&self) -> &[f64] {
        &self.readout
    }
    /// Feedback F, `[O, N]`.
    pub fn feedback(&self) -> &[f64] {
        &self.feedback
    }
    /// Input weights B, `[I, N]`.
    pub fn input_weights(&self) -> &[f64] {
        &self.input_weights
    }

    /// Sets the readout W (`[N, O]`); z is recomputed.
    pub fn set_readout(&mut self, w: &[f64]) -> Result<()> {
        if w.len() != self.readout.len() {
            return Err(TensorError::shape(
                "force readout",
                format!("{} values ([N, O])", self.readout.len()),
                w.len().to_string(),
            )
            .into());
        }
        self.readout.copy_from_slice(w);
        self.refresh();
        Ok(())
    }

    /// J as a dense row-major `[N, N]` matrix (`J[i][j]`: from j to i).
    pub fn recurrent_dense(&self) -> Vec<f64> {
        let n = self.cfg.n;
        match &self.recurrent {
            Recurrent::Dense(j) => j.clone(),
            Recurrent::Sparse { start, cols, vals } => {
                let mut j = vec![0.0; n * n];
                for i in 0..n {
                    for e in start[i]..start[i + 1] {
                        j[i * n + cols[e] as usize] = vals[e];
                    }
                }
                j
            }
        }
    }

    /// Number of non-zero entries kept in J.
    pub fn recurrent_nnz(&self) -> usize {
        match &self.recurrent {
            Recurrent::Dense(j) => j.iter().filter(|v| **v != 0.0).count(),
            Recurrent::Sparse { vals, .. } => vals.len(),
        }
    }

    /// The RLS matrix P (`[N, N]`, row-major), the inverse of the
    /// regularised rate correlation αI + Σ r rᵀ.
    pub fn inverse_correlation(&self) -> Vec<f64> {
        let n = self.cfg.n;
        let mut p = self.p.clone();
        if let Some((c, k)) = &self.pending {
            for i in 0..n {
                let a = c * k[i];
                for j in 0..n {
                    p[i * n + j] -= a * k[j];
                }
            }
        }
        p
    }

    /// Feeds rate vectors to RLS, one after the other: `rates` holds S rows
    /// of N (any S ≥ 0), `targets` the matching S rows of O. Each row does
    /// k = P r, c = 1/(1 + rᵀk), P ← P − c k kᵀ, W ← W − c k (Wᵀr − f)ᵀ, with
    /// W as left by the row before. Does not touch x, r or z.
    pub fn rls_update(&mut self, rates: &[f64], targets: &[f64]) -> Result<()> {
        let (n, o) = (self.cfg.n, self.cfg.outputs);
        let rows = rates.len() / n;
        if rows * n != rates.len() || targets.len() != rows * o {
            return Err(TensorError::shape(
                "force rls_update",
                format!("rates [S, {n}] and targets [S, {o}]"),
                format!("{} and {} values", rates.len(), targets.len()),
            )
            .into());
        }
        for (r, f) in rates.chunks_exact(n).zip(targets.chunks_exact(o)) {
            self.rls_sample(r, f);
        }
        Ok(())
    }

    /// Runs `targets.shape()[0]` steps with learning on: `targets` is
    /// `[T, M, O]` or `[T, 1, O]` (the same target for every trial), `inputs`
    /// `[T, M, I]` or `[T, 1, I]` (required iff I > 0). Returns the outputs
    /// and the per-step error before that step's update.
    pub fn train(&mut self, targets: &Tensor<f64>, inputs: Option<&Tensor<f64>>) -> Result<Trace> {
        let steps = self.check_series(targets, self.cfg.outputs, "force targets")?;
        self.simulate(steps, inputs, Some(targets), true)
    }

    /// Runs `steps` steps with learning off; returns the outputs `[T, M, O]`.
    pub fn run(&mut self, steps: usize, inputs: Option<&Tensor<f64>>) -> Result<Tensor<f64>> {
        Ok(self.simulate(steps, inputs, None, false)?.outputs)
    }

    /// Runs as many steps as `targets` has with learning off and scores the
    /// outputs against them (shapes as for [`Force::train`]).
    pub fn test(&mut self, targets: &Tensor<f64>, inputs: Option<&Tensor<f64>>) -> Result<Trace> {
        let steps = self.check_series(targets, self.cfg.outputs, "force targets")?;
        self.simulate(steps, inputs, Some(targets), false)
    }

    /// Checks a `[T, M or 1, width]` series; returns T.
    fn check_series(&self, s: &Tensor<f64>, width: usize, op: &'static str) -> Result<usize> {
        let sh = s.shape();
        if sh.len() != 3 || (sh[1] != self.trials && sh[1] != 1) || sh[2] != width {
            return Err(TensorError::shape(
                op,
                format!("[T, {} or 1, {width}]", self.trials),
                format!("{sh:?}"),
            )
            .into());
        }
        Ok(sh[0])
    }

    fn simulate(
        &mut self,
        steps: usize,
        inputs: Option<&Tensor<f64>>,
        targets: Option<&Tensor<f64>>,
        learn: bool,
    ) -> Result<Trace> {
        let (m, o, ni) = (self.trials, self.cfg.outputs, self.cfg.inputs);
        match (ni, inputs) {
            (0, None) => {}
            (0, Some(_)) => {
                return Err(Error::config(
                    "inputs",
                    "given",
                    "none: the network has no inputs (force.inputs = 0)",
                ))
            }
            (_, None) => {
                return Err(Error::config(
                    "inputs",
                    "none",
                    format!("[T, M, {ni}] inputs (force.inputs = {ni})"),
                ))
            }
            (_, Some(u)) => {
                let t = self.check_series(u, ni, "force inputs")?;
                if t < steps {
                    return Err(TensorError::shape(
                        "force inputs",
                        format!("at least {steps} steps"),
                        format!("{:?}", u.shape()),
                    )
                    .into());
                }
            }
        }
        let mut outputs = Tensor::<f64>::zeros(&[steps, m, o]);
        let mut mse = Vec::with_capacity(if targets.is_some() { steps } else { 0 });
        let mut u_step = vec![0.0; m * ni];
        let mut f_step = vec![0.0; m * o];
        for t in 0..steps {
            let u = match inputs {
                Some(u) if ni > 0 => {
                    gather_step(u, t, m, &mut u_step);
                    Some(&u_step[..])
                }
                _ => None,
            };
            self.advance(u);
            outputs.data_mut()[t * m * o..(t + 1) * m * o].copy_from_slice(&self.z);
            if let Some(f) = targets {
                gather_step(f, t, m, &mut f_step);
                let e: f64 = self
                    .z
                    .iter()
                    .zip(&f_step)
                    .map(|(z, f)| (z - f) * (z - f))
                    .sum();
                mse.push(e / (m * o) as f64);
                // (not `is_multiple_of`: the workspace builds on Rust 1.85)
                let phase = self.time % self.cfg.rls_every as u64;
                if learn && phase == 0 {
                    let r = std::mem::take(&mut self.r);
                    for (rm, fm) in r.chunks_exact(self.cfg.n).zip(f_step.chunks_exact(o)) {
                        self.rls_sample(rm, fm);
                    }
                    self.r = r;
                }
            }
        }
        Ok(Trace { outputs, mse })
    }

    /// r = tanh x, z = Wᵀ r.
    fn refresh(&mut self) {
        let (n, o, m) = (self.cfg.n, self.cfg.outputs, self.trials);
        for (r, x) in self.r.iter_mut().zip(&self.x) {
            *r = x.tanh();
        }
        Cpu.gemm(
            Gemm::new(m, o, n),
            &mut self.z,
            Mat::row_major(o),
            None,
            &self.r,
            Mat::row_major(n),
            &self.readout,
            Mat::row_major(o),
            1.0,
        );
    }

    /// One Euler step, then r and z; `u` is this step's `[M, I]` input.
    fn advance(&mut self, u: Option<&[f64]>) {
        let (n, o, ni, m) = (self.cfg.n, self.cfg.outputs, self.cfg.inputs, self.trials);
        // drive = J r (per trial)
        match &self.recurrent {
            Recurrent::Dense(j) => Cpu.gemm(
                Gemm::new(m, n, n),
                &mut self.drive,
                Mat::row_major(n),
                None,
                &self.r,
                Mat::row_major(n),
                j,
                Mat::transposed(n),
                1.0,
            ),
            Recurrent::Sparse { start, cols, vals } => {
                let r = &self.r;
                let row = |idx: usize, d: &mut [f64]| {
                    // rows idx·J_ROWS.. of the flattened [M, N] drive
                    for (q, dv) in d.iter_mut().enumerate() {
                        let flat = idx * J_ROWS + q;
                        let (tr, i) = (flat / n, flat % n);
                        let rt = &r[tr * n..(tr + 1) * n];
                        let mut acc = 0.0;
                        for e in start[i]..start[i + 1] {
                            acc += vals[e] * rt[cols[e] as usize];
                        }
                        *dv = acc;
                    }
                };
                if parallel::threads() > 1 && m * n >= 4 * J_ROWS {
                    self.drive
                        .par_chunks_mut(J_ROWS)
                        .enumerate()
                        .for_each(|(idx, d)| row(idx, d));
                } else {
                    self.drive
                        .chunks_mut(J_ROWS)
                        .enumerate()
                        .for_each(|(idx, d)| row(idx, d));
                }
            }
        }
        // + Fᵀ z + Bᵀ u
        Cpu.gemm(
            Gemm::new(m, n, o),
            &mut self.drive,
            Mat::row_major(n),
            Some(1.0),
            &self.z,
            Mat::row_major(o),
            &self.feedback,
            Mat::row_major(n),
            1.0,
        );
        if let Some(u) = u {
            Cpu.gemm(
                Gemm::new(m, n, ni),
                &mut self.drive,
                Mat::row_major(n),
                Some(1.0),
                u,
                Mat::row_major(ni),
                &self.input_weights,
                Mat::row_major(n),
                1.0,
            );
        }
        let dt = self.cfg.dt;
        for (x, d) in self.x.iter_mut().zip(&self.drive) {
            *x = (1.0 - dt) * *x + dt * *d;
        }
        self.refresh();
        self.time += 1;
    }

    /// One RLS sample (rates `r` [N], target `f` [O]).
    fn rls_sample(&mut self, r: &[f64], f: &[f64]) {
        let (n, o) = (self.cfg.n, self.cfg.outputs);
        // k = P r, applying the held-back rank-one term in the same pass.
        let held = self.pending.take();
        let mut k = vec![0.0; n];
        p_pass(
            &mut self.p,
            n,
            held.as_ref().map(|(c, k)| (*c, &k[..])),
            r,
            &mut k,
        );
        let c = 1.0 / (1.0 + dot(r, &k));
        // a-priori error e = Wᵀ r − f with the current W
        let mut e = vec![0.0; o];
        for (w_row, &ri) in self.readout.chunks_exact(o).zip(r) {
            for (eq, &w) in e.iter_mut().zip(w_row) {
                *eq += w * ri;
            }
        }
        for (eq, &fq) in e.iter_mut().zip(f) {
            *eq -= fq;
        }
        // W ← W − c k eᵀ
        for (w_row, &ki) in self.readout.chunks_exact_mut(o).zip(&k) {
            let a = c * ki;
            for (w, &eq) in w_row.iter_mut().zip(&e) {
                *w -= a * eq;
            }
        }
        // P ← P − c k kᵀ, held back until the next pass
        self.pending = Some((c, k));
    }
}

/// Reads the step-t row block of a `[T, M or 1, W]` series into `dst`
/// (`[M, W]`), repeating a single row for every trial.
fn gather_step(s: &Tensor<f64>, t: usize, m: usize, dst: &mut [f64]) {
    let sh = s.shape();
    let (rows, w) = (sh[1], sh[2]);
    let block = &s.data()[t * rows * w..(t + 1) * rows * w];
    if rows == m {
        dst.copy_from_slice(block);
    } else {
        for d in dst.chunks_exact_mut(w) {
            d.copy_from_slice(block);
        }
    }
}

/// A dot product with eight running sums (fixed order).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (at, bt) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = at.iter().zip(bt).map(|(x, y)| x * y).sum::<f64>();
    for v in acc {
        s += v;
    }
    s
}

/// `row[j] -= a · h[j]` for all j, then the dot product of the new row with
/// `r` (same summation order as [`dot`]).
fn update_dot(row: &mut [f64], a: f64, h: &[f64], r: &[f64]) -> f64 {
    let mut acc = [0.0; 8];
    let split = row.len() / 8 * 8;
    let (rh, rt) = row.split_at_mut(split);
    for ((p, hc), rc) in rh
        .chunks_exact_mut(8)
        .zip(h.chunks_exact(8))
        .zip(r.chunks_exact(8))
    {
        for l in 0..8 {
            let v = p[l] - a * hc[l];
            p[l] = v;
            acc[l] += v * rc[l];
        }
    }
    let mut s = 0.0;
    for (j, p) in rt.iter_mut().enumerate() {
        let v = *p - a * h[split + j];
        *p = v;
        s += v * r[split + j];
    }
    for v in acc {
        s += v;
    }
    s
}

/// One pass over P (`[N, N]`): applies the held-back `P ← P − c h hᵀ` if
/// any, and sets `k = P r` with the updated P.
fn p_pass(p: &mut [f64], n: usize, held: Option<(f64, &[f64])>, r: &[f64], k: &mut [f64]) {
    let body = |blk: usize, rows: &mut [f64], kb: &mut [f64]| {
        for (q, (row, kv)) in rows.chunks_exact_mut(n).zip(kb.iter_mut()).enumerate() {
            let i = blk * P_ROWS + q;
            *kv = match held {
                Some((c, h)) => update_dot(row, c * h[i], h, r),
                None => dot(row, r),
            };
        }
    };
    if parallel::threads() > 1 && n >= 4 * P_ROWS {
        p.par_chunks_mut(n * P_ROWS)
            .zip(k.par_chunks_mut(P_ROWS))
            .enumerate()
            .for_each(|(b, (rows, kb))| body(b, rows, kb));
    } else {
        p.chunks_mut(n * P_ROWS)
            .zip(k.chunks_mut(P_ROWS))
            .enumerate()
            .for_each(|(b, (rows, kb))| body(b, rows, kb));
    }
}
