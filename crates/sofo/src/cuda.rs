//! SOFO passes on a GPU (feature `cuda`): the model runs under the device
//! forward-K engine and its little losses are sketched on the device in f64;
//! only the final (loss, C, G̃) comes back to the host.

use crate::loss::{LittleLoss, Observer, Sketch};
use crate::models::{Batch, Model};
use crate::{Error, Result};
use cudarc::driver::CudaSlice;
use sofo_ad::cuda::{CudaDual, CudaFwd};
use sofo_ad::Dual;
use sofo_tensor::cuda::CudaDevice;
use sofo_tensor::{Float, Tensor};
use std::sync::Arc;

/// The sketch, accumulated in device memory.
pub struct CudaSketch {
    dev: Arc<CudaDevice>,
    k: usize,
    loss: CudaSlice<f64>,
    c: CudaSlice<f64>,
    g: CudaSlice<f64>,
}

impl CudaSketch {
    pub fn new(dev: Arc<CudaDevice>, k: usize) -> Result<Self> {
        Ok(CudaSketch {
            loss: dev.zeros_f64(1)?,
            c: dev.zeros_f64(k)?,
            g: dev.zeros_f64(k * k)?,
            dev,
            k,
        })
    }

    /// Copies the sketch back (the one wait for the device in a pass).
    pub fn download(&self) -> Result<Sketch> {
        let mut s = Sketch::new(self.k);
        s.loss = self.dev.download_f64(&self.loss)?[0];
        if self.k > 0 {
            s.c = self.dev.download_f64(&self.c)?[..self.k].to_vec();
            s.g = self.dev.download_f64(&self.g)?[..self.k * self.k].to_vec();
        }
        s.finish()
    }
}

impl<T: Float> Observer<T, CudaFwd> for CudaSketch {
    fn observe(&mut self, _e: &mut CudaFwd, y: &CudaDual, loss: &dyn LittleLoss<T>) -> Result<()> {
        let mse = loss.as_weighted_mse().ok_or_else(|| {
            Error::config(
                "device",
                "cuda",
                "losses of the weighted-MSE family (other losses run on the cpu)",
            )
        })?;
        let shape = y.primal.shape();
        if mse.target.shape() != shape {
            return Err(sofo_tensor::TensorError::shape(
                "mse",
                format!("{:?}", mse.target.shape()),
                format!("{shape:?}"),
            )
            .into());
        }
        let rows = shape[..shape.len().saturating_sub(1)]
            .iter()
            .product::<usize>();
        let target = self.dev.upload(&mse.target.convert::<f32>())?;
        let w = match &mse.weights {
            None => None,
            Some(w)
                if w.numel() == rows && (w.rank() == 0 || w.shape()[0] == rows || rows == 1) =>
            {
                Some(self.dev.upload(&w.convert::<f32>().reshape(&[rows])?)?)
            }
            Some(w) => {
                return Err(Error::config(
                    "device",
                    "cuda",
                    format!(
                        "one loss weight per row ({rows}); got weights of shape {:?}",
                        w.shape()
                    ),
                ))
            }
        };
        self.dev.mse_sketch(
            &y.primal,
            y.tangent.as_ref(),
            &target,
            w.as_ref(),
            mse.n,
            self.k,
            &mut self.loss,
            &mut self.c,
            &mut self.g,
        )?;
        Ok(())
    }
}

/// [`crate::device::Device::pass`] on a GPU: the whole batch in one group.
pub fn observe_pass_cuda<T: Float, M: Model<T>>(
    dev: &Arc<CudaDevice>,
    model: &M,
    k: usize,
    params: &[Dual<T>],
    batch: &Batch<T>,
) -> Result<Sketch> {
    let mut e = CudaFwd::new(dev.clone(), k);
    let up: Vec<CudaDual> = params
        .iter()
        .map(|p| {
            e.upload(&Dual {
                primal: p.primal.convert::<f32>(),
                tangent: p.tangent.as_ref().map(Tensor::convert::<f32>),
            })
        })
        .collect::<sofo_tensor::Result<_>>()?;
    let prepared = model.prepare(&mut e, &up)?;
    let mut sk = CudaSketch::new(dev.clone(), k)?;
    model.run(&mut e, &prepared, &batch.all(), &mut sk)?;
    sk.download()
}
