//! The CPU reference backend: exact, deterministic, parallel over tokens with rayon.
//!
//! Functions here assume their arguments were validated by [`crate::ops`]; they are
//! public so that tests and the CUDA backend's property tests can call them, but the
//! documented entry points are the ones in [`crate::ops`].
//!
//! Determinism: per-token work is independent; reductions over tokens use
//! [`chunked_reduce`], whose chunk boundaries and combine order do not depend on the
//! number of threads, so results are bitwise the same on 1 or 64 threads.

pub mod aux_loss;
pub mod bias_update;
pub mod capacity;
pub mod dispatch;
pub mod dropout;
pub mod expert_choice;
pub mod permute;
pub mod router_stats;
pub mod topk_gating;
pub mod z_loss;

use rayon::prelude::*;

/// Tokens per chunk in [`chunked_reduce`] (and rows per task in per-token loops).
pub const CHUNK: usize = 256;

/// Deterministic parallel reduction over `0..n`: `map` runs on the fixed ranges
/// `[0, CHUNK), [CHUNK, 2*CHUNK), ...` in parallel, then `fold` receives the partial
/// results in range order on the calling thread. The result is independent of the
/// number of threads.
pub fn chunked_reduce<A, M, F>(n: usize, map: M, mut fold: F)
where
    A: Send,
    M: Fn(std::ops::Range<usize>) -> A + Sync + Send,
    F: FnMut(A),
{
    let chunks = n.div_ceil(CHUNK);
    let parts: Vec<A> = (0..chunks)
        .into_par_iter()
        .map(|c| map(c * CHUNK..((c + 1) * CHUNK).min(n)))
        .collect();
    for p in parts {
        fold(p);
    }
}

/// Numerically stable softmax of `z` into `out` (f32), returning `(max, sum_exp)`
/// so that `logsumexp = max + ln(sum_exp)`. A row whose max is `-inf` (all `-inf`)
/// yields NaN probabilities, as the maths does.
#[inline]
pub fn softmax_row(z: impl Iterator<Item = f32> + Clone, out: &mut [f32]) -> (f32, f32) {
    let m = z.clone().fold(f32::NEG_INFINITY, |a, b| {
        if b > a || b.is_nan() && !a.is_nan() {
            b
        } else {
            a
        }
    });
    let mut s = 0.0f32;
    for (o, v) in out.iter_mut().zip(z) {
        let e = (v - m).exp();
        *o = e;
        s += e;
    }
    let inv = 1.0 / s;
    for o in out.iter_mut() {
        *o *= inv;
    }
    (m, s)
}

/// Logistic sigmoid in f32, stable for large `|x|`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
