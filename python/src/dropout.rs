//! Bindings of expert dropout: `expert_mask_into`, `assignment_dropout_into`,
//! `assignment_dropout_backward_into`.

use pyo3::prelude::*;

use crate::error::to_py_err;
use crate::tensor::{check_bufs, mul, run, Buf, RawBuf};
use moe_router::{AssignmentDropoutBuffers, DropoutConfig};

/// The expert-masking mask `masked` `[num_tokens, num_experts]` (bool, `true` = masked),
/// deterministic from `(seed, offset)`; never fewer than `topk` candidates per token.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (num_tokens, num_experts, topk, rate, seed, offset, masked))]
pub(crate) fn expert_mask(
    py: Python<'_>,
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    rate: f32,
    seed: u64,
    offset: u64,
    masked: RawBuf,
) -> PyResult<()> {
    const OP: &str = "expert_mask";
    let cfg = DropoutConfig::new(rate, seed, offset);
    let masked = Buf::<u8>::output("masked", masked);
    masked.expect_len(
        OP,
        mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    check_bufs(OP, &[masked.span()])?;
    // SAFETY: `check_bufs` accepted the buffer; `ops.py` passes a fresh contiguous CPU
    // torch.bool tensor with this element count and keeps it alive during the call.
    let masked = unsafe { masked.as_mut_bools() };
    run(py, OP, || {
        moe_router::expert_mask_into(num_tokens, num_experts, topk, &cfg, masked).map_err(to_py_err)
    })
}

/// Assignment dropout (NLLB expert output masking): each of the `[num_tokens, topk]`
/// assignments is dropped with probability `rate`. Outputs `out_indices` (i32, -1 where
/// dropped), `out_weights` (f32, 0 where dropped; with `renormalize`, a token's weight
/// sum is preserved) and `keep` (bool). Returns the number of routed assignments dropped.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (indices, weights, num_tokens, topk, num_experts, rate, seed, offset, renormalize, out_indices, out_weights, keep))]
pub(crate) fn assignment_dropout(
    py: Python<'_>,
    indices: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    rate: f32,
    seed: u64,
    offset: u64,
    renormalize: bool,
    out_indices: RawBuf,
    out_weights: RawBuf,
    keep: RawBuf,
) -> PyResult<usize> {
    const OP: &str = "assignment_dropout";
    let cfg = DropoutConfig::new(rate, seed, offset);
    let indices = Buf::<i32>::input("indices", indices);
    let weights = Buf::<f32>::input("weights", weights);
    let out_indices = Buf::<i32>::output("out_indices", out_indices);
    let out_weights = Buf::<f32>::output("out_weights", out_weights);
    let keep = Buf::<u8>::output("keep", keep);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    indices.expect_len(OP, tk, &shape)?;
    weights.expect_len(OP, tk, &shape)?;
    out_indices.expect_len(OP, tk, &shape)?;
    out_weights.expect_len(OP, tk, &shape)?;
    keep.expect_len(OP, tk, &shape)?;
    check_bufs(
        OP,
        &[
            indices.span(),
            weights.span(),
            out_indices.span(),
            out_weights.span(),
            keep.span(),
        ],
    )?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs disjoint
    // from everything); `ops.py` passes contiguous CPU tensors of these dtypes with these
    // element counts, keeps them alive during the call and allocated the outputs fresh.
    let (indices, weights, bufs) = unsafe {
        (
            indices.as_slice(),
            weights.as_slice(),
            AssignmentDropoutBuffers {
                indices: out_indices.as_mut_slice(),
                weights: out_weights.as_mut_slice(),
                keep: keep.as_mut_bools(),
            },
        )
    };
    run(py, OP, || {
        moe_router::assignment_dropout_into(
            indices,
            weights,
            num_tokens,
            topk,
            num_experts,
            &cfg,
            renormalize,
            bufs,
        )
        .map_err(to_py_err)
    })
}

/// Backward of assignment dropout: from the forward's input `indices` (i32, -1 = not
/// routed) and `weights` (f32) and its `keep` mask, all `[num_tokens, topk]`, and
/// `grad_out` `[num_tokens, topk]` f32 (gradient of the output weights) →
/// `grad_weights` `[num_tokens, topk]` f32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (indices, weights, keep, num_tokens, topk, renormalize, grad_out, grad_weights))]
pub(crate) fn assignment_dropout_backward(
    py: Python<'_>,
    indices: RawBuf,
    weights: RawBuf,
    keep: RawBuf,
    num_tokens: usize,
    topk: usize,
    renormalize: bool,
    grad_out: RawBuf,
    grad_weights: RawBuf,
) -> PyResult<()> {
    const OP: &str = "assignment_dropout_backward";
    let indices = Buf::<i32>::input("indices", indices);
    let weights = Buf::<f32>::input("weights", weights);
    let keep = Buf::<u8>::input("keep", keep);
    let grad_out = Buf::<f32>::input("grad_out", grad_out);
    let grad_weights = Buf::<f32>::output("grad_weights", grad_weights);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    indices.expect_len(OP, tk, &shape)?;
    weights.expect_len(OP, tk, &shape)?;
    keep.expect_len(OP, tk, &shape)?;
    grad_out.expect_len(OP, tk, &shape)?;
    grad_weights.expect_len(OP, tk, &shape)?;
    check_bufs(
        OP,
        &[
            indices.span(),
            weights.span(),
            keep.span(),
            grad_out.span(),
            grad_weights.span(),
        ],
    )?;
    // SAFETY: as in `assignment_dropout`.
    let (indices, weights, keep, grad_out, grad_weights) = unsafe {
        (
            indices.as_slice(),
            weights.as_slice(),
            keep.as_bools(),
            grad_out.as_slice(),
            grad_weights.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::assignment_dropout_backward_into(
            indices,
            weights,
            &keep,
            num_tokens,
            topk,
            renormalize,
            grad_out,
            grad_weights,
        )
        .map_err(to_py_err)
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expert_mask, m)?)?;
    m.add_function(wrap_pyfunction!(assignment_dropout, m)?)?;
    m.add_function(wrap_pyfunction!(assignment_dropout_backward, m)?)?;
    Ok(())
}
