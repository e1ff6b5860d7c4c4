//! Bindings of `expert_choice_into` and `expert_choice_backward_into`.

use pyo3::prelude::*;

use crate::common::float_dispatch;
use crate::error::to_py_err;
use crate::tensor::{check_bufs, mul, run, Buf, RawBuf};
use moe_router::{ExpertChoiceBuffers, RouterFloat};

const OP: &str = "expert_choice";

/// Expert-choice routing: each expert takes its `capacity` best tokens by softmax score.
/// Outputs: `weights` `[num_tokens, num_experts]` f32 (0 where not chosen), `row`
/// `[num_tokens, num_experts]` i32 (-1 where not chosen), `row_to_token`
/// `[num_experts * capacity]` i32, `row_weights` `[num_experts * capacity]` f32,
/// `tokens_per_expert` `[num_experts]` i32, `expert_offsets` `[num_experts + 1]` i32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, capacity, weights, row, row_to_token, row_weights, tokens_per_expert, expert_offsets))]
pub(crate) fn expert_choice(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    weights: RawBuf,
    row: RawBuf,
    row_to_token: RawBuf,
    row_weights: RawBuf,
    tokens_per_expert: RawBuf,
    expert_offsets: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        OP,
        "logits",
        dtype,
        forward(
            py,
            logits,
            num_tokens,
            num_experts,
            capacity,
            weights,
            row,
            row_to_token,
            row_weights,
            tokens_per_expert,
            expert_offsets
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn forward<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    weights: RawBuf,
    row: RawBuf,
    row_to_token: RawBuf,
    row_weights: RawBuf,
    tokens_per_expert: RawBuf,
    expert_offsets: RawBuf,
) -> PyResult<()> {
    let logits = Buf::<T>::input("logits", logits);
    let weights = Buf::<f32>::output("weights", weights);
    let row = Buf::<i32>::output("row", row);
    let row_to_token = Buf::<i32>::output("row_to_token", row_to_token);
    let row_weights = Buf::<f32>::output("row_weights", row_weights);
    let tokens_per_expert = Buf::<i32>::output("tokens_per_expert", tokens_per_expert);
    let expert_offsets = Buf::<i32>::output("expert_offsets", expert_offsets);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let ec = mul(OP, "num_experts * capacity", num_experts, capacity)?;
    let te_shape = format!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]");
    let ec_shape = format!("[num_experts * capacity] = [{ec}]");
    logits.expect_len(OP, te, &te_shape)?;
    weights.expect_len(OP, te, &te_shape)?;
    row.expect_len(OP, te, &te_shape)?;
    row_to_token.expect_len(OP, ec, &ec_shape)?;
    row_weights.expect_len(OP, ec, &ec_shape)?;
    tokens_per_expert.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    expert_offsets.expect_len(
        OP,
        num_experts + 1,
        format_args!("[num_experts + 1] = [{}]", num_experts + 1),
    )?;
    check_bufs(
        OP,
        &[
            logits.span(),
            weights.span(),
            row.span(),
            row_to_token.span(),
            row_weights.span(),
            tokens_per_expert.span(),
            expert_offsets.span(),
        ],
    )?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs disjoint
    // from everything); `ops.py` passes contiguous CPU tensors of these dtypes with these
    // element counts, keeps them alive during the call and allocated the outputs fresh.
    let (logits, bufs) = unsafe {
        (
            logits.as_slice(),
            ExpertChoiceBuffers {
                weights: weights.as_mut_slice(),
                row: row.as_mut_slice(),
                row_to_token: row_to_token.as_mut_slice(),
                row_weights: row_weights.as_mut_slice(),
                tokens_per_expert: tokens_per_expert.as_mut_slice(),
                expert_offsets: expert_offsets.as_mut_slice(),
            },
        )
    };
    run(py, OP, || {
        moe_router::expert_choice_into::<T>(logits, num_tokens, num_experts, capacity, bufs)
            .map_err(to_py_err)
    })?;
    Ok(())
}

/// Backward of expert choice: `grad_weights` `[num_tokens, num_experts]` f32 →
/// `grad_logits` `[num_tokens, num_experts]` (dtype of `logits`), through the softmax.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, row, grad_weights, grad_logits))]
pub(crate) fn expert_choice_backward(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    row: RawBuf,
    grad_weights: RawBuf,
    grad_logits: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        OP,
        "logits",
        dtype,
        backward(
            py,
            logits,
            num_tokens,
            num_experts,
            row,
            grad_weights,
            grad_logits
        )
    )
}

fn backward<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    row: RawBuf,
    grad_weights: RawBuf,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "expert_choice_backward";
    let logits = Buf::<T>::input("logits", logits);
    let row = Buf::<i32>::input("row", row);
    let grad_weights = Buf::<f32>::input("grad_weights", grad_weights);
    let grad_logits = Buf::<T>::output("grad_logits", grad_logits);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let te_shape = format!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]");
    for b in [&logits, &grad_logits] {
        b.expect_len(OP, te, &te_shape)?;
    }
    row.expect_len(OP, te, &te_shape)?;
    grad_weights.expect_len(OP, te, &te_shape)?;
    check_bufs(
        OP,
        &[
            logits.span(),
            row.span(),
            grad_weights.span(),
            grad_logits.span(),
        ],
    )?;
    // SAFETY: as in `forward`.
    let (logits, row, grad_weights, grad_logits) = unsafe {
        (
            logits.as_slice(),
            row.as_slice(),
            grad_weights.as_slice(),
            grad_logits.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::expert_choice_backward_into::<T>(
            logits,
            num_tokens,
            num_experts,
            row,
            grad_weights,
            grad_logits,
        )
        .map_err(to_py_err)
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expert_choice, m)?)?;
    m.add_function(wrap_pyfunction!(expert_choice_backward, m)?)?;
    Ok(())
}
