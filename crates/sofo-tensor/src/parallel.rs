//! Thread count of the CPU backend.
//!
//! All parallel loops split work into chunks whose boundaries depend only on
//! the problem size, never on the thread count or on scheduling, and every
//! reduction is done in a fixed order: results are bit-identical for a given
//! seed whatever the thread count of the elementwise loops. (GEMM splits its
//! output, not its reductions, across threads.)

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

static THREADS: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with every kernel on this thread single-threaded: for work that
/// is already split across threads at a coarser grain (trials).
pub fn serial<R>(f: impl FnOnce() -> R) -> R {
    let before = SERIAL.with(|s| s.replace(true));
    let r = f();
    SERIAL.with(|s| s.set(before));
    r
}

/// Sets the number of worker threads (0 = all cores). Call once, early; the
/// global rayon pool can be sized only once per process.
pub fn set_threads(n: usize) {
    let n = if n == 0 { available_cores() } else { n };
    // A second call (tests) keeps the first pool; the GEMM thread count below
    // still follows `n`.
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    THREADS.store(n, Ordering::Relaxed);
}

pub fn threads() -> usize {
    if SERIAL.with(|s| s.get()) {
        return 1;
    }
    match THREADS.load(Ordering::Relaxed) {
        0 => rayon::current_num_threads(),
        n => n.min(rayon::current_num_threads()),
    }
}

pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Elements per chunk of the parallel elementwise loops.
pub(crate) const CHUNK: usize = 1 << 15;
