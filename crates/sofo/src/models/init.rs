//! What the rate networks share at construction: seeded Gaussian weights,
//! free parameters, and the checks of their common settings.

use crate::params::{Param, ParamMode};
use crate::{Error, Result};
use sofo_tensor::{rng, Float, Tensor};

/// std · N(0, 1) of `shape`, from stream (seed, stream).
pub(crate) fn normal<T: Float>(shape: &[usize], std: f64, seed: u64, stream: u64) -> Tensor<T> {
    let mut t = Tensor::<T>::scratch(shape);
    rng::fill_normal(t.data_mut(), seed, stream);
    t.map(|v| v * T::from_f64(std))
}

/// A trainable tensor.
pub(crate) fn param<T: Float>(name: &str, value: Tensor<T>) -> Param<T> {
    Param {
        name: name.into(),
        value,
        mode: ParamMode::Free,
    }
}

/// The weights every rate network starts from: `W` [N,N] ~ N(0, g²/N),
/// `B` [N,I] ~ N(0, 1/I), `b` = 0 [N], readout `C` [O,N] ~ N(0, 1/N).
pub(crate) fn rnn_weights<T: Float>(
    n: usize,
    inputs: usize,
    outputs: usize,
    gain: f64,
    seed: u64,
) -> Vec<Param<T>> {
    let sqrt = |k: usize| (k.max(1) as f64).sqrt();
    vec![
        param("W", normal(&[n, n], gain / sqrt(n), seed, 1)),
        param("B", normal(&[n, inputs], 1.0 / sqrt(inputs), seed, 2)),
        param("b", Tensor::zeros(&[n])),
        param("C", normal(&[outputs, n], 1.0 / sqrt(n), seed, 3)),
    ]
}

/// Units N ≥ 1, leak 0 < α ≤ 1 and a finite gain g ≥ 0; errors name
/// `model.n`, `model.alpha`, `model.gain` (callers rename the section).
pub(crate) fn check_rnn(n: usize, alpha: f64, gain: f64) -> Result<()> {
    if n == 0 {
        return Err(Error::config("model.n", n, "at least 1"));
    }
    if !(alpha > 0.0 && alpha <= 1.0) {
        return Err(Error::config("model.alpha", alpha, "0 < alpha ≤ 1 (dt/τ)"));
    }
    if !(gain >= 0.0 && gain.is_finite()) {
        return Err(Error::config("model.gain", gain, "a finite value ≥ 0"));
    }
    Ok(())
}
