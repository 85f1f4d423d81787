//! The FORCE sine-wave target (tasks.md §6, Sussillo & Abbott 2009):
//!
//! ```text
//! f(t) = (1.3/1.5) [sin(πt/60) + ½ sin(2πt/60) + ⅙ sin(3πt/60) + ⅓ sin(4πt/60)]
//! ```
//!
//! **Time unit.** t is in units of the network time constant τ, as in the
//! authors' code (`x = (1-dt)x + ...` with dt = 0.1 and
//! `simtime = 0:dt:...`): step s of a network with Euler step dt is at
//! t = s·dt. With dt = 0.1 τ the fundamental period 120 τ is 1200 steps and
//! the fastest component (period 30 τ) 300 steps, i.e. the target is slow
//! against τ, which is what makes it learnable. (Passing dt = 1 measures t
//! in steps instead.)

use sofo_tensor::Tensor;

/// The overall amplitude 1.3/1.5.
pub const AMPLITUDE: f64 = 1.3 / 1.5;
/// The period of f, in units of τ (the fundamental sin(πt/60)).
pub const PERIOD: f64 = 120.0;

/// f(t), t in units of τ.
pub fn sine_wave(t: f64) -> f64 {
    let w = std::f64::consts::PI * t / 60.0;
    AMPLITUDE * (w.sin() + (2.0 * w).sin() / 2.0 + (3.0 * w).sin() / 6.0 + (4.0 * w).sin() / 3.0)
}

/// Targets for the `steps` steps that follow step `start` of a network with
/// Euler step `dt` (in τ): entry i is f((start + i + 1)·dt), shaped
/// `[steps, 1, 1]` (one row shared by all trials). Pass the network's
/// `time()` as `start`, so that a test run continues the phase of training.
pub fn sine_targets(start: u64, steps: usize, dt: f64) -> Tensor<f64> {
    Tensor::from_fn(&[steps, 1, 1], |i| {
        sine_wave((start + i as u64 + 1) as f64 * dt)
    })
}

/// The variance of f over one period (the mean of f is 0): AMPLITUDE² ×
/// (1 + ¼ + 1/36 + 1/9) / 2.
pub fn sine_variance() -> f64 {
    AMPLITUDE * AMPLITUDE * (1.0 + 0.25 + 1.0 / 36.0 + 1.0 / 9.0) / 2.0
}
