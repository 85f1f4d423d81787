//! Optimisers.

mod sofo;

#[cfg(feature = "cuda")]
pub(crate) use sofo::split_flat;
pub use sofo::{Damping, Proposal, Sofo, SofoConfig, StepReport, TangentKind, Tangents};
