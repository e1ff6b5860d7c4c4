//! CPU reference for expert-choice routing.
//!
//! 1. Per token chunk (rayon): `p = softmax(z_t)` into `weights`, and a copy of the
//!    chunk's `p` transposed to `[E, chunk]` (so an expert's column is read as
//!    contiguous runs of `CHUNK` values, not one strided value per row). The copy
//!    lives, as bits, in the `row` output, which step 3 overwrites: no scratch.
//! 2. Per expert (rayon): the threshold of its `capacity` largest
//!    [`rank_key`]`(p[t, e], t)` (ties to the lower token, NaN last; keys are
//!    distinct): a min-heap of the best keys when few tokens win, a selection
//!    (`select_nth_unstable`) otherwise; then a scan in token order stores the rows.
//! 3. Per token chunk (rayon): `row[t, e]` found by binary search in expert `e`'s
//!    (token-sorted) rows; unchosen weights zeroed.

use crate::cpu::{softmax_row, CHUNK};
use crate::dtype::RouterFloat;
use crate::ops::ExpertChoiceBuffers;
use crate::select::rank_key;
use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// `(t, p[t, e])` in token order from the chunk-transposed copy `pt` of `p` (f32
/// bits): chunk `c` (tokens `c * CHUNK ..`, `n` of them) holds expert `e`'s values
/// at `pt[c * CHUNK * E + e * n ..][..n]`.
fn column(
    pt: &[i32],
    num_tokens: usize,
    num_experts: usize,
    e: usize,
) -> impl Iterator<Item = (usize, f32)> + '_ {
    (0..num_tokens.div_ceil(CHUNK)).flat_map(move |c| {
        let t0 = c * CHUNK;
        let n = CHUNK.min(num_tokens - t0);
        let base = t0 * num_experts + e * n;
        pt[base..base + n]
            .iter()
            .enumerate()
            .map(move |(i, &v)| (t0 + i, f32::from_bits(v as u32)))
    })
}

/// The threshold key of the `taken` best tokens of one expert (`1 <= taken <
/// num_tokens`): exactly `taken` keys of the column are `>=` it.
fn threshold(
    col: impl Iterator<Item = (usize, f32)>,
    num_tokens: usize,
    taken: usize,
    heap: &mut BinaryHeap<Reverse<u64>>,
    keys: &mut Vec<u64>,
) -> u64 {
    if taken.saturating_mul(8) <= num_tokens {
        // Few winners: keep the best `taken` keys in a min-heap; most tokens are
        // rejected by one comparison with the current minimum.
        heap.clear();
        let mut min = 0u64;
        for (t, pe) in col {
            let key = rank_key(pe, t);
            if key <= min {
                continue;
            }
            if heap.len() < taken {
                heap.push(Reverse(key));
                if heap.len() < taken {
                    continue;
                }
            } else if let Some(mut top) = heap.peek_mut() {
                *top = Reverse(key);
            }
            min = heap.peek().map_or(0, |r| r.0);
        }
        min
    } else {
        keys.clear();
        keys.extend(col.map(|(t, pe)| rank_key(pe, t)));
        keys.select_nth_unstable_by(taken - 1, |x, y| y.cmp(x));
        keys[taken - 1]
    }
}

/// Expert-choice forward (see [`crate::ops::expert_choice`]). Assumes validated
/// sizes: `num_experts >= 1`, every buffer of the documented length.
pub fn expert_choice<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    out: ExpertChoiceBuffers<'_>,
) {
    let ne = num_experts;
    let len = CHUNK * ne;
    let taken = capacity.min(num_tokens);
    // p of one token chunk, and its transposed copy when one is wanted.
    let chunk_softmax = |p: &mut [f32], z: &[T], mut ptc: Option<&mut [i32]>| {
        let n = p.len() / ne;
        for (i, (p, z)) in p.chunks_mut(ne).zip(z.chunks(ne)).enumerate() {
            softmax_row(z.iter().map(|v| v.to_f32()), p);
            if let Some(ptc) = ptc.as_deref_mut() {
                for (e, &v) in p.iter().enumerate() {
                    ptc[e * n + i] = v.to_bits() as i32;
                }
            }
        }
    };
    if taken > 0 {
        out.weights
            .par_chunks_mut(len)
            .zip(logits.par_chunks(len))
            .zip(out.row.par_chunks_mut(len))
            .for_each(|((p, z), ptc)| chunk_softmax(p, z, Some(ptc)));
    } else {
        out.weights
            .par_chunks_mut(len)
            .zip(logits.par_chunks(len))
            .for_each(|(p, z)| chunk_softmax(p, z, None));
    }

    for (e, x) in out.expert_offsets.iter_mut().enumerate() {
        *x = (e * capacity) as i32;
    }
    out.tokens_per_expert.fill(taken as i32);
    if taken == 0 {
        out.row_to_token.fill(-1);
        out.row_weights.fill(0.0);
    } else {
        let pt: &[i32] = out.row;
        out.row_to_token
            .par_chunks_mut(capacity)
            .zip(out.row_weights.par_chunks_mut(capacity))
            .enumerate()
            .for_each_init(
                || (BinaryHeap::new(), Vec::new()),
                |(heap, keys), (e, (rt, rw))| {
                    let thr = if taken < num_tokens {
                        threshold(column(pt, num_tokens, ne, e), num_tokens, taken, heap, keys)
                    } else {
                        0 // every key is >= 0: all tokens
                    };
                    rt.fill(-1);
                    rw.fill(0.0);
                    let mut s = 0;
                    for (t, pe) in column(pt, num_tokens, ne, e) {
                        if rank_key(pe, t) >= thr {
                            rt[s] = t as i32;
                            rw[s] = pe;
                            s += 1;
                        }
                    }
                },
            );
    }

    let row_to_token: &[i32] = out.row_to_token;
    out.row
        .par_chunks_mut(len)
        .zip(out.weights.par_chunks_mut(len))
        .enumerate()
        .for_each(|(c, (row, w))| {
            row.fill(-1);
            let (t0, t1) = (c * CHUNK, c * CHUNK + row.len() / ne);
            for e in 0..ne {
                let seg = &row_to_token[e * capacity..e * capacity + taken];
                let first = seg.partition_point(|&t| (t as usize) < t0);
                for (s, &t) in seg.iter().enumerate().skip(first) {
                    let t = t as usize;
                    if t >= t1 {
                        break;
                    }
                    row[(t - t0) * ne + e] = (e * capacity + s) as i32;
                }
            }
            for (w, &r) in w.iter_mut().zip(row.iter()) {
                if r < 0 {
                    *w = 0.0;
                }
            }
        });
}

/// Expert-choice backward (see [`crate::ops::expert_choice_backward`]):
/// `grad_z[t] = p_t ⊙ (g_t − <g_t, p_t>)` with `g = grad_weights` masked by
/// `row >= 0`. Assumes validated sizes.
pub fn expert_choice_backward<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    row: &[i32],
    grad_weights: &[f32],
    grad_logits: &mut [T],
) {
    let ne = num_experts;
    let len = CHUNK * ne;
    debug_assert_eq!(logits.len(), num_tokens * ne);
    grad_logits
        .par_chunks_mut(len)
        .zip(logits.par_chunks(len))
        .zip(row.par_chunks(len))
        .zip(grad_weights.par_chunks(len))
        .for_each_init(
            || vec![0.0f32; ne],
            |p, (((gz, z), r), g)| {
                for (((gz, z), r), g) in gz
                    .chunks_mut(ne)
                    .zip(z.chunks(ne))
                    .zip(r.chunks(ne))
                    .zip(g.chunks(ne))
                {
                    softmax_row(z.iter().map(|v| v.to_f32()), p);
                    let mut dot = 0.0f32;
                    for ((&pe, &re), &ge) in p.iter().zip(r).zip(g) {
                        if re >= 0 {
                            dot += ge * pe;
                        }
                    }
                    for (((o, &pe), &re), &ge) in gz.iter_mut().zip(p.iter()).zip(r).zip(g) {
                        let ge = if re >= 0 { ge } else { 0.0 };
                        *o = T::from_f32(pe * (ge - dot));
                    }
                }
            },
        );
}
