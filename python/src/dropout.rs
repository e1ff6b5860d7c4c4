//! `expert_mask`, `assignment_dropout`, `assignment_dropout_backward`: tensors in, the
//! core's CPU reference or CUDA kernels on the tensors' device.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::to_py_err;
use crate::tensor::{run, Args, Elem, Opts};
use moe_router::cuda::dropout::AssignmentDropoutPass;
use moe_router::{AssignmentDropoutBuffers, DropoutConfig};

/// The `rate`, `seed`, `offset` options of a dropout-like op, checked.
fn dropout_config(op: &'static str, o: &Opts<'_>) -> PyResult<DropoutConfig> {
    let rate: f32 = o.req("rate", "a float in [0, 1)")?;
    let seed: u64 = o.req("seed", "an int in [0, 2**64)")?;
    let offset: u64 = o.req("offset", "an int in [0, 2**64)")?;
    let cfg = DropoutConfig::new(rate, seed, offset);
    cfg.validate(op, "rate").map_err(to_py_err)?;
    Ok(cfg)
}

/// The expert-masking mask `masked` `[num_tokens, num_experts]` bool (`true` = masked),
/// deterministic from `(seed, offset)`, never fewer than `topk` candidates left per
/// token; the sizes are `masked`'s. Options: `topk`, `rate`, `seed`, `offset`.
/// Elements of the `masked` tensor of `expert_mask` for these sizes and options
/// (`topk`, `rate`, `seed`, `offset`), validated as `expert_mask` does: call it before
/// allocating, so that bad sizes are an error instead of a large allocation.
#[pyfunction]
#[pyo3(signature = (num_tokens, num_experts, **opts))]
pub(crate) fn expert_mask_len(
    num_tokens: &Bound<'_, PyAny>,
    num_experts: &Bound<'_, PyAny>,
    opts: Option<&Bound<'_, PyDict>>,
) -> PyResult<usize> {
    const OP: &str = "expert_mask";
    let o = Opts::new(OP, opts);
    let num_tokens: usize = o.arg("num_tokens", num_tokens, "an int >= 0")?;
    let num_experts: usize = o.arg("num_experts", num_experts, "an int >= 1")?;
    let topk: usize = o.req("topk", "an int in [1, num_experts]")?;
    let cfg = dropout_config(OP, &o)?;
    o.done()?;
    moe_router::expert_mask_len(num_tokens, num_experts, topk, &cfg).map_err(to_py_err)
}

#[pyfunction]
#[pyo3(signature = (masked, **opts))]
pub(crate) fn expert_mask<'py>(
    py: Python<'py>,
    masked: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "expert_mask";
    let o = Opts::new(OP, opts);
    let topk: usize = o.req("topk", "an int in [1, num_experts]")?;
    let cfg = dropout_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let masked = a.output("masked", masked)?;
    masked.expect_elem(OP, Elem::Bool)?;
    let [t, e] = masked.dims::<2>(OP)?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = masked.bools_mut(OP, &call)?;
        return run(py, OP, || {
            moe_router::expert_mask_into(t, e, topk, &cfg, m).map_err(to_py_err)
        });
    }
    let m = masked.dev_buf();
    // SAFETY: `m` is the data and element count of `masked`, a contiguous torch.bool
    // tensor (one byte an element) on `call`'s device, kept alive by its DLPack capsule
    // until the launch is queued; torch's caching allocator does not reuse that memory
    // before the stream's queued work has run. `stream` is torch's current stream of
    // that device, whose context is the device's primary context, the one the backend
    // retains.
    crate::device::launch(py, OP, &call, move |be, stream| unsafe {
        moe_router::cuda::dropout::expert_mask_raw(be, stream, t, e, topk, &cfg, m)
    })
}

/// Assignment dropout (NLLB expert output masking): each routed assignment of
/// `indices` `[num_tokens, topk]` int32 (-1 = not routed) / `weights` `[num_tokens,
/// topk]` float32 is dropped with probability `rate`. Fills `out_indices` (int32, -1
/// where dropped), `out_weights` (float32, 0 where dropped; with `renormalize`, a
/// token's weight sum is preserved), `keep` (bool), all `[num_tokens, topk]`, and
/// `dropped` (0-d int64: routed assignments dropped). Options: `num_experts`, `rate`,
/// `seed`, `offset`, `renormalize`.
#[pyfunction]
#[pyo3(signature = (indices, weights, out_indices, out_weights, keep, dropped, **opts))]
pub(crate) fn assignment_dropout<'py>(
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    out_indices: &Bound<'py, PyAny>,
    out_weights: &Bound<'py, PyAny>,
    keep: &Bound<'py, PyAny>,
    dropped: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "assignment_dropout";
    let py = indices.py(); // (from a tensor: one parameter fewer)
    let o = Opts::new(OP, opts);
    let num_experts: usize = o.req("num_experts", "an int >= 1")?;
    let cfg = dropout_config(OP, &o)?;
    let renormalize: bool = o.req("renormalize", "a bool")?;
    o.done()?;
    let mut a = Args::new(OP);
    let (idx, w) = (a.input("indices", indices)?, a.input("weights", weights)?);
    let (oi, ow) = (
        a.output("out_indices", out_indices)?,
        a.output("out_weights", out_weights)?,
    );
    let (kp, dr) = (a.output("keep", keep)?, a.output("dropped", dropped)?);
    idx.expect_elem(OP, Elem::I32)?;
    let [t, k] = idx.dims::<2>(OP)?;
    w.expect(OP, Elem::F32, &[t, k])?;
    oi.expect(OP, Elem::I32, &[t, k])?;
    ow.expect(OP, Elem::F32, &[t, k])?;
    kp.expect(OP, Elem::Bool, &[t, k])?;
    dr.expect(OP, Elem::I64, &[])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (idx, w) = (idx.slice::<i32>(OP, &call)?, w.slice::<f32>(OP, &call)?);
        let bufs = AssignmentDropoutBuffers {
            indices: oi.slice_mut(OP, &call)?,
            weights: ow.slice_mut(OP, &call)?,
            keep: kp.bools_mut(OP, &call)?,
        };
        let dr = dr.slice_mut::<i64>(OP, &call)?;
        return run(py, OP, || {
            let n = moe_router::assignment_dropout_into(
                moe_router::Assignments::new(idx, w, t, k),
                num_experts,
                &cfg,
                renormalize,
                bufs,
            )
            .map_err(to_py_err)?;
            dr[0] = n as i64;
            Ok(())
        });
    }
    let ptrs = moe_router::cuda::dropout::AssignmentDropoutRawPtrs {
        indices: idx.dev_buf(),
        weights: w.dev_buf(),
        keep: kp.dev_buf(),
        out_indices: oi.dev_buf(),
        out_weights: ow.dev_buf(),
        dropped: dr.dev_buf(),
        ..Default::default()
    };
    // SAFETY: every buffer is the data and element count of a tensor checked above for
    // this pass's dtypes (`dropped` one 8-byte element, which the kernel writes as a
    // u64 count), contiguous, on `call`'s device, outputs overlapping
    // nothing; each is kept alive by its DLPack capsule until the launch is queued, and
    // torch's caching allocator does not reuse that memory before the stream's queued
    // work has run. `stream` is torch's current stream of that device, whose context is
    // the device's primary context, the one the backend retains.
    crate::device::launch(py, OP, &call, move |be, stream| unsafe {
        let pass = AssignmentDropoutPass::Forward { num_experts, cfg };
        moe_router::cuda::dropout::assignment_dropout_raw(be, stream, pass, t, k, renormalize, ptrs)
    })
}

/// Backward of assignment dropout: from the forward's input `indices` (int32, -1 = not
/// routed) and `weights` (float32), its `keep` mask (bool) and `grad_out` (float32,
/// gradient of the output weights), all `[num_tokens, topk]`, fills `grad_weights`
/// `[num_tokens, topk]` float32. Option: `renormalize`.
#[pyfunction]
#[pyo3(signature = (indices, weights, keep, grad_out, grad_weights, **opts))]
pub(crate) fn assignment_dropout_backward<'py>(
    py: Python<'py>,
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    keep: &Bound<'py, PyAny>,
    grad_out: &Bound<'py, PyAny>,
    grad_weights: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "assignment_dropout_backward";
    let o = Opts::new(OP, opts);
    let renormalize: bool = o.req("renormalize", "a bool")?;
    o.done()?;
    let mut a = Args::new(OP);
    let (idx, w) = (a.input("indices", indices)?, a.input("weights", weights)?);
    let (kp, go) = (a.input("keep", keep)?, a.input("grad_out", grad_out)?);
    let gw = a.output("grad_weights", grad_weights)?;
    idx.expect_elem(OP, Elem::I32)?;
    let [t, k] = idx.dims::<2>(OP)?;
    w.expect(OP, Elem::F32, &[t, k])?;
    kp.expect(OP, Elem::Bool, &[t, k])?;
    go.expect(OP, Elem::F32, &[t, k])?;
    gw.expect(OP, Elem::F32, &[t, k])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (idx, w, kp) = (
            idx.slice::<i32>(OP, &call)?,
            w.slice::<f32>(OP, &call)?,
            kp.bools(OP, &call)?,
        );
        let (go, gw) = (go.slice::<f32>(OP, &call)?, gw.slice_mut::<f32>(OP, &call)?);
        return run(py, OP, || {
            moe_router::assignment_dropout_backward_into(
                moe_router::Assignments::new(idx, w, t, k),
                &kp,
                renormalize,
                go,
                gw,
            )
            .map_err(to_py_err)
        });
    }
    let ptrs = moe_router::cuda::dropout::AssignmentDropoutRawPtrs {
        indices: idx.dev_buf(),
        weights: w.dev_buf(),
        keep: kp.dev_buf(),
        grad_out: go.dev_buf(),
        grad_weights: gw.dev_buf(),
        ..Default::default()
    };
    // SAFETY: as in `assignment_dropout`: every buffer the backward pass uses is the
    // data and element count of a tensor of the checked dtype on `call`'s device,
    // `grad_weights` overlapping nothing.
    crate::device::launch(py, OP, &call, move |be, stream| unsafe {
        let pass = AssignmentDropoutPass::Backward;
        moe_router::cuda::dropout::assignment_dropout_raw(be, stream, pass, t, k, renormalize, ptrs)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expert_mask_len, m)?)?;
    m.add_function(wrap_pyfunction!(expert_mask, m)?)?;
    m.add_function(wrap_pyfunction!(assignment_dropout, m)?)?;
    m.add_function(wrap_pyfunction!(assignment_dropout_backward, m)?)?;
    Ok(())
}
