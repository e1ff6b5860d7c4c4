//! Binding of `update_expert_bias` (aux-loss-free balancing, in place).

use pyo3::prelude::*;

use crate::error::to_py_err;
use crate::tensor::{check_bufs, run, Buf, RawBuf};

/// `bias[e] += rate · sign(mean(counts) − counts[e])`, in place: `bias` `[num_experts]`
/// f32, `counts` `[num_experts]` i64.
#[pyfunction]
#[pyo3(signature = (bias, counts, rate))]
pub(crate) fn update_expert_bias(
    py: Python<'_>,
    bias: RawBuf,
    counts: RawBuf,
    rate: f32,
) -> PyResult<()> {
    const OP: &str = "update_expert_bias";
    let bias = Buf::<f32>::output("bias", bias);
    let counts = Buf::<i64>::input("counts", counts);
    counts.expect_len(
        OP,
        bias.len(),
        format_args!("[num_experts] = [{}] (the length of `bias`)", bias.len()),
    )?;
    check_bufs(OP, &[bias.span(), counts.span()])?;
    // SAFETY: `check_bufs` accepted both buffers and proved them disjoint; `ops.py` passes
    // contiguous CPU tensors of these dtypes and lengths and keeps them alive; `bias` is
    // the tensor the op mutates (declared `mutates_args` on the torch side), which nothing
    // else touches during the call.
    let (bias, counts) = unsafe { (bias.as_mut_slice(), counts.as_slice()) };
    run(py, OP, || {
        moe_router::update_expert_bias(bias, counts, rate).map_err(to_py_err)
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(update_expert_bias, m)?)?;
    Ok(())
}
