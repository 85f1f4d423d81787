//! Named parameter tensors and how the optimiser may move them.

use crate::{Error, Result};
use sofo_tensor::{Float, Tensor};

/// How an optimiser treats a parameter tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ParamMode {
    /// Updated by every step.
    Free,
    /// Never updated (no tangents are drawn for it); still part of the model.
    Pinned,
    /// Updated, then projected back into [lower, upper].
    Bounded { lower: f64, upper: f64 },
}

impl ParamMode {
    pub fn trainable(&self) -> bool {
        !matches!(self, ParamMode::Pinned)
    }
}

#[derive(Debug, Clone)]
pub struct Param<T: Float> {
    pub name: String,
    pub value: Tensor<T>,
    pub mode: ParamMode,
}

/// The parameters of a model, in a fixed order.
#[derive(Debug, Clone)]
pub struct ParamSet<T: Float> {
    params: Vec<Param<T>>,
    /// Per tensor, the entries no optimiser may move (`true` = frozen).
    frozen: Vec<Option<Vec<bool>>>,
}

impl<T: Float> ParamSet<T> {
    pub fn new(params: Vec<Param<T>>) -> Self {
        let frozen = vec![None; params.len()];
        ParamSet { params, frozen }
    }
    /// Per-element trainability of the tensor `name`: entries where
    /// `trainable` is false are frozen. SOFO and FGD draw no tangent
    /// component along them, and [`ParamSet::apply_updates`] leaves them
    /// bit-identical whatever the optimiser proposes.
    pub fn set_trainable_entries(&mut self, name: &str, trainable: &[bool]) -> Result<()> {
        let names: Vec<String> = self.params.iter().map(|p| p.name.clone()).collect();
        let i = self
            .params
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::config("parameter", name, format!("one of {names:?}")))?;
        let numel = self.params[i].value.numel();
        if trainable.len() != numel {
            return Err(Error::config(
                format!("trainable entries of {name}"),
                format!("{} entries", trainable.len()),
                format!("{numel} (shape {:?})", self.params[i].value.shape()),
            ));
        }
        self.frozen[i] = Some(trainable.iter().map(|&t| !t).collect());
        Ok(())
    }
    /// The frozen entries of the tensor `name`, if any were set.
    pub fn frozen_entries(&self, name: &str) -> Option<&[bool]> {
        let i = self.params.iter().position(|p| p.name == name)?;
        self.frozen[i].as_deref()
    }
    /// Zeroes, in K directions `flat` [K, P] over the trainable scalars,
    /// the components along frozen entries.
    pub fn zero_frozen<F: Float>(&self, flat: &mut [F], k: usize) {
        let p = self.trainable_count();
        let mut off = 0;
        for (prm, fr) in self.params.iter().zip(&self.frozen) {
            if !prm.mode.trainable() {
                continue;
            }
            if let Some(fr) = fr {
                for row in 0..k {
                    for (j, &f) in fr.iter().enumerate() {
                        if f {
                            flat[row * p + off + j] = F::zero();
                        }
                    }
                }
            }
            off += prm.value.numel();
        }
    }
    pub fn iter(&self) -> impl Iterator<Item = &Param<T>> {
        self.params.iter()
    }
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Param<T>> {
        self.params.iter_mut()
    }
    pub fn len(&self) -> usize {
        self.params.len()
    }
    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }
    pub fn get(&self, name: &str) -> Option<&Param<T>> {
        self.params.iter().find(|p| p.name == name)
    }
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Param<T>> {
        self.params.iter_mut().find(|p| p.name == name)
    }
    /// P: the number of trainable scalars.
    /// Trainable scalars that may move: [`ParamSet::trainable_count`] less
    /// the frozen entries (the dimension SOFO's and FGD's directions span).
    pub fn free_count(&self) -> usize {
        self.params
            .iter()
            .zip(&self.frozen)
            .filter(|(p, _)| p.mode.trainable())
            .map(|(p, fr)| match fr {
                Some(fr) => fr.iter().filter(|&&f| !f).count(),
                None => p.value.numel(),
            })
            .sum()
    }
    /// Whether any entry of a trainable tensor is frozen.
    pub fn has_frozen_entries(&self) -> bool {
        self.free_count() != self.trainable_count()
    }
    pub fn trainable_count(&self) -> usize {
        self.params
            .iter()
            .filter(|p| p.mode.trainable())
            .map(|p| p.value.numel())
            .sum()
    }
    /// Sets the mode of the tensor `name`.
    pub fn set_mode(&mut self, name: &str, mode: ParamMode) -> Result<()> {
        let names: Vec<String> = self.params.iter().map(|p| p.name.clone()).collect();
        let p = self
            .get_mut(name)
            .ok_or_else(|| Error::config("parameter", name, format!("one of {names:?}")))?;
        if let ParamMode::Bounded { lower, upper } = mode {
            if lower.is_nan() || upper.is_nan() || lower > upper {
                return Err(Error::config(
                    format!("bounds of {name}"),
                    format!("[{lower}, {upper}]"),
                    "lower ≤ upper",
                ));
            }
        }
        p.mode = mode;
        Ok(())
    }
    /// Replaces values with those of `other` (same names and shapes).
    pub fn assign(&mut self, other: &[(String, Tensor<T>)]) -> Result<()> {
        for (name, t) in other {
            let p = self
                .get_mut(name)
                .ok_or_else(|| Error::Checkpoint(format!("unknown tensor `{name}`")))?;
            if p.value.shape() != t.shape() {
                return Err(Error::Checkpoint(format!(
                    "tensor `{name}` has shape {:?}, the model expects {:?}",
                    t.shape(),
                    p.value.shape()
                )));
            }
            p.value = t.clone();
        }
        Ok(())
    }
    /// θ ← θ − scale · u for every tensor with an update (`None`: left as
    /// is), bounded tensors projected back, frozen entries left as they
    /// are (bit for bit); all or nothing: if any new value
    /// would be non-finite, nothing changes and the error names the tensor.
    pub fn apply_updates(&mut self, updates: &[Option<Tensor<T>>], scale: T) -> Result<()> {
        let mut new = Vec::with_capacity(updates.len());
        for ((p, u), fr) in self.params.iter().zip(updates).zip(&self.frozen) {
            let Some(u) = u else {
                new.push(None);
                continue;
            };
            let mut v = p.value.clone();
            v.axpy(-scale, u)?;
            if let ParamMode::Bounded { lower, upper } = p.mode {
                let (lo, hi) = (T::from_f64(lower), T::from_f64(upper));
                v.data_mut().iter_mut().for_each(|x| *x = x.max(lo).min(hi));
            }
            if let Some(fr) = fr {
                for ((x, &old), &f) in v.data_mut().iter_mut().zip(p.value.data()).zip(fr) {
                    if f {
                        *x = old;
                    }
                }
            }
            if !v.is_finite() {
                return Err(Error::NonFinite(format!("updated parameter `{}`", p.name)));
            }
            new.push(Some(v));
        }
        for (p, v) in self.params.iter_mut().zip(new) {
            if let Some(v) = v {
                p.value = v;
            }
        }
        Ok(())
    }

    pub fn all_finite(&self) -> bool {
        self.params.iter().all(|p| p.value.is_finite())
    }
}
