//! Weights as safetensors, written atomically (temporary file, then rename).

use crate::params::ParamSet;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sofo_tensor::{DType, Float, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Writes `data` to `path` through a temporary file in the same directory
/// and a rename, so a crash never leaves a half-written file behind.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, data)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn to_bytes<T: Float>(t: &Tensor<T>) -> Vec<u8> {
    match T::DTYPE {
        DType::F32 => t
            .data()
            .iter()
            .flat_map(|v| (v.to_f64() as f32).to_le_bytes())
            .collect(),
        DType::F64 => t
            .data()
            .iter()
            .flat_map(|v| v.to_f64().to_le_bytes())
            .collect(),
    }
}

/// Saves every tensor of `params` under its name. Refuses non-finite values.
pub fn save<T: Float>(params: &ParamSet<T>, path: &Path) -> Result<()> {
    if !params.all_finite() {
        return Err(Error::NonFinite(
            "refusing to save non-finite weights".into(),
        ));
    }
    let dtype = match T::DTYPE {
        DType::F32 => Dtype::F32,
        DType::F64 => Dtype::F64,
    };
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = params
        .iter()
        .map(|p| (p.name.clone(), p.value.shape().to_vec(), to_bytes(&p.value)))
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(n, s, b)| {
            TensorView::new(dtype, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Checkpoint(format!("{e}")))
        })
        .collect::<Result<_>>()?;
    let meta: HashMap<String, String> = [("format".to_string(), "sofo".to_string())].into();
    let data =
        safetensors::serialize(views, Some(meta)).map_err(|e| Error::Checkpoint(format!("{e}")))?;
    write_atomic(path, &data)
}

/// Reads every tensor of a safetensors file (f32 or f64), converted to `T`.
pub fn load<T: Float>(path: &Path) -> Result<Vec<(String, Tensor<T>)>> {
    let data =
        std::fs::read(path).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    let st = SafeTensors::deserialize(&data)
        .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
    let mut out = Vec::new();
    let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    names.sort();
    for name in names {
        let v = st
            .tensor(&name)
            .map_err(|e| Error::Checkpoint(format!("{e}")))?;
        let vals: Vec<T> = match v.dtype() {
            Dtype::F32 => v
                .data()
                .chunks_exact(4)
                .map(|c| T::from_f64(f32::from_le_bytes(c.try_into().unwrap()) as f64))
                .collect(),
            Dtype::F64 => v
                .data()
                .chunks_exact(8)
                .map(|c| T::from_f64(f64::from_le_bytes(c.try_into().unwrap())))
                .collect(),
            other => {
                return Err(Error::Checkpoint(format!(
                    "tensor `{name}` has dtype {other:?}; allowed F32 or F64"
                )))
            }
        };
        out.push((name.clone(), Tensor::from_vec(v.shape(), vals)?));
    }
    Ok(out)
}

/// Loads a checkpoint into `params` (names and shapes must match).
pub fn load_into<T: Float>(params: &mut ParamSet<T>, path: &Path) -> Result<()> {
    let tensors = load::<T>(path)?;
    params.assign(&tensors)
}
