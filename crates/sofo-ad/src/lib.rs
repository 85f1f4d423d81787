//! One op vocabulary for models, losses and plants, and the engines that run
//! it. A model is written once against [`Ops`]; the caller picks the engine:
//! [`Fwd`] with K tangents (SOFO's and FGD's engine) or with none (plain
//! primal evaluation), or the reverse-mode tape [`Rev`] for backpropagation.

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "cuda")]
pub mod cuda_rev;
mod forward;
pub mod layout;
mod ops;
pub mod pointwise;
mod reverse;

pub use forward::{linear_shapes, Dual, Fwd};
pub use ops::{Binary, Ops, Unary};
pub use pointwise::{Pointwise, Recorder, Reg};
pub use reverse::{Rev, Var};
pub use sofo_tensor::{Float, Result, Tensor, TensorError};
