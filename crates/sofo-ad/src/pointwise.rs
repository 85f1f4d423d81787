//! Elementwise programs: a plant's column arithmetic (an arm step: sines,
//! products, a 2×2 solve) recorded once as a list of elementwise ops and then
//! run as one op, [`Ops::pointwise`].
//!
//! A program is recorded by running the plant's own code (written against
//! [`Ops`] like everything else) on a [`Recorder`], whose values are
//! registers. Every engine can run the program op by op — the default of
//! [`Ops::pointwise`], exactly the ops the plant code issues, as the host's
//! forward engine does. The host's reverse tape keeps it as one node (values
//! and gradients entry by entry with its own scalar rules, in its own order:
//! the same numbers bit for bit, without a node per op); the GPU engines run
//! it as one kernel, value and K tangents (or its reverse sweep), instead of
//! one launch per op.
//!
//! The GPU kernels hold up to 64 registers (inputs and steps: the arm's
//! step takes 48, its hand 26) and 8 input values; a longer program runs op
//! by op there too — correct, one launch per op.
//!
//! Layout: a program with `n` inputs runs on `[.., L]` values; its inputs are
//! the column blocks of width L of the given values in order (a `[M, 4]` arm
//! state gives four `[M, 1]` inputs), L = (sum of the widths) / n. Its outputs
//! are joined side by side along the last axis, `[.., outputs·L]`.

use crate::ops::{Binary, Ops, Unary};
use sofo_tensor::{Float, Result, Tensor, TensorError};
use std::sync::{Arc, OnceLock};

/// A register of a program: input `i < inputs`, else the result of step
/// `i - inputs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reg(usize);

impl Reg {
    pub fn index(self) -> usize {
        self.0
    }
}

/// One step of a program, on earlier registers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    Unary(Unary, usize),
    Binary(Binary, usize, usize),
}

/// An elementwise program: `inputs` registers, then one register per step;
/// `outputs` names the registers returned. Cheap to clone (shared, never
/// changed): a tape keeps one per node, every step.
#[derive(Clone, Debug)]
pub struct Pointwise {
    inputs: usize,
    steps: Arc<[Step]>,
    outputs: Arc<[usize]>,
    /// The GPU kernels' words for it, made on first use and shared by the
    /// clones (not encoded again every time step).
    words: Arc<OnceLock<Vec<u32>>>,
}

/// Programs are equal when they compute the same: inputs, steps, outputs.
impl PartialEq for Pointwise {
    fn eq(&self, other: &Self) -> bool {
        (self.inputs, &self.steps, &self.outputs) == (other.inputs, &other.steps, &other.outputs)
    }
}

impl Pointwise {
    /// Records `f` run on `inputs` registers; `f` returns the output
    /// registers. Any op that is not elementwise on equal shapes (a matmul,
    /// a constant, a slice, …) is an error.
    ///
    /// A damped spring's Euler step, written once against [`Ops`] and run
    /// both ways:
    ///
    /// ```
    /// use sofo_ad::{Dual, Fwd, Ops, Pointwise, Result, Tensor, TensorError};
    ///
    /// /// (x, v) ← (x + dt·v, v − dt·(k·x + c·v))
    /// fn spring<E: Ops<f64>>(e: &mut E, x: &E::V, v: &E::V) -> Result<[E::V; 2]> {
    ///     let dt = 0.01;
    ///     let dx = e.mul_scalar(v, dt)?;
    ///     let kx = e.mul_scalar(x, 4.0)?;
    ///     let cv = e.mul_scalar(v, 0.5)?;
    ///     let f = e.add(&kx, &cv)?;
    ///     let dv = e.mul_scalar(&f, -dt)?;
    ///     Ok([e.add(x, &dx)?, e.add(v, &dv)?])
    /// }
    ///
    /// let step = Pointwise::record::<TensorError>(2, |rec, r| {
    ///     Ok(spring::<_>(rec, &r[0], &r[1])?.to_vec())
    /// })?;
    /// // a state [M, 2] (x, v per row) in, the next state [M, 2] out
    /// let mut e = Fwd::primal();
    /// let s = Dual::constant(Tensor::from_vec(&[2, 2], vec![1.0, 0.0, 0.5, 0.2])?);
    /// let next = e.pointwise(&step, &[&s])?;
    /// assert_eq!(next.primal.shape(), &[2, 2]);
    /// // the same as the code run op by op on columns
    /// let (x, v) = (e.slice(&s, 1, 0, 1)?, e.slice(&s, 1, 1, 1)?);
    /// let [x1, v1] = spring(&mut e, &x, &v)?;
    /// assert_eq!(next.primal.data(), e.concat(&[&x1, &v1], 1)?.primal.data());
    /// # Ok::<(), TensorError>(())
    /// ```
    pub fn record<E: From<TensorError>>(
        inputs: usize,
        f: impl FnOnce(&mut Recorder, &[Reg]) -> std::result::Result<Vec<Reg>, E>,
    ) -> std::result::Result<Pointwise, E> {
        if inputs == 0 {
            return Err(TensorError::arg("pointwise", "a program needs at least one input").into());
        }
        let mut rec = Recorder {
            inputs,
            steps: vec![],
        };
        let regs: Vec<Reg> = (0..inputs).map(Reg).collect();
        let outputs = f(&mut rec, &regs)?;
        if outputs.is_empty() {
            return Err(
                TensorError::arg("pointwise", "a program needs at least one output").into(),
            );
        }
        let n = inputs + rec.steps.len();
        if let Some(r) = outputs.iter().find(|r| r.0 >= n) {
            return Err(TensorError::arg(
                "pointwise",
                format!("output register {} of a program with {n} registers", r.0),
            )
            .into());
        }
        Ok(Pointwise {
            inputs,
            steps: rec.steps.into(),
            outputs: outputs.iter().map(|r| r.0).collect(),
            words: Arc::default(),
        })
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }
    /// The registers returned, in order.
    pub fn outputs(&self) -> &[usize] {
        &self.outputs
    }
    /// Inputs and steps.
    pub fn registers(&self) -> usize {
        self.inputs + self.steps.len()
    }

    /// The GPU kernels' words for the program (`cuda::program_code`, the
    /// one encoding there is), made by `encode` the first time and then
    /// kept with the program and its clones.
    pub fn words(&self, encode: impl FnOnce(&Pointwise) -> Vec<u32>) -> &[u32] {
        self.words.get_or_init(|| encode(self))
    }

    /// The element width L and the output shape for inputs of these shapes
    /// (see the module's layout), or why they do not fit the program.
    pub fn layout(&self, shapes: &[&[usize]]) -> Result<(usize, Vec<usize>)> {
        let bad = |why: String| TensorError::shape("pointwise", why, format!("{shapes:?}"));
        let Some(first) = shapes.first().filter(|s| !s.is_empty()) else {
            return Err(bad("at least one input of rank ≥ 1".into()));
        };
        let lead = &first[..first.len() - 1];
        if shapes
            .iter()
            .any(|s| s.len() != first.len() || &s[..s.len() - 1] != lead)
        {
            return Err(bad(format!("inputs [{lead:?}.., w] alike but in width")));
        }
        let total: usize = shapes.iter().map(|s| s[s.len() - 1]).sum();
        let l = total / self.inputs;
        if l == 0 || l * self.inputs != total || shapes.iter().any(|s| s[s.len() - 1] % l != 0) {
            return Err(bad(format!(
                "widths that split into {} column blocks of one width",
                self.inputs
            )));
        }
        let mut out = lead.to_vec();
        out.push(self.outputs.len() * l);
        Ok((l, out))
    }

    /// Runs the program op by op on `e` (what [`Ops::pointwise`] does unless
    /// an engine has a fused kernel for it).
    pub fn eval_ops<T: Float, E: Ops<T> + ?Sized>(&self, e: &mut E, xs: &[&E::V]) -> Result<E::V> {
        let shapes: Vec<&[usize]> = xs.iter().map(|x| e.shape(x)).collect();
        let (l, _) = self.layout(&shapes)?;
        let mut regs: Vec<E::V> = Vec::with_capacity(self.registers());
        for x in xs {
            let shape = e.shape(x);
            let (axis, w) = (shape.len() - 1, shape[shape.len() - 1]);
            if w == l {
                regs.push((*x).clone());
            } else {
                for c in 0..w / l {
                    let col = e.slice(x, axis, c * l, l)?;
                    regs.push(col);
                }
            }
        }
        for s in self.steps.iter() {
            let v = match *s {
                Step::Unary(op, a) => e.unary(&regs[a], op)?,
                Step::Binary(op, a, b) => e.binary(&regs[a], &regs[b], op)?,
            };
            regs.push(v);
        }
        if let [o] = self.outputs[..] {
            return Ok(regs.swap_remove(o));
        }
        let outs: Vec<&E::V> = self.outputs.iter().map(|&o| &regs[o]).collect();
        let axis = e.shape(outs[0]).len() - 1;
        e.concat(&outs, axis)
    }

    /// Which registers carry tangents when the inputs in `input_has` do:
    /// a step has them if an operand has (as in the forward engines, where
    /// an op on values without tangents gives none).
    pub fn tangent_registers(&self, input_has: &[bool]) -> Vec<bool> {
        let mut has = input_has.to_vec();
        has.resize(self.inputs, false);
        for s in self.steps.iter() {
            has.push(match *s {
                Step::Unary(_, a) => has[a],
                Step::Binary(_, a, b) => has[a] || has[b],
            });
        }
        has
    }
}

/// A program's registers at every entry of its `[.., L]` grid: what the
/// host tape keeps of a program node (its inputs) and recomputes the rest
/// from, entry by entry, with the scalar rules of the op-by-op engines.
pub(crate) struct Grid<'a, T: Float> {
    program: &'a Pointwise,
    inputs: Vec<&'a Tensor<T>>,
    /// Each input's width, the element width L and the rows before it.
    widths: Vec<usize>,
    l: usize,
    rows: usize,
}

impl<'a, T: Float> Grid<'a, T> {
    pub(crate) fn new(program: &'a Pointwise, inputs: Vec<&'a Tensor<T>>) -> Result<Self> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|x| x.shape()).collect();
        let (l, out) = program.layout(&shapes)?;
        let widths = shapes.iter().map(|s| s[s.len() - 1]).collect();
        let rows = out[..out.len() - 1].iter().product();
        Ok(Grid {
            program,
            inputs,
            widths,
            l,
            rows,
        })
    }

    /// The values of every register at entry (p, j), into `v`.
    fn values(&self, p: usize, j: usize, v: &mut Vec<T>) {
        v.clear();
        for (x, &w) in self.inputs.iter().zip(&self.widths) {
            for c in 0..w / self.l {
                v.push(x.data()[p * w + c * self.l + j]);
            }
        }
        for s in self.program.steps.iter() {
            let y = match *s {
                Step::Unary(op, a) => op.apply(v[a]),
                Step::Binary(op, a, b) => op.apply(v[a], v[b]),
            };
            v.push(y);
        }
    }

    /// The outputs `[.., outputs·L]`.
    pub(crate) fn output(&self) -> Tensor<T> {
        let n = self.program.outputs.len();
        let mut y = Tensor::scratch(&self.out_shape());
        let mut v = Vec::with_capacity(self.program.registers());
        for p in 0..self.rows {
            for j in 0..self.l {
                self.values(p, j, &mut v);
                for (o, &r) in self.program.outputs.iter().enumerate() {
                    y.data_mut()[(p * n + o) * self.l + j] = v[r];
                }
            }
        }
        y
    }

    fn out_shape(&self) -> Vec<usize> {
        let s = self.inputs[0].shape();
        let mut out = s[..s.len() - 1].to_vec();
        out.push(self.program.outputs.len() * self.l);
        out
    }

    /// The reverse rule: from the output's gradient `gy` and each input's
    /// gradient so far (`priors`, from ops after the program), each wanted
    /// input's gradient with the program's part added. The adjoints follow
    /// the reverse tape's rules and order (a register takes contributions
    /// only if it depends on an input that wants a gradient, passes them on
    /// only if it received any; later steps first; an input of width L adds
    /// its contributions onto its prior one by one, a column of a wider
    /// input adds their sum; an input that receives none and had none keeps
    /// none), so that a program node gives what its ops give one by one, bit
    /// for bit — but for the same value passed twice (summed apart) and the
    /// sign of a zero (a column's −0 stays −0 here, where the ops' zero-filled
    /// columns may add +0 to it).
    pub(crate) fn gradients(
        &self,
        gy: &Tensor<T>,
        wants: &[bool],
        priors: Vec<Option<Tensor<T>>>,
    ) -> Vec<Option<Tensor<T>>> {
        let prog = self.program;
        let column_wants: Vec<bool> = self
            .widths
            .iter()
            .zip(wants)
            .flat_map(|(&w, &want)| std::iter::repeat_n(want, w / self.l))
            .collect();
        let needs = prog.tangent_registers(&column_wants);
        let mut had_prior: Vec<bool> = priors.iter().map(Option::is_some).collect();
        had_prior.resize(self.inputs.len(), false);
        let mut grads: Vec<Option<Tensor<T>>> = self
            .inputs
            .iter()
            .zip(priors.into_iter().chain(std::iter::repeat_with(|| None)))
            .zip(wants)
            .map(|((x, prior), &w)| w.then(|| prior.unwrap_or_else(|| Tensor::zeros(x.shape()))))
            .collect();
        let whole = |i: usize| had_prior.get(i) == Some(&true) && self.widths[i] == self.l;
        let mut received = vec![false; self.inputs.len()];
        let n_out = prog.outputs.len();
        let n_in = prog.inputs;
        let mut v = Vec::with_capacity(prog.registers());
        let mut adj: Vec<Option<T>> = vec![None; prog.registers()];
        let add = |adj: &mut [Option<T>], r: usize, x: T| {
            if needs[r] {
                adj[r] = Some(match adj[r] {
                    Some(s) => s + x,
                    None => x,
                });
            }
        };
        for p in 0..self.rows {
            for j in 0..self.l {
                self.values(p, j, &mut v);
                adj.iter_mut().for_each(|a| *a = None);
                // inputs of width L start from their prior (one register,
                // entry p·L + j)
                let mut r = 0;
                for (i, &w) in self.widths.iter().enumerate() {
                    if let (true, Some(gx)) = (whole(i), &grads[i]) {
                        adj[r] = Some(gx.data()[p * w + j]);
                    }
                    r += w / self.l;
                }
                for (o, &r) in prog.outputs.iter().enumerate() {
                    add(&mut adj, r, gy.data()[(p * n_out + o) * self.l + j]);
                }
                for (s, step) in prog.steps.iter().enumerate().rev() {
                    let Some(g) = adj[n_in + s] else { continue };
                    match *step {
                        Step::Unary(op, a) => {
                            add(&mut adj, a, g * op.derivative(v[a], v[n_in + s]))
                        }
                        Step::Binary(op, a, b) => {
                            let (x, y) = (v[a], v[b]);
                            let ga = match op {
                                Binary::Add | Binary::Sub => g,
                                Binary::Mul => g * y,
                                Binary::Div => g / y,
                            };
                            add(&mut adj, a, ga);
                            let gb = match op {
                                Binary::Add => g,
                                Binary::Sub => g * -T::one(),
                                Binary::Mul => g * x,
                                Binary::Div => g * (-x / (y * y)),
                            };
                            add(&mut adj, b, gb);
                        }
                    }
                }
                let mut r = 0;
                for (i, (gx, &w)) in grads.iter_mut().zip(&self.widths).enumerate() {
                    for c in 0..w / self.l {
                        if let (Some(gx), Some(a)) = (gx.as_mut(), adj[r]) {
                            let e = &mut gx.data_mut()[p * w + c * self.l + j];
                            *e = if whole(i) || !had_prior[i] { a } else { *e + a };
                            received[i] = true;
                        }
                        r += 1;
                    }
                }
            }
        }
        // nothing received and nothing before: no gradient, as on the tape
        for (gx, (&got, &had)) in grads.iter_mut().zip(received.iter().zip(&had_prior)) {
            if !got && !had {
                *gx = None;
            }
        }
        grads
    }
}

/// The engine that records a [`Pointwise`] program: its values are
/// registers, its elementwise ops steps; other ops are errors.
pub struct Recorder {
    inputs: usize,
    steps: Vec<Step>,
}

impl Recorder {
    fn push(&mut self, s: Step) -> Result<Reg> {
        let n = self.inputs + self.steps.len();
        let ok = match s {
            Step::Unary(_, a) => a < n,
            Step::Binary(_, a, b) => a < n && b < n,
        };
        if !ok {
            return Err(TensorError::arg(
                "pointwise",
                format!("{s:?} reads a register of another program ({n} so far)"),
            ));
        }
        self.steps.push(s);
        Ok(Reg(n))
    }
}

fn not_elementwise<V>(op: &str) -> Result<V> {
    Err(TensorError::arg(
        "pointwise",
        format!("{op} is not an elementwise op on equal shapes: it cannot be part of a program"),
    ))
}

impl<T: Float> Ops<T> for Recorder {
    type V = Reg;

    fn constant(&mut self, _: Tensor<T>) -> Result<Reg> {
        not_elementwise("a constant (pass it as an input)")
    }
    /// A register is one element of the program's grid.
    fn shape<'a>(&self, _: &'a Reg) -> &'a [usize] {
        &[]
    }
    fn to_host(&mut self, _: &Reg) -> Result<Tensor<T>> {
        not_elementwise("to_host")
    }
    fn unary(&mut self, x: &Reg, op: Unary) -> Result<Reg> {
        self.push(Step::Unary(op, x.0))
    }
    fn binary(&mut self, a: &Reg, b: &Reg, op: Binary) -> Result<Reg> {
        self.push(Step::Binary(op, a.0, b.0))
    }
    fn matmul(&mut self, _: &Reg, _: &Reg) -> Result<Reg> {
        not_elementwise("matmul")
    }
    fn linear(
        &mut self,
        _: Option<(&Reg, T)>,
        _: T,
        _: &[(&Reg, &Reg)],
        _: Option<&Reg>,
    ) -> Result<Reg> {
        not_elementwise("linear")
    }
    fn sum(&mut self, _: &Reg, _: &[usize]) -> Result<Reg> {
        not_elementwise("sum")
    }
    fn concat(&mut self, _: &[&Reg], _: usize) -> Result<Reg> {
        not_elementwise("concat")
    }
    fn slice(&mut self, _: &Reg, _: usize, _: usize, _: usize) -> Result<Reg> {
        not_elementwise("slice")
    }
    fn reshape(&mut self, _: &Reg, _: &[usize]) -> Result<Reg> {
        not_elementwise("reshape")
    }
    fn transpose(&mut self, _: &Reg, _: usize, _: usize) -> Result<Reg> {
        not_elementwise("transpose")
    }
    fn broadcast_to(&mut self, _: &Reg, _: &[usize]) -> Result<Reg> {
        not_elementwise("broadcast_to")
    }
    fn softmax(&mut self, _: &Reg) -> Result<Reg> {
        not_elementwise("softmax")
    }
    fn log_softmax(&mut self, _: &Reg) -> Result<Reg> {
        not_elementwise("log_softmax")
    }
}
