//! The resolved settings of a run: built-in defaults, then `--config
//! FILE.toml`, then flags. Written back as the run's `config.toml`, which
//! `--config` accepts.

use serde::{Deserialize, Serialize};
use sofo::models::{
    read_mask, Activation, ConstrainedRnn, Constraints, DaleTransform, LeakyRnn, LorenzModel,
    LowRank, Noise, RateRnn, ReachRnn, Regularizers, TimeConstants,
};
use sofo::optim::force::ForceConfig;
use sofo::optim::{
    AdamConfig, Damping, FgdConfig, LearningRate, Schedule, SgdConfig, SofoConfig, TangentKind,
};
use sofo::tasks::{AdditionTask, FlipFlopTask, KalmanTask, LorenzData, LorenzTask, ReachTask};
use sofo::{Error, Result};

pub const TASKS: &[&str] = &[
    "lorenz",
    "sine",
    "flipflop",
    "flipflop-reservoir",
    "addition",
    "reach1",
    "reach2",
    "kalman",
    "kalman-long",
];
pub const OPTIMIZERS: &[&str] = &["sofo", "adam", "sgd", "fgd", "force"];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Task name (see `sofo tasks`).
    pub task: String,
    pub optimizer: String,
    pub iterations: usize,
    /// Trials per batch (M).
    pub batch: usize,
    pub seed: u64,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// cpu, cuda or cuda:N
    pub device: String,
    /// Precision of the f32 GEMMs on a GPU: f32, or tf32 (tensor cores).
    pub gpu_matmul: String,
    /// Evaluate on held-out trials every this many iterations (0 = only at the end).
    pub eval_every: usize,
    pub test_trials: usize,
    /// Run directory.
    pub out: String,
    pub sofo: SofoSection,
    pub adam: AdamSection,
    pub sgd: SgdSection,
    pub fgd: FgdSection,
    /// Learning-rate schedule of the first-order optimisers (adam, sgd, fgd).
    pub schedule: ScheduleSection,
    pub lorenz: LorenzSection,
    pub force: ForceSection,
    pub flipflop: FlipFlopSection,
    pub addition: AdditionSection,
    /// Reaching with the two-joint arm (reach1, reach2).
    pub reach: ReachSection,
    /// The adaptive Kalman filter (kalman, kalman-long).
    pub kalman: KalmanSection,
    /// Biological constraints of the rate RNN (flipflop, addition).
    pub constraints: ConstraintsSection,
    /// Process and input noise of the rate RNN (flipflop, addition).
    pub noise: NoiseSection,
    /// Regularisers of the rate RNN, observed as little losses (flipflop, addition).
    pub regularizers: RegularizersSection,
    /// Time constants of the rate RNN (flipflop, addition).
    pub time_constants: TimeConstantsSection,
    /// Low-rank recurrence of the rate RNN (flipflop, addition).
    pub low_rank: LowRankSection,
}

/// σ of each noise, in units of the state (the stationary std it alone
/// gives an isolated unit); 0 = off. Drawn per (step, trial) from the
/// batch's seed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NoiseSection {
    /// additive state noise: x += σ·√(2α)·ξ each step
    pub state: f64,
    /// multiplicative rate noise: r ⊙= 1 + σ·√(2/α)·ξ
    pub rates: f64,
    /// input noise: u += σ·√(2/α)·ξ
    pub input: f64,
    /// multiplicative state noise: x ⊙= 1 + σ·√(2α)·ξ each step
    pub state_multiplicative: f64,
    /// additive rate noise: r += σ·√(2/α)·ξ
    pub rates_additive: f64,
}

/// Weights λ of the regularisers (0 = off).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegularizersSection {
    /// λ‖W‖² on the effective recurrent weights
    pub weights_l2: f64,
    /// λ · mean of r² over steps, trials and units
    pub rates_l2: f64,
    /// λ · mean over trials and units of (the unit's mean rate in the trial − rate_target)²
    pub rate_target_weight: f64,
    /// the target mean rate
    pub rate_target: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeConstantsSection {
    /// scalar (the task's alpha) | per-unit | learned
    pub kind: String,
    /// per-unit: α = dt/τ of each unit (N values) ...
    pub alpha: Vec<f64>,
    /// ... or, when `alpha` is empty, α log-spaced from `spread[0]` to `spread[1]`
    pub spread: [f64; 2],
    /// learned: τ/dt = tau_min + softplus(τ̃) (≥ 1), started at the task's alpha
    pub tau_min: f64,
}

impl Default for TimeConstantsSection {
    fn default() -> Self {
        TimeConstantsSection {
            kind: "scalar".into(),
            alpha: vec![],
            spread: [0.05, 0.5],
            tau_min: 1.0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LowRankSection {
    /// rank r of W = m nᵀ/N (0 = full rank W)
    pub rank: usize,
    /// add a fixed random W0 ~ N(0, g²/N) (pinned)
    pub fixed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConstraintsSection {
    /// Dale's law on W: W = |W̃|·diag(s)
    pub dale: bool,
    /// share of excitatory units under Dale's law
    pub excitatory: f64,
    /// Dale's law on the readout C too
    pub dale_readout: bool,
    /// connection probability of W (a fixed random mask; 1 = dense)
    pub density: f64,
    /// self-connections allowed
    pub autapses: bool,
    /// parameter tensors never updated (e.g. ["B", "C"]); still part of the model
    pub pinned: Vec<String>,
    /// parameter tensors kept in [lower, upper] after every update, e.g. { b = [-1.0, 1.0] }
    pub bounds: std::collections::BTreeMap<String, [f64; 2]>,
    /// abs | softplus: how Dale's law makes W̃ non-negative
    pub dale_transform: String,
    /// connection probability of the input weights B (a fixed random mask)
    pub density_in: f64,
    /// connection probability of the readout C (a fixed random mask)
    pub density_out: f64,
    /// fixed 0/1 masks from files, e.g. { W = "w.csv", C = "masks.safetensors" }
    /// (CSV rows, or a safetensors tensor of the same name)
    pub masks: std::collections::BTreeMap<String, String>,
    /// per-element trainability from 0/1 files (1 = trained, 0 = never moves),
    /// e.g. { W = "w_trainable.csv" }; any parameter tensor
    pub trainable: std::collections::BTreeMap<String, String>,
}

impl Default for ConstraintsSection {
    fn default() -> Self {
        ConstraintsSection {
            dale: false,
            excitatory: 0.8,
            dale_readout: false,
            density: 1.0,
            autapses: true,
            pinned: vec![],
            bounds: Default::default(),
            dale_transform: "abs".into(),
            density_in: 1.0,
            density_out: 1.0,
            masks: Default::default(),
            trainable: Default::default(),
        }
    }
}

/// Delayed addition (tasks.md §5) with a rate RNN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdditionSection {
    pub steps: usize,
    /// units N
    pub n: usize,
    /// dt/τ (the leak)
    pub alpha: f64,
    /// tanh | relu | softplus
    pub activation: String,
    /// initial recurrent gain g
    pub gain: f64,
}

impl Default for AdditionSection {
    fn default() -> Self {
        AdditionSection {
            steps: 1000,
            n: 128,
            alpha: 0.25,
            activation: "relu".into(),
            gain: 0.9,
        }
    }
}

/// Reaching with the two-joint arm (tasks.md §2): the task is `reach1`
/// (single) or `reach2` (double); the network is the §2 rate RNN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReachSection {
    /// steps per trial T (2 ms each): 750 for reach1, 1000 for reach2
    pub steps: usize,
    /// units N
    pub n: usize,
    /// dt/τ (2 ms / 20 ms)
    pub alpha: f64,
    /// initial recurrent gain g (weak: no chaos at start)
    pub gain: f64,
    /// multiplicative rate noise: η ~ U[1 − σ', 1 + σ'], σ' = noise·√(τ/dt); 0 = off
    pub noise: f64,
}

impl Default for ReachSection {
    fn default() -> Self {
        let m = ReachRnn::paper(6);
        ReachSection {
            steps: ReachTask::double().steps,
            n: m.n,
            alpha: m.alpha,
            gain: m.gain,
            noise: m.noise,
        }
    }
}

/// The adaptive Kalman filter (tasks.md §3) with the leaky relu network
/// z ← (1 − α) z + α relu(z W + [y, 1] B), x̂ = z C.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KalmanSection {
    /// steps per trial T: 500 for kalman, 5000 for kalman-long
    pub steps: usize,
    /// units N (P = N² + 3N)
    pub n: usize,
    /// the leak α
    pub alpha: f64,
    /// initial recurrent gain g
    pub gain: f64,
}

impl Default for KalmanSection {
    fn default() -> Self {
        let m = LeakyRnn::kalman(100);
        KalmanSection {
            steps: KalmanTask::new(500).steps,
            n: m.n,
            alpha: m.alpha,
            gain: m.gain,
        }
    }
}

/// The b-bit flip-flop (tasks.md §4) with a fully trained rate RNN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FlipFlopSection {
    pub bits: usize,
    pub steps: usize,
    pub pulse_prob: f64,
    /// units N
    pub n: usize,
    /// dt/τ
    pub alpha: f64,
    /// tanh | relu | softplus
    pub activation: String,
    /// initial recurrent gain g (W ~ N(0, g²/N))
    pub gain: f64,
}

impl Default for FlipFlopSection {
    fn default() -> Self {
        FlipFlopSection {
            bits: 3,
            steps: 200,
            pulse_prob: 0.02,
            n: 128,
            alpha: 0.2,
            activation: "relu".into(),
            gain: 0.9,
        }
    }
}

/// FORCE on the sine task (tasks.md §6): a reservoir with a trained readout.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ForceSection {
    pub n: usize,
    /// connection probability of J
    pub p: f64,
    /// gain of J
    pub g: f64,
    /// RLS regulariser: P₀ = I/α
    pub alpha: f64,
    /// steps between RLS updates
    pub rls_every: usize,
    /// periods of the target (1200 steps each) with learning on
    pub train_periods: usize,
    /// periods with learning off, for the test error
    pub test_periods: usize,
}

impl Default for ForceSection {
    fn default() -> Self {
        ForceSection {
            n: 1000,
            p: 0.1,
            g: 1.5,
            alpha: 1.0,
            rls_every: 2,
            train_periods: 12,
            test_periods: 2,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdamSection {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the gradient's global norm to this (0 = no clipping).
    pub clip: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SgdSection {
    pub lr: f64,
    pub momentum: f64,
    /// Clip the gradient's global norm to this (0 = no clipping).
    pub clip: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FgdSection {
    /// Tangents K (1 = the classic forward gradient).
    pub tangents: usize,
    pub lr: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// constant | exponential | cosine
    pub kind: String,
    /// exponential: lr × decay^iteration
    pub decay: f64,
    /// cosine: down to lr × lr_floor at the last iteration
    pub lr_floor: f64,
    /// linear warm-up iterations (0 = none)
    pub warmup: usize,
}

impl Default for AdamSection {
    fn default() -> Self {
        // tasks.md: the authors' Adam rate for Lorenz, 2e-4; it also beats
        // 1e-3 over the default 200 iterations (README)
        AdamSection {
            lr: 2e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            clip: 0.0,
        }
    }
}

impl Default for SgdSection {
    fn default() -> Self {
        // the first Lorenz gradients are large: unclipped SGD diverges even
        // at lr 1e-3, clipped at 1 it learns (README)
        SgdSection {
            lr: 1e-2,
            momentum: 0.9,
            clip: 1.0,
        }
    }
}

impl Default for FgdSection {
    fn default() -> Self {
        // 1e-4 diverges on Lorenz, 3e-5 learns (README)
        FgdSection {
            tangents: 128,
            lr: 3e-5,
        }
    }
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection {
            kind: "constant".into(),
            decay: 0.999,
            lr_floor: 0.0,
            warmup: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SofoSection {
    /// Number of tangents K.
    pub tangents: usize,
    /// orthonormal | unit-norm | raw
    pub tangent_kind: String,
    /// none | largest | smallest: what the damping is relative to.
    pub damping_kind: String,
    /// λ: γ = λ × the chosen eigenvalue of G̃.
    pub damping: f64,
    /// Use (S + γ)^{-1/2} instead of (S + γ)^{-1}.
    pub sqrt: bool,
    /// Learning rate η.
    pub lr: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LorenzSection {
    pub hidden: usize,
    pub train_bouts: usize,
    pub test_bouts: usize,
    /// Steps per bout (the loss is on the last).
    pub bout_len: usize,
    pub dt: f64,
    /// Seed of the data set (fixed across runs by default).
    pub data_seed: u64,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            task: "lorenz".into(),
            optimizer: "sofo".into(),
            iterations: 200,
            batch: 128,
            seed: 0,
            threads: 0,
            device: "cpu".into(),
            gpu_matmul: "f32".into(),
            eval_every: 20,
            test_trials: 500,
            out: "runs/lorenz".into(),
            sofo: SofoSection::default(),
            adam: AdamSection::default(),
            sgd: SgdSection::default(),
            fgd: FgdSection::default(),
            schedule: ScheduleSection::default(),
            lorenz: LorenzSection::default(),
            force: ForceSection::default(),
            flipflop: FlipFlopSection::default(),
            addition: AdditionSection::default(),
            reach: ReachSection::default(),
            kalman: KalmanSection::default(),
            constraints: ConstraintsSection::default(),
            noise: NoiseSection::default(),
            regularizers: RegularizersSection::default(),
            time_constants: TimeConstantsSection::default(),
            low_rank: LowRankSection::default(),
        }
    }
}

impl Default for SofoSection {
    fn default() -> Self {
        SofoSection {
            tangents: 128,
            tangent_kind: "orthonormal".into(),
            damping_kind: "largest".into(),
            damping: 1e-5,
            sqrt: false,
            // the exact GN step (η = 1) overshoots early on Lorenz; 0.5 is
            // the best of {1, 0.5, 0.2} at 60 iterations (README)
            lr: 0.5,
        }
    }
}

impl Default for LorenzSection {
    fn default() -> Self {
        LorenzSection {
            hidden: 400,
            train_bouts: 3500,
            test_bouts: 500,
            bout_len: 32,
            dt: 0.01,
            data_seed: 1,
        }
    }
}

/// A rate RNN from a task section; errors name `section.field`.
fn rate_rnn(
    section: &str,
    n: usize,
    inputs: usize,
    outputs: usize,
    alpha: f64,
    activation: &str,
    gain: f64,
) -> Result<RateRnn> {
    let model = RateRnn {
        n,
        inputs,
        outputs,
        alpha,
        activation: Activation::parse(activation).map_err(|_| {
            Error::config(
                format!("{section}.activation"),
                format!("\"{activation}\""),
                "tanh, relu or softplus",
            )
        })?,
        learn_x0: false,
        gain,
    };
    model.validate().map_err(|e| match e {
        Error::Config {
            field,
            value,
            allowed,
        } => Error::Config {
            field: field.replace("model.", &format!("{section}.")),
            value,
            allowed,
        },
        e => e,
    })?;
    Ok(model)
}

/// Overlays `top` on `base`, table by table.
fn merge(base: &mut toml::Table, top: toml::Table) {
    for (k, v) in top {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(t)) => merge(b, t),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

fn one_of(field: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!("\"{value}\""),
            format!("one of {}", allowed.join(", ")),
        ))
    }
}

impl RunConfig {
    /// The built-in defaults of `task`: the Lorenz ones, with what another
    /// task needs to learn out of the box (its optimiser, learning rate,
    /// batch, run directory).
    pub fn defaults_for(task: &str) -> Self {
        let mut c = RunConfig {
            task: task.to_string(),
            out: format!("runs/{task}"),
            ..RunConfig::default()
        };
        match task {
            "sine" => c.optimizer = "force".into(),
            "addition" => {
                // tasks.md §5: K 128, lr 0.1, damping 1e-5, batch 256
                c.sofo.lr = 0.1;
                c.batch = 256;
                c.test_trials = 256;
            }
            "flipflop" => {
                // relu rate networks diverge at the Lorenz rate (0.5); 0.1 is
                // the anchors' flip-flop rate (README)
                c.sofo.lr = 0.1;
                c.sofo.damping = 1e-3;
                c.batch = 64;
                c.test_trials = 256;
            }
            "reach1" | "reach2" => {
                // tasks.md §2: batch 256, 5000 iterations, K 128, damping 1e-5;
                // lr 0.3 beat 0.1 over 150 iterations at batch 64, K 64 (README)
                c.sofo.lr = 0.3;
                c.batch = 256;
                c.iterations = 5000;
                c.eval_every = 100;
                c.test_trials = 256;
                c.adam.lr = 5e-4;
                if task == "reach1" {
                    c.reach.steps = ReachTask::single().steps;
                }
            }
            "flipflop-reservoir" => {
                // tasks.md §4: the N = 1000 reservoir at g = 0.5 (dense J,
                // RLS every step for FORCE), batch 32, K 128, damping 1e-5;
                // SOFO lr 0.03: §4's lr 1 (and 0.1 at N = 1000) overshoots on
                // the first step from W = 0 (README)
                c.force.p = 1.0;
                c.force.g = 0.5;
                c.force.rls_every = 1;
                c.batch = 32;
                c.iterations = 100;
                c.eval_every = 10;
                c.test_trials = 128;
                c.sofo.lr = 0.03;
            }
            "kalman" | "kalman-long" => {
                // tasks.md §3: batch 256, K 128, damping 1e-3, Adam lr 1e-3;
                // SOFO lr 0.1 at T = 500 and 0.05 at T = 5000
                c.batch = 256;
                c.iterations = 1000;
                c.eval_every = 50;
                c.test_trials = 256;
                c.sofo.damping = 1e-3;
                c.sofo.lr = 0.1;
                c.adam.lr = 1e-3;
                if task == "kalman-long" {
                    c.kalman.steps = KalmanTask::long().steps;
                    c.sofo.lr = 0.05;
                }
            }
            _ => {}
        }
        c
    }

    /// A config file over the defaults of the task it names.
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        let bad = |e: String| {
            Error::config(
                format!("--config {source}"),
                "",
                format!("a valid sofo config: {e}"),
            )
        };
        let file: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(e.to_string()))?;
        let task = file
            .get("task")
            .and_then(|v| v.as_str())
            .unwrap_or("lorenz");
        let mut base =
            toml::Table::try_from(Self::defaults_for(task)).map_err(|e| bad(e.to_string()))?;
        merge(&mut base, file);
        base.try_into()
            .map_err(|e: toml::de::Error| bad(e.to_string()))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("config serialises")
    }

    pub fn validate(&self) -> Result<()> {
        one_of("task", &self.task, TASKS)?;
        one_of("optimizer", &self.optimizer, OPTIMIZERS)?;
        if self.iterations == 0 {
            return Err(Error::config("iterations", self.iterations, "at least 1"));
        }
        if self.batch == 0 {
            return Err(Error::config("batch", self.batch, "at least 1"));
        }
        let d = self.device.as_str();
        let device_ok = d == "cpu"
            || d == "cuda"
            || d.strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok());
        if !device_ok {
            return Err(Error::config(
                "device",
                format!("\"{d}\""),
                "cpu, cuda or cuda:N",
            ));
        }
        sofo::Device::check_gpu_matmul(d, &self.gpu_matmul)?;
        if self.threads > 1024 {
            return Err(Error::config(
                "threads",
                self.threads,
                "0 (all cores) to 1024",
            ));
        }
        if self.test_trials == 0 {
            return Err(Error::config("test_trials", self.test_trials, "at least 1"));
        }
        if self.out.is_empty() {
            return Err(Error::config("out", "\"\"", "a directory path"));
        }
        // FORCE trains reservoirs: the sine task and FORCE go together; the
        // flip-flop reservoir takes FORCE or any of the others
        let reservoir = self.task == "flipflop-reservoir";
        if (self.task == "sine") != (self.optimizer == "force") && !reservoir {
            return Err(Error::config(
                "optimizer",
                format!("\"{}\" with task \"{}\"", self.optimizer, self.task),
                "force for the sine task (a reservoir), force, sofo, adam, sgd or fgd for flipflop-reservoir, and sofo, adam, sgd or fgd for the others",
            ));
        }
        match self.task.as_str() {
            "flipflop" => self.constrained(self.flipflop()?.1).map(|_| ())?,
            "addition" => self.constrained(self.addition()?.1).map(|_| ())?,
            "reach1" | "reach2" => {
                self.reach()?;
                self.only_trainability("reach")?;
            }
            "kalman" | "kalman-long" => {
                self.kalman()?;
                self.only_trainability("Kalman")?;
            }
            "flipflop-reservoir" => {
                self.flipflop_reservoir()?;
                self.only_trainability("reservoir")?;
            }
            "sine" => {
                self.only_trainability("FORCE sine")?;
                let c = &self.constraints;
                if !(c.pinned.is_empty() && c.bounds.is_empty() && c.trainable.is_empty()) {
                    return Err(Error::config(
                        "constraints",
                        format!(
                            "pinned {:?}, bounds {:?}, trainable {:?}",
                            c.pinned, c.bounds, c.trainable
                        ),
                        "none for task \"sine\": FORCE trains the whole readout",
                    ));
                }
            }
            _ => self.only_trainability("Lorenz")?,
        }
        match self.optimizer.as_str() {
            "force" => self.force_config().map(|_| ())?,
            "adam" => self.adam_config().map(|_| ())?,
            "sgd" => self.sgd_config().map(|_| ())?,
            "fgd" => self.fgd_config().map(|_| ())?,
            _ => self.sofo_config().map(|_| ())?,
        }
        let l = &self.lorenz;
        if l.hidden == 0 {
            return Err(Error::config("lorenz.hidden", l.hidden, "at least 1"));
        }
        if l.bout_len == 0 {
            return Err(Error::config("lorenz.bout_len", l.bout_len, "at least 1"));
        }
        if l.train_bouts == 0 {
            return Err(Error::config(
                "lorenz.train_bouts",
                l.train_bouts,
                "at least 1",
            ));
        }
        if l.test_bouts == 0 {
            return Err(Error::config(
                "lorenz.test_bouts",
                l.test_bouts,
                "at least 1",
            ));
        }
        if !(l.dt > 0.0 && l.dt <= 0.05) {
            return Err(Error::config("lorenz.dt", l.dt, "0 < dt ≤ 0.05"));
        }
        Ok(())
    }

    fn learning_rate(&self, field: &str, lr: f64) -> Result<LearningRate> {
        let s = &self.schedule;
        one_of(
            "schedule.kind",
            &s.kind,
            &["constant", "exponential", "cosine"],
        )?;
        let schedule = match s.kind.as_str() {
            "exponential" => Schedule::Exponential { decay: s.decay },
            "cosine" => Schedule::Cosine {
                total: self.iterations,
                floor: s.lr_floor,
            },
            _ => Schedule::Constant,
        };
        let lr = LearningRate {
            base: lr,
            schedule,
            warmup: s.warmup,
        };
        lr.validate(field)?;
        Ok(lr)
    }

    fn clip(field: &str, c: f64) -> Result<Option<f64>> {
        if !(c >= 0.0 && c.is_finite()) {
            return Err(Error::config(field, c, "≥ 0 (0 = no clipping)"));
        }
        Ok((c > 0.0).then_some(c))
    }

    /// Pins and bounds the tensors the `[constraints]` section names.
    pub fn apply_modes<T: sofo::Float>(
        &self,
        params: &mut sofo::params::ParamSet<T>,
    ) -> Result<()> {
        use sofo::params::ParamMode;
        for name in &self.constraints.pinned {
            params.set_mode(name, ParamMode::Pinned).map_err(|e| {
                Error::config("constraints.pinned", format!("\"{name}\""), e.to_string())
            })?;
        }
        for (name, [lower, upper]) in &self.constraints.bounds {
            params
                .set_mode(
                    name,
                    ParamMode::Bounded {
                        lower: *lower,
                        upper: *upper,
                    },
                )
                .map_err(|e| {
                    Error::config(
                        "constraints.bounds",
                        format!("{name} = [{lower}, {upper}]"),
                        e.to_string(),
                    )
                })?;
        }
        for (name, file) in &self.constraints.trainable {
            let field = format!("constraints.trainable.{name}");
            let p = params.get(name).ok_or_else(|| {
                let names: Vec<&str> = params.iter().map(|p| p.name.as_str()).collect();
                Error::config(&field, format!("\"{name}\""), format!("one of {names:?}"))
            })?;
            let shape = p.value.shape();
            let (rows, cols) = match shape.len() {
                1 => (1, shape[0]),
                _ => (shape[0], shape[1..].iter().product()),
            };
            let m = read_mask(std::path::Path::new(file), name, [rows, cols], &field)?;
            let t: Vec<bool> = m.iter().map(|&v| v != 0.0).collect();
            params.set_trainable_entries(name, &t)?;
        }
        if params.trainable_count() == 0 {
            return Err(Error::config(
                "constraints.pinned",
                format!("{:?}", self.constraints.pinned),
                "at least one tensor left to train",
            ));
        }
        if params.free_count() == 0 {
            return Err(Error::config(
                "constraints.trainable",
                format!("{:?}", self.constraints.trainable),
                "at least one entry left to train",
            ));
        }
        Ok(())
    }

    /// The rate RNN under the configured constraints, noise, regularisers,
    /// time constants and rank.
    pub fn constrained(&self, rnn: RateRnn) -> Result<ConstrainedRnn> {
        let c = &self.constraints;
        let (n, i, o) = (rnn.n, rnn.inputs, rnn.outputs);
        let mut cons = Constraints::generate(
            n,
            c.dale.then_some(c.excitatory),
            c.dale_readout,
            c.density,
            c.autapses,
            self.seed,
        )?
        .with_io_masks(n, i, o, c.density_in, c.density_out, self.seed)?;
        cons.dale_transform = DaleTransform::parse(&c.dale_transform)?;
        for (name, file) in &c.masks {
            let field = format!("constraints.masks.{name}");
            let (shape, density, density_field) = match name.as_str() {
                "W" => ([n, n], c.density, "constraints.density"),
                "B" => ([n, i], c.density_in, "constraints.density_in"),
                "C" => ([o, n], c.density_out, "constraints.density_out"),
                _ => {
                    return Err(Error::config(
                        "constraints.masks",
                        format!("\"{name}\""),
                        "masks for W, B or C",
                    ))
                }
            };
            if density < 1.0 {
                return Err(Error::config(
                    density_field,
                    density,
                    format!("1 when {field} gives the mask from a file"),
                ));
            }
            let mut m = read_mask(std::path::Path::new(file), name, shape, &field)?;
            match name.as_str() {
                "W" => {
                    if !c.autapses {
                        (0..n).for_each(|k| m[k * n + k] = 0.0);
                    }
                    cons.mask_w = Some(m);
                }
                "B" => cons.mask_b = Some(m),
                _ => cons.mask_c = Some(m),
            }
        }
        let nz = &self.noise;
        let r = &self.regularizers;
        let t = &self.time_constants;
        one_of(
            "time_constants.kind",
            &t.kind,
            &["scalar", "per-unit", "learned"],
        )?;
        // a setting the chosen option would not read is refused, not dropped
        let d = TimeConstantsSection::default();
        let unused = [
            (
                "time_constants.alpha",
                t.kind != "per-unit" && !t.alpha.is_empty(),
                format!("{:?}", t.alpha),
                "kind = \"per-unit\"",
            ),
            (
                "time_constants.spread",
                t.kind != "per-unit" && t.spread != d.spread,
                format!("{:?}", t.spread),
                "kind = \"per-unit\"",
            ),
            (
                "time_constants.tau_min",
                t.kind != "learned" && t.tau_min != d.tau_min,
                t.tau_min.to_string(),
                "kind = \"learned\"",
            ),
            (
                "low_rank.fixed",
                self.low_rank.rank == 0 && self.low_rank.fixed,
                "true".into(),
                "low_rank.rank ≥ 1",
            ),
            (
                "regularizers.rate_target",
                r.rate_target_weight == 0.0 && r.rate_target != 0.0,
                r.rate_target.to_string(),
                "regularizers.rate_target_weight > 0",
            ),
            (
                "constraints.dale_transform",
                !self.constraints.dale && self.constraints.dale_transform != "abs",
                format!("\"{}\"", self.constraints.dale_transform),
                "constraints.dale = true",
            ),
            (
                "constraints.dale_readout",
                !self.constraints.dale && self.constraints.dale_readout,
                "true".into(),
                "constraints.dale = true",
            ),
        ];
        for (field, set, value, with) in unused {
            if set {
                return Err(Error::config(
                    field,
                    value,
                    format!("its default unless {with}: otherwise nothing reads it"),
                ));
            }
        }
        let time = match t.kind.as_str() {
            "per-unit" if t.alpha.is_empty() => {
                let [lo, hi] = t.spread;
                if !(lo > 0.0 && lo <= hi && hi <= 1.0) {
                    return Err(Error::config(
                        "time_constants.spread",
                        format!("[{lo}, {hi}]"),
                        "0 < lo ≤ hi ≤ 1 (α = dt/τ log-spaced over the units)",
                    ));
                }
                TimeConstants::PerUnit(
                    (0..n)
                        .map(|k| lo * (hi / lo).powf(k as f64 / (n.max(2) - 1) as f64))
                        .collect(),
                )
            }
            "per-unit" => TimeConstants::PerUnit(t.alpha.clone()),
            "learned" => TimeConstants::Learned { tau_min: t.tau_min },
            _ => TimeConstants::Scalar,
        };
        let low_rank = (self.low_rank.rank > 0).then_some(LowRank {
            rank: self.low_rank.rank,
            fixed: self.low_rank.fixed,
        });
        ConstrainedRnn::new(rnn, cons)?
            .with_noise(Noise {
                state: nz.state,
                rates: nz.rates,
                input: nz.input,
                state_multiplicative: nz.state_multiplicative,
                rates_additive: nz.rates_additive,
            })?
            .with_regularizers(Regularizers {
                weights_l2: r.weights_l2,
                rates_l2: r.rates_l2,
                rate_target_weight: r.rate_target_weight,
                rate_target: r.rate_target,
            })?
            .with_time_constants(time)?
            .with_low_rank(low_rank)
    }

    /// `KEY=VALUE` overrides (`--set noise.state=0.1`): VALUE is read as a
    /// TOML value (a bare word as a string) and put at the dotted KEY.
    pub fn set(&mut self, assignments: &[String]) -> Result<()> {
        if assignments.is_empty() {
            return Ok(());
        }
        let mut table = toml::Table::try_from(&*self).expect("config serialises");
        for a in assignments {
            let Some((key, value)) = a.split_once('=') else {
                return Err(Error::config("--set", a, "KEY=VALUE, e.g. noise.state=0.1"));
            };
            let key = key.trim();
            let value = value.trim();
            if key == "task" {
                // the task picks the defaults everything else starts from
                return Err(Error::config("--set", a, "any KEY but task: use --task"));
            }
            let parsed: toml::Value = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            let mut node = &mut table;
            let parts: Vec<&str> = key.split('.').collect();
            for part in &parts[..parts.len() - 1] {
                node = match node.get_mut(*part) {
                    Some(toml::Value::Table(t)) => t,
                    _ => {
                        return Err(Error::config(
                            "--set",
                            key,
                            "a KEY of the config (section.field, as in config.toml)",
                        ))
                    }
                };
            }
            node.insert(parts[parts.len() - 1].to_string(), parsed);
            // checked one assignment at a time, so the error names its key
            let _: RunConfig = table.clone().try_into().map_err(|e: toml::de::Error| {
                Error::config(
                    format!("--set {key}"),
                    value,
                    format!("a value of that config field: {}", e.message()),
                )
            })?;
        }
        *self = table.try_into().map_err(|e: toml::de::Error| {
            Error::config("--set", assignments.join(" "), e.message().to_string())
        })?;
        Ok(())
    }

    /// The flip-flop task and its network.
    pub fn flipflop(&self) -> Result<(FlipFlopTask, RateRnn)> {
        let f = &self.flipflop;
        let task = FlipFlopTask {
            pulse_prob: f.pulse_prob,
            ..FlipFlopTask::new(f.bits, f.steps)
        };
        task.validate()?;
        let model = rate_rnn(
            "flipflop",
            f.n,
            f.bits,
            f.bits,
            f.alpha,
            &f.activation,
            f.gain,
        )?;
        Ok((task, model))
    }

    /// The Lorenz task of the `[lorenz]` section and its model.
    pub fn lorenz(&self) -> Result<(LorenzTask, LorenzModel)> {
        let l = &self.lorenz;
        let task = LorenzTask {
            data: LorenzData::generate(l.data_seed, l.train_bouts, l.test_bouts, l.bout_len, l.dt)?,
        };
        Ok((task, LorenzModel { hidden: l.hidden }))
    }

    /// The reach task (`reach1` single, `reach2` double) and its network.
    pub fn reach(&self) -> Result<(ReachTask, ReachRnn)> {
        let r = &self.reach;
        let base = if self.task == "reach1" {
            ReachTask::single()
        } else {
            ReachTask::double()
        };
        let task = ReachTask {
            steps: r.steps,
            ..base
        };
        task.validate()?;
        let model = ReachRnn {
            n: r.n,
            alpha: r.alpha,
            gain: r.gain,
            noise: r.noise,
            ..ReachRnn::paper(task.inputs())
        };
        model.validate().map_err(|e| match e {
            Error::Config {
                field,
                value,
                allowed,
            } => Error::Config {
                field: field.replace("model.", "reach."),
                value,
                allowed,
            },
            e => e,
        })?;
        Ok((task, model))
    }

    /// The Kalman task (`kalman` T = 500, `kalman-long` T = 5000 unless
    /// `kalman.steps` says otherwise) and its network.
    pub fn kalman(&self) -> Result<(KalmanTask, LeakyRnn)> {
        let k = &self.kalman;
        let base = if self.task == "kalman-long" {
            KalmanTask::long()
        } else {
            KalmanTask::new(k.steps)
        };
        let task = KalmanTask {
            steps: k.steps,
            ..base
        };
        task.validate()?;
        let model = LeakyRnn {
            n: k.n,
            alpha: k.alpha,
            gain: k.gain,
            ..LeakyRnn::kalman(k.n)
        };
        model.validate().map_err(|e| match e {
            Error::Config {
                field,
                value,
                allowed,
            } => Error::Config {
                field: field.replace("model.", "kalman."),
                value,
                allowed,
            },
            e => e,
        })?;
        Ok((task, model))
    }

    /// Models other than the rate RNN of flipflop/addition take `pinned`,
    /// `bounds` and `trainable` from `[constraints]` and nothing else of the
    /// rate-RNN sections: any other field off its default is refused rather
    /// than ignored. The sections are compared field by field through their
    /// serialised form, so a field added later is covered too.
    fn only_trainability(&self, what: &str) -> Result<()> {
        fn table<S: Serialize>(s: &S) -> toml::Table {
            toml::Table::try_from(s).expect("config sections serialise")
        }
        let sections = [
            (
                "constraints",
                table(&self.constraints),
                table(&ConstraintsSection::default()),
            ),
            ("noise", table(&self.noise), table(&NoiseSection::default())),
            (
                "regularizers",
                table(&self.regularizers),
                table(&RegularizersSection::default()),
            ),
            (
                "time_constants",
                table(&self.time_constants),
                table(&TimeConstantsSection::default()),
            ),
            (
                "low_rank",
                table(&self.low_rank),
                table(&LowRankSection::default()),
            ),
        ];
        for (section, now, default) in sections {
            for (key, value) in &now {
                let trainability = section == "constraints"
                    && ["pinned", "bounds", "trainable"].contains(&key.as_str());
                if !trainability && default.get(key) != Some(value) {
                    return Err(Error::config(
                        format!("{section}.{key}"),
                        value,
                        format!(
                            "its default for task \"{}\": the {what} network takes only `pinned`, `bounds` and `trainable` from [constraints]",
                            self.task
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The delayed-addition task and its network.
    pub fn addition(&self) -> Result<(AdditionTask, RateRnn)> {
        let a = &self.addition;
        let task = AdditionTask::new(a.steps);
        task.validate()?;
        let model = rate_rnn("addition", a.n, 2, 1, a.alpha, &a.activation, a.gain)?;
        Ok((task, model))
    }

    /// The flip-flop task and the reservoir network of tasks.md §4 (the
    /// `[force]` section's N, p, g, α and RLS interval over
    /// `ForceConfig::flip_flop`: τ = 10 steps, x0 ~ 0.1·N(0, 1)).
    pub fn flipflop_reservoir(&self) -> Result<(FlipFlopTask, ForceConfig)> {
        let (task, _) = self.flipflop()?;
        let f = &self.force;
        let c = ForceConfig {
            n: f.n,
            p: f.p,
            g: f.g,
            alpha: f.alpha,
            rls_every: f.rls_every,
            seed: self.seed,
            ..ForceConfig::flip_flop(f.g, task.bits)
        };
        c.validate()?;
        Ok((task, c))
    }

    pub fn force_config(&self) -> Result<ForceConfig> {
        if self.task == "flipflop-reservoir" {
            return Ok(self.flipflop_reservoir()?.1);
        }
        let f = &self.force;
        let c = ForceConfig {
            n: f.n,
            p: f.p,
            g: f.g,
            alpha: f.alpha,
            rls_every: f.rls_every,
            seed: self.seed,
            ..ForceConfig::sine()
        };
        c.validate()?;
        if f.train_periods == 0 || f.test_periods == 0 {
            return Err(Error::config(
                "force.train_periods/test_periods",
                format!("{}/{}", f.train_periods, f.test_periods),
                "at least 1 each",
            ));
        }
        Ok(c)
    }

    pub fn adam_config(&self) -> Result<AdamConfig> {
        let a = &self.adam;
        Ok(AdamConfig {
            lr: self.learning_rate("adam", a.lr)?,
            beta1: a.beta1,
            beta2: a.beta2,
            eps: a.eps,
            clip: Self::clip("adam.clip", a.clip)?,
        })
    }

    pub fn sgd_config(&self) -> Result<SgdConfig> {
        let s = &self.sgd;
        Ok(SgdConfig {
            lr: self.learning_rate("sgd", s.lr)?,
            momentum: s.momentum,
            clip: Self::clip("sgd.clip", s.clip)?,
        })
    }

    pub fn fgd_config(&self) -> Result<FgdConfig> {
        if self.fgd.tangents == 0 {
            return Err(Error::config("fgd.tangents", 0, "K ≥ 1"));
        }
        Ok(FgdConfig {
            k: self.fgd.tangents,
            lr: self.learning_rate("fgd", self.fgd.lr)?,
        })
    }

    pub fn sofo_config(&self) -> Result<SofoConfig> {
        let s = &self.sofo;
        if s.tangents == 0 {
            return Err(Error::config("sofo.tangents", s.tangents, "K ≥ 1"));
        }
        one_of(
            "sofo.tangent_kind",
            &s.tangent_kind,
            &["orthonormal", "unit-norm", "raw"],
        )?;
        one_of(
            "sofo.damping_kind",
            &s.damping_kind,
            &["none", "largest", "smallest"],
        )?;
        if !(s.damping >= 0.0 && s.damping.is_finite()) {
            return Err(Error::config(
                "sofo.damping",
                s.damping,
                "a finite value ≥ 0",
            ));
        }
        if !(s.lr > 0.0 && s.lr.is_finite()) {
            return Err(Error::config("sofo.lr", s.lr, "a finite value > 0"));
        }
        let damping = match s.damping_kind.as_str() {
            "none" => Damping::None,
            "smallest" => Damping::RelativeSmallest(s.damping),
            _ => Damping::RelativeLargest(s.damping),
        };
        Ok(SofoConfig {
            k: s.tangents,
            tangents: TangentKind::parse(&s.tangent_kind)?,
            damping,
            sqrt: s.sqrt,
            lr: s.lr,
        })
    }
}
