//! Optimisers.

mod sofo;

pub use sofo::{Damping, Proposal, Sofo, SofoConfig, StepReport, TangentKind, Tangents};
