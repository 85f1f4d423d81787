//! One op vocabulary for models, losses and plants, and the engines that run
//! it. A model is written once against [`Ops`]; the caller picks the engine:
//! [`Fwd`] with K tangents (SOFO's and FGD's engine) or with none (plain
//! primal evaluation). The reverse-mode tape implements the same trait.

#[cfg(feature = "cuda")]
pub mod cuda;
mod forward;
pub mod layout;
mod ops;

pub use forward::{linear_shapes, Dual, Fwd};
pub use ops::{Binary, Ops, Unary};
pub use sofo_tensor::{Float, Result, Tensor, TensorError};
