//! Little losses with their curvature, and the observers that collect them.
//!
//! A little loss ℓ(y) is the loss contributed by one output tensor. Under
//! forward-K the [`Sketch`] collector adds its value to c, the tangent of ℓ
//! (∂ℓ/∂y · Ẏ_k) to C, and Ẏᵀ H Ẏ to G̃, all in f64 (method.md, step 3).

use crate::{Error, Result};
use sofo_ad::layout::split3;
use sofo_ad::{Dual, Fwd, Ops};
use sofo_tensor::backend::{Cpu, Gemm, Kernels, Mat};
use sofo_tensor::{Float, Tensor, TensorError};

/// A loss on one output tensor, with its gradient and curvature H = ∂²ℓ/∂y².
pub trait LittleLoss<T: Float> {
    fn value(&self, y: &Tensor<T>) -> Result<f64>;
    /// ∂ℓ/∂y, shape of y.
    fn gradient(&self, y: &Tensor<T>) -> Result<Tensor<f64>>;
    /// Adds Ẏᵀ H Ẏ to the row-major K×K matrix `g`; `ydot` holds the K
    /// tangents of y in the layout of `sofo_ad::layout`.
    fn add_curvature(&self, y: &Tensor<T>, ydot: &Tensor<T>, k: usize, g: &mut [f64])
        -> Result<()>;
    /// H as a dense matrix over the flattened y (for tests).
    fn hessian(&self, y: &Tensor<T>) -> Result<Vec<f64>>;
    /// The weighted MSE behind this loss, if it is one (the GPU sketch
    /// implements that family on the device).
    fn as_weighted_mse(&self) -> Option<&WeightedMse<T>> {
        None
    }
}

/// ℓ = (1/n) Σ w (y − target)², the weights broadcast against y (numpy
/// rules); without weights, w = 1. H = diag(2w/n).
pub struct WeightedMse<T: Float> {
    pub target: Tensor<T>,
    pub weights: Option<Tensor<T>>,
    pub n: f64,
}

impl<T: Float> WeightedMse<T> {
    /// Plain MSE over all elements of the target: n = number of elements.
    pub fn mean(target: Tensor<T>) -> Self {
        let n = target.numel() as f64;
        WeightedMse {
            target,
            weights: None,
            n,
        }
    }

    fn check(&self, y: &Tensor<T>) -> Result<Option<Tensor<T>>> {
        if y.shape() != self.target.shape() {
            return Err(TensorError::shape(
                "mse",
                format!("output of the target's shape {:?}", self.target.shape()),
                format!("{:?}", y.shape()),
            )
            .into());
        }
        Ok(match &self.weights {
            None => None,
            Some(w) => Some(w.broadcast_to(y.shape())?),
        })
    }

    fn weight(w: &Option<Tensor<T>>, i: usize) -> f64 {
        w.as_ref().map_or(1.0, |w| w.data()[i].to_f64())
    }
}

impl<T: Float> LittleLoss<T> for WeightedMse<T> {
    fn as_weighted_mse(&self) -> Option<&WeightedMse<T>> {
        Some(self)
    }

    fn value(&self, y: &Tensor<T>) -> Result<f64> {
        let w = self.check(y)?;
        let mut s = 0.0;
        for (i, (&a, &b)) in y.data().iter().zip(self.target.data()).enumerate() {
            let d = a.to_f64() - b.to_f64();
            s += Self::weight(&w, i) * d * d;
        }
        Ok(s / self.n)
    }

    fn gradient(&self, y: &Tensor<T>) -> Result<Tensor<f64>> {
        let w = self.check(y)?;
        let g: Vec<f64> = (0..y.numel())
            .map(|i| {
                2.0 * Self::weight(&w, i) * (y.data()[i].to_f64() - self.target.data()[i].to_f64())
                    / self.n
            })
            .collect();
        Ok(Tensor::from_vec(y.shape(), g)?)
    }

    fn add_curvature(
        &self,
        y: &Tensor<T>,
        ydot: &Tensor<T>,
        k: usize,
        g: &mut [f64],
    ) -> Result<()> {
        let w = self.check(y)?;
        let (rows, _, l) = split3(y.shape(), k);
        // A[k, (r, j)] = sqrt(2 w / n) Ẏ[r, k, j];  G̃ += A Aᵀ
        let cols = rows * l;
        let mut a = vec![0f64; k * cols];
        let yd = ydot.data();
        for r in 0..rows {
            for kk in 0..k {
                for j in 0..l {
                    let i = r * l + j;
                    let s = (2.0 * Self::weight(&w, i) / self.n).sqrt();
                    a[kk * cols + i] = s * yd[(r * k + kk) * l + j].to_f64();
                }
            }
        }
        add_aat(&a, k, cols, g, 1.0);
        Ok(())
    }

    fn hessian(&self, y: &Tensor<T>) -> Result<Vec<f64>> {
        let w = self.check(y)?;
        let n = y.numel();
        let mut h = vec![0.0; n * n];
        for i in 0..n {
            h[i * n + i] = 2.0 * Self::weight(&w, i) / self.n;
        }
        Ok(h)
    }
}

/// Softmax cross-entropy over the last axis, summed over rows and divided
/// by n: y [M, L] logits, target [M, L] probabilities (one-hot for class
/// labels). Per row H = (1/n)(diag(p) − ppᵀ). n is the number of rows of
/// the whole batch (as `WeightedMse::n`), so that the losses of groups of
/// trials add up to the batch's mean whatever the split.
pub struct SoftmaxCrossEntropy<T: Float> {
    pub target: Tensor<T>,
    pub n: f64,
}

impl<T: Float> SoftmaxCrossEntropy<T> {
    /// One-hot targets from class labels, the sum over rows divided by `n`:
    /// the number of rows of the whole batch (not only of these labels,
    /// when a batch is split into groups of trials).
    pub fn from_labels(labels: &[usize], classes: usize, n: usize) -> Result<Self> {
        if n < labels.len().max(1) {
            return Err(Error::config(
                "softmax_cross_entropy.n",
                n,
                format!("≥ {} (the number of labels)", labels.len().max(1)),
            ));
        }
        let mut t = vec![T::zero(); labels.len() * classes];
        for (m, &c) in labels.iter().enumerate() {
            if c >= classes {
                return Err(Error::config("label", c, format!("0 ≤ label < {classes}")));
            }
            t[m * classes + c] = T::one();
        }
        Ok(SoftmaxCrossEntropy {
            target: Tensor::from_vec(&[labels.len(), classes], t)?,
            n: n as f64,
        })
    }

    fn probs(&self, y: &Tensor<T>) -> Result<(usize, usize, Vec<f64>)> {
        if y.rank() != 2 || y.shape() != self.target.shape() {
            return Err(TensorError::shape(
                "softmax_cross_entropy",
                format!(
                    "logits [M, L] of the target's shape {:?}",
                    self.target.shape()
                ),
                format!("{:?}", y.shape()),
            )
            .into());
        }
        if !(self.n.is_finite() && self.n > 0.0) {
            return Err(Error::config("softmax_cross_entropy.n", self.n, "> 0"));
        }
        let (m, l) = (y.shape()[0], y.shape()[1]);
        let mut p = vec![0.0; m * l];
        for r in 0..m {
            let row = &y.data()[r * l..(r + 1) * l];
            let mx = row
                .iter()
                .map(|v| v.to_f64())
                .fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = row.iter().map(|v| (v.to_f64() - mx).exp()).sum();
            for j in 0..l {
                p[r * l + j] = (row[j].to_f64() - mx).exp() / z;
            }
        }
        Ok((m, l, p))
    }
}

impl<T: Float> LittleLoss<T> for SoftmaxCrossEntropy<T> {
    fn value(&self, y: &Tensor<T>) -> Result<f64> {
        let (_, _, p) = self.probs(y)?;
        let mut s = 0.0;
        for (&t, &pi) in self.target.data().iter().zip(&p) {
            let t = t.to_f64();
            if t != 0.0 {
                s -= t * pi.max(f64::MIN_POSITIVE).ln();
            }
        }
        Ok(s / self.n)
    }

    fn gradient(&self, y: &Tensor<T>) -> Result<Tensor<f64>> {
        let (m, l, p) = self.probs(y)?;
        let g: Vec<f64> = (0..m * l)
            .map(|i| {
                let row_t: f64 = (0..l)
                    .map(|j| self.target.data()[(i / l) * l + j].to_f64())
                    .sum();
                (row_t * p[i] - self.target.data()[i].to_f64()) / self.n
            })
            .collect();
        Ok(Tensor::from_vec(y.shape(), g)?)
    }

    fn add_curvature(
        &self,
        y: &Tensor<T>,
        ydot: &Tensor<T>,
        k: usize,
        g: &mut [f64],
    ) -> Result<()> {
        let (m, l, p) = self.probs(y)?;
        let yd = ydot.data();
        // Σ_rows (1/n)[(Ẏ⊙p)Ẏᵀ − (Ẏp)(Ẏp)ᵀ], each term weighted by the row's target mass
        let mut a1 = vec![0.0; k * m * l];
        let mut a2 = vec![0.0; k * m];
        for r in 0..m {
            let mass: f64 = (0..l).map(|j| self.target.data()[r * l + j].to_f64()).sum();
            let s = (mass / self.n).sqrt();
            for kk in 0..k {
                let mut dot = 0.0;
                for j in 0..l {
                    let v = yd[(r * k + kk) * l + j].to_f64();
                    a1[kk * m * l + r * l + j] = s * p[r * l + j].sqrt() * v;
                    dot += p[r * l + j] * v;
                }
                a2[kk * m + r] = s * dot;
            }
        }
        add_aat(&a1, k, m * l, g, 1.0);
        add_aat(&a2, k, m, g, -1.0);
        Ok(())
    }

    fn hessian(&self, y: &Tensor<T>) -> Result<Vec<f64>> {
        let (m, l, p) = self.probs(y)?;
        let n = m * l;
        let mut h = vec![0.0; n * n];
        for r in 0..m {
            let mass: f64 = (0..l).map(|j| self.target.data()[r * l + j].to_f64()).sum();
            for i in 0..l {
                for j in 0..l {
                    let d = if i == j { p[r * l + i] } else { 0.0 };
                    h[(r * l + i) * n + r * l + j] =
                        mass * (d - p[r * l + i] * p[r * l + j]) / self.n;
                }
            }
        }
        Ok(h)
    }
}

/// g += sign · A Aᵀ for A row-major [k, cols], in f64.
fn add_aat(a: &[f64], k: usize, cols: usize, g: &mut [f64], sign: f64) {
    Cpu.gemm(
        Gemm::new(k, k, cols),
        g,
        Mat::row_major(k),
        Some(1.0),
        a,
        Mat::row_major(cols),
        a,
        Mat::transposed(cols),
        sign,
    );
}

/// Receives every little loss a model observes.
pub trait Observer<T: Float, E: Ops<T>> {
    fn observe(&mut self, e: &mut E, y: &E::V, loss: &dyn LittleLoss<T>) -> Result<()>;
}

/// The SOFO sketch of one forward-K pass: loss c, C = Vᵀ∇c, G̃ = Vᵀ(JᵀHJ)V.
#[derive(Debug, Clone)]
pub struct Sketch {
    pub k: usize,
    pub loss: f64,
    /// `[K]`
    pub c: Vec<f64>,
    /// [K, K] row-major, symmetric after [`Sketch::finish`].
    pub g: Vec<f64>,
}

impl Sketch {
    pub fn new(k: usize) -> Self {
        Sketch {
            k,
            loss: 0.0,
            c: vec![0.0; k],
            g: vec![0.0; k * k],
        }
    }

    /// Adds another sketch of the same K (another group of trials).
    pub fn add(&mut self, o: &Sketch) {
        self.loss += o.loss;
        self.c.iter_mut().zip(&o.c).for_each(|(a, b)| *a += b);
        self.g.iter_mut().zip(&o.g).for_each(|(a, b)| *a += b);
    }

    /// Symmetrises G̃ and checks that everything is finite.
    pub fn finish(mut self) -> Result<Self> {
        let k = self.k;
        for i in 0..k {
            for j in 0..i {
                let m = 0.5 * (self.g[i * k + j] + self.g[j * k + i]);
                self.g[i * k + j] = m;
                self.g[j * k + i] = m;
            }
        }
        if !self.loss.is_finite() {
            return Err(Error::NonFinite(format!("loss = {}", self.loss)));
        }
        if self.c.iter().chain(&self.g).any(|v| !v.is_finite()) {
            return Err(Error::NonFinite("gradient or curvature sketch".into()));
        }
        Ok(self)
    }
}

impl<T: Float> Observer<T, Fwd> for Sketch {
    fn observe(&mut self, e: &mut Fwd, y: &Dual<T>, loss: &dyn LittleLoss<T>) -> Result<()> {
        self.loss += loss.value(&y.primal)?;
        let Some(yd) = &y.tangent else { return Ok(()) };
        if e.k() != self.k {
            return Err(Error::config(
                "tangents",
                e.k(),
                format!("{} (the sketch's K)", self.k),
            ));
        }
        let k = self.k;
        let grad = loss.gradient(&y.primal)?;
        let (rows, _, l) = split3(y.primal.shape(), k);
        let gd = grad.data();
        let ydd = yd.data();
        for r in 0..rows {
            for kk in 0..k {
                let mut s = 0.0;
                for j in 0..l {
                    s += gd[r * l + j] * ydd[(r * k + kk) * l + j].to_f64();
                }
                self.c[kk] += s;
            }
        }
        loss.add_curvature(&y.primal, yd, k, &mut self.g)
    }
}
