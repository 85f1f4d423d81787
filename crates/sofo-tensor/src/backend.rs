//! The kernel interface of the tensor layer and its CPU implementation.
//!
//! Everything the differentiation layer runs per time step goes through
//! [`Kernels`]: strided GEMM with accumulation, and the elementwise loops. A
//! GPU backend implements the same trait over device buffers.

use crate::parallel::{threads, CHUNK};
use crate::Float;
use rayon::prelude::*;

/// Problem size of a GEMM: dst [m, n] (+)= lhs [m, k] · rhs [k, n].
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl Gemm {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Gemm { m, n, k }
    }
}

/// Strides of a matrix operand, in elements.
#[derive(Debug, Clone, Copy)]
pub struct Mat {
    pub row_stride: usize,
    pub col_stride: usize,
}

impl Mat {
    /// Row-major with `cols` entries per row.
    pub fn row_major(cols: usize) -> Self {
        Mat {
            row_stride: cols,
            col_stride: 1,
        }
    }
    /// The transpose of a row-major matrix with `cols` entries per row.
    pub fn transposed(cols: usize) -> Self {
        Mat {
            row_stride: 1,
            col_stride: cols,
        }
    }
    pub fn strided(row_stride: usize, col_stride: usize) -> Self {
        Mat {
            row_stride,
            col_stride,
        }
    }
    fn fits(&self, rows: usize, cols: usize, len: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.row_stride + (cols - 1) * self.col_stride < len
    }
}

/// The kernels a backend provides.
pub trait Kernels {
    /// `dst = beta · lhs · rhs`, or with `accumulate = Some(a)`
    /// `dst = a · dst + beta · lhs · rhs`. Panics if a stride pattern reaches
    /// outside its slice (a programming error of the caller, not user input).
    #[allow(clippy::too_many_arguments)]
    fn gemm<T: Float>(
        &self,
        size: Gemm,
        dst: &mut [T],
        dst_mat: Mat,
        accumulate: Option<T>,
        lhs: &[T],
        lhs_mat: Mat,
        rhs: &[T],
        rhs_mat: Mat,
        beta: T,
    );

    /// `dst[i] = f(src[i])`.
    fn map_into<T: Float>(&self, src: &[T], dst: &mut [T], f: impl Fn(T) -> T + Sync);

    /// `dst[i] = f(a[i], b[i])`.
    fn zip_into<T: Float>(&self, a: &[T], b: &[T], dst: &mut [T], f: impl Fn(T, T) -> T + Sync);

    /// Runs `f(row_index, row)` over the rows (of `row_len` elements) of
    /// `dst`, in parallel where it pays.
    fn for_rows<T: Float>(&self, dst: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync);
}

/// The CPU backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

fn parallel_worth(len: usize) -> bool {
    len >= 2 * CHUNK && threads() > 1
}

impl Kernels for Cpu {
    fn gemm<T: Float>(
        &self,
        s: Gemm,
        dst: &mut [T],
        dm: Mat,
        accumulate: Option<T>,
        lhs: &[T],
        lm: Mat,
        rhs: &[T],
        rm: Mat,
        beta: T,
    ) {
        assert!(
            dm.fits(s.m, s.n, dst.len()),
            "gemm: dst strides out of range"
        );
        assert!(
            lm.fits(s.m, s.k, lhs.len()),
            "gemm: lhs strides out of range"
        );
        assert!(
            rm.fits(s.k, s.n, rhs.len()),
            "gemm: rhs strides out of range"
        );
        if s.m == 0 || s.n == 0 {
            return;
        }
        if s.k == 0 {
            // gemm with k = 0 leaves dst untouched; make the semantics explicit.
            let a = accumulate.unwrap_or(T::zero());
            for i in 0..s.m {
                for j in 0..s.n {
                    let v = &mut dst[i * dm.row_stride + j * dm.col_stride];
                    *v = if accumulate.is_some() {
                        a * *v
                    } else {
                        T::zero()
                    };
                }
            }
            return;
        }
        let flops = 2 * s.m * s.n * s.k;
        let par = if flops >= 1 << 20 && threads() > 1 {
            gemm::Parallelism::Rayon(threads())
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the asserts above keep every access inside the slices;
        // dst does not alias lhs or rhs (distinct borrows).
        unsafe {
            gemm::gemm(
                s.m,
                s.n,
                s.k,
                dst.as_mut_ptr(),
                dm.col_stride as isize,
                dm.row_stride as isize,
                accumulate.is_some(),
                lhs.as_ptr(),
                lm.col_stride as isize,
                lm.row_stride as isize,
                rhs.as_ptr(),
                rm.col_stride as isize,
                rm.row_stride as isize,
                accumulate.unwrap_or(T::zero()),
                beta,
                false,
                false,
                false,
                par,
            );
        }
    }

    fn map_into<T: Float>(&self, src: &[T], dst: &mut [T], f: impl Fn(T) -> T + Sync) {
        assert_eq!(src.len(), dst.len());
        if parallel_worth(dst.len()) {
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| d.iter_mut().zip(s).for_each(|(d, &s)| *d = f(s)));
        } else {
            dst.iter_mut().zip(src).for_each(|(d, &s)| *d = f(s));
        }
    }

    fn zip_into<T: Float>(&self, a: &[T], b: &[T], dst: &mut [T], f: impl Fn(T, T) -> T + Sync) {
        assert_eq!(a.len(), dst.len());
        assert_eq!(b.len(), dst.len());
        if parallel_worth(dst.len()) {
            dst.par_chunks_mut(CHUNK)
                .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                .for_each(|(d, (a, b))| {
                    for i in 0..d.len() {
                        d[i] = f(a[i], b[i]);
                    }
                });
        } else {
            for i in 0..dst.len() {
                dst[i] = f(a[i], b[i]);
            }
        }
    }

    fn for_rows<T: Float>(
        &self,
        dst: &mut [T],
        row_len: usize,
        f: impl Fn(usize, &mut [T]) + Sync,
    ) {
        if row_len == 0 {
            return;
        }
        if parallel_worth(dst.len()) {
            dst.par_chunks_mut(row_len)
                .enumerate()
                .with_min_len((CHUNK / row_len).max(1))
                .for_each(|(i, r)| f(i, r));
        } else {
            dst.chunks_mut(row_len)
                .enumerate()
                .for_each(|(i, r)| f(i, r));
        }
    }
}
