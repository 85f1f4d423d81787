//! Where the K tangents of a value live.
//!
//! The tangents of a value of shape `[s0, …, s_{r-2}, s_{r-1}]` are one tensor
//! of shape `[s0, …, s_{r-2}, K, s_{r-1}]`: K sits just before the last axis
//! (a scalar's tangents are `[K]`). This places the K tangent rows of every
//! batch row next to each other, which makes both halves of the matmul rule
//! single GEMMs with no copies:
//! - `ȧ · b`: the tangents of `a` [R, k] are the matrix [R·K, k];
//! - `a · ḃ`: the tangents of `b` [k, n] are the matrix [k, K·n] (the K tangent
//!   matrices side by side), and `a · ḃ` [R, K·n] is already the layout of the
//!   result's tangents [R, K, n].
//!
//! The "canonical" layout `[K, s0, …]` (K first) is used by the linear ops
//! that are not on a hot path (slice, concat, sums, reshapes): their tangent
//! rule is the op itself, applied with every axis shifted by one.

use sofo_tensor::{Float, Result, Tensor};

/// Shape of the tangent tensor of a value of `shape`.
pub fn tangent_shape(shape: &[usize], k: usize) -> Vec<usize> {
    match shape.split_last() {
        None => vec![k],
        Some((&last, pre)) => {
            let mut s = pre.to_vec();
            s.push(k);
            s.push(last);
            s
        }
    }
}

/// (rows before K, K, last extent) of a value of `shape`.
pub fn split3(shape: &[usize], k: usize) -> (usize, usize, usize) {
    match shape.split_last() {
        None => (1, k, 1),
        Some((&last, pre)) => (pre.iter().product(), k, last),
    }
}

/// Tangents in layout → canonical `[K, shape…]`.
pub fn to_canonical<T: Float>(t: &Tensor<T>, shape: &[usize], k: usize) -> Result<Tensor<T>> {
    let (p, _, l) = split3(shape, k);
    let c = t.clone().reshape(&[p, k, l])?.permute(&[1, 0, 2])?;
    let mut cs = vec![k];
    cs.extend_from_slice(shape);
    c.reshape(&cs)
}

/// Canonical `[K, shape…]` → tangents in layout.
pub fn from_canonical<T: Float>(c: &Tensor<T>, k: usize) -> Result<Tensor<T>> {
    let shape = &c.shape()[1..];
    let (p, _, l) = split3(shape, k);
    let t = c.clone().reshape(&[k, p, l])?.permute(&[1, 0, 2])?;
    t.reshape(&tangent_shape(shape, k))
}
