//! SOFO: second-order forward-mode optimisation of recurrent networks.
//!
//! Layers (each uses only those below it): [`train`] (the loop) →
//! [`optim`] (SOFO) → [`tasks`] (seeded trial generators) → [`models`]
//! (rate RNN, Lorenz model) → [`loss`] (little losses with curvature) →
//! `sofo-ad` (op vocabulary, forward-K engine) → `sofo-tensor`.

pub mod checkpoint;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
mod error;
pub mod loss;
pub mod models;
pub mod optim;
pub mod params;
pub mod tasks;
pub mod train;

pub use device::{Device, PassInputs};
pub use error::{Error, Result};
pub use sofo_ad::{Dual, Fwd, Ops};
pub use sofo_tensor::{Float, Tensor};
