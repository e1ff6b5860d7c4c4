//! `z_loss`, `z_loss_backward` (router z-loss, ST-MoE): tensors in, the core's CPU
//! reference or CUDA kernels (the loss module of `aux_loss.rs`) on the tensors' device.
//! The loss and the valid-token count are 0-d tensors written by both branches; the
//! CUDA backward reads `valid_tokens` and `grad_loss` in device memory.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::aux_loss::{
    check_valid_tokens, count_i64, forward_workspace_len, host_scalar, launch_losses,
    logits_and_mask, LossLaunch,
};
use crate::common::float_dispatch;
use crate::error::to_py_err;
use crate::tensor::{run, Args, Elem, Opts, Tensor};
use moe_router::cuda::losses::{LossesPass, LossesRawPtrs};

/// Option `coeff` (default 1).
fn coeff(o: &Opts<'_>) -> PyResult<f32> {
    o.or("coeff", "a finite float", 1.0)
}

/// Router z-loss `coeff · mean_t logsumexp(logits[t])²` over the valid tokens of
/// `logits` `[T, E]` (optional `padding_mask` `[T]` bool). Writes `loss` `[]` float32
/// and `valid_tokens` `[]` int64. Option: `coeff`.
#[pyfunction]
#[pyo3(signature = (logits, padding_mask, loss, valid_tokens, **opts))]
pub(crate) fn z_loss<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    loss: &Bound<'py, PyAny>,
    valid_tokens: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "z_loss";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let coeff = coeff(&o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (loss, valid) = (
        a.output("loss", loss)?,
        a.output("valid_tokens", valid_tokens)?,
    );
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    loss.expect(OP, Elem::F32, &[])?;
    valid.expect(OP, Elem::I64, &[])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        let (l, v) = (
            loss.slice_mut::<f32>(OP, &call)?,
            valid.slice_mut::<i64>(OP, &call)?,
        );
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || {
                let out = moe_router::z_loss::<T>(z, t, e, m.as_deref(), coeff).map_err(to_py_err)?;
                l[0] = out.loss;
                v[0] = count_i64(OP, "valid_tokens", out.valid_tokens)?;
                Ok(())
            })
        });
    }
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float64",
        forward_workspace_len(OP, t, e, None)?,
    )?;
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        z_loss: loss.dev_buf(),
        valid_tokens: valid.dev_buf(),
        workspace: ws.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::ZForward { coeff },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

/// Backward of [`z_loss`]: `grad_logits` `[T, E]` (dtype of `logits`) for the 0-d
/// float32 `grad_loss`, with the forward's `valid_tokens` `[]` int64 (read by the CUDA
/// kernels; checked against `padding_mask` on the CPU). Option: `coeff`.
#[pyfunction]
#[pyo3(signature = (logits, padding_mask, valid_tokens, grad_loss, grad_logits, **opts))]
pub(crate) fn z_loss_backward<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    valid_tokens: &Bound<'py, PyAny>,
    grad_loss: &Bound<'py, PyAny>,
    grad_logits: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "z_loss_backward";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let coeff = coeff(&o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (valid, gl) = (
        a.input("valid_tokens", valid_tokens)?,
        a.input("grad_loss", grad_loss)?,
    );
    let g = a.output("grad_logits", grad_logits)?;
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    valid.expect(OP, Elem::I64, &[])?;
    gl.expect(OP, Elem::F32, &[])?;
    g.expect(OP, z.elem(), &[t, e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        check_valid_tokens(OP, valid.slice::<i64>(OP, &call)?, m.as_deref(), t, t)?;
        let grad_loss: f32 = host_scalar(OP, &gl, &call)?;
        return float_dispatch!(dt, T => {
            let (z, g) = (z.slice::<T>(OP, &call)?, g.slice_mut::<T>(OP, &call)?);
            run(py, OP, || {
                moe_router::z_loss_backward_into::<T>(moe_router::RouterLogits::new(z, t, e).padding_mask(m.as_deref()), coeff, grad_loss, g)
                    .map_err(to_py_err)
            })
        });
    }
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        valid_tokens: valid.dev_buf(),
        grad_loss: gl.dev_buf(),
        grad_logits: g.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::ZBackward { coeff },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(z_loss, m)?)?;
    m.add_function(wrap_pyfunction!(z_loss_backward, m)?)?;
    Ok(())
}
