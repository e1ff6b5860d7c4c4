//! Router z-loss (ST-MoE): `L = coeff · mean_t (logsumexp_e z[t, e])²` over valid
//! tokens, forward and gradient.
//!
//! `∂L/∂z[t, e] = coeff · 2 · lse_t · softmax(z_t)[e] / T_valid`. `logsumexp` is taken
//! with a max shift in f32 (stable for `|z| ≫ 80`); the mean over tokens is an f64 sum
//! in a fixed chunk order (bitwise independent of the number of threads). Padding
//! tokens (`padding_mask` `true`) are excluded from the mean and get zero gradient;
//! with no valid token (or `T = 0`) the loss and gradient are 0.

use crate::cpu;
use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use crate::ops::{as_rows, check_finite, check_logits, logits_grad, LogitsLens, RouterLogits};
use ndarray::{Array2, ArrayView2};

const OP: &str = "z_loss";

/// Result of [`z_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct ZLossOutput {
    /// `coeff · mean_t lse_t²` over valid tokens (0 if there are none).
    pub loss: f32,
    /// `T_valid`: the number of non-padding tokens.
    pub valid_tokens: usize,
}

/// The single validation of the z-loss forward (every backend): `num_experts >= 1`,
/// `coeff` finite, the logits and mask lengths.
pub(crate) fn validate_z_loss(x: LogitsLens, coeff: f32) -> Result<()> {
    if x.num_experts == 0 {
        return Err(Error::invalid(
            OP,
            "num_experts",
            0,
            "there must be at least 1 expert",
        ));
    }
    check_finite(
        OP,
        "coeff",
        coeff as f64,
        "the loss coefficient must be finite",
    )?;
    x.check(OP)
}

/// The single validation of the z-loss backward (every backend): as
/// [`validate_z_loss`], and `grad_logits [num_tokens, num_experts]`.
pub(crate) fn validate_z_loss_backward(
    x: LogitsLens,
    coeff: f32,
    grad_logits: usize,
) -> Result<()> {
    validate_z_loss(x, coeff)?;
    check_logits(OP, "grad_logits", grad_logits, x.num_tokens, x.num_experts)
}

/// Router z-loss of logits `[num_tokens, num_experts]`:
/// `coeff · mean over valid tokens of logsumexp(z_t)²`.
///
/// `padding_mask [num_tokens]`: `true` = padding, excluded.
///
/// # Errors
/// [`Error::InvalidArgument`] for `num_experts == 0` or non-finite `coeff`;
/// [`Error::Shape`] for `logits` or `padding_mask` of the wrong length.
///
/// # Example
/// ```
/// use moe_router::z_loss;
/// // logsumexp([1000, 1000, -1000]) = 1000 + ln 2, no overflow
/// let z = [1000.0f32, 1000.0, -1000.0];
/// let out = z_loss(&z, 1, 3, None, 1e-3).unwrap();
/// let lse = 1000.0f64 + 2f64.ln();
/// assert!(((out.loss as f64) - 1e-3 * lse * lse).abs() < 1e-6 * 1e3);
/// assert_eq!(out.valid_tokens, 1);
/// ```
pub fn z_loss<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&[bool]>,
    coeff: f32,
) -> Result<ZLossOutput> {
    let x = RouterLogits::new(logits, num_tokens, num_experts).padding_mask(padding_mask);
    validate_z_loss(x.lens(), coeff)?;
    let (sum, valid) = cpu::z_loss::z_loss_sums(logits, num_tokens, num_experts, padding_mask);
    let loss = if valid > 0 {
        coeff as f64 * sum / valid as f64
    } else {
        0.0
    };
    Ok(ZLossOutput {
        loss: loss as f32,
        valid_tokens: valid,
    })
}

/// Gradient of [`z_loss`] w.r.t. the logits `x.logits [num_tokens, num_experts]`
/// (with `x.padding_mask`), written into `grad_logits [num_tokens, num_experts]`
/// (overwritten): `grad_loss · coeff · 2 · lse_t · softmax(z_t) / T_valid`; padding
/// tokens get 0.
///
/// # Errors
/// As [`z_loss`], plus [`Error::Shape`] for `grad_logits` of the wrong length.
pub fn z_loss_backward_into<T: RouterFloat>(
    x: RouterLogits<'_, T>,
    coeff: f32,
    grad_loss: f32,
    grad_logits: &mut [T],
) -> Result<()> {
    validate_z_loss_backward(x.lens(), coeff, grad_logits.len())?;
    let valid = match x.padding_mask {
        None => x.num_tokens,
        Some(m) => m.iter().filter(|&&pad| !pad).count(),
    };
    let scale = if valid > 0 {
        (coeff as f64 * 2.0 * grad_loss as f64 / valid as f64) as f32
    } else {
        0.0
    };
    let (z, t, e) = (x.logits, x.num_tokens, x.num_experts);
    cpu::z_loss::z_loss_grad_into(z, t, e, x.padding_mask, scale, grad_logits);
    Ok(())
}

/// Allocating form of [`z_loss_backward_into`] over an [`ndarray`] view of the logits
/// `[num_tokens, num_experts]`; returns `grad_logits` of the same shape.
///
/// # Errors
/// As [`z_loss_backward_into`], plus [`Error::Layout`] for a non-contiguous `logits`.
pub fn z_loss_backward<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    padding_mask: Option<&[bool]>,
    coeff: f32,
    grad_loss: f32,
) -> Result<Array2<T>> {
    let (t, e) = logits.dim();
    let z = as_rows(OP, "logits", &logits)?;
    let x = RouterLogits::new(z, t, e).padding_mask(padding_mask);
    validate_z_loss(x.lens(), coeff)?;
    logits_grad(OP, (t, e), |out| {
        z_loss_backward_into(x, coeff, grad_loss, out)
    })
}
