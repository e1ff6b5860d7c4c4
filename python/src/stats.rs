//! Binding of `router_stats`.

use pyo3::prelude::*;

use crate::common::float_dispatch;
use crate::error::{internal_error, to_py_err};
use crate::tensor::{check_bufs, copy_out, mul, run, Buf, RawBuf};
use moe_router::{RouterFloat, RouterStatsConfig};

const OP: &str = "router_stats";

/// `(num_tokens, dropped, max_violation, mean_entropy, mean_lse, max_lse, nonfinite_logits)`.
type Scalars = (usize, u64, f32, f32, f32, f32, u64);

/// Router statistics in one pass over `logits` `[num_tokens, num_experts]` and the routing
/// `indices` `[num_tokens, topk]` i32 (and `slots`, same shape, -1 = dropped, if given).
/// Writes `selected_counts_out` `[num_experts]` i64 and, with `slots`,
/// `kept_counts_out` `[num_experts]` i64; returns the scalars (see `Scalars`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, indices, topk, slots, padding_mask, strict, selected_counts_out, kept_counts_out))]
pub(crate) fn router_stats(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    slots: Option<RawBuf>,
    padding_mask: Option<RawBuf>,
    strict: bool,
    selected_counts_out: RawBuf,
    kept_counts_out: Option<RawBuf>,
) -> PyResult<Scalars> {
    float_dispatch!(
        OP,
        "logits",
        dtype,
        stats_t(
            py,
            logits,
            num_tokens,
            num_experts,
            indices,
            topk,
            slots,
            padding_mask,
            strict,
            selected_counts_out,
            kept_counts_out
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn stats_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    slots: Option<RawBuf>,
    padding_mask: Option<RawBuf>,
    strict: bool,
    selected_counts_out: RawBuf,
    kept_counts_out: Option<RawBuf>,
) -> PyResult<Scalars> {
    let logits = Buf::<T>::input("logits", logits);
    let indices = Buf::<i32>::input("indices", indices);
    let slots = slots.map(|s| Buf::<i32>::input("slots", s));
    let mask = padding_mask.map(|m| Buf::<u8>::input("padding_mask", m));
    let selected = Buf::<i64>::output("selected_counts_out", selected_counts_out);
    let kept = kept_counts_out.map(|k| Buf::<i64>::output("kept_counts_out", k));
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let tk_shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    let e_shape = format!("[num_experts] = [{num_experts}]");
    logits.expect_len(
        OP,
        mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    indices.expect_len(OP, tk, &tk_shape)?;
    if let Some(s) = &slots {
        s.expect_len(OP, tk, &tk_shape)?;
    }
    if let Some(m) = &mask {
        m.expect_len(
            OP,
            num_tokens,
            format_args!("[num_tokens] = [{num_tokens}]"),
        )?;
    }
    selected.expect_len(OP, num_experts, &e_shape)?;
    if let Some(k) = &kept {
        k.expect_len(OP, num_experts, &e_shape)?;
    }
    let mut spans = vec![logits.span(), indices.span(), selected.span()];
    spans.extend(slots.as_ref().map(Buf::span));
    spans.extend(mask.as_ref().map(Buf::span));
    spans.extend(kept.as_ref().map(Buf::span));
    check_bufs(OP, &spans)?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs disjoint
    // from everything); `ops.py` passes contiguous CPU tensors of these dtypes with these
    // element counts, keeps them alive during the call and allocated the outputs fresh.
    let (logits, indices, slots, mask, selected, kept) = unsafe {
        (
            logits.as_slice(),
            indices.as_slice(),
            slots.as_ref().map(|s| s.as_slice()),
            mask.as_ref().map(|m| m.as_bools()),
            selected.as_mut_slice(),
            kept.as_ref().map(|k| k.as_mut_slice()),
        )
    };
    let cfg = RouterStatsConfig { strict };
    run(py, OP, || {
        let s = moe_router::router_stats::<T>(
            logits,
            num_tokens,
            num_experts,
            indices,
            topk,
            slots,
            mask.as_deref(),
            &cfg,
        )
        .map_err(to_py_err)?;
        copy_out(OP, "selected_counts_out", &s.selected_counts, selected)?;
        match (s.kept_counts.as_deref(), kept) {
            (Some(src), Some(dst)) => copy_out(OP, "kept_counts_out", src, dst)?,
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(internal_error(
                    OP,
                    "kept counts are returned exactly when slots are given",
                ))
            }
        }
        Ok((
            s.num_tokens,
            s.dropped,
            s.max_violation,
            s.mean_entropy,
            s.mean_lse,
            s.max_lse,
            s.nonfinite_logits,
        ))
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(router_stats, m)?)?;
    Ok(())
}
