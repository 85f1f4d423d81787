//! Forward mode with K tangents carried in one tensor (see [`crate::layout`]).

use crate::layout::{from_canonical, split3, tangent_shape, to_canonical};
use crate::ops::{Binary, Ops, Unary};
use sofo_tensor::backend::{Cpu, Gemm, Kernels, Mat};
use sofo_tensor::{Float, Result, Tensor, TensorError};

/// A primal value and its K tangents (`None`: all tangents are zero).
#[derive(Clone, Debug)]
pub struct Dual<T: Float> {
    pub primal: Tensor<T>,
    pub tangent: Option<Tensor<T>>,
}

impl<T: Float> Dual<T> {
    pub fn constant(primal: Tensor<T>) -> Self {
        Dual {
            primal,
            tangent: None,
        }
    }
}

/// The forward-K engine. With `k = 0` nothing carries a tangent and it is a
/// plain primal evaluator.
#[derive(Debug, Clone, Copy)]
pub struct Fwd {
    k: usize,
}

impl Fwd {
    pub fn new(k: usize) -> Self {
        Fwd { k }
    }
    /// A primal-only evaluator.
    pub fn primal() -> Self {
        Fwd { k: 0 }
    }
    pub fn k(&self) -> usize {
        self.k
    }

    /// A value with given tangents (layout of [`crate::layout`]).
    pub fn dual<T: Float>(&self, primal: Tensor<T>, tangent: Tensor<T>) -> Result<Dual<T>> {
        let want = tangent_shape(primal.shape(), self.k);
        if tangent.shape() != want.as_slice() {
            return Err(TensorError::shape(
                "Fwd::dual",
                format!(
                    "tangents {want:?} for a primal of shape {:?}",
                    primal.shape()
                ),
                format!("{:?}", tangent.shape()),
            ));
        }
        Ok(Dual {
            primal,
            tangent: Some(tangent),
        })
    }

    fn canonical_or_zeros<T: Float>(&self, v: &Dual<T>) -> Result<Tensor<T>> {
        let shape = v.primal.shape();
        match &v.tangent {
            Some(t) => to_canonical(t, shape, self.k),
            None => {
                let mut s = vec![self.k];
                s.extend_from_slice(shape);
                Ok(Tensor::zeros(&s))
            }
        }
    }

    /// The tangent rule of a linear op, applied in the canonical layout.
    fn linear_rule<T: Float>(
        &self,
        primal: Tensor<T>,
        inputs: &[&Dual<T>],
        f: impl Fn(&[&Tensor<T>]) -> Result<Tensor<T>>,
    ) -> Result<Dual<T>> {
        if inputs.iter().all(|v| v.tangent.is_none()) {
            return Ok(Dual::constant(primal));
        }
        let cs: Vec<Tensor<T>> = inputs
            .iter()
            .map(|v| self.canonical_or_zeros(v))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor<T>> = cs.iter().collect();
        let tc = f(&refs)?;
        let t = from_canonical(&tc, self.k)?;
        Ok(Dual {
            primal,
            tangent: Some(t),
        })
    }
}

/// The axis of a value's tangents ([`crate::layout`]) that holds its axis
/// `axis` (of `rank`): the same, but for the last axis, which K precedes.
fn tangent_axis(rank: usize, axis: usize) -> usize {
    if axis + 1 == rank {
        axis + 1
    } else {
        axis
    }
}

/// Checks the shapes of a `linear` op: (input, weight) pairs, bias, leak.
/// Returns (output shape, rows before the last axis, output width n).
pub fn linear_shapes(
    terms: &[(&[usize], &[usize])],
    bias: Option<&[usize]>,
    leak: Option<&[usize]>,
) -> Result<(Vec<usize>, usize, usize)> {
    let (a0, w0) = terms
        .first()
        .ok_or_else(|| TensorError::arg("linear", "needs at least one (input, weight) term"))?;
    if w0.len() != 2 {
        return Err(TensorError::shape(
            "linear",
            "a weight of rank 2",
            format!("{w0:?}"),
        ));
    }
    let n = w0[1];
    let mut out_shape = a0.to_vec();
    if out_shape.is_empty() {
        return Err(TensorError::shape(
            "linear",
            "an input of rank ≥ 1",
            "a scalar",
        ));
    }
    *out_shape.last_mut().unwrap() = n;
    let rows: usize = out_shape[..out_shape.len() - 1].iter().product();
    for (a, w) in terms {
        let ra = a.len();
        let ok = w.len() == 2
            && ra == out_shape.len()
            && a[..ra - 1] == out_shape[..ra - 1]
            && a[ra - 1] == w[0]
            && w[1] == n;
        if !ok {
            return Err(TensorError::shape(
                "linear",
                format!("input [.., k] and weight [k, {n}] giving {out_shape:?}"),
                format!("{a:?} · {w:?}"),
            ));
        }
    }
    if let Some(b) = bias {
        if b != [n] {
            return Err(TensorError::shape(
                "linear bias",
                format!("[{n}]"),
                format!("{b:?}"),
            ));
        }
    }
    if let Some(x) = leak {
        if x != out_shape.as_slice() {
            return Err(TensorError::shape(
                "linear leak",
                format!("{out_shape:?}"),
                format!("{x:?}"),
            ));
        }
    }
    Ok((out_shape, rows, n))
}

/// out[p, k, l] = d[p, l] · t[p, k, l]. One task per primal row p (its K·L
/// tangent entries): with L = 1 (the columns of a plant) a row of L alone
/// would cost a closure call per element.
fn scale_rows<T: Float>(d: &[T], t: &Tensor<T>, k: usize, l: usize) -> Tensor<T> {
    let mut out = Tensor::scratch(t.shape());
    let src = t.data();
    let kl = k * l;
    Cpu.for_rows(out.data_mut(), kl, |p, block| {
        let dr = &d[p * l..(p + 1) * l];
        let sr = &src[p * kl..(p + 1) * kl];
        if l == 1 {
            let s = dr[0];
            for (o, &x) in block.iter_mut().zip(sr) {
                *o = s * x;
            }
        } else {
            for (o, x) in block.chunks_exact_mut(l).zip(sr.chunks_exact(l)) {
                for j in 0..l {
                    o[j] = dr[j] * x[j];
                }
            }
        }
    });
    out
}

/// Tangents of y = a op b on equal shapes in one pass, each batch row's
/// partials applied to its K tangent rows (no broadcast copies). The
/// partials are computed once per primal element (not once per tangent),
/// and the inner loops are free of branches so that they vectorise.
fn same_shape_tangent<T: Float>(op: Binary, a: &Dual<T>, b: &Dual<T>, k: usize) -> Tensor<T> {
    let (_, _, l) = split3(a.primal.shape(), k);
    let shape = tangent_shape(a.primal.shape(), k);
    let mut out = Tensor::scratch(&shape);
    let (ap, bp) = (a.primal.data(), b.primal.data());
    // ∂y/∂a and ∂y/∂b per primal element
    let partials =
        |f: fn(T, T) -> T| -> Vec<T> { ap.iter().zip(bp).map(|(&x, &y)| f(x, y)).collect() };
    let (da, db): (Vec<T>, Vec<T>) = match op {
        Binary::Add => (vec![T::one(); ap.len()], vec![T::one(); ap.len()]),
        Binary::Sub => (vec![T::one(); ap.len()], vec![-T::one(); ap.len()]),
        Binary::Mul => (bp.to_vec(), ap.to_vec()),
        Binary::Div => (partials(|_, y| T::one() / y), partials(|x, y| -x / (y * y))),
    };
    let kl = k * l;
    let (ta, tb) = (
        a.tangent.as_ref().map(|t| t.data()),
        b.tangent.as_ref().map(|t| t.data()),
    );
    // o = p·u + q·v over one tangent row, with p, q per element (or, for a
    // width-1 value such as an arm's column, one p, q for all K tangents)
    fn both<T: Float>(o: &mut [T], p: &[T], q: &[T], u: &[T], v: &[T]) {
        for ((((o, &p), &q), &u), &v) in o.iter_mut().zip(p).zip(q).zip(u).zip(v) {
            *o = p * u + q * v;
        }
    }
    fn one<T: Float>(o: &mut [T], p: &[T], u: &[T]) {
        for ((o, &p), &u) in o.iter_mut().zip(p).zip(u) {
            *o = p * u;
        }
    }
    Cpu.for_rows(out.data_mut(), kl, |r, block| {
        let (dr, er) = (&da[r * l..(r + 1) * l], &db[r * l..(r + 1) * l]);
        let ta = ta.map(|t| &t[r * kl..(r + 1) * kl]);
        let tb = tb.map(|t| &t[r * kl..(r + 1) * kl]);
        if l == 1 {
            let (p, q) = (dr[0], er[0]);
            match (ta, tb) {
                (Some(u), Some(v)) => {
                    for ((o, &u), &v) in block.iter_mut().zip(u).zip(v) {
                        *o = p * u + q * v;
                    }
                }
                (Some(u), None) => block.iter_mut().zip(u).for_each(|(o, &u)| *o = p * u),
                (None, Some(v)) => block.iter_mut().zip(v).for_each(|(o, &v)| *o = q * v),
                (None, None) => block.fill(T::zero()),
            }
            return;
        }
        for (kk, o) in block.chunks_exact_mut(l).enumerate() {
            let span = kk * l..(kk + 1) * l;
            match (ta, tb) {
                (Some(u), Some(v)) => both(o, dr, er, &u[span.clone()], &v[span]),
                (Some(u), None) => one(o, dr, &u[span]),
                (None, Some(v)) => one(o, er, &v[span]),
                (None, None) => o.fill(T::zero()),
            }
        }
    });
    out
}

impl<T: Float> Ops<T> for Fwd {
    type V = Dual<T>;

    fn constant(&mut self, t: Tensor<T>) -> Result<Dual<T>> {
        Ok(Dual::constant(t))
    }

    fn shape<'a>(&self, v: &'a Dual<T>) -> &'a [usize] {
        v.primal.shape()
    }

    fn to_host(&mut self, v: &Dual<T>) -> Result<Tensor<T>> {
        Ok(v.primal.clone())
    }

    fn unary(&mut self, x: &Dual<T>, op: Unary) -> Result<Dual<T>> {
        let y = x.primal.map(|v| op.apply(v));
        let tangent = match &x.tangent {
            None => None,
            Some(t) => Some(match op {
                Unary::AddScalar(_) => t.clone(),
                Unary::Neg | Unary::MulScalar(_) => {
                    let s = op.derivative(T::zero(), T::zero());
                    t.scale(s)
                }
                _ => {
                    let mut d = Tensor::scratch(x.primal.shape());
                    Cpu.zip_into(x.primal.data(), y.data(), d.data_mut(), |a, b| {
                        op.derivative(a, b)
                    });
                    let (_, k, l) = split3(x.primal.shape(), self.k);
                    scale_rows(d.data(), t, k, l)
                }
            }),
        };
        Ok(Dual { primal: y, tangent })
    }

    fn binary(&mut self, a: &Dual<T>, b: &Dual<T>, op: Binary) -> Result<Dual<T>> {
        let name = match op {
            Binary::Add => "add",
            Binary::Sub => "sub",
            Binary::Mul => "mul",
            Binary::Div => "div",
        };
        let y = a
            .primal
            .broadcast_zip(&b.primal, name, |u, v| op.apply(u, v))?;
        if a.tangent.is_none() && b.tangent.is_none() {
            return Ok(Dual::constant(y));
        }
        if a.primal.shape() == b.primal.shape() {
            return Ok(Dual {
                tangent: Some(same_shape_tangent(op, a, b, self.k)),
                primal: y,
            });
        }
        // Partials ∂y/∂a and ∂y/∂b at the output's shape.
        let shape = y.shape().to_vec();
        let ab = a.primal.broadcast_to(&shape)?;
        let bb = b.primal.broadcast_to(&shape)?;
        let partial = |wrt_a: bool| -> Result<Tensor<T>> {
            Ok(match (op, wrt_a) {
                (Binary::Add, _) => Tensor::full(&shape, T::one()),
                (Binary::Sub, true) => Tensor::full(&shape, T::one()),
                (Binary::Sub, false) => Tensor::full(&shape, -T::one()),
                (Binary::Mul, true) => bb.clone(),
                (Binary::Mul, false) => ab.clone(),
                (Binary::Div, true) => bb.map(|v| T::one() / v),
                (Binary::Div, false) => ab.zip_map(&bb, "div", |u, v| -u / (v * v))?,
            })
        };
        let (_, k, l) = split3(&shape, self.k);
        let mut out: Option<Tensor<T>> = None;
        for (v, wrt_a) in [(a, true), (b, false)] {
            let Some(t) = &v.tangent else { continue };
            // tangents of this operand at the output's shape, in layout
            let tb = if v.primal.shape() == shape.as_slice() {
                t.clone()
            } else {
                let c = to_canonical(t, v.primal.shape(), self.k)?;
                let mut padded = vec![self.k];
                padded.extend(std::iter::repeat_n(1, shape.len() - v.primal.rank()));
                padded.extend_from_slice(v.primal.shape());
                let mut full = vec![self.k];
                full.extend_from_slice(&shape);
                from_canonical(&c.reshape(&padded)?.broadcast_to(&full)?, self.k)?
            };
            let term = scale_rows(partial(wrt_a)?.data(), &tb, k, l);
            out = Some(match out {
                None => term,
                Some(mut o) => {
                    o.axpy(T::one(), &term)?;
                    o
                }
            });
        }
        Ok(Dual {
            primal: y,
            tangent: out,
        })
    }

    fn matmul(&mut self, a: &Dual<T>, b: &Dual<T>) -> Result<Dual<T>> {
        let y = a.primal.matmul(&b.primal)?;
        if a.tangent.is_none() && b.tangent.is_none() {
            return Ok(Dual::constant(y));
        }
        let kdim = b.primal.shape()[0];
        let n = b.primal.shape()[1];
        // rows from the leading extents: numel / kdim would be 0 when kdim = 0
        let rows: usize = a.primal.shape()[..a.primal.rank() - 1].iter().product();
        let k = self.k;
        let mut t = Tensor::scratch(&tangent_shape(y.shape(), k));
        let mut written = false;
        if let Some(at) = &a.tangent {
            // ȧ · b over all R·K rows at once
            Cpu.gemm(
                Gemm::new(rows * k, n, kdim),
                t.data_mut(),
                Mat::row_major(n),
                None,
                at.data(),
                Mat::row_major(kdim),
                b.primal.data(),
                Mat::row_major(n),
                T::one(),
            );
            written = true;
        }
        if let Some(bt) = &b.tangent {
            // a · [ḃ_1 … ḃ_K] as one GEMM; the result is already in layout
            Cpu.gemm(
                Gemm::new(rows, k * n, kdim),
                t.data_mut(),
                Mat::row_major(k * n),
                written.then_some(T::one()),
                a.primal.data(),
                Mat::row_major(kdim),
                bt.data(),
                Mat::row_major(k * n),
                T::one(),
            );
        }
        Ok(Dual {
            primal: y,
            tangent: Some(t),
        })
    }

    fn linear(
        &mut self,
        leak: Option<(&Dual<T>, T)>,
        scale: T,
        terms: &[(&Dual<T>, &Dual<T>)],
        bias: Option<&Dual<T>>,
    ) -> Result<Dual<T>> {
        let shapes: Vec<(&[usize], &[usize])> = terms
            .iter()
            .map(|(a, w)| (a.primal.shape(), w.primal.shape()))
            .collect();
        let (out_shape, rows, n) = linear_shapes(
            &shapes,
            bias.map(|b| b.primal.shape()),
            leak.map(|(x, _)| x.primal.shape()),
        )?;

        // primal: init with leak and bias, then accumulate the products
        let mut y = Tensor::scratch(&out_shape);
        {
            let bias_d = bias.map(|b| b.primal.data());
            let x_d = leak.map(|(x, c)| (x.primal.data(), c));
            Cpu.for_rows(y.data_mut(), n, |r, row| {
                for j in 0..n {
                    let mut v = match bias_d {
                        Some(b) => scale * b[j],
                        None => T::zero(),
                    };
                    if let Some((x, c)) = x_d {
                        v += c * x[r * n + j];
                    }
                    row[j] = v;
                }
            });
        }
        for (a, w) in terms {
            let kd = w.primal.shape()[0];
            Cpu.gemm(
                Gemm::new(rows, n, kd),
                y.data_mut(),
                Mat::row_major(n),
                Some(T::one()),
                a.primal.data(),
                Mat::row_major(kd),
                w.primal.data(),
                Mat::row_major(n),
                scale,
            );
        }

        let any_tangent = terms
            .iter()
            .any(|(a, w)| a.tangent.is_some() || w.tangent.is_some())
            || bias.is_some_and(|b| b.tangent.is_some())
            || leak.is_some_and(|(x, _)| x.tangent.is_some());
        if !any_tangent {
            return Ok(Dual::constant(y));
        }
        let k = self.k;
        let mut t = Tensor::scratch(&tangent_shape(&out_shape, k));
        {
            let bias_t = bias.and_then(|b| b.tangent.as_ref()).map(|t| t.data());
            let x_t = leak.and_then(|(x, c)| x.tangent.as_ref().map(|t| (t.data(), c)));
            // one task per batch row r: its K tangent rows (r, kk) at
            // offset kk·n of the block (narrow outputs would otherwise cost
            // a closure call per element)
            let kn = k * n;
            Cpu.for_rows(t.data_mut(), kn, |r, block| {
                let xb = x_t.map(|(x, c)| (&x[r * kn..(r + 1) * kn], c));
                match (bias_t, xb) {
                    (None, None) => block.fill(T::zero()),
                    (Some(b), None) => {
                        for (o, &bv) in block.iter_mut().zip(&b[..kn]) {
                            *o = scale * bv;
                        }
                    }
                    (None, Some((x, c))) => {
                        for (o, &xv) in block.iter_mut().zip(x) {
                            *o = c * xv;
                        }
                    }
                    (Some(b), Some((x, c))) => {
                        for ((o, &xv), &bv) in block.iter_mut().zip(x).zip(&b[..kn]) {
                            *o = c * xv + scale * bv;
                        }
                    }
                }
            });
        }
        for (a, w) in terms {
            let kd = w.primal.shape()[0];
            if let Some(at) = &a.tangent {
                Cpu.gemm(
                    Gemm::new(rows * k, n, kd),
                    t.data_mut(),
                    Mat::row_major(n),
                    Some(T::one()),
                    at.data(),
                    Mat::row_major(kd),
                    w.primal.data(),
                    Mat::row_major(n),
                    scale,
                );
            }
            if let Some(wt) = &w.tangent {
                Cpu.gemm(
                    Gemm::new(rows, k * n, kd),
                    t.data_mut(),
                    Mat::row_major(k * n),
                    Some(T::one()),
                    a.primal.data(),
                    Mat::row_major(kd),
                    wt.data(),
                    Mat::row_major(k * n),
                    scale,
                );
            }
        }
        Ok(Dual {
            primal: y,
            tangent: Some(t),
        })
    }

    fn sum(&mut self, x: &Dual<T>, axes: &[usize]) -> Result<Dual<T>> {
        let y = x.primal.sum_axes(axes)?;
        let shifted: Vec<usize> = axes.iter().map(|a| a + 1).collect();
        self.linear_rule(y, &[x], |c| c[0].sum_axes(&shifted))
    }

    /// The tangents in their own layout (K before the last axis, so a value
    /// axis keeps its index but the last moves one on): no K-first copies.
    fn concat(&mut self, xs: &[&Dual<T>], axis: usize) -> Result<Dual<T>> {
        let ps: Vec<&Tensor<T>> = xs.iter().map(|v| &v.primal).collect();
        let y = Tensor::concat(&ps, axis)?;
        if xs.iter().all(|v| v.tangent.is_none()) {
            return Ok(Dual::constant(y));
        }
        let zeros: Vec<Option<Tensor<T>>> = xs
            .iter()
            .map(|v| match v.tangent {
                Some(_) => None,
                None => Some(Tensor::zeros(&tangent_shape(v.primal.shape(), self.k))),
            })
            .collect();
        let ts: Vec<&Tensor<T>> = xs
            .iter()
            .zip(&zeros)
            .map(|(v, z)| v.tangent.as_ref().or(z.as_ref()).expect("one of the two"))
            .collect();
        let tangent = Tensor::concat(&ts, tangent_axis(y.rank(), axis))?;
        Ok(Dual {
            primal: y,
            tangent: Some(tangent),
        })
    }

    fn slice(&mut self, x: &Dual<T>, axis: usize, start: usize, len: usize) -> Result<Dual<T>> {
        let y = x.primal.slice(axis, start, len)?;
        let tangent = match &x.tangent {
            Some(t) => Some(t.slice(tangent_axis(y.rank(), axis), start, len)?),
            None => None,
        };
        Ok(Dual { primal: y, tangent })
    }

    fn reshape(&mut self, x: &Dual<T>, shape: &[usize]) -> Result<Dual<T>> {
        let y = x.primal.clone().reshape(shape)?;
        let mut cs = vec![self.k];
        cs.extend_from_slice(shape);
        self.linear_rule(y, &[x], |c| c[0].clone().reshape(&cs))
    }

    fn transpose(&mut self, x: &Dual<T>, a: usize, b: usize) -> Result<Dual<T>> {
        let y = x.primal.transpose(a, b)?;
        if x.primal.rank() == 2 && a != b {
            // [R, K, L] → [L, K, R] in one copy
            let tangent = match &x.tangent {
                None => None,
                Some(t) => Some(t.permute(&[2, 1, 0])?),
            };
            return Ok(Dual { primal: y, tangent });
        }
        self.linear_rule(y, &[x], |c| c[0].transpose(a + 1, b + 1))
    }

    fn broadcast_to(&mut self, x: &Dual<T>, shape: &[usize]) -> Result<Dual<T>> {
        let y = x.primal.broadcast_to(shape)?;
        let mut padded = vec![self.k];
        padded.extend(std::iter::repeat_n(1, shape.len() - x.primal.rank()));
        padded.extend_from_slice(x.primal.shape());
        let mut full = vec![self.k];
        full.extend_from_slice(shape);
        self.linear_rule(y, &[x], |c| {
            c[0].clone().reshape(&padded)?.broadcast_to(&full)
        })
    }

    fn softmax(&mut self, x: &Dual<T>) -> Result<Dual<T>> {
        softmax_impl(self.k, x, false)
    }

    fn log_softmax(&mut self, x: &Dual<T>) -> Result<Dual<T>> {
        softmax_impl(self.k, x, true)
    }
}

fn softmax_impl<T: Float>(k: usize, x: &Dual<T>, log: bool) -> Result<Dual<T>> {
    if x.primal.rank() == 0 {
        return Err(TensorError::shape("softmax", "rank ≥ 1", "a scalar"));
    }
    let l = *x.primal.shape().last().unwrap();
    // probabilities s (primal of softmax) and the output y
    let mut s = Tensor::scratch(x.primal.shape());
    let xd = x.primal.data();
    Cpu.for_rows(s.data_mut(), l, |r, row| {
        let xr = &xd[r * l..(r + 1) * l];
        let m = xr.iter().fold(xr[0], |a, &b| a.max(b));
        let mut z = T::zero();
        for j in 0..l {
            row[j] = (xr[j] - m).exp();
            z += row[j];
        }
        for v in row.iter_mut() {
            *v = *v / z;
        }
    });
    let y = if log {
        let mut y = Tensor::scratch(x.primal.shape());
        Cpu.for_rows(y.data_mut(), l, |r, row| {
            let xr = &xd[r * l..(r + 1) * l];
            let m = xr.iter().fold(xr[0], |a, &b| a.max(b));
            let z = xr.iter().fold(T::zero(), |a, &b| a + (b - m).exp());
            let lz = m + z.ln();
            for j in 0..l {
                row[j] = xr[j] - lz;
            }
        });
        y
    } else {
        s.clone()
    };
    let tangent = match &x.tangent {
        None => None,
        Some(t) => {
            let mut out = Tensor::scratch(t.shape());
            let sd = s.data();
            let td = t.data();
            Cpu.for_rows(out.data_mut(), l, |i, row| {
                let sr = &sd[(i / k) * l..(i / k + 1) * l];
                let tr = &td[i * l..(i + 1) * l];
                let mut dot = T::zero();
                for j in 0..l {
                    dot += sr[j] * tr[j];
                }
                for j in 0..l {
                    row[j] = if log {
                        tr[j] - dot
                    } else {
                        sr[j] * (tr[j] - dot)
                    };
                }
            });
            Some(out)
        }
    };
    Ok(Dual { primal: y, tangent })
}
