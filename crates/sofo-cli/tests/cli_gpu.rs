//! `sofo --device cuda` end to end (feature `cuda`): training with SOFO and
//! with Adam through the device tape, one SOFO iteration of each paper task,
//! `devices` and `bench`. On a machine
//! with a GPU they run on it; without one, on the fake GPU of
//! crates/sofo/tests/fake_gpu (host stand-ins for the CUDA libraries).
#![cfg(feature = "cuda")]

#[path = "../../sofo/tests/fake_gpu/mod.rs"]
mod fake_gpu;

use std::process::{Command, Output};

/// Runs `sofo` on the GPU there is, or on the fake one (`None`: neither a
/// GPU nor a C++ compiler to build the fake).
fn on_a_gpu() -> Option<impl Fn(&[&str]) -> Output> {
    let sofo = on_a_gpu_with_env()?;
    Some(move |args: &[&str]| sofo(args, &[]))
}

/// Environment variables for a run: (name, value).
type Env<'a> = &'a [(&'a str, &'a str)];

/// As [`on_a_gpu`], with environment variables set for the run.
fn on_a_gpu_with_env() -> Option<impl Fn(&[&str], Env) -> Output> {
    let lib_path = if sofo_tensor::cuda::CudaDevice::open(0).is_ok() {
        None
    } else {
        Some(fake_gpu::library_path(&fake_gpu::build()?))
    };
    Some(move |args: &[&str], env: Env| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sofo"));
        c.args(args).envs(env.iter().copied());
        if let Some(p) = &lib_path {
            c.env("LD_LIBRARY_PATH", p);
        }
        c.output().expect("run sofo")
    })
}

fn losses(dir: &std::path::Path) -> Vec<f64> {
    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().parse().unwrap())
        .collect()
}

#[test]
fn sofo_and_adam_train_from_the_cli_on_the_device() {
    let Some(sofo) = on_a_gpu() else {
        return;
    };
    let o = sofo(&["devices"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("cuda:0") && out.contains("ready"),
        "{out}"
    );
    for opt in ["sofo", "adam"] {
        let dir = std::env::temp_dir().join(format!("sofo-cli-gpu-{}-{opt}", std::process::id()));
        let o = sofo(&[
            "train",
            "--task",
            "lorenz",
            "--device",
            "cuda",
            "--optimizer",
            opt,
            "--iterations",
            "4",
            "--batch",
            "16",
            "--tangents",
            "16",
            "--quiet",
            "--out",
            dir.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{opt}: {err}");
        assert!(
            err.contains("cuda:0"),
            "{opt}: the banner names the device: {err}"
        );
        let l = losses(&dir);
        assert_eq!(l.len(), 4, "{opt}: {l:?}");
        assert!(
            l[3] < 0.9 * l[0],
            "{opt} did not learn on the device: {l:?}"
        );
        assert!(dir.join("weights.safetensors").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
    // every paper task's network and loss through the device path: one
    // SOFO iteration each, its report and picture written
    for (task, report) in [
        ("flipflop", "flipflop.png"),
        ("addition", "addition.png"),
        ("reach1", "reach.png"),
        ("kalman", "kalman.png"),
    ] {
        let dir = std::env::temp_dir().join(format!("sofo-cli-gpu-{}-{task}", std::process::id()));
        let o = sofo(&[
            "train",
            "--task",
            task,
            "--device",
            "cuda",
            "--iterations",
            "1",
            "--batch",
            "4",
            "--tangents",
            "4",
            "--quiet",
            "--out",
            dir.to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{task}: {err}");
        assert!(err.contains("cuda:0"), "{task}: {err}");
        assert_eq!(losses(&dir).len(), 1, "{task}");
        assert!(dir.join(report).exists(), "{task}: no {report}");
        let _ = std::fs::remove_dir_all(&dir);
    }
    let o = sofo(&[
        "bench", "--device", "cuda", "--method", "pass", "--only", "rnn-n128", "--steps", "8",
        "--iters", "1", "--json",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(r["method"], "pass");
    assert!(r["device"].as_str().unwrap().starts_with("cuda:0"), "{r}");
}

/// SOFO_GPU_GRAPHS=1: the bench's SOFO iterations are recorded, captured
/// and replayed as a CUDA graph (its JSON says so); another value is
/// refused, naming the variable. The JSON times the iterations' phases too.
#[test]
fn graphs_are_switched_on_by_the_environment() {
    let Some(sofo) = on_a_gpu_with_env() else {
        return;
    };
    let args = [
        "bench", "--device", "cuda", "--method", "sofo", "--only", "rnn-n128", "--steps", "4",
        "--iters", "1", "--json",
    ];
    let o = sofo(&args, &[("SOFO_GPU_GRAPHS", "1")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    let g = &r["graph_passes"];
    // two warm-up iterations and one timed: recorded, captured, replayed;
    // then the three whose phases are timed, replayed
    assert_eq!(g["on"], true, "{r}");
    assert_eq!(
        (
            &g["direct"],
            &g["captured"],
            &g["replayed"],
            &g["fallbacks"]
        ),
        (&1.into(), &1.into(), &4.into(), &0.into()),
        "{r}"
    );
    let ph = &r["phases"];
    assert_eq!(ph["iters"], 3, "{r}");
    for phase in ["draw_s", "pass_s", "step_s"] {
        assert!(ph[phase].as_f64().unwrap() > 0.0, "{phase}: {r}");
    }
    let o = sofo(&args, &[("SOFO_GPU_GRAPHS", "yes")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("SOFO_GPU_GRAPHS") && err.contains("\"yes\""),
        "{err}"
    );
}

/// SOFO_GPU_LINEAR=gemm moves the dense linear terms back to cuBLAS (the
/// bench's device string names the choice); another value is refused,
/// naming the variable and the value.
#[test]
fn dense_linear_kernels_are_chosen_by_the_environment() {
    let Some(sofo) = on_a_gpu_with_env() else {
        return;
    };
    let args = [
        "bench", "--device", "cuda", "--method", "pass", "--only", "rnn-n128", "--steps", "4",
        "--iters", "1", "--json",
    ];
    let o = sofo(&args, &[("SOFO_GPU_LINEAR", "gemm")]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    let r: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert!(
        r["device"]
            .as_str()
            .unwrap()
            .contains("SOFO_GPU_LINEAR=gemm"),
        "{r}"
    );
    let o = sofo(&args, &[("SOFO_GPU_LINEAR", "cublas")]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("SOFO_GPU_LINEAR") && err.contains("\"cublas\"") && err.contains("gemm"),
        "{err}"
    );
}
