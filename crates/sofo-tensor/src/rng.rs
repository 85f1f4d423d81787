//! Seeded random numbers, deterministic whatever the thread count.
//!
//! A stream is named by (seed, stream id); its values are produced in fixed
//! chunks, each from its own generator seeded by (seed, stream, chunk), so a
//! parallel fill gives the same numbers as a serial one.

use crate::parallel::CHUNK;
use crate::Float;
use rand::{RngExt, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;

fn mix(mut z: u64) -> u64 {
    // splitmix64 finaliser
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A generator for stream `stream` of `seed`.
pub fn generator(seed: u64, stream: u64) -> Xoshiro256PlusPlus {
    Xoshiro256PlusPlus::seed_from_u64(mix(mix(seed) ^ stream.wrapping_mul(0xD605_0C45_4D6E_6D5B)))
}

/// Derives a sub-stream id from a stream id and an index (an iteration, a
/// parameter, ...).
pub fn substream(stream: u64, index: u64) -> u64 {
    mix(stream ^ mix(index.wrapping_add(0x1234_5678)))
}

/// Fills `dst` with standard normal values from stream (seed, stream).
pub fn fill_normal<T: Float>(dst: &mut [T], seed: u64, stream: u64) {
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, d)| {
        let mut g = generator(seed, substream(stream, c as u64));
        for v in d {
            let x: f64 = g.sample(StandardNormal);
            *v = T::from_f64(x);
        }
    });
}

/// Fills `dst` with uniform values in [lo, hi) from stream (seed, stream).
pub fn fill_uniform<T: Float>(dst: &mut [T], lo: f64, hi: f64, seed: u64, stream: u64) {
    dst.par_chunks_mut(CHUNK).enumerate().for_each(|(c, d)| {
        let mut g = generator(seed, substream(stream, c as u64));
        for v in d {
            let x: f64 = g.random::<f64>();
            *v = T::from_f64(lo + (hi - lo) * x);
        }
    });
}
