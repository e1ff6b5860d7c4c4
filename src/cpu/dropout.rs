//! CPU reference for expert masking and assignment dropout.

use crate::cpu::CHUNK;
use crate::ops::DropoutConfig;
use crate::philox::{uniform, Domain};
use rayon::prelude::*;

/// Expert-masking mask of token `t` into `masked [num_experts]` (`true` = masked).
///
/// Rule (mirrored by the kernels): candidate `e` is masked when
/// `u = uniform(seed, offset, ExpertMasking, t * E + e) < rate`. If that leaves fewer
/// than `topk` unmasked candidates, the masked candidates with the largest `u`
/// (ties: lower expert index) are unmasked until exactly `topk` remain.
pub fn expert_mask_row(
    t: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) {
    let base = (t * num_experts) as u64;
    let mut unmasked = 0usize;
    for (e, m) in masked.iter_mut().enumerate().take(num_experts) {
        let u = uniform(cfg.seed, cfg.offset, Domain::ExpertMasking, base + e as u64);
        *m = u < cfg.rate;
        unmasked += usize::from(!*m);
    }
    while unmasked < topk {
        // Unmask the masked candidate with the largest u (ties: lower index).
        let mut best: Option<(f32, usize)> = None;
        for (e, &m) in masked.iter().enumerate().take(num_experts) {
            if m {
                let u = uniform(cfg.seed, cfg.offset, Domain::ExpertMasking, base + e as u64);
                // (`Option::is_none_or` would need Rust 1.82; the MSRV is 1.80.)
                if best.map_or(true, |(bu, _)| u > bu) {
                    best = Some((u, e));
                }
            }
        }
        match best {
            Some((_, e)) => {
                masked[e] = false;
                unmasked += 1;
            }
            None => break,
        }
    }
}

/// Expert-masking mask of every token into `masked [num_tokens, num_experts]`
/// (`true` = masked), row by row with [`expert_mask_row`], rayon over chunks of
/// [`CHUNK`] tokens. Bits depend only on `(seed, offset, t, e)`.
pub fn expert_mask(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) {
    if num_experts == 0 {
        return;
    }
    let n = (num_tokens * num_experts).min(masked.len());
    let masked = &mut masked[..n];
    masked
        .par_chunks_mut(CHUNK * num_experts)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (i, row) in chunk.chunks_mut(num_experts).enumerate() {
                expert_mask_row(c * CHUNK + i, num_experts, topk, cfg, row);
            }
        });
}

/// Whether routed assignment `(t, j)` survives assignment dropout:
/// dropped when `uniform(seed, offset, AssignmentDropout, t * topk + j) < rate`.
#[inline]
pub fn assignment_keep(t: usize, j: usize, topk: usize, cfg: &DropoutConfig) -> bool {
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
#[allow(clippy::too_many_arguments)]
pub fn assignment_dropout(
    indices: &[i32],
    weights: &[f32],
    num_tokens: usize,
    topk: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
    out_indices: &mut [i32],
    out_weights: &mut [f32],
    out_keep: &mut [bool],
) -> usize {
    if topk == 0 || num_tokens == 0 {
        return 0;
    }
    let n = num_tokens * topk;
    let row = CHUNK * topk;
    out_indices[..n]
        .par_chunks_mut(row)
        .zip(out_weights[..n].par_chunks_mut(row))
        .zip(out_keep[..n].par_chunks_mut(row))
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
#[allow(clippy::too_many_arguments)]
pub fn assignment_dropout_backward(
    indices: &[i32],
    weights: &[f32],
    keep: &[bool],
    num_tokens: usize,
    topk: usize,
    renormalize: bool,
    grad_out: &[f32],
    grad_weights: &mut [f32],
) {
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
