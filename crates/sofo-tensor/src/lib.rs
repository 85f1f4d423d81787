//! Dense row-major f32/f64 tensors, their CPU kernels, and the tensor layer's
//! own memory accounting.
//!
//! The [`backend::Kernels`] trait is the seam a GPU backend implements; the
//! CPU implementation ([`backend::Cpu`]) uses the `gemm` crate (x86-v4 path)
//! for matrix products and rayon for elementwise loops, with fixed chunking
//! so results do not depend on scheduling.

pub mod backend;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod eigen;
mod error;
mod float;
pub mod memory;
pub mod parallel;
pub mod rng;
mod tensor;

pub use error::{Result, TensorError};
pub use float::{DType, Float};
pub use tensor::Tensor;
