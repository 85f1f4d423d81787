// A stand-in for libcuda, libcublas and libnvrtc that runs on the host, so
// that the GPU code path of sofo (cudarc's dynamic loading, the launch
// arguments, the cuBLAS calls, the device memory handling, the kernels) runs
// in tests on a machine without a GPU. Built by fake_gpu/mod.rs (for the
// agreement tests and the CLI's GPU test) with the kernels of
// sofo_tensor::cuda (kernels.inc, generated there) and loaded in place of the
// real libraries through LD_LIBRARY_PATH.
//
// "Device" memory is host memory (a CUdeviceptr is a host address), filled
// with NaN bytes when allocated so that reading an element nobody wrote shows
// up, 256-byte aligned as the driver's, between two 4 KiB red zones of NaN
// bytes: a read past either end brings NaN into the results, and a write
// there is found after the kernel or GEMM that made it (its pointer
// arguments' allocations are checked) and fails that launch with
// CUDA_ERROR_ILLEGAL_ADDRESS, as a misaligned float4 or float2 access fails
// it with CUDA_ERROR_MISALIGNED_ADDRESS, each with a message on stderr naming
// the kernel; a copy or memset outside one allocation fails with
// CUDA_ERROR_INVALID_VALUE; a block's shared arrays are NaN-filled before it
// runs. Kernels run thread by thread (grid-stride kernels), or, where the
// kernel synchronises its block, each CUDA thread of a block as a fiber
// on the calling thread: __syncthreads switches to the next fiber, and a
// block runs round by round, every other one in reverse thread order (so
// that a missing barrier shows), until every fiber has returned (a fiber starts
// on its own stack through ucontext, and switches with _setjmp/_longjmp,
// which unlike swapcontext make no system call).
// The stream is the caller's thread: everything is synchronous, except
// while a stream is captured into a graph: then its work is recorded (kernel
// arguments and GEMM scalars copied, memory read when the graph runs) and
// run by cuGraphLaunch. While capturing, the calls that the driver refuses
// on a capturing thread (synchronisation, copies to the host, synchronous
// copies, copies from pageable host memory) fail and invalidate the
// capture, as on a GPU; so do allocating and freeing, which a GPU would
// turn into graph-owned memory that sofo must never use (stricter than the
// driver, on purpose); capturing the legacy default stream fails. cuBLAS GEMMs
// follow the reference definition (column-major, op(A)·op(B)), accumulated in
// double, with f32 inputs rounded to TF32 under the TF32 math mode. Only what
// sofo uses is here; anything else is missing on purpose,
// so that cudarc names the symbol it wanted.
// _longjmp between the fibers' stacks is what the fortified longjmp refuses
#undef _FORTIFY_SOURCE
#include <math.h>
#include <setjmp.h>
#include <cmath>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cstdarg>
#include <cstdio>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <ucontext.h>
#include <vector>

struct EmuDim {
    unsigned x, y, z;
};
static thread_local EmuDim threadIdx, blockIdx, blockDim, gridDim;
struct float4 { float x, y, z, w; };  // CUDA built-in vector types
struct float2 { float x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
// the fibers of the block being run (a kernel that synchronises its block)
struct EmuFiber {
    ucontext_t start;  // its entry, on its own stack
    jmp_buf resume;    // where it waits in __syncthreads
    bool started, done;
};
static jmp_buf emu_scheduler;
static EmuFiber* emu_fiber = nullptr;  // the running one
static void emu_syncthreads() {
    if (!_setjmp(emu_fiber->resume)) _longjmp(emu_scheduler, 1);
}
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __syncthreads() emu_syncthreads()
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, sizeof f); return f; }

struct Kernel {
    const char* name;
    void (*call)(void** params);
    bool syncs;  // uses __syncthreads: its block runs as fibers
    int nargs;
    const unsigned char* sizes;  // of each parameter (copied when captured)
};

// ---- faults -----------------------------------------------------------------
// What a GPU would fault on, or silently corrupt: reported on stderr as it is
// found, and the launch (kernel, GEMM, graph) that made it returns the code.
static const int ILLEGAL_ADDRESS = 700, MISALIGNED_ADDRESS = 716;
static std::atomic<int> pending_fault{0};
static const char* running_kernel = "";  // the kernel being run, for messages
// (the first of a launch's faults is reported: a GPU stops there)
static void fault(int code, const char* fmt, ...) {
    int none = 0;
    if (!pending_fault.compare_exchange_strong(none, code)) return;
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "fake GPU: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
}
// the fault found since the last call (0: none), cleared
static int take_fault() { return pending_fault.exchange(0); }
// a vector load or store in global memory (float4, float2) needs an
// address aligned to its size
static void misaligned(const void* p, int bytes) {
    fault(MISALIGNED_ADDRESS, "kernel %s: %d-byte vector access at %p, not aligned", running_kernel, bytes, p);
}
#define CHECK_ALIGNED(p, bytes) ((((uintptr_t)(p)) & ((bytes) - 1)) ? misaligned(p, bytes) : (void)0)

// A block's shared arrays (static here), registered by the first thread
// that reaches each declaration (EMU_SHARED, after every __shared__
// declaration of kernels.inc) and NaN-filled before every block: a read of
// an element the block has not written shows, as with device memory.
struct SharedRange {
    void* p;
    size_t n;
};
static std::mutex shared_lock;
static std::vector<SharedRange> shared_ranges;
struct EmuShared {
    EmuShared(void* p, size_t n) {
        std::lock_guard<std::mutex> g(shared_lock);
        shared_ranges.push_back({p, n});
    }
};
#define EMU_SHARED(name) static EmuShared emu_shared_##name(&name, sizeof name)
static void poison_shared() {
    std::lock_guard<std::mutex> g(shared_lock);
    for (const SharedRange& r : shared_ranges) std::memset(r.p, 0xFF, r.n);
}

// the kernels and KERNELS[] (name, unpacking wrapper, syncs), generated
#include "kernels.inc"

// FAKE_GPU_NULL: kernels and GEMMs do nothing and memory starts zeroed, so
// that timing a run measures the host's own work per launch (sofo's and
// cudarc's), without the emulation's arithmetic.
static bool null_device() {
    static bool on = std::getenv("FAKE_GPU_NULL") != nullptr;
    return on;
}

static void check_writes(const char* what, uint64_t p);
static void run_blocks(const Kernel& k, unsigned grid, unsigned block, void** params);

// runs the kernel, then checks the red zones of the allocations its pointer
// arguments point into: the fault found, or 0
static int run_kernel(const Kernel& k, unsigned grid, unsigned block, void** params) {
    if (null_device()) return 0;
    running_kernel = k.name;
    run_blocks(k, grid, block, params);
    for (int i = 0; i < k.nargs; i++) {
        if (k.sizes[i] != 8) continue;
        uint64_t v;
        std::memcpy(&v, params[i], 8);
        check_writes(k.name, v);
    }
    running_kernel = "";
    return take_fault();
}

static void run_blocks(const Kernel& k, unsigned grid, unsigned block, void** params) {
    auto set_thread = [&](unsigned b, unsigned t) {
        blockIdx = {b, 0, 0};
        threadIdx = {t, 0, 0};
        blockDim = {block, 1, 1};
        gridDim = {grid, 1, 1};
    };
    if (!k.syncs) {
        for (unsigned b = 0; b < grid; b++) {
            for (unsigned t = 0; t < block; t++) {
                set_thread(b, t);
                k.call(params);
            }
        }
        return;
    }
    // one fiber per CUDA thread; each round runs every unfinished fiber to
    // its next __syncthreads (or its end), so a round is a barrier
    static const Kernel* kernel;
    static void** args;
    kernel = &k;
    args = params;
    const size_t stack_bytes = 64 << 10;
    std::vector<EmuFiber> fibers(block);
    static std::unique_ptr<char[]> stacks;  // kept: allocated once, never cleared
    static size_t stacks_for = 0;
    if (stacks_for < block) {
        stacks.reset(new char[(size_t)block * stack_bytes]);
        stacks_for = block;
    }
    for (unsigned b = 0; b < grid; b++) {
        poison_shared();
        for (unsigned t = 0; t < block; t++) {
            EmuFiber& f = fibers[t];
            f.started = f.done = false;
            getcontext(&f.start);
            f.start.uc_stack.ss_sp = stacks.get() + (size_t)t * stack_bytes;
            f.start.uc_stack.ss_size = stack_bytes;
            f.start.uc_link = nullptr;  // never returns: jumps back when done
            makecontext(&f.start, (void (*)())+[] {
                kernel->call(args);
                emu_fiber->done = true;
                _longjmp(emu_scheduler, 1);
            }, 0);
        }
        // (every other round in reverse order: a kernel that reads what
        // another thread writes in the same round, a missing barrier, then
        // reads it before the write in one of the two)
        for (bool running = true, reverse = false; running; reverse = !reverse) {
            running = false;
            for (unsigned i = 0; i < block; i++) {
                const unsigned t = reverse ? block - 1 - i : i;
                EmuFiber& f = fibers[t];
                if (f.done) continue;
                set_thread(b, t);
                emu_fiber = &f;
                if (!_setjmp(emu_scheduler)) {
                    if (f.started) _longjmp(f.resume, 1);
                    f.started = true;
                    setcontext(&f.start);
                }
                running |= !f.done;
            }
        }
        emu_fiber = nullptr;
    }
}

// ---- stream capture ---------------------------------------------------------
static const int CAPTURE_UNSUPPORTED = 900, CAPTURE_INVALIDATED = 901;
struct FakeGraph {
    std::vector<std::function<void()>> ops;
};
static FakeGraph* capturing = nullptr;  // the graph being captured
static void* capture_stream = nullptr;
static bool capture_invalid = false;
static std::mutex pinned_lock;
static std::unordered_map<const char*, size_t> pinned;  // cuMemHostAlloc'd ranges

// work on a stream: recorded while that stream is captured, else done now
template <typename F>
static int enqueue(void* stream, F f) {
    if (capturing && stream == capture_stream) {
        capturing->ops.push_back(std::function<void()>(f));
        return 0;
    }
    f();
    return 0;
}
// a call the driver refuses on a capturing thread: fails and invalidates
static bool refused_while_capturing() {
    if (!capturing) return false;
    capture_invalid = true;
    return true;
}
// the calls made so far, by kind (fake_gpu_counts): kernel launches (but
// fill_nan's, counted apart: tests' poisoning), GEMMs, copies to the
// device, to the host, on the device, memsets, graph launches, fill_nan
enum { C_KERNEL, C_GEMM, C_HTOD, C_DTOH, C_DTOD, C_MEMSET, C_GRAPH, C_FILL, C_KINDS };
static std::atomic<unsigned long long> call_counts[C_KINDS];
static void count(int kind) { call_counts[kind]++; }
extern "C" void fake_gpu_counts(unsigned long long* out) {
    for (int i = 0; i < C_KINDS; i++) out[i] = call_counts[i];
}

static bool is_pinned(const void* p, size_t n) {
    std::lock_guard<std::mutex> g(pinned_lock);
    for (auto& [base, len] : pinned)
        if ((const char*)p >= base && (const char*)p + n <= base + len) return true;
    return false;
}

extern "C" {

// ---- driver -----------------------------------------------------------------
typedef int CUresult;
typedef int CUdevice;
typedef void* CUcontext;
typedef unsigned long long CUdeviceptr;
typedef void* CUstream;
typedef void* CUmodule;
typedef void* CUfunction;

static int fake_context, fake_module;
static const CUresult OK = 0, INVALID_VALUE = 1, INVALID_DEVICE = 101, NOT_FOUND = 500;

CUresult cuInit(unsigned) { return OK; }
CUresult cuDriverGetVersion(int* v) { *v = 13000; return OK; }
CUresult cuDeviceGetCount(int* n) { *n = 1; return OK; }
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return OK;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice) {
    std::strncpy(name, "fake GPU (host emulation)", len);
    if (len > 0) name[len - 1] = 0;
    return OK;
}
CUresult cuDeviceGetAttribute(int* v, int attrib, CUdevice) {
    // 115: CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED (stream-ordered
    // allocation); 75, 76: the compute capability, an H100's 9.0
    *v = attrib == 115 ? 1 : attrib == 75 ? 9 : 0;
    return OK;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice) {
    *c = &fake_context;
    return OK;
}
CUresult cuDevicePrimaryCtxRelease_v2(CUdevice) { return OK; }
CUresult cuCtxSetCurrent(CUcontext) { return OK; }
CUresult cuCtxGetCurrent(CUcontext* c) {
    *c = &fake_context;
    return OK;
}
CUresult cuCtxSynchronize() { return refused_while_capturing() ? CAPTURE_INVALIDATED : OK; }
CUresult cuStreamSynchronize(CUstream) { return refused_while_capturing() ? CAPTURE_INVALIDATED : OK; }
CUresult cuStreamCreate(CUstream* s, unsigned) {
    *s = new char;  // a distinct handle per stream
    return OK;
}
CUresult cuStreamDestroy_v2(CUstream s) {
    delete (char*)s;
    return OK;
}
CUresult cuStreamBeginCapture_v2(CUstream s, int) {
    if (s == nullptr || capturing) return CAPTURE_UNSUPPORTED;
    capturing = new FakeGraph();
    capture_stream = s;
    capture_invalid = false;
    return OK;
}
typedef FakeGraph* CUgraph;
typedef FakeGraph* CUgraphExec;
CUresult cuStreamEndCapture(CUstream s, CUgraph* g) {
    if (!capturing || s != capture_stream) return INVALID_VALUE;
    FakeGraph* done = capturing;
    capturing = nullptr;
    if (capture_invalid) {
        delete done;
        *g = nullptr;
        return CAPTURE_INVALIDATED;
    }
    *g = done;
    return OK;
}
CUresult cuGraphInstantiateWithFlags(CUgraphExec* e, CUgraph g, unsigned long long) {
    *e = new FakeGraph(*g);
    return OK;
}
CUresult cuGraphLaunch(CUgraphExec e, CUstream s) {
    count(C_GRAPH);
    if (capturing) return CAPTURE_UNSUPPORTED;
    (void)s;
    for (auto& op : e->ops) op();
    return take_fault();
}
CUresult cuGraphExecDestroy(CUgraphExec e) {
    delete e;
    return OK;
}
CUresult cuGraphDestroy(CUgraph g) {
    delete g;
    return OK;
}
CUresult cuMemHostAlloc(void** p, size_t n, unsigned) {
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    *p = std::malloc(n ? n : 1);
    std::lock_guard<std::mutex> g(pinned_lock);
    pinned[(const char*)*p] = n;
    return OK;
}
CUresult cuMemFreeHost(void* p) {
    std::lock_guard<std::mutex> g(pinned_lock);
    if (pinned.erase((const char*)p) == 0) return INVALID_VALUE;
    std::free(p);
    return OK;
}

}  // extern "C"

// live allocations by start, and their sizes: a free of anything else is an
// error, and freed memory is NaN-filled first, so that a use after free shows
static std::mutex allocations_lock;
static std::map<CUdeviceptr, size_t> allocations;
static const size_t REDZONE = 4096;  // NaN bytes either side of an allocation

static CUresult alloc(CUdeviceptr* p, size_t n) {
    void* m = nullptr;
    if (posix_memalign(&m, 256, n + 2 * REDZONE) != 0) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    // NaN in every float and double, the red zones included
    std::memset(m, null_device() ? 0 : 0xFF, n + 2 * REDZONE);
    *p = (CUdeviceptr)m + REDZONE;
    std::lock_guard<std::mutex> g(allocations_lock);
    allocations[*p] = n;
    return OK;
}
// the allocation whose bytes or red zones hold address p (allocations_lock
// held), or end()
static std::map<CUdeviceptr, size_t>::iterator near(uint64_t p) {
    auto it = allocations.upper_bound(p + REDZONE);
    if (it == allocations.begin()) return allocations.end();
    --it;
    return p < it->first + it->second + REDZONE ? it : allocations.end();
}
// the offset from the allocation's start of the first red-zone byte that is
// no longer a NaN byte, if any
static bool redzone_written(CUdeviceptr base, size_t n, long long* at) {
    const unsigned char* lo = (const unsigned char*)base - REDZONE;
    const unsigned char* hi = (const unsigned char*)base + n;
    for (size_t i = 0; i < REDZONE; i++) {
        if (lo[i] != 0xFF) {
            *at = (long long)i - (long long)REDZONE;
            return true;
        }
        if (hi[i] != 0xFF) {
            *at = (long long)(n + i);
            return true;
        }
    }
    return false;
}
// after a launch that was given address p: a write outside the allocation
// that p points into is a fault
static void check_writes(const char* what, uint64_t p) {
    if (null_device()) return;
    std::lock_guard<std::mutex> g(allocations_lock);
    auto it = near(p);
    long long at;
    if (it == allocations.end() || !redzone_written(it->first, it->second, &at)) return;
    fault(ILLEGAL_ADDRESS, "%s wrote outside a device allocation of %zu bytes (at byte %lld)", what,
          it->second, at);
    // the red zone as it was, so that the fault is reported once
    std::memset((void*)(it->first - REDZONE), 0xFF, REDZONE);
    std::memset((void*)(it->first + it->second), 0xFF, REDZONE);
}
// whether [p, p + n) lies in one allocation; else a message on stderr
static bool in_one_allocation(const char* what, uint64_t p, size_t n) {
    std::lock_guard<std::mutex> g(allocations_lock);
    auto it = allocations.upper_bound(p);
    if (it != allocations.begin()) {
        --it;
        if (p + n <= it->first + it->second) return true;
    }
    std::fprintf(stderr, "fake GPU: %s of %zu bytes at %p is not inside one device allocation\n",
                 what, n, (void*)p);
    return false;
}
static CUresult release(CUdeviceptr p) {
    std::lock_guard<std::mutex> g(allocations_lock);
    auto it = allocations.find(p);
    if (it == allocations.end()) return INVALID_VALUE;
    long long at;
    if (!null_device() && redzone_written(p, it->second, &at)) {
        // every launch checks what it wrote: this is a write by something else
        std::fprintf(stderr, "fake GPU: a device allocation of %zu bytes freed with byte %lld written\n",
                     it->second, at);
        std::abort();
    }
    std::memset((void*)(p - REDZONE), 0xFF, it->second + 2 * REDZONE);
    std::free((void*)(p - REDZONE));
    allocations.erase(it);
    return OK;
}

extern "C" {
// (the graph-memory nodes a capture could allocate are not used by sofo:
// allocation and freeing are refused while capturing)
CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, CUstream) {
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    return alloc(p, n);
}
CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    if (n == 0) return INVALID_VALUE;  // as the driver does
    return alloc(p, n);
}
CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) {
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    return release(p);
}
CUresult cuMemFree_v2(CUdeviceptr p) {
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    return release(p);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    count(C_HTOD);
    if (!in_one_allocation("a copy to the device", dst, n)) return INVALID_VALUE;
    // a captured copy reads the host memory when the graph runs: pinned only
    if (capturing && s == capture_stream && !is_pinned(src, n)) {
        capture_invalid = true;
        return CAPTURE_UNSUPPORTED;
    }
    return enqueue(s, [=] { std::memcpy((void*)dst, src, n); });
}
CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream) {
    count(C_DTOH);
    if (!in_one_allocation("a copy to the host", src, n)) return INVALID_VALUE;
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    std::memcpy(dst, (const void*)src, n);
    return OK;
}
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    count(C_DTOD);
    if (!in_one_allocation("a copy's source", src, n) || !in_one_allocation("a copy's destination", dst, n))
        return INVALID_VALUE;
    return enqueue(s, [=] { std::memmove((void*)dst, (const void*)src, n); });
}
CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    count(C_HTOD);
    if (!in_one_allocation("a copy to the device", dst, n)) return INVALID_VALUE;
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    std::memcpy((void*)dst, src, n);
    return OK;
}
CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    count(C_DTOH);
    if (!in_one_allocation("a copy to the host", src, n)) return INVALID_VALUE;
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    std::memcpy(dst, (const void*)src, n);
    return OK;
}
CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream s) {
    count(C_MEMSET);
    if (!in_one_allocation("a memset", dst, n)) return INVALID_VALUE;
    return enqueue(s, [=] { std::memset((void*)dst, v, n); });
}
CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) {
    count(C_MEMSET);
    if (!in_one_allocation("a memset", dst, n)) return INVALID_VALUE;
    if (refused_while_capturing()) return CAPTURE_INVALIDATED;
    std::memset((void*)dst, v, n);
    return OK;
}
CUresult cuModuleLoadData(CUmodule* m, const void*) {
    *m = &fake_module;
    return OK;
}
CUresult cuModuleUnload(CUmodule) { return OK; }
CUresult cuModuleGetFunction(CUfunction* f, CUmodule, const char* name) {
    for (const Kernel& k : KERNELS) {
        if (std::strcmp(k.name, name) == 0) {
            *f = (void*)&k;
            return OK;
        }
    }
    return NOT_FOUND;
}
CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                        unsigned bz, unsigned, CUstream s, void** params, void** extra) {
    if (gy != 1 || gz != 1 || by != 1 || bz != 1 || extra != nullptr || gx == 0 || bx == 0 ||
        bx > 1024)
        return INVALID_VALUE;
    const Kernel& k = *(const Kernel*)f;
    count(std::strcmp(k.name, "fill_nan") == 0 ? C_FILL : C_KERNEL);
    if (capturing && s == capture_stream) {
        // the argument values as they are now (the caller's storage goes away)
        std::vector<uint64_t> copied(k.nargs);
        for (int i = 0; i < k.nargs; i++) std::memcpy(&copied[i], params[i], k.sizes[i]);
        return enqueue(s, [&k, gx, bx, copied]() mutable {
            std::vector<void*> p(copied.size());
            for (size_t i = 0; i < copied.size(); i++) p[i] = &copied[i];
            // (a fault stays pending for cuGraphLaunch)
            if (int f = run_kernel(k, gx, bx, p.data())) {
                int none = 0;
                pending_fault.compare_exchange_strong(none, f);
            }
        });
    }
    return run_kernel(k, gx, bx, params);
}
CUresult cuGetErrorString(CUresult, const char** s) {
    *s = "error of the fake GPU";
    return OK;
}
CUresult cuGetErrorName(CUresult, const char** s) {
    *s = "FAKE_GPU_ERROR";
    return OK;
}

}  // extern "C"

// the math mode of the GEMM being computed (its handle's); 3
// (CUBLAS_TF32_TENSOR_OP_MATH): f32 GEMM inputs are rounded to TF32
static int math_mode = 0;

// f32 rounded to TF32 (10 explicit mantissa bits, to nearest even), as the
// tensor cores read their inputs
static float tf32(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf, NaN
    u += 0x0fffu + ((u >> 13) & 1u);
    u &= 0xffffe000u;
    std::memcpy(&x, &u, 4);
    return x;
}

// C = alpha op(A) op(B) + beta C, column-major; C is not read when beta = 0
template <typename T>
static int gemm(int ta, int tb, int m, int n, int k, const T* alpha, const T* a, int lda,
                           const T* b, int ldb, const T* beta, T* c, int ldc) {
    auto at_least = [](int ld, int rows) { return ld >= (rows > 1 ? rows : 1); };
    if (m < 0 || n < 0 || k < 0 || !at_least(lda, ta ? k : m) || !at_least(ldb, tb ? n : k) ||
        !at_least(ldc, m))
        return 7;  // CUBLAS_STATUS_INVALID_VALUE
    if (null_device()) return 0;
    for (int j = 0; j < n; j++) {
        for (int i = 0; i < m; i++) {
            double s = 0.0;
            for (int p = 0; p < k; p++) {
                T x = ta ? a[p + (size_t)i * lda] : a[i + (size_t)p * lda];
                T y = tb ? b[j + (size_t)p * ldb] : b[p + (size_t)j * ldb];
                if (sizeof(T) == 4 && math_mode == 3) {
                    x = (T)tf32((float)x);
                    y = (T)tf32((float)y);
                }
                s += (double)x * (double)y;
            }
            T* out = &c[i + (size_t)j * ldc];
            double v = (double)*alpha * s;
            if (*beta != T(0)) v += (double)*beta * (double)*out;
            *out = (T)v;
        }
    }
    return 0;
}

// a cuBLAS handle: its stream and math mode
struct FakeBlas {
    void* stream = nullptr;
    int math_mode = 0;
};

// a GEMM on the handle's stream: recorded while it is captured (the host
// scalars and the math mode read now, as cuBLAS does)
// whether a column-major operand of rows × cols with leading dimension ld
// lies in one device allocation (else a message on stderr)
template <typename T>
static bool operand_in_memory(const char* what, const T* p, int rows, int cols, int ld) {
    if (rows <= 0 || cols <= 0) return true;
    size_t n = ((size_t)(cols - 1) * (size_t)ld + (size_t)rows) * sizeof(T);
    return in_one_allocation(what, (uint64_t)p, n);
}

template <typename T>
static int blas_call(FakeBlas* h, int ta, int tb, int m, int n, int k, const T* alpha, const T* a,
                     int lda, const T* b, int ldb, const T* beta, T* c, int ldc) {
    count(C_GEMM);
    // what the GEMM's kernel would read and write outside its operands: an
    // illegal address, or memory of other tensors
    if (!null_device() && (!operand_in_memory("a GEMM's A", a, ta ? k : m, ta ? m : k, lda) ||
                           !operand_in_memory("a GEMM's B", b, tb ? n : k, tb ? k : n, ldb) ||
                           !operand_in_memory("a GEMM's C", c, m, n, ldc)))
        return 13;  // CUBLAS_STATUS_EXECUTION_FAILED
    int mode = h->math_mode;
    if (capturing && h->stream == capture_stream) {
        T al = *alpha, be = *beta;
        capturing->ops.push_back([=] {
            int saved = math_mode;
            math_mode = mode;
            gemm(ta, tb, m, n, k, &al, a, lda, b, ldb, &be, c, ldc);
            math_mode = saved;
        });
        return 0;
    }
    int saved = math_mode;
    math_mode = mode;
    int status = gemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    math_mode = saved;
    return status;
}

extern "C" {

// ---- cuBLAS -----------------------------------------------------------------
typedef int cublasStatus_t;
typedef void* cublasHandle_t;
cublasStatus_t cublasCreate_v2(cublasHandle_t* h) {
    *h = new FakeBlas();
    return 0;
}
cublasStatus_t cublasDestroy_v2(cublasHandle_t h) {
    delete (FakeBlas*)h;
    return 0;
}
cublasStatus_t cublasSetStream_v2(cublasHandle_t h, CUstream s) {
    ((FakeBlas*)h)->stream = s;
    return 0;
}
cublasStatus_t cublasSetMathMode(cublasHandle_t h, int mode) {
    ((FakeBlas*)h)->math_mode = mode;
    return 0;
}
cublasStatus_t cublasSetPointerMode_v2(cublasHandle_t, int) { return 0; }
cublasStatus_t cublasSetWorkspace_v2(cublasHandle_t, void*, size_t) { return 0; }

cublasStatus_t cublasSgemm_v2(cublasHandle_t h, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb, const float* beta, float* c,
                              int ldc) {
    return blas_call((FakeBlas*)h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
cublasStatus_t cublasDgemm_v2(cublasHandle_t h, int ta, int tb, int m, int n, int k, const double* alpha,
                              const double* a, int lda, const double* b, int ldb, const double* beta,
                              double* c, int ldc) {
    return blas_call((FakeBlas*)h, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// ---- NVRTC ------------------------------------------------------------------
typedef int nvrtcResult;
typedef void* nvrtcProgram;
static const char FAKE_PTX[] = "// the fake GPU runs the kernels compiled into it\n";
static int fake_program;

nvrtcResult nvrtcVersion(int* major, int* minor) {
    *major = 13;
    *minor = 0;
    return 0;
}
nvrtcResult nvrtcCreateProgram(nvrtcProgram* p, const char*, const char*, int, const char* const*,
                               const char* const*) {
    *p = &fake_program;
    return 0;
}
nvrtcResult nvrtcCompileProgram(nvrtcProgram, int, const char* const*) { return 0; }
nvrtcResult nvrtcGetPTXSize(nvrtcProgram, size_t* n) {
    *n = sizeof(FAKE_PTX);
    return 0;
}
nvrtcResult nvrtcGetPTX(nvrtcProgram, char* out) {
    std::memcpy(out, FAKE_PTX, sizeof(FAKE_PTX));
    return 0;
}
nvrtcResult nvrtcGetProgramLogSize(nvrtcProgram, size_t* n) {
    *n = 1;
    return 0;
}
nvrtcResult nvrtcGetProgramLog(nvrtcProgram, char* out) {
    out[0] = 0;
    return 0;
}
nvrtcResult nvrtcDestroyProgram(nvrtcProgram*) { return 0; }
}
