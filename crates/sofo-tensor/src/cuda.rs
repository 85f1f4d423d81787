//! The CUDA backend (feature `cuda`): f32 device tensors, cuBLAS GEMMs and
//! elementwise kernels compiled once by NVRTC when the device is opened.
//!
//! libcuda, libcublas and libnvrtc are loaded at run time, so the same binary
//! builds and runs where there is no GPU: [`CudaDevice::open`] then returns
//! an error instead of panicking inside cudarc. Everything runs on one
//! stream; nothing waits for the device until a result is copied back.

use crate::error::{Result, TensorError};
use crate::{Float, Tensor};
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm as _, GemmConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, LaunchConfig,
};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[path = "cuda_graph.rs"]
mod graph;
use graph::{ptr_of, tag, Core, Home, Launch};
pub use graph::{GraphStats, PassGraph};

fn dev_err(op: &'static str, e: impl std::fmt::Debug) -> TensorError {
    TensorError::Device {
        op,
        message: format!("{e:?}"),
    }
}

/// The CUDA C source of every kernel (compiled by NVRTC when a device is
/// opened; the kernel-emulation tests compile it for the host).
pub fn kernel_source() -> &'static str {
    KERNELS
}

const KERNELS: &str = r#"
#define GRID_LOOP(i, n) for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)

// q = a / b, r = a % b, in 32 bits when both fit: a 64-bit division is a
// long instruction sequence on a GPU, a 32-bit one a short one.
__device__ __forceinline__ void divmod_(long long a, long long b, long long* q, long long* r) {
    if (a < 4294967296LL && b < 4294967296LL) {
        unsigned qa = (unsigned)a / (unsigned)b;
        *q = qa; *r = a - (long long)qa * b;
    } else {
        *q = a / b; *r = a - *q * b;
    }
}

// The kernels over tangents [P, K, L] of a value [P, L] give each thread a
// unit: one entry (p, j) of the value and a chunk of TCHUNK of its K
// tangents. The index arithmetic and the entry's own work (a derivative, a
// scale) then run once per unit instead of once per element; consecutive
// threads take consecutive j, so every tangent row is read and written
// coalesced. Unit u = c · P·L + (p · L + j) for chunk c.
#define TCHUNK 8
__device__ long long tchunks_(int k) { return (k + TCHUNK - 1) / TCHUNK; }
// the unit's entry e = p·L + j, p, j, and its tangent range [k0, k1)
__device__ __forceinline__ void tunit_(long long u, long long pl, int k, int l,
                       long long* e, long long* p, long long* j, int* k0, int* k1) {
    long long c;
    divmod_(u, pl, &c, e);
    divmod_(*e, l, p, j);
    *k0 = (int)c * TCHUNK;
    *k1 = *k0 + TCHUNK < k ? *k0 + TCHUNK : k;
}

__device__ float sigmoidf_(float x) {
    if (x >= 0.f) return 1.f / (1.f + expf(-x));
    float e = expf(x); return e / (1.f + e);
}

// o = f(v), g = f′(v) for the functions a linear op's kernels apply to a
// term's input or to their output (the rate functions: tanh, relu,
// softplus, sigmoid; codes as in UnaryCode, others refused on the host).
// Only these: unary_eval_'s sin and cos bring a local-memory frame (their
// slow path) and its registers into every kernel that inlines them.
__device__ __forceinline__ void rate_eval_(float v, int op, float* o_, float* g_) {
    float o, g;
    switch (op) {
        case 3: o = tanhf(v); g = 1.f - o * o; break;
        case 4: o = v > 0.f ? v : 0.f; g = v > 0.f ? 1.f : 0.f; break;
        case 5: o = fmaxf(v, 0.f) + log1pf(expf(-fabsf(v))); g = sigmoidf_(v); break;
        default: o = sigmoidf_(v); g = o * (1.f - o); break;
    }
    *o_ = o; *g_ = g;
}

// o = f(v), g = f'(v); op codes as in UnaryCode
__device__ __forceinline__ void unary_eval_(float v, int op, float s, float* o_, float* g_) {
    float o, g;
    switch (op) {
        case 0: o = -v; g = -1.f; break;
        case 1: o = expf(v); g = o; break;
        case 2: o = logf(v); g = 1.f / v; break;
        case 3: case 4: case 5: case 6: rate_eval_(v, op, &o, &g); break;
        case 7: o = v * v; g = 2.f * v; break;
        case 8: o = sqrtf(v); g = 0.5f / o; break;
        case 9: o = v + s; g = 1.f; break;
        case 11: o = fabsf(v); g = v > 0.f ? 1.f : (v < 0.f ? -1.f : 0.f); break;
        case 12: o = sinf(v); g = cosf(v); break;
        case 13: o = cosf(v); g = -sinf(v); break;
        default: o = v * s; g = s; break;
    }
    *o_ = o; *g_ = g;
}

// y = f(x) and, if want_d, d = f'(x)
extern "C" __global__ void unary_fwd(const float* x, float* y, float* d, long long n, int op, float s, int want_d) {
    GRID_LOOP(i, n) {
        float o, g;
        unary_eval_(x[i], op, s, &o, &g);
        y[i] = o;
        if (want_d) d[i] = g;
    }
}

// gx = f'(x) gy, the reverse rule of a unary op
extern "C" __global__ void unary_grad(const float* x, const float* gy, float* gx, long long n, int op, float s) {
    GRID_LOOP(i, n) {
        float o, g;
        unary_eval_(x[i], op, s, &o, &g);
        gx[i] = g * gy[i];
    }
}

// y = f(x) [P, L] and out[p, k, l] = f'(x[p, l]) t[p, k, l] in one pass
// (f and f' once per entry; the primal written by the units of chunk 0).
// With has_c, both times a constant c [P, L] (a noise mask), in the order
// of a product after the op: y = f(x)·c, out = c·(f'(x)·t).
extern "C" __global__ void unary_tangent(const float* x, const float* t, float* y, float* out,
                                         long long pl, int k, int l, int op, float s,
                                         const float* c, int has_c) {
    GRID_LOOP(u, pl * tchunks_(k)) {
        long long e, p, j; int k0, k1;
        tunit_(u, pl, k, l, &e, &p, &j, &k0, &k1);
        float o, g;
        unary_eval_(x[e], op, s, &o, &g);
        const long long row = p * k * l + j;
        // the chunk's tangents loaded (into registers: the loop to TCHUNK
        // unrolls) before any result is stored: the compiler keeps a load
        // after a store through a pointer it cannot tell apart, so load
        // and store element by element wait out a memory latency each
        // (an H200's profile of a Kalman-size step: 14.2 µs, then 12.4)
        const float cv = has_c ? c[e] : 1.f;
        float tv[TCHUNK];
        for (int m = 0; m < TCHUNK; m++) tv[m] = k0 + m < k1 ? t[row + (long long)(k0 + m) * l] : 0.f;
        if (k0 == 0) y[e] = has_c ? o * cv : o;
        for (int m = 0; m < TCHUNK; m++)
            if (k0 + m < k1) out[row + (long long)(k0 + m) * l] = has_c ? cv * (g * tv[m]) : g * tv[m];
    }
}

// out[p, k, l] = d[p, l] * t[p, k, l]
extern "C" __global__ void scale_rows(const float* d, const float* t, float* out, long long pl, int k, int l) {
    GRID_LOOP(u, pl * tchunks_(k)) {
        long long e, p, j; int k0, k1;
        tunit_(u, pl, k, l, &e, &p, &j, &k0, &k1);
        const float dv = d[e];
        const long long row = p * k * l + j;
        for (int kk = k0; kk < k1; kk++) out[row + (long long)kk * l] = dv * t[row + (long long)kk * l];
    }
}

// y = a op b, elementwise on equal shapes; op: 0 add, 1 sub, 2 mul, 3 div
__device__ float binary_op_(float a, float b, int op) {
    switch (op) {
        case 0: return a + b;
        case 1: return a - b;
        case 2: return a * b;
        default: return a / b;
    }
}
extern "C" __global__ void binary_fwd(const float* a, const float* b, float* y, long long n, int op) {
    GRID_LOOP(i, n) { y[i] = binary_op_(a[i], b[i], op); }
}
// ∂y/∂a and ∂y/∂b of y = a op b
__device__ __forceinline__ void binary_partials_(float a, float b, int op, float* da, float* db) {
    switch (op) {
        case 0: *da = 1.f; *db = 1.f; break;
        case 1: *da = 1.f; *db = -1.f; break;
        case 2: *da = b; *db = a; break;
        default: *da = 1.f / b; *db = -a / (b * b); break;
    }
}

// out[p, k, l] = ∂y/∂a[p, l] · ta[p, k, l] + ∂y/∂b[p, l] · tb[p, k, l] for
// y = a op b on equal shapes [P, L]; a tangent absent when has_* = 0; with
// want_y, y itself too (by the units of chunk 0: one launch for a dual)
extern "C" __global__ void binary_tangent(const float* a, const float* b, const float* ta, const float* tb,
                                          float* out, long long pl, int k, int l, int op,
                                          int has_a, int has_b, float* y, int want_y) {
    // (K = 0: one unit per entry, which writes y alone)
    GRID_LOOP(u, pl * (k > 0 ? tchunks_(k) : 1)) {
        long long e, p, j; int k0, k1;
        tunit_(u, pl, k, l, &e, &p, &j, &k0, &k1);
        float av = a[e], bv = b[e], da, db;
        if (want_y && k0 == 0) y[e] = binary_op_(av, bv, op);
        binary_partials_(av, bv, op, &da, &db);
        const long long row = p * k * l + j;
        for (int kk = k0; kk < k1; kk++) {
            long long i = row + (long long)kk * l;
            float v = 0.f;
            if (has_a) v += da * ta[i];
            if (has_b) v += db * tb[i];
            out[i] = v;
        }
    }
}

// A pointwise program (sofo_ad::Pointwise) on a [P, L] grid. Registers
// 0..n_in are its inputs: the column blocks of width l of up to PW_TENSORS
// tensors x_i [P, w_i], in order (tangents t_i [P, K, w_i]); register
// n_in + s is step s: words 4s..4s+3 of prog are (op, a, b, scalar bits),
// op < 32 a unary code (UnaryCode) of register a, else 32 + a binary code
// of registers a and b. The n_out registers named after the steps go side
// by side into y [P, n_out·l], their tangents into u [P, K, n_out·l] when
// want_t. A register whose bit in tmask is clear has no tangents (0, and
// no term of its own), as in the CPU engine.
#define PW_REGS 64
#define PW_TENSORS 8
// A program's registers at entry (p, j) into v: its inputs, then its
// steps' values; returns the number of inputs.
__device__ __forceinline__ int pw_values_(const unsigned* prog, int n_tensors, int n_step,
        const float* const* xs, const int* ws, int l, long long p, long long j, float* v) {
    int n_in = 0;
    for (int i = 0; i < n_tensors; i++)
        for (int c = 0; c < ws[i] / l; c++) v[n_in++] = xs[i][p * ws[i] + c * l + j];
    for (int s = 0; s < n_step; s++) {
        const unsigned* w = prog + 4 * s;
        float o = 0.f, g;
        if (w[0] < 32) unary_eval_(v[w[1]], (int)w[0], __int_as_float((int)w[3]), &o, &g);
        else o = binary_op_(v[w[1]], v[w[2]], (int)w[0] - 32);
        v[n_in + s] = o;
    }
    return n_in;
}
// One thread per entry and tangent (u = e·K + k: consecutive threads take
// consecutive tangents of an entry), values and that tangent in one sweep
// over the steps (forward mode on dual numbers: each step's derivative
// once); the values written by tangent 0's thread. Not the tangent kernels'
// chunks of 8: a program's work per entry is small, and the parallelism of
// one thread per tangent is what keeps the GPU busy on a plant's columns.
extern "C" __global__ void pointwise(const unsigned* prog, int n_tensors, int n_step, int n_out,
        const float* x0, const float* t0, int w0, const float* x1, const float* t1, int w1,
        const float* x2, const float* t2, int w2, const float* x3, const float* t3, int w3,
        const float* x4, const float* t4, int w4, const float* x5, const float* t5, int w5,
        const float* x6, const float* t6, int w6, const float* x7, const float* t7, int w7,
        float* y, float* u, long long pl, int k, int l, unsigned long long tmask, int want_t) {
    const float* xs[PW_TENSORS] = {x0, x1, x2, x3, x4, x5, x6, x7};
    const float* ts[PW_TENSORS] = {t0, t1, t2, t3, t4, t5, t6, t7};
    const int ws[PW_TENSORS] = {w0, w1, w2, w3, w4, w5, w6, w7};
    const int kt = want_t && k > 0 ? k : 1;
    const long long wy = (long long)n_out * l;
    const unsigned* outs = prog + 4 * n_step;
    GRID_LOOP(unit, pl * kt) {
        long long e, kk, p, j;
        divmod_(unit, kt, &e, &kk);
        divmod_(e, l, &p, &j);
        const bool tan = want_t && k > 0;
        float v[PW_REGS], t[PW_REGS];
        int n_in = 0;
        for (int i = 0; i < n_tensors; i++)
            for (int c = 0; c < ws[i] / l; c++, n_in++) {
                v[n_in] = xs[i][p * ws[i] + c * l + j];
                t[n_in] = tan && (tmask >> n_in & 1ULL) ? ts[i][(p * k + kk) * ws[i] + c * l + j] : 0.f;
            }
        for (int s = 0; s < n_step; s++) {
            const int d = n_in + s;
            const unsigned* w = prog + 4 * s;
            const unsigned a = w[1], b = w[2];
            const bool has = tan && (tmask >> d & 1ULL);
            float o, x = 0.f;
            if (w[0] < 32) {
                float g;
                unary_eval_(v[a], (int)w[0], __int_as_float((int)w[3]), &o, &g);
                if (has) x = g * t[a];
            } else {
                o = binary_op_(v[a], v[b], (int)w[0] - 32);
                if (has) {
                    float da, db;
                    binary_partials_(v[a], v[b], (int)w[0] - 32, &da, &db);
                    if (tmask >> a & 1ULL) x += da * t[a];
                    if (tmask >> b & 1ULL) x += db * t[b];
                }
            }
            v[d] = o;
            t[d] = x;
        }
        if (kk == 0) for (int o = 0; o < n_out; o++) y[p * wy + o * l + j] = v[outs[o]];
        if (tan) for (int o = 0; o < n_out; o++) u[(p * k + kk) * wy + o * l + j] = t[outs[o]];
    }
}

// The reverse rule of a pointwise program (as in `pointwise`): from gy
// [P, n_out·l], the gradient g_i [P, w_i] of each input tensor whose bit is
// set in want. Adjoints flow only into registers with their bit set in
// gmask (those that depend on an input that wants a gradient) and only from
// registers that received one, as on the CPU tape; an input column that
// received none gets 0. One thread per entry (p, j): the values again, then
// the adjoints from the last step to the first — every gradient element is
// written by its entry's thread alone.
extern "C" __global__ void pointwise_grad(const unsigned* prog, int n_tensors, int n_step, int n_out,
        const float* x0, float* g0, int w0, const float* x1, float* g1, int w1,
        const float* x2, float* g2, int w2, const float* x3, float* g3, int w3,
        const float* x4, float* g4, int w4, const float* x5, float* g5, int w5,
        const float* x6, float* g6, int w6, const float* x7, float* g7, int w7,
        const float* gy, long long pl, int l, unsigned long long gmask, int want) {
    const float* xs[PW_TENSORS] = {x0, x1, x2, x3, x4, x5, x6, x7};
    float* gs[PW_TENSORS] = {g0, g1, g2, g3, g4, g5, g6, g7};
    const int ws[PW_TENSORS] = {w0, w1, w2, w3, w4, w5, w6, w7};
    const long long wy = (long long)n_out * l;
    const unsigned* outs = prog + 4 * n_step;
    GRID_LOOP(e, pl) {
        long long p, j;
        divmod_(e, l, &p, &j);
        float v[PW_REGS], a[PW_REGS];
        const int n_in = pw_values_(prog, n_tensors, n_step, xs, ws, l, p, j, v);
        unsigned long long got = 0;
        for (int o = 0; o < n_out; o++) {
            const unsigned r = outs[o];
            if (!(gmask >> r & 1ULL)) continue;
            const float x = gy[p * wy + o * l + j];
            a[r] = (got >> r & 1ULL) ? a[r] + x : x;
            got |= 1ULL << r;
        }
        for (int s = n_step - 1; s >= 0; s--) {
            const int d = n_in + s;
            if (!(got >> d & 1ULL)) continue;
            const unsigned* w = prog + 4 * s;
            const unsigned ra = w[1], rb = w[2];
            float da, db = 0.f;
            if (w[0] < 32) {
                float o;
                unary_eval_(v[ra], (int)w[0], __int_as_float((int)w[3]), &o, &da);
            } else {
                binary_partials_(v[ra], v[rb], (int)w[0] - 32, &da, &db);
            }
            if (gmask >> ra & 1ULL) {
                const float x = da * a[d];
                a[ra] = (got >> ra & 1ULL) ? a[ra] + x : x;
                got |= 1ULL << ra;
            }
            if (w[0] >= 32 && (gmask >> rb & 1ULL)) {
                const float x = db * a[d];
                a[rb] = (got >> rb & 1ULL) ? a[rb] + x : x;
                got |= 1ULL << rb;
            }
        }
        int r = 0;
        for (int i = 0; i < n_tensors; i++)
            for (int c = 0; c < ws[i] / l; c++, r++)
                if (want >> i & 1) gs[i][p * ws[i] + c * l + j] = (got >> r & 1ULL) ? a[r] : 0.f;
    }
}

// dst[r, offset + j] = src[r, j] for src [rows, w], dst [rows, dst_w]
extern "C" __global__ void copy_columns(const float* src, float* dst, long long rows, int w, int dst_w, int offset) {
    long long total = rows * w;
    GRID_LOOP(i, total) {
        long long r, j;
        divmod_(i, w, &r, &j);
        dst[r * dst_w + offset + j] = src[i];
    }
}

// dst[r, j] = src[r, offset + j] for src [rows, src_w], dst [rows, w]
extern "C" __global__ void take_columns(const float* src, float* dst, long long rows, int w, int src_w, int offset) {
    long long total = rows * w;
    GRID_LOOP(i, total) {
        long long r, j;
        divmod_(i, w, &r, &j);
        dst[i] = src[r * src_w + offset + j];
    }
}

// The terms of a linear op before its GEMMs, primal and tangents in one pass:
// y[r, j] = scale * (b[j] + Σ_a u[r, a] w[a, j]) + c * x[r, j],
// and t[r, k, j] = scale * (bt[k, j] + Σ_a (u[r, a] wt[a, k, j] + ut[r, k, a]
// w[a, j])) + c * xt[r, k, j] (want_t); absent terms are 0. u [rows, ku]
// (ku = 0: none, at most SMALL_TERM) is a term with a short inner dimension
// (a network's input; with tangents ut, a plant's or a low-dimensional
// network's state), whose GEMMs would each read and write all of y and t
// for a rank-ku update. Units as in unary_tangent (one chunk when !want_t).
#define SMALL_TERM 8
extern "C" __global__ void linear_init(float* y, float* t, const float* b, const float* bt,
                                       const float* x, const float* xt, float c, float scale,
                                       long long rows, int k, int n,
                                       int has_b, int has_bt, int has_x, int has_xt, int want_t,
                                       const float* u, const float* w, const float* wt, int ku,
                                       int has_wt, const float* ut, int has_ut) {
    const long long pl = rows * n;
    const int kt = want_t ? k : 0;
    GRID_LOOP(i, pl * (kt > 0 ? tchunks_(kt) : 1)) {
        long long e, r, j; int k0, k1;
        tunit_(i, pl, kt, n, &e, &r, &j, &k0, &k1);
        // Loops to SMALL_TERM (registers, not local memory) that stop at ku,
        // and per tangent pointers moved on by a row rather than indices
        // multiplied out in 64 bits: an H200's profile found this kernel
        // bound by issuing its instructions (≈ 170 per output element in a
        // variant whose loops, like these before, ran all SMALL_TERM
        // iterations predicated off past ku).
        // The sums run in the same order as before (the host emulation gives
        // the same bits for every ku and term, under several launch shapes).
        float ur[SMALL_TERM], wj[SMALL_TERM];
        for (int a = 0; a < SMALL_TERM; a++) {
            if (a >= ku) break;
            ur[a] = u[r * ku + a];
            wj[a] = w[(long long)a * n + j];
        }
        if (k0 == 0) {
            float v = has_b ? b[j] : 0.f;
            for (int a = 0; a < SMALL_TERM; a++) {
                if (a >= ku) break;
                v += ur[a] * wj[a];
            }
            v *= scale;
            if (has_x) v += c * x[e];
            y[e] = v;
        }
        const long long wstride = (long long)k * n;  // wt's input column a to a + 1
        const long long first = r * kt * n + (long long)k0 * n + j;
        float* tq = t + first;
        const float* xq = xt + first;
        const float* btq = bt + (long long)k0 * n + j;
        const float* wtq = wt + (long long)k0 * n + j;
        const float* utq = ut + (r * k + k0) * ku;
        for (int kk = k0; kk < k1; kk++, tq += n, xq += n, btq += n, wtq += n, utq += ku) {
            float v = has_bt ? *btq : 0.f;
            if (has_wt)
                for (int a = 0; a < SMALL_TERM; a++) {
                    if (a >= ku) break;
                    v += ur[a] * wtq[a * wstride];
                }
            if (has_ut)
                for (int a = 0; a < SMALL_TERM; a++) {
                    if (a >= ku) break;
                    v += utq[a] * wj[a];
                }
            v *= scale;
            if (has_xt) v += c * *xq;
            *tq = v;
        }
    }
}

// y[r, j] += scale * Σ_a u[r, a] w[a, j] and, with want_t, t[r, k, j] +=
// scale * Σ_a (ut[r, k, a] w[a, j] + u[r, a] wt[a, k, j]): a term u [rows, ku]
// · w [ku, n] with ku ≤ SMALL_TERM whose u has tangents (a plant's state
// column feeding a network), in one pass over y and t instead of three GEMMs
// that each read and write them for a rank-ku update. Units as in
// unary_tangent.
extern "C" __global__ void linear_small_add(float* y, float* t, const float* u, const float* ut,
                                            const float* w, const float* wt, float scale,
                                            long long rows, int k, int n, int ku, int want_t,
                                            int has_ut, int has_wt) {
    const long long pl = rows * n;
    const int kt = want_t ? k : 0;
    GRID_LOOP(i, pl * (kt > 0 ? tchunks_(kt) : 1)) {
        long long e, r, j; int k0, k1;
        tunit_(i, pl, kt, n, &e, &r, &j, &k0, &k1);
        float ur[SMALL_TERM], wj[SMALL_TERM];
        for (int a = 0; a < SMALL_TERM; a++) {
            ur[a] = a < ku ? u[r * ku + a] : 0.f;
            wj[a] = a < ku ? w[(long long)a * n + j] : 0.f;
        }
        if (k0 == 0) {
            float v = 0.f;
            for (int a = 0; a < SMALL_TERM; a++) v += ur[a] * wj[a];
            y[e] += scale * v;
        }
        const long long row = r * kt * n + j;
        for (int kk = k0; kk < k1; kk++) {
            float v = 0.f;
            for (int a = 0; a < SMALL_TERM; a++) {
                if (a >= ku) break;
                if (has_ut) v += ut[(r * k + kk) * ku + a] * wj[a];
                if (has_wt) v += ur[a] * wt[((long long)a * k + kk) * n + j];
            }
            t[row + (long long)kk * n] += scale * v;
        }
    }
}

// One term of a linear op whose output has at most NARROW columns (a
// readout): y[r, o] (+)= scale * (b[o] + Σ_i a[r, i] w[i, o]) over the
// primal rows and, with want_t, t[r, k, o] (+)= scale * (bt[k, o] + Σ_i
// at[r, k, i] w[i, o] + a[r, i] wt[i, k, o]) over the tangent rows; init:
// written (bias included where has_b / has_bt), else added to (no bias).
// With has_act the term's input is f(a) (a rate function, op act), its
// tangents f′(a) ⊙ at: a rate network's φ(x) · C, read from x as it goes;
// with has_c too, f(a) ⊙ c and f′(a) ⊙ at ⊙ c for a factor c of a's shape
// without tangents (the rates' noise).
// GEMMs with n ≤ 8 columns fit cuBLAS's tiles badly and take three launches
// (a·w, at·w, a·wt); here one thread per row keeps its n sums in registers.
#define NARROW 8
// an input element as a term reads it from its loaded value v (mode 0: v;
// 1: f(v); 2: f′(va) · v, the tangent of f at va), times the factor c
// (modes 1 and 2; 1 where there is none)
__device__ __forceinline__ float act_apply_(float v, float va, float c, int mode, int op) {
    if (mode == 0) return v;
    float o, g;
    rate_eval_(mode == 1 ? v : va, op, &o, &g);
    return (mode == 1 ? o : g * v) * c;
}
__device__ __forceinline__ float act_load_(const float* x, const float* xa, const float* cf, long long i,
                                           int mode, int op) {
    if (mode == 0) return x[i];
    return act_apply_(x[i], mode == 2 ? xa[i] : 0.f, cf ? cf[i] : 1.f, mode, op);
}
// acc[o] += Σ_i x[i] w[i * ws + o] for o < n (x's elements as act_load_
// reads them): one row x of the input per thread, read as float4 where the
// rows it reads (x, and xa and cf where the mode reads them) are 16-byte
// aligned (a row's loads then take whole 32-byte sectors two at a time,
// however the L1 fares, and a quarter of the load instructions)
__device__ __forceinline__ bool aligned_(const float* p, unsigned bytes) {
    return (((unsigned long long)p) & (bytes - 1)) == 0;
}
// (a host build of this source may define CHECK_ALIGNED to check the
// alignment a GPU's vector loads and stores need: the fake GPU of the tests
// does)
#ifndef CHECK_ALIGNED
#define CHECK_ALIGNED(p, bytes)
#endif
__device__ __forceinline__ float4 load4_(const float* p) {
    CHECK_ALIGNED(p, 16);
    return *(const float4*)p;
}
__device__ __forceinline__ void store4_(float* p, float4 v) {
    CHECK_ALIGNED(p, 16);
    *(float4*)p = v;
}
__device__ __forceinline__ void store2_(float* p, float a, float b) {
    CHECK_ALIGNED(p, 8);
    *(float2*)p = make_float2(a, b);
}
__device__ __forceinline__ void narrow_row_(const float* x, const float* xa, const float* cf, int mode,
                                            int op, int kd, const float* w, long long ws, int n,
                                            float* acc) {
    int i = 0;
    if (aligned_(x, 16) && (mode != 2 || aligned_(xa, 16)) && (mode == 0 || !cf || aligned_(cf, 16))) {
        for (; i + 4 <= kd; i += 4) {
            const float4 v = load4_(x + i);
            float xs[4] = {v.x, v.y, v.z, v.w};
            if (mode != 0) {
                float4 va = {0.f, 0.f, 0.f, 0.f}, c = {1.f, 1.f, 1.f, 1.f};
                if (mode == 2) va = load4_(xa + i);
                if (cf) c = load4_(cf + i);
                xs[0] = act_apply_(xs[0], va.x, c.x, mode, op);
                xs[1] = act_apply_(xs[1], va.y, c.y, mode, op);
                xs[2] = act_apply_(xs[2], va.z, c.z, mode, op);
                xs[3] = act_apply_(xs[3], va.w, c.w, mode, op);
            }
            for (int q = 0; q < 4; q++) {
                const float* wr = w + (long long)(i + q) * ws;
                for (int o = 0; o < NARROW; o++)
                    if (o < n) acc[o] += xs[q] * wr[o];
            }
        }
    }
    for (; i < kd; i++) {
        const float* wr = w + (long long)i * ws;
        const float v = act_load_(x, xa, cf, i, mode, op);
        for (int o = 0; o < NARROW; o++)
            if (o < n) acc[o] += v * wr[o];
    }
}
extern "C" __global__ void linear_narrow(float* y, float* t, const float* a, const float* at,
                                         const float* w, const float* wt, const float* b,
                                         const float* bt, float scale, long long rows, int k,
                                         int kd, int n, int want_t, int has_at, int has_wt,
                                         int has_b, int has_bt, int init, int has_act, int act,
                                         const float* ac, int has_c) {
    const long long total = rows * (1 + (want_t ? (long long)k : 0));
    GRID_LOOP(q, total) {
        float acc[NARROW];
        for (int o = 0; o < NARROW; o++) acc[o] = 0.f;
        if (q < rows) {
            const float* cq = has_act && has_c ? ac + q * kd : nullptr;
            narrow_row_(a + q * kd, a, cq, has_act, act, kd, w, n, n, acc);
            for (int o = 0; o < NARROW; o++) {
                if (o >= n) break;
                float* dst = y + q * n + o;
                if (init) *dst = scale * ((has_b ? b[o] : 0.f) + acc[o]);
                else *dst += scale * acc[o];
            }
        } else {
            const long long rk = q - rows;  // = r * k + kk
            long long r, kk;
            divmod_(rk, k, &r, &kk);
            const float* cr = has_act && has_c ? ac + r * kd : nullptr;
            if (has_at) narrow_row_(at + rk * kd, a + r * kd, cr, 2 * has_act, act, kd, w, n, n, acc);
            if (has_wt) narrow_row_(a + r * kd, a, cr, has_act, act, kd, wt + kk * n, (long long)k * n, n, acc);
            for (int o = 0; o < NARROW; o++) {
                if (o >= n) break;
                float* dst = t + rk * n + o;
                if (init) *dst = scale * ((has_bt ? bt[kk * n + o] : 0.f) + acc[o]);
                else *dst += scale * acc[o];
            }
        }
    }
}

// A linear op with one dense term a · w (a [rows, kd] with tangents
// [rows, K, kd], w [kd, n] with [kd, K, n]) and the terms linear_init folds
// in, value and tangents in one launch:
//   y[r, j]     = scale * (b[j] + Σ_q u[r, q] uw[q, j] + Σ_i a[r, i] w[i, j]) + c * x[r, j]
//   t[r, kk, j] = scale * (bt[kk, j] + Σ_q (u[r, q] uwt[q, kk, j] + ut[r, kk, q] uw[q, j])
//                 + Σ_i at[r, kk, i] w[i, j] + Σ_i a[r, i] wt[i, kk, j]) + c * xt[r, kk, j]
// (absent terms 0), instead of linear_init and three GEMMs that each read
// and write the whole output: at a recurrent network's sizes (kd = n = 64
// to 128) those GEMMs stream the [rows, K, n] tangents through memory again
// for an inner dimension of a few dozen, and a step's time is its passes over
// the tangents and its launches. Each block computes a DENSE_TILE × DENSE_TILE tile of one
// slot: a tangent kk < K, or the value (the last slot), for
// blockIdx.x = slot · tiles + tile; the reduction (at · w, then a · wt, both
// over kd: one GEMM of inner dimension 2·kd) runs in chunks of DENSE_K through
// shared memory; each of the DENSE_THREADS threads keeps a 4 × 4 block of the
// tile in registers, read from shared memory as float4 (linear_dense_tf32:
// each warp's block multiplied on the tensor cores). With DENSE_ACT the
// dense term's input is f(a) (a rate function, op act) and its tangents
// f′(a) ⊙ at, applied as a chunk goes to shared memory: a rate network's φ(x) · W
// without φ(x)'s tangents ever stored; with DENSE_ACT_C as well, f(a) ⊙ ac
// and f′(a) ⊙ at ⊙ ac for a factor ac of a's shape (the rates' noise).
// With DENSE_POST the output is g of the affine map (a rate function, op
// post) before the leak: y = g(p) + c · x with p = scale · (…), and
// t = g′(p) ⊙ ṗ + c · xt (a leaky network whose nonlinearity follows its
// recurrence). A tangent block needs p where it has only ṗ: the value's
// launch (no DENSE_WANT_T) writes p to pre, and a second launch of the K
// tangents' blocks alone reads it.
#define DENSE_TILE 64
#define DENSE_K 16
#define DENSE_THREADS 256
#define DENSE_WANT_T 1
#define DENSE_AT 2
#define DENSE_WT 4
#define DENSE_B 8
#define DENSE_BT 16
#define DENSE_X 32
#define DENSE_XT 64
#define DENSE_UWT 128
#define DENSE_ACT 256
#define DENSE_ACT_C 512
#define DENSE_POST 1024
#define DENSE_UT 2048
#if DENSE_TILE * DENSE_K != 4 * DENSE_THREADS
#error "linear_dense: each thread stages 4 elements of each operand's chunk"
#endif
#if DENSE_THREADS % DENSE_K != 0 || DENSE_THREADS % DENSE_TILE != 0
#error "linear_dense: a thread's staged elements are whole rows of the chunks apart"
#endif
// two blocks per SM (at most 128 registers a thread): what the tile is laid
// out for; NVRTC only (the tests' host builds of this source have no such
// attribute)
#ifdef __CUDACC_RTC__
#define DENSE_BOUNDS __launch_bounds__(DENSE_THREADS, 2)
#else
#define DENSE_BOUNDS
#endif
// TF32 tensor-core products (linear_dense_tf32): cvt.rna rounds an f32 to
// TF32 (10 mantissa bits, to nearest, ties away from zero); mma_tf32_ is
// mma.sync m16n8k8: d += A · B for a warp, A 16 × 8 and B 8 × 8 in TF32, D
// 16 × 8 in f32, lane l (g = l / 4, c = l % 4) holding a0 = A[g][c],
// a1 = A[g+8][c], a2 = A[g][c+4], a3 = A[g+8][c+4], b0 = B[c][g],
// b1 = B[c+4][g], d0 = D[g][2c], d1 = D[g][2c+1], d2 = D[g+8][2c],
// d3 = D[g+8][2c+1] (the PTX ISA's fragment layout).
// Both need sm_80: compiled for an older architecture (the PTX targets the
// device's, compile_kernels), linear_dense_tf32 multiplies in f32 (DENSE_TC).
#ifdef __CUDACC_RTC__
#if __CUDA_ARCH__ >= 800
#define DENSE_TC true
__device__ __forceinline__ unsigned tf32_rna_(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}
__device__ __forceinline__ void mma_tf32_(float* d, const unsigned* a, const unsigned* b) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#else
#define DENSE_TC false
__device__ __forceinline__ unsigned tf32_rna_(float x) { return 0u; }  // (never called)
__device__ __forceinline__ void mma_tf32_(float* d, const unsigned* a, const unsigned* b) {}
#endif
#else
#define DENSE_TC true
// The host builds of this source (the tests' fake GPU) emulate both from
// that layout: the lanes put their fragments in shared memory between two
// block barriers (the kernel calls this in control flow uniform over the
// block), and each lane takes its D elements from the whole A and B.
__device__ __forceinline__ unsigned tf32_rna_(float x) {
    unsigned u;
    memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & 0xffffe000u;  // (not inf, NaN)
    return u;
}
__device__ void mma_tf32_(float* d, const unsigned* a, const unsigned* b) {
    __shared__ unsigned frag[1024][6];
    const unsigned lane = threadIdx.x % 32, first = threadIdx.x - lane;
    for (int i = 0; i < 4; i++) frag[threadIdx.x][i] = a[i];
    frag[threadIdx.x][4] = b[0];
    frag[threadIdx.x][5] = b[1];
    __syncthreads();
    unsigned A[16][8], B[8][8];
    for (unsigned l = 0; l < 32; l++) {
        const unsigned* f = frag[first + l];
        const unsigned g = l / 4, c = l % 4;
        A[g][c] = f[0]; A[g + 8][c] = f[1]; A[g][c + 4] = f[2]; A[g + 8][c + 4] = f[3];
        B[c][g] = f[4]; B[c + 4][g] = f[5];
    }
    __syncthreads();
    const unsigned g = lane / 4, c = lane % 4;
    for (int q = 0; q < 4; q++) {
        const unsigned i = g + (q / 2) * 8, j = 2 * c + q % 2;
        for (int kk = 0; kk < 8; kk++) {
            float x, w;
            memcpy(&x, &A[i][kk], 4);
            memcpy(&w, &B[kk][j], 4);
            d[q] = fmaf(x, w, d[q]);
        }
    }
}
#endif

// The body of linear_dense (tc false: f32 products on the CUDA cores) and
// linear_dense_tf32 (tc true: TF32 tensor cores). The chunks in shared
// memory: as [DENSE_K][lda] (a's chunk transposed: row r of inner index i
// at as[i * lda + r]) and bs [DENSE_K][ldb] (column j of i at
// bs[i * ldb + j]). With f32 products each thread multiplies a 4 × 4 block
// (rows ty·4 + p, columns tx·4 + q of the tile) from float4 reads; with
// TF32 each warp a 32 × 16 block (warp w: rows (w / 4)·32, columns
// (w % 4)·16) as 2 × 2 mma.sync tiles of 16 × 8, the lane's 16 results in
// the same acc[p][q], row (p / 2)·16 + (p % 2)·8 + g and column
// (q / 2)·8 + 2c + q % 2 of its warp's block.
__device__ __forceinline__ void linear_dense_(
    float* y, float* t, const float* a, const float* at, const float* w, const float* wt,
    const float* b, const float* bt, const float* x, const float* xt, const float* u,
    const float* uw, const float* uwt, float c, float scale, int rows, int k, int kd, int n,
    int ku, int flags, int act, const float* ac, int post, float* pre, const float* ut,
    float* as, int lda, float* bs, int ldb, bool tc) {
    const int tiles_c = (n + DENSE_TILE - 1) / DENSE_TILE;
    const int tiles = ((rows + DENSE_TILE - 1) / DENSE_TILE) * tiles_c;
    const int slot = blockIdx.x / tiles, tile = blockIdx.x % tiles;
    const int kk = slot;  // a tangent, unless this is the value's slot
    const bool value = slot == ((flags & DENSE_WANT_T) ? k : 0);
    const int r0 = (tile / tiles_c) * DENSE_TILE, j0 = (tile % tiles_c) * DENSE_TILE;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int warp = tid / 32, lane = tid % 32, lg = lane / 4, lc = lane % 4;
    const int wr = (warp / 4) * 32, wc = (warp % 4) * 16;  // the warp's block (tc)
    float acc[4][4];
    for (int p = 0; p < 4; p++)
        for (int q = 0; q < 4; q++) acc[p][q] = 0.f;
    // The reduction's chunks: phase 0, at · w (a · w for the value), then
    // phase 1, a · wt, each over kd in chunks of DENSE_K; a phase without
    // its operands' tangents is skipped. Which ones run depends on the
    // block's slot only: the whole block takes the same branches.
    const bool ph0 = value || (flags & DENSE_AT), ph1 = !value && (flags & DENSE_WT);
    const int chunks = (ph0 + ph1) * ((kd + DENSE_K - 1) / DENSE_K);
    // the elements of a chunk this thread stages, loaded into registers
    // one chunk ahead (the next chunk's loads are in flight while this one
    // is multiplied) as they are in memory: the term's activation is
    // applied as they go to shared memory, after the multiplications, so
    // that nothing waits for the loads before it must. Outside the operands
    // all zero: such an element's f(0) meets a zero row of B (its inner
    // index is past kd) or lands in an output row that is not written.
    float pa[4], px[4], pc[4], pb[4];
    // This thread's elements are the same in every chunk: element q of a's
    // chunk is tile row ar + AQ·q at inner column i0 + ia, element q of b's
    // inner row i0 + ib + BQ·q at tile column jb (e = tid + q·DENSE_THREADS
    // in the chunks' layout). Their offsets in a (and ac) and at are set
    // here once, and a chunk adds i0: no division or 64-bit product per
    // element and chunk (which took more instructions than the
    // multiplications they fed).
    constexpr int AQ = DENSE_THREADS / DENSE_K, BQ = DENSE_THREADS / DENSE_TILE;
    const int ar = tid / DENSE_K, ia = tid % DENSE_K, ib = tid / DENSE_TILE, jb = tid % DENSE_TILE;
    const long long off_a = (long long)(r0 + ar) * kd + ia, step_a = (long long)AQ * kd;
    const long long off_at = ((long long)(r0 + ar) * k + kk) * kd + ia, step_at = step_a * k;
    const bool col_b = j0 + jb < n;
    // the chunk of phase ph (0: at · w — a · w for the value — or 1,
    // a · wt) at inner index i0
    auto load = [&](int ph, int i0) {
        const bool tangent_a = !value && ph == 0, col_a = i0 + ia < kd;
        for (int q = 0; q < 4; q++) {
            const bool in = col_a && r0 + ar + AQ * q < rows;
            const long long el = off_a + q * step_a + i0;
            pa[q] = in ? (tangent_a ? at[off_at + q * step_at + i0] : a[el]) : 0.f;
            px[q] = in && (flags & DENSE_ACT) && tangent_a ? a[el] : 0.f;
            pc[q] = in && (flags & DENSE_ACT_C) ? ac[el] : 0.f;
            const int i = i0 + ib + BQ * q;
            pb[q] = i < kd && col_b ? (ph == 0 ? w[(long long)i * n + j0 + jb]
                                               : wt[((long long)i * k + kk) * n + j0 + jb])
                                    : 0.f;
        }
    };
    // (ph, i0): the chunk whose elements the registers hold
    int ph = ph0 ? 0 : 1, i0 = 0;
    if (chunks > 0) load(ph, i0);
    for (int chunk = 0; chunk < chunks; chunk++) {
        const bool tangent_a = !value && ph == 0;
        const int mode = (flags & DENSE_ACT) ? (tangent_a ? 2 : 1) : 0;
        for (int q = 0; q < 4; q++) {
            const float c = (flags & DENSE_ACT_C) ? pc[q] : 1.f;
            as[ia * lda + ar + AQ * q] = act_apply_(pa[q], px[q], c, mode, act);
            bs[(ib + BQ * q) * ldb + jb] = pb[q];
        }
        __syncthreads();
        i0 += DENSE_K;
        if (i0 >= kd) {
            i0 = 0;
            ph++;
        }
        if (chunk + 1 < chunks) load(ph, i0);
        if (tc) {
            for (int ks = 0; ks < DENSE_K; ks += 8) {
                unsigned af[2][4], bf[2][2];
                for (int mi = 0; mi < 2; mi++) {
                    const float* ar = as + wr + mi * 16 + lg;
                    af[mi][0] = tf32_rna_(ar[(ks + lc) * lda]);
                    af[mi][1] = tf32_rna_(ar[(ks + lc) * lda + 8]);
                    af[mi][2] = tf32_rna_(ar[(ks + lc + 4) * lda]);
                    af[mi][3] = tf32_rna_(ar[(ks + lc + 4) * lda + 8]);
                }
                for (int ni = 0; ni < 2; ni++) {
                    const float* br = bs + wc + ni * 8 + lg;
                    bf[ni][0] = tf32_rna_(br[(ks + lc) * ldb]);
                    bf[ni][1] = tf32_rna_(br[(ks + lc + 4) * ldb]);
                }
                for (int mi = 0; mi < 2; mi++)
                    for (int ni = 0; ni < 2; ni++) {
                        float d[4] = {acc[2 * mi][2 * ni], acc[2 * mi][2 * ni + 1],
                                      acc[2 * mi + 1][2 * ni], acc[2 * mi + 1][2 * ni + 1]};
                        mma_tf32_(d, af[mi], bf[ni]);
                        acc[2 * mi][2 * ni] = d[0];
                        acc[2 * mi][2 * ni + 1] = d[1];
                        acc[2 * mi + 1][2 * ni] = d[2];
                        acc[2 * mi + 1][2 * ni + 1] = d[3];
                    }
            }
        } else {
            for (int ii = 0; ii < DENSE_K; ii++) {
                const float4 av = *(const float4*)(as + ii * lda + ty * 4);
                const float4 bv = *(const float4*)(bs + ii * ldb + tx * 4);
                const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
                for (int p = 0; p < 4; p++)
                    for (int q = 0; q < 4; q++) acc[p][q] = fmaf(ar[p], br[q], acc[p][q]);
            }
        }
        __syncthreads();
    }
    // the output row and column of acc[p][q] (both increase with p, q)
    auto row_of = [&](int p) { return tc ? r0 + wr + (p / 2) * 16 + (p % 2) * 8 + lg : r0 + ty * 4 + p; };
    auto col_of = [&](int q) { return tc ? j0 + wc + (q / 2) * 8 + 2 * lc + q % 2 : j0 + tx * 4 + q; };
    // With f32 products a tangent block's rows are written 4 columns at a
    // time as one float4 where all 4 are in the output and 16-byte aligned
    // (n % 4 = 0 and t aligned): a warp's store then writes whole sectors
    // once instead of 4-byte pieces 16 bytes apart four times over, with a
    // quarter of the store instructions. (The value's one block in K + 1
    // stays scalar: its pre-activation's stores would need the registers
    // this kernel has not got.)
    // With TF32 products a lane's columns come in pairs (2c, 2c + 1): a
    // tangent block's pairs are written as float2 where n is even and t
    // aligned (whole 32-byte sectors per 4 lanes instead of half ones).
    const bool vec = !tc && !value && (n & 3) == 0 && aligned_(t, 16) && j0 + tx * 4 + 3 < n;
    const bool vec2 = tc && !value && (n & 1) == 0 && aligned_(t, 8);
    if (value) {
        for (int p = 0; p < 4; p++) {
            const int r = row_of(p);
            if (r >= rows) break;
            for (int q = 0; q < 4; q++) {
                const int j = col_of(q);
                if (j >= n) break;
                float v = acc[p][q];
                if (flags & DENSE_B) v += b[j];
                for (int s = 0; s < ku; s++) v += u[(long long)r * ku + s] * uw[(long long)s * n + j];
                v *= scale;
                if (flags & DENSE_POST) {
                    float g;
                    pre[(long long)r * n + j] = v;
                    rate_eval_(v, post, &v, &g);
                }
                if (flags & DENSE_X) v += c * x[(long long)r * n + j];
                y[(long long)r * n + j] = v;
            }
        }
        return;
    }
    // a tangent block: every output's terms loaded and added (in acc) before
    // any is stored (as in unary_tangent: a load after a store through a
    // pointer the compiler cannot tell apart waits for it)
    for (int p = 0; p < 4; p++) {
        const int r = row_of(p);
        if (r >= rows) break;
        for (int q = 0; q < 4; q++) {
            const int j = col_of(q);
            if (j >= n) break;
            float v = acc[p][q];
            if (flags & DENSE_BT) v += bt[(long long)kk * n + j];
            if (flags & DENSE_UWT)
                for (int s = 0; s < ku; s++)
                    v += u[(long long)r * ku + s] * uwt[((long long)s * k + kk) * n + j];
            if (flags & DENSE_UT)
                for (int s = 0; s < ku; s++)
                    v += ut[((long long)r * k + kk) * ku + s] * uw[(long long)s * n + j];
            v *= scale;
            if (flags & DENSE_POST) {
                float g, g_prime;
                rate_eval_(pre[(long long)r * n + j], post, &g, &g_prime);
                v *= g_prime;
            }
            if (flags & DENSE_XT) v += c * xt[((long long)r * k + kk) * n + j];
            acc[p][q] = v;
        }
    }
    for (int p = 0; p < 4; p++) {
        const int r = row_of(p);
        if (r >= rows) break;
        float* row = t + ((long long)r * k + kk) * n;
        if (vec) {
            store4_(row + j0 + tx * 4, make_float4(acc[p][0], acc[p][1], acc[p][2], acc[p][3]));
        } else if (vec2) {
            // (n even: a pair's first column in the output means both are)
            for (int m = 0; m < 2; m++) {
                const int j = col_of(2 * m);
                if (j < n) store2_(row + j, acc[p][2 * m], acc[p][2 * m + 1]);
            }
        } else {
            for (int q = 0; q < 4; q++) {
                const int j = col_of(q);
                if (j >= n) break;
                row[j] = acc[p][q];
            }
        }
    }
}

// (two kernels of one signature, each with its chunks' shared memory: the
// f32 one's a rows padded by 4 floats; the TF32 one's a and b rows by 8, so
// that a warp's fragment reads — 4 rows of 8 consecutive floats — fall in 32
// different banks)
extern "C" __global__ void DENSE_BOUNDS linear_dense(float* y, float* t, const float* a, const float* at,
                                        const float* w, const float* wt, const float* b,
                                        const float* bt, const float* x, const float* xt,
                                        const float* u, const float* uw, const float* uwt,
                                        float c, float scale, int rows, int k, int kd, int n,
                                        int ku, int flags, int act, const float* ac, int post,
                                        float* pre, const float* ut) {
    __shared__ float4 as[DENSE_K * (DENSE_TILE + 4) / 4], bs[DENSE_K * DENSE_TILE / 4];
    linear_dense_(y, t, a, at, w, wt, b, bt, x, xt, u, uw, uwt, c, scale, rows, k, kd, n, ku, flags,
                  act, ac, post, pre, ut, (float*)as, DENSE_TILE + 4, (float*)bs, DENSE_TILE, false);
}
extern "C" __global__ void DENSE_BOUNDS linear_dense_tf32(float* y, float* t, const float* a, const float* at,
                                        const float* w, const float* wt, const float* b,
                                        const float* bt, const float* x, const float* xt,
                                        const float* u, const float* uw, const float* uwt,
                                        float c, float scale, int rows, int k, int kd, int n,
                                        int ku, int flags, int act, const float* ac, int post,
                                        float* pre, const float* ut) {
    __shared__ float4 as[DENSE_K * (DENSE_TILE + 8) / 4], bs[DENSE_K * (DENSE_TILE + 8) / 4];
    linear_dense_(y, t, a, at, w, wt, b, bt, x, xt, u, uw, uwt, c, scale, rows, k, kd, n, ku, flags,
                  act, ac, post, pre, ut, (float*)as, DENSE_TILE + 8, (float*)bs, DENSE_TILE + 8, DENSE_TC);
}

// dst[z, y, x] = src[x, y, z] for src [a, b, c]
extern "C" __global__ void permute_210(const float* src, float* dst, int a, int b, int c) {
    long long total = (long long)a * b * c;
    GRID_LOOP(i, total) {
        long long x, y, z, rest;
        divmod_(i, a, &rest, &x);
        divmod_(rest, b, &z, &y);
        dst[i] = src[(x * b + y) * c + z];
    }
}

// x[i] = NaN (every scratch buffer, when poisoning for tests)
extern "C" __global__ void fill_nan(float* x, long long n) {
    GRID_LOOP(i, n) { x[i] = nanf(""); }
}

// dst[i] = src[i % len]
extern "C" __global__ void broadcast_rows(const float* src, float* dst, long long total, long long len) {
    GRID_LOOP(i, total) {
        long long q, r;
        divmod_(i, len, &q, &r);
        dst[i] = src[r];
    }
}

// Standard normal values from a counter-based generator: pair i of stream
// (seed, stream) is a pure function of (seed, stream, i), so the numbers do
// not depend on the launch configuration.
__device__ unsigned long long mix64(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ULL;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
extern "C" __global__ void normal_fill(float* out, long long n, unsigned long long seed, unsigned long long stream) {
    unsigned long long key = mix64(mix64(seed) ^ (stream * 0xD6050C454D6E6D5BULL));
    GRID_LOOP(pair, (n + 1) / 2) {
        unsigned long long h = mix64(key ^ mix64((unsigned long long)pair));
        double u1 = ((double)(h >> 40) + 1.0) / 16777217.0;          // (0, 1]
        double u2 = (double)((h >> 16) & 0xFFFFFF) / 16777216.0;     // [0, 1)
        double r = sqrt(-2.0 * log(u1));
        double a = 6.283185307179586 * u2;
        long long i = 2 * pair;
        out[i] = (float)(r * cos(a));
        if (i + 1 < n) out[i + 1] = (float)(r * sin(a));
    }
}

// The tangents of one parameter tensor in the engine's layout: from the
// directions v [K, P], columns [off, off + A*L) → out [A, K, L].
extern "C" __global__ void gather_param(const float* v, float* out, long long p, long long off, int a, int k, int l) {
    long long total = (long long)a * k * l;
    GRID_LOOP(i, total) {
        long long j, kk, aa, rest;
        divmod_(i, l, &rest, &j);
        divmod_(rest, k, &aa, &kk);
        out[i] = v[kk * p + off + aa * l + j];
    }
}

// Deterministic block reduction of one double per thread (blockDim.x = 256).
__device__ double block_sum(double v) {
    __shared__ double sh[256];
    sh[threadIdx.x] = v;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    double r = sh[0];
    __syncthreads();
    return r;
}

// Weighted MSE of y [rows, l] against tgt, weight w[r] per row; one block.
extern "C" __global__ void mse_value(const float* y, const float* tgt, const float* w, int has_w,
                                     long long rows, int l, double inv_n, double* loss) {
    double s = 0.0;
    for (long long i = threadIdx.x; i < rows * l; i += blockDim.x) {
        double e = (double)y[i] - (double)tgt[i];
        s += (has_w ? (double)w[i / l] : 1.0) * e * e;
    }
    s = block_sum(s);
    if (threadIdx.x == 0) *loss += s * inv_n;
}

// The seed of backpropagation for the weighted MSE: g[r, j] = 2 w_r (y - t)[r, j] / n
extern "C" __global__ void mse_seed(const float* y, const float* tgt, const float* w, int has_w,
                                    float* g, long long rows, int l, double inv_n) {
    GRID_LOOP(i, rows * l) {
        double e = (double)y[i] - (double)tgt[i];
        g[i] = (float)(2.0 * (has_w ? (double)w[i / l] : 1.0) * e * inv_n);
    }
}

// The weighted MSE of one step as k + 1 rows of columns [col0, col0 + rows*l)
// of a [k + 1, ld]: a[kk, .] = sqrt(2 w_r / n) yd[r, kk, j] and, in row k,
// sqrt(2 w_r / n) (y - t)[r, j]; then a a^T holds G (rows and columns < k),
// C (row k) and twice the loss (the corner).
// Without tangents (has_yd = 0) rows below k are zero.
extern "C" __global__ void mse_augmented(const float* y, const float* tgt, const float* w, int has_w,
                                         const float* yd, int has_yd, double* a, long long rows, int k,
                                         int l, double inv_n, long long ld, long long col0) {
    // units as in unary_tangent, over the k + 1 rows of a
    const long long cols = rows * l;
    GRID_LOOP(u, cols * tchunks_(k + 1)) {
        long long col, r, j; int k0, k1;
        tunit_(u, cols, k + 1, l, &col, &r, &j, &k0, &k1);
        const double sc = sqrt(2.0 * (has_w ? (double)w[r] : 1.0) * inv_n);
        for (int kk = k0; kk < k1; kk++) {
            double v = kk < k ? (has_yd ? (double)yd[(r * k + kk) * l + j] : 0.0)
                              : (double)y[col] - (double)tgt[col];
            a[kk * ld + col0 + col] = sc * v;
        }
    }
}
"#;

/// How [`CudaDevice::linear_narrow`] treats its outputs.
#[derive(Clone, Copy)]
pub enum NarrowOut<'a> {
    /// Write them: the first term, with the bias and its tangents (if any).
    Write {
        bias: Option<(&'a DevTensor, Option<&'a DevTensor>)>,
    },
    /// Add to them: a later term, or after `linear_init`.
    Add,
}

/// Op codes of the `binary_fwd` and `binary_tangent` kernels.
#[derive(Debug, Clone, Copy)]
pub enum BinaryCode {
    Add = 0,
    Sub = 1,
    Mul = 2,
    Div = 3,
}

/// Unary op codes of the `unary_fwd` kernel.
#[derive(Debug, Clone, Copy)]
pub enum UnaryCode {
    Neg = 0,
    Exp = 1,
    Log = 2,
    Tanh = 3,
    Relu = 4,
    Softplus = 5,
    Sigmoid = 6,
    Square = 7,
    Sqrt = 8,
    AddScalar = 9,
    MulScalar = 10,
    Abs = 11,
    Sin = 12,
    Cos = 13,
}

struct Kernels {
    unary_fwd: CudaFunction,
    binary_fwd: CudaFunction,
    binary_tangent: CudaFunction,
    copy_columns: CudaFunction,
    take_columns: CudaFunction,
    mse_seed: CudaFunction,
    scale_rows: CudaFunction,
    linear_init: CudaFunction,
    linear_narrow: CudaFunction,
    linear_small_add: CudaFunction,
    linear_dense: CudaFunction,
    linear_dense_tf32: CudaFunction,
    unary_tangent: CudaFunction,
    unary_grad: CudaFunction,
    permute_210: CudaFunction,
    broadcast_rows: CudaFunction,
    mse_value: CudaFunction,
    mse_augmented: CudaFunction,
    normal_fill: CudaFunction,
    gather_param: CudaFunction,
    fill_nan: CudaFunction,
    pointwise: CudaFunction,
    pointwise_grad: CudaFunction,
}

/// A SOFO sketch of weighted-MSE little losses, accumulated on the device
/// in f64. Each observed output adds k + 1 rows of columns to a buffer A:
/// √(2w/n)·ẏ_k for the K tangents and √(2w/n)·(y − t) last, so that A Aᵀ
/// holds G̃ (the K×K block), C (the last row) and twice the loss (the
/// corner) at once. The buffer is multiplied out into the Gram matrix with
/// one GEMM whenever it is full (its size is fixed: memory stays flat in T).
pub struct MseSketch {
    k: usize,
    gram: CudaSlice<f64>,
    buf: CudaSlice<f64>,
    cap: usize,
    used: usize,
}

impl MseSketch {
    /// Bytes of the column buffer (at least one output wide).
    pub const BUFFER_BYTES: usize = 4 << 20;

    /// The number of tangents it sketches.
    pub fn k(&self) -> usize {
        self.k
    }
}

impl Drop for MseSketch {
    fn drop(&mut self) {
        count_free((self.k + 1) * self.cap * 8);
    }
}

/// Hands out blocks of a host array as device tensors, copying the array
/// a chunk of blocks at a time ([`BlockStager::chunk_blocks`]: up to 64
/// within 16 MiB): one upload per chunk
/// instead of one per block (a batch's inputs or targets, step by step;
/// each upload is a round trip over the bus between two kernels), with
/// device memory bounded by the chunk, not the array. A block is served
/// from the chunk only where its host values equal the chunk's copy, so a
/// stager may outlive the array it was filled from.
#[derive(Clone, Default)]
pub struct BlockStager {
    /// The chunk as uploaded (f32), its first element's index in the
    /// array, and the chunk on the device.
    host: Vec<f32>,
    start: usize,
    chunk: Option<Arc<DevTensor>>,
}

impl BlockStager {
    /// The most blocks per chunk.
    pub const CHUNK_BLOCKS: usize = 64;
    /// The most bytes of a chunk (f32) unless one block is larger: large
    /// blocks (a big network's noise, [M, N] per step) come fewer at a time.
    pub const CHUNK_BYTES: usize = 16 << 20;

    /// Blocks per chunk for blocks of `block_len` elements: as many as fit
    /// in [`BlockStager::CHUNK_BYTES`], 1 to [`BlockStager::CHUNK_BLOCKS`].
    pub fn chunk_blocks(block_len: usize) -> usize {
        (Self::CHUNK_BYTES / (4 * block_len.max(1))).clamp(1, Self::CHUNK_BLOCKS)
    }

    /// Elements [offset, offset + n) of `whole` as a device tensor of
    /// `shape` (n elements): a read-only view of the staged chunk, which is
    /// staged anew (from `offset`) when it does not hold those values.
    pub fn block<T: Float>(
        &mut self,
        dev: &CudaDevice,
        whole: &[T],
        offset: usize,
        shape: &[usize],
    ) -> Result<DevTensor> {
        let n = shape.iter().product::<usize>();
        if n == 0 && offset <= whole.len() {
            // nothing to stage (a batch without input columns)
            return dev.upload(&Tensor::zeros(shape));
        }
        let Some(src) = whole.get(offset..offset + n).filter(|s| !s.is_empty()) else {
            return Err(TensorError::shape(
                "device block",
                format!(
                    "1 to {} elements from {offset}",
                    whole.len().saturating_sub(offset)
                ),
                format!("{shape:?}"),
            ));
        };
        let f32_of = |v: &T| v.to_f64() as f32;
        let held = self.chunk.is_some()
            && offset >= self.start
            && offset + n <= self.start + self.host.len()
            && src
                .iter()
                .zip(&self.host[offset - self.start..])
                .all(|(a, b)| f32_of(a).to_bits() == b.to_bits());
        if !held {
            let blocks = Self::chunk_blocks(n);
            let end = (offset + n * blocks).min(whole.len());
            self.host = whole[offset..end].iter().map(f32_of).collect();
            self.start = offset;
            // always a whole chunk (zeros past the array's end), so that
            // device memory and the buffers a pass asks for are the same
            // at every T
            let mut up = self.host.clone();
            up.resize(n * blocks, 0.0);
            let up = dev.upload(&Tensor::from_vec(&[up.len()], up)?)?;
            self.chunk = Some(Arc::new(up));
        }
        let chunk = self.chunk.as_ref().expect("staged above");
        DevTensor::view(chunk, offset - self.start, shape)
    }
}

/// A pointwise program's words and their device copy.
type Program = (Vec<u32>, Arc<CudaSlice<u32>>);

/// An open GPU: context, stream, cuBLAS handle and compiled kernels.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    k: Kernels,
    /// Stands in for absent optional kernel arguments (never read).
    dummy: CudaSlice<f32>,
    /// Whether the f32 GEMMs use TF32 tensor cores.
    tf32: std::sync::atomic::AtomicBool,
    /// The stream, buffer pool and graph recording state, shared with the
    /// tensors.
    core: Arc<Core>,
    /// cuBLAS's workspace, set by us so that GEMMs can be captured into
    /// graphs (cuBLAS allocates nothing while capturing).
    _blas_workspace: CudaSlice<u8>,
    /// Whether passes run as CUDA graphs ([`CudaDevice::set_graphs`]).
    graphs: std::sync::atomic::AtomicBool,
    /// Which kernels compute a linear op's dense term
    /// ([`CudaDevice::set_dense_linear`]).
    dense_linear: std::sync::atomic::AtomicU8,
    /// Values kept between calls ([`CudaDevice::keep`]).
    kept: std::sync::Mutex<std::collections::HashMap<&'static str, Box<dyn std::any::Any + Send>>>,
    /// Fill every buffer handed out by `scratch` with NaN (SOFO_GPU_POISON
    /// set: tests), so that reading an element nobody wrote shows.
    poison: bool,
    /// The instruction words of the pointwise programs run so far, each
    /// uploaded once and kept for the device's life (a graph's launches
    /// point at them; a process runs a handful: one per plant and its
    /// parameters), found by their words.
    programs: std::sync::Mutex<Vec<Program>>,
}

/// Which kernels compute the dense term of a linear op (a recurrence's
/// `r · W`) on the device: chosen with SOFO_GPU_LINEAR (`auto`, the default;
/// `fused`; `gemm`) or [`CudaDevice::set_dense_linear`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DenseLinear {
    /// The fused `linear_dense` kernel where the term's inner dimension is
    /// at most [`DenseLinear::AUTO_MAX_INNER`] (a network of up to that many
    /// units: each GEMM there streams the tangents through memory for
    /// little arithmetic) and its output columns fill the kernel's 64-wide
    /// tiles (one tile, or 7/8 of them and more), cuBLAS elsewhere (large
    /// GEMMs, where cuBLAS's tiles win, and outputs such as 100 columns,
    /// where the fused kernel computes 128: on an H200, N = 100, M = 256,
    /// K = 128 took 0.87 s an iteration with cuBLAS against 1.04 fused, in
    /// TF32 0.69 against 0.97, while N = 64 and N = 128 ran 6–9 % faster
    /// fused; docs/measurements/h200-2026-11-27).
    Auto,
    /// Always the fused kernel (a linear op with one dense term).
    Fused,
    /// Always `linear_init` and cuBLAS GEMMs.
    Gemm,
}

impl DenseLinear {
    /// The largest inner dimension `Auto` fuses.
    pub const AUTO_MAX_INNER: usize = 128;

    /// Parses SOFO_GPU_LINEAR's value.
    pub fn parse(v: &str) -> Result<Self> {
        match v {
            "auto" => Ok(DenseLinear::Auto),
            "fused" => Ok(DenseLinear::Fused),
            "gemm" => Ok(DenseLinear::Gemm),
            _ => Err(TensorError::Device {
                op: "open",
                message: format!(
                    "SOFO_GPU_LINEAR is {v:?}: auto (the fused kernel up to {} inner \
                     columns where the output fills its tiles, cuBLAS elsewhere), fused \
                     or gemm",
                    Self::AUTO_MAX_INNER
                ),
            }),
        }
    }

    fn from_env() -> Result<Self> {
        match std::env::var("SOFO_GPU_LINEAR") {
            Err(_) => Ok(DenseLinear::Auto),
            Ok(v) => Self::parse(&v),
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => DenseLinear::Fused,
            2 => DenseLinear::Gemm,
            _ => DenseLinear::Auto,
        }
    }

    /// Whether a dense term of inner dimension `kd` and `n` output columns
    /// runs fused.
    pub fn fuses(self, kd: usize, n: usize) -> bool {
        let tile = CudaDevice::DENSE_TILE;
        match self {
            DenseLinear::Auto => {
                kd <= Self::AUTO_MAX_INNER && (n <= tile || 8 * n >= 7 * n.next_multiple_of(tile))
            }
            DenseLinear::Fused => true,
            DenseLinear::Gemm => false,
        }
    }
}

impl CudaDevice {
    /// Chooses the kernels of a linear op's dense term (see [`DenseLinear`]).
    pub fn set_dense_linear(&self, choice: DenseLinear) {
        self.dense_linear.store(choice as u8, Ordering::Relaxed);
    }

    /// The kernels of a linear op's dense term.
    pub fn dense_linear(&self) -> DenseLinear {
        DenseLinear::from_u8(self.dense_linear.load(Ordering::Relaxed))
    }

    /// Whether a linear op's one dense term of inner dimension `kd` and `n`
    /// output columns runs in the fused `linear_dense` kernel, as
    /// [`DenseLinear`] says (in TF32 mode its products run on the tensor
    /// cores, `linear_dense_tf32`, as cuBLAS's do).
    pub fn fuses_linear(&self, kd: usize, n: usize) -> bool {
        self.dense_linear().fuses(kd, n)
    }
}

/// Whether the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the driver library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

static DEV_LIVE: AtomicUsize = AtomicUsize::new(0);
static DEV_PEAK: AtomicUsize = AtomicUsize::new(0);

fn count_alloc(bytes: usize) {
    let now = DEV_LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    DEV_PEAK.fetch_max(now, Ordering::Relaxed);
}

fn count_free(bytes: usize) {
    DEV_LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

/// (live, peak) bytes of device memory held by this backend's live tensors
/// and sketch buffers. Freed buffers waiting in a device's pool for reuse
/// (at most 1 GiB) are not counted: see [`CudaDevice::pooled_bytes`].
pub fn device_memory() -> (usize, usize) {
    (
        DEV_LIVE.load(Ordering::Relaxed),
        DEV_PEAK.load(Ordering::Relaxed),
    )
}

/// Sets the peak to what is held now.
pub fn reset_device_peak() {
    DEV_PEAK.store(DEV_LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// Freed device buffers kept for reuse, by length: the temporaries of one
/// time step come back at the next without a driver call. One stream
/// orders every use of the device, so a buffer handed out again is never
/// still in use by earlier work.
#[derive(Default)]
struct BufferPool {
    free: std::sync::Mutex<std::collections::HashMap<usize, Vec<CudaSlice<f32>>>>,
    bytes: AtomicUsize,
}

impl BufferPool {
    /// At most this much memory waits in the pool; beyond it, freed buffers
    /// go back to the driver.
    const MAX_BYTES: usize = 1 << 30;

    fn take(&self, n: usize) -> Option<CudaSlice<f32>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let s = free.get_mut(&n)?.pop()?;
        self.bytes.fetch_sub(n * 4, Ordering::Relaxed);
        Some(s)
    }

    /// Gives every pooled buffer back to the driver.
    fn clear(&self) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.clear();
        self.bytes.store(0, Ordering::Relaxed);
    }

    /// Keeps a freed buffer (beyond the cap it is freed on the stream,
    /// unless `hold`: while a graph is captured nothing may be freed).
    fn put(&self, s: CudaSlice<f32>, hold: bool) {
        let bytes = s.len() * 4;
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if !hold && self.bytes.load(Ordering::Relaxed) + bytes > Self::MAX_BYTES {
            return; // dropped: freed on the stream
        }
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        free.entry(s.len()).or_default().push(s);
    }
}

/// An f32 tensor in device memory (row-major, contiguous), counted in
/// [`device_memory`]; its buffer returns to its device's pool when dropped.
pub struct DevTensor {
    shape: Vec<usize>,
    data: std::mem::ManuallyDrop<CudaSlice<f32>>,
    /// Where the buffer goes when dropped (`None`: back to the driver).
    home: Option<Home>,
}

impl DevTensor {
    fn wrap(shape: &[usize], data: CudaSlice<f32>, home: Option<Home>) -> Self {
        count_alloc(data.len() * 4);
        DevTensor {
            shape: shape.to_vec(),
            data: std::mem::ManuallyDrop::new(data),
            home,
        }
    }

    /// `shape`'s elements of `parent` from element `offset` on, without a
    /// copy: the view keeps `parent` alive and must only be read (views are
    /// handed out as constants; device ops write fresh buffers only).
    pub fn view(parent: &Arc<DevTensor>, offset: usize, shape: &[usize]) -> Result<DevTensor> {
        let n = shape.iter().product::<usize>();
        if n == 0 || offset + n > parent.numel() {
            return Err(TensorError::shape(
                "device view",
                format!(
                    "1 to {} elements from {offset}",
                    parent.numel().saturating_sub(offset)
                ),
                format!("{shape:?}"),
            ));
        }
        let stream = parent.data.stream().clone();
        let ptr = ptr_of(&parent.data, &stream) + (offset * std::mem::size_of::<f32>()) as u64;
        // SAFETY: [ptr, ptr + n) lies inside the parent's buffer, which the
        // view's home keeps alive; the alias is leaked, never freed, on drop
        // (event tracking is off, so it owns no events either).
        let data = unsafe { stream.upgrade_device_ptr::<f32>(ptr, n) };
        Ok(DevTensor {
            shape: shape.to_vec(),
            data: std::mem::ManuallyDrop::new(data),
            home: Some(Home::View(parent.clone())),
        })
    }

    /// Relabels the same number of elements (the caller's check).
    fn set_shape(&mut self, shape: &[usize]) {
        debug_assert_eq!(shape.iter().product::<usize>().max(1), self.numel().max(1));
        self.shape = shape.to_vec();
    }
}

impl Drop for DevTensor {
    fn drop(&mut self) {
        if !matches!(self.home, Some(Home::View(_))) {
            count_free(self.data.len() * 4);
        }
        // SAFETY: the buffer is not touched again after this.
        let data = unsafe { std::mem::ManuallyDrop::take(&mut self.data) };
        if let Some(home) = &self.home {
            home.put(data);
        }
    }
}

impl Clone for DevTensor {
    /// A copy on the device, in a buffer of the device's (so that a pass
    /// that clones can be recorded and replayed).
    fn clone(&self) -> Self {
        let Some(core) = self.home.as_ref().and_then(Home::core) else {
            return DevTensor::wrap(&self.shape, (*self.data).clone(), None);
        };
        let n = self.numel();
        let (data, home) = core.buffer(n).expect("device memory for a copy");
        let (src, dst) = (
            ptr_of(&self.data, &core.stream),
            ptr_of(&data, &core.stream),
        );
        core.copy(src, dst, n).expect("a device copy");
        DevTensor::wrap(&self.shape, data, Some(home))
    }
}

impl std::fmt::Debug for DevTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevTensor<f32>{:?}", self.shape)
    }
}

impl DevTensor {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn slice(&self) -> &CudaSlice<f32> {
        &self.data
    }
    pub fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.data
    }
    /// Same data, new shape.
    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        if shape.iter().product::<usize>() != self.numel() {
            return Err(TensorError::shape(
                "reshape",
                format!("a shape with {} elements", self.numel()),
                format!("{shape:?}"),
            ));
        }
        self.shape = shape.to_vec();
        Ok(self)
    }
}

impl CudaDevice {
    /// The widest term `u · w` that `linear_init` folds in (a network's
    /// input: a handful of columns) instead of two GEMMs.
    pub const SMALL_TERM: usize = 8;
    /// The widest output of a linear op whose terms `linear_narrow` computes
    /// (a readout) instead of cuBLAS GEMMs.
    pub const NARROW: usize = 8;
    /// The most registers (inputs and steps) of a pointwise program the
    /// `pointwise` kernel runs.
    pub const PW_REGS: usize = 64;
    /// The most input tensors of a `pointwise` launch.
    pub const PW_TENSORS: usize = 8;
    /// The rows and columns of the output tile of one `linear_dense` block.
    pub const DENSE_TILE: usize = 64;
    /// The threads of a `linear_dense` block.
    const DENSE_THREADS: u32 = 256;
}

/// The operand sizes of one linear term `a · w` (a [rows, kd] with tangents
/// [rows, K, kd], w [kd, n] with [kd, K, n]) against its output y [rows, n]
/// and the output's tangents [rows, K, n]; (rows, n).
fn term_sizes(
    op: &'static str,
    y: &DevTensor,
    t: Option<&DevTensor>,
    k: usize,
    a: (&DevTensor, Option<&DevTensor>),
    w: (&DevTensor, Option<&DevTensor>),
) -> Result<(usize, usize)> {
    let n = y.shape.last().copied().unwrap_or(1).max(1);
    let rows = y.numel() / n;
    let kd = w.0.shape.first().copied().unwrap_or(0);
    let sizes = [
        (Some(a.0.numel()), rows * kd, "a"),
        (Some(w.0.numel()), kd * n, "w"),
        (a.1.map(DevTensor::numel), rows * k * kd, "a's tangents"),
        (w.1.map(DevTensor::numel), kd * k * n, "w's tangents"),
        (
            t.map(DevTensor::numel),
            rows * k * n,
            "the output's tangents",
        ),
    ];
    for (got, want, what) in sizes {
        if let Some(got) = got.filter(|&g| g != want) {
            return Err(TensorError::shape(
                op,
                format!("{what} of {want} elements"),
                format!("{got}"),
            ));
        }
    }
    Ok((rows, n))
}

/// A pointwise program as the kernels read it: `words` (op, a, b, scalar
/// bits) per step, then the output registers; its number of inputs (the
/// column blocks its operands must give) and of steps.
#[derive(Clone, Copy, Debug)]
pub struct ProgramWords<'a> {
    pub words: &'a [u32],
    pub inputs: usize,
    pub steps: usize,
}

/// A pointwise launch's shapes and counts, checked against its program.
struct ProgramShape {
    out_shape: Vec<usize>,
    widths: Vec<i32>,
    n_tensors: i32,
    n_step: i32,
    n_out: i32,
    pl: i64,
    l: i32,
}

/// Checks a pointwise program's words against its inputs [.., w_i]: every
/// width a multiple of `l`, as many column blocks as the program has
/// inputs, at most `PW_REGS` registers, each step reading earlier
/// registers, at least one output and every output a register — so that the
/// kernels stay inside their register file and buffers.
fn check_program(prog: ProgramWords, inputs: &[&DevTensor], l: usize) -> Result<ProgramShape> {
    let (code, n_step) = (prog.words, prog.steps);
    let bad = |why: String| TensorError::arg("device pointwise", why);
    let first = inputs.first().map(|x| x.shape.clone()).unwrap_or_default();
    if inputs.is_empty() || inputs.len() > CudaDevice::PW_TENSORS || first.is_empty() || l == 0 {
        return Err(bad(format!(
            "1 to {} inputs of rank ≥ 1 and l ≥ 1, got {} (l = {l})",
            CudaDevice::PW_TENSORS,
            inputs.len()
        )));
    }
    let lead = &first[..first.len() - 1];
    let mut widths = Vec::with_capacity(inputs.len());
    for x in inputs {
        let w = *x.shape.last().unwrap_or(&0);
        if x.shape.len() != first.len() || &x.shape[..lead.len()] != lead || w % l != 0 {
            return Err(TensorError::shape(
                "device pointwise",
                format!("[{lead:?}.., a multiple of {l}]"),
                format!("{:?}", x.shape),
            ));
        }
        widths.push(i32::try_from(w).map_err(|_| bad(format!("width {w}")))?);
    }
    let n_in: usize = widths.iter().map(|&w| w as usize / l).sum();
    if n_in != prog.inputs {
        return Err(bad(format!(
            "{} column blocks of width {l} for the program's inputs, got {n_in}",
            prog.inputs
        )));
    }
    let regs = n_in + n_step;
    let n_out = code.len().saturating_sub(4 * n_step);
    let steps_ok = code.len() >= 4 * n_step
        && (0..n_step).all(|s| {
            let w = &code[4 * s..4 * s + 4];
            let before = |r: u32| (r as usize) < n_in + s;
            before(w[1]) && (w[0] < 32 || before(w[2]))
        });
    if regs > CudaDevice::PW_REGS
        || n_out == 0
        || !steps_ok
        || !code[4 * n_step..].iter().all(|&r| (r as usize) < regs)
    {
        return Err(bad(format!(
            "a program of at most {} registers, each step reading earlier ones, and at \
             least one output: {n_in} inputs, {n_step} steps, {n_out} outputs",
            CudaDevice::PW_REGS
        )));
    }
    let rows: usize = lead.iter().product();
    let mut out_shape = lead.to_vec();
    out_shape.push(n_out * l);
    let count = |n: usize| i32::try_from(n).map_err(|_| bad(format!("count {n}")));
    Ok(ProgramShape {
        out_shape,
        n_tensors: count(inputs.len())?,
        widths,
        n_step: count(n_step)?,
        n_out: count(n_out)?,
        pl: i64::try_from(rows * l).map_err(|_| bad(format!("{rows} rows")))?,
        l: count(l)?,
    })
}

/// The tangents one thread of a tangent kernel handles (`TCHUNK` of the
/// kernel source): the number of threads to launch for a value of `pl`
/// entries with `k` tangents each (at least one per entry).
const TCHUNK: usize = 8;
fn tangent_units(pl: usize, k: usize) -> usize {
    pl * k.div_ceil(TCHUNK).max(1)
}

/// cuBLAS's workspace (its recommendation for Hopper is 32 MiB).
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A linear op's term with a few inner columns that its first launch
/// folds in (`linear_init`, `linear_dense`): `u` [rows, ku] (ku ≤
/// [`CudaDevice::SMALL_TERM`]: a network's input, a plant's state) with
/// tangents `ut` [rows, K, ku] or none, times `w` [ku, n] with tangents
/// `wt` [ku, K, n] or none.
#[derive(Clone, Copy, Debug)]
pub struct SmallTerm<'a> {
    pub u: &'a DevTensor,
    pub ut: Option<&'a DevTensor>,
    pub w: &'a DevTensor,
    pub wt: Option<&'a DevTensor>,
}

/// The input of a linear term read through an elementwise function by the
/// kernel (`linear_dense`, `linear_narrow`): `f(a) ⊙ c`, its tangents
/// `f′(a) ⊙ ȧ ⊙ c`, for a rate function `f` ([`UnaryCode::is_rate_function`])
/// and an optional factor `c` of a's shape without tangents (a rate
/// network's φ(x), the rates' noise).
#[derive(Clone, Copy, Debug)]
pub struct TermActivation<'a> {
    pub op: UnaryCode,
    pub factor: Option<&'a DevTensor>,
}

impl UnaryCode {
    /// Whether the linear op's kernels apply this function to a term's
    /// input or to their output: tanh, relu, softplus and sigmoid (the
    /// others run as kernels of their own).
    pub fn is_rate_function(self) -> bool {
        matches!(
            self,
            UnaryCode::Tanh | UnaryCode::Relu | UnaryCode::Softplus | UnaryCode::Sigmoid
        )
    }
}

/// A rate function's code for a linear op's kernel, or an error naming
/// `what` and the op.
fn rate_function(what: &'static str, op: UnaryCode) -> Result<i32> {
    match op.is_rate_function() {
        true => Ok(op as i32),
        false => Err(TensorError::Device {
            op: what,
            message: format!(
                "{op:?} is not applied by the kernel: tanh, relu, softplus or sigmoid"
            ),
        }),
    }
}

/// A term's activation as kernel arguments: (whether, op code, whether a
/// factor), after checking the op and the factor's size against the term's
/// input of `numel` elements.
fn act_args(act: Option<TermActivation<'_>>, numel: usize) -> Result<(i32, i32, i32)> {
    let Some(act) = act else {
        return Ok((0, 0, 0));
    };
    let op = rate_function("device linear term's activation", act.op)?;
    if let Some(c) = act.factor {
        if c.numel() != numel {
            return Err(TensorError::shape(
                "device linear term's factor",
                format!("{numel} elements (the term's input)"),
                format!("{:?}", c.shape),
            ));
        }
    }
    Ok((1, op, act.factor.is_some() as i32))
}

fn one_block() -> LaunchConfig {
    LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Compiles the kernels with NVRTC (no GPU needed, only libnvrtc): PTX for
/// a device of compute capability `cc` (major, minor), so that what that
/// architecture allows is in it — TF32 `mma.sync` from 8.0
/// (`linear_dense_tf32`; below, it multiplies in f32) —, or for NVRTC's
/// default architecture where `cc` is unknown or this NVRTC does not know it.
fn compile_kernels(cc: Option<(i32, i32)>) -> Result<cudarc::nvrtc::Ptx> {
    let options = |arch: Option<String>| CompileOptions {
        name: Some("sofo_kernels.cu".into()),
        options: arch.into_iter().collect(),
        ..Default::default()
    };
    if let Some((major, minor)) = cc.filter(|&(major, _)| major > 0) {
        let arch = format!("--gpu-architecture=compute_{major}{minor}");
        if let Ok(ptx) = compile_ptx_with_opts(KERNELS, options(Some(arch))) {
            return Ok(ptx);
        }
    }
    compile_ptx_with_opts(KERNELS, options(None)).map_err(|e| dev_err("nvrtc", e))
}

/// Whether libnvrtc can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// What this machine offers the backend: whether the CUDA driver, cuBLAS
/// and NVRTC libraries load, and how many GPUs the driver sees (`Err`: why
/// it cannot tell).
pub struct Probe {
    pub driver: bool,
    pub cublas: bool,
    pub nvrtc: bool,
    pub devices: std::result::Result<usize, String>,
}

/// Looks for the libraries and GPUs without opening any device.
pub fn probe() -> Probe {
    let driver = driver_present();
    // SAFETY: only try to dlopen the libraries.
    let (cublas, nvrtc) = unsafe {
        (
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    let devices = if driver {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(|e| format!("{e:?}"))
    } else {
        Err("no CUDA driver (libcuda)".into())
    };
    Probe {
        driver,
        cublas,
        nvrtc,
        devices,
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`, or says why it cannot.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        let p = probe();
        if !p.driver {
            return Err(TensorError::Device {
                op: "open",
                message: "no CUDA driver (libcuda) on this machine".into(),
            });
        }
        if !p.cublas || !p.nvrtc {
            return Err(TensorError::Device {
                op: "open",
                message: format!(
                    "CUDA libraries not found (libcublas: {}, libnvrtc: {}); put the CUDA 13 \
                     library directory on LD_LIBRARY_PATH",
                    p.cublas, p.nvrtc
                ),
            });
        }
        let count = p.devices.map_err(|e| TensorError::Device {
            op: "open",
            message: e,
        })?;
        if ordinal >= count {
            return Err(TensorError::Device {
                op: "open",
                message: format!("device cuda:{ordinal} does not exist ({count} GPUs)"),
            });
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| dev_err("open", e))?;
        // One stream: no cross-stream events needed.
        // SAFETY: every operation of this backend runs on this one stream.
        unsafe { ctx.disable_event_tracking() };
        let name = ctx.name().map_err(|e| dev_err("open", e))?;
        // a stream of our own, not the legacy default stream: only such a
        // stream can be captured into a CUDA graph
        let stream = ctx.new_stream().map_err(|e| dev_err("stream", e))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| dev_err("cublas", e))?;
        let mut workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(|e| dev_err("alloc", e))?;
        {
            let (ws, _) = workspace.device_ptr_mut(&stream);
            // SAFETY: the handle and the workspace live as long as the device.
            let status = unsafe {
                blas_sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ws as *mut std::ffi::c_void,
                    BLAS_WORKSPACE_BYTES,
                )
            };
            if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return Err(dev_err("cublasSetWorkspace", status));
            }
        }
        let ptx = compile_kernels(ctx.compute_capability().ok())?;
        let module = ctx
            .load_module(ptx)
            .map_err(|e| dev_err("load_module", e))?;
        let f = |n: &str| {
            module
                .load_function(n)
                .map_err(|e| dev_err("load_function", e))
        };
        let k = Kernels {
            unary_fwd: f("unary_fwd")?,
            binary_fwd: f("binary_fwd")?,
            binary_tangent: f("binary_tangent")?,
            copy_columns: f("copy_columns")?,
            take_columns: f("take_columns")?,
            mse_seed: f("mse_seed")?,
            scale_rows: f("scale_rows")?,
            linear_init: f("linear_init")?,
            linear_narrow: f("linear_narrow")?,
            linear_small_add: f("linear_small_add")?,
            linear_dense: f("linear_dense")?,
            linear_dense_tf32: f("linear_dense_tf32")?,
            unary_tangent: f("unary_tangent")?,
            unary_grad: f("unary_grad")?,
            permute_210: f("permute_210")?,
            broadcast_rows: f("broadcast_rows")?,
            mse_value: f("mse_value")?,
            mse_augmented: f("mse_augmented")?,
            normal_fill: f("normal_fill")?,
            gather_param: f("gather_param")?,
            fill_nan: f("fill_nan")?,
            pointwise: f("pointwise")?,
            pointwise_grad: f("pointwise_grad")?,
        };
        let dummy = stream
            .alloc_zeros::<f32>(1)
            .map_err(|e| dev_err("alloc", e))?;
        Ok(Arc::new(CudaDevice {
            ordinal,
            name,
            core: Arc::new(Core::new(stream.clone())),
            stream,
            blas,
            _blas_workspace: workspace,
            kept: Default::default(),
            graphs: std::sync::atomic::AtomicBool::new(graph::graphs_by_default()?),
            dense_linear: std::sync::atomic::AtomicU8::new(DenseLinear::from_env()? as u8),
            k,
            dummy,
            tf32: std::sync::atomic::AtomicBool::new(false),
            poison: std::env::var_os("SOFO_GPU_POISON").is_some(),
            programs: Default::default(),
        }))
    }

    /// Lets cuBLAS run the f32 GEMMs on TF32 tensor cores (inputs rounded to
    /// 10 mantissa bits, f32 accumulation: JAX's default for f32 matmuls on
    /// this hardware; PyTorch's is off), or back to full f32. The sketch's
    /// f64 accumulation is not affected.
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        let mode = if on {
            blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is valid for the device's lifetime.
        let status = unsafe { blas_sys::cublasSetMathMode(*self.blas.handle(), mode) };
        if status != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(dev_err("cublasSetMathMode", status));
        }
        self.tf32.store(on, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes of freed buffers this device keeps for reuse.
    pub fn pooled_bytes(&self) -> usize {
        self.core.pool.bytes.load(Ordering::Relaxed)
    }

    /// Whether the f32 GEMMs use TF32 (see [`CudaDevice::set_tf32`]).
    pub fn tf32(&self) -> bool {
        self.tf32.load(Ordering::Relaxed)
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// Waits for all queued work.
    pub fn synchronize(&self) -> Result<()> {
        self.core.host_sync("synchronize")?;
        self.stream
            .synchronize()
            .map_err(|e| dev_err("synchronize", e))
    }

    pub fn upload(&self, t: &Tensor<f32>) -> Result<DevTensor> {
        // an empty tensor keeps a buffer of length 0 (`numel` is its length;
        // scratch buffers have at least one element)
        if t.numel() == 0 {
            // (not a buffer a graph could own)
            self.core.host_sync("upload")?;
            let data = self
                .stream
                .clone_htod(t.data())
                .map_err(|e| dev_err("upload", e))?;
            return Ok(DevTensor::wrap(t.shape(), data, None));
        }
        let mut d = self.scratch(t.shape())?;
        self.core.upload(t.data(), &mut d.data)?;
        Ok(d)
    }

    pub fn download(&self, t: &DevTensor) -> Result<Tensor<f32>> {
        self.core.host_sync("download")?;
        let v = self
            .stream
            .clone_dtoh(&*t.data)
            .map_err(|e| dev_err("download", e))?;
        Tensor::from_vec(&t.shape, v)
    }

    pub fn download_f64(&self, v: &CudaSlice<f64>) -> Result<Vec<f64>> {
        self.core.host_sync("download")?;
        self.stream
            .clone_dtoh(v)
            .map_err(|e| dev_err("download", e))
    }

    /// A tensor whose contents are unspecified: every element must be
    /// written. A buffer of that length from the pool, else a new one.
    pub fn scratch(&self, shape: &[usize]) -> Result<DevTensor> {
        let n = shape.iter().product::<usize>().max(1);
        let (mut data, home) = self.core.buffer(n)?;
        if self.poison {
            let len = n as i64;
            let mut b = Launch::new(&self.core, &self.k.fill_nan);
            b.out(&mut data).arg(&len);
            // SAFETY: data holds n elements.
            unsafe { b.launch(grid(n)) }.map_err(|e| dev_err("fill_nan", e))?;
        }
        Ok(DevTensor::wrap(shape, data, Some(home)))
    }

    pub fn zeros(&self, shape: &[usize]) -> Result<DevTensor> {
        let n = shape.iter().product::<usize>().max(1);
        let (mut data, home) = self.core.buffer(n)?;
        self.core.memset_zero(&mut data)?;
        Ok(DevTensor::wrap(shape, data, Some(home)))
    }

    /// f64 zeros in a buffer of its own (not one a graph could own).
    pub fn zeros_f64(&self, n: usize) -> Result<CudaSlice<f64>> {
        self.core.host_sync("f64 buffer")?;
        self.stream
            .alloc_zeros::<f64>(n.max(1))
            .map_err(|e| dev_err("alloc", e))
    }

    /// y = f(x); with `want_d` also d = f'(x).
    pub fn unary(
        &self,
        x: &DevTensor,
        op: UnaryCode,
        s: f32,
        want_d: bool,
    ) -> Result<(DevTensor, Option<DevTensor>)> {
        let mut y = self.scratch(&x.shape)?;
        let mut d = if want_d {
            Some(self.scratch(&x.shape)?)
        } else {
            None
        };
        let n = x.numel() as i64;
        let (opc, wd) = (op as i32, want_d as i32);
        let mut b = Launch::new(&self.core, &self.k.unary_fwd);
        b.arg(&*x.data).out(&mut *y.data);
        match d.as_mut() {
            Some(d) => b.out(&mut *d.data),
            None => b.arg(&self.dummy), // not written when want_d = 0
        };
        b.arg(&n).arg(&opc).arg(&s).arg(&wd);
        // SAFETY: argument types match the kernel; n bounds every access.
        unsafe { b.launch(grid(x.numel())) }.map_err(|e| dev_err("unary", e))?;
        Ok((y, d))
    }

    /// f′(x) ⊙ gy: the gradient through y = f(x), in one launch.
    pub fn unary_grad(
        &self,
        x: &DevTensor,
        gy: &DevTensor,
        op: UnaryCode,
        s: f32,
    ) -> Result<DevTensor> {
        if gy.numel() != x.numel() {
            return Err(TensorError::shape(
                "device unary gradient",
                format!("{:?}", x.shape),
                format!("{:?}", gy.shape),
            ));
        }
        let mut gx = self.scratch(&x.shape)?;
        let (n, opc) = (x.numel() as i64, op as i32);
        let mut b = Launch::new(&self.core, &self.k.unary_grad);
        b.arg(&*x.data)
            .arg(&*gy.data)
            .out(&mut *gx.data)
            .arg(&n)
            .arg(&opc)
            .arg(&s);
        // SAFETY: x, gy and gx hold n elements each (checked).
        unsafe { b.launch(grid(x.numel())) }.map_err(|e| dev_err("unary_grad", e))?;
        Ok(gx)
    }

    /// y = f(x) [P, L] and its tangents f′(x) ⊙ ẋ [P, K, L] in one launch.
    pub fn unary_tangent(
        &self,
        x: &DevTensor,
        t: &DevTensor,
        op: UnaryCode,
        s: f32,
        times: Option<&DevTensor>,
    ) -> Result<(DevTensor, DevTensor)> {
        let l = x.shape.last().copied().unwrap_or(1).max(1);
        let k = t.numel() / x.numel().max(1);
        if k == 0 || t.numel() != k * x.numel() {
            return Err(TensorError::shape(
                "device unary tangents",
                format!("K ≥ 1 tangents of {:?}", x.shape),
                format!("{:?}", t.shape),
            ));
        }
        if let Some(c) = times.filter(|c| c.shape != x.shape) {
            return Err(TensorError::shape(
                "device unary tangents",
                format!("a factor of {:?}", x.shape),
                format!("{:?}", c.shape),
            ));
        }
        let mut y = self.scratch(&x.shape)?;
        let mut out = self.scratch(&t.shape)?;
        let (pl, k32, l32, opc) = (x.numel() as i64, k as i32, l as i32, op as i32);
        let mut b = Launch::new(&self.core, &self.k.unary_tangent);
        b.arg(&*x.data)
            .arg(&*t.data)
            .out(&mut *y.data)
            .out(&mut *out.data)
            .arg(&pl)
            .arg(&k32)
            .arg(&l32)
            .arg(&opc)
            .arg(&s);
        let has_c = times.is_some() as i32;
        b.arg(self.data_or_dummy(times)).arg(&has_c);
        // SAFETY: t and out hold k·numel(x) elements, x and y (and the
        // factor, read only when given) numel(x).
        unsafe { b.launch(grid(tangent_units(x.numel(), k))) }
            .map_err(|e| dev_err("unary_tangent", e))?;
        Ok((y, out))
    }

    /// y = a op b elementwise on equal shapes (op codes of `binary_fwd`).
    pub fn binary(&self, a: &DevTensor, b: &DevTensor, op: BinaryCode) -> Result<DevTensor> {
        if a.shape != b.shape {
            return Err(TensorError::shape(
                "device binary",
                format!("{:?}", a.shape),
                format!("{:?}", b.shape),
            ));
        }
        let mut y = self.scratch(&a.shape)?;
        let (n, opc) = (a.numel() as i64, op as i32);
        let mut l = Launch::new(&self.core, &self.k.binary_fwd);
        l.arg(&*a.data)
            .arg(&*b.data)
            .out(&mut *y.data)
            .arg(&n)
            .arg(&opc);
        // SAFETY: a, b and y hold n elements each.
        unsafe { l.launch(grid(a.numel())) }.map_err(|e| dev_err("binary", e))?;
        Ok(y)
    }

    /// Tangents of y = a op b on equal primal shapes [P, L]: `ta`, `tb`
    /// [P, K, L] (either may be absent; K from their size).
    pub fn binary_tangent(
        &self,
        a: &DevTensor,
        b: &DevTensor,
        ta: Option<&DevTensor>,
        tb: Option<&DevTensor>,
        op: BinaryCode,
    ) -> Result<DevTensor> {
        self.binary_tangent_into(a, b, ta, tb, op, None)
    }

    /// y = a op b and its tangents (as [`CudaDevice::binary_tangent`]) in
    /// one launch.
    pub fn binary_dual(
        &self,
        a: &DevTensor,
        b: &DevTensor,
        ta: Option<&DevTensor>,
        tb: Option<&DevTensor>,
        op: BinaryCode,
    ) -> Result<(DevTensor, DevTensor)> {
        if a.shape != b.shape {
            return Err(TensorError::shape(
                "device binary",
                format!("{:?}", a.shape),
                format!("{:?}", b.shape),
            ));
        }
        let mut y = self.scratch(&a.shape)?;
        let t = self.binary_tangent_into(a, b, ta, tb, op, Some(&mut y))?;
        Ok((y, t))
    }

    fn binary_tangent_into(
        &self,
        a: &DevTensor,
        b: &DevTensor,
        ta: Option<&DevTensor>,
        tb: Option<&DevTensor>,
        op: BinaryCode,
        y: Option<&mut DevTensor>,
    ) -> Result<DevTensor> {
        let l = a.shape.last().copied().unwrap_or(1).max(1);
        let shape = match (ta, tb) {
            (Some(t), _) | (None, Some(t)) => t.shape.clone(),
            (None, None) => {
                return Err(TensorError::shape(
                    "device binary tangent",
                    "at least one tangent",
                    "none",
                ))
            }
        };
        let n = shape.iter().product::<usize>();
        let k = n / a.numel().max(1);
        // both tangents (where present) are [P, K, L] over a's P·L entries
        for t in [ta, tb].into_iter().flatten() {
            if t.numel() != n || n != k * a.numel() {
                return Err(TensorError::shape(
                    "device binary tangent",
                    format!("{k} tangents of {:?} each", a.shape),
                    format!("{:?}", t.shape),
                ));
            }
        }
        let mut out = self.scratch(&shape)?;
        let pl = a.numel() as i64;
        let (k32, l32, opc) = (k as i32, l as i32, op as i32);
        let (has_a, has_b) = (ta.is_some() as i32, tb.is_some() as i32);
        let mut g = Launch::new(&self.core, &self.k.binary_tangent);
        g.arg(&*a.data).arg(&*b.data);
        match ta {
            Some(t) => g.arg(&*t.data),
            None => g.arg(&self.dummy),
        };
        match tb {
            Some(t) => g.arg(&*t.data),
            None => g.arg(&self.dummy),
        };
        g.out(&mut *out.data)
            .arg(&pl)
            .arg(&k32)
            .arg(&l32)
            .arg(&opc)
            .arg(&has_a)
            .arg(&has_b);
        let want_y = y.is_some() as i32;
        match y {
            Some(y) => g.out(&mut *y.data),
            None => g.arg(&self.dummy),
        };
        g.arg(&want_y);
        // SAFETY: a, b (and y, when given: the caller's [P, L]) hold P·L
        // elements, the tangents and out K times as many; an absent tangent
        // is never read, y written only when given.
        unsafe { g.launch(grid(tangent_units(a.numel(), k))) }
            .map_err(|e| dev_err("binary_tangent", e))?;
        Ok(out)
    }

    /// Runs a pointwise program (see the `pointwise` kernel) on `inputs`
    /// (values [.., w_i] and their tangents [.., K, w_i], if any); `l` the
    /// element width; `tmask` bit r set where register r carries tangents
    /// (an input register only where its input has them). Returns y
    /// [.., outputs·l] and, with `want_t`, its tangents [.., K, outputs·l].
    pub fn pointwise(
        &self,
        prog: ProgramWords,
        inputs: &[(&DevTensor, Option<&DevTensor>)],
        l: usize,
        k: usize,
        tmask: u64,
        want_t: bool,
    ) -> Result<(DevTensor, Option<DevTensor>)> {
        let values: Vec<&DevTensor> = inputs.iter().map(|(x, _)| *x).collect();
        let pg = check_program(prog, &values, l)?;
        let code = prog.words;
        let mut r = 0;
        for (x, t) in inputs {
            if t.is_some_and(|t| t.numel() != k * x.numel()) {
                return Err(TensorError::arg(
                    "device pointwise",
                    format!("{k} tangents of {:?}", x.shape),
                ));
            }
            // the kernel reads an input register's tangents where its bit is set
            let cols = x.shape.last().copied().unwrap_or(0) / l;
            let bits = ((1u128 << (r + cols)) - (1u128 << r)) as u64;
            if t.is_none() && tmask & bits != 0 {
                return Err(TensorError::arg(
                    "device pointwise",
                    format!(
                        "tangent bits {:#x} set for an input without tangents",
                        tmask & bits
                    ),
                ));
            }
            r += cols;
        }
        let mut y = self.scratch(&pg.out_shape)?;
        let mut u = match want_t {
            true => {
                let mut ts = pg.out_shape.clone();
                ts.insert(ts.len() - 1, k);
                Some(self.scratch(&ts)?)
            }
            false => None,
        };
        let on_device = self.program(code)?;
        let mut g = Launch::new(&self.core, &self.k.pointwise);
        g.arg(&*on_device)
            .arg(&pg.n_tensors)
            .arg(&pg.n_step)
            .arg(&pg.n_out);
        for i in 0..Self::PW_TENSORS {
            match (inputs.get(i), pg.widths.get(i)) {
                (Some((x, t)), Some(w)) => {
                    g.arg(&*x.data);
                    match t {
                        Some(t) => g.arg(&*t.data),
                        None => g.arg(&self.dummy),
                    };
                    g.arg(w)
                }
                _ => g.arg(&self.dummy).arg(&self.dummy).arg(&0i32),
            };
        }
        g.out(&mut *y.data);
        match u.as_mut() {
            Some(u) => g.out(&mut *u.data),
            None => g.arg(&self.dummy),
        };
        let (k32, want) = (k as i32, want_t as i32);
        g.arg(&pg.pl).arg(&k32).arg(&pg.l).arg(&tmask).arg(&want);
        // one thread per entry and tangent (per entry without tangents)
        let units = pg.pl as usize * if want_t { k.max(1) } else { 1 };
        // SAFETY: every input holds rows·w_i values (and K times as many
        // tangents where tmask reads them: checked above to be only inputs
        // with tangents), y rows·n_out·l, u K times as many (written only
        // with want_t); registers and outputs were checked.
        unsafe { g.launch(grid(units)) }.map_err(|e| dev_err("pointwise", e))?;
        Ok((y, u))
    }

    /// The reverse rule of a pointwise program (see the `pointwise_grad`
    /// kernel): from the gradient `gy` [.., outputs·l] of its output, the
    /// gradient of each input whose `want` is set. `gmask`: bit r set where
    /// register r depends on an input that wants a gradient.
    pub fn pointwise_grad(
        &self,
        prog: ProgramWords,
        inputs: &[(&DevTensor, bool)],
        gy: &DevTensor,
        l: usize,
        gmask: u64,
    ) -> Result<Vec<Option<DevTensor>>> {
        let values: Vec<&DevTensor> = inputs.iter().map(|(x, _)| *x).collect();
        let pg = check_program(prog, &values, l)?;
        let code = prog.words;
        if gy.shape != pg.out_shape {
            return Err(TensorError::shape(
                "device pointwise_grad",
                format!("{:?}", pg.out_shape),
                format!("{:?}", gy.shape),
            ));
        }
        let mut grads: Vec<Option<DevTensor>> = inputs
            .iter()
            .map(|(x, want)| want.then(|| self.scratch(&x.shape)).transpose())
            .collect::<Result<_>>()?;
        let want = inputs
            .iter()
            .enumerate()
            .fold(0i32, |m, (i, (_, w))| m | ((*w as i32) << i));
        let on_device = self.program(code)?;
        let mut g = Launch::new(&self.core, &self.k.pointwise_grad);
        g.arg(&*on_device)
            .arg(&pg.n_tensors)
            .arg(&pg.n_step)
            .arg(&pg.n_out);
        for i in 0..Self::PW_TENSORS {
            match (inputs.get(i), grads.get_mut(i), pg.widths.get(i)) {
                (Some((x, _)), Some(gx), Some(w)) => {
                    g.arg(&*x.data);
                    match gx {
                        Some(gx) => g.out(&mut *gx.data),
                        None => g.arg(&self.dummy),
                    };
                    g.arg(w)
                }
                _ => g.arg(&self.dummy).arg(&self.dummy).arg(&0i32),
            };
        }
        g.arg(&*gy.data)
            .arg(&pg.pl)
            .arg(&pg.l)
            .arg(&gmask)
            .arg(&want);
        // SAFETY: as for `pointwise`; a gradient is written only where its
        // want bit is set, into a buffer of its input's size.
        unsafe { g.launch(grid(pg.pl as usize)) }.map_err(|e| dev_err("pointwise_grad", e))?;
        Ok(grads)
    }

    /// The device copy of a program's words, uploaded the first time.
    fn program(&self, code: &[u32]) -> Result<Arc<CudaSlice<u32>>> {
        let mut programs = self.programs.lock().expect("programs lock");
        if let Some((_, d)) = programs.iter().find(|(c, _)| c == code) {
            return Ok(d.clone());
        }
        // a new program: uploaded directly, never inside a graph
        self.core.setup_call("pointwise program")?;
        let d = Arc::new(
            self.stream
                .clone_htod(code)
                .map_err(|e| dev_err("upload", e))?,
        );
        programs.push((code.to_vec(), d.clone()));
        Ok(d)
    }

    /// Writes `src` [rows, w] into columns [offset, offset + w) of `dst`
    /// [rows, dst_w] (both row-major; rows from the sizes).
    pub fn copy_columns(&self, src: &DevTensor, dst: &mut DevTensor, offset: usize) -> Result<()> {
        let w = src.shape.last().copied().unwrap_or(1).max(1);
        let dst_w = dst.shape.last().copied().unwrap_or(1).max(1);
        let rows = src.numel() / w;
        if offset + w > dst_w || rows * dst_w != dst.numel() {
            return Err(TensorError::shape(
                "device copy_columns",
                format!("{rows} rows of at most {dst_w} columns from {offset}"),
                format!("{:?} into {:?}", src.shape, dst.shape),
            ));
        }
        let (r64, w32, dw32, o32) = (rows as i64, w as i32, dst_w as i32, offset as i32);
        let mut b = Launch::new(&self.core, &self.k.copy_columns);
        b.arg(&*src.data)
            .out(&mut *dst.data)
            .arg(&r64)
            .arg(&w32)
            .arg(&dw32)
            .arg(&o32);
        // SAFETY: src holds rows·w elements; dst rows·dst_w, checked above.
        unsafe { b.launch(grid(rows * w)) }.map_err(|e| dev_err("copy_columns", e))?;
        Ok(())
    }

    /// Columns [offset, offset + w) of `src` [rows, src_w], as [.., w]
    /// (`shape`: the result's shape, rows·w elements).
    pub fn take_columns(
        &self,
        src: &DevTensor,
        offset: usize,
        shape: &[usize],
    ) -> Result<DevTensor> {
        let w = shape.last().copied().unwrap_or(1).max(1);
        let src_w = src.shape.last().copied().unwrap_or(1).max(1);
        self.take_block(src, src_w, offset, w, shape)
    }

    /// Columns [offset, offset + w) of `src` seen as a row-major matrix
    /// with rows of `src_w` elements, as a tensor of `shape` (rows·w
    /// elements): a slice along any axis, whose rows are the elements
    /// before that axis and whose columns are that axis and the rest.
    pub fn take_block(
        &self,
        src: &DevTensor,
        src_w: usize,
        offset: usize,
        w: usize,
        shape: &[usize],
    ) -> Result<DevTensor> {
        let rows = src.numel() / src_w.max(1);
        let fits_i32 = |v: usize| i32::try_from(v).is_ok();
        if src_w == 0
            || !fits_i32(src_w)
            || !fits_i32(offset)
            || w == 0
            || offset + w > src_w
            || rows * src_w != src.numel()
            || rows * w != shape.iter().product::<usize>()
        {
            return Err(TensorError::shape(
                "device take_columns",
                format!("{rows} rows of {w} columns from {offset} within {src_w}"),
                format!("{:?} from {:?}", shape, src.shape),
            ));
        }
        let mut dst = self.scratch(shape)?;
        let (r64, w32, sw32, o32) = (rows as i64, w as i32, src_w as i32, offset as i32);
        let mut b = Launch::new(&self.core, &self.k.take_columns);
        b.arg(&*src.data)
            .out(&mut *dst.data)
            .arg(&r64)
            .arg(&w32)
            .arg(&sw32)
            .arg(&o32);
        // SAFETY: src holds rows·src_w elements, dst rows·w; checked above.
        unsafe { b.launch(grid(rows * w)) }.map_err(|e| dev_err("take_columns", e))?;
        Ok(dst)
    }

    /// Adds (1/n) Σ w (y − t)² to `loss` and returns its gradient
    /// 2 w (y − t) / n, for y [rows, l] with one weight per row (or none).
    pub fn mse_seed(
        &self,
        y: &DevTensor,
        target: &CudaView<'_, f32>,
        w: Option<&CudaView<'_, f32>>,
        n_norm: f64,
        loss: &mut CudaSlice<f64>,
    ) -> Result<DevTensor> {
        let l = *y.shape.last().unwrap_or(&1);
        let rows = (y.numel() / l.max(1)) as i64;
        if target.len() != y.numel() || w.is_some_and(|w| w.len() != rows as usize) {
            return Err(TensorError::shape(
                "device mse seed",
                format!("target {:?} and one weight per row ({rows})", y.shape),
                format!(
                    "{} values and {:?} weights",
                    target.len(),
                    w.map(|w| w.len())
                ),
            ));
        }
        let (l32, inv_n) = (l as i32, 1.0 / n_norm);
        let dummy = self.dummy.slice(..);
        let wd = w.unwrap_or(&dummy);
        let hw = w.is_some() as i32;
        let mut b = Launch::new(&self.core, &self.k.mse_value);
        b.arg(&*y.data)
            .arg(target)
            .arg(wd)
            .arg(&hw)
            .arg(&rows)
            .arg(&l32)
            .arg(&inv_n)
            .out(&mut *loss);
        // SAFETY: y and target hold rows·l elements, w rows (checked).
        unsafe { b.launch(one_block()) }.map_err(|e| dev_err("mse", e))?;
        let mut g = self.scratch(&y.shape)?;
        let mut b = Launch::new(&self.core, &self.k.mse_seed);
        b.arg(&*y.data)
            .arg(target)
            .arg(wd)
            .arg(&hw)
            .out(&mut *g.data)
            .arg(&rows)
            .arg(&l32)
            .arg(&inv_n);
        // SAFETY: as above; g holds rows·l elements.
        unsafe { b.launch(grid(y.numel())) }.map_err(|e| dev_err("mse_seed", e))?;
        Ok(g)
    }

    /// out[p, k, l] = d[p, l] · t[p, k, l]
    pub fn scale_rows(
        &self,
        d: &DevTensor,
        t: &DevTensor,
        k: usize,
        l: usize,
    ) -> Result<DevTensor> {
        if l == 0 || !d.numel().is_multiple_of(l) || t.numel() != k * d.numel() {
            return Err(TensorError::shape(
                "device scale_rows",
                format!("d [P, {l}] and {k} tangents of it"),
                format!("{:?} and {:?}", d.shape, t.shape),
            ));
        }
        let mut out = self.scratch(&t.shape)?;
        let (pl, k32, l32) = (d.numel() as i64, k as i32, l as i32);
        let mut b = Launch::new(&self.core, &self.k.scale_rows);
        b.arg(&*d.data)
            .arg(&*t.data)
            .out(&mut *out.data)
            .arg(&pl)
            .arg(&k32)
            .arg(&l32);
        // SAFETY: d holds P·L elements, t and out K times as many (checked).
        unsafe { b.launch(grid(tangent_units(d.numel(), k))) }
            .map_err(|e| dev_err("scale_rows", e))?;
        Ok(out)
    }

    /// The terms of a linear op before its GEMMs, in one launch: the primal
    /// `y[r, j] = scale · (b[j] + Σ_a u[r, a] w[a, j]) + c · x[r, j]` over
    /// `shape` `[.., n]` and, with `k_tangents = Some(k)`, the tangents
    /// `t[r, k, j] = scale · (ḃ[k, j] + Σ_a (u[r, a] ẇ[a, k, j] + u̇[r, k, a]
    /// w[a, j])) + c · ẋ[r, k, j]`. `bias` and `leak` carry a value and its
    /// tangents (if any); `small` a term `u · w` with a short inner dimension
    /// ([`SmallTerm`]); absent terms count as zero.
    #[allow(clippy::type_complexity)]
    pub fn linear_init(
        &self,
        shape: &[usize],
        k_tangents: Option<usize>,
        bias: Option<(&DevTensor, Option<&DevTensor>)>,
        leak: Option<(&DevTensor, Option<&DevTensor>, f32)>,
        small: Option<SmallTerm<'_>>,
        scale: f32,
    ) -> Result<(DevTensor, Option<DevTensor>)> {
        let (mut y, mut t) = self.linear_outputs(shape, k_tangents)?;
        let n = shape.last().copied().unwrap_or(1).max(1);
        let rows = y.numel() / n;
        let k = k_tangents.unwrap_or(0);
        let (bd, btd) = match bias {
            Some((b, bt)) => (&*b.data, bt.map_or(&self.dummy, |t| &*t.data)),
            None => (&self.dummy, &self.dummy),
        };
        let (xd, xtd, c) = match leak {
            Some((x, xt, c)) => (&*x.data, xt.map_or(&self.dummy, |t| &*t.data), c),
            None => (&self.dummy, &self.dummy, 0.0),
        };
        let flags = [
            bias.is_some() as i32,
            bias.is_some_and(|(_, t)| t.is_some()) as i32,
            leak.is_some() as i32,
            leak.is_some_and(|(_, t, _)| t.is_some()) as i32,
            t.is_some() as i32,
        ];
        let ku = self.check_linear_terms(rows, n, k, bias, leak, small)?;
        let (ud, wd) = match small {
            Some(sm) => (&*sm.u.data, &*sm.w.data),
            None => (&self.dummy, &self.dummy),
        };
        let ku32 = ku as i32;
        let has_wt = (small.is_some_and(|sm| sm.wt.is_some()) && t.is_some()) as i32;
        let has_ut = (small.is_some_and(|sm| sm.ut.is_some()) && t.is_some()) as i32;
        let (r64, k32, n32) = (rows as i64, k as i32, n as i32);
        let units = tangent_units(rows * n, t.as_ref().map_or(0, |_| k));
        let mut b = Launch::new(&self.core, &self.k.linear_init);
        b.out(&mut *y.data);
        match t.as_mut() {
            Some(t) => b.out(&mut *t.data),
            None => b.arg(&self.dummy),
        };
        b.arg(bd)
            .arg(btd)
            .arg(xd)
            .arg(xtd)
            .arg(&c)
            .arg(&scale)
            .arg(&r64)
            .arg(&k32)
            .arg(&n32);
        for f in &flags {
            b.arg(f);
        }
        b.arg(ud)
            .arg(wd)
            .arg(self.data_or_dummy(small.and_then(|sm| sm.wt)))
            .arg(&ku32)
            .arg(&has_wt)
            .arg(self.data_or_dummy(small.and_then(|sm| sm.ut)))
            .arg(&has_ut);
        // SAFETY: sizes checked above; absent operands are never read and
        // t is written only when present.
        unsafe { b.launch(grid(units)) }.map_err(|e| dev_err("linear", e))?;
        Ok((y, t))
    }

    /// A linear op with one dense term `a · w` (`a` [rows, kd] with tangents
    /// [rows, K, kd], `w` [kd, n] with [kd, K, n]; either's tangents may be
    /// absent) and what [`CudaDevice::linear_init`] folds in (`bias`,
    /// `leak`, `small`, as there), value and tangents in one launch of
    /// `linear_dense`: `y = scale · (b + u·w_u + a·w) + c · x` and, with
    /// `k_tangents = Some(k)`, `t = scale · (ḃ + u·ẇ_u + u̇·w_u + ȧ·w + a·ẇ) + c · ẋ`
    /// — instead of `linear_init` and three GEMMs, each of which reads and
    /// writes the whole output. With `act` the dense term's input is `f(a) ⊙
    /// c` and its tangents `f′(a) ⊙ ȧ ⊙ c` ([`TermActivation`]), applied as
    /// the chunks of `a` and `ȧ` go to shared memory (a rate network's φ(x)
    /// · W: φ(x)'s tangents never stored). With `post = Some(g)`, a rate function, the output is `g(p) +
    /// c · x` for the affine map p above (before the leak), its tangents
    /// `g′(p) ⊙ ṗ + c · ẋ` (a leaky network whose nonlinearity follows its
    /// recurrence): two launches, the value's (which keeps p) and then the
    /// tangents'.
    #[allow(clippy::type_complexity, clippy::too_many_arguments)]
    pub fn linear_dense(
        &self,
        shape: &[usize],
        k_tangents: Option<usize>,
        a: (&DevTensor, Option<&DevTensor>),
        act: Option<TermActivation<'_>>,
        w: (&DevTensor, Option<&DevTensor>),
        bias: Option<(&DevTensor, Option<&DevTensor>)>,
        leak: Option<(&DevTensor, Option<&DevTensor>, f32)>,
        small: Option<SmallTerm<'_>>,
        scale: f32,
        post: Option<UnaryCode>,
    ) -> Result<(DevTensor, Option<DevTensor>)> {
        let (mut y, mut t) = self.linear_outputs(shape, k_tangents)?;
        let k = k_tangents.unwrap_or(0);
        if w.0.shape.len() != 2 {
            return Err(TensorError::shape(
                "device dense linear",
                "w [kd, n]".to_string(),
                format!("{:?}", w.0.shape),
            ));
        }
        let (rows, n) = term_sizes("device dense linear", &y, t.as_ref(), k, a, w)?;
        let kd = w.0.shape[0];
        let ku = self.check_linear_terms(rows, n, k, bias, leak, small)?;
        let want_t = t.is_some();
        let tiles = rows.div_ceil(Self::DENSE_TILE) * n.div_ceil(Self::DENSE_TILE);
        let blocks = tiles * if want_t { k + 1 } else { 1 };
        let int = |v: usize| i32::try_from(v).ok();
        let (Some(r32), Some(k32), Some(kd32), Some(n32), Some(_)) =
            (int(rows), int(k), int(kd), int(n), int(blocks))
        else {
            return Err(TensorError::shape(
                "device dense linear",
                "rows, K, kd, n and the launch's blocks below 2³¹".to_string(),
                format!("rows {rows}, K {k}, kd {kd}, n {n}, {blocks} blocks"),
            ));
        };
        let bits = [
            (want_t, 1),
            (want_t && a.1.is_some(), 2),
            (want_t && w.1.is_some(), 4),
            (bias.is_some(), 8),
            (want_t && bias.is_some_and(|(_, bt)| bt.is_some()), 16),
            (leak.is_some(), 32),
            (want_t && leak.is_some_and(|(_, xt, _)| xt.is_some()), 64),
            (want_t && small.is_some_and(|sm| sm.wt.is_some()), 128),
            (act.is_some(), 256),
            (act.is_some_and(|c| c.factor.is_some()), 512),
            (post.is_some(), 1024),
            (want_t && small.is_some_and(|sm| sm.ut.is_some()), 2048),
        ];
        let flags: i32 = bits.iter().filter(|(on, _)| *on).map(|(_, bit)| bit).sum();
        let c = leak.map_or(0.0, |(_, _, c)| c);
        let ku32 = ku as i32;
        let (_, act_op, _) = act_args(act, a.0.numel())?;
        let post_op = match post {
            Some(g) => rate_function("device dense linear's output function", g)?,
            None => 0,
        };
        // p, the affine map before g, for the tangents' launch
        let mut pre = match post {
            Some(_) => Some(self.scratch(&[rows, n])?),
            None => None,
        };
        // in TF32 mode its products on the tensor cores, as cuBLAS's GEMMs
        let (kernel, name) = if self.tf32() {
            (&self.k.linear_dense_tf32, "linear_dense_tf32")
        } else {
            (&self.k.linear_dense, "linear_dense")
        };
        let mut launch = |blocks: usize, flags: i32| -> Result<()> {
            let mut l = Launch::new(&self.core, kernel);
            l.out(&mut *y.data);
            match t.as_mut() {
                Some(t) => l.out(&mut *t.data),
                None => l.arg(&self.dummy),
            };
            l.arg(&*a.0.data)
                .arg(self.data_or_dummy(a.1))
                .arg(&*w.0.data)
                .arg(self.data_or_dummy(w.1))
                .arg(self.data_or_dummy(bias.map(|(b, _)| b)))
                .arg(self.data_or_dummy(bias.and_then(|(_, bt)| bt)))
                .arg(self.data_or_dummy(leak.map(|(x, _, _)| x)))
                .arg(self.data_or_dummy(leak.and_then(|(_, xt, _)| xt)))
                .arg(self.data_or_dummy(small.map(|sm| sm.u)))
                .arg(self.data_or_dummy(small.map(|sm| sm.w)))
                .arg(self.data_or_dummy(small.and_then(|sm| sm.wt)))
                .arg(&c)
                .arg(&scale)
                .arg(&r32)
                .arg(&k32)
                .arg(&kd32)
                .arg(&n32)
                .arg(&ku32)
                .arg(&flags)
                .arg(&act_op)
                .arg(self.data_or_dummy(act.and_then(|c| c.factor)))
                .arg(&post_op);
            match pre.as_mut() {
                Some(p) => l.out(&mut *p.data),
                None => l.arg(&self.dummy),
            };
            l.arg(self.data_or_dummy(small.and_then(|sm| sm.ut)));
            let cfg = LaunchConfig {
                grid_dim: (blocks as u32, 1, 1),
                block_dim: (Self::DENSE_THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: sizes checked above (term_sizes, check_linear_terms);
            // the kernel reads an operand only where its flag is set (or,
            // for the small term, ku > 0), writes t only with DENSE_WANT_T,
            // writes pre only in the value's blocks with DENSE_POST, and
            // reads it in the tangents' blocks only with DENSE_POST: after
            // the value's launch below, on the same stream.
            unsafe { l.launch(cfg) }.map_err(|e| dev_err(name, e))
        };
        match post {
            None => launch(blocks, flags)?,
            Some(_) => {
                // the value's blocks, then the tangents' blocks alone (slots
                // kk < K: the grid stops before the value's slot)
                launch(tiles, flags & !1)?; // no DENSE_WANT_T
                if want_t {
                    launch(tiles * k, flags)?;
                }
            }
        }
        Ok((y, t))
    }

    /// A linear op's output of `shape` [.., n] and, with `k_tangents`, its
    /// tangents [.., K, n] (scratch: every element is written by the caller).
    fn linear_outputs(
        &self,
        shape: &[usize],
        k_tangents: Option<usize>,
    ) -> Result<(DevTensor, Option<DevTensor>)> {
        let y = self.scratch(shape)?;
        let t = match k_tangents {
            Some(k) => {
                let mut ts = shape.to_vec();
                ts.insert(shape.len().saturating_sub(1), k);
                Some(self.scratch(&ts)?)
            }
            None => None,
        };
        Ok((y, t))
    }

    /// The sizes of a linear op's bias, leak and small term against its
    /// output [rows, n] with K tangents; the small term's width ku (0: none).
    #[allow(clippy::type_complexity)]
    fn check_linear_terms(
        &self,
        rows: usize,
        n: usize,
        k: usize,
        bias: Option<(&DevTensor, Option<&DevTensor>)>,
        leak: Option<(&DevTensor, Option<&DevTensor>, f32)>,
        small: Option<SmallTerm<'_>>,
    ) -> Result<usize> {
        for (v, len, what) in [
            (bias.map(|(b, _)| b.numel()), n, "bias"),
            (
                bias.and_then(|(_, t)| t.map(DevTensor::numel)),
                k * n,
                "bias tangents",
            ),
            (leak.map(|(x, _, _)| x.numel()), rows * n, "leak"),
            (
                leak.and_then(|(_, t, _)| t.map(DevTensor::numel)),
                rows * k * n,
                "leak tangents",
            ),
        ] {
            if v.is_some_and(|v| v != len) {
                return Err(TensorError::shape(
                    "device linear",
                    format!("{what} of {len} elements"),
                    format!("{}", v.unwrap_or(0)),
                ));
            }
        }
        let ku = small.map_or(0, |sm| sm.u.shape.last().copied().unwrap_or(1));
        if let Some(sm) = small {
            if ku > Self::SMALL_TERM
                || sm.u.numel() != rows * ku
                || sm.ut.is_some_and(|ut| ut.numel() != rows * k * ku)
                || sm.w.numel() != ku * n
                || sm.wt.is_some_and(|wt| wt.numel() != ku * k * n)
            {
                return Err(TensorError::shape(
                    "device linear",
                    format!(
                        "a small term of at most {} columns: [{rows}, ku] · [ku, {n}] \
                         (tangents [{rows}, {k}, ku] · [ku, {k}, {n}])",
                        Self::SMALL_TERM
                    ),
                    format!("{:?} · {:?}", sm.u.shape, sm.w.shape),
                ));
            }
        }
        Ok(ku)
    }

    /// A tensor's buffer as a kernel argument, or the stand-in for an
    /// absent operand (which the kernel never reads).
    fn data_or_dummy<'a>(&'a self, v: Option<&'a DevTensor>) -> &'a CudaSlice<f32> {
        match v {
            Some(v) => &v.data,
            None => &self.dummy,
        }
    }

    /// Adds one term `u · w` with a short inner dimension ku (at most
    /// [`CudaDevice::SMALL_TERM`]) to a linear op's output `y` [rows, n]
    /// and, where `t` [rows, K, n] is given, `ut · w + u · wt` to its
    /// tangents (`u` [rows, ku] with tangents [rows, K, ku], `w` [ku, n]
    /// with [ku, K, n]; either may be absent): one launch instead of three
    /// GEMMs that each read and write the whole output for a rank-ku update.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_small_add<'a>(
        &'a self,
        y: &mut DevTensor,
        t: Option<&mut DevTensor>,
        k: usize,
        u: (&'a DevTensor, Option<&'a DevTensor>),
        w: (&'a DevTensor, Option<&'a DevTensor>),
        scale: f32,
    ) -> Result<()> {
        let ku = w.0.shape.first().copied().unwrap_or(0);
        let (rows, n) = term_sizes("device small linear term", y, t.as_deref(), k, u, w)?;
        if ku == 0 || ku > Self::SMALL_TERM || w.0.shape.len() != 2 {
            return Err(TensorError::shape(
                "device small linear term",
                format!("w [ku ≤ {}, n]", Self::SMALL_TERM),
                format!("{:?}", w.0.shape),
            ));
        }
        let want_t = t.is_some() && k > 0 && (u.1.is_some() || w.1.is_some());
        let (r64, k32, n32, ku32) = (rows as i64, k as i32, n as i32, ku as i32);
        let flags = [want_t as i32, u.1.is_some() as i32, w.1.is_some() as i32];
        let units = tangent_units(rows * n, if want_t { k } else { 0 });
        let mut l = Launch::new(&self.core, &self.k.linear_small_add);
        l.out(&mut *y.data);
        match t {
            Some(t) if want_t => l.out(&mut *t.data),
            _ => l.arg(&self.dummy),
        };
        l.arg(&*u.0.data)
            .arg(self.data_or_dummy(u.1))
            .arg(&*w.0.data)
            .arg(self.data_or_dummy(w.1))
            .arg(&scale)
            .arg(&r64)
            .arg(&k32)
            .arg(&n32)
            .arg(&ku32);
        for f in &flags {
            l.arg(f);
        }
        // SAFETY: sizes checked above; absent operands are never read, t is
        // touched only when given.
        unsafe { l.launch(grid(units)) }.map_err(|e| dev_err("linear_small_add", e))?;
        Ok(())
    }

    /// One term `a · w` of a linear op whose output `y` [rows, n] has at
    /// most [`CudaDevice::NARROW`] columns, in one launch instead of three
    /// GEMMs: `y (+)= scale · (b + a·w)` and, where `t` [rows, K, n] is
    /// given, `t (+)= scale · (ḃ + ȧ·w + a·ẇ)` (`a`: [rows, kd] and its
    /// tangents [rows, K, kd]; `w`: [kd, n] and [kd, K, n]). With
    /// [`NarrowOut::Write`] the outputs are written, bias included; with
    /// [`NarrowOut::Add`] added to. With `act` the term's input is `f(a) ⊙ c`
    /// and its tangents `f′(a) ⊙ ȧ ⊙ c` ([`TermActivation`]), read from `a`
    /// as the kernel goes (a rate network's readout φ(x) · C).
    #[allow(clippy::too_many_arguments)]
    pub fn linear_narrow<'a>(
        &'a self,
        y: &mut DevTensor,
        t: Option<&mut DevTensor>,
        k: usize,
        a: (&'a DevTensor, Option<&'a DevTensor>),
        w: (&'a DevTensor, Option<&'a DevTensor>),
        out: NarrowOut<'a>,
        scale: f32,
        act: Option<TermActivation<'a>>,
    ) -> Result<()> {
        let kd = w.0.shape.first().copied().unwrap_or(0);
        let (rows, n) = term_sizes("device narrow linear", y, t.as_deref(), k, a, w)?;
        let bias = match out {
            NarrowOut::Write { bias } => bias,
            NarrowOut::Add => None,
        };
        let init = matches!(out, NarrowOut::Write { .. });
        let mismatch = |what: &str, want: usize, got: usize| {
            (want != got).then(|| {
                TensorError::shape(
                    "device narrow linear",
                    format!("{what} of {want} elements"),
                    format!("{got}"),
                )
            })
        };
        let checks = [
            bias.and_then(|(b, _)| mismatch("bias", n, b.numel())),
            bias.and_then(|(_, bt)| bt.and_then(|bt| mismatch("bias tangents", k * n, bt.numel()))),
        ];
        if let Some(e) = checks.into_iter().flatten().next() {
            return Err(e);
        }
        if n > Self::NARROW || w.0.shape.len() != 2 {
            return Err(TensorError::shape(
                "device narrow linear",
                format!("w [kd, n ≤ {}]", Self::NARROW),
                format!("{:?}", w.0.shape),
            ));
        }
        // tangent rows: written whenever they are initialised here, added to
        // only where this term has tangents
        let want_t = t.is_some() && k > 0 && (init || a.1.is_some() || w.1.is_some());
        let flags = [
            want_t as i32,
            a.1.is_some() as i32,
            w.1.is_some() as i32,
            bias.is_some() as i32,
            bias.is_some_and(|(_, bt)| bt.is_some()) as i32,
            init as i32,
        ];
        let (r64, k32, kd32, n32) = (rows as i64, k as i32, kd as i32, n as i32);
        let total = rows * (1 + if want_t { k } else { 0 });
        let mut l = Launch::new(&self.core, &self.k.linear_narrow);
        l.out(&mut *y.data);
        match t {
            Some(t) if want_t => l.out(&mut *t.data),
            _ => l.arg(&self.dummy),
        };
        l.arg(&*a.0.data)
            .arg(self.data_or_dummy(a.1))
            .arg(&*w.0.data)
            .arg(self.data_or_dummy(w.1))
            .arg(self.data_or_dummy(bias.map(|(b, _)| b)))
            .arg(self.data_or_dummy(bias.and_then(|(_, bt)| bt)))
            .arg(&scale)
            .arg(&r64)
            .arg(&k32)
            .arg(&kd32)
            .arg(&n32);
        for f in &flags {
            l.arg(f);
        }
        let (has_act, act_op, has_c) = act_args(act, a.0.numel())?;
        l.arg(&has_act)
            .arg(&act_op)
            .arg(self.data_or_dummy(act.and_then(|c| c.factor)))
            .arg(&has_c);
        // SAFETY: sizes checked above; absent operands are never read, t is
        // touched only when given.
        unsafe { l.launch(grid(total)) }.map_err(|e| dev_err("linear_narrow", e))?;
        Ok(())
    }

    /// [a, b, c] → [c, b, a]
    pub fn permute_210(
        &self,
        src: &DevTensor,
        a: usize,
        b_: usize,
        c: usize,
        out_shape: &[usize],
    ) -> Result<DevTensor> {
        let mut dst = self.scratch(out_shape)?;
        let (a32, b32, c32) = (a as i32, b_ as i32, c as i32);
        let mut b = Launch::new(&self.core, &self.k.permute_210);
        b.arg(&*src.data)
            .out(&mut *dst.data)
            .arg(&a32)
            .arg(&b32)
            .arg(&c32);
        // SAFETY: src holds a·b·c elements, as does dst.
        unsafe { b.launch(grid(a * b_ * c)) }.map_err(|e| dev_err("permute", e))?;
        Ok(dst)
    }

    /// `dst[i] = src[i % src.len()]`, dst of `shape`.
    pub fn broadcast_rows(&self, src: &DevTensor, shape: &[usize]) -> Result<DevTensor> {
        let mut dst = self.scratch(shape)?;
        let (total, len) = (dst.numel() as i64, src.numel() as i64);
        let mut b = Launch::new(&self.core, &self.k.broadcast_rows);
        b.arg(&*src.data).out(&mut *dst.data).arg(&total).arg(&len);
        // SAFETY: indices stay below total and len.
        unsafe { b.launch(grid(total as usize)) }.map_err(|e| dev_err("broadcast", e))?;
        Ok(dst)
    }

    /// n standard normal values of stream (seed, stream), shape `shape`.
    pub fn normal(&self, shape: &[usize], seed: u64, stream: u64) -> Result<DevTensor> {
        let mut out = self.scratch(shape)?;
        let n = out.numel() as i64;
        let cfg = grid(out.numel().div_ceil(2));
        let mut b = Launch::new(&self.core, &self.k.normal_fill);
        b.out(&mut *out.data).arg(&n).arg(&seed).arg(&stream);
        // SAFETY: out holds n elements.
        unsafe { b.launch(cfg) }.map_err(|e| dev_err("normal", e))?;
        Ok(out)
    }

    /// Columns [off, off + a·l) of the directions `v` [k, p], as tangents in
    /// the engine's layout [a, k, l], reshaped to `shape`.
    #[allow(clippy::too_many_arguments)]
    pub fn gather_param(
        &self,
        v: &DevTensor,
        p: usize,
        off: usize,
        a: usize,
        k: usize,
        l: usize,
        shape: &[usize],
    ) -> Result<DevTensor> {
        let mut out = self.scratch(shape)?;
        let (p64, off64, a32, k32, l32) = (p as i64, off as i64, a as i32, k as i32, l as i32);
        let mut b = Launch::new(&self.core, &self.k.gather_param);
        b.arg(&*v.data)
            .out(&mut *out.data)
            .arg(&p64)
            .arg(&off64)
            .arg(&a32)
            .arg(&k32)
            .arg(&l32);
        // SAFETY: off + a·l ≤ p and out holds a·k·l elements (callers).
        unsafe { b.launch(grid(a * k * l)) }.map_err(|e| dev_err("gather_param", e))?;
        Ok(out)
    }

    /// V Vᵀ [k, k] of the row-major V [k, p].
    pub fn gram_rows(&self, v: &DevTensor, k: usize, p: usize) -> Result<DevTensor> {
        let mut g = self.scratch(&[k, k])?;
        // column-major: V is X [p, k]; V Vᵀ = Xᵀ X
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: k as i32,
            n: k as i32,
            k: p as i32,
            alpha: 1.0f32,
            lda: p as i32,
            ldb: p as i32,
            beta: 0.0f32,
            ldc: k as i32,
        };
        // the tangents are orthonormalised from this product: in full f32
        // even where the model's GEMMs use TF32
        let tf32 = self.tf32();
        if tf32 {
            self.set_tf32(false)?;
        }
        let sig = [
            tag::GEMM,
            ptr_of(&v.data, &self.stream),
            ptr_of(&g.data, &self.stream),
            k as u64,
            p as u64,
        ];
        let done = if self.core.call(&sig) {
            // SAFETY: v holds k·p elements, g k·k.
            unsafe { self.blas.gemm(cfg, &*v.data, &*v.data, &mut *g.data) }
                .map_err(|e| dev_err("gemm", e))
        } else {
            Ok(())
        };
        if tf32 {
            self.set_tf32(true)?;
        }
        done?;
        Ok(g)
    }

    /// Row-major `c = beta · c + alpha · a · b` with a [m, k], b [k, n], c [m, n]
    /// (contiguous; `a`, `b`, `c` may be offset views).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        m: usize,
        n: usize,
        k: usize,
        a: &CudaView<'_, f32>,
        b: &CudaView<'_, f32>,
        c: &mut CudaViewMut<'_, f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        self.gemm_t(m, n, k, (a, false), (b, false), c, alpha, beta)
    }

    /// Row-major `c = beta · c + alpha · op(a) · op(b)` with op(a) [m, k],
    /// op(b) [k, n], c [m, n]; `(x, true)` stands for xᵀ of an x stored
    /// row-major the other way round (a as [k, m], b as [n, k]).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_t(
        &self,
        m: usize,
        n: usize,
        k: usize,
        (a, ta): (&CudaView<'_, f32>, bool),
        (b, tb): (&CudaView<'_, f32>, bool),
        c: &mut CudaViewMut<'_, f32>,
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        if a.len() < m * k || b.len() < k * n || c.len() < m * n {
            return Err(TensorError::shape(
                "device gemm",
                format!("[{m}, {k}] · [{k}, {n}] into [{m}, {n}]"),
                format!("{} · {} into {}", a.len(), b.len(), c.len()),
            ));
        }
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        // column-major view: cᵀ [n, m] = op(b)ᵀ [n, k] · op(a)ᵀ [k, m]; a
        // row-major x [r, s] is the column-major xᵀ with leading dimension s
        let cfg = GemmConfig {
            transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
            transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha,
            lda: if tb { k.max(1) } else { n } as i32,
            ldb: if ta { m } else { k.max(1) } as i32,
            beta,
            ldc: n as i32,
        };
        let sig = [
            tag::GEMM,
            b.device_ptr(&self.stream).0,
            a.device_ptr(&self.stream).0,
            c.device_ptr(&self.stream).0,
            ta as u64 | (tb as u64) << 1 | (self.tf32() as u64) << 2,
            m as u64,
            n as u64,
            k as u64,
            alpha.to_bits() as u64,
            beta.to_bits() as u64,
        ];
        if !self.core.call(&sig) {
            return Ok(());
        }
        // SAFETY: the views hold at least m·k, k·n and m·n elements (checked).
        unsafe { self.blas.gemm(cfg, b, a, c) }.map_err(|e| dev_err("gemm", e))
    }

    /// An empty device sketch for `k` tangents (see [`MseSketch`]).
    pub fn mse_sketch_new(&self, k: usize) -> Result<MseSketch> {
        let cap = (MseSketch::BUFFER_BYTES / (8 * (k + 1))).max(1);
        let buf = self.zeros_f64((k + 1) * cap)?;
        count_alloc((k + 1) * cap * 8);
        Ok(MseSketch {
            k,
            gram: self.zeros_f64((k + 1) * (k + 1))?,
            buf,
            cap,
            used: 0,
        })
    }

    /// Adds the little loss (1/n) Σ w (y − t)² of one output y [rows, l] to
    /// the sketch: its k + 1 scaled rows go into the buffer, which is
    /// multiplied out into the Gram matrix when full. `target` holds rows·l
    /// values, `w` one weight per row (or none), `yd` the K tangents of y.
    #[allow(clippy::too_many_arguments)]
    pub fn mse_sketch_add(
        &self,
        sk: &mut MseSketch,
        y: &DevTensor,
        yd: Option<&DevTensor>,
        target: &CudaView<'_, f32>,
        w: Option<&CudaView<'_, f32>>,
        n_norm: f64,
    ) -> Result<()> {
        let l = y.shape.last().copied().unwrap_or(1).max(1);
        let rows = y.numel() / l;
        let cols = rows * l;
        if target.len() != cols
            || w.is_some_and(|w| w.len() != rows)
            || yd.is_some_and(|t| t.numel() != sk.k * cols)
        {
            return Err(TensorError::shape(
                "device mse sketch",
                format!(
                    "a target of {cols} values, {rows} weights and {} tangent values",
                    sk.k * cols
                ),
                format!(
                    "{}, {:?} and {:?}",
                    target.len(),
                    w.map(|w| w.len()),
                    yd.map(DevTensor::numel)
                ),
            ));
        }
        if sk.used + cols > sk.cap {
            self.mse_sketch_flush(sk)?;
        }
        if cols > sk.cap {
            // one output wider than the buffer: grow it
            count_free((sk.k + 1) * sk.cap * 8);
            sk.cap = cols;
            sk.buf = self.zeros_f64((sk.k + 1) * cols)?;
            count_alloc((sk.k + 1) * cols * 8);
        }
        let (r64, k32, l32, inv_n) = (rows as i64, sk.k as i32, l as i32, 1.0 / n_norm);
        let (ld, col0) = (sk.cap as i64, sk.used as i64);
        let (hw, hyd) = (w.is_some() as i32, yd.is_some() as i32);
        let dummy = self.dummy.slice(..);
        let mut b = Launch::new(&self.core, &self.k.mse_augmented);
        b.arg(&*y.data)
            .arg(target)
            .arg(w.unwrap_or(&dummy))
            .arg(&hw);
        match yd {
            Some(t) => b.arg(&*t.data),
            None => b.arg(&self.dummy),
        };
        b.arg(&hyd)
            .out(&mut sk.buf)
            .arg(&r64)
            .arg(&k32)
            .arg(&l32)
            .arg(&inv_n)
            .arg(&ld)
            .arg(&col0);
        // SAFETY: sizes checked above; the buffer holds (k + 1)·cap values
        // and used + cols ≤ cap.
        unsafe { b.launch(grid(tangent_units(cols, sk.k + 1))) }.map_err(|e| dev_err("mse", e))?;
        sk.used += cols;
        Ok(())
    }

    /// Multiplies the buffered columns out: Gram += A Aᵀ over them.
    pub fn mse_sketch_flush(&self, sk: &mut MseSketch) -> Result<()> {
        if sk.used == 0 {
            return Ok(());
        }
        let k1 = (sk.k + 1) as i32;
        // row-major A [k+1, cap] is column-major X [cap, k+1]; Gram = Xᵀ X
        // over its first `used` rows
        let cfg = GemmConfig {
            transa: blas_sys::cublasOperation_t::CUBLAS_OP_T,
            transb: blas_sys::cublasOperation_t::CUBLAS_OP_N,
            m: k1,
            n: k1,
            k: sk.used as i32,
            alpha: 1.0f64,
            lda: sk.cap as i32,
            ldb: sk.cap as i32,
            beta: 1.0f64,
            ldc: k1,
        };
        let sig = [
            tag::GEMM,
            ptr_of(&sk.buf, &self.stream),
            ptr_of(&sk.gram, &self.stream),
            k1 as u64,
            sk.used as u64,
            sk.cap as u64,
        ];
        if self.core.call(&sig) {
            // SAFETY: buf is [k+1, cap] with used ≤ cap, gram [k+1, k+1].
            unsafe { self.blas.gemm(cfg, &sk.buf, &sk.buf, &mut sk.gram) }
                .map_err(|e| dev_err("gemm", e))?;
        }
        sk.used = 0;
        Ok(())
    }

    /// Empties the sketch (on the stream: a pass that starts with this can
    /// be replayed as a graph with the same sketch).
    pub fn mse_sketch_reset(&self, sk: &mut MseSketch) -> Result<()> {
        self.core.memset_zero(&mut sk.gram)?;
        sk.used = 0;
        Ok(())
    }

    /// The sketch so far: (loss, C `[k]`, G̃ `[k·k]` row-major), in f64.
    pub fn mse_sketch_read(&self, sk: &mut MseSketch) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        self.mse_sketch_flush(sk)?;
        let k = sk.k;
        let gram = self.download_f64(&sk.gram)?;
        let k1 = k + 1;
        let loss = 0.5 * gram[k * k1 + k];
        let c = (0..k).map(|j| gram[k * k1 + j]).collect();
        let g = (0..k * k).map(|i| gram[(i / k) * k1 + i % k]).collect();
        Ok((loss, c, g))
    }
}

#[cfg(test)]
mod tests {
    /// The Rust side sizes launches and checks operands with the kernel
    /// source's constants.
    #[test]
    fn constants_match_the_kernel_source() {
        for (name, value) in [
            ("TCHUNK", super::TCHUNK),
            ("SMALL_TERM", super::CudaDevice::SMALL_TERM),
            ("NARROW", super::CudaDevice::NARROW),
            ("PW_REGS", super::CudaDevice::PW_REGS),
            ("PW_TENSORS", super::CudaDevice::PW_TENSORS),
            ("DENSE_TILE", super::CudaDevice::DENSE_TILE),
            ("DENSE_THREADS", super::CudaDevice::DENSE_THREADS as usize),
        ] {
            let line = format!("#define {name} {value}\n");
            assert!(
                super::KERNELS.contains(&line),
                "{name}: {line:?} not in the kernels"
            );
        }
        // staging chunks: 64 small blocks, fewer large ones, at least one
        use super::BlockStager as B;
        assert_eq!(B::chunk_blocks(256 * 64), 64);
        assert_eq!(B::chunk_blocks(1024 * 1000), 4);
        assert_eq!(B::chunk_blocks(8 << 20), 1);
        assert!(B::chunk_blocks(1024 * 1000) * 1024 * 1000 * 4 <= B::CHUNK_BYTES);
        // at least one thread per entry, a partial chunk counted
        assert_eq!(super::tangent_units(10, 0), 10);
        assert_eq!(super::tangent_units(10, 8), 10);
        assert_eq!(super::tangent_units(10, 9), 20);
    }

    /// SOFO_GPU_LINEAR's values, and `auto`'s rule: the fused kernel up to
    /// AUTO_MAX_INNER inner columns where the output fills its 64-wide tiles
    /// (one tile, or at least 7/8 of them); anything else refused by name.
    #[test]
    fn dense_linear_choices() {
        use super::DenseLinear as D;
        assert_eq!(D::parse("auto").unwrap(), D::Auto);
        assert_eq!(D::parse("fused").unwrap(), D::Fused);
        assert_eq!(D::parse("gemm").unwrap(), D::Gemm);
        for choice in [D::Auto, D::Fused, D::Gemm] {
            assert_eq!(D::from_u8(choice as u8), choice);
        }
        let max = D::AUTO_MAX_INNER;
        assert!(D::Auto.fuses(max, 128) && !D::Auto.fuses(max + 1, 128));
        // one tile (up to 64 columns), or two filled to 7/8 (112 columns)
        for (n, fused) in [(1, true), (50, true), (64, true), (65, false), (100, false)] {
            assert_eq!(D::Auto.fuses(64, n), fused, "n = {n}");
        }
        for (n, fused) in [(111, false), (112, true), (128, true), (129, false)] {
            assert_eq!(D::Auto.fuses(64, n), fused, "n = {n}");
        }
        assert!(D::Fused.fuses(4096, 100) && !D::Gemm.fuses(1, 64));
        let e = D::parse("cublas").unwrap_err().to_string();
        assert!(
            e.contains("SOFO_GPU_LINEAR") && e.contains("\"cublas\"") && e.contains("fused"),
            "{e}"
        );
    }

    /// The functions the linear op's kernels apply (the kernel's
    /// `rate_eval_` has these four cases, and its default is sigmoid): any
    /// other is refused, naming the op.
    #[test]
    fn linear_kernels_apply_the_rate_functions_only() {
        use super::UnaryCode as U;
        let all = [
            U::Neg,
            U::Exp,
            U::Log,
            U::Tanh,
            U::Relu,
            U::Softplus,
            U::Sigmoid,
            U::Square,
            U::Sqrt,
            U::AddScalar,
            U::MulScalar,
            U::Abs,
            U::Sin,
            U::Cos,
        ];
        for op in all {
            let rate = matches!(op, U::Tanh | U::Relu | U::Softplus | U::Sigmoid);
            assert_eq!(op.is_rate_function(), rate, "{op:?}");
            match super::rate_function("test", op) {
                Ok(code) => assert!(rate && code == op as i32, "{op:?}"),
                Err(e) => {
                    let e = e.to_string();
                    assert!(
                        !rate && e.contains(&format!("{op:?}")) && e.contains("tanh"),
                        "{e}"
                    );
                }
            }
        }
    }

    /// The kernel source compiles (runs wherever libnvrtc loads, GPU or not:
    /// `.ci/run` fetches NVRTC from PyPI and sets SOFO_REQUIRE_NVRTC, so that
    /// the test cannot skip there).
    #[test]
    fn kernels_compile() {
        if !super::nvrtc_present() {
            assert!(
                std::env::var_os("SOFO_REQUIRE_NVRTC").is_none(),
                "SOFO_REQUIRE_NVRTC is set but libnvrtc does not load (LD_LIBRARY_PATH?)"
            );
            eprintln!("skipping kernels_compile: libnvrtc not found");
            return;
        }
        // for an H100/H200 (compute capability 9.0): TF32 mma.sync in it
        let text = super::compile_kernels(Some((9, 0))).unwrap().to_src();
        assert!(text.contains(".target sm_90"), "not compiled for sm_90");
        assert!(text.contains("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32"));
        // for NVRTC's default architecture (before 8.0): none, which the
        // driver would refuse to load there; and the same for 7.5 itself
        for cc in [None, Some((7, 5))] {
            let old = super::compile_kernels(cc).unwrap().to_src();
            assert!(!old.contains("mma.sync"), "mma.sync compiled for {cc:?}");
            assert!(old.contains("linear_dense_tf32"));
        }
        // every kernel of the source
        let names: Vec<&str> = super::KERNELS
            .split("extern \"C\" __global__ void ")
            .skip(1)
            .map(|rest| {
                // the last word before the parameters (after a macro such as DENSE_BOUNDS)
                let head = rest.split('(').next().unwrap();
                head.split_whitespace().last().unwrap()
            })
            .collect();
        assert!(names.len() >= 16, "{names:?}");
        for name in names {
            assert!(text.contains(name), "{name} missing from the PTX");
        }
    }
}
