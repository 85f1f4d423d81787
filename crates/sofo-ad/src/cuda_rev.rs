//! Reverse mode on the GPU (feature `cuda`): the tape of [`crate::Rev`] with
//! its values in device memory, for the BPTT baselines (Adam, SGD) on a GPU.
//!
//! Values are computed by the device forward engine without tangents
//! ([`CudaFwd`] with K = 0), so every op the models use in their time loops
//! runs on the device forwards. Backwards, the hot rules run on the device
//! from kernels like the forward engine's (φ′ ⊙ gy in one pass, the
//! product rules of `binary_tangent`, cuBLAS GEMMs with transposed operands
//! for `linear`, column sums as GEMMs against a row of ones, column slices for
//! last-axis concat, a pointwise program's whole reverse sweep in one
//! kernel). Any other rule (broadcasting binary ops, general
//! matmul, sums, slices, softmax) replays the op on a one-op CPU tape
//! ([`crate::Rev`]) and copies the gradients back: the CPU's rules, exactly,
//! at the cost of a round trip; the models use those ops outside their
//! time loops.
//!
//! The tape holds every value, so its device memory grows with T, as BPTT
//! does on any device.

use crate::cuda::{binary_code, code, program_code, CudaDual, CudaFwd};
use crate::ops::{Binary, Ops, Unary};
use crate::pointwise::Pointwise;
use crate::reverse::Op;
use crate::{Rev, Var};
use sofo_tensor::cuda::{BinaryCode, CudaDevice, DevTensor, ProgramWords, UnaryCode};
use sofo_tensor::{Float, Result, Tensor, TensorError};
use std::sync::Arc;

struct Node {
    value: CudaDual,
    op: Op<f32>,
    needs_grad: bool,
}

/// The reverse-mode engine on a GPU (f32): owns the tape.
pub struct CudaRev {
    fwd: CudaFwd,
    nodes: Vec<Node>,
    /// A row of ones, for column sums as GEMMs (grown on demand; a longer
    /// row serves: the GEMM reads the first `rows`).
    ones: Option<DevTensor>,
}

fn last(shape: &[usize]) -> usize {
    shape.last().copied().unwrap_or(1).max(1)
}

impl CudaRev {
    pub fn new(dev: Arc<CudaDevice>) -> Self {
        CudaRev {
            fwd: CudaFwd::new(dev, 0),
            nodes: Vec::new(),
            ones: None,
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        self.fwd.device()
    }

    /// A value whose gradient is wanted (a parameter).
    pub fn leaf(&mut self, value: DevTensor) -> Var {
        self.push(
            CudaDual {
                primal: value,
                tangent: None,
            },
            Op::Leaf,
            true,
        )
    }

    /// The value of a node, in device memory.
    pub fn value_of(&self, v: &Var) -> &DevTensor {
        &self.nodes[v.id].value.primal
    }

    fn push(&mut self, value: CudaDual, op: Op<f32>, needs_grad: bool) -> Var {
        let shape = value.primal.shape().to_vec();
        self.nodes.push(Node {
            value,
            op,
            needs_grad,
        });
        Var {
            id: self.nodes.len() - 1,
            shape,
        }
    }

    fn needs(&self, ids: &[usize]) -> bool {
        ids.iter().any(|&i| self.nodes[i].needs_grad)
    }

    fn val(&self, id: usize) -> &DevTensor {
        &self.nodes[id].value.primal
    }

    /// Backpropagates the output gradients `seeds` (node, ∂c/∂node) through
    /// the tape, as [`Rev::backward`]: returns, indexed by node, the gradient
    /// of every leaf that needs one. Seeds for the same node add up.
    pub fn backward(&mut self, seeds: Vec<(Var, DevTensor)>) -> Result<Vec<Option<DevTensor>>> {
        let mut g: Vec<Option<DevTensor>> = (0..self.nodes.len()).map(|_| None).collect();
        for (v, s) in seeds {
            if s.shape() != v.shape.as_slice() {
                return Err(TensorError::shape(
                    "backward seed",
                    format!("{:?}", v.shape),
                    format!("{:?}", s.shape()),
                ));
            }
            self.accumulate(&mut g, v.id, s)?;
        }
        for id in (0..self.nodes.len()).rev() {
            let Some(gy) = g[id].take() else { continue };
            self.backprop(id, &gy, &mut g)?;
            if matches!(self.nodes[id].op, Op::Leaf) {
                g[id] = Some(gy);
            }
        }
        Ok(g)
    }

    fn accumulate(&self, g: &mut [Option<DevTensor>], to: usize, t: DevTensor) -> Result<()> {
        if !self.nodes[to].needs_grad {
            return Ok(());
        }
        g[to] = Some(match g[to].take() {
            None => t,
            Some(s) => {
                let t = t.reshape(s.shape())?;
                self.device().binary(&s, &t, BinaryCode::Add)?
            }
        });
        Ok(())
    }

    /// Adds `alpha · op(a) · op(b)` ([m, n]) to the gradient of node `to`
    /// (of `shape`): one GEMM straight into the gradient already there
    /// (β = 1), so a weight used at every time step gathers its T terms
    /// without a temporary or an addition per step.
    fn accumulate_gemm(
        &self,
        g: &mut [Option<DevTensor>],
        to: usize,
        (m, n, k): (usize, usize, usize),
        a: (&DevTensor, bool),
        b: (&DevTensor, bool),
        alpha: f32,
    ) -> Result<()> {
        if !self.nodes[to].needs_grad {
            return Ok(());
        }
        let dev = self.device();
        let (mut out, beta) = match g[to].take() {
            Some(s) if s.numel() == m * n => (s, 1.0),
            other => {
                // none yet (or one that cannot take a GEMM): a fresh buffer,
                // added to any other the ordinary way
                let fresh = dev.scratch(self.val(to).shape())?;
                g[to] = other;
                (fresh, 0.0)
            }
        };
        dev.gemm_t(
            m,
            n,
            k,
            (&a.0.slice().slice(..), a.1),
            (&b.0.slice().slice(..), b.1),
            &mut out.slice_mut().slice_mut(..),
            alpha,
            beta,
        )?;
        self.accumulate(g, to, out)
    }

    /// Makes the row of ones (column sums as GEMMs) at least `rows` long.
    fn ensure_ones(&mut self, rows: usize) -> Result<()> {
        if self.ones.as_ref().is_none_or(|o| o.numel() < rows) {
            let dev = self.device().clone();
            self.ones = Some(dev.upload(&Tensor::from_vec(&[rows], vec![1f32; rows])?)?);
        }
        Ok(())
    }

    /// A rank-2 transpose on the device.
    fn transposed(&self, x: &DevTensor) -> Result<DevTensor> {
        let (r, l) = (x.shape()[0], x.shape()[1]);
        self.device().permute_210(x, r, 1, l, &[l, r])
    }

    fn backprop(&mut self, id: usize, gy: &DevTensor, g: &mut [Option<DevTensor>]) -> Result<()> {
        let dev = self.device().clone();
        let yshape = self.val(id).shape().to_vec();
        let op = match &self.nodes[id].op {
            Op::Leaf => return Ok(()),
            op @ (Op::Unary(..)
            | Op::Binary(..)
            | Op::Linear { .. }
            | Op::Concat(..)
            | Op::Reshape(_)
            | Op::Transpose(..)
            | Op::Broadcast(_)
            | Op::Pointwise(..)) => op.clone(),
            _ => return self.on_host(id, gy, g),
        };
        match op {
            Op::Unary(x, u) => {
                let (c, s) = code(u);
                let gx = dev.unary_grad(self.val(x), gy, c, s)?;
                self.accumulate(g, x, gx)?;
            }
            Op::Binary(a, b, o) => {
                if self.val(a).shape() != yshape.as_slice()
                    || self.val(b).shape() != yshape.as_slice()
                {
                    return self.on_host(id, gy, g);
                }
                let c = binary_code(o);
                if self.nodes[a].needs_grad {
                    let ga = dev.binary_tangent(self.val(a), self.val(b), Some(gy), None, c)?;
                    self.accumulate(g, a, ga)?;
                }
                if self.nodes[b].needs_grad {
                    let gb = dev.binary_tangent(self.val(a), self.val(b), None, Some(gy), c)?;
                    self.accumulate(g, b, gb)?;
                }
            }
            Op::Linear {
                leak,
                scale,
                terms,
                bias,
            } => {
                let n = last(&yshape);
                let rows = gy.numel() / n;
                if let Some((x, c)) = leak {
                    if self.nodes[x].needs_grad {
                        let (gx, _) = dev.unary(gy, UnaryCode::MulScalar, c, false)?;
                        let gx = gx.reshape(self.val(x).shape())?;
                        self.accumulate(g, x, gx)?;
                    }
                }
                for (a, w) in terms {
                    let k = self.val(w).shape()[0];
                    // s · gy [rows, n] · Wᵀ [n, k] and s · aᵀ [k, rows] · gy [rows, n]
                    let (av, wv) = (self.val(a), self.val(w));
                    self.accumulate_gemm(g, a, (rows, k, n), (gy, false), (wv, true), scale)?;
                    self.accumulate_gemm(g, w, (k, n, rows), (av, true), (gy, false), scale)?;
                }
                if let Some(b) = bias {
                    // s · onesᵀ [1, rows] · gy [rows, n]
                    self.ensure_ones(rows)?;
                    let ones = self.ones.as_ref().expect("made above");
                    self.accumulate_gemm(g, b, (1, n, rows), (ones, false), (gy, false), scale)?;
                }
            }
            Op::Concat(xs, axis) => {
                let rank = yshape.len();
                if axis + 1 != rank || xs.iter().any(|&x| self.val(x).shape().len() != rank) {
                    return self.on_host(id, gy, g);
                }
                let mut start = 0;
                for x in xs {
                    let shape = self.val(x).shape().to_vec();
                    if self.nodes[x].needs_grad {
                        let gx = dev.take_columns(gy, start, &shape)?;
                        self.accumulate(g, x, gx)?;
                    }
                    start += shape[axis];
                }
            }
            Op::Reshape(x) => {
                let gx = gy.clone().reshape(self.val(x).shape())?;
                self.accumulate(g, x, gx)?;
            }
            Op::Transpose(x, a, b) => {
                if yshape.len() != 2 || a == b {
                    return self.on_host(id, gy, g);
                }
                let gx = self.transposed(gy)?;
                self.accumulate(g, x, gx)?;
            }
            Op::Broadcast(x) => {
                let xs = self.val(x).shape().to_vec();
                if !(xs.len() == 1 && yshape.len() == 2 && yshape[1] == xs[0]) {
                    return self.on_host(id, gy, g);
                }
                let rows = yshape[0];
                self.ensure_ones(rows)?;
                let ones = self.ones.as_ref().expect("made above");
                self.accumulate_gemm(g, x, (1, xs[0], rows), (ones, false), (gy, false), 1.0)?;
            }
            Op::Pointwise(xs, program) => {
                let shapes: Vec<&[usize]> = xs.iter().map(|&x| self.val(x).shape()).collect();
                let (l, _) = program.layout(&shapes)?;
                let want: Vec<bool> = xs.iter().map(|&x| self.nodes[x].needs_grad).collect();
                let column_wants: Vec<bool> = xs
                    .iter()
                    .zip(&want)
                    .flat_map(|(&x, &w)| std::iter::repeat_n(w, last(self.val(x).shape()) / l))
                    .collect();
                let gmask = program
                    .tangent_registers(&column_wants)
                    .iter()
                    .enumerate()
                    .fold(0u64, |m, (i, &h)| m | ((h as u64) << i));
                let inputs: Vec<(&DevTensor, bool)> = xs
                    .iter()
                    .zip(&want)
                    .map(|(&x, &w)| (self.val(x), w))
                    .collect();
                let words = program.words(program_code);
                let prog = ProgramWords {
                    words,
                    inputs: program.inputs(),
                    steps: program.steps().len(),
                };
                let grads = dev.pointwise_grad(prog, &inputs, gy, l, gmask)?;
                for (x, gx) in xs.into_iter().zip(grads) {
                    if let Some(gx) = gx {
                        self.accumulate(g, x, gx)?;
                    }
                }
            }
            _ => unreachable!("the other ops went to the host above"),
        }
        Ok(())
    }

    /// The rule of node `id` on the CPU: its inputs and `gy` downloaded, the
    /// op replayed on a one-op tape, the inputs' gradients uploaded.
    fn on_host(&mut self, id: usize, gy: &DevTensor, g: &mut [Option<DevTensor>]) -> Result<()> {
        let dev = self.device().clone();
        let inputs: Vec<usize> = match &self.nodes[id].op {
            Op::Leaf => vec![],
            Op::Unary(x, _)
            | Op::Sum(x, _)
            | Op::Slice(x, _, _)
            | Op::Reshape(x)
            | Op::Transpose(x, _, _)
            | Op::Broadcast(x)
            | Op::Softmax(x)
            | Op::LogSoftmax(x) => vec![*x],
            Op::Binary(a, b, _) | Op::Matmul(a, b) => vec![*a, *b],
            Op::Concat(xs, _) => xs.clone(),
            Op::Linear { .. } | Op::Pointwise(..) => {
                unreachable!("linear ops and programs run on the device")
            }
        };
        let yshape = self.val(id).shape().to_vec();
        let mut r = Rev::<f32>::new();
        let leaves: Vec<Var> = inputs
            .iter()
            .map(|&i| Ok(r.leaf(dev.download(self.val(i))?)))
            .collect::<Result<_>>()?;
        let out = match &self.nodes[id].op {
            Op::Unary(_, u) => r.unary(&leaves[0], *u)?,
            Op::Binary(_, _, o) => r.binary(&leaves[0], &leaves[1], *o)?,
            Op::Matmul(..) => r.matmul(&leaves[0], &leaves[1])?,
            Op::Sum(_, axes) => r.sum(&leaves[0], axes)?,
            Op::Concat(_, axis) => {
                let refs: Vec<&Var> = leaves.iter().collect();
                r.concat(&refs, *axis)?
            }
            Op::Slice(_, axis, start) => r.slice(&leaves[0], *axis, *start, yshape[*axis])?,
            Op::Reshape(_) => r.reshape(&leaves[0], &yshape)?,
            Op::Transpose(_, a, b) => r.transpose(&leaves[0], *a, *b)?,
            Op::Broadcast(_) => r.broadcast_to(&leaves[0], &yshape)?,
            Op::Softmax(_) => r.softmax(&leaves[0])?,
            Op::LogSoftmax(_) => r.log_softmax(&leaves[0])?,
            Op::Leaf | Op::Linear { .. } | Op::Pointwise(..) => {
                unreachable!("leaves, linear ops and programs stay on the device")
            }
        };
        let grads = r.backward(vec![(out, dev.download(gy)?)])?;
        for (leaf, &i) in leaves.iter().zip(&inputs) {
            if let Some(gx) = &grads[leaf.id] {
                if self.nodes[i].needs_grad {
                    let up = dev.upload(gx)?;
                    self.accumulate(g, i, up)?;
                }
            }
        }
        Ok(())
    }
}

fn f32_of<T: Float>(x: T) -> f32 {
    x.to_f64() as f32
}

/// A node's value as the forward engine's operand.
macro_rules! v {
    ($nodes:expr, $var:expr) => {
        &$nodes[$var.id].value
    };
}

impl<T: Float> Ops<T> for CudaRev {
    type V = Var;

    fn constant(&mut self, t: Tensor<T>) -> Result<Var> {
        let v = Ops::<T>::constant(&mut self.fwd, t)?;
        Ok(self.push(v, Op::Leaf, false))
    }

    fn block_steps(&self, block_len: usize) -> usize {
        Ops::<T>::block_steps(&self.fwd, block_len)
    }

    /// A view of the forward engine's staged chunk (the tape keeps the
    /// chunk alive while a value needs it).
    fn constant_block(&mut self, whole: &Tensor<T>, offset: usize, shape: &[usize]) -> Result<Var> {
        let v = Ops::<T>::constant_block(&mut self.fwd, whole, offset, shape)?;
        Ok(self.push(v, Op::Leaf, false))
    }

    fn shape<'a>(&self, v: &'a Var) -> &'a [usize] {
        &v.shape
    }

    fn to_host(&mut self, v: &Var) -> Result<Tensor<T>> {
        Ops::<T>::to_host(&mut self.fwd, v!(self.nodes, v))
    }

    fn unary(&mut self, x: &Var, op: Unary) -> Result<Var> {
        let y = Ops::<T>::unary(&mut self.fwd, v!(self.nodes, x), op)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Unary(x.id, op), ng))
    }

    fn binary(&mut self, a: &Var, b: &Var, op: Binary) -> Result<Var> {
        let y = Ops::<T>::binary(&mut self.fwd, v!(self.nodes, a), v!(self.nodes, b), op)?;
        let ng = self.needs(&[a.id, b.id]);
        Ok(self.push(y, Op::Binary(a.id, b.id, op), ng))
    }

    fn matmul(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let y = Ops::<T>::matmul(&mut self.fwd, v!(self.nodes, a), v!(self.nodes, b))?;
        let ng = self.needs(&[a.id, b.id]);
        Ok(self.push(y, Op::Matmul(a.id, b.id), ng))
    }

    fn linear(
        &mut self,
        leak: Option<(&Var, T)>,
        scale: T,
        terms: &[(&Var, &Var)],
        bias: Option<&Var>,
    ) -> Result<Var> {
        let nodes = &self.nodes;
        let dual_terms: Vec<(&CudaDual, &CudaDual)> = terms
            .iter()
            .map(|(a, w)| (v!(nodes, a), v!(nodes, w)))
            .collect();
        let y = Ops::<T>::linear(
            &mut self.fwd,
            leak.map(|(x, c)| (v!(nodes, x), c)),
            scale,
            &dual_terms,
            bias.map(|b| v!(nodes, b)),
        )?;
        let mut ids: Vec<usize> = terms.iter().flat_map(|(a, w)| [a.id, w.id]).collect();
        ids.extend(bias.map(|b| b.id));
        ids.extend(leak.map(|(x, _)| x.id));
        let ng = self.needs(&ids);
        let op = Op::Linear {
            leak: leak.map(|(x, c)| (x.id, f32_of(c))),
            scale: f32_of(scale),
            terms: terms.iter().map(|(a, w)| (a.id, w.id)).collect(),
            bias: bias.map(|b| b.id),
        };
        Ok(self.push(y, op, ng))
    }

    fn sum(&mut self, x: &Var, axes: &[usize]) -> Result<Var> {
        let y = Ops::<T>::sum(&mut self.fwd, v!(self.nodes, x), axes)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Sum(x.id, axes.to_vec()), ng))
    }

    fn concat(&mut self, xs: &[&Var], axis: usize) -> Result<Var> {
        let nodes = &self.nodes;
        let parts: Vec<&CudaDual> = xs.iter().map(|x| v!(nodes, x)).collect();
        let y = Ops::<T>::concat(&mut self.fwd, &parts, axis)?;
        let ids: Vec<usize> = xs.iter().map(|v| v.id).collect();
        let ng = self.needs(&ids);
        Ok(self.push(y, Op::Concat(ids, axis), ng))
    }

    /// One node for the program: its value in one kernel, its reverse rule
    /// in one (a program over the kernels' limits is recorded op by op).
    fn pointwise(&mut self, program: &Pointwise, xs: &[&Var]) -> Result<Var> {
        if xs.len() > CudaDevice::PW_TENSORS || program.registers() > CudaDevice::PW_REGS {
            return program.eval_ops::<T, Self>(self, xs);
        }
        let nodes = &self.nodes;
        let parts: Vec<&CudaDual> = xs.iter().map(|x| v!(nodes, x)).collect();
        let y = Ops::<T>::pointwise(&mut self.fwd, program, &parts)?;
        let ids: Vec<usize> = xs.iter().map(|v| v.id).collect();
        let ng = self.needs(&ids);
        Ok(self.push(y, Op::Pointwise(ids, program.clone()), ng))
    }

    fn slice(&mut self, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        let y = Ops::<T>::slice(&mut self.fwd, v!(self.nodes, x), axis, start, len)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Slice(x.id, axis, start), ng))
    }

    fn reshape(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = Ops::<T>::reshape(&mut self.fwd, v!(self.nodes, x), shape)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Reshape(x.id), ng))
    }

    fn transpose(&mut self, x: &Var, a: usize, b: usize) -> Result<Var> {
        let y = Ops::<T>::transpose(&mut self.fwd, v!(self.nodes, x), a, b)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Transpose(x.id, a, b), ng))
    }

    fn broadcast_to(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = Ops::<T>::broadcast_to(&mut self.fwd, v!(self.nodes, x), shape)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Broadcast(x.id), ng))
    }

    fn softmax(&mut self, x: &Var) -> Result<Var> {
        let y = Ops::<T>::softmax(&mut self.fwd, v!(self.nodes, x))?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Softmax(x.id), ng))
    }

    fn log_softmax(&mut self, x: &Var) -> Result<Var> {
        let y = Ops::<T>::log_softmax(&mut self.fwd, v!(self.nodes, x))?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::LogSoftmax(x.id), ng))
    }
}
