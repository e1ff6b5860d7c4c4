//! The public API: typed configs, validation (the single source of errors for every
//! backend) and dispatch to a backend ([`crate::cpu`]; with the `cuda` feature, the
//! kernels of `crate::cuda`).
//!
//! Every shape and option rule of an op is written once, in the op's validator here
//! (`validate_*`, crate-private): it takes the sizes, the options and the element
//! count of every buffer, so the CPU `*_into` forms (slice lengths), the CUDA safe
//! wrappers (device views' lengths) and the CUDA raw entries (the lengths of their
//! `DevBuf`s) all run the same checks. What only the host can check, the values of
//! host-resident inputs (index ranges, finite biases, non-negative counts), is
//! checked on the CPU path after the validator.

use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use ndarray::{Array2, ArrayView1, ArrayView2};

pub mod aux_loss;
pub mod bias_update;
pub mod capacity;
pub mod dispatch;
pub mod dropout;
pub mod expert_choice;
pub mod permute;
pub mod router_stats;
pub mod topk_gating;
pub mod z_loss;

pub use aux_loss::*;
pub use bias_update::*;
pub use capacity::*;
pub use dispatch::*;
pub use dropout::*;
pub use expert_choice::*;
pub use permute::*;
pub use router_stats::*;
pub use topk_gating::*;
pub use z_loss::*;

/// Largest row / element index the `i32` index outputs can hold.
pub const MAX_I32_INDEX: usize = i32::MAX as usize;

/// Check that a flat slice has `expected` elements; `shape` describes the expected
/// shape for the message (for example `"[num_tokens, topk] = [4, 2]"`).
pub(crate) fn check_len(
    op: &'static str,
    arg: &'static str,
    got: usize,
    expected: usize,
    shape: impl std::fmt::Display,
) -> Result<()> {
    if got != expected {
        return Err(Error::shape(
            op,
            arg,
            format!("{shape} ({expected} elements)"),
            format!("{got} elements"),
        ));
    }
    Ok(())
}

/// `logits [num_tokens, num_experts]`: `got` must be `num_tokens * num_experts`
/// elements (a product beyond `usize` matches no buffer). `arg` names the buffer
/// (`"logits"`, `"grad_logits"`).
pub(crate) fn check_logits(
    op: &'static str,
    arg: &'static str,
    got: usize,
    num_tokens: usize,
    num_experts: usize,
) -> Result<()> {
    let shape = format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]");
    match num_tokens.checked_mul(num_experts) {
        Some(n) => check_len(op, arg, got, n, shape),
        None => Err(Error::shape(
            op,
            arg,
            format!("{shape} (more elements than usize can count)"),
            format!("{got} elements"),
        )),
    }
}

/// An optional `padding_mask [num_tokens]` of `len` elements.
pub(crate) fn check_mask(op: &'static str, len: Option<usize>, num_tokens: usize) -> Result<()> {
    match len {
        Some(len) => check_len(
            op,
            "padding_mask",
            len,
            num_tokens,
            format_args!("[num_tokens] = [{num_tokens}]"),
        ),
        None => Ok(()),
    }
}

/// Router logits `[num_tokens, num_experts]` (row-major) with the tokens' optional
/// `padding_mask [num_tokens]` (`true` = padding): the input of [`router_stats()`] and
/// of the loss backward passes ([`aux_loss_backward_into`],
/// [`seq_aux_loss_backward_into`], [`z_loss_backward_into`]).
///
/// ```
/// use moe_router::RouterLogits;
///
/// let z = [0.0f32; 2 * 4];
/// let x = RouterLogits::new(&z, 2, 4).padding_mask(Some(&[false, true]));
/// assert_eq!((x.num_tokens, x.num_experts), (2, 4));
/// assert!(x.padding_mask.is_some());
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RouterLogits<'a, T> {
    /// `[num_tokens, num_experts]`, row-major.
    pub logits: &'a [T],
    /// Tokens (rows).
    pub num_tokens: usize,
    /// Experts (columns).
    pub num_experts: usize,
    /// `[num_tokens]`: `true` = padding, excluded; `None`: every token is valid.
    pub padding_mask: Option<&'a [bool]>,
}

impl<'a, T> RouterLogits<'a, T> {
    /// `logits [num_tokens, num_experts]` without a padding mask.
    pub fn new(logits: &'a [T], num_tokens: usize, num_experts: usize) -> Self {
        RouterLogits {
            logits,
            num_tokens,
            num_experts,
            padding_mask: None,
        }
    }

    /// Set (or, with `None`, clear) the padding mask.
    pub fn padding_mask(mut self, padding_mask: Option<&'a [bool]>) -> Self {
        self.padding_mask = padding_mask;
        self
    }

    /// The element counts the validators check.
    pub(crate) fn lens(&self) -> LogitsLens {
        LogitsLens {
            num_tokens: self.num_tokens,
            num_experts: self.num_experts,
            logits: self.logits.len(),
            padding_mask: self.padding_mask.map(<[bool]>::len),
        }
    }
}

/// The sizes and element counts of a router-logits input (host slices, device views
/// or raw device buffers alike): what the validators of the ops that take one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LogitsLens {
    pub(crate) num_tokens: usize,
    pub(crate) num_experts: usize,
    /// Elements of `logits`.
    pub(crate) logits: usize,
    /// Elements of the padding mask, if one is given.
    pub(crate) padding_mask: Option<usize>,
}

impl LogitsLens {
    /// `logits` holds `[num_tokens, num_experts]`, the mask (if any) `[num_tokens]`.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        check_logits(op, "logits", self.logits, self.num_tokens, self.num_experts)?;
        check_mask(op, self.padding_mask, self.num_tokens)
    }
}

/// `num_experts >= 1` and `1 <= topk <= num_experts`.
pub(crate) fn check_topk(op: &'static str, num_experts: usize, topk: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::invalid(
            op,
            "num_experts",
            0,
            "num_experts must be at least 1",
        ));
    }
    if num_experts > MAX_I32_INDEX {
        // Expert indices are i32; beyond this the per-token sizes also overflow.
        return Err(Error::invalid(
            op,
            "num_experts",
            num_experts,
            format!("num_experts must be at most {MAX_I32_INDEX} (expert indices are i32)"),
        ));
    }
    if topk == 0 || topk > num_experts {
        return Err(Error::invalid(
            op,
            "topk",
            topk,
            format!("topk must be in [1, num_experts] = [1, {num_experts}]"),
        ));
    }
    Ok(())
}

/// Declares an op's lens struct: one `usize` element count per named buffer, what the
/// op's validator checks whatever holds the buffers (host slices, device views, raw
/// device buffers). Built with [`lens_of`].
macro_rules! lens_struct {
    ($(#[$m:meta])* $name:ident: $($field:ident)*) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub(crate) struct $name {
            $(pub(crate) $field: usize,)*
        }
    };
}
pub(crate) use lens_struct;

/// `Lens { field: buffer.len(), .. }` from `field: buffer` pairs and, after `;`, the
/// same-named buffers of a struct (`out => field ..`): the element counts of an op's
/// buffers, from host slices, device views and raw device buffers alike, for the op's
/// validator. The ops' own `*_lens!` macros name the buffers once for every backend.
macro_rules! lens_of {
    ($($lens:ident)::+ { $($f:ident: $e:expr),* $(,)? } $(; $out:expr => $($g:ident)*)?) => {
        $($lens)::+ { $($f: $e.len(),)* $($($g: $out.$g.len(),)*)? }
    };
}
pub(crate) use lens_of;

/// `a * b`, or [`Error::Overflow`] if it exceeds `i32::MAX` (row indices are `i32`).
pub(crate) fn checked_i32_product(
    op: &'static str,
    what: &'static str,
    a: usize,
    b: usize,
) -> Result<usize> {
    let p = (a as u128) * (b as u128);
    if p > MAX_I32_INDEX as u128 {
        return Err(Error::Overflow {
            op,
            what,
            value: p,
            max: i32::MAX as i64,
        });
    }
    Ok(p as usize)
}

/// The contiguous row-major data of a 2-D view, or [`Error::Layout`].
pub(crate) fn as_rows<'a, T>(
    op: &'static str,
    arg: &'static str,
    v: &ArrayView2<'a, T>,
) -> Result<&'a [T]> {
    v.to_slice().ok_or(Error::Layout { op, arg })
}

/// The contiguous data of a 1-D view, or [`Error::Layout`].
pub(crate) fn as_vec<'a, T>(
    op: &'static str,
    arg: &'static str,
    v: &ArrayView1<'a, T>,
) -> Result<&'a [T]> {
    v.to_slice().ok_or(Error::Layout { op, arg })
}

/// `grad_logits [t, e]` in the logits' dtype, zeroed, then filled by `fill` (a loss
/// backward's `*_into` form): the allocating loss backwards.
pub(crate) fn logits_grad<T: RouterFloat>(
    op: &'static str,
    (t, e): (usize, usize),
    fill: impl FnOnce(&mut [T]) -> Result<()>,
) -> Result<Array2<T>> {
    let mut grad = Array2::from_elem((t, e), T::from_f32(0.0));
    let out = grad.as_slice_mut().ok_or(Error::Layout {
        op,
        arg: "grad_logits",
    })?;
    fill(out)?;
    Ok(grad)
}

/// `Err` unless `x` is finite.
pub(crate) fn check_finite(op: &'static str, arg: &'static str, x: f64, valid: &str) -> Result<()> {
    if !x.is_finite() {
        return Err(Error::invalid(op, arg, x, valid));
    }
    Ok(())
}

/// Validate `indices [num_tokens, k]`: each entry in `[0, num_experts)` (or `-1`
/// where `allow_unrouted`), no expert twice within a token. Allocation-free for
/// `num_experts <= 4096` per token (bitset on the stack), otherwise one scratch.
pub(crate) fn check_indices(
    op: &'static str,
    arg: &'static str,
    indices: &[i32],
    num_tokens: usize,
    k: usize,
    num_experts: usize,
    allow_unrouted: bool,
) -> Result<()> {
    check_len(
        op,
        arg,
        indices.len(),
        num_tokens * k,
        format_args!("[num_tokens, topk] = [{num_tokens}, {k}]"),
    )?;
    for t in 0..num_tokens {
        let row = &indices[t * k..(t + 1) * k];
        for (j, &e) in row.iter().enumerate() {
            if e == -1 && allow_unrouted {
                continue;
            }
            if e < 0 || e as usize >= num_experts {
                let valid = if allow_unrouted {
                    format!("expert indices must be in [0, {num_experts}) or -1 (not routed)")
                } else {
                    format!("expert indices must be in [0, {num_experts})")
                };
                return Err(Error::invalid(
                    op,
                    arg,
                    format_args!("{e} at token {t}, choice {j}"),
                    valid,
                ));
            }
            if row[..j].contains(&e) {
                return Err(Error::invalid(
                    op,
                    arg,
                    format_args!("expert {e} repeated at token {t} (choice {j})"),
                    "a token's expert indices must be distinct",
                ));
            }
        }
    }
    Ok(())
}
