//! CPU reference for the router z-loss (ST-MoE), forward sums and gradient.
//!
//! `logsumexp` per token in f32 with the max shift of [`softmax_row`] (stable for
//! `|z| ≫ 80`; `+inf` for a row whose max is `+inf`, as `torch.logsumexp`); the sum of `lse²` over tokens in f64 via [`chunked_reduce`], bitwise
//! independent of the number of threads.

use super::{chunked_reduce, softmax_row, CHUNK};
use crate::dtype::RouterFloat;
use rayon::prelude::*;

/// `(Σ_t lse_t², valid tokens)` over the valid tokens of logits
/// `[num_tokens, num_experts]` (`padding_mask`: `true` = padding). `num_experts >= 1`.
pub fn z_loss_sums<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&[bool]>,
) -> (f64, usize) {
    let mut sum = 0.0f64;
    let mut valid = 0usize;
    if num_experts == 0 {
        return (sum, valid);
    }
    chunked_reduce(
        num_tokens,
        |range| {
            let mut p = vec![0.0f32; num_experts];
            let mut s = 0.0f64;
            let mut n = 0usize;
            for t in range {
                if is_padding(padding_mask, t) {
                    continue;
                }
                let Some(z) = logits.get(t * num_experts..(t + 1) * num_experts) else {
                    continue;
                };
                let lse = lse_row(z, &mut p);
                s += (lse as f64) * (lse as f64);
                n += 1;
            }
            (s, n)
        },
        |(s, n)| {
            sum += s;
            valid += n;
        },
    );
    (sum, valid)
}

/// Gradient of the z-loss into `grad_logits [num_tokens, num_experts]` (overwritten):
/// `scale · lse_t · softmax(z_t)` per valid token, 0 for padding, where the caller
/// passes `scale = coeff · 2 · grad_loss / T_valid`.
pub fn z_loss_grad_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&[bool]>,
    scale: f32,
    grad_logits: &mut [T],
) {
    if num_experts == 0 || num_tokens == 0 {
        return;
    }
    grad_logits
        .par_chunks_mut(CHUNK * num_experts)
        .enumerate()
        .for_each(|(c, out)| {
            let mut p = vec![0.0f32; num_experts];
            for (i, orow) in out.chunks_mut(num_experts).enumerate() {
                let t = c * CHUNK + i;
                let Some(z) = logits.get(t * num_experts..(t + 1) * num_experts) else {
                    continue;
                };
                if is_padding(padding_mask, t) {
                    orow.fill(T::from_f32(0.0));
                    continue;
                }
                let f = scale * lse_row(z, &mut p);
                for (o, &pe) in orow.iter_mut().zip(&p) {
                    *o = T::from_f32(f * pe);
                }
            }
        });
}

/// `logsumexp(z)` in f32, leaving `softmax(z)` in `p`.
///
/// `+inf` when the max is `+inf`, as `torch.logsumexp`: the shifted sum is NaN then
/// (`exp(inf - inf)`), and `m + ln s` would be NaN. (`cuda/losses.cu`'s `lse_of` is the
/// same rule.) A NaN logit still gives NaN.
#[inline]
fn lse_row<T: RouterFloat>(z: &[T], p: &mut [f32]) -> f32 {
    let (m, s) = softmax_row(z.iter().map(|v| v.to_f32()), p);
    if m == f32::INFINITY {
        m
    } else {
        m + s.ln()
    }
}

#[inline]
fn is_padding(padding_mask: Option<&[bool]>, t: usize) -> bool {
    padding_mask.is_some_and(|m| m.get(t).copied().unwrap_or(true))
}
