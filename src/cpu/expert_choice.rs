//! CPU reference for expert-choice routing.
//!
//! 1. `p = softmax(z_t)` per token chunk (rayon) into `weights`.
//! 2. Per expert (rayon): the `capacity` largest [`rank_key`]`(p[t, e], t)` (so ties
//!    go to the lower token, NaN last) by a selection, then a scan in token order
//!    writes the expert's rows.
//! 3. Per token chunk (rayon): `row[t, e]` found by binary search in expert `e`'s
//!    (token-sorted) rows; unchosen weights zeroed.

use crate::cpu::{softmax_row, CHUNK};
use crate::dtype::RouterFloat;
use crate::ops::ExpertChoiceBuffers;
use crate::select::rank_key;
use rayon::prelude::*;

/// Experts per block of the transpose of `p`: 16 f32 = one 64-byte cache line.
const TRANSPOSE_BLOCK: usize = 16;

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
    out.weights
        .par_chunks_mut(len)
        .zip(logits.par_chunks(len))
        .for_each(|(p, z)| {
            for (p, z) in p.chunks_mut(ne).zip(z.chunks(ne)) {
                softmax_row(z.iter().map(|v| v.to_f32()), p);
            }
        });
    let p: &[f32] = out.weights;

    let taken = capacity.min(num_tokens);
    for (e, x) in out.expert_offsets.iter_mut().enumerate() {
        *x = (e * capacity) as i32;
    }
    out.tokens_per_expert.fill(taken as i32);
    if taken == 0 {
        out.row_to_token.fill(-1);
        out.row_weights.fill(0.0);
    } else {
        // p transposed to [E, T] (blocks of experts, one cache line of p per token),
        // so each expert scans a contiguous column.
        let mut pt = vec![0.0f32; ne * num_tokens];
        pt.par_chunks_mut(TRANSPOSE_BLOCK * num_tokens)
            .enumerate()
            .for_each(|(b, block)| {
                let e0 = b * TRANSPOSE_BLOCK;
                let width = block.len() / num_tokens;
                for (t, prow) in p.chunks(ne).enumerate() {
                    for (i, &v) in prow[e0..e0 + width].iter().enumerate() {
                        block[i * num_tokens + t] = v;
                    }
                }
            });
        out.row_to_token
            .par_chunks_mut(capacity)
            .zip(out.row_weights.par_chunks_mut(capacity))
            .zip(pt.par_chunks(num_tokens))
            .for_each_init(Vec::<u64>::new, |keys, ((rt, rw), col)| {
                rt.fill(-1);
                rw.fill(0.0);
                if taken == num_tokens {
                    for (t, ((r, w), &pe)) in rt.iter_mut().zip(rw.iter_mut()).zip(col).enumerate()
                    {
                        *r = t as i32;
                        *w = pe;
                    }
                    return;
                }
                keys.clear();
                keys.extend(col.iter().enumerate().map(|(t, &pe)| rank_key(pe, t)));
                keys.select_nth_unstable_by(taken - 1, |x, y| y.cmp(x));
                let threshold = keys[taken - 1];
                let mut s = 0;
                for (t, &pe) in col.iter().enumerate() {
                    if rank_key(pe, t) >= threshold {
                        rt[s] = t as i32;
                        rw[s] = pe;
                        s += 1;
                    }
                }
            });
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
