//! The resolved settings of a run: built-in defaults, then `--config
//! FILE.toml`, then flags. Written back as the run's `config.toml`, which
//! `--config` accepts.

use serde::{Deserialize, Serialize};
use sofo::optim::{Damping, SofoConfig, TangentKind};
use sofo::{Error, Result};

pub const TASKS: &[&str] = &["lorenz"];
pub const OPTIMIZERS: &[&str] = &["sofo"];

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
    /// Evaluate on held-out trials every this many iterations (0 = only at the end).
    pub eval_every: usize,
    pub test_trials: usize,
    /// Run directory.
    pub out: String,
    pub sofo: SofoSection,
    pub lorenz: LorenzSection,
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
            eval_every: 20,
            test_trials: 500,
            out: "runs/lorenz".into(),
            sofo: SofoSection::default(),
            lorenz: LorenzSection::default(),
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
    pub fn from_toml(text: &str, source: &str) -> Result<Self> {
        toml::from_str(text).map_err(|e| {
            Error::config(
                format!("--config {source}"),
                "",
                format!("a valid sofo config: {e}"),
            )
        })
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
        self.sofo_config()?;
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
