//! The public API: typed configs, one validator per op (the single source of errors for
//! every backend) and the CPU entry points (slice `*_into` forms and ndarray forms) that
//! run [`crate::cpu`]. The CUDA backend (`crate::cuda`, feature `cuda`) and the Python
//! bindings call the same validators before any launch.

use crate::error::{Error, Result};
use ndarray::{ArrayView1, ArrayView2};

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
