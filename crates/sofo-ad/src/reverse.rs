//! Reverse mode: a tape over the same op vocabulary, for backpropagation
//! through time (the Adam/SGD baselines and gradient checks).
//!
//! Every op records its output value and how it was made; [`Rev::backward`]
//! walks the tape once from the last node to the first (creation order is a
//! topological order) and returns the gradient of every node that needs one.
//! The tape holds every intermediate value, so its memory grows with T: that
//! is what BPTT costs, and what SOFO avoids.

use crate::forward::linear_shapes;
use crate::ops::{Binary, Ops, Unary};
use crate::pointwise::{Grid, Pointwise};
use sofo_tensor::backend::{Cpu, Gemm, Kernels, Mat};
use sofo_tensor::{Float, Result, Tensor, TensorError};

/// A value on the tape: its node and shape.
#[derive(Clone, Debug)]
pub struct Var {
    pub(crate) id: usize,
    pub(crate) shape: Vec<usize>,
}

impl Var {
    pub fn id(&self) -> usize {
        self.id
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Op<T: Float> {
    Leaf,
    Unary(usize, Unary),
    Binary(usize, usize, Binary),
    Matmul(usize, usize),
    Linear {
        leak: Option<(usize, T)>,
        scale: T,
        terms: Vec<(usize, usize)>,
        bias: Option<usize>,
    },
    Sum(usize, Vec<usize>),
    Concat(Vec<usize>, usize),
    Slice(usize, usize, usize),
    Reshape(usize),
    Transpose(usize, usize, usize),
    Broadcast(usize),
    Softmax(usize),
    LogSoftmax(usize),
    /// A program run as one op: a node instead of one per op and its
    /// slices and concat (the rules are the same, entry by entry).
    Pointwise(Vec<usize>, crate::Pointwise),
}

struct Node<T: Float> {
    value: Tensor<T>,
    op: Op<T>,
    needs_grad: bool,
}

/// The reverse-mode engine: owns the tape.
#[derive(Default)]
pub struct Rev<T: Float> {
    nodes: Vec<Node<T>>,
}

impl<T: Float> Rev<T> {
    pub fn new() -> Self {
        Rev { nodes: Vec::new() }
    }

    /// A value whose gradient is wanted (a parameter).
    pub fn leaf(&mut self, value: Tensor<T>) -> Var {
        self.push(value, Op::Leaf, true)
    }

    /// The primal value of a node.
    pub fn value_of(&self, v: &Var) -> &Tensor<T> {
        &self.nodes[v.id].value
    }

    fn push(&mut self, value: Tensor<T>, op: Op<T>, needs_grad: bool) -> Var {
        let shape = value.shape().to_vec();
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

    fn val(&self, id: usize) -> &Tensor<T> {
        &self.nodes[id].value
    }

    /// Backpropagates the output gradients `seeds` (node, ∂c/∂node) through
    /// the tape; returns, indexed by node, the gradient of every leaf that
    /// needs one (`None` elsewhere: intermediate gradients are freed as soon
    /// as they have been propagated). Seeds for the same node add up.
    pub fn backward(&self, seeds: Vec<(Var, Tensor<T>)>) -> Result<Vec<Option<Tensor<T>>>> {
        let mut g: Vec<Option<Tensor<T>>> = (0..self.nodes.len()).map(|_| None).collect();
        for (v, s) in seeds {
            if s.shape() != v.shape.as_slice() {
                return Err(TensorError::shape(
                    "backward seed",
                    format!("{:?}", v.shape),
                    format!("{:?}", s.shape()),
                ));
            }
            accumulate(&mut g[v.id], s)?;
        }
        for id in (0..self.nodes.len()).rev() {
            let Some(gy) = g[id].take() else { continue };
            let node = &self.nodes[id];
            self.backprop(id, &node.op, &gy, &mut g)?;
            // keep the leaves' gradients; an intermediate one is spent here
            if matches!(node.op, Op::Leaf) {
                g[id] = Some(gy);
            }
        }
        Ok(g)
    }

    fn backprop(
        &self,
        id: usize,
        op: &Op<T>,
        gy: &Tensor<T>,
        g: &mut [Option<Tensor<T>>],
    ) -> Result<()> {
        let y = self.val(id);
        let add = |g: &mut [Option<Tensor<T>>], to: usize, t: Tensor<T>| -> Result<()> {
            if self.nodes[to].needs_grad {
                accumulate(&mut g[to], t)?;
            }
            Ok(())
        };
        match op {
            Op::Leaf => {}
            Op::Unary(x, u) => {
                let xv = self.val(*x);
                let mut gx = Tensor::scratch(xv.shape());
                let (xd, yd, gd) = (xv.data(), y.data(), gy.data());
                for (i, o) in gx.data_mut().iter_mut().enumerate() {
                    *o = gd[i] * u.derivative(xd[i], yd[i]);
                }
                add(g, *x, gx)?;
            }
            Op::Binary(a, b, op) => {
                let (av, bv) = (self.val(*a), self.val(*b));
                let shape = y.shape();
                let ab = av.broadcast_to(shape)?;
                let bb = bv.broadcast_to(shape)?;
                if self.nodes[*a].needs_grad {
                    let ga = match op {
                        Binary::Add | Binary::Sub => gy.clone(),
                        Binary::Mul => gy.zip_map(&bb, "mul", |g, b| g * b)?,
                        Binary::Div => gy.zip_map(&bb, "div", |g, b| g / b)?,
                    };
                    add(g, *a, sum_to_shape(&ga, av.shape())?)?;
                }
                if self.nodes[*b].needs_grad {
                    let gb = match op {
                        Binary::Add => gy.clone(),
                        Binary::Sub => gy.scale(-T::one()),
                        Binary::Mul => gy.zip_map(&ab, "mul", |g, a| g * a)?,
                        Binary::Div => {
                            let q = ab.zip_map(&bb, "div", |a, b| -a / (b * b))?;
                            gy.zip_map(&q, "div", |g, q| g * q)?
                        }
                    };
                    add(g, *b, sum_to_shape(&gb, bv.shape())?)?;
                }
            }
            Op::Matmul(a, b) => {
                let (av, bv) = (self.val(*a), self.val(*b));
                let (k, n) = (bv.shape()[0], bv.shape()[1]);
                let rows = gy.numel() / n.max(1);
                if self.nodes[*a].needs_grad {
                    add(g, *a, grad_input(gy, bv, rows, k, n, T::one(), av.shape())?)?;
                }
                if self.nodes[*b].needs_grad {
                    add(g, *b, grad_weight(av, gy, rows, k, n, T::one())?)?;
                }
            }
            Op::Linear {
                leak,
                scale,
                terms,
                bias,
            } => {
                let n = *y.shape().last().unwrap();
                let rows = y.numel() / n.max(1);
                if let Some((x, c)) = leak {
                    if self.nodes[*x].needs_grad {
                        add(g, *x, gy.scale(*c))?;
                    }
                }
                for (a, w) in terms {
                    let (av, wv) = (self.val(*a), self.val(*w));
                    let k = wv.shape()[0];
                    if self.nodes[*a].needs_grad {
                        add(g, *a, grad_input(gy, wv, rows, k, n, *scale, av.shape())?)?;
                    }
                    if self.nodes[*w].needs_grad {
                        add(g, *w, grad_weight(av, gy, rows, k, n, *scale)?)?;
                    }
                }
                if let Some(b) = bias {
                    if self.nodes[*b].needs_grad {
                        let mut gb = vec![T::zero(); n];
                        for r in gy.data().chunks(n) {
                            for (o, &v) in gb.iter_mut().zip(r) {
                                *o += v;
                            }
                        }
                        let gb = Tensor::from_vec(&[n], gb)?.scale(*scale);
                        add(g, *b, gb)?;
                    }
                }
            }
            Op::Sum(x, axes) => {
                let xs = self.val(*x).shape();
                let mut kept = xs.to_vec();
                for &a in axes {
                    kept[a] = 1;
                }
                add(g, *x, gy.clone().reshape(&kept)?.broadcast_to(xs)?)?;
            }
            Op::Concat(xs, axis) => {
                let mut start = 0;
                for &x in xs {
                    let len = self.val(x).shape()[*axis];
                    add(g, x, gy.slice(*axis, start, len)?)?;
                    start += len;
                }
            }
            Op::Slice(x, axis, start) => {
                let xs = self.val(*x).shape();
                add(g, *x, scatter_slice(gy, xs, *axis, *start)?)?;
            }
            Op::Reshape(x) => {
                let xs = self.val(*x).shape().to_vec();
                add(g, *x, gy.clone().reshape(&xs)?)?;
            }
            Op::Transpose(x, a, b) => add(g, *x, gy.transpose(*a, *b)?)?,
            Op::Broadcast(x) => {
                let xs = self.val(*x).shape().to_vec();
                add(g, *x, sum_to_shape(gy, &xs)?)?;
            }
            Op::Softmax(x) | Op::LogSoftmax(x) => {
                let log = matches!(op, Op::LogSoftmax(_));
                let l = *y.shape().last().unwrap();
                let mut gx = Tensor::scratch(y.shape());
                let (yd, gd) = (y.data(), gy.data());
                for (r, o) in gx.data_mut().chunks_mut(l).enumerate() {
                    let yr = &yd[r * l..(r + 1) * l];
                    let gr = &gd[r * l..(r + 1) * l];
                    if log {
                        // gx = g − softmax · Σ g
                        let s: T = gr.iter().fold(T::zero(), |a, &b| a + b);
                        for j in 0..l {
                            o[j] = gr[j] - yr[j].exp() * s;
                        }
                    } else {
                        // gx = s ⊙ (g − Σ g ⊙ s)
                        let dot = (0..l).fold(T::zero(), |a, j| a + gr[j] * yr[j]);
                        for j in 0..l {
                            o[j] = yr[j] * (gr[j] - dot);
                        }
                    }
                }
                add(g, *x, gx)?;
            }
            Op::Pointwise(xs, program) => {
                let inputs = xs.iter().map(|&x| self.val(x)).collect();
                let wants: Vec<bool> = xs.iter().map(|&x| self.nodes[x].needs_grad).collect();
                // each input's gradient so far: the program adds to it, one
                // contribution after the other, as its ops would
                let priors = xs.iter().map(|&x| g[x].take()).collect();
                let grads = Grid::new(program, inputs)?.gradients(gy, &wants, priors);
                for (&x, gx) in xs.iter().zip(grads) {
                    if let Some(gx) = gx {
                        accumulate(&mut g[x], gx)?;
                    }
                }
            }
        }
        Ok(())
    }
}

fn accumulate<T: Float>(slot: &mut Option<Tensor<T>>, t: Tensor<T>) -> Result<()> {
    match slot {
        None => *slot = Some(t),
        Some(s) => s.axpy(T::one(), &t)?,
    }
    Ok(())
}

/// Sums a gradient of a broadcast result back to the operand's shape.
fn sum_to_shape<T: Float>(g: &Tensor<T>, shape: &[usize]) -> Result<Tensor<T>> {
    if g.shape() == shape {
        return Ok(g.clone());
    }
    let r = g.rank();
    let lead = r - shape.len();
    let axes: Vec<usize> = (0..r)
        .filter(|&i| i < lead || (shape[i - lead] == 1 && g.shape()[i] != 1))
        .collect();
    g.sum_axes(&axes)?.reshape(shape)
}

/// ∂/∂a of s · a·W: s · gy [rows, n] · Wᵀ [n, k], reshaped to a's shape.
fn grad_input<T: Float>(
    gy: &Tensor<T>,
    w: &Tensor<T>,
    rows: usize,
    k: usize,
    n: usize,
    s: T,
    shape: &[usize],
) -> Result<Tensor<T>> {
    let mut ga = Tensor::scratch(shape);
    Cpu.gemm(
        Gemm::new(rows, k, n),
        ga.data_mut(),
        Mat::row_major(k),
        None,
        gy.data(),
        Mat::row_major(n),
        w.data(),
        Mat::transposed(n),
        s,
    );
    Ok(ga)
}

/// ∂/∂W of s · a·W: s · aᵀ [k, rows] · gy [rows, n].
fn grad_weight<T: Float>(
    a: &Tensor<T>,
    gy: &Tensor<T>,
    rows: usize,
    k: usize,
    n: usize,
    s: T,
) -> Result<Tensor<T>> {
    let mut gw = Tensor::scratch(&[k, n]);
    Cpu.gemm(
        Gemm::new(k, n, rows),
        gw.data_mut(),
        Mat::row_major(n),
        None,
        a.data(),
        Mat::transposed(k),
        gy.data(),
        Mat::row_major(n),
        s,
    );
    Ok(gw)
}

/// Zeros of `shape` with `g` placed at [start, start + len) along `axis`.
fn scatter_slice<T: Float>(
    g: &Tensor<T>,
    shape: &[usize],
    axis: usize,
    start: usize,
) -> Result<Tensor<T>> {
    let mut out = Tensor::zeros(shape);
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let (n, len) = (shape[axis], g.shape()[axis]);
    for o in 0..outer {
        let dst = (o * n + start) * inner;
        out.data_mut()[dst..dst + len * inner]
            .copy_from_slice(&g.data()[o * len * inner..(o + 1) * len * inner]);
    }
    Ok(out)
}

impl<T: Float> Ops<T> for Rev<T> {
    type V = Var;

    fn constant(&mut self, t: Tensor<T>) -> Result<Var> {
        Ok(self.push(t, Op::Leaf, false))
    }

    fn shape<'a>(&self, v: &'a Var) -> &'a [usize] {
        &v.shape
    }

    fn to_host(&mut self, v: &Var) -> Result<Tensor<T>> {
        Ok(self.val(v.id).clone())
    }

    fn unary(&mut self, x: &Var, op: Unary) -> Result<Var> {
        let y = self.val(x.id).map(|v| op.apply(v));
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Unary(x.id, op), ng))
    }

    fn binary(&mut self, a: &Var, b: &Var, op: Binary) -> Result<Var> {
        let name = match op {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        };
        let y = self
            .val(a.id)
            .broadcast_zip(self.val(b.id), name, |u, v| op.apply(u, v))?;
        let ng = self.needs(&[a.id, b.id]);
        Ok(self.push(y, Op::Binary(a.id, b.id, op), ng))
    }

    fn matmul(&mut self, a: &Var, b: &Var) -> Result<Var> {
        let y = self.val(a.id).matmul(self.val(b.id))?;
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
        let shapes: Vec<(&[usize], &[usize])> = terms
            .iter()
            .map(|(a, w)| (a.shape.as_slice(), w.shape.as_slice()))
            .collect();
        let (out_shape, rows, n) = linear_shapes(
            &shapes,
            bias.map(|b| b.shape.as_slice()),
            leak.map(|(x, _)| x.shape.as_slice()),
        )?;
        let mut y = Tensor::scratch(&out_shape);
        {
            let bd = bias.map(|b| self.val(b.id).data());
            let xd = leak.map(|(x, c)| (self.val(x.id).data(), c));
            for (r, row) in y.data_mut().chunks_mut(n.max(1)).enumerate() {
                for j in 0..n {
                    let mut v = bd.map_or(T::zero(), |b| scale * b[j]);
                    if let Some((x, c)) = xd {
                        v += c * x[r * n + j];
                    }
                    row[j] = v;
                }
            }
        }
        for (a, w) in terms {
            let k = w.shape[0];
            Cpu.gemm(
                Gemm::new(rows, n, k),
                y.data_mut(),
                Mat::row_major(n),
                Some(T::one()),
                self.val(a.id).data(),
                Mat::row_major(k),
                self.val(w.id).data(),
                Mat::row_major(n),
                scale,
            );
        }
        let mut ids: Vec<usize> = terms.iter().flat_map(|(a, w)| [a.id, w.id]).collect();
        ids.extend(bias.map(|b| b.id));
        ids.extend(leak.map(|(x, _)| x.id));
        let ng = self.needs(&ids);
        let op = Op::Linear {
            leak: leak.map(|(x, c)| (x.id, c)),
            scale,
            terms: terms.iter().map(|(a, w)| (a.id, w.id)).collect(),
            bias: bias.map(|b| b.id),
        };
        Ok(self.push(y, op, ng))
    }

    fn sum(&mut self, x: &Var, axes: &[usize]) -> Result<Var> {
        let y = self.val(x.id).sum_axes(axes)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Sum(x.id, axes.to_vec()), ng))
    }

    fn concat(&mut self, xs: &[&Var], axis: usize) -> Result<Var> {
        let parts: Vec<&Tensor<T>> = xs.iter().map(|v| self.val(v.id)).collect();
        let y = Tensor::concat(&parts, axis)?;
        let ids: Vec<usize> = xs.iter().map(|v| v.id).collect();
        let ng = self.needs(&ids);
        Ok(self.push(y, Op::Concat(ids, axis), ng))
    }

    /// One node for the program (its values and reverse rule entry by
    /// entry, with the scalar rules of the ops it records).
    fn pointwise(&mut self, program: &Pointwise, xs: &[&Var]) -> Result<Var> {
        let inputs = xs.iter().map(|x| self.val(x.id)).collect();
        let y = Grid::new(program, inputs)?.output();
        let ids: Vec<usize> = xs.iter().map(|v| v.id).collect();
        let ng = self.needs(&ids);
        Ok(self.push(y, Op::Pointwise(ids, program.clone()), ng))
    }

    fn slice(&mut self, x: &Var, axis: usize, start: usize, len: usize) -> Result<Var> {
        let y = self.val(x.id).slice(axis, start, len)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Slice(x.id, axis, start), ng))
    }

    fn reshape(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = self.val(x.id).clone().reshape(shape)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Reshape(x.id), ng))
    }

    fn transpose(&mut self, x: &Var, a: usize, b: usize) -> Result<Var> {
        let y = self.val(x.id).transpose(a, b)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Transpose(x.id, a, b), ng))
    }

    fn broadcast_to(&mut self, x: &Var, shape: &[usize]) -> Result<Var> {
        let y = self.val(x.id).broadcast_to(shape)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Broadcast(x.id), ng))
    }

    fn softmax(&mut self, x: &Var) -> Result<Var> {
        let y = softmax_rows(self.val(x.id), false)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::Softmax(x.id), ng))
    }

    fn log_softmax(&mut self, x: &Var) -> Result<Var> {
        let y = softmax_rows(self.val(x.id), true)?;
        let ng = self.needs(&[x.id]);
        Ok(self.push(y, Op::LogSoftmax(x.id), ng))
    }
}

fn softmax_rows<T: Float>(x: &Tensor<T>, log: bool) -> Result<Tensor<T>> {
    if x.rank() == 0 {
        return Err(TensorError::shape("softmax", "rank ≥ 1", "a scalar"));
    }
    let l = *x.shape().last().unwrap();
    let mut y = Tensor::scratch(x.shape());
    for (xr, yr) in x.data().chunks(l).zip(y.data_mut().chunks_mut(l)) {
        let m = xr.iter().fold(xr[0], |a, &b| a.max(b));
        let z = xr.iter().fold(T::zero(), |a, &b| a + (b - m).exp());
        for j in 0..l {
            yr[j] = if log {
                xr[j] - m - z.ln()
            } else {
                (xr[j] - m).exp() / z
            };
        }
    }
    Ok(y)
}
