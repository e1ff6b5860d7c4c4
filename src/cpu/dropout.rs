//! CPU reference for expert masking and assignment dropout.

use crate::cpu::CHUNK;
use crate::ops::{AssignmentDropoutBuffers, Assignments, DropoutConfig};
use crate::philox::{uniform, Domain};
use crate::select::{key_index, rank_key};
use rayon::prelude::*;

/// Expert-masking mask of token `t` into `masked [num_experts]` (`true` = masked).
///
/// Rule (mirrored by the kernels): candidate `e` is masked when
/// `u = uniform(seed, offset, ExpertMasking, t * E + e) < rate`. If that leaves fewer
/// than `topk` unmasked candidates, the masked candidates with the largest `u`
/// (ties: lower expert index) are unmasked until exactly `topk` remain.
///
/// Cost: `O(E)` generator draws and an `O(E)` selection (`select_nth_unstable`) among
/// the masked candidates, whatever the rate (the rule names a set, not a sequence of
/// re-draws, so the `topk - unmasked` largest draws are found in one selection).
///
/// Never panics: only the first `min(num_experts, masked.len())` entries are written
/// (the validated callers pass exactly `num_experts`), and `t * E + e` is formed in
/// wrapping `u64` arithmetic (it fits for every validated size).
pub fn expert_mask_row(
    t: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) {
    expert_mask_row_with(t, num_experts, topk, cfg, masked, &mut Vec::new());
}

/// [`expert_mask_row`] with a caller-owned scratch (reused across tokens).
pub(crate) fn expert_mask_row_with(
    t: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
    keys: &mut Vec<u64>,
) {
    let n = num_experts.min(masked.len());
    let masked = &mut masked[..n];
    let base = (t as u64).wrapping_mul(num_experts as u64);
    // The rank key of a masked candidate's draw: larger `u` first, then lower index.
    keys.clear();
    let mut unmasked = 0usize;
    for (e, m) in masked.iter_mut().enumerate() {
        let u = uniform(
            cfg.seed,
            cfg.offset,
            Domain::ExpertMasking,
            base.wrapping_add(e as u64),
        );
        *m = u < cfg.rate;
        if *m {
            keys.push(rank_key(u, e));
        } else {
            unmasked += 1;
        }
    }
    let need = topk.saturating_sub(unmasked);
    if need == 0 {
        return;
    }
    // Unmask the `need` masked candidates with the largest keys (all of them if there
    // are no more than that). Keys are distinct (they end with the index).
    if need < keys.len() {
        keys.select_nth_unstable_by(need - 1, |a, b| b.cmp(a));
    }
    for &key in keys.iter().take(need) {
        if let Some(m) = masked.get_mut(key_index(key)) {
            *m = false;
        }
    }
}

/// Expert-masking mask of every token into `masked [num_tokens, num_experts]`
/// (`true` = masked), row by row with [`expert_mask_row`], rayon over chunks of
/// [`CHUNK`] tokens. Bits depend only on `(seed, offset, t, e)`.
pub(crate) fn expert_mask(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) {
    if num_experts == 0 {
        return;
    }
    let n = num_tokens.saturating_mul(num_experts).min(masked.len());
    let masked = &mut masked[..n];
    masked
        .par_chunks_mut(CHUNK * num_experts)
        .enumerate()
        .for_each_init(Vec::new, |keys, (c, chunk)| {
            for (i, row) in chunk.chunks_mut(num_experts).enumerate() {
                expert_mask_row_with(c * CHUNK + i, num_experts, topk, cfg, row, keys);
            }
        });
}

/// Whether routed assignment `(t, j)` survives assignment dropout:
/// dropped when `uniform(seed, offset, AssignmentDropout, t * topk + j) < rate`.
#[inline]
pub(crate) fn assignment_keep(t: usize, j: usize, topk: usize, cfg: &DropoutConfig) -> bool {
    // `rate == 0` never drops (u >= 0); skip the generator then.
    cfg.rate <= 0.0
        || uniform(
            cfg.seed,
            cfg.offset,
            Domain::AssignmentDropout,
            (t * topk + j) as u64,
        ) >= cfg.rate
}

/// The renormalisation sums of one token: `(S, S_keep)` with `S = Σ_{routed j} w_j`
/// and `S_keep = Σ_{kept j} w_j`, accumulated in f32 in choice order, and whether any
/// routed assignment of the token was dropped.
#[inline]
fn token_sums(idx: &[i32], w: &[f32], keep: &[bool]) -> (f32, f32, bool) {
    let mut s = 0.0f32;
    let mut s_keep = 0.0f32;
    let mut any_dropped = false;
    for ((&e, &wj), &kj) in idx.iter().zip(w).zip(keep) {
        if e >= 0 {
            s += wj;
            if kj {
                s_keep += wj;
            } else {
                any_dropped = true;
            }
        }
    }
    (s, s_keep, any_dropped)
}

/// Assignment dropout (NLLB expert output masking) of `indices`/`weights`
/// `[num_tokens, topk]` into `out_indices`, `out_weights`, `out_keep` (same shape);
/// returns the number of routed assignments dropped.
///
/// Per token: routed `(t, j)` (index `>= 0`) is kept unless [`assignment_keep`] says
/// otherwise; a dropped or unrouted entry gets index `-1`, weight `0`, keep `false`.
/// With `renormalize`, a token that lost at least one assignment has its kept weights
/// scaled by `r = S / (S_keep + 1e-20)` (see [`token_sums`]), so its weight sum is
/// preserved; a token that lost nothing is copied unchanged (so rate 0 is exactly the
/// identity), and a token that lost everything gets all zeros.
pub(crate) fn assignment_dropout(
    input: &Assignments<'_>,
    cfg: &DropoutConfig,
    renormalize: bool,
    out: AssignmentDropoutBuffers<'_>,
) -> usize {
    let Assignments {
        indices,
        weights,
        num_tokens,
        topk,
    } = *input;
    if topk == 0 || num_tokens == 0 {
        return 0;
    }
    let n = num_tokens * topk;
    let row = CHUNK * topk;
    out.indices[..n]
        .par_chunks_mut(row)
        .zip(out.weights[..n].par_chunks_mut(row))
        .zip(out.keep[..n].par_chunks_mut(row))
        .enumerate()
        .map(|(c, ((oi, ow), ok))| {
            let mut dropped = 0usize;
            let base = c * row;
            let rows = oi
                .chunks_mut(topk)
                .zip(ow.chunks_mut(topk))
                .zip(ok.chunks_mut(topk));
            for (i, ((oi, ow), ok)) in rows.enumerate() {
                let t = c * CHUNK + i;
                let off = base + i * topk;
                let idx = &indices[off..off + topk];
                let w = &weights[off..off + topk];
                for j in 0..topk {
                    let keep = idx[j] >= 0 && assignment_keep(t, j, topk, cfg);
                    dropped += usize::from(idx[j] >= 0 && !keep);
                    ok[j] = keep;
                    oi[j] = if keep { idx[j] } else { -1 };
                    ow[j] = if keep { w[j] } else { 0.0 };
                }
                if renormalize {
                    let (s, s_keep, any_dropped) = token_sums(idx, w, ok);
                    if any_dropped {
                        let r = s / (s_keep + 1e-20);
                        for (owj, &kj) in ow.iter_mut().zip(ok.iter()) {
                            if kj {
                                *owj *= r;
                            }
                        }
                    }
                }
            }
            dropped
        })
        .sum()
}

/// Backward of [`assignment_dropout`]: `grad_weights [num_tokens, topk]` from
/// `grad_out` (the gradient of the output weights), given the input `indices` and
/// `weights` and the forward's `keep` mask.
///
/// Without renormalisation (or for a token that lost nothing): `∂L/∂w_m = keep_m · g_m`.
/// With renormalisation, a token that lost something has
/// `w'_j = keep_j · w_j · r`, `r = S / D`, `D = S_keep + 1e-20`, hence with
/// `c = (Σ_j keep_j · g_j · w_j) / D`:
/// `∂L/∂w_m = keep_m · r · (g_m − c) + routed_m · c`
/// (a dropped assignment still gets `c`: its weight is part of the preserved sum `S`).
/// Unrouted entries get 0.
pub(crate) fn assignment_dropout_backward(
    input: &Assignments<'_>,
    keep: &[bool],
    renormalize: bool,
    grad_out: &[f32],
    grad_weights: &mut [f32],
) {
    let Assignments {
        indices,
        weights,
        num_tokens,
        topk,
    } = *input;
    if topk == 0 || num_tokens == 0 {
        return;
    }
    let n = num_tokens * topk;
    let row = CHUNK * topk;
    grad_weights[..n]
        .par_chunks_mut(row)
        .enumerate()
        .for_each(|(c, gw)| {
            let base = c * row;
            for (i, gw) in gw.chunks_mut(topk).enumerate() {
                let off = base + i * topk;
                let idx = &indices[off..off + topk];
                let w = &weights[off..off + topk];
                let kp = &keep[off..off + topk];
                let g = &grad_out[off..off + topk];
                let (s, s_keep, any_dropped) = token_sums(idx, w, kp);
                if !(renormalize && any_dropped) {
                    for ((gwj, &gj), &kj) in gw.iter_mut().zip(g).zip(kp) {
                        *gwj = if kj { gj } else { 0.0 };
                    }
                    continue;
                }
                let d = s_keep + 1e-20;
                let r = s / d;
                let mut gdot = 0.0f32;
                for ((&gj, &wj), &kj) in g.iter().zip(w).zip(kp) {
                    if kj {
                        gdot += gj * wj;
                    }
                }
                let cc = gdot / d;
                for j in 0..topk {
                    let routed = if idx[j] >= 0 { cc } else { 0.0 };
                    gw[j] = if kp[j] {
                        r * (g[j] - cc) + routed
                    } else {
                        routed
                    };
                }
            }
        });
}
