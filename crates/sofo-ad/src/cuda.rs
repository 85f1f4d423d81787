//! Forward-K on the GPU (feature `cuda`): the same op vocabulary, the same
//! tangent layout (see [`crate::layout`]), values in device memory.
//!
//! The ops of the hot paths (elementwise unary, binary ops on equal shapes,
//! the fused `linear`, rank-2 transpose, row broadcast, slices, last-axis
//! concat, reshapes that keep the last axis) run as cuBLAS GEMMs and NVRTC
//! kernels; a `linear` whose output has a few columns (a readout) runs as
//! one kernel per term, not three GEMMs. The others (broadcasting binary
//! ops, general matmul, sums, other concats and reshapes, softmax) are
//! computed on the host by the CPU engine and copied back: correct, but
//! slow, and meant for what a model does once per pass; a pass that uses
//! one cannot be replayed as a CUDA graph.
//!
//! The device computes in f32 whatever the element type of the model: values
//! are converted where they cross to and from the host.

use crate::forward::linear_shapes;
use crate::layout::tangent_shape;
use crate::ops::{unary_of_linear_by_ops, Binary, Ops, Unary};
use crate::pointwise::{Pointwise, Step};
use crate::{Dual, Fwd};
use sofo_tensor::cuda::{
    BinaryCode, BlockStager, CudaDevice, DevTensor, NarrowOut, ProgramWords, SmallTerm,
    TermActivation, UnaryCode,
};
use sofo_tensor::{Float, Result, Tensor};
use std::sync::Arc;

/// A device value and its K tangents (`None`: all zero).
#[derive(Clone, Debug)]
pub struct CudaDual {
    pub primal: DevTensor,
    pub tangent: Option<DevTensor>,
}

/// The forward-K engine on a GPU (f32).
#[derive(Clone)]
pub struct CudaFwd {
    dev: Arc<CudaDevice>,
    k: usize,
    /// The blocks of `constant_block`, one stager per source array (a
    /// batch's inputs, a model's noise), keyed by its address and length;
    /// the [`CudaFwd::STAGERS`] used last kept (a stager's chunk stays on
    /// the device).
    blocks: Vec<(usize, usize, BlockStager)>,
}

impl CudaFwd {
    /// How many arrays' stagers are kept: more than a step reads blocks of
    /// (the constrained network's inputs and five kinds of noise), so that
    /// none is evicted mid-chunk and copied again every step.
    pub const STAGERS: usize = 8;
}

/// The `unary_fwd` kernel's op code and scalar for an op.
pub fn code(op: Unary) -> (UnaryCode, f32) {
    match op {
        Unary::Neg => (UnaryCode::Neg, 0.0),
        Unary::Abs => (UnaryCode::Abs, 0.0),
        Unary::Exp => (UnaryCode::Exp, 0.0),
        Unary::Log => (UnaryCode::Log, 0.0),
        Unary::Tanh => (UnaryCode::Tanh, 0.0),
        Unary::Relu => (UnaryCode::Relu, 0.0),
        Unary::Softplus => (UnaryCode::Softplus, 0.0),
        Unary::Sigmoid => (UnaryCode::Sigmoid, 0.0),
        Unary::Square => (UnaryCode::Square, 0.0),
        Unary::Sqrt => (UnaryCode::Sqrt, 0.0),
        Unary::Sin => (UnaryCode::Sin, 0.0),
        Unary::Cos => (UnaryCode::Cos, 0.0),
        Unary::AddScalar(s) => (UnaryCode::AddScalar, s as f32),
        Unary::MulScalar(s) => (UnaryCode::MulScalar, s as f32),
    }
}

impl CudaFwd {
    pub fn new(dev: Arc<CudaDevice>, k: usize) -> Self {
        CudaFwd {
            dev,
            k,
            blocks: Vec::new(),
        }
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    /// Copies a host value (and its tangents) to the device.
    pub fn upload(&self, d: &Dual<f32>) -> Result<CudaDual> {
        Ok(CudaDual {
            primal: self.dev.upload(&d.primal)?,
            tangent: match &d.tangent {
                Some(t) => Some(self.dev.upload(t)?),
                None => None,
            },
        })
    }

    /// Copies a device value (and its tangents) to the host.
    pub fn download(&self, d: &CudaDual) -> Result<Dual<f32>> {
        Ok(Dual {
            primal: self.dev.download(&d.primal)?,
            tangent: match &d.tangent {
                Some(t) => Some(self.dev.download(t)?),
                None => None,
            },
        })
    }

    /// A linear op with at most [`CudaDevice::NARROW`] output columns (a
    /// readout): one `linear_narrow` launch per term, the first writing the
    /// output with its bias (unless a leak term needs `linear_init` first);
    /// `act` applies to the first term's input.
    #[allow(clippy::too_many_arguments)]
    fn narrow_linear(
        &self,
        out_shape: &[usize],
        want_k: Option<usize>,
        leak: Option<(&CudaDual, f32)>,
        scale: f32,
        terms: &[(&CudaDual, &CudaDual)],
        bias: Option<&CudaDual>,
        act: Option<TermActivation<'_>>,
    ) -> Result<CudaDual> {
        let dev = &self.dev;
        let bias = bias.map(|b| (&b.primal, b.tangent.as_ref()));
        let (mut y, mut t) = match leak {
            Some((x, c)) => dev.linear_init(
                out_shape,
                want_k,
                bias,
                Some((&x.primal, x.tangent.as_ref(), c)),
                None,
                scale,
            )?,
            None => (
                dev.scratch(out_shape)?,
                match want_k {
                    Some(k) => Some(dev.scratch(&tangent_shape(out_shape, k))?),
                    None => None,
                },
            ),
        };
        for (i, (a, w)) in terms.iter().enumerate() {
            let out = if i == 0 && leak.is_none() {
                NarrowOut::Write { bias }
            } else {
                NarrowOut::Add
            };
            dev.linear_narrow(
                &mut y,
                t.as_mut(),
                self.k,
                (&a.primal, a.tangent.as_ref()),
                (&w.primal, w.tangent.as_ref()),
                out,
                scale,
                if i == 0 { act } else { None },
            )?;
        }
        Ok(CudaDual {
            primal: y,
            tangent: t,
        })
    }

    /// The kernels a linear op with `terms` runs on (see [`LinearPath`]):
    /// the one place that decides, for `linear_f32` and for
    /// `linear_of_unary`'s question whether its first term's input can be
    /// read through an activation.
    fn linear_path(&self, terms: &[(&CudaDual, &CudaDual)]) -> LinearPath {
        let matrix = |w: &CudaDual| w.primal.shape().len() == 2;
        let n = terms.first().and_then(|(_, w)| w.primal.shape().get(1));
        if n.is_some_and(|&n| n <= CudaDevice::NARROW) && terms.iter().all(|(_, w)| matrix(w)) {
            return LinearPath::Narrow;
        }
        // the terms that are not folded in or added by the small-term
        // kernels: at most one, a matrix the fused kernel serves at its size
        let mut dense = terms
            .iter()
            .enumerate()
            .filter(|(_, (_, w))| !is_small_term(w));
        match (dense.next(), dense.next()) {
            (Some((i, (_, w))), None)
                if matrix(w)
                    && self
                        .dev
                        .fuses_linear(w.primal.shape()[0], w.primal.shape()[1]) =>
            {
                LinearPath::Dense(i)
            }
            _ => LinearPath::Gemm,
        }
    }

    /// `linear` in f32, with the first term's input read as f(a) where
    /// `act` is given (only where that term goes through a kernel that
    /// reads it: `Narrow`, or `Dense(0)`), and g applied to the affine map
    /// before the leak where `post` is given (only on the `Dense` path
    /// with no small term added after the kernel: [`CudaFwd::writes_post`]).
    fn linear_f32(
        &mut self,
        leak: Option<(&CudaDual, f32)>,
        scale: f32,
        terms: &[(&CudaDual, &CudaDual)],
        bias: Option<&CudaDual>,
        act: Option<TermActivation<'_>>,
        post: Option<UnaryCode>,
    ) -> Result<CudaDual> {
        let shapes: Vec<(&[usize], &[usize])> = terms
            .iter()
            .map(|(a, w)| (a.primal.shape(), w.primal.shape()))
            .collect();
        let (out_shape, rows, n) = linear_shapes(
            &shapes,
            bias.map(|b| b.primal.shape()),
            leak.map(|(x, _)| x.primal.shape()),
        )?;
        let dev = self.dev.clone();
        let any_tangent = terms
            .iter()
            .any(|(a, w)| a.tangent.is_some() || w.tangent.is_some())
            || bias.is_some_and(|b| b.tangent.is_some())
            || leak.is_some_and(|(x, _)| x.tangent.is_some());
        let k = self.k;
        let want_k = (any_tangent && k > 0).then_some(k);
        let path = self.linear_path(terms);
        debug_assert!(act.is_none() || matches!(path, LinearPath::Narrow | LinearPath::Dense(0)));
        debug_assert!(post.is_none() || self.writes_post(terms));
        if path == LinearPath::Narrow {
            return self.narrow_linear(&out_shape, want_k, leak, scale, terms, bias, act);
        }
        // a term with a few columns (a network's input, a plant's state) is
        // folded into the first launch instead of GEMMs that would each read
        // and write the whole output for a rank-few update
        let small = folded_term(terms);
        // the other terms with a few columns in one launch each; the rest
        // as GEMMs
        let terms_all = terms;
        let (small_adds, terms): (Vec<_>, Vec<_>) = terms
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != small)
            .map(|(_, t)| t)
            .partition(|(_, w)| is_small_term(w));
        let bias = bias.map(|b| (&b.primal, b.tangent.as_ref()));
        let leak = leak.map(|(x, c)| (&x.primal, x.tangent.as_ref(), c));
        let small = small.map(|i| {
            let (u, w) = terms_all[i];
            SmallTerm {
                u: &u.primal,
                ut: u.tangent.as_ref(),
                w: &w.primal,
                wt: w.tangent.as_ref(),
            }
        });
        // one dense term (a recurrence's r · W) whose inner dimension the
        // fused kernel serves: value, tangents and everything linear_init
        // folds in, in one launch
        if let (LinearPath::Dense(_), [(a, w)]) = (path, terms.as_slice()) {
            let (mut y, mut t) = dev.linear_dense(
                &out_shape,
                want_k,
                (&a.primal, a.tangent.as_ref()),
                act,
                (&w.primal, w.tangent.as_ref()),
                bias,
                leak,
                small,
                scale,
                post,
            )?;
            add_small_terms(&dev, &mut y, t.as_mut(), k, &small_adds, scale)?;
            return Ok(CudaDual {
                primal: y,
                tangent: t,
            });
        }
        // bias, leak and the small term (primal and tangents) in one launch,
        // then the GEMMs
        let (mut y, t) = dev.linear_init(&out_shape, want_k, bias, leak, small, scale)?;
        for (a, w) in &terms {
            let kd = w.primal.shape()[0];
            dev.gemm(
                rows,
                n,
                kd,
                &a.primal.slice().slice(..),
                &w.primal.slice().slice(..),
                &mut y.slice_mut().slice_mut(..),
                scale,
                1.0,
            )?;
        }
        let mut t = t;
        add_small_terms(&dev, &mut y, t.as_mut(), k, &small_adds, scale)?;
        let Some(mut t) = t else {
            return Ok(CudaDual {
                primal: y,
                tangent: None,
            });
        };
        for (a, w) in &terms {
            let kd = w.primal.shape()[0];
            if let Some(at) = &a.tangent {
                // ȧ · W over all rows·K rows
                dev.gemm(
                    rows * k,
                    n,
                    kd,
                    &at.slice().slice(..),
                    &w.primal.slice().slice(..),
                    &mut t.slice_mut().slice_mut(..),
                    scale,
                    1.0,
                )?;
            }
            if let Some(wt) = &w.tangent {
                // a · [ẇ_1 … ẇ_K], already in the output's layout
                dev.gemm(
                    rows,
                    k * n,
                    kd,
                    &a.primal.slice().slice(..),
                    &wt.slice().slice(..),
                    &mut t.slice_mut().slice_mut(..),
                    scale,
                    1.0,
                )?;
            }
        }
        Ok(CudaDual {
            primal: y,
            tangent: Some(t),
        })
    }

    /// Whether `linear_dense` can apply g to the affine map of a linear op
    /// with `terms` ([`Ops::unary_of_linear`]): on the `Dense` path, with
    /// every term but the dense one folded into its launch (a term added
    /// after it would land outside g).
    fn writes_post(&self, terms: &[(&CudaDual, &CudaDual)]) -> bool {
        let folded = folded_term(terms);
        matches!(self.linear_path(terms), LinearPath::Dense(_))
            && terms
                .iter()
                .enumerate()
                .all(|(i, (_, w))| Some(i) == folded || !is_small_term(w))
    }

    /// Runs an op on the host with the CPU engine.
    fn on_host(
        &self,
        xs: &[&CudaDual],
        f: impl FnOnce(&mut Fwd, &[Dual<f32>]) -> Result<Dual<f32>>,
    ) -> Result<CudaDual> {
        let host: Vec<Dual<f32>> = xs.iter().map(|x| self.download(x)).collect::<Result<_>>()?;
        let mut e = Fwd::new(self.k);
        let out = f(&mut e, &host)?;
        self.upload(&out)
    }
}

impl<T: Float> Ops<T> for CudaFwd {
    type V = CudaDual;

    fn constant(&mut self, t: Tensor<T>) -> Result<CudaDual> {
        Ok(CudaDual {
            primal: self.dev.upload(&t.convert::<f32>())?,
            tangent: None,
        })
    }

    fn block_steps(&self, block_len: usize) -> usize {
        BlockStager::chunk_blocks(block_len)
    }

    /// A view of a chunk of `whole` staged on the device once for many
    /// blocks (see [`BlockStager`]).
    fn constant_block(
        &mut self,
        whole: &Tensor<T>,
        offset: usize,
        shape: &[usize],
    ) -> Result<CudaDual> {
        // the stager of this array (a stager checks the values it serves,
        // so an address reused by another array only costs an upload)
        let key = (whole.data().as_ptr() as usize, whole.numel());
        // least recently used out first: the batch's inputs (every step)
        // stay while a model's noise moves on to new arrays
        let entry = match self.blocks.iter().position(|b| (b.0, b.1) == key) {
            Some(i) => self.blocks.remove(i),
            None => {
                if self.blocks.len() == Self::STAGERS {
                    self.blocks.remove(0);
                }
                (key.0, key.1, BlockStager::default())
            }
        };
        self.blocks.push(entry);
        let stager = &mut self.blocks.last_mut().expect("pushed").2;
        Ok(CudaDual {
            primal: stager.block(&self.dev, whole.data(), offset, shape)?,
            tangent: None,
        })
    }

    fn shape<'a>(&self, v: &'a CudaDual) -> &'a [usize] {
        v.primal.shape()
    }

    fn to_host(&mut self, v: &CudaDual) -> Result<Tensor<T>> {
        Ok(self.dev.download(&v.primal)?.convert::<T>())
    }

    fn unary(&mut self, x: &CudaDual, op: Unary) -> Result<CudaDual> {
        let (c, s) = code(op);
        match &x.tangent {
            // f and f′ ⊙ ẋ in one pass
            Some(t) if self.k > 0 => {
                let (y, out) = self.dev.unary_tangent(&x.primal, t, c, s, None)?;
                Ok(CudaDual {
                    primal: y,
                    tangent: Some(out),
                })
            }
            _ => {
                let (y, _) = self.dev.unary(&x.primal, c, s, false)?;
                Ok(CudaDual {
                    primal: y,
                    tangent: None,
                })
            }
        }
    }

    /// f(x) ⊙ c and its tangents in one pass where c is a constant of x's
    /// shape and x has tangents; else `unary` then `mul`.
    fn unary_mul(&mut self, x: &CudaDual, op: Unary, c: &CudaDual) -> Result<CudaDual> {
        match (&x.tangent, &c.tangent) {
            (Some(t), None) if self.k > 0 && c.primal.shape() == x.primal.shape() => {
                let (code, s) = code(op);
                let (y, out) = self
                    .dev
                    .unary_tangent(&x.primal, t, code, s, Some(&c.primal))?;
                Ok(CudaDual {
                    primal: y,
                    tangent: Some(out),
                })
            }
            _ => {
                let y = Ops::<T>::unary(self, x, op)?;
                Ops::<T>::mul(self, &y, c)
            }
        }
    }

    /// Equal shapes (the plants' columns, noise masks, leaks) run on the
    /// device; broadcasting ones go through the host.
    fn binary(&mut self, a: &CudaDual, b: &CudaDual, op: Binary) -> Result<CudaDual> {
        if a.primal.shape() != b.primal.shape() {
            return self.on_host(&[a, b], |e, v| e.binary(&v[0], &v[1], op));
        }
        let c = binary_code(op);
        if a.tangent.is_none() && b.tangent.is_none() {
            return Ok(CudaDual {
                primal: self.dev.binary(&a.primal, &b.primal, c)?,
                tangent: None,
            });
        }
        // the value and its tangents in one launch
        let (primal, tangent) = self.dev.binary_dual(
            &a.primal,
            &b.primal,
            a.tangent.as_ref(),
            b.tangent.as_ref(),
            c,
        )?;
        Ok(CudaDual {
            primal,
            tangent: Some(tangent),
        })
    }

    fn matmul(&mut self, a: &CudaDual, b: &CudaDual) -> Result<CudaDual> {
        self.on_host(&[a, b], |e, v| e.matmul(&v[0], &v[1]))
    }

    fn linear(
        &mut self,
        leak: Option<(&CudaDual, T)>,
        scale: T,
        terms: &[(&CudaDual, &CudaDual)],
        bias: Option<&CudaDual>,
    ) -> Result<CudaDual> {
        let leak = leak.map(|(x, c)| (x, c.to_f64() as f32));
        self.linear_f32(leak, scale.to_f64() as f32, terms, bias, None, None)
    }

    /// f(x) (⊙ c) read by the kernel of the term's path where that is the
    /// narrow kernel (a readout) or `linear_dense` (a recurrence's one dense
    /// term) and c, if any, a constant of x's shape; else `unary` (or
    /// `unary_mul`) then `linear`.
    fn linear_of_unary(
        &mut self,
        leak: Option<(&CudaDual, T)>,
        scale: T,
        first: (&CudaDual, Unary, Option<&CudaDual>, &CudaDual),
        terms: &[(&CudaDual, &CudaDual)],
        bias: Option<&CudaDual>,
    ) -> Result<CudaDual> {
        let (x, op, c, w) = first;
        let mut all = Vec::with_capacity(terms.len() + 1);
        all.push((x, w));
        all.extend_from_slice(terms);
        let constant_factor =
            c.is_none_or(|c| c.tangent.is_none() && c.primal.shape() == x.primal.shape());
        let reads_x = matches!(
            self.linear_path(&all),
            LinearPath::Narrow | LinearPath::Dense(0)
        );
        let (f, _) = code(op);
        if !constant_factor || !reads_x || !f.is_rate_function() {
            let fx = match c {
                Some(c) => Ops::<T>::unary_mul(self, x, op, c)?,
                None => Ops::<T>::unary(self, x, op)?,
            };
            all[0] = (&fx, w);
            return Ops::<T>::linear(self, leak, scale, &all, bias);
        }
        let act = TermActivation {
            op: f,
            factor: c.map(|c| &c.primal),
        };
        let leak = leak.map(|(x, c)| (x, c.to_f64() as f32));
        self.linear_f32(leak, scale.to_f64() as f32, &all, bias, Some(act), None)
    }

    /// Where the op's kernel reads x: a readout's (`linear_narrow`) or a
    /// dense term `linear_dense` takes at that size. Where cuBLAS takes it
    /// (a large network, or one whose output fills the fused kernel's
    /// tiles badly) f(x) is computed and stored for the GEMMs anyway, and a
    /// readout reading x as well would evaluate f and f′ again for every
    /// tangent: the model computes f(x) once instead, as on the CPU.
    fn fuses_unary_into_linear(&self, kd: usize, n: usize) -> bool {
        n <= CudaDevice::NARROW || self.dev.fuses_linear(kd, n)
    }

    /// One dense term (and a folded input term): `linear_dense` applies g
    /// and its derivative and the leak as it writes the output, in two
    /// launches (the value's, then the tangents'); else op by op.
    fn unary_of_linear(
        &mut self,
        leak: Option<(&CudaDual, T)>,
        scale: T,
        op: Unary,
        terms: &[(&CudaDual, &CudaDual)],
        bias: Option<&CudaDual>,
    ) -> Result<CudaDual> {
        let (g, _) = code(op);
        if !g.is_rate_function() || !self.writes_post(terms) {
            return unary_of_linear_by_ops(self, leak, scale, op, terms, bias);
        }
        let leak = leak.map(|(x, c)| (x, c.to_f64() as f32));
        let post = Some(g);
        self.linear_f32(leak, scale.to_f64() as f32, terms, bias, None, post)
    }

    fn sum(&mut self, x: &CudaDual, axes: &[usize]) -> Result<CudaDual> {
        self.on_host(&[x], |e, v| e.sum(&v[0], axes))
    }

    /// One `pointwise` launch for the program, value and tangents (a
    /// program over the kernel's limits runs op by op).
    fn pointwise(&mut self, program: &Pointwise, xs: &[&CudaDual]) -> Result<CudaDual> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| x.primal.shape()).collect();
        let (l, _) = program.layout(&shapes)?;
        if xs.len() > CudaDevice::PW_TENSORS || program.registers() > CudaDevice::PW_REGS {
            return program.eval_ops::<T, Self>(self, xs);
        }
        let input_has: Vec<bool> = xs
            .iter()
            .flat_map(|x| {
                let w = x.primal.shape().last().copied().unwrap_or(0);
                std::iter::repeat_n(x.tangent.is_some(), w / l)
            })
            .collect();
        let has = program.tangent_registers(&input_has);
        let tmask = has
            .iter()
            .enumerate()
            .fold(0u64, |m, (i, &h)| m | ((h as u64) << i));
        let want_t = program.outputs().iter().any(|&o| has[o]);
        let inputs: Vec<_> = xs.iter().map(|x| (&x.primal, x.tangent.as_ref())).collect();
        let n_step = program.steps().len();
        let words = program.words(program_code);
        let prog = ProgramWords {
            words,
            inputs: program.inputs(),
            steps: n_step,
        };
        let (primal, tangent) = self
            .dev
            .pointwise(prog, &inputs, l, self.k, tmask, want_t)?;
        Ok(CudaDual { primal, tangent })
    }

    /// Along the last axis (an output assembled from columns) on the
    /// device; other axes through the host.
    fn concat(&mut self, xs: &[&CudaDual], axis: usize) -> Result<CudaDual> {
        let first = xs.first().map(|x| x.primal.shape().to_vec());
        if let Some(lead) = first.filter(|s| !s.is_empty() && axis == s.len() - 1) {
            let lead = &lead[..axis];
            if xs
                .iter()
                .all(|x| x.primal.shape().len() == axis + 1 && &x.primal.shape()[..axis] == lead)
            {
                let width: usize = xs.iter().map(|x| x.primal.shape()[axis]).sum();
                let mut shape = lead.to_vec();
                shape.push(width);
                let mut primal = self.dev.scratch(&shape)?;
                let tshape = tangent_shape(&shape, self.k);
                let mut tangent = if xs.iter().all(|x| x.tangent.is_some()) {
                    Some(self.dev.scratch(&tshape)?)
                } else if xs.iter().any(|x| x.tangent.is_some()) {
                    // zeros where a piece has no tangent
                    Some(self.dev.zeros(&tshape)?)
                } else {
                    None
                };
                let mut offset = 0;
                for x in xs {
                    self.dev.copy_columns(&x.primal, &mut primal, offset)?;
                    if let (Some(t), Some(dst)) = (&x.tangent, tangent.as_mut()) {
                        self.dev.copy_columns(t, dst, offset)?;
                    }
                    offset += x.primal.shape()[axis];
                }
                return Ok(CudaDual { primal, tangent });
            }
        }
        self.on_host(xs, |e, v| {
            let refs: Vec<&Dual<f32>> = v.iter().collect();
            e.concat(&refs, axis)
        })
    }

    /// On the device: a slice along `axis` takes, from each run of the
    /// elements before that axis, one block of columns (the tangents
    /// likewise, K sitting before the last axis).
    fn slice(&mut self, x: &CudaDual, axis: usize, start: usize, len: usize) -> Result<CudaDual> {
        let s = x.primal.shape().to_vec();
        if axis >= s.len() || len == 0 || start + len > s[axis] {
            // the CPU engine's error
            return self.on_host(&[x], |e, v| e.slice(&v[0], axis, start, len));
        }
        let mut out = s.clone();
        out[axis] = len;
        // a run of `shape[axis..]` elements per row: (its length, one index's)
        let run = |shape: &[usize], axis: usize| {
            let inner = shape[axis + 1..].iter().product::<usize>();
            (shape[axis] * inner, inner)
        };
        let (src_w, inner) = run(&s, axis);
        let ts = tangent_shape(&s, self.k);
        // K sits at index rank − 1: the last axis moves one on
        let ta = if axis == s.len() - 1 { s.len() } else { axis };
        let (t_src_w, t_inner) = run(&ts, ta);
        if src_w.max(t_src_w) > i32::MAX as usize {
            // rows past the kernel's int columns
            return self.on_host(&[x], |e, v| e.slice(&v[0], axis, start, len));
        }
        let primal = self
            .dev
            .take_block(&x.primal, src_w, start * inner, len * inner, &out)?;
        let tangent = match &x.tangent {
            Some(t) => Some(self.dev.take_block(
                t,
                t_src_w,
                start * t_inner,
                len * t_inner,
                &tangent_shape(&out, self.k),
            )?),
            None => None,
        };
        Ok(CudaDual { primal, tangent })
    }

    /// On the device (a copy, relabelled) where the last axis stays as it
    /// is: then the tangents [.., K, last] keep their layout too. Other
    /// reshapes move K among the elements and go through the host.
    fn reshape(&mut self, x: &CudaDual, shape: &[usize]) -> Result<CudaDual> {
        let s = x.primal.shape();
        let same_last = !s.is_empty() && s.last() == shape.last();
        if !same_last || shape.iter().product::<usize>() != x.primal.numel() {
            return self.on_host(&[x], |e, v| e.reshape(&v[0], shape));
        }
        Ok(CudaDual {
            primal: x.primal.clone().reshape(shape)?,
            tangent: match &x.tangent {
                Some(t) => Some(t.clone().reshape(&tangent_shape(shape, self.k))?),
                None => None,
            },
        })
    }

    fn transpose(&mut self, x: &CudaDual, a: usize, b: usize) -> Result<CudaDual> {
        let s = x.primal.shape().to_vec();
        if s.len() != 2 || a == b || a > 1 || b > 1 {
            return self.on_host(&[x], |e, v| e.transpose(&v[0], a, b));
        }
        let (r, l) = (s[0], s[1]);
        let primal = self.dev.permute_210(&x.primal, r, 1, l, &[l, r])?;
        let tangent = match &x.tangent {
            // [R, K, L] → [L, K, R]
            Some(t) => Some(self.dev.permute_210(t, r, self.k, l, &[l, self.k, r])?),
            None => None,
        };
        Ok(CudaDual { primal, tangent })
    }

    fn broadcast_to(&mut self, x: &CudaDual, shape: &[usize]) -> Result<CudaDual> {
        // the hot case: a vector [L] repeated over rows [M, L]
        if x.primal.shape().len() == 1 && shape.len() == 2 && shape[1] == x.primal.shape()[0] {
            let primal = self.dev.broadcast_rows(&x.primal, shape)?;
            let tangent = match &x.tangent {
                Some(t) => Some(self.dev.broadcast_rows(t, &tangent_shape(shape, self.k))?),
                None => None,
            };
            return Ok(CudaDual { primal, tangent });
        }
        self.on_host(&[x], |e, v| e.broadcast_to(&v[0], shape))
    }

    fn softmax(&mut self, x: &CudaDual) -> Result<CudaDual> {
        self.on_host(&[x], |e, v| e.softmax(&v[0]))
    }

    fn log_softmax(&mut self, x: &CudaDual) -> Result<CudaDual> {
        self.on_host(&[x], |e, v| e.log_softmax(&v[0]))
    }
}

/// The kernels of a linear op on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinearPath {
    /// At most [`CudaDevice::NARROW`] output columns (a readout), every
    /// term's weights a matrix: `linear_narrow`, one launch per term.
    Narrow,
    /// One term (its index) not a small one, fused at its size: one
    /// `linear_dense` launch, the small terms folded in or added.
    Dense(usize),
    /// `linear_init` and cuBLAS GEMMs.
    Gemm,
}

/// The term folded into a linear op's first launch, if any: the first
/// with a few inner columns and a matrix (a network's input, a plant's
/// state); further ones are added by `linear_small_add`.
fn folded_term(terms: &[(&CudaDual, &CudaDual)]) -> Option<usize> {
    terms.iter().position(|(a, w)| {
        is_small_term(w) && a.primal.shape().last() == Some(&w.primal.shape()[0])
    })
}

/// A term whose weights have at most [`CudaDevice::SMALL_TERM`] rows (a
/// network's input, a plant's state): folded into the first launch, or
/// added by `linear_small_add`, not a GEMM.
fn is_small_term(w: &CudaDual) -> bool {
    w.primal.shape().len() == 2 && w.primal.shape()[0] <= CudaDevice::SMALL_TERM
}

/// Adds a linear op's terms with a few inner columns whose inputs have
/// tangents (a plant's state feeding a network) to its output `y` and
/// tangents `t`, one `linear_small_add` launch each.
fn add_small_terms(
    dev: &CudaDevice,
    y: &mut DevTensor,
    mut t: Option<&mut DevTensor>,
    k: usize,
    terms: &[(&CudaDual, &CudaDual)],
    scale: f32,
) -> Result<()> {
    for (a, w) in terms {
        dev.linear_small_add(
            y,
            t.as_deref_mut(),
            k,
            (&a.primal, a.tangent.as_ref()),
            (&w.primal, w.tangent.as_ref()),
            scale,
        )?;
    }
    Ok(())
}

/// Checks that a device exists, for tests that need one: prints a notice
/// and returns `None` where there is no GPU — or panics, where
/// SOFO_REQUIRE_GPU is set (a GPU run must not pass by skipping).
pub fn device_or_skip(test: &str) -> Option<Arc<CudaDevice>> {
    match CudaDevice::open(0) {
        Ok(d) => Some(d),
        Err(e) if std::env::var_os("SOFO_REQUIRE_GPU").is_some() => {
            panic!("{test}: SOFO_REQUIRE_GPU is set and no GPU opens ({e})")
        }
        Err(e) => {
            eprintln!("skipping {test}: no usable GPU ({e})");
            None
        }
    }
}

/// The `pointwise` kernel's words for a program: (op, a, b, scalar bits)
/// per step, op a unary code or 32 + a binary code, then the outputs.
pub fn program_code(p: &Pointwise) -> Vec<u32> {
    let mut words = Vec::with_capacity(4 * p.steps().len() + p.outputs().len());
    for s in p.steps() {
        words.extend(match *s {
            Step::Unary(op, a) => {
                let (c, scalar) = code(op);
                [c as u32, a as u32, 0, scalar.to_bits()]
            }
            Step::Binary(op, a, b) => [32 + binary_code(op) as u32, a as u32, b as u32, 0],
        });
    }
    words.extend(p.outputs().iter().map(|&o| o as u32));
    words
}

/// The `binary_fwd` / `binary_tangent` kernels' op code for an op.
pub fn binary_code(op: Binary) -> BinaryCode {
    match op {
        Binary::Add => BinaryCode::Add,
        Binary::Sub => BinaryCode::Sub,
        Binary::Mul => BinaryCode::Mul,
        Binary::Div => BinaryCode::Div,
    }
}
