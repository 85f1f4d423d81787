//! Passes on a GPU (feature `cuda`). SOFO: the model runs under the device
//! forward-K engine and its weighted-MSE little losses are sketched on the
//! device in f64; the final (loss, C, G̃) comes back to the host (with the
//! outputs of any other little loss, which the host sketches). BPTT: the
//! model runs on the device tape and the gradients come back.

use crate::loss::{LittleLoss, Observer, Sketch, WeightedMse};
use crate::models::{Batch, Model};
use crate::optim::{orthonormal_transform, split_flat, Sofo, StepReport, TangentKind};
use crate::params::ParamSet;
use crate::{Error, Result};
use cudarc::driver::CudaSlice;
use sofo_ad::cuda::{CudaDual, CudaFwd};
use sofo_ad::cuda_rev::CudaRev;
use sofo_ad::layout::{split3, tangent_shape};
use sofo_ad::{Dual, Fwd, Var};
use sofo_tensor::cuda::{BlockStager, CudaDevice, DevTensor, GraphStats, MseSketch, PassGraph};
use sofo_tensor::rng;
use sofo_tensor::{Float, Tensor};
use std::sync::Arc;

/// Whether the device kernels compute this weighted MSE of an output of
/// `shape`: the target of that shape and no weights, or weights of the same
/// rank with one per row (size 1 on the last axis, the output's extents
/// before it) — as numpy broadcasting reads them on the CPU.
fn device_mse<T: Float>(m: &WeightedMse<T>, shape: &[usize]) -> bool {
    let r = shape.len();
    m.target.shape() == shape
        && m.weights.as_ref().is_none_or(|w| {
            r > 0 && w.rank() == r && w.shape()[r - 1] == 1 && w.shape()[..r - 1] == shape[..r - 1]
        })
}

/// A weighted MSE's target and weights (if any) in one upload: the buffer
/// and the target's length (the weights follow it).
fn upload_mse<T: Float>(dev: &CudaDevice, mse: &WeightedMse<T>) -> Result<(DevTensor, usize)> {
    let host: Vec<f32> = mse
        .target
        .data()
        .iter()
        .chain(mse.weights.iter().flat_map(|w| w.data()))
        .map(|v| v.to_f64() as f32)
        .collect();
    let len = host.len();
    Ok((
        dev.upload(&Tensor::from_vec(&[len], host)?)?,
        mse.target.numel(),
    ))
}

/// The sketch, accumulated in device memory (see
/// [`sofo_tensor::cuda::MseSketch`]).
pub struct CudaSketch<'a, T: Float> {
    dev: Arc<CudaDevice>,
    k: usize,
    acc: &'a mut MseSketch,
    /// Little losses outside the weighted-MSE family, sketched on the host
    /// from their downloaded outputs (correct, not fast).
    host: Sketch,
    /// The batch whose step losses are observed, if known: their targets
    /// and weights are then staged a chunk of steps at a time.
    staged: Option<StagedTargets<'a, T>>,
    /// Targets of one value throughout (a regulariser's zeros) on the
    /// device, by (value bits, length): copied once per pass, not per step.
    uniform: Vec<(u32, usize, DevTensor)>,
}

/// The one value all of `t` holds, if it does (as the device's f32).
fn uniform_value<T: Float>(t: &Tensor<T>) -> Option<f32> {
    let first = t.data().first()?;
    t.data()
        .iter()
        .all(|v| v == first)
        .then(|| first.to_f64() as f32)
}

/// A batch's targets and weights on the device a chunk of steps at a time
/// (one upload per chunk and array, not per observed step).
struct StagedTargets<'a, T: Float> {
    batch: &'a Batch<T>,
    /// The first step an observation may still come from.
    next: usize,
    targets: BlockStager,
    weights: BlockStager,
}

impl<'a, T: Float> StagedTargets<'a, T> {
    fn new(batch: &'a Batch<T>) -> Self {
        StagedTargets {
            batch,
            next: 0,
            targets: BlockStager::default(),
            weights: BlockStager::default(),
        }
    }

    /// Step t ≥ next whose loss `mse` is (the first observed step, when its
    /// target and weights hold exactly `mse`'s values), as device views of
    /// the target and the weights.
    fn find(
        &mut self,
        dev: &CudaDevice,
        mse: &WeightedMse<T>,
    ) -> Result<Option<(DevTensor, Option<DevTensor>)>> {
        let b = self.batch;
        let (m, n) = (b.trials, mse.target.numel());
        if n == 0 || b.targets.numel() != b.steps * n {
            return Ok(None);
        }
        let all = b.all();
        let Some(t) = (self.next..b.steps).find(|&t| all.observed(t)) else {
            return Ok(None);
        };
        let same = |whole: &[T], off: usize, part: &[T]| {
            whole.get(off..off + part.len()).is_some_and(|w| w == part)
        };
        if !same(b.targets.data(), t * n, mse.target.data()) {
            return Ok(None);
        }
        let w = match (&mse.weights, &b.weights) {
            (None, _) => None,
            (Some(w), Some(bw)) if w.numel() == m && same(bw.data(), t * m, w.data()) => {
                Some(self.weights.block(dev, bw.data(), t * m, &[m])?)
            }
            _ => return Ok(None),
        };
        let target = self.targets.block(dev, b.targets.data(), t * n, &[n])?;
        self.next = t + 1;
        Ok(Some((target, w)))
    }
}

impl<'a, T: Float> CudaSketch<'a, T> {
    /// Sketches into `acc` (emptied first).
    pub fn new(dev: Arc<CudaDevice>, k: usize, acc: &'a mut MseSketch) -> Result<Self> {
        dev.mse_sketch_reset(acc)?;
        Ok(CudaSketch {
            acc,
            host: Sketch::new(k),
            dev,
            k,
            staged: None,
            uniform: Vec::new(),
        })
    }

    /// Observations will be `batch`'s step losses, in order: their targets
    /// and weights are copied to the device a chunk of steps at a time (an
    /// observation that is not the next observed step's loss is uploaded on
    /// its own, as without this).
    pub fn staging(mut self, batch: &'a Batch<T>) -> Self {
        self.staged = Some(StagedTargets::new(batch));
        self
    }

    /// Multiplies out what the device buffer holds; what was sketched on
    /// the host.
    pub fn finish(self) -> Result<Sketch> {
        self.dev.mse_sketch_flush(self.acc)?;
        Ok(self.host)
    }
}

/// The device sketch read back (the pass's one wait for the device), with
/// the host's part added.
fn read_sketch(dev: &CudaDevice, acc: &mut MseSketch, host: &Sketch) -> Result<Sketch> {
    let (loss, c, g) = dev.mse_sketch_read(acc)?;
    let mut s = Sketch::new(acc.k());
    s.loss = loss;
    s.c = c;
    s.g = g;
    s.add(host);
    s.finish()
}

impl<T: Float> Observer<T, CudaFwd> for CudaSketch<'_, T> {
    fn observe(&mut self, _e: &mut CudaFwd, y: &CudaDual, loss: &dyn LittleLoss<T>) -> Result<()> {
        let shape = y.primal.shape();
        // the weighted MSE with one weight per row (or none) is sketched on
        // the device
        let on_device = loss.as_weighted_mse().filter(|m| device_mse(m, shape));
        let Some(mse) = on_device else {
            return self.observe_on_host(y, loss);
        };
        let staged = match self.staged.as_mut() {
            Some(s) => s.find(&self.dev, mse)?,
            None => None,
        };
        if let Some((target, w)) = staged {
            let w = w.as_ref().map(|w| w.slice().slice(..));
            return Ok(self.dev.mse_sketch_add(
                self.acc,
                &y.primal,
                y.tangent.as_ref(),
                &target.slice().slice(..),
                w.as_ref(),
                mse.n,
            )?);
        }
        if let (None, Some(c)) = (&mse.weights, uniform_value(&mse.target)) {
            let len = mse.target.numel();
            let i = match self
                .uniform
                .iter()
                .position(|u| (u.0, u.1) == (c.to_bits(), len))
            {
                Some(i) => i,
                None => {
                    let t = self.dev.upload(&Tensor::full(&[len], c))?;
                    self.uniform.push((c.to_bits(), len, t));
                    self.uniform.len() - 1
                }
            };
            let target = self.uniform[i].2.slice().slice(..);
            return Ok(self.dev.mse_sketch_add(
                self.acc,
                &y.primal,
                y.tangent.as_ref(),
                &target,
                None,
                mse.n,
            )?);
        }
        let (up, cols) = upload_mse(&self.dev, mse)?;
        let target = up.slice().slice(..cols);
        let w = (up.numel() > cols).then(|| up.slice().slice(cols..));
        self.dev.mse_sketch_add(
            self.acc,
            &y.primal,
            y.tangent.as_ref(),
            &target,
            w.as_ref(),
            mse.n,
        )?;
        Ok(())
    }
}

impl<T: Float> CudaSketch<'_, T> {
    /// Any other little loss (or weights not one per row): its output and
    /// tangents to the host, and the CPU's sketch of it.
    fn observe_on_host(&mut self, y: &CudaDual, loss: &dyn LittleLoss<T>) -> Result<()> {
        let d = Dual {
            primal: self.dev.download(&y.primal)?.convert::<T>(),
            tangent: match &y.tangent {
                Some(t) => Some(self.dev.download(t)?.convert::<T>()),
                None => None,
            },
        };
        Observer::<T, Fwd>::observe(&mut self.host, &mut Fwd::new(self.k), &d, loss)
    }
}

/// The parameters and their tangents uploaded as f32 duals (the inputs of
/// [`observe_pass_cuda`]).
pub fn upload_duals<T: Float>(dev: &Arc<CudaDevice>, params: &[Dual<T>]) -> Result<Vec<CudaDual>> {
    let e = CudaFwd::new(dev.clone(), 0);
    params
        .iter()
        .map(|p| {
            e.upload(&Dual {
                primal: p.primal.convert::<f32>(),
                tangent: p.tangent.as_ref().map(Tensor::convert::<f32>),
            })
        })
        .collect::<sofo_tensor::Result<_>>()
        .map_err(Into::into)
}

/// [`crate::device::Device::pass`] on a GPU: the whole batch in one group.
pub fn observe_pass_cuda<T: Float, M: Model<T>>(
    dev: &Arc<CudaDevice>,
    model: &M,
    k: usize,
    up: Vec<CudaDual>,
    batch: &Batch<T>,
) -> Result<Sketch> {
    let mut e = CudaFwd::new(dev.clone(), k);
    let prepared = model.prepare(&mut e, &up)?;
    let mut acc = dev.mse_sketch_new(k)?;
    let mut sk = CudaSketch::new(dev.clone(), k, &mut acc)?.staging(batch);
    model.run(&mut e, &prepared, &batch.all(), &mut sk)?;
    let host = sk.finish()?;
    read_sketch(dev, &mut acc, &host)
}

/// What a SOFO iteration keeps on the device between iterations: the graph
/// of its pass and the sketch the graph accumulates into.
struct SofoPass {
    graph: PassGraph,
    sketch: MseSketch,
}

/// How the SOFO iterations on this device ran their passes so far (call by
/// call, captured, replayed as a CUDA graph).
pub fn sofo_graph_stats(dev: &CudaDevice) -> GraphStats {
    dev.keep(
        "sofo_step",
        || Err(()),
        |sp: &mut SofoPass| Ok(sp.graph.stats()),
    )
    .unwrap_or_default()
}

/// One SOFO iteration with the tangents drawn, normalised and expanded on
/// the GPU: only G̃'s K×K eigenproblem, the K coefficients and the step Δ
/// cross to the host. (The device's random numbers differ from the CPU's:
/// same seed, same device, same numbers.)
pub fn sofo_step<T: Float, M: Model<T>>(
    sofo: &Sofo,
    dev: &Arc<CudaDevice>,
    model: &M,
    params: &mut ParamSet<T>,
    batch: &Batch<T>,
    seed: u64,
    iteration: u64,
) -> Result<StepReport> {
    let k = sofo.config.k;
    let p = params.trainable_count();
    // (timing its phases, each ends with the device synchronised)
    let sync = || -> Result<()> { Ok(dev.synchronize()?) };
    let mut laps = sofo.laps(sync)?;
    // 1. V [K, P]
    let mut v = dev.normal(&[k, p], seed, rng::substream(0x7A46, iteration))?;
    if params.has_frozen_entries() {
        // the directions live in the free entries only (as on the CPU):
        // V's frozen columns zeroed before it is normalised
        let free = params.free_count();
        if sofo.config.tangents != TangentKind::Raw && k > free {
            return Err(Error::config(
                "sofo.tangents",
                k,
                format!("K ≤ {free}, the trainable entries that are not frozen"),
            ));
        }
        let mut mask = vec![1f32; p];
        params.zero_frozen(&mut mask, 1);
        let mask = dev.upload(&Tensor::from_vec(&[p], mask)?)?;
        v = dev.scale_rows(&mask, &v, k, p)?;
    }
    if sofo.config.tangents != TangentKind::Raw {
        let g = dev.download(&dev.gram_rows(&v, k, p)?)?.to_f64_vec();
        let m: Vec<f64> = if sofo.config.tangents == TangentKind::UnitNorm {
            (0..k * k)
                .map(|i| {
                    if i / k == i % k {
                        1.0 / g[i].sqrt()
                    } else {
                        0.0
                    }
                })
                .collect()
        } else {
            orthonormal_transform(&g, k, p)?
        };
        let m = dev.upload(&Tensor::from_f64_slice(&[k, k], &m)?)?;
        let mut w = dev.scratch(&[k, p])?;
        dev.gemm(
            k,
            p,
            k,
            &m.slice().slice(..),
            &v.slice().slice(..),
            &mut w.slice_mut().slice_mut(..),
            1.0,
            0.0,
        )?;
        v = w;
    }
    laps.lap(sync, |s, t| s.draw_s += t)?;
    // 2–3. the parameters with their tangents in the engine's layout, the
    // pass and its sketch: recorded at the first iteration, a CUDA graph
    // from the second on while the pass stays the same (see
    // sofo_tensor::cuda::PassGraph)
    let pass = |v: &DevTensor, acc: &mut MseSketch| -> Result<Sketch> {
        let mut e = CudaFwd::new(dev.clone(), k);
        let mut duals = Vec::with_capacity(params.len());
        let mut off = 0;
        for prm in params.iter() {
            let primal = dev.upload(&prm.value.convert::<f32>())?;
            let tangent = if prm.mode.trainable() {
                let shape = prm.value.shape();
                let (a, _, l) = split3(shape, k);
                let t = dev.gather_param(v, p, off, a, k, l, &tangent_shape(shape, k))?;
                off += prm.value.numel();
                Some(t)
            } else {
                None
            };
            duals.push(CudaDual { primal, tangent });
        }
        let prepared = model.prepare(&mut e, &duals)?;
        let mut sk = CudaSketch::new(dev.clone(), k, acc)?.staging(batch);
        model.run(&mut e, &prepared, &batch.all(), &mut sk)?;
        sk.finish()
    };
    let sketch = dev.keep(
        "sofo_step",
        || {
            Ok::<_, Error>(SofoPass {
                graph: dev.pass_graph(),
                sketch: dev.mse_sketch_new(k)?,
            })
        },
        |sp| {
            if sp.sketch.k() != k {
                sp.sketch = dev.mse_sketch_new(k)?;
            }
            let SofoPass { graph, sketch } = sp;
            let host = dev.run_pass(graph, &[&v], |inputs| pass(inputs[0], sketch))?;
            read_sketch(dev, sketch, &host)
        },
    );
    laps.lap(sync, |s, t| s.pass_s += t)?;
    // 4. coefficients on the host, Δ = coeffᵀ V on the device
    let report = sofo.finish_step(params, sketch, |params, coeff| {
        let c = dev.upload(&Tensor::from_f64_slice(&[1, k], &coeff)?)?;
        let mut d = dev.scratch(&[1, p])?;
        dev.gemm(
            1,
            p,
            k,
            &c.slice().slice(..),
            &v.slice().slice(..),
            &mut d.slice_mut().slice_mut(..),
            1.0,
            0.0,
        )?;
        let flat = dev.download(&d)?.convert::<T>();
        split_flat(params, flat.data())
    })?;
    laps.end_iteration(sync)?;
    Ok(report)
}

/// Under reverse mode on the GPU, an observation adds the loss (on the
/// device for the weighted-MSE family, on the host for the others) and
/// records the seed ∂ℓ/∂y.
struct CudaSeeds<'a, T: Float> {
    dev: Arc<CudaDevice>,
    device_loss: CudaSlice<f64>,
    host_loss: f64,
    seeds: Vec<(Var, DevTensor)>,
    /// The batch's targets and weights, a chunk of steps at a time.
    staged: StagedTargets<'a, T>,
}

impl<T: Float> Observer<T, CudaRev> for CudaSeeds<'_, T> {
    fn observe(&mut self, e: &mut CudaRev, y: &Var, loss: &dyn LittleLoss<T>) -> Result<()> {
        let yv = e.value_of(y);
        let on_device = loss.as_weighted_mse().filter(|m| device_mse(m, yv.shape()));
        let seed = match on_device {
            Some(mse) => match self.staged.find(&self.dev, mse)? {
                Some((target, w)) => {
                    let w = w.as_ref().map(|w| w.slice().slice(..));
                    self.dev.mse_seed(
                        yv,
                        &target.slice().slice(..),
                        w.as_ref(),
                        mse.n,
                        &mut self.device_loss,
                    )?
                }
                None => {
                    let (up, cols) = upload_mse(&self.dev, mse)?;
                    let target = up.slice().slice(..cols);
                    let w = (up.numel() > cols).then(|| up.slice().slice(cols..));
                    self.dev
                        .mse_seed(yv, &target, w.as_ref(), mse.n, &mut self.device_loss)?
                }
            },
            None => {
                // any other little loss: its value and gradient on the host
                let host = self.dev.download(yv)?.convert::<T>();
                self.host_loss += loss.value(&host)?;
                self.dev.upload(&loss.gradient(&host)?.convert::<f32>())?
            }
        };
        self.seeds.push((y.clone(), seed));
        Ok(())
    }
}

/// [`crate::models::gradient_pass`] on a GPU: the loss and its BPTT
/// gradient, the whole batch on one device tape.
pub fn gradient_pass_cuda<T: Float, M: Model<T>>(
    dev: &Arc<CudaDevice>,
    model: &M,
    params: &ParamSet<T>,
    batch: &Batch<T>,
) -> Result<(f64, Vec<Tensor<T>>)> {
    let mut r = CudaRev::new(dev.clone());
    let leaves: Vec<Var> = params
        .iter()
        .map(|p| Ok(r.leaf(dev.upload(&p.value.convert::<f32>())?)))
        .collect::<Result<_>>()?;
    let prepared = model.prepare(&mut r, &leaves)?;
    let mut seeds = CudaSeeds {
        dev: dev.clone(),
        device_loss: dev.zeros_f64(1)?,
        host_loss: 0.0,
        seeds: vec![],
        staged: StagedTargets::new(batch),
    };
    model.run(&mut r, &prepared, &batch.all(), &mut seeds)?;
    drop(prepared);
    let g = r.backward(std::mem::take(&mut seeds.seeds))?;
    let loss = seeds.host_loss + dev.download_f64(&seeds.device_loss)?[0];
    let grads = leaves
        .iter()
        .zip(params.iter())
        .map(|(l, p)| match &g[l.id()] {
            Some(d) => Ok(dev.download(d)?.convert::<T>().reshape(p.value.shape())?),
            None => Ok(Tensor::zeros(p.value.shape())),
        })
        .collect::<Result<_>>()?;
    Ok((loss, grads))
}

#[cfg(test)]
mod tests {
    use super::device_mse;
    use crate::loss::WeightedMse;
    use sofo_tensor::Tensor;

    fn mse(target: &[usize], weights: Option<&[usize]>) -> WeightedMse<f32> {
        WeightedMse {
            target: Tensor::zeros(target),
            weights: weights.map(Tensor::zeros),
            n: 1.0,
        }
    }

    /// The device takes the weighted MSE only where its per-row weights
    /// mean what numpy broadcasting means on the CPU.
    #[test]
    fn the_device_takes_per_row_weights_only() {
        let y = [4, 3];
        assert!(device_mse(&mse(&y, None), &y));
        assert!(device_mse(&mse(&y, Some(&[4, 1])), &y));
        // [4] against [4, 3] broadcasts along the last axis on the CPU; here
        // it would be per column (and with 3 rows, ambiguous)
        assert!(!device_mse(&mse(&y, Some(&[4])), &y));
        assert!(!device_mse(&mse(&y, Some(&[1, 3])), &y));
        assert!(!device_mse(&mse(&y, Some(&[4, 3])), &y));
        assert!(!device_mse(&mse(&[4, 2], None), &y));
        assert!(device_mse(&mse(&[2, 4, 3], Some(&[2, 4, 1])), &[2, 4, 3]));
        assert!(!device_mse(&mse(&[], Some(&[])), &[]));
    }
}
