//! The tensor layer's own memory accounting and buffer pool.
//!
//! Every tensor buffer is counted while it is alive ("live") and while it
//! waits in the pool for reuse ("pooled"); the peak of their sum is what
//! "peak bytes held by the tensor layer" means in the flat-memory test. The
//! pool lets a time loop reuse the same buffers step after step instead of
//! going back to the allocator (and the page-fault cost of fresh memory).

use crate::Float;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static POOLED: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Buffers smaller than this many elements are not pooled.
const POOL_MIN_LEN: usize = 256;
/// At most this many free buffers of one length are kept.
const POOL_PER_LEN: usize = 16;

/// A snapshot of the accounting, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryStats {
    pub live_bytes: usize,
    pub pooled_bytes: usize,
    /// Peak of live + pooled since the last [`reset_peak`].
    pub peak_bytes: usize,
}

pub fn stats() -> MemoryStats {
    MemoryStats {
        live_bytes: LIVE.load(Ordering::Relaxed),
        pooled_bytes: POOLED.load(Ordering::Relaxed),
        peak_bytes: PEAK.load(Ordering::Relaxed),
    }
}

/// Sets the peak to what is held now.
pub fn reset_peak() {
    PEAK.store(
        LIVE.load(Ordering::Relaxed) + POOLED.load(Ordering::Relaxed),
        Ordering::Relaxed,
    );
}

/// Frees every pooled buffer.
pub fn clear_pools() {
    f32::pool().clear();
    f64::pool().clear();
}

fn bump_peak() {
    let held = LIVE.load(Ordering::Relaxed) + POOLED.load(Ordering::Relaxed);
    PEAK.fetch_max(held, Ordering::Relaxed);
}

/// Free buffers of one element type, by length.
pub struct Pool<T> {
    free: Mutex<Option<HashMap<usize, Vec<Vec<T>>>>>,
}

impl<T: Float> Pool<T> {
    pub(crate) const fn new() -> Self {
        Pool {
            free: Mutex::new(None),
        }
    }

    fn take(&self, len: usize) -> Option<Vec<T>> {
        if len < POOL_MIN_LEN {
            return None;
        }
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let v = g.as_mut()?.get_mut(&len)?.pop()?;
        POOLED.fetch_sub(len * std::mem::size_of::<T>(), Ordering::Relaxed);
        Some(v)
    }

    fn give(&self, v: Vec<T>) -> bool {
        let len = v.len();
        if len < POOL_MIN_LEN {
            return false;
        }
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let list = g.get_or_insert_with(HashMap::new).entry(len).or_default();
        if list.len() >= POOL_PER_LEN {
            return false;
        }
        list.push(v);
        POOLED.fetch_add(len * std::mem::size_of::<T>(), Ordering::Relaxed);
        true
    }

    fn clear(&self) {
        let mut g = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = g.take() {
            let bytes: usize = map
                .iter()
                .map(|(len, l)| len * l.len() * std::mem::size_of::<T>())
                .sum();
            POOLED.fetch_sub(bytes, Ordering::Relaxed);
        }
    }
}

/// A counted, poolable element buffer.
pub(crate) struct Buffer<T: Float> {
    vec: Vec<T>,
}

impl<T: Float> Buffer<T> {
    fn count(vec: Vec<T>) -> Self {
        LIVE.fetch_add(vec.len() * std::mem::size_of::<T>(), Ordering::Relaxed);
        bump_peak();
        Buffer { vec }
    }

    pub(crate) fn from_vec(vec: Vec<T>) -> Self {
        Self::count(vec)
    }

    pub(crate) fn zeros(len: usize) -> Self {
        match T::pool().take(len) {
            Some(mut v) => {
                v.fill(T::zero());
                Self::count(v)
            }
            None => Self::count(vec![T::zero(); len]),
        }
    }

    /// A buffer whose contents are unspecified (reused memory): the caller
    /// must write every element before reading it.
    pub(crate) fn scratch(len: usize) -> Self {
        match T::pool().take(len) {
            Some(v) => Self::count(v),
            None => Self::count(vec![T::zero(); len]),
        }
    }

    pub(crate) fn as_slice(&self) -> &[T] {
        &self.vec
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        &mut self.vec
    }
    pub(crate) fn into_vec(mut self) -> Vec<T> {
        let v = std::mem::take(&mut self.vec);
        LIVE.fetch_sub(v.len() * std::mem::size_of::<T>(), Ordering::Relaxed);
        v
    }
}

impl<T: Float> Clone for Buffer<T> {
    fn clone(&self) -> Self {
        let mut b = Self::scratch(self.vec.len());
        b.vec.copy_from_slice(&self.vec);
        b
    }
}

impl<T: Float> Drop for Buffer<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.vec);
        if v.is_empty() {
            return;
        }
        LIVE.fetch_sub(v.len() * std::mem::size_of::<T>(), Ordering::Relaxed);
        if T::pool().give(v) {
            bump_peak();
        }
    }
}
