//! Symmetric eigendecomposition (faer), in f64 on the host.

use crate::error::{Result, TensorError};

/// Eigenvalues (ascending) and eigenvectors (columns, row-major `n × n`:
/// `vectors[i * n + j]` is entry i of eigenvector j) of the symmetric `n × n`
/// matrix `a` (row-major; only its lower triangle is read).
pub fn symmetric_eigen(a: &[f64], n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != n * n {
        return Err(TensorError::shape(
            "symmetric_eigen",
            format!("{n}×{n} = {} entries", n * n),
            format!("{} entries", a.len()),
        ));
    }
    if let Some(bad) = a.iter().find(|v| !v.is_finite()) {
        return Err(TensorError::Numerical {
            op: "symmetric_eigen",
            message: format!("matrix holds a non-finite value ({bad})"),
        });
    }
    let m = faer::Mat::<f64>::from_fn(n, n, |i, j| a[i * n + j]);
    let evd = m
        .self_adjoint_eigen(faer::Side::Lower)
        .map_err(|e| TensorError::Numerical {
            op: "symmetric_eigen",
            message: format!("eigendecomposition failed: {e:?}"),
        })?;
    let s = evd.S();
    let u = evd.U();
    let values: Vec<f64> = (0..n).map(|i| s[i]).collect();
    let mut vectors = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            vectors[i * n + j] = u[(i, j)];
        }
    }
    Ok((values, vectors))
}

/// The spectral radius (largest eigenvalue modulus) of the general `n × n`
/// matrix `a` (row-major), in f64.
pub fn spectral_radius(a: &[f64], n: usize) -> Result<f64> {
    if a.len() != n * n {
        return Err(TensorError::shape(
            "spectral_radius",
            format!("{n}×{n} = {} entries", n * n),
            format!("{} entries", a.len()),
        ));
    }
    let m = faer::Mat::<f64>::from_fn(n, n, |i, j| a[i * n + j]);
    let ev = m.eigenvalues().map_err(|e| TensorError::Numerical {
        op: "spectral_radius",
        message: format!("eigenvalues failed: {e:?}"),
    })?;
    Ok(ev.iter().map(|z| z.norm()).fold(0.0, f64::max))
}

#[cfg(test)]
mod tests {
    #[test]
    fn spectral_radius_of_known_matrices() {
        // a rotation by 90° scaled by 2: eigenvalues ±2i
        let r = super::spectral_radius(&[0.0, -2.0, 2.0, 0.0], 2).unwrap();
        assert!((r - 2.0).abs() < 1e-12);
        // triangular: the diagonal
        let r = super::spectral_radius(&[0.5, 7.0, 0.0, -3.0], 2).unwrap();
        assert!((r - 3.0).abs() < 1e-12);
    }
}
