//! Bindings of the auxiliary losses: `aux_loss` (Switch/GShard), `seq_aux_loss`
//! (DeepSeek sequence-level), `z_loss` (ST-MoE), and their backwards.

use pyo3::prelude::*;

use crate::common::{float_dispatch, score_function};
use crate::error::to_py_err;
use crate::tensor::{check_bufs, copy_out, mul, run, Buf, RawBuf, Span};
use moe_router::{AuxLossConfig, RouterFloat};

pub(crate) fn aux_config(
    op: &str,
    topk: usize,
    score: &str,
    coeff: f32,
) -> PyResult<AuxLossConfig> {
    Ok(AuxLossConfig {
        topk,
        score_function: score_function(op, score)?,
        coeff,
    })
}

/// `logits` and the optional `padding_mask` of a loss call, checked and registered.
fn logits_and_mask<T>(
    op: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
) -> PyResult<(Buf<T>, Option<Buf<u8>>)> {
    let logits = Buf::<T>::input("logits", logits);
    logits.expect_len(
        op,
        mul(op, "num_tokens * num_experts", num_tokens, num_experts)?,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    let mask = padding_mask.map(|m| Buf::<u8>::input("padding_mask", m));
    if let Some(m) = &mask {
        m.expect_len(
            op,
            num_tokens,
            format_args!("[num_tokens] = [{num_tokens}]"),
        )?;
    }
    Ok((logits, mask))
}

fn spans(first: &[Span], mask: &Option<Buf<u8>>) -> Vec<Span> {
    let mut v = first.to_vec();
    v.extend(mask.as_ref().map(Buf::span));
    v
}

/// Switch/GShard load-balance loss. `counts` `[num_experts]` i64 (or None: the plain
/// top-k counts of these logits), `total_tokens` (or None: the valid tokens here). Writes
/// the counts used to `counts_out` `[num_experts]` i64; returns `(loss, total_tokens)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, padding_mask, counts, total_tokens, topk, score_function, coeff, counts_out))]
pub(crate) fn aux_loss(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    counts: Option<RawBuf>,
    total_tokens: Option<usize>,
    topk: usize,
    score_function: &str,
    coeff: f32,
    counts_out: RawBuf,
) -> PyResult<(f32, usize)> {
    let cfg = aux_config("aux_loss", topk, score_function, coeff)?;
    float_dispatch!(
        "aux_loss",
        "logits",
        dtype,
        aux_loss_t(
            py,
            logits,
            num_tokens,
            num_experts,
            padding_mask,
            counts,
            total_tokens,
            &cfg,
            counts_out
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn aux_loss_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    counts: Option<RawBuf>,
    total_tokens: Option<usize>,
    cfg: &AuxLossConfig,
    counts_out: RawBuf,
) -> PyResult<(f32, usize)> {
    const OP: &str = "aux_loss";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    let counts = counts.map(|c| Buf::<i64>::input("counts", c));
    let counts_out = Buf::<i64>::output("counts_out", counts_out);
    if let Some(c) = &counts {
        c.expect_len(
            OP,
            num_experts,
            format_args!("[num_experts] = [{num_experts}]"),
        )?;
    }
    counts_out.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    let mut all = spans(&[logits.span(), counts_out.span()], &mask);
    all.extend(counts.as_ref().map(Buf::span));
    check_bufs(OP, &all)?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, the output
    // disjoint from everything); `ops.py` passes contiguous CPU tensors of these dtypes
    // with these element counts, keeps them alive during the call and allocated the output
    // fresh.
    let (logits, mask, counts, counts_out) = unsafe {
        (
            logits.as_slice(),
            mask.as_ref().map(|m| m.as_bools()),
            counts.as_ref().map(|c| c.as_slice()),
            counts_out.as_mut_slice(),
        )
    };
    run(py, OP, || {
        let out = moe_router::aux_loss::<T>(
            logits,
            num_tokens,
            num_experts,
            mask.as_deref(),
            counts,
            total_tokens,
            cfg,
        )
        .map_err(to_py_err)?;
        copy_out(OP, "counts_out", &out.counts, counts_out)?;
        Ok((out.loss, out.total_tokens))
    })
}

/// Backward of [`aux_loss`]: `grad_logits` `[num_tokens, num_experts]` (dtype of
/// `logits`) for a scalar `grad_loss`, with the `counts` and `total_tokens` of the forward.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, padding_mask, counts, total_tokens, topk, score_function, coeff, grad_loss, grad_logits))]
pub(crate) fn aux_loss_backward(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    counts: RawBuf,
    total_tokens: usize,
    topk: usize,
    score_function: &str,
    coeff: f32,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    let cfg = aux_config("aux_loss_backward", topk, score_function, coeff)?;
    float_dispatch!(
        "aux_loss_backward",
        "logits",
        dtype,
        aux_loss_backward_t(
            py,
            logits,
            num_tokens,
            num_experts,
            padding_mask,
            counts,
            total_tokens,
            &cfg,
            grad_loss,
            grad_logits
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn aux_loss_backward_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    counts: RawBuf,
    total_tokens: usize,
    cfg: &AuxLossConfig,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "aux_loss_backward";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    let counts = Buf::<i64>::input("counts", counts);
    let grad_logits = Buf::<T>::output("grad_logits", grad_logits);
    counts.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    grad_logits.expect_len(
        OP,
        logits.len(),
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    check_bufs(
        OP,
        &spans(&[logits.span(), counts.span(), grad_logits.span()], &mask),
    )?;
    // SAFETY: as in `aux_loss_t`.
    let (logits, mask, counts, grad_logits) = unsafe {
        (
            logits.as_slice(),
            mask.as_ref().map(|m| m.as_bools()),
            counts.as_slice(),
            grad_logits.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::aux_loss_backward_into::<T>(
            logits,
            num_tokens,
            num_experts,
            mask.as_deref(),
            counts,
            total_tokens,
            cfg,
            grad_loss,
            grad_logits,
        )
        .map_err(to_py_err)
    })
}

/// Sequence-level aux loss over `num_tokens / seq_len` sequences. Writes the per-sequence
/// counts to `counts_out` `[num_sequences, num_experts]` i64; returns the loss.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, seq_len, padding_mask, topk, score_function, coeff, counts_out))]
pub(crate) fn seq_aux_loss(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<RawBuf>,
    topk: usize,
    score_function: &str,
    coeff: f32,
    counts_out: RawBuf,
) -> PyResult<f32> {
    let cfg = aux_config("seq_aux_loss", topk, score_function, coeff)?;
    float_dispatch!(
        "seq_aux_loss",
        "logits",
        dtype,
        seq_aux_loss_t(
            py,
            logits,
            num_tokens,
            num_experts,
            seq_len,
            padding_mask,
            &cfg,
            counts_out
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn seq_aux_loss_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<RawBuf>,
    cfg: &AuxLossConfig,
    counts_out: RawBuf,
) -> PyResult<f32> {
    const OP: &str = "seq_aux_loss";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    let counts_out = Buf::<i64>::output("counts_out", counts_out);
    check_bufs(OP, &spans(&[logits.span(), counts_out.span()], &mask))?;
    // SAFETY: as in `aux_loss_t`; `counts_out`'s length is checked against the core's
    // result by `copy_out` before anything is written.
    let (logits, mask, counts_out) = unsafe {
        (
            logits.as_slice(),
            mask.as_ref().map(|m| m.as_bools()),
            counts_out.as_mut_slice(),
        )
    };
    run(py, OP, || {
        let out = moe_router::seq_aux_loss::<T>(
            logits,
            num_tokens,
            num_experts,
            seq_len,
            mask.as_deref(),
            None,
            cfg,
        )
        .map_err(to_py_err)?;
        copy_out(OP, "counts_out", &out.counts, counts_out)?;
        Ok(out.loss)
    })
}

/// Backward of [`seq_aux_loss`], with the forward's per-sequence `counts`
/// `[num_sequences, num_experts]` i64.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, seq_len, padding_mask, counts, topk, score_function, coeff, grad_loss, grad_logits))]
pub(crate) fn seq_aux_loss_backward(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<RawBuf>,
    counts: RawBuf,
    topk: usize,
    score_function: &str,
    coeff: f32,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    let cfg = aux_config("seq_aux_loss_backward", topk, score_function, coeff)?;
    float_dispatch!(
        "seq_aux_loss_backward",
        "logits",
        dtype,
        seq_aux_loss_backward_t(
            py,
            logits,
            num_tokens,
            num_experts,
            seq_len,
            padding_mask,
            counts,
            &cfg,
            grad_loss,
            grad_logits
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn seq_aux_loss_backward_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<RawBuf>,
    counts: RawBuf,
    cfg: &AuxLossConfig,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "seq_aux_loss_backward";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    let counts = Buf::<i64>::input("counts", counts);
    let grad_logits = Buf::<T>::output("grad_logits", grad_logits);
    grad_logits.expect_len(
        OP,
        logits.len(),
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    check_bufs(
        OP,
        &spans(&[logits.span(), counts.span(), grad_logits.span()], &mask),
    )?;
    // SAFETY: as in `aux_loss_t`; the core checks `counts`' length.
    let (logits, mask, counts, grad_logits) = unsafe {
        (
            logits.as_slice(),
            mask.as_ref().map(|m| m.as_bools()),
            counts.as_slice(),
            grad_logits.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::seq_aux_loss_backward_into::<T>(
            logits,
            num_tokens,
            num_experts,
            seq_len,
            mask.as_deref(),
            counts,
            cfg,
            grad_loss,
            grad_logits,
        )
        .map_err(to_py_err)
    })
}

/// Router z-loss `coeff · mean_t lse_t²` over valid tokens; returns `(loss, valid_tokens)`.
#[pyfunction]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, padding_mask, coeff))]
pub(crate) fn z_loss(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    coeff: f32,
) -> PyResult<(f32, usize)> {
    float_dispatch!(
        "z_loss",
        "logits",
        dtype,
        z_loss_t(py, logits, num_tokens, num_experts, padding_mask, coeff)
    )
}

fn z_loss_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    coeff: f32,
) -> PyResult<(f32, usize)> {
    const OP: &str = "z_loss";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    check_bufs(OP, &spans(&[logits.span()], &mask))?;
    // SAFETY: as in `aux_loss_t` (inputs only).
    let (logits, mask) = unsafe { (logits.as_slice(), mask.as_ref().map(|m| m.as_bools())) };
    run(py, OP, || {
        let out = moe_router::z_loss::<T>(logits, num_tokens, num_experts, mask.as_deref(), coeff)
            .map_err(to_py_err)?;
        Ok((out.loss, out.valid_tokens))
    })
}

/// Backward of [`z_loss`]: `grad_logits` `[num_tokens, num_experts]` for a scalar
/// `grad_loss`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, padding_mask, coeff, grad_loss, grad_logits))]
pub(crate) fn z_loss_backward(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    coeff: f32,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        "z_loss_backward",
        "logits",
        dtype,
        z_loss_backward_t(
            py,
            logits,
            num_tokens,
            num_experts,
            padding_mask,
            coeff,
            grad_loss,
            grad_logits
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn z_loss_backward_t<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<RawBuf>,
    coeff: f32,
    grad_loss: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "z_loss_backward";
    let (logits, mask) = logits_and_mask::<T>(OP, logits, num_tokens, num_experts, padding_mask)?;
    let grad_logits = Buf::<T>::output("grad_logits", grad_logits);
    grad_logits.expect_len(
        OP,
        logits.len(),
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    check_bufs(OP, &spans(&[logits.span(), grad_logits.span()], &mask))?;
    // SAFETY: as in `aux_loss_t`.
    let (logits, mask, grad_logits) = unsafe {
        (
            logits.as_slice(),
            mask.as_ref().map(|m| m.as_bools()),
            grad_logits.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::z_loss_backward_into::<T>(
            logits,
            num_tokens,
            num_experts,
            mask.as_deref(),
            coeff,
            grad_loss,
            grad_logits,
        )
        .map_err(to_py_err)
    })
}

/// Register the aux-loss functions.
pub(crate) fn register_aux(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(aux_loss, m)?)?;
    m.add_function(wrap_pyfunction!(aux_loss_backward, m)?)?;
    m.add_function(wrap_pyfunction!(seq_aux_loss, m)?)?;
    m.add_function(wrap_pyfunction!(seq_aux_loss_backward, m)?)?;
    Ok(())
}

/// Register the z-loss functions.
pub(crate) fn register_z(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(z_loss, m)?)?;
    m.add_function(wrap_pyfunction!(z_loss_backward, m)?)?;
    Ok(())
}
