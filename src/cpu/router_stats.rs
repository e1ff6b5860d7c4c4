//! CPU reference for router statistics: one pass over the logits and the routing.

use crate::cpu::chunked_reduce;
use crate::dtype::RouterFloat;
use crate::ops::{RouterLogits, RouterStats};

/// Partial sums of one chunk of tokens (combined in chunk order).
struct Partial {
    selected: Vec<i64>,
    kept: Vec<i64>,
    dropped: u64,
    valid: u64,
    nonfinite: u64,
    entropy_sum: f64,
    lse_sum: f64,
    /// Max logsumexp of the chunk's valid tokens, NaN if any was NaN,
    /// `-inf` if the chunk had none.
    lse_max: f64,
}

/// Max that propagates NaN (a NaN logsumexp makes the max NaN, as it makes the mean).
#[inline]
fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// Entropy `−Σ p log p` and logsumexp of one row, in f32; `p` is scratch of the
/// row's length and receives `softmax(z)`.
///
/// With `m = max z` (NaN if any is NaN) and `rest = Σ exp(z_e − m)` over every
/// entry but the first maximum, `s = 1 + rest`, `ln s = ln_1p(rest)`,
/// `lse = m + ln s`, `p_e = exp(z_e − m) / s` and
/// `H = Σ_{p_e ≠ 0} p_e · (ln s − (z_e − m))`: `log p_e` is taken in the log domain
/// and `ln s` through `ln_1p`, so confident rows (`p_max → 1`) keep their tiny
/// entropy to f32 relative accuracy; `0 · log 0 = 0`, so `-inf` logits next to
/// finite ones contribute nothing. A row holding NaN, or only `-inf`, gives NaN
/// entropy and logsumexp; a row whose max is `+inf` (and no NaN) gives NaN entropy and
/// logsumexp `+inf`, as `torch.logsumexp` (`m + ln s` would be `inf + NaN`).
#[inline]
pub fn entropy_lse_row(z: impl Iterator<Item = f32> + Clone, p: &mut [f32]) -> (f32, f32) {
    // Max as in `softmax_row`: NaN wins, so it propagates.
    let m = z.clone().fold(f32::NEG_INFINITY, |a, b| {
        if b > a || b.is_nan() && !a.is_nan() {
            b
        } else {
            a
        }
    });
    let mut rest = 0.0f32;
    let mut seen_max = false;
    for (o, v) in p.iter_mut().zip(z.clone()) {
        let e = (v - m).exp();
        *o = e;
        if !seen_max && v == m {
            // exp(0) = 1 exactly for a finite max; adding `e - 1` (0, or NaN for an
            // infinite max) keeps NaN propagation without a second branch.
            seen_max = true;
            rest += e - 1.0;
        } else {
            rest += e;
        }
    }
    let inv = 1.0 / (1.0 + rest);
    let ln_s = rest.ln_1p();
    let mut h = 0.0f32;
    for (pe, ze) in p.iter_mut().zip(z) {
        *pe *= inv;
        if *pe != 0.0 {
            h += *pe * (ln_s - (ze - m));
        }
    }
    let lse = if m == f32::INFINITY { m } else { m + ln_s };
    (h, lse)
}

/// Router statistics over validated input (see [`crate::ops::router_stats`] for the
/// definitions). Reductions: per-chunk f64 partials of [`crate::cpu::CHUNK`] tokens
/// combined in chunk order by [`chunked_reduce`], so the result does not depend on
/// the thread count.
pub fn router_stats<T: RouterFloat>(
    x: RouterLogits<'_, T>,
    indices: &[i32],
    topk: usize,
    slots: Option<&[i32]>,
) -> RouterStats {
    let RouterLogits {
        logits,
        num_tokens,
        num_experts,
        padding_mask,
    } = x;
    let e_n = num_experts;
    let mut selected = vec![0i64; e_n];
    let mut kept = slots.map(|_| vec![0i64; e_n]);
    let (mut dropped, mut valid, mut nonfinite) = (0u64, 0u64, 0u64);
    let (mut entropy_sum, mut lse_sum, mut lse_max) = (0.0f64, 0.0f64, f64::NEG_INFINITY);
    chunked_reduce(
        num_tokens,
        |range| {
            let mut part = Partial {
                selected: vec![0; e_n],
                kept: vec![0; if slots.is_some() { e_n } else { 0 }],
                dropped: 0,
                valid: 0,
                nonfinite: 0,
                entropy_sum: 0.0,
                lse_sum: 0.0,
                lse_max: f64::NEG_INFINITY,
            };
            let mut p = vec![0.0f32; e_n];
            for t in range {
                if padding_mask.is_some_and(|m| m.get(t).copied().unwrap_or(false)) {
                    continue;
                }
                part.valid += 1;
                let Some(row) = logits.get(t * e_n..(t + 1) * e_n) else {
                    continue;
                };
                part.nonfinite += row.iter().filter(|v| !v.to_f32().is_finite()).count() as u64;
                let (h, lse) = entropy_lse_row(row.iter().map(|v| v.to_f32()), &mut p);
                part.entropy_sum += h as f64;
                part.lse_sum += lse as f64;
                part.lse_max = nan_max(part.lse_max, lse as f64);
                for j in t * topk..(t + 1) * topk {
                    let Some(&e) = indices.get(j) else { continue };
                    if e < 0 || e as usize >= e_n {
                        continue;
                    }
                    part.selected[e as usize] += 1;
                    if let Some(s) = slots.and_then(|s| s.get(j)) {
                        if *s >= 0 {
                            part.kept[e as usize] += 1;
                        } else {
                            part.dropped += 1;
                        }
                    }
                }
            }
            part
        },
        |part| {
            for (a, b) in selected.iter_mut().zip(&part.selected) {
                *a += b;
            }
            if let Some(k) = kept.as_mut() {
                for (a, b) in k.iter_mut().zip(&part.kept) {
                    *a += b;
                }
            }
            dropped += part.dropped;
            valid += part.valid;
            nonfinite += part.nonfinite;
            entropy_sum += part.entropy_sum;
            lse_sum += part.lse_sum;
            lse_max = nan_max(lse_max, part.lse_max);
        },
    );
    let total: i64 = selected.iter().sum();
    let max_violation = if total == 0 || e_n == 0 {
        0.0
    } else {
        let mean = total as f64 / e_n as f64;
        selected.iter().copied().max().unwrap_or(0) as f64 / mean - 1.0
    };
    let (mean_entropy, mean_lse, max_lse) = if valid == 0 {
        (0.0, 0.0, 0.0)
    } else {
        (entropy_sum / valid as f64, lse_sum / valid as f64, lse_max)
    };
    RouterStats {
        num_tokens: valid as usize,
        selected_counts: selected,
        kept_counts: kept,
        dropped,
        max_violation: max_violation as f32,
        mean_entropy: mean_entropy as f32,
        mean_lse: mean_lse as f32,
        max_lse: max_lse as f32,
        nonfinite_logits: nonfinite,
    }
}
