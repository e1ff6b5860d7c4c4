//! CPU reference for the auxiliary load-balance loss (Switch/GShard and
//! sequence-level), forward statistics and gradient.
//!
//! One routine serves both the global and the sequence-level loss: the tokens are cut
//! into segments of `seq_len` consecutive tokens (the global loss is one segment of
//! `num_tokens` tokens), and every statistic is kept per segment.
//!
//! All per-token math is `f32`; sums over tokens are `f64`, accumulated per
//! [`CHUNK`] of tokens and combined in chunk order by [`chunked_reduce`], so the
//! result is bitwise independent of the number of threads.

use super::{chunked_reduce, sigmoid, softmax_row, CHUNK};
use crate::dtype::RouterFloat;
use crate::ops::topk_gating::ScoreFunction;
use crate::ops::RouterLogits;
use crate::select::{key_index, rank_key, top_k_desc};
use rayon::prelude::*;

/// The `1e-20` added to `Σ_e σ(z_e)` before dividing, in the sigmoid router's aux
/// scores `σ(z) / (Σ_e σ(z_e) + 1e-20)` (Megatron's value).
pub const SIGMOID_NORM_EPS: f32 = 1e-20;

/// A validated aux-loss problem: logits `[num_tokens, num_experts]` cut into
/// segments of `seq_len` tokens (`seq_len` divides `num_tokens`, or `num_tokens == 0`).
#[derive(Debug, Clone, Copy)]
pub struct AuxProblem<'a, T> {
    /// Router logits `[num_tokens, num_experts]`, row-major.
    pub logits: &'a [T],
    /// `T`.
    pub num_tokens: usize,
    /// `E` (`>= 1`).
    pub num_experts: usize,
    /// Tokens per segment (`num_tokens` for the global loss).
    pub seq_len: usize,
    /// `[num_tokens]`, `true` = padding (excluded everywhere).
    pub padding_mask: Option<&'a [bool]>,
    /// How logits become aux scores.
    pub score_function: ScoreFunction,
}

impl<'a, T> AuxProblem<'a, T> {
    /// The problem of `x` cut into segments of `seq_len` tokens, scored by
    /// `score_function`.
    pub fn new(x: RouterLogits<'a, T>, seq_len: usize, score_function: ScoreFunction) -> Self {
        AuxProblem {
            logits: x.logits,
            num_tokens: x.num_tokens,
            num_experts: x.num_experts,
            seq_len,
            padding_mask: x.padding_mask,
            score_function,
        }
    }

    /// Number of segments (`0` when `num_tokens == 0`).
    pub fn num_segments(&self) -> usize {
        if self.num_tokens == 0 || self.seq_len == 0 {
            0
        } else {
            self.num_tokens / self.seq_len
        }
    }

    #[inline]
    fn is_padding(&self, t: usize) -> bool {
        self.padding_mask
            .is_some_and(|m| m.get(t).copied().unwrap_or(true))
    }
}

/// Per-segment statistics of the aux scores.
#[derive(Debug, Clone, PartialEq)]
pub struct AuxStats {
    /// `[segments, E]`: `Σ_t P[t, e]` over the segment's valid tokens (f64 sums).
    pub scores_sum: Vec<f64>,
    /// `[segments, E]`: top-k assignment counts of the segment's valid tokens (all
    /// zero when counts were not asked for).
    pub counts: Vec<i64>,
    /// `[segments]`: valid (non-padding) tokens of each segment.
    pub valid_tokens: Vec<usize>,
}

/// Aux scores of one token into `out` (`len == z.len()`), in f32:
/// `softmax(z)`, or `σ(z) / (Σ_e σ(z_e) + 1e-20)`.
#[inline]
pub fn aux_scores_row<T: RouterFloat>(z: &[T], score_function: ScoreFunction, out: &mut [f32]) {
    match score_function {
        ScoreFunction::Softmax => {
            softmax_row(z.iter().map(|v| v.to_f32()), out);
        }
        ScoreFunction::Sigmoid => {
            let mut s = 0.0f32;
            for (o, v) in out.iter_mut().zip(z) {
                *o = sigmoid(v.to_f32());
                s += *o;
            }
            let d = s + SIGMOID_NORM_EPS;
            for o in out.iter_mut() {
                *o /= d;
            }
        }
    }
}

/// Per-segment sums of the aux scores over valid tokens, valid-token counts and, when
/// `count_topk` is `Some(k)`, the plain top-k counts of `P` (ranked with
/// [`crate::select::rank_key`]: lower expert index first on ties, NaN lowest).
pub fn aux_stats<T: RouterFloat>(p: &AuxProblem<'_, T>, count_topk: Option<usize>) -> AuxStats {
    let e_n = p.num_experts;
    let segs = p.num_segments();
    let mut stats = AuxStats {
        scores_sum: vec![0.0; segs * e_n],
        counts: vec![0; segs * e_n],
        valid_tokens: vec![0; segs],
    };
    if segs == 0 || e_n == 0 {
        return stats;
    }
    let seq_len = p.seq_len;
    let k = count_topk.map_or(0, |k| k.min(e_n));
    chunked_reduce(
        p.num_tokens,
        |range| {
            let first = range.start / seq_len;
            let last = (range.end - 1) / seq_len;
            let n = last - first + 1;
            let mut sums = vec![0.0f64; n * e_n];
            let mut counts = vec![0i64; if k > 0 { n * e_n } else { 0 }];
            let mut valid = vec![0usize; n];
            let mut row = vec![0.0f32; e_n];
            let mut keys = vec![0u64; if k > 0 { e_n } else { 0 }];
            for t in range {
                if p.is_padding(t) {
                    continue;
                }
                let b = t / seq_len - first;
                aux_scores_row(
                    &p.logits[t * e_n..(t + 1) * e_n],
                    p.score_function,
                    &mut row,
                );
                valid[b] += 1;
                for (s, &v) in sums[b * e_n..(b + 1) * e_n].iter_mut().zip(&row) {
                    *s += v as f64;
                }
                if k > 0 {
                    for (e, (key, &v)) in keys.iter_mut().zip(&row).enumerate() {
                        *key = rank_key(v, e);
                    }
                    top_k_desc(&mut keys, k);
                    for &key in &keys[..k] {
                        counts[b * e_n + key_index(key)] += 1;
                    }
                }
            }
            (first, sums, counts, valid)
        },
        |(first, sums, counts, valid)| {
            let off = first * e_n;
            for (d, s) in stats.scores_sum[off..].iter_mut().zip(&sums) {
                *d += *s;
            }
            for (d, c) in stats.counts[off..].iter_mut().zip(&counts) {
                *d += *c;
            }
            for (d, v) in stats.valid_tokens[first..].iter_mut().zip(&valid) {
                *d += *v;
            }
        },
    );
    stats
}

/// Valid (non-padding) tokens of each segment of `seq_len` tokens.
pub fn valid_per_segment(
    padding_mask: Option<&[bool]>,
    num_tokens: usize,
    seq_len: usize,
) -> Vec<usize> {
    if num_tokens == 0 || seq_len == 0 {
        return Vec::new();
    }
    let segs = num_tokens / seq_len;
    match padding_mask {
        None => vec![seq_len; segs],
        Some(m) => m
            .chunks(seq_len)
            .take(segs)
            .map(|c| c.iter().filter(|&&pad| !pad).count())
            .collect(),
    }
}

/// `coeff · E / (k · T_total²)` in f64, or 0 when `total_tokens == 0`.
pub fn switch_scale(num_experts: usize, topk: usize, total_tokens: usize, coeff: f32) -> f64 {
    if total_tokens == 0 || topk == 0 {
        return 0.0;
    }
    let t = total_tokens as f64;
    coeff as f64 * num_experts as f64 / (topk as f64 * t * t)
}

/// The Switch loss of one segment: `coeff · E / (k · T_total²) · Σ_e c_e · S_e` with
/// `S_e = Σ_t P[t, e]` (f64); 0 when `total_tokens == 0`.
pub fn switch_loss(
    scores_sum: &[f64],
    counts: &[i64],
    topk: usize,
    total_tokens: usize,
    coeff: f32,
) -> f64 {
    let scale = switch_scale(scores_sum.len(), topk, total_tokens, coeff);
    if scale == 0.0 {
        return 0.0;
    }
    let dot: f64 = counts
        .iter()
        .zip(scores_sum)
        .map(|(&c, &s)| c as f64 * s)
        .sum();
    scale * dot
}

/// `∂L/∂P[t, e]` for the tokens of one segment: `g_e = scale · c_e` into `out`
/// (`scale` already holds `coeff · E / (k · T_total²) · grad_loss`, and any averaging).
pub fn switch_grad_p(counts: &[i64], scale: f64, out: &mut [f32]) {
    for (o, &c) in out.iter_mut().zip(counts) {
        *o = (scale * c as f64) as f32;
    }
}

/// Gradient of the aux loss w.r.t. the logits, given `g [segments, E]` = `∂L/∂P` of
/// each segment's tokens (from [`switch_grad_p`]). Overwrites `grad_logits
/// [num_tokens, num_experts]`; padding tokens get 0.
///
/// Softmax: `dz = P ⊙ (g − <g, P>)`. Sigmoid-normalised, with `s = σ(z)`,
/// `D = Σ s + 1e-20`: `∂L/∂s_m = (g_m − <g, s>/D) / D`, `dz = ∂L/∂s ⊙ s(1 − s)`.
pub fn aux_grad_into<T: RouterFloat>(p: &AuxProblem<'_, T>, g: &[f32], grad_logits: &mut [T]) {
    let e_n = p.num_experts;
    if e_n == 0 || p.num_tokens == 0 || p.seq_len == 0 {
        return;
    }
    let seq_len = p.seq_len;
    grad_logits
        .par_chunks_mut(CHUNK * e_n)
        .enumerate()
        .for_each(|(c, out)| {
            let mut s = vec![0.0f32; e_n];
            for (i, orow) in out.chunks_mut(e_n).enumerate() {
                let t = c * CHUNK + i;
                let b = t / seq_len;
                let (Some(z), Some(gb)) = (
                    p.logits.get(t * e_n..(t + 1) * e_n),
                    g.get(b * e_n..(b + 1) * e_n),
                ) else {
                    continue;
                };
                if p.is_padding(t) {
                    orow.fill(T::from_f32(0.0));
                    continue;
                }
                match p.score_function {
                    ScoreFunction::Softmax => {
                        softmax_row(z.iter().map(|v| v.to_f32()), &mut s);
                        let dot: f32 = gb.iter().zip(&s).map(|(a, b)| a * b).sum();
                        for ((o, &pe), &ge) in orow.iter_mut().zip(&s).zip(gb) {
                            *o = T::from_f32(pe * (ge - dot));
                        }
                    }
                    ScoreFunction::Sigmoid => {
                        let mut sum = 0.0f32;
                        for (se, v) in s.iter_mut().zip(z) {
                            *se = sigmoid(v.to_f32());
                            sum += *se;
                        }
                        let d = sum + SIGMOID_NORM_EPS;
                        let a: f32 = gb.iter().zip(&s).map(|(a, b)| a * b).sum();
                        let mean = a / d;
                        for ((o, &se), &ge) in orow.iter_mut().zip(&s).zip(gb) {
                            let ds = (ge - mean) / d;
                            *o = T::from_f32(ds * (se * (1.0 - se)));
                        }
                    }
                }
            }
        });
}
