//! CUDA graphs for repeated passes: a pass (the same device calls with new
//! host data each time, e.g. one SOFO iteration's forward pass) is run
//! directly once while its calls are recorded, captured into a CUDA graph
//! the second time, and from then on replayed: the model's host code runs
//! without touching the device (every kernel, GEMM and copy is skipped, the
//! host data it would upload is written into pinned staging memory), and one
//! graph launch does the device work. A step of a rate RNN is about 14
//! driver and cuBLAS calls; a graph launch pays their host-side cost once
//! per pass. Measured on an H200 that helps where that cost dominates (the
//! small rate RNN: a fifth off) and not at the long tasks' sizes, where the
//! device's own time per step does (see the README): hence off by default.
//!
//! The graph is only launched for a pass whose calls are the ones it holds:
//! every call's kernel, launch shape and arguments (device addresses,
//! scalars, sizes) go into a signature, computed alike when the pass runs,
//! is captured and is replayed, and a replay whose signature differs (other
//! shapes, another scalar, another buffer) runs the pass directly instead and
//! records it anew. Addresses stay put from pass to pass because the pass's
//! buffers come from an arena that hands them out in the recorded order, and
//! its inputs are copied into buffers of the graph's own. A pass that reads
//! device memory on the host mid-way (a download, a host-side op) cannot be
//! captured: it runs directly (and is recorded again the next time).

use super::{dev_err, CudaDevice, DevTensor};
use crate::error::{Result, TensorError};
use cudarc::driver::{
    result as drv, sys as drv_sys, CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut,
    DevicePtr, DriverError, LaunchConfig,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// How device calls are handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Run; no signature.
    Direct,
    /// Run, signed, buffers from the arena (recording it).
    Record,
    /// Captured into a graph (not run), signed, arena in recorded order,
    /// uploads from pinned staging.
    Capture,
    /// Skipped (a graph does the work), signed, arena in recorded order,
    /// uploads written into the staging the graph copies from.
    Replay,
    /// A capture or replay that turned out to differ from the recorded pass:
    /// the capture is ended, every call skipped, buffers from the pool; the
    /// pass then runs again directly.
    Abandoned,
}

/// Pinned host memory the graph's uploads copy from.
pub(crate) struct Staging {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: the pointer is owned (freed on drop) and only written while no
// graph that reads it runs (a pass is replayed after the last one's results
// were read back).
unsafe impl Send for Staging {}

impl Staging {
    fn new(len: usize) -> Result<Self> {
        let len = len.max(1);
        // SAFETY: a plain page-locked allocation, freed in drop.
        let ptr =
            unsafe { drv::malloc_host(len * 4, 0) }.map_err(|e| dev_err("pinned alloc", e))?;
        Ok(Staging {
            ptr: ptr.cast(),
            len,
        })
    }
    fn slice_mut(&mut self, off: usize, len: usize) -> &mut [f32] {
        assert!(off + len <= self.len);
        // SAFETY: in bounds of the allocation (asserted).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(off), len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: allocated by malloc_host; no graph reading it runs any more
        // (its owner drops the graph first, and a graph launch is followed by
        // a read-back before anything else).
        let _ = unsafe { drv::free_host(self.ptr.cast()) };
    }
}

/// The recording state of a device (one pass at a time).
pub(crate) struct Rec {
    pub(crate) mode: Mode,
    hash: u64,
    calls: u64,
    arena: Option<Arc<Arena>>,
    staging: Option<Staging>,
    /// f32 values uploaded so far in this pass (the staging offset).
    staged: usize,
    /// Whether the pass read device memory on the host (cannot be captured).
    host_touched: bool,
    /// Whether the pass asked for other buffers than the recorded one.
    diverged: bool,
}

impl Rec {
    fn new() -> Self {
        Rec {
            mode: Mode::Direct,
            hash: 0,
            calls: 0,
            arena: None,
            staging: None,
            staged: 0,
            host_touched: false,
            diverged: false,
        }
    }
    /// Adds one call (its words, led by their count) to the signature.
    fn sign(&mut self, words: &[u64]) {
        for &w in std::iter::once(&(words.len() as u64)).chain(words) {
            // FxHash-style mixing: order-sensitive and cheap
            self.hash = (self.hash.rotate_left(5) ^ w).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
        self.calls += 1;
    }
}

/// What a device shares with its tensors: the stream, the buffer pool and
/// the recording state.
pub(crate) struct Core {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) pool: super::BufferPool,
    rec: Mutex<Rec>,
}

/// Where a tensor's buffer goes when it is dropped.
#[derive(Clone)]
pub(crate) enum Home {
    Pool(Arc<Core>),
    Arena(Arc<Arena>),
    /// A view into another tensor's buffer ([`super::DevTensor::view`]):
    /// nothing to give back, the parent (kept alive here) owns it.
    View(Arc<super::DevTensor>),
}

impl Home {
    pub(crate) fn core(&self) -> Option<&Arc<Core>> {
        match self {
            Home::Pool(c) => Some(c),
            Home::Arena(a) => Some(&a.core),
            Home::View(parent) => parent.home.as_ref().and_then(Home::core),
        }
    }
    pub(crate) fn put(&self, s: CudaSlice<f32>) {
        match self {
            Home::View(_) => {
                // the parent's memory: forget the alias, free nothing
                s.leak();
            }
            Home::Pool(c) => {
                // while a pass is captured or replayed nothing may be freed
                // on the stream: a capture may not free, and a replay's
                // graph is launched after the host code that drops it
                let hold = !matches!(c.lock().mode, Mode::Direct | Mode::Record);
                c.pool.put(s, hold);
            }
            Home::Arena(a) => a.put(s),
        }
    }
}

pub(crate) fn ptr_of<T>(s: &CudaSlice<T>, stream: &CudaStream) -> u64 {
    s.device_ptr(stream).0
}

/// Call tags in the signature.
pub(crate) mod tag {
    pub const KERNEL: u64 = 1;
    pub const GEMM: u64 = 2;
    pub const UPLOAD: u64 = 3;
    pub const MEMSET: u64 = 4;
    pub const COPY: u64 = 5;
}

impl Core {
    pub(crate) fn new(stream: Arc<CudaStream>) -> Self {
        Core {
            stream,
            pool: Default::default(),
            rec: Mutex::new(Rec::new()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Rec> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes the device's context current on this thread (as cudarc does
    /// before each call: the driver calls below are made directly).
    pub(crate) fn bind(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))
    }

    /// Signs a device call; whether to issue it (not when replaying).
    pub(crate) fn call(&self, words: &[u64]) -> bool {
        let mut r = self.lock();
        if r.mode == Mode::Direct {
            return true;
        }
        r.sign(words);
        matches!(r.mode, Mode::Record | Mode::Capture)
    }

    /// Before a call that sets up something kept beyond the pass (a
    /// program's words uploaded once): made directly outside a graph and
    /// while a pass is recorded (nothing of it belongs in the graph; the
    /// capture will find it done), an error while capturing or replaying
    /// (the pass differs from its graph: it runs again directly).
    pub(crate) fn setup_call(&self, what: &'static str) -> Result<()> {
        match self.lock().mode {
            Mode::Direct | Mode::Record => Ok(()),
            Mode::Capture | Mode::Replay | Mode::Abandoned => Err(TensorError::Device {
                op: what,
                message: "the pass sets up what its graph did not: it runs directly".into(),
            }),
        }
    }

    /// Before the host reads device memory (or waits for the device): fine
    /// outside a graph, marks a recorded pass as not capturable, an error
    /// while capturing or replaying.
    pub(crate) fn host_sync(&self, what: &'static str) -> Result<()> {
        let mut r = self.lock();
        match r.mode {
            Mode::Direct => Ok(()),
            Mode::Record => {
                r.host_touched = true;
                Ok(())
            }
            Mode::Capture | Mode::Replay | Mode::Abandoned => Err(TensorError::Device {
                op: what,
                message: "the pass reads the device on the host: it cannot run as a CUDA graph"
                    .into(),
            }),
        }
    }

    /// A buffer of n elements: from the recording's arena, else the pool,
    /// else the driver.
    pub(crate) fn buffer(self: &Arc<Self>, n: usize) -> Result<(CudaSlice<f32>, Home)> {
        let arena = self.lock().arena.clone();
        if let Some(a) = arena {
            if let Some(s) = a.take(n)? {
                return Ok((s, Home::Arena(a)));
            }
            // the pass differs from the recorded one: it goes on (so that
            // it fails at the end, not here, and a clone need not fail)
            // without touching the device, and will run again directly
            self.abandon();
        }
        if let Some(s) = self.pool.take(n) {
            return Ok((s, Home::Pool(self.clone())));
        }
        // SAFETY (both allocations): callers write every element before
        // reading it.
        let s = match unsafe { self.stream.alloc::<f32>(n) } {
            Ok(s) => s,
            Err(_) => {
                self.pool.clear();
                unsafe { self.stream.alloc::<f32>(n) }.map_err(|e| dev_err("alloc", e))?
            }
        };
        Ok((s, Home::Pool(self.clone())))
    }

    /// Gives up the capture or replay under way: a capture is ended (and its
    /// graph thrown away) at once, so that nothing it allocated or wrote can
    /// be used afterwards and buffers can come from the driver again.
    fn abandon(&self) {
        let mut r = self.lock();
        r.diverged = true;
        if r.mode == Mode::Capture {
            // SAFETY: this stream is being captured (by run_pass).
            if let Ok(graph) = unsafe { drv::stream::end_capture(self.stream.cu_stream()) } {
                if !graph.is_null() {
                    // SAFETY: a graph of our own, never instantiated.
                    let _ = unsafe { drv::graph::destroy(graph) };
                }
            }
        }
        r.mode = Mode::Abandoned;
        r.arena = None;
    }

    /// Copies host values into a device buffer (through pinned staging when
    /// captured or replayed).
    pub(crate) fn upload(&self, host: &[f32], dst: &mut CudaSlice<f32>) -> Result<()> {
        let mut r = self.lock();
        if r.mode == Mode::Direct {
            drop(r);
            return self
                .stream
                .memcpy_htod(host, dst)
                .map_err(|e| dev_err("upload", e));
        }
        if r.mode == Mode::Abandoned {
            return Ok(());
        }
        let off = r.staged;
        r.staged += host.len();
        let d = ptr_of(dst, &self.stream);
        r.sign(&[tag::UPLOAD, off as u64, host.len() as u64, d]);
        match r.mode {
            Mode::Record => {
                drop(r);
                self.stream
                    .memcpy_htod(host, dst)
                    .map_err(|e| dev_err("upload", e))
            }
            mode => {
                let st = r.staging.as_mut().filter(|s| off + host.len() <= s.len);
                let Some(st) = st else {
                    return Err(TensorError::Device {
                        op: "upload",
                        message: "the pass uploads more than it did when recorded".into(),
                    });
                };
                let slot = st.slice_mut(off, host.len());
                slot.copy_from_slice(host);
                if mode == Mode::Capture {
                    self.bind()?;
                    // SAFETY: dst holds at least host.len() values (the
                    // callers'); the staging outlives the graph.
                    unsafe { drv::memcpy_htod_async(d, slot, self.stream.cu_stream()) }
                        .map_err(|e| dev_err("upload", e))?;
                }
                Ok(())
            }
        }
    }

    /// Zeroes a buffer on the stream.
    pub(crate) fn memset_zero<T>(&self, s: &mut CudaSlice<T>) -> Result<()> {
        let p = ptr_of(s, &self.stream);
        let bytes = s.len() * std::mem::size_of::<T>();
        if self.call(&[tag::MEMSET, p, bytes as u64]) {
            self.bind()?;
            // SAFETY: p holds `bytes` bytes.
            unsafe { drv::memset_d8_async(p, 0, bytes, self.stream.cu_stream()) }
                .map_err(|e| dev_err("memset", e))?;
        }
        Ok(())
    }

    /// Copies `n` values from `src` to `dst` on the stream.
    pub(crate) fn copy(&self, src: u64, dst: u64, n: usize) -> Result<()> {
        if self.call(&[tag::COPY, src, dst, n as u64]) {
            self.bind()?;
            // SAFETY: both hold n values (the callers').
            unsafe { drv::memcpy_dtod_async(dst, src, n * 4, self.stream.cu_stream()) }
                .map_err(|e| dev_err("copy", e))?;
        }
        Ok(())
    }
}

/// The buffers of a recorded pass: handed out in the recorded order when
/// the pass is captured or replayed, so that each call gets the addresses
/// its graph node holds. Never given to other work.
pub(crate) struct Arena {
    core: Arc<Core>,
    state: Mutex<ArenaState>,
}

#[derive(Default)]
struct ArenaState {
    following: bool,
    /// The addresses handed out while recording, in order.
    order: Vec<u64>,
    cursor: usize,
    free: HashMap<u64, CudaSlice<f32>>,
    by_len: HashMap<usize, Vec<u64>>,
}

impl Arena {
    fn lock(&self) -> MutexGuard<'_, ArenaState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next buffer, `None` where the pass asks for another length than
    /// the recorded pass did at this point (or for more buffers).
    fn take(&self, n: usize) -> Result<Option<CudaSlice<f32>>> {
        let mut st = self.lock();
        if st.following {
            let at = st.cursor;
            st.cursor += 1;
            let p = st.order.get(at).copied();
            let fits = p
                .and_then(|p| st.free.get(&p))
                .is_some_and(|s| s.len() == n);
            return Ok(if fits {
                p.and_then(|p| st.free.remove(&p))
            } else {
                None
            });
        }
        let reuse = loop {
            match st.by_len.get_mut(&n).and_then(Vec::pop) {
                Some(p) => {
                    if let Some(s) = st.free.remove(&p) {
                        break Some(s);
                    }
                }
                None => break None,
            }
        };
        let s = match reuse {
            Some(s) => s,
            // SAFETY (both): callers write every element before reading it.
            None => match unsafe { self.core.stream.alloc::<f32>(n) } {
                Ok(s) => s,
                Err(_) => {
                    self.core.pool.clear();
                    unsafe { self.core.stream.alloc::<f32>(n) }.map_err(|e| dev_err("alloc", e))?
                }
            },
        };
        let p = ptr_of(&s, &self.core.stream);
        st.order.push(p);
        Ok(Some(s))
    }

    fn put(&self, s: CudaSlice<f32>) {
        let p = ptr_of(&s, &self.core.stream);
        let mut st = self.lock();
        if !st.following {
            // (following, buffers are found by address)
            st.by_len.entry(s.len()).or_default().push(p);
        }
        st.free.insert(p, s);
    }

    /// Starts handing out buffers: afresh (recording) or in the recorded
    /// order.
    fn start(&self, following: bool) {
        let mut st = self.lock();
        st.following = following;
        st.cursor = 0;
        if !following {
            st.order.clear();
            let mut by_len: HashMap<usize, Vec<u64>> = HashMap::new();
            let mut free: Vec<(u64, usize)> = st.free.iter().map(|(p, s)| (*p, s.len())).collect();
            free.sort_unstable();
            for (p, n) in free {
                by_len.entry(n).or_default().push(p);
            }
            st.by_len = by_len;
        }
    }

    /// After a recording: gives back to the driver the buffers that the
    /// recorded pass did not use (left from an earlier, different pass).
    fn trim(&self) {
        let mut st = self.lock();
        let used: std::collections::HashSet<u64> = st.order.iter().copied().collect();
        st.free.retain(|p, _| used.contains(p));
        for list in st.by_len.values_mut() {
            list.retain(|p| used.contains(p));
        }
    }
}

/// A kernel launch whose arguments are kept as 8-byte slots (each kernel
/// argument is read from the start of its slot: little-endian), so that
/// they can be signed: the cudarc launch builder, recorded.
pub(crate) struct Launch<'a> {
    core: &'a Core,
    f: &'a CudaFunction,
    slots: Vec<u64>,
}

/// A kernel argument as a slot.
pub(crate) trait KernelArg {
    fn slot(&self, stream: &CudaStream) -> u64;
}

impl<T> KernelArg for CudaSlice<T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
impl<T> KernelArg for CudaView<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
impl<T> KernelArg for CudaViewMut<'_, T> {
    fn slot(&self, stream: &CudaStream) -> u64 {
        self.device_ptr(stream).0
    }
}
impl KernelArg for i32 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self as u32 as u64
    }
}
impl KernelArg for i64 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self as u64
    }
}
impl KernelArg for u64 {
    fn slot(&self, _: &CudaStream) -> u64 {
        *self
    }
}
impl KernelArg for f32 {
    fn slot(&self, _: &CudaStream) -> u64 {
        self.to_bits() as u64
    }
}
impl KernelArg for f64 {
    fn slot(&self, _: &CudaStream) -> u64 {
        self.to_bits()
    }
}

impl<'a> Launch<'a> {
    pub(crate) fn new(core: &'a Core, f: &'a CudaFunction) -> Self {
        Launch {
            core,
            f,
            slots: Vec::with_capacity(16),
        }
    }

    pub(crate) fn arg<A: KernelArg + ?Sized>(&mut self, a: &A) -> &mut Self {
        self.slots.push(a.slot(&self.core.stream));
        self
    }

    /// An argument the kernel writes to.
    pub(crate) fn out<A: KernelArg + ?Sized>(&mut self, a: &mut A) -> &mut Self {
        self.slots.push(a.slot(&self.core.stream));
        self
    }

    /// Launches (or, replaying, only signs) the kernel.
    ///
    /// # Safety
    /// The arguments must match the kernel's parameters in number and type,
    /// and every access the kernel makes must be in bounds.
    pub(crate) unsafe fn launch(
        &mut self,
        cfg: LaunchConfig,
    ) -> std::result::Result<(), DriverError> {
        let f = self.f.cu_function();
        // the signature's words only while a pass is recorded (no allocation
        // per launch otherwise)
        if self.core.lock().mode != Mode::Direct {
            let mut words = Vec::with_capacity(self.slots.len() + 9);
            words.extend([
                tag::KERNEL,
                f as u64,
                cfg.grid_dim.0 as u64,
                cfg.grid_dim.1 as u64,
                cfg.grid_dim.2 as u64,
                cfg.block_dim.0 as u64,
                cfg.block_dim.1 as u64,
                cfg.block_dim.2 as u64,
                cfg.shared_mem_bytes as u64,
            ]);
            words.extend_from_slice(&self.slots);
            if !self.core.call(&words) {
                return Ok(());
            }
        }
        self.core.stream.context().bind_to_thread()?;
        let mut params: Vec<*mut std::ffi::c_void> = self
            .slots
            .iter_mut()
            .map(|s| (s as *mut u64).cast())
            .collect();
        drv::launch_kernel(
            f,
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            self.core.stream.cu_stream(),
            &mut params,
        )
    }
}

/// How often a [`PassGraph`]'s passes ran each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Run call by call (recorded, or not capturable, or graphs off).
    pub direct: u64,
    /// Captured into a graph and launched.
    pub captured: u64,
    /// Replayed: one launch of the graph.
    pub replayed: u64,
    /// Replays or captures abandoned (the pass differed) and run directly.
    pub fallbacks: u64,
}

/// An instantiated graph of our own (captured with the driver's calls
/// directly, so that the capture is always ended: see `end_capture`).
struct Graph {
    graph: drv_sys::CUgraph,
    exec: drv_sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl Graph {
    fn launch(&self) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| dev_err("bind context", e))?;
        // SAFETY: a live executable graph, launched on the stream it was
        // captured from.
        unsafe { drv::graph::launch(self.exec, self.stream.cu_stream()) }
            .map_err(|e| dev_err("graph launch", e))
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: both handles are ours and destroyed once; the stream was
        // synchronised after the last launch (by the read-back of its
        // results, or by run_pass before a replay).
        unsafe {
            let _ = drv::graph::exec_destroy(self.exec);
            let _ = drv::graph::destroy(self.graph);
        }
    }
}

/// Ends the capture of `stream` whatever state the context is in, and
/// instantiates the graph (`None`: the capture was invalidated or ended
/// already).
fn end_capture(stream: &Arc<CudaStream>) -> Result<Option<Graph>> {
    // SAFETY: the stream is ours; a stream not being captured returns an
    // error, which is fine.
    let graph = match unsafe { drv::stream::end_capture(stream.cu_stream()) } {
        Ok(g) if !g.is_null() => g,
        _ => return Ok(None),
    };
    // SAFETY: a graph just captured; destroyed if instantiation fails.
    match unsafe { drv::graph::instantiate(graph, drv_sys::CUgraphInstantiate_flags(0)) } {
        Ok(exec) => Ok(Some(Graph {
            graph,
            exec,
            stream: stream.clone(),
        })),
        Err(e) => {
            let _ = unsafe { drv::graph::destroy(graph) };
            Err(dev_err("graph instantiate", e))
        }
    }
}

enum GraphState {
    Empty,
    Recorded {
        staged: usize,
    },
    Captured {
        graph: Graph,
        staging: Staging,
        hash: u64,
        calls: u64,
    },
}

/// A pass run again and again as a CUDA graph (see the module docs):
/// [`CudaDevice::run_pass`]. Its buffers (the recorded pass's, kept for the
/// replays) are not counted by [`super::device_memory`] while no pass runs.
pub struct PassGraph {
    arena: Arc<Arena>,
    inputs: Vec<DevTensor>,
    state: GraphState,
    stats: GraphStats,
}

// SAFETY: the graph handles are used from one thread at a time (the pass
// graph is owned and borrowed mutably for every use).
unsafe impl Send for PassGraph {}

impl PassGraph {
    pub fn stats(&self) -> GraphStats {
        self.stats
    }
}

/// Whether passes may run as CUDA graphs by default: off unless
/// SOFO_GPU_GRAPHS=1 (measured on an H200, graphs help only where the
/// per-call cost dominates: the small rate RNN; at the sizes of the long
/// tasks the device's own time does, and replaying the host code before the
/// launch costs a few percent).
pub(crate) fn graphs_by_default() -> Result<bool> {
    match std::env::var("SOFO_GPU_GRAPHS").as_deref() {
        Err(_) | Ok("0") => Ok(false),
        Ok("1") => Ok(true),
        Ok(v) => Err(TensorError::Device {
            op: "open",
            message: format!(
                "SOFO_GPU_GRAPHS is {v:?}: 0 (passes call by call) or 1 (CUDA graphs)"
            ),
        }),
    }
}

impl CudaDevice {
    /// Lets [`CudaDevice::run_pass`] use CUDA graphs (off by default; on
    /// where SOFO_GPU_GRAPHS=1), or run every pass directly.
    pub fn set_graphs(&self, on: bool) {
        self.graphs.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether passes may run as CUDA graphs.
    pub fn graphs(&self) -> bool {
        self.graphs.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// An empty pass graph for this device.
    pub fn pass_graph(&self) -> PassGraph {
        PassGraph {
            arena: Arc::new(Arena {
                core: self.core.clone(),
                state: Mutex::new(ArenaState::default()),
            }),
            inputs: vec![],
            state: GraphState::Empty,
            stats: GraphStats::default(),
        }
    }

    /// Runs `pass` on copies of `inputs` (the device values it reads that
    /// were made outside it): directly and recorded the first time, then as
    /// a CUDA graph. The rules for `pass`: the device values it uses are its
    /// inputs, uploaded host data, or buffers that outlive the graph and are
    /// not dropped inside the pass (a sketch kept by the caller, say); it
    /// makes the same calls each time for the graph to be reused (else it
    /// runs directly: correct, not faster); it may be run twice in one call
    /// (a replay that turns out to differ is run again directly), so it
    /// starts its host-side state afresh each time. Its result is what its
    /// host code returns; device results are read after this returns (which
    /// waits for the graph).
    pub fn run_pass<R, E: From<TensorError> + std::fmt::Display>(
        &self,
        g: &mut PassGraph,
        inputs: &[&DevTensor],
        mut pass: impl FnMut(&[&DevTensor]) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        if !self.graphs() {
            g.stats.direct += 1;
            return pass(inputs);
        }
        if self.core.lock().mode != Mode::Direct {
            return Err(TensorError::Device {
                op: "run_pass",
                message: "a pass is already being recorded on this device".into(),
            }
            .into());
        }
        match std::mem::replace(&mut g.state, GraphState::Empty) {
            GraphState::Captured {
                graph,
                staging,
                hash,
                calls,
            } => {
                // the last launch may still read the staging
                self.synchronize()?;
                self.bind_inputs(g, inputs)?;
                g.arena.start(true);
                let refs: Vec<&DevTensor> = g.inputs.iter().collect();
                let (r, st) = self.in_mode(Mode::Replay, Some(staging), &g.arena, || pass(&refs));
                if r.is_ok() && !st.diverged && st.hash == hash && st.calls == calls {
                    graph.launch()?;
                    g.state = GraphState::Captured {
                        graph,
                        staging: st.staging.expect("the replay's staging"),
                        hash,
                        calls,
                    };
                    g.stats.replayed += 1;
                    return r;
                }
                // another pass than the graph's: run it directly, recorded
                explain(
                    "replay",
                    r.as_ref().err().map(|e| e.to_string()),
                    &st,
                    hash,
                    calls,
                );
                drop(graph);
                g.stats.fallbacks += 1;
            }
            GraphState::Recorded { staged } => {
                let staging = Staging::new(staged)?;
                self.bind_inputs(g, inputs)?;
                g.arena.start(true);
                self.core.bind()?;
                self.core
                    .stream
                    .begin_capture(
                        drv_sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                    )
                    .map_err(|e| dev_err("begin capture", e))?;
                let refs: Vec<&DevTensor> = g.inputs.iter().collect();
                let (r, mut st) =
                    self.in_mode(Mode::Capture, Some(staging), &g.arena, || pass(&refs));
                // (in_mode has ended the capture, whatever happened)
                let graph = st.graph.take().unwrap_or(Ok(None));
                if trace() {
                    if let (Err(e), false) = (&graph, st.diverged) {
                        eprintln!("sofo graphs: capture not instantiated: {e}");
                    }
                    if let Err(e) = &r {
                        eprintln!("sofo graphs: capture failed: {e}");
                    }
                    if st.diverged {
                        eprintln!("sofo graphs: capture asked for other buffers than recorded");
                    }
                }
                if let (Ok(r), Ok(Some(graph)), false) = (r, graph, st.diverged) {
                    graph.launch()?;
                    g.state = GraphState::Captured {
                        graph,
                        staging: st.staging.expect("the capture's staging"),
                        hash: st.hash,
                        calls: st.calls,
                    };
                    g.stats.captured += 1;
                    return Ok(r);
                }
                // nothing of the capture ran: run the pass directly
                g.stats.fallbacks += 1;
            }
            GraphState::Empty => {}
        }
        // record: run directly, sign every call, buffers from the arena
        self.bind_inputs(g, inputs)?;
        g.arena.start(false);
        let refs: Vec<&DevTensor> = g.inputs.iter().collect();
        let (r, st) = self.in_mode(Mode::Record, None, &g.arena, || pass(&refs));
        g.arena.trim();
        // a pass that read the device on the host is recorded again next
        // time (it may not the next time: another model, another loss)
        if r.is_ok() && !st.host_touched {
            g.state = GraphState::Recorded { staged: st.staged };
        } else if trace() {
            eprintln!("sofo graphs: the pass failed or read the device on the host: not captured");
        }
        g.stats.direct += 1;
        r
    }

    /// Copies the inputs into the graph's own buffers (same addresses every
    /// pass), outside any recording.
    fn bind_inputs(&self, g: &mut PassGraph, inputs: &[&DevTensor]) -> Result<()> {
        if g.inputs.len() != inputs.len()
            || g.inputs
                .iter()
                .zip(inputs)
                .any(|(a, b)| a.numel() != b.numel())
        {
            g.inputs = inputs
                .iter()
                .map(|t| {
                    // SAFETY: written by the copy below before any read.
                    let s = unsafe { self.core.stream.alloc::<f32>(t.numel().max(1)) }
                        .map_err(|e| dev_err("alloc", e))?;
                    Ok(DevTensor::wrap(
                        t.shape(),
                        s,
                        Some(Home::Pool(self.core.clone())),
                    ))
                })
                .collect::<Result<_>>()?;
        }
        for (dst, src) in g.inputs.iter_mut().zip(inputs) {
            dst.set_shape(src.shape());
            let (s, d) = (
                ptr_of(src.slice(), &self.core.stream),
                ptr_of(dst.slice(), &self.core.stream),
            );
            self.core.copy(s, d, src.numel())?;
        }
        Ok(())
    }

    /// Runs `f` with the device in `mode` (the arena handing out buffers),
    /// and returns its result with the recording's outcome; the device is
    /// back in direct mode, and a capture ended, afterwards — even if `f`
    /// panics.
    fn in_mode<R>(
        &self,
        mode: Mode,
        staging: Option<Staging>,
        arena: &Arc<Arena>,
        f: impl FnOnce() -> R,
    ) -> (R, Outcome) {
        {
            let mut r = self.core.lock();
            *r = Rec::new();
            r.mode = mode;
            r.arena = Some(arena.clone());
            r.staging = staging;
        }
        let mut guard = Restore {
            core: &self.core,
            outcome: None,
        };
        let out = f();
        guard.finish();
        let outcome = guard.outcome.take().expect("the recording's outcome");
        (out, outcome)
    }
}

/// Puts a device back in direct mode (ending a capture under way) when a
/// recorded pass ends, by return or by panic.
struct Restore<'a> {
    core: &'a Core,
    outcome: Option<Outcome>,
}

impl Restore<'_> {
    fn finish(&mut self) {
        if self.outcome.is_some() {
            return;
        }
        let mut r = self.core.lock();
        let graph = (r.mode == Mode::Capture).then(|| end_capture(&self.core.stream));
        let rec = std::mem::replace(&mut *r, Rec::new());
        drop(r);
        self.outcome = Some(Outcome {
            hash: rec.hash,
            calls: rec.calls,
            staged: rec.staged,
            host_touched: rec.host_touched,
            diverged: rec.diverged,
            staging: rec.staging,
            graph,
        });
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Whether to say on stderr why a pass was not run as a graph
/// (SOFO_GPU_GRAPHS_TRACE set).
fn trace() -> bool {
    std::env::var_os("SOFO_GPU_GRAPHS_TRACE").is_some()
}

fn explain(what: &str, failed: Option<String>, st: &Outcome, hash: u64, calls: u64) {
    if trace() {
        eprintln!(
            "sofo graphs: {what} abandoned: {}; {} calls (graph {calls}), signature {} the graph's, \
             buffers {}",
            failed.as_deref().unwrap_or("the pass ran"),
            st.calls,
            if st.hash == hash { "equals" } else { "differs from" },
            if st.diverged { "differ" } else { "as recorded" }
        );
    }
}

/// What a recorded, captured or replayed pass did.
struct Outcome {
    hash: u64,
    calls: u64,
    staged: usize,
    host_touched: bool,
    diverged: bool,
    staging: Option<Staging>,
    /// What ending the capture gave (captures only).
    graph: Option<Result<Option<Graph>>>,
}

impl CudaDevice {
    /// Runs `f` on a value kept with the device under `key` between calls
    /// (a pass graph and the buffers its results land in, say), made by
    /// `init` the first time (or when the kept value is of another type).
    pub fn keep<S: std::any::Any + Send, R, E>(
        &self,
        key: &'static str,
        init: impl FnOnce() -> std::result::Result<S, E>,
        f: impl FnOnce(&mut S) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        let kept = self
            .kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(key);
        let mut value = match kept.and_then(|b| b.downcast::<S>().ok()) {
            Some(v) => v,
            None => Box::new(init()?),
        };
        let r = f(&mut value);
        self.kept
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, value);
        r
    }
}
