//! The CPU reference backend: exact, deterministic, parallel over tokens with rayon.
//!
//! Most kernels here assume their arguments were validated by [`crate::ops`] (the
//! documented entry points), so they are crate-private: a public function that
//! indexes by its arguments without checking them would let a caller panic the
//! library (for example `dispatch` with an expert index `>= num_experts`). What stays
//! public is what tests hold other backends to and cannot be misused: [`softmax_row`],
//! [`sigmoid`], [`CHUNK`], [`dropout::expert_mask_row`] and the [`permute`] module
//! (each total: any input gives a result, never a panic).
//!
//! ```compile_fail
//! // Crate-private: call `moe_router::dispatch_into`, which validates the indices.
//! use moe_router::cpu::dispatch::dispatch;
//! ```
//!
//! Determinism: per-token work is independent; reductions over tokens use
//! `chunked_reduce`, whose chunk boundaries and combine order do not depend on the
//! number of threads, so results are bitwise the same on 1 or 64 threads.

pub(crate) mod aux_loss;
pub(crate) mod bias_update;
pub(crate) mod capacity;
pub(crate) mod dispatch;
pub mod dropout;
pub(crate) mod expert_choice;
pub mod permute;
pub(crate) mod router_stats;
pub(crate) mod topk_gating;
pub(crate) mod z_loss;

use rayon::prelude::*;

/// Tokens per chunk of the parallel loops and of the fixed-order reductions over
/// tokens (chunk boundaries do not depend on the thread count).
pub const CHUNK: usize = 256;

/// Deterministic parallel reduction over `0..n`: `map` runs on the fixed ranges
/// `[0, CHUNK), [CHUNK, 2*CHUNK), ...` in parallel, then `fold` receives the partial
/// results in range order on the calling thread. The result is independent of the
/// number of threads.
pub(crate) fn chunked_reduce<A, M, F>(n: usize, map: M, mut fold: F)
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
