//! Where a pass runs: the CPU, or a GPU with the `cuda` feature.

use crate::loss::Sketch;
use crate::models::{gradient_pass, observe_pass, Batch, Model};
use crate::params::ParamSet;
use crate::{Error, Result};
use sofo_ad::Dual;
use sofo_tensor::{Float, Tensor};

/// A pass's parameters and tangents where the device reads them
/// ([`Device::pass_inputs`]).
pub enum PassInputs<T: Float> {
    /// In host memory (the CPU).
    Host(Vec<Dual<T>>),
    /// Uploaded to a GPU.
    #[cfg(feature = "cuda")]
    Cuda(Vec<sofo_ad::cuda::CudaDual>),
}

#[derive(Clone, Default)]
pub enum Device {
    #[default]
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<sofo_tensor::cuda::CudaDevice>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl Device {
    /// `cpu`, `cuda` (= `cuda:0`) or `cuda:N`. Opening a GPU fails with a
    /// clear message where there is none, or where this build has no CUDA.
    pub fn open(spec: &str) -> Result<Device> {
        let bad = || Error::config("device", format!("\"{spec}\""), "cpu, cuda or cuda:N");
        if spec == "cpu" {
            return Ok(Device::Cpu);
        }
        let ordinal = match spec {
            "cuda" => 0,
            s => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(bad)?,
        };
        Self::open_cuda(spec, ordinal)
    }

    /// Checks a `gpu_matmul` setting for the device `spec` names: `f32`
    /// anywhere, `tf32` on a GPU. Returns whether it asks for TF32.
    pub fn check_gpu_matmul(spec: &str, gpu_matmul: &str) -> Result<bool> {
        match gpu_matmul {
            "f32" => Ok(false),
            "tf32" if spec != "cpu" => Ok(true),
            "tf32" => Err(Error::config(
                "gpu_matmul",
                "\"tf32\"",
                "f32 on the cpu (tf32 needs a GPU: --device cuda)",
            )),
            other => Err(Error::config(
                "gpu_matmul",
                format!("\"{other}\""),
                "f32 or tf32",
            )),
        }
    }

    /// [`Device::open`] with the precision of the GPU's f32 GEMMs: `f32`
    /// (the default) or `tf32` (TF32 tensor cores; a GPU only).
    pub fn open_with(spec: &str, gpu_matmul: &str) -> Result<Device> {
        let tf32 = Self::check_gpu_matmul(spec, gpu_matmul)?;
        let d = Self::open(spec)?;
        #[cfg(feature = "cuda")]
        if let (true, Device::Cuda(c)) = (tf32, &d) {
            c.set_tf32(true)?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = tf32;
        Ok(d)
    }

    #[cfg(feature = "cuda")]
    fn open_cuda(_spec: &str, ordinal: usize) -> Result<Device> {
        Ok(Device::Cuda(sofo_tensor::cuda::CudaDevice::open(ordinal)?))
    }

    #[cfg(not(feature = "cuda"))]
    fn open_cuda(spec: &str, _ordinal: usize) -> Result<Device> {
        Err(Error::config(
            "device",
            format!("\"{spec}\""),
            "cpu only: this sofo was built without CUDA (rebuild with `cargo build --release --features cuda`)",
        ))
    }

    /// "cpu" or "cuda:N (GPU name)".
    pub fn describe(&self) -> String {
        match self {
            Device::Cpu => "cpu".into(),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => format!(
                "cuda:{} ({}{}{})",
                d.ordinal(),
                d.name(),
                if d.tf32() { ", TF32 GEMMs" } else { "" },
                match d.dense_linear() {
                    sofo_tensor::cuda::DenseLinear::Auto => "",
                    sofo_tensor::cuda::DenseLinear::Fused => ", SOFO_GPU_LINEAR=fused",
                    sofo_tensor::cuda::DenseLinear::Gemm => ", SOFO_GPU_LINEAR=gemm",
                }
            ),
        }
    }

    /// One forward pass with `k` tangents (`k = 0`: primal only) on this
    /// device, and the sketch of its observed losses.
    pub fn pass<T: Float, M: Model<T>>(
        &self,
        model: &M,
        k: usize,
        params: Vec<Dual<T>>,
        batch: &Batch<T>,
    ) -> Result<Sketch> {
        let inputs = self.pass_inputs(params)?;
        self.pass_with(model, k, inputs, batch)
    }

    /// The parameters and their tangents where a pass on this device reads
    /// them: on a GPU uploaded (the K tangents of a large weight are tens
    /// of megabytes: timing [`Device::pass_with`] leaves their copy out,
    /// as a SOFO iteration, which draws them on the device, has none).
    pub fn pass_inputs<T: Float>(&self, params: Vec<Dual<T>>) -> Result<PassInputs<T>> {
        match self {
            Device::Cpu => Ok(PassInputs::Host(params)),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => Ok(PassInputs::Cuda(crate::cuda::upload_duals(d, &params)?)),
        }
    }

    /// [`Device::pass`] from inputs [`Device::pass_inputs`] made for this
    /// device.
    pub fn pass_with<T: Float, M: Model<T>>(
        &self,
        model: &M,
        k: usize,
        inputs: PassInputs<T>,
        batch: &Batch<T>,
    ) -> Result<Sketch> {
        match (self, inputs) {
            (Device::Cpu, PassInputs::Host(params)) => observe_pass(model, k, params, batch),
            #[cfg(feature = "cuda")]
            (Device::Cuda(d), PassInputs::Cuda(up)) => {
                crate::cuda::observe_pass_cuda(d, model, k, up, batch)
            }
            #[cfg(feature = "cuda")]
            _ => Err(Error::config(
                "pass inputs",
                "made for another device",
                "Device::pass_inputs of the device that runs the pass",
            )),
        }
    }

    /// The loss and its gradient by backpropagation through time, on this
    /// device (the CPU splits the trials over its threads; a GPU runs them
    /// on one tape).
    pub fn gradient<T: Float, M: Model<T>>(
        &self,
        model: &M,
        params: &ParamSet<T>,
        batch: &Batch<T>,
    ) -> Result<(f64, Vec<Tensor<T>>)> {
        match self {
            Device::Cpu => gradient_pass(model, params, batch),
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => crate::cuda::gradient_pass_cuda(d, model, params, batch),
        }
    }
}
