use crate::backend::{Cpu, Kernels};
use crate::error::{Result, TensorError};
use crate::memory::Buffer;
use crate::Float;

/// A dense, contiguous, row-major tensor in host memory.
#[derive(Clone)]
pub struct Tensor<T: Float> {
    shape: Vec<usize>,
    buf: Buffer<T>,
}

impl<T: Float> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", T::DTYPE.name(), self.shape)
    }
}

pub(crate) fn fmt_shape(s: &[usize]) -> String {
    format!("{s:?}")
}

/// Row-major strides of a shape.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

impl<T: Float> Tensor<T> {
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            buf: Buffer::zeros(shape.iter().product()),
        }
    }

    /// A tensor whose contents are unspecified (reused pool memory). Every
    /// element must be written before it is read.
    pub fn scratch(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            buf: Buffer::scratch(shape.iter().product()),
        }
    }

    pub fn full(shape: &[usize], v: T) -> Self {
        let mut t = Self::scratch(shape);
        t.data_mut().fill(v);
        t
    }

    pub fn scalar(v: T) -> Self {
        Tensor {
            shape: vec![],
            buf: Buffer::from_vec(vec![v]),
        }
    }

    /// Wraps `data` as a tensor of `shape`; the lengths must agree.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(TensorError::shape(
                "Tensor::from_vec",
                format!("{} elements for shape {}", n, fmt_shape(shape)),
                format!("{} elements", data.len()),
            ));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            buf: Buffer::from_vec(data),
        })
    }

    pub fn from_f64_slice(shape: &[usize], data: &[f64]) -> Result<Self> {
        Self::from_vec(shape, data.iter().map(|&v| T::from_f64(v)).collect())
    }

    pub fn from_fn(shape: &[usize], mut f: impl FnMut(usize) -> T) -> Self {
        let mut t = Self::scratch(shape);
        for (i, v) in t.data_mut().iter_mut().enumerate() {
            *v = f(i);
        }
        t
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        self.buf.as_slice().len()
    }
    pub fn data(&self) -> &[T] {
        self.buf.as_slice()
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        self.buf.as_mut_slice()
    }
    pub fn into_vec(self) -> Vec<T> {
        self.buf.into_vec()
    }
    /// Returns the memory to the system allocator instead of the pool: for
    /// large buffers made once per iteration, which pooling would only keep.
    pub fn free(self) {
        drop(self.into_vec());
    }

    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.data().iter().map(|v| v.to_f64()).collect()
    }
    /// The single value of a tensor with one element.
    pub fn item(&self) -> Result<T> {
        if self.numel() != 1 {
            return Err(TensorError::shape(
                "Tensor::item",
                "one element",
                fmt_shape(&self.shape),
            ));
        }
        Ok(self.data()[0])
    }
    pub fn is_finite(&self) -> bool {
        self.data().iter().all(|v| v.is_finite())
    }

    /// Same data, new shape (the element count must agree).
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            return Err(TensorError::shape(
                "reshape",
                format!("a shape with {} elements", self.numel()),
                fmt_shape(shape),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    pub fn convert<U: Float>(&self) -> Tensor<U> {
        let mut out = Tensor::<U>::scratch(&self.shape);
        for (o, &v) in out.data_mut().iter_mut().zip(self.data()) {
            *o = U::from_f64(v.to_f64());
        }
        out
    }

    fn check_same(&self, o: &Self, op: &'static str) -> Result<()> {
        if self.shape != o.shape {
            return Err(TensorError::shape(
                op,
                fmt_shape(&self.shape),
                fmt_shape(&o.shape),
            ));
        }
        Ok(())
    }

    pub fn map(&self, f: impl Fn(T) -> T + Sync) -> Self {
        let mut out = Self::scratch(&self.shape);
        Cpu.map_into(self.data(), out.data_mut(), f);
        out
    }

    pub fn zip_map(
        &self,
        o: &Self,
        op: &'static str,
        f: impl Fn(T, T) -> T + Sync,
    ) -> Result<Self> {
        self.check_same(o, op)?;
        let mut out = Self::scratch(&self.shape);
        Cpu.zip_into(self.data(), o.data(), out.data_mut(), f);
        Ok(out)
    }

    /// `self += alpha * o`, same shapes.
    pub fn axpy(&mut self, alpha: T, o: &Self) -> Result<()> {
        self.check_same(o, "axpy")?;
        for (a, &b) in self.data_mut().iter_mut().zip(o.data()) {
            *a += alpha * b;
        }
        Ok(())
    }

    pub fn scale(&self, s: T) -> Self {
        self.map(move |v| v * s)
    }

    /// Sum of all elements, accumulated in f64 in index order.
    pub fn sum_all(&self) -> f64 {
        self.data().iter().map(|v| v.to_f64()).sum()
    }

    /// Numpy-style broadcast of two shapes.
    pub fn broadcast_shapes(a: &[usize], b: &[usize], op: &'static str) -> Result<Vec<usize>> {
        let r = a.len().max(b.len());
        let mut out = vec![0; r];
        for i in 0..r {
            let da = if i + a.len() >= r {
                a[i + a.len() - r]
            } else {
                1
            };
            let db = if i + b.len() >= r {
                b[i + b.len() - r]
            } else {
                1
            };
            out[i] = if da == db || db == 1 {
                da
            } else if da == 1 {
                db
            } else {
                return Err(TensorError::shape(
                    op,
                    format!("shapes that broadcast against {}", fmt_shape(a)),
                    fmt_shape(b),
                ));
            };
        }
        Ok(out)
    }

    /// Copies this tensor broadcast (numpy rules) to `shape`.
    pub fn broadcast_to(&self, shape: &[usize]) -> Result<Self> {
        let bs = Self::broadcast_shapes(shape, &self.shape, "broadcast_to")?;
        if bs != shape {
            return Err(TensorError::shape(
                "broadcast_to",
                format!("a shape that broadcasts to {}", fmt_shape(shape)),
                fmt_shape(&self.shape),
            ));
        }
        if self.shape == shape {
            return Ok(self.clone());
        }
        let r = shape.len();
        let own = strides_of(&self.shape);
        let mut st = vec![0usize; r];
        let lead = r - self.shape.len();
        for (i, (&d, &o)) in self.shape.iter().zip(&own).enumerate() {
            st[lead + i] = if d == 1 { 0 } else { o };
        }
        let mut out = Self::scratch(shape);
        strided_copy(self.data(), &st, shape, out.data_mut());
        Ok(out)
    }

    /// Elementwise binary op with numpy broadcasting.
    pub fn broadcast_zip(
        &self,
        o: &Self,
        op: &'static str,
        f: impl Fn(T, T) -> T + Sync,
    ) -> Result<Self> {
        if self.shape == o.shape {
            return self.zip_map(o, op, f);
        }
        let s = Self::broadcast_shapes(&self.shape, &o.shape, op)?;
        let a = self.broadcast_to(&s)?;
        let b = o.broadcast_to(&s)?;
        a.zip_map(&b, op, f)
    }

    /// General axis permutation: output axis i is input axis `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Result<Self> {
        let r = self.rank();
        let mut seen = vec![false; r];
        if perm.len() != r
            || perm
                .iter()
                .any(|&p| p >= r || std::mem::replace(&mut seen[p], true))
        {
            return Err(TensorError::arg(
                "permute",
                format!(
                    "{perm:?} is not a permutation of the {r} axes of {}",
                    fmt_shape(&self.shape)
                ),
            ));
        }
        let own = strides_of(&self.shape);
        let shape: Vec<usize> = perm.iter().map(|&p| self.shape[p]).collect();
        let st: Vec<usize> = perm.iter().map(|&p| own[p]).collect();
        let mut out = Self::scratch(&shape);
        strided_copy(self.data(), &st, &shape, out.data_mut());
        Ok(out)
    }

    /// Swaps two axes.
    pub fn transpose(&self, a: usize, b: usize) -> Result<Self> {
        let r = self.rank();
        if a >= r || b >= r {
            return Err(TensorError::arg(
                "transpose",
                format!("axes ({a}, {b}) out of range for rank {r}"),
            ));
        }
        let mut perm: Vec<usize> = (0..r).collect();
        perm.swap(a, b);
        self.permute(&perm)
    }

    /// Sum over `axes`, which are removed from the shape.
    pub fn sum_axes(&self, axes: &[usize]) -> Result<Self> {
        let r = self.rank();
        for (i, &a) in axes.iter().enumerate() {
            if axes[..i].contains(&a) {
                return Err(TensorError::arg(
                    "sum",
                    format!("axis {a} listed twice in {axes:?}"),
                ));
            }
            if a >= r {
                return Err(TensorError::arg(
                    "sum",
                    format!("axis {a} out of range for shape {}", fmt_shape(&self.shape)),
                ));
            }
        }
        let keep: Vec<usize> = (0..r).filter(|i| !axes.contains(i)).collect();
        let out_shape: Vec<usize> = keep.iter().map(|&i| self.shape[i]).collect();
        let mut acc = vec![0f64; out_shape.iter().product()];
        let out_st = strides_of(&out_shape);
        // map each input element to its output slot
        let mut idx = vec![0usize; r];
        for &v in self.data() {
            let mut o = 0;
            for (j, &k) in keep.iter().enumerate() {
                o += idx[k] * out_st[j];
            }
            acc[o] += v.to_f64();
            for d in (0..r).rev() {
                idx[d] += 1;
                if idx[d] < self.shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        Tensor::from_vec(&out_shape, acc.into_iter().map(T::from_f64).collect())
    }

    /// `len` entries from `start` along `axis`.
    pub fn slice(&self, axis: usize, start: usize, len: usize) -> Result<Self> {
        if axis >= self.rank() || start + len > self.shape[axis] {
            return Err(TensorError::arg(
                "slice",
                format!(
                    "[{start}, {}) along axis {axis} is outside shape {}",
                    start + len,
                    fmt_shape(&self.shape)
                ),
            ));
        }
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product();
        let mut shape = self.shape.clone();
        shape[axis] = len;
        let mut out = Self::scratch(&shape);
        let n = self.shape[axis];
        let w = len * inner;
        copy_blocks(
            out.data_mut(),
            (w, 0),
            self.data(),
            (n * inner, start * inner),
            w,
            outer,
        );
        Ok(out)
    }

    /// Joins tensors along `axis`; all other extents must agree.
    pub fn concat(parts: &[&Self], axis: usize) -> Result<Self> {
        let first = parts
            .first()
            .ok_or_else(|| TensorError::arg("concat", "needs at least one tensor"))?;
        let r = first.rank();
        if axis >= r {
            return Err(TensorError::arg(
                "concat",
                format!("axis {axis} out of range for rank {r}"),
            ));
        }
        let mut total = 0;
        for p in parts {
            let ok = p.rank() == r && (0..r).all(|i| i == axis || p.shape[i] == first.shape[i]);
            if !ok {
                return Err(TensorError::shape(
                    "concat",
                    format!("{} except along axis {axis}", fmt_shape(&first.shape)),
                    fmt_shape(&p.shape),
                ));
            }
            total += p.shape[axis];
        }
        let outer: usize = first.shape[..axis].iter().product();
        let inner: usize = first.shape[axis + 1..].iter().product();
        let mut shape = first.shape.clone();
        shape[axis] = total;
        let mut out = Self::scratch(&shape);
        let mut off = 0;
        for p in parts {
            let w = p.shape[axis] * inner;
            copy_blocks(
                out.data_mut(),
                (total * inner, off),
                p.data(),
                (w, 0),
                w,
                outer,
            );
            off += w;
        }
        Ok(out)
    }

    /// Matrix product `self · b` with `self` of shape [..., m, k] (leading
    /// axes folded into rows) and `b` of shape [k, n].
    pub fn matmul(&self, b: &Self) -> Result<Self> {
        if self.rank() < 1 || b.rank() != 2 || self.shape[self.rank() - 1] != b.shape[0] {
            return Err(TensorError::shape(
                "matmul",
                format!(
                    "[.., k] · [k, n] with k = {}",
                    self.shape.last().copied().unwrap_or(0)
                ),
                format!("{} · {}", fmt_shape(&self.shape), fmt_shape(&b.shape)),
            ));
        }
        let k = b.shape[0];
        let n = b.shape[1];
        // rows from the leading extents: numel / k would be 0 when k = 0
        let m: usize = self.shape[..self.rank() - 1].iter().product();
        let mut shape = self.shape.clone();
        *shape.last_mut().unwrap() = n;
        let mut out = Self::scratch(&shape);
        Cpu.gemm(
            crate::backend::Gemm::new(m, n, k),
            out.data_mut(),
            crate::backend::Mat::row_major(n),
            None,
            self.data(),
            crate::backend::Mat::row_major(k),
            b.data(),
            crate::backend::Mat::row_major(n),
            T::one(),
        );
        Ok(out)
    }
}

/// Copies `src` read through strides `st` (one per output axis) into the
/// contiguous `dst` of shape `shape`.
pub(crate) fn strided_copy<T: Copy>(src: &[T], st: &[usize], shape: &[usize], dst: &mut [T]) {
    let r = shape.len();
    if r == 0 {
        dst[0] = src[0];
        return;
    }
    let last = shape[r - 1];
    let ls = st[r - 1];
    let rows: usize = shape[..r - 1].iter().product();
    let mut idx = vec![0usize; r - 1];
    let mut base = 0usize;
    for row in 0..rows {
        let d = &mut dst[row * last..(row + 1) * last];
        if ls == 1 {
            d.copy_from_slice(&src[base..base + last]);
        } else {
            for (j, v) in d.iter_mut().enumerate() {
                *v = src[base + j * ls];
            }
        }
        for ax in (0..r - 1).rev() {
            idx[ax] += 1;
            base += st[ax];
            if idx[ax] < shape[ax] {
                break;
            }
            base -= st[ax] * shape[ax];
            idx[ax] = 0;
        }
    }
}

/// `outer` blocks of `w` elements from `src` to `dst`, block o from
/// `src[o·src_stride + src_off ..]` to `dst[o·dst_stride + dst_off ..]`.
/// One-element blocks (the columns of a plant's state) are copied one by
/// one: a memmove call per element would cost more than the copy.
fn copy_blocks<T: Copy>(
    dst: &mut [T],
    (dst_stride, dst_off): (usize, usize),
    src: &[T],
    (src_stride, src_off): (usize, usize),
    w: usize,
    outer: usize,
) {
    if w == 1 {
        for o in 0..outer {
            dst[o * dst_stride + dst_off] = src[o * src_stride + src_off];
        }
        return;
    }
    for o in 0..outer {
        let (d, s) = (o * dst_stride + dst_off, o * src_stride + src_off);
        dst[d..d + w].copy_from_slice(&src[s..s + w]);
    }
}
