//! Bindings of `permute_into`, `permute_backward_into`, `unpermute_into`,
//! `unpermute_backward_into`.

use pyo3::prelude::*;

use crate::common::float_dispatch;
use crate::error::to_py_err;
use crate::tensor::{check_bufs, mul, run, Buf, RawBuf};
use moe_router::RouterFloat;

/// `out[r] = x[row_to_token[r]]` (0 where `row_to_token[r] == -1`): `x` `[num_tokens,
/// hidden]`, `row_to_token` `[num_rows]` i32, `out` `[num_rows, hidden]` (dtype of `x`).
#[pyfunction]
#[pyo3(signature = (dtype, x, num_tokens, hidden, row_to_token, out))]
pub(crate) fn permute(
    py: Python<'_>,
    dtype: &str,
    x: RawBuf,
    num_tokens: usize,
    hidden: usize,
    row_to_token: RawBuf,
    out: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        "permute",
        "x",
        dtype,
        permute_t(py, x, num_tokens, hidden, row_to_token, out)
    )
}

fn permute_t<T: RouterFloat>(
    py: Python<'_>,
    x: RawBuf,
    num_tokens: usize,
    hidden: usize,
    row_to_token: RawBuf,
    out: RawBuf,
) -> PyResult<()> {
    const OP: &str = "permute";
    let x = Buf::<T>::input("x", x);
    let row_to_token = Buf::<i32>::input("row_to_token", row_to_token);
    let out = Buf::<T>::output("out", out);
    let num_rows = row_to_token.len();
    x.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        format_args!("[num_tokens, hidden] = [{num_tokens}, {hidden}]"),
    )?;
    out.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        format_args!("[num_rows, hidden] = [{num_rows}, {hidden}]"),
    )?;
    check_bufs(OP, &[x.span(), row_to_token.span(), out.span()])?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs disjoint
    // from everything); `ops.py` passes contiguous CPU tensors of these dtypes with these
    // element counts, keeps them alive during the call and allocated the output fresh.
    let (x, row_to_token, out) =
        unsafe { (x.as_slice(), row_to_token.as_slice(), out.as_mut_slice()) };
    run(py, OP, || {
        moe_router::permute_into::<T>(x, num_tokens, hidden, row_to_token, out).map_err(to_py_err)
    })
}

/// Backward of permute: `grad_x[t] = Σ_j grad_buf[row[t, j]]` over `row[t, j] >= 0`.
/// `grad_buf` `[num_rows, hidden]`, `row` `[num_tokens, topk]` i32, `grad_x`
/// `[num_tokens, hidden]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, grad_buf, num_rows, hidden, row, num_tokens, topk, grad_x))]
pub(crate) fn permute_backward(
    py: Python<'_>,
    dtype: &str,
    grad_buf: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    num_tokens: usize,
    topk: usize,
    grad_x: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        "permute_backward",
        "grad_buf",
        dtype,
        permute_backward_t(py, grad_buf, num_rows, hidden, row, num_tokens, topk, grad_x)
    )
}

#[allow(clippy::too_many_arguments)]
fn permute_backward_t<T: RouterFloat>(
    py: Python<'_>,
    grad_buf: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    num_tokens: usize,
    topk: usize,
    grad_x: RawBuf,
) -> PyResult<()> {
    const OP: &str = "permute_backward";
    let grad_buf = Buf::<T>::input("grad_buf", grad_buf);
    let row = Buf::<i32>::input("row", row);
    let grad_x = Buf::<T>::output("grad_x", grad_x);
    grad_buf.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        format_args!("[num_rows, hidden] = [{num_rows}, {hidden}]"),
    )?;
    row.expect_len(
        OP,
        mul(OP, "num_tokens * topk", num_tokens, topk)?,
        format_args!("[num_tokens, topk] = [{num_tokens}, {topk}]"),
    )?;
    grad_x.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        format_args!("[num_tokens, hidden] = [{num_tokens}, {hidden}]"),
    )?;
    check_bufs(OP, &[grad_buf.span(), row.span(), grad_x.span()])?;
    // SAFETY: as in `permute_t`.
    let (grad_buf, row, grad_x) =
        unsafe { (grad_buf.as_slice(), row.as_slice(), grad_x.as_mut_slice()) };
    run(py, OP, || {
        moe_router::permute_backward_into::<T>(
            grad_buf, num_rows, hidden, row, num_tokens, topk, grad_x,
        )
        .map_err(to_py_err)
    })
}

/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over `row[t, j] >= 0`, accumulated in f32:
/// `y` `[num_rows, hidden]`, `row` `[num_tokens, topk]` i32, `weights` `[num_tokens, topk]`
/// f32, `out` `[num_tokens, hidden]` (dtype of `y`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, y, num_rows, hidden, row, weights, num_tokens, topk, out))]
pub(crate) fn unpermute(
    py: Python<'_>,
    dtype: &str,
    y: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    out: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        "unpermute",
        "y",
        dtype,
        unpermute_t(py, y, num_rows, hidden, row, weights, num_tokens, topk, out)
    )
}

#[allow(clippy::too_many_arguments)]
fn unpermute_t<T: RouterFloat>(
    py: Python<'_>,
    y: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    out: RawBuf,
) -> PyResult<()> {
    const OP: &str = "unpermute";
    let y = Buf::<T>::input("y", y);
    let row = Buf::<i32>::input("row", row);
    let weights = Buf::<f32>::input("weights", weights);
    let out = Buf::<T>::output("out", out);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    y.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        format_args!("[num_rows, hidden] = [{num_rows}, {hidden}]"),
    )?;
    row.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {topk}]"),
    )?;
    weights.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {topk}]"),
    )?;
    out.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        format_args!("[num_tokens, hidden] = [{num_tokens}, {hidden}]"),
    )?;
    check_bufs(OP, &[y.span(), row.span(), weights.span(), out.span()])?;
    // SAFETY: as in `permute_t`.
    let (y, row, weights, out) = unsafe {
        (
            y.as_slice(),
            row.as_slice(),
            weights.as_slice(),
            out.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::unpermute_into::<T>(y, num_rows, hidden, row, weights, num_tokens, topk, out)
            .map_err(to_py_err)
    })
}

/// Backward of unpermute: `grad_y` `[num_rows, hidden]` (dtype of `y`; padding rows 0) and
/// `grad_weights[t, j] = <grad_out[t], y[row[t, j]]>` `[num_tokens, topk]` f32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, grad_out, y, num_rows, hidden, row, weights, num_tokens, topk, grad_y, grad_weights))]
pub(crate) fn unpermute_backward(
    py: Python<'_>,
    dtype: &str,
    grad_out: RawBuf,
    y: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    grad_y: RawBuf,
    grad_weights: RawBuf,
) -> PyResult<()> {
    float_dispatch!(
        "unpermute_backward",
        "y",
        dtype,
        unpermute_backward_t(
            py,
            grad_out,
            y,
            num_rows,
            hidden,
            row,
            weights,
            num_tokens,
            topk,
            grad_y,
            grad_weights
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn unpermute_backward_t<T: RouterFloat>(
    py: Python<'_>,
    grad_out: RawBuf,
    y: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    weights: RawBuf,
    num_tokens: usize,
    topk: usize,
    grad_y: RawBuf,
    grad_weights: RawBuf,
) -> PyResult<()> {
    const OP: &str = "unpermute_backward";
    let grad_out = Buf::<T>::input("grad_out", grad_out);
    let y = Buf::<T>::input("y", y);
    let row = Buf::<i32>::input("row", row);
    let weights = Buf::<f32>::input("weights", weights);
    let grad_y = Buf::<T>::output("grad_y", grad_y);
    let grad_weights = Buf::<f32>::output("grad_weights", grad_weights);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let rh = mul(OP, "num_rows * hidden", num_rows, hidden)?;
    let tk_shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    let rh_shape = format!("[num_rows, hidden] = [{num_rows}, {hidden}]");
    grad_out.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        format_args!("[num_tokens, hidden] = [{num_tokens}, {hidden}]"),
    )?;
    y.expect_len(OP, rh, &rh_shape)?;
    grad_y.expect_len(OP, rh, &rh_shape)?;
    row.expect_len(OP, tk, &tk_shape)?;
    weights.expect_len(OP, tk, &tk_shape)?;
    grad_weights.expect_len(OP, tk, &tk_shape)?;
    check_bufs(
        OP,
        &[
            grad_out.span(),
            y.span(),
            row.span(),
            weights.span(),
            grad_y.span(),
            grad_weights.span(),
        ],
    )?;
    // SAFETY: as in `permute_t`.
    let (grad_out, y, row, weights, grad_y, grad_weights) = unsafe {
        (
            grad_out.as_slice(),
            y.as_slice(),
            row.as_slice(),
            weights.as_slice(),
            grad_y.as_mut_slice(),
            grad_weights.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::unpermute_backward_into::<T>(
            grad_out,
            y,
            num_rows,
            hidden,
            row,
            weights,
            num_tokens,
            topk,
            grad_y,
            grad_weights,
        )
        .map_err(to_py_err)
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(permute, m)?)?;
    m.add_function(wrap_pyfunction!(permute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute_backward, m)?)?;
    Ok(())
}
