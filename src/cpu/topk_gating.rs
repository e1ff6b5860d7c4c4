//! CPU reference for top-k gating, replay and backward (see [`crate::ops::topk_gating`]).
//!
//! One token at a time, all math in `f32`, per-chunk scratch (no allocation per
//! token), rayon over chunks of [`CHUNK`] tokens. Every token is independent, so
//! the result does not depend on the number of threads.

use super::{sigmoid, CHUNK};
use crate::cpu::dropout::expert_mask_row_with;
use crate::ops::{ScoreFunction, TopkGatingConfig};
use crate::philox::{normal, Domain};
use crate::select::{key_index, rank_key, top_k_desc};
use crate::RouterFloat;
use rayon::prelude::*;

/// `1e-20`, added to the weight sum before renormalising (Megatron's constant).
pub const NORM_EPS: f32 = 1e-20;

/// Per-chunk scratch buffers.
struct Scratch {
    z: Vec<f32>,
    p: Vec<f32>,
    q: Vec<f32>,
    keys: Vec<u64>,
    group_keys: Vec<u64>,
    masked: Vec<bool>,
    mask_keys: Vec<u64>,
}

impl Scratch {
    fn new(num_experts: usize, num_groups: usize) -> Self {
        Scratch {
            z: vec![0.0; num_experts],
            p: vec![0.0; num_experts],
            q: vec![0.0; num_experts],
            keys: Vec::with_capacity(num_experts),
            group_keys: Vec::with_capacity(num_groups),
            masked: vec![false; num_experts],
            mask_keys: Vec::new(),
        }
    }
}

/// Widen one row of logits to f32 and compute the base scores into `p`:
/// `softmax(z)` (pre-softmax), `σ(z)` (sigmoid) or `z` itself (post-softmax).
#[inline]
fn base_scores<T: RouterFloat>(row: &[T], cfg: &TopkGatingConfig, z: &mut [f32], p: &mut [f32]) {
    for (d, s) in z.iter_mut().zip(row) {
        *d = s.to_f32();
    }
    match cfg.score_function {
        ScoreFunction::Softmax if cfg.pre_softmax => {
            super::softmax_row(z.iter().copied(), p);
        }
        ScoreFunction::Softmax => p.copy_from_slice(z),
        ScoreFunction::Sigmoid => {
            for (d, &s) in p.iter_mut().zip(z.iter()) {
                *d = sigmoid(s);
            }
        }
    }
}

/// [`base_scores`] where only the entries at `idx` are needed afterwards (replay and
/// backward): the pre-softmax denominator needs the whole row, the other modes only
/// the selected experts, so they skip the rest of the row.
#[inline]
fn base_scores_at<T: RouterFloat>(
    row: &[T],
    cfg: &TopkGatingConfig,
    idx: &[i32],
    z: &mut [f32],
    p: &mut [f32],
) {
    if cfg.score_function == ScoreFunction::Softmax && cfg.pre_softmax {
        return base_scores(row, cfg, z, p);
    }
    for &e in idx {
        let e = e as usize;
        z[e] = row[e].to_f32();
        p[e] = match cfg.score_function {
            ScoreFunction::Sigmoid => sigmoid(z[e]),
            ScoreFunction::Softmax => z[e],
        };
    }
}

/// Raw weights `w0_j` of the selected `idx` (before normalisation and scaling),
/// given the row's logits `z` and base scores `p`.
#[inline]
fn raw_weights(cfg: &TopkGatingConfig, z: &[f32], p: &[f32], idx: &[i32], w0: &mut [f32]) {
    match cfg.score_function {
        ScoreFunction::Softmax if !cfg.pre_softmax => {
            // softmax over the selected k only
            let m = idx
                .iter()
                .map(|&e| z[e as usize])
                .fold(
                    f32::NEG_INFINITY,
                    |a, b| if b > a || b.is_nan() { b } else { a },
                );
            let mut s = 0.0f32;
            for (w, &e) in w0.iter_mut().zip(idx) {
                *w = (z[e as usize] - m).exp();
                s += *w;
            }
            let inv = 1.0 / s;
            for w in w0.iter_mut() {
                *w *= inv;
            }
        }
        _ => {
            for (w, &e) in w0.iter_mut().zip(idx) {
                *w = p[e as usize];
            }
        }
    }
}

/// Normalise (if asked) and scale raw weights into `out`.
#[inline]
fn finish_weights(cfg: &TopkGatingConfig, w0: &[f32], out: &mut [f32]) {
    if cfg.normalize {
        let s: f32 = w0.iter().sum();
        let d = s + NORM_EPS;
        for (o, &w) in out.iter_mut().zip(w0) {
            *o = w / d * cfg.scaling_factor;
        }
    } else {
        for (o, &w) in out.iter_mut().zip(w0) {
            *o = w * cfg.scaling_factor;
        }
    }
}

/// Select the top-k experts of one token (`s.p` holds the base scores) into `idx`.
fn select_row(
    t: usize,
    num_experts: usize,
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
    s: &mut Scratch,
    idx: &mut [i32],
) {
    let k = cfg.topk;
    let base = (t * num_experts) as u64;
    if let Some(m) = &cfg.expert_masking {
        if m.rate > 0.0 {
            expert_mask_row_with(t, num_experts, k, m, &mut s.masked, &mut s.mask_keys);
        } else {
            s.masked.fill(false);
        }
    }
    // Selection scores q = base + bias + noise; masked candidates get -inf.
    for e in 0..num_experts {
        let mut q = s.p[e];
        if let Some(b) = bias {
            q += b[e];
        }
        if let Some(n) = &cfg.noise {
            if n.std > 0.0 {
                q += n.std * normal(n.seed, n.offset, Domain::SelectionNoise, base + e as u64);
            }
        }
        if cfg.expert_masking.is_some() && s.masked[e] {
            q = f32::NEG_INFINITY;
        }
        s.q[e] = q;
    }
    s.keys.clear();
    s.keys
        .extend(s.q.iter().enumerate().map(|(e, &q)| rank_key(q, e)));
    if let Some(g) = cfg.group_limit {
        let per_group = num_experts / g.num_groups;
        let m = k / g.group_topk;
        // A group's score: the sum of its top m selection scores, in rank order.
        s.group_keys.clear();
        for gi in 0..g.num_groups {
            let seg = &mut s.keys[gi * per_group..(gi + 1) * per_group];
            top_k_desc(seg, m);
            let sum = seg[..m]
                .iter()
                .fold(0.0f32, |acc, &key| acc + s.q[key_index(key)]);
            s.group_keys.push(rank_key(sum, gi));
        }
        top_k_desc(&mut s.group_keys, g.group_topk);
        // Only the experts of the selected groups stay eligible.
        s.keys.clear();
        for &gk in &s.group_keys[..g.group_topk] {
            let gi = key_index(gk);
            let lo = gi * per_group;
            s.keys.extend(
                s.q[lo..lo + per_group]
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| rank_key(q, lo + i)),
            );
        }
    }
    top_k_desc(&mut s.keys, k);
    for (o, &key) in idx.iter_mut().zip(&s.keys[..k]) {
        *o = key_index(key) as i32;
    }
}

/// Top-k gating forward (validated input).
pub fn forward<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
    weights: &mut [f32],
    indices: &mut [i32],
) {
    let k = cfg.topk;
    if num_tokens == 0 {
        return;
    }
    let groups = cfg.group_limit.map_or(0, |g| g.num_groups);
    weights
        .par_chunks_mut(CHUNK * k)
        .zip(indices.par_chunks_mut(CHUNK * k))
        .enumerate()
        .for_each(|(c, (wc, ic))| {
            let mut s = Scratch::new(num_experts, groups);
            let mut w0 = vec![0.0f32; k];
            for (r, (w, idx)) in wc.chunks_mut(k).zip(ic.chunks_mut(k)).enumerate() {
                let t = c * CHUNK + r;
                let row = &logits[t * num_experts..(t + 1) * num_experts];
                base_scores(row, cfg, &mut s.z, &mut s.p);
                select_row(t, num_experts, bias, cfg, &mut s, idx);
                raw_weights(cfg, &s.z, &s.p, idx, &mut w0);
                finish_weights(cfg, &w0, w);
            }
        });
}

/// Routing replay (validated input): weights for given indices.
pub fn replay<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    indices: &[i32],
    cfg: &TopkGatingConfig,
    weights: &mut [f32],
) {
    let k = cfg.topk;
    if num_tokens == 0 {
        return;
    }
    weights
        .par_chunks_mut(CHUNK * k)
        .enumerate()
        .for_each(|(c, wc)| {
            let mut s = Scratch::new(num_experts, 0);
            let mut w0 = vec![0.0f32; k];
            for (r, w) in wc.chunks_mut(k).enumerate() {
                let t = c * CHUNK + r;
                let row = &logits[t * num_experts..(t + 1) * num_experts];
                let idx = &indices[t * k..(t + 1) * k];
                base_scores_at(row, cfg, idx, &mut s.z, &mut s.p);
                raw_weights(cfg, &s.z, &s.p, idx, &mut w0);
                finish_weights(cfg, &w0, w);
            }
        });
}

/// Top-k gating backward (validated input): `grad_weights [T, k] → grad_logits [T, E]`.
pub fn backward<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    indices: &[i32],
    grad_weights: &[f32],
    cfg: &TopkGatingConfig,
    grad_logits: &mut [T],
) {
    let k = cfg.topk;
    if num_tokens == 0 {
        return;
    }
    grad_logits
        .par_chunks_mut(CHUNK * num_experts)
        .enumerate()
        .for_each(|(c, gc)| {
            let mut s = Scratch::new(num_experts, 0);
            let mut w0 = vec![0.0f32; k];
            let mut g0 = vec![0.0f32; k];
            let mut gz = vec![0.0f32; num_experts];
            for (r, gout) in gc.chunks_mut(num_experts).enumerate() {
                let t = c * CHUNK + r;
                let row = &logits[t * num_experts..(t + 1) * num_experts];
                let idx = &indices[t * k..(t + 1) * k];
                let gw = &grad_weights[t * k..(t + 1) * k];
                base_scores_at(row, cfg, idx, &mut s.z, &mut s.p);
                raw_weights(cfg, &s.z, &s.p, idx, &mut w0);
                // through the scaling and the renormalisation: g0 = dL/dw0
                if cfg.normalize {
                    let d = w0.iter().sum::<f32>() + NORM_EPS;
                    let dot: f32 = gw
                        .iter()
                        .zip(&w0)
                        .map(|(g, w)| g * cfg.scaling_factor * w)
                        .sum();
                    for j in 0..k {
                        g0[j] = gw[j] * cfg.scaling_factor / d - dot / (d * d);
                    }
                } else {
                    for j in 0..k {
                        g0[j] = gw[j] * cfg.scaling_factor;
                    }
                }
                gz.fill(0.0);
                match cfg.score_function {
                    ScoreFunction::Softmax if cfg.pre_softmax => {
                        // w0_j = p[i_j]; dz = p ⊙ (g_p − <g_p, p>)
                        let dot: f32 = idx.iter().zip(&g0).map(|(&e, g)| g * s.p[e as usize]).sum();
                        for (e, d) in gz.iter_mut().enumerate() {
                            *d = -s.p[e] * dot;
                        }
                        for (&e, g) in idx.iter().zip(&g0) {
                            gz[e as usize] += s.p[e as usize] * g;
                        }
                    }
                    ScoreFunction::Softmax => {
                        // w0 = softmax over the selected k
                        let dot: f32 = g0.iter().zip(&w0).map(|(g, w)| g * w).sum();
                        for j in 0..k {
                            gz[idx[j] as usize] = w0[j] * (g0[j] - dot);
                        }
                    }
                    ScoreFunction::Sigmoid => {
                        for j in 0..k {
                            let p = s.p[idx[j] as usize];
                            gz[idx[j] as usize] = g0[j] * p * (1.0 - p);
                        }
                    }
                }
                for (o, &v) in gout.iter_mut().zip(&gz) {
                    *o = T::from_f32(v);
                }
            }
        });
}
