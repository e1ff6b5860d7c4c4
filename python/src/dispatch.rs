//! Bindings of `dispatch_max_rows` and `dispatch_into`.

use pyo3::prelude::*;

use crate::error::{to_py_err, value_error};
use crate::tensor::{check_bufs, mul, run, Buf, RawBuf};
use moe_router::{DispatchBuffers, DispatchConfig, DispatchLayout, DropPolicy};

const OP: &str = "dispatch";

/// The dispatch config from the flat options the Python layer passes.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dispatch_config(
    num_experts: usize,
    capacity: Option<usize>,
    drop_policy: &str,
    layout: &str,
    align: usize,
    renormalize: bool,
    ep_size: usize,
    seed: u64,
    offset: u64,
) -> PyResult<DispatchConfig> {
    let drop_policy = match drop_policy {
        "position" => DropPolicy::Position,
        "choice_then_position" => DropPolicy::ChoiceThenPosition,
        "probs" => DropPolicy::Probs,
        "batch_prioritized" => DropPolicy::BatchPrioritized,
        "random" => DropPolicy::Random { seed, offset },
        _ => {
            return Err(value_error(
                OP,
                format_args!("invalid `drop_policy` = {drop_policy:?}: valid values are \"position\", \"choice_then_position\", \"probs\", \"batch_prioritized\", \"random\""),
            ))
        }
    };
    let layout = match layout {
        "pad_to_capacity" => DispatchLayout::PadToCapacity,
        "compact" => DispatchLayout::Compact,
        "dropless" => DispatchLayout::Dropless { align },
        _ => {
            return Err(value_error(
                OP,
                format_args!("invalid `layout` = {layout:?}: valid values are \"compact\", \"pad_to_capacity\", \"dropless\""),
            ))
        }
    };
    Ok(DispatchConfig {
        num_experts,
        capacity,
        drop_policy,
        layout,
        renormalize,
        ep_size,
    })
}

/// Upper bound on the number of rows of the dispatch buffer (`row_to_token` length) for
/// these sizes and options, known without looking at the indices.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (num_tokens, topk, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset))]
pub(crate) fn dispatch_max_rows(
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    capacity: Option<usize>,
    drop_policy: &str,
    layout: &str,
    align: usize,
    renormalize: bool,
    ep_size: usize,
    seed: u64,
    offset: u64,
) -> PyResult<usize> {
    let cfg = dispatch_config(
        num_experts,
        capacity,
        drop_policy,
        layout,
        align,
        renormalize,
        ep_size,
        seed,
        offset,
    )?;
    moe_router::dispatch_max_rows(num_tokens, topk, &cfg).map_err(to_py_err)
}

/// Capacity-factor dispatch of `indices` `[num_tokens, topk]` i32 (-1 = not routed) and
/// `weights` `[num_tokens, topk]` f32. Outputs (i32 unless said): `slot`, `row`
/// `[num_tokens, topk]`, `kept_weights` `[num_tokens, topk]` f32, `tokens_per_expert`
/// `[num_experts]`, `row_to_token` `[max_rows]` (tail -1), `expert_offsets`
/// `[num_experts + 1]`, `rows_per_rank` `[ep_size]`. Returns `(num_rows, dropped)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (indices, weights, num_tokens, topk, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset, slot, row, kept_weights, tokens_per_expert, row_to_token, expert_offsets, rows_per_rank))]
pub(crate) fn dispatch(
    py: Python<'_>,
    indices: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    capacity: Option<usize>,
    drop_policy: &str,
    layout: &str,
    align: usize,
    renormalize: bool,
    ep_size: usize,
    seed: u64,
    offset: u64,
    slot: RawBuf,
    row: RawBuf,
    kept_weights: RawBuf,
    tokens_per_expert: RawBuf,
    row_to_token: RawBuf,
    expert_offsets: RawBuf,
    rows_per_rank: RawBuf,
) -> PyResult<(usize, usize)> {
    let cfg = dispatch_config(
        num_experts,
        capacity,
        drop_policy,
        layout,
        align,
        renormalize,
        ep_size,
        seed,
        offset,
    )?;
    let max_rows = moe_router::dispatch_max_rows(num_tokens, topk, &cfg).map_err(to_py_err)?;
    let indices = Buf::<i32>::input("indices", indices);
    let weights = Buf::<f32>::input("weights", weights);
    let slot = Buf::<i32>::output("slot", slot);
    let row = Buf::<i32>::output("row", row);
    let kept_weights = Buf::<f32>::output("kept_weights", kept_weights);
    let tokens_per_expert = Buf::<i32>::output("tokens_per_expert", tokens_per_expert);
    let row_to_token = Buf::<i32>::output("row_to_token", row_to_token);
    let expert_offsets = Buf::<i32>::output("expert_offsets", expert_offsets);
    let rows_per_rank = Buf::<i32>::output("rows_per_rank", rows_per_rank);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let tk_shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    for b in [&indices, &slot, &row] {
        b.expect_len(OP, tk, &tk_shape)?;
    }
    weights.expect_len(OP, tk, &tk_shape)?;
    kept_weights.expect_len(OP, tk, &tk_shape)?;
    tokens_per_expert.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    row_to_token.expect_len(OP, max_rows, format_args!("[max_rows] = [{max_rows}]"))?;
    expert_offsets.expect_len(
        OP,
        num_experts + 1,
        format_args!("[num_experts + 1] = [{}]", num_experts + 1),
    )?;
    rows_per_rank.expect_len(OP, ep_size, format_args!("[ep_size] = [{ep_size}]"))?;
    check_bufs(
        OP,
        &[
            indices.span(),
            weights.span(),
            slot.span(),
            row.span(),
            kept_weights.span(),
            tokens_per_expert.span(),
            row_to_token.span(),
            expert_offsets.span(),
            rows_per_rank.span(),
        ],
    )?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs disjoint
    // from everything); `ops.py` passes contiguous CPU tensors of these dtypes with these
    // element counts, keeps them alive during the call and allocated the outputs fresh.
    let (indices, weights, bufs) = unsafe {
        (
            indices.as_slice(),
            weights.as_slice(),
            DispatchBuffers {
                slot: slot.as_mut_slice(),
                row: row.as_mut_slice(),
                kept_weights: kept_weights.as_mut_slice(),
                tokens_per_expert: tokens_per_expert.as_mut_slice(),
                row_to_token: row_to_token.as_mut_slice(),
                expert_offsets: expert_offsets.as_mut_slice(),
                rows_per_rank: rows_per_rank.as_mut_slice(),
            },
        )
    };
    let counts = run(py, OP, || {
        moe_router::dispatch_into(indices, weights, num_tokens, topk, &cfg, bufs).map_err(to_py_err)
    })?;
    Ok((counts.num_rows, counts.dropped))
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dispatch_max_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dispatch, m)?)?;
    Ok(())
}
