use crate::pointwise::Pointwise;
use sofo_tensor::{Float, Result, Tensor};

/// Elementwise unary ops.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Unary {
    Neg,
    Abs,
    Exp,
    Log,
    Tanh,
    Relu,
    Softplus,
    Sigmoid,
    Square,
    Sqrt,
    Sin,
    Cos,
    AddScalar(f64),
    MulScalar(f64),
}

impl Unary {
    /// Every op of the vocabulary, the scalar ones with `add` and `mul`:
    /// for tests that sweep them all.
    pub fn all(add: f64, mul: f64) -> [Unary; 14] {
        use Unary::*;
        let all = [
            Neg,
            Abs,
            Exp,
            Log,
            Tanh,
            Relu,
            Softplus,
            Sigmoid,
            Square,
            Sqrt,
            Sin,
            Cos,
            AddScalar(add),
            MulScalar(mul),
        ];
        // a new op breaks this match: add it to the list above as well
        for u in all {
            match u {
                Neg | Abs | Exp | Log | Tanh | Relu | Softplus | Sigmoid | Square | Sqrt | Sin
                | Cos | AddScalar(_) | MulScalar(_) => {}
            }
        }
        all
    }

    pub fn apply<T: Float>(self, x: T) -> T {
        match self {
            Unary::Neg => -x,
            Unary::Abs => x.abs(),
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Tanh => x.tanh(),
            Unary::Relu => x.max(T::zero()),
            Unary::Softplus => {
                // log(1 + e^x) without overflow
                x.max(T::zero()) + (T::one() + (-x.abs()).exp()).ln()
            }
            Unary::Sigmoid => sigmoid(x),
            Unary::Square => x * x,
            Unary::Sqrt => x.sqrt(),
            Unary::Sin => x.sin(),
            Unary::Cos => x.cos(),
            Unary::AddScalar(s) => x + T::from_f64(s),
            Unary::MulScalar(s) => x * T::from_f64(s),
        }
    }

    /// dy/dx given the input `x` and the output `y`.
    pub fn derivative<T: Float>(self, x: T, y: T) -> T {
        let two = T::from_f64(2.0);
        match self {
            Unary::Neg => -T::one(),
            // the subgradient 0 at x = 0
            Unary::Abs => {
                if x > T::zero() {
                    T::one()
                } else if x < T::zero() {
                    -T::one()
                } else {
                    T::zero()
                }
            }
            Unary::Exp => y,
            Unary::Log => T::one() / x,
            Unary::Tanh => T::one() - y * y,
            Unary::Relu => {
                if x > T::zero() {
                    T::one()
                } else {
                    T::zero()
                }
            }
            Unary::Softplus => sigmoid(x),
            Unary::Sigmoid => y * (T::one() - y),
            Unary::Square => two * x,
            Unary::Sqrt => T::one() / (two * y),
            Unary::Sin => x.cos(),
            Unary::Cos => -x.sin(),
            Unary::AddScalar(_) => T::one(),
            Unary::MulScalar(s) => T::from_f64(s),
        }
    }
}

fn sigmoid<T: Float>(x: T) -> T {
    if x >= T::zero() {
        T::one() / (T::one() + (-x).exp())
    } else {
        let e = x.exp();
        e / (T::one() + e)
    }
}

/// Elementwise binary ops (numpy broadcasting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
}

impl Binary {
    pub fn apply<T: Float>(self, a: T, b: T) -> T {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
        }
    }
}

/// The op vocabulary. Every model, loss and plant is written against it once.
///
/// Values are owned handles (`Self::V`); ops borrow their inputs and return a
/// new value. Shapes follow the tensor layer: row-major, numpy broadcasting
/// for the binary ops, `matmul` as [.., m, k] · [k, n].
pub trait Ops<T: Float> {
    type V: Clone;

    /// A value that carries no derivative (data, targets, fixed weights).
    fn constant(&mut self, t: Tensor<T>) -> Result<Self::V>;
    /// How many steps' constants (inputs, noise) of `block_len` elements
    /// each the engine would rather take at once through
    /// [`Ops::constant_block`]: one on the host; many on a device, where each
    /// copy is a round trip over the bus (fewer of large blocks).
    fn block_steps(&self, block_len: usize) -> usize {
        let _ = block_len;
        1
    }
    /// The constant `shape` made of the elements [offset, offset + n) of
    /// `whole` (a step's block of a batch's inputs). An engine on a device
    /// may copy `whole` over a chunk of blocks at a time instead of one block
    /// per call; by default the block is copied out and made a constant.
    fn constant_block(
        &mut self,
        whole: &Tensor<T>,
        offset: usize,
        shape: &[usize],
    ) -> Result<Self::V> {
        let n = shape.iter().product::<usize>();
        let data = whole.data().get(offset..offset + n).ok_or_else(|| {
            sofo_tensor::TensorError::shape(
                "constant_block",
                format!("{n} elements from {offset} of {}", whole.numel()),
                format!("{shape:?}"),
            )
        })?;
        self.constant(Tensor::from_vec(shape, data.to_vec())?)
    }
    /// The shape of a value.
    fn shape<'a>(&self, v: &'a Self::V) -> &'a [usize];
    /// A host copy of the primal value.
    fn to_host(&mut self, v: &Self::V) -> Result<Tensor<T>>;

    fn unary(&mut self, x: &Self::V, op: Unary) -> Result<Self::V>;
    fn binary(&mut self, a: &Self::V, b: &Self::V, op: Binary) -> Result<Self::V>;
    fn matmul(&mut self, a: &Self::V, b: &Self::V) -> Result<Self::V>;

    /// The affine map of a rate network, fused:
    /// `leak_c · x + scale · (Σ_i a_i · W_i + bias)` where `leak = Some((x, leak_c))`.
    /// With `leak = None` it is `scale · (Σ_i a_i · W_i + bias)`.
    fn linear(
        &mut self,
        leak: Option<(&Self::V, T)>,
        scale: T,
        terms: &[(&Self::V, &Self::V)],
        bias: Option<&Self::V>,
    ) -> Result<Self::V>;

    /// `linear` whose first term's input is `f(x)`, or `f(x) ⊙ c` with a
    /// factor: `leak_c · l + scale · (f(x) ⊙ c · W + Σ_i a_i · W_i + bias)`
    /// for `first = (x, f, c, W)` (a rate network's φ(x) · W, its readout
    /// φ(x) · C, the rates' noise c). By default `unary` (or `unary_mul`)
    /// then `linear`, exactly. An engine that says so with
    /// [`Ops::fuses_unary_into_linear`] applies f (and f′ to the tangents)
    /// as it reads x, so that f(x) and its tangents are never stored.
    fn linear_of_unary(
        &mut self,
        leak: Option<(&Self::V, T)>,
        scale: T,
        first: (&Self::V, Unary, Option<&Self::V>, &Self::V),
        terms: &[(&Self::V, &Self::V)],
        bias: Option<&Self::V>,
    ) -> Result<Self::V> {
        let (x, op, c, w) = first;
        let fx = match c {
            Some(c) => self.unary_mul(x, op, c)?,
            None => self.unary(x, op)?,
        };
        let mut all = Vec::with_capacity(terms.len() + 1);
        all.push((&fx, w));
        all.extend_from_slice(terms);
        self.linear(leak, scale, &all, bias)
    }

    /// f of a linear op, the leak outside f: `leak_c · x + f(scale · (Σ_i
    /// a_i · W_i + bias))` for `leak = Some((x, leak_c))` (a leaky network
    /// whose nonlinearity follows its recurrence, the Kalman task's z ←
    /// (1 − α) z + relu(α (z W + u B + b))). By default `linear`, `unary`,
    /// then `mul_scalar` and `add` for the leak, exactly; an engine on a
    /// device may apply f, f′ and the leak as it writes the linear op.
    fn unary_of_linear(
        &mut self,
        leak: Option<(&Self::V, T)>,
        scale: T,
        op: Unary,
        terms: &[(&Self::V, &Self::V)],
        bias: Option<&Self::V>,
    ) -> Result<Self::V> {
        unary_of_linear_by_ops(self, leak, scale, op, terms, bias)
    }

    /// Whether [`Ops::linear_of_unary`] with a first term's weight of
    /// `[kd, n]` reads f(x) on the fly instead of computing and storing
    /// it: then a model that uses f(x) in several linear ops (its
    /// recurrence's weight asked for) should pass x to each rather than
    /// compute f(x) once. False by default (computing f(x) once is cheaper
    /// there).
    fn fuses_unary_into_linear(&self, kd: usize, n: usize) -> bool {
        let _ = (kd, n);
        false
    }

    /// `f(x) ⊙ c` for a value `c` of x's shape (a noise mask): by default
    /// `unary` then `mul`, exactly; an engine on a device may fuse the two
    /// where `c` is a constant.
    fn unary_mul(&mut self, x: &Self::V, op: Unary, c: &Self::V) -> Result<Self::V> {
        let y = self.unary(x, op)?;
        self.mul(&y, c)
    }

    /// Runs an elementwise program ([`Pointwise`]: a plant's column
    /// arithmetic recorded once) on `inputs`, its outputs joined along the
    /// last axis. By default op by op, exactly the ops the program recorded;
    /// an engine on a device may run it as one kernel.
    fn pointwise(&mut self, program: &Pointwise, inputs: &[&Self::V]) -> Result<Self::V> {
        program.eval_ops::<T, Self>(self, inputs)
    }

    /// Sum over `axes` (removed from the shape).
    fn sum(&mut self, x: &Self::V, axes: &[usize]) -> Result<Self::V>;
    fn concat(&mut self, xs: &[&Self::V], axis: usize) -> Result<Self::V>;
    fn slice(&mut self, x: &Self::V, axis: usize, start: usize, len: usize) -> Result<Self::V>;
    fn reshape(&mut self, x: &Self::V, shape: &[usize]) -> Result<Self::V>;
    fn transpose(&mut self, x: &Self::V, a: usize, b: usize) -> Result<Self::V>;
    fn broadcast_to(&mut self, x: &Self::V, shape: &[usize]) -> Result<Self::V>;
    /// Softmax over the last axis.
    fn softmax(&mut self, x: &Self::V) -> Result<Self::V>;
    /// Log-softmax over the last axis.
    fn log_softmax(&mut self, x: &Self::V) -> Result<Self::V>;

    // Conveniences, all in terms of the ops above.
    fn neg(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Neg)
    }
    fn abs(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Abs)
    }
    fn exp(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Exp)
    }
    fn log(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Log)
    }
    fn tanh(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Tanh)
    }
    fn relu(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Relu)
    }
    fn softplus(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Softplus)
    }
    fn sigmoid(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Sigmoid)
    }
    fn square(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Square)
    }
    fn sqrt(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Sqrt)
    }
    fn sin(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Sin)
    }
    fn cos(&mut self, x: &Self::V) -> Result<Self::V> {
        self.unary(x, Unary::Cos)
    }
    fn add_scalar(&mut self, x: &Self::V, s: f64) -> Result<Self::V> {
        self.unary(x, Unary::AddScalar(s))
    }
    fn mul_scalar(&mut self, x: &Self::V, s: f64) -> Result<Self::V> {
        self.unary(x, Unary::MulScalar(s))
    }
    fn add(&mut self, a: &Self::V, b: &Self::V) -> Result<Self::V> {
        self.binary(a, b, Binary::Add)
    }
    fn sub(&mut self, a: &Self::V, b: &Self::V) -> Result<Self::V> {
        self.binary(a, b, Binary::Sub)
    }
    fn mul(&mut self, a: &Self::V, b: &Self::V) -> Result<Self::V> {
        self.binary(a, b, Binary::Mul)
    }
    fn div(&mut self, a: &Self::V, b: &Self::V) -> Result<Self::V> {
        self.binary(a, b, Binary::Div)
    }
    /// Mean over `axes`.
    fn mean(&mut self, x: &Self::V, axes: &[usize]) -> Result<Self::V> {
        let shape = self.shape(x).to_vec();
        let n: usize = axes
            .iter()
            .map(|&a| shape.get(a).copied().unwrap_or(1))
            .product();
        let s = self.sum(x, axes)?;
        self.mul_scalar(&s, 1.0 / n.max(1) as f64)
    }
}

/// [`Ops::unary_of_linear`] op by op: `linear`, `unary`, then the leak's
/// `mul_scalar` and `add` (the default, and a device engine's fallback).
pub(crate) fn unary_of_linear_by_ops<T: Float, E: Ops<T> + ?Sized>(
    e: &mut E,
    leak: Option<(&E::V, T)>,
    scale: T,
    op: Unary,
    terms: &[(&E::V, &E::V)],
    bias: Option<&E::V>,
) -> Result<E::V> {
    let pre = e.linear(None, scale, terms, bias)?;
    let fy = e.unary(&pre, op)?;
    match leak {
        None => Ok(fy),
        Some((x, c)) => {
            let kept = e.mul_scalar(x, c.to_f64())?;
            e.add(&kept, &fy)
        }
    }
}
