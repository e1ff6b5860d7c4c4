//! `aux_loss`, `aux_loss_backward` (Switch / GShard load-balance loss) and
//! `seq_aux_loss`, `seq_aux_loss_backward` (the sequence-level loss of the same op
//! family in the core, `src/ops/aux_loss.rs`): tensors in, the core's CPU reference or
//! CUDA kernels on the tensors' device.
//!
//! Scalars (the loss, token totals) are 0-d tensors that Python allocates on the
//! tensors' device; both branches write them there, so a CUDA call never synchronises
//! with the host. The CUDA branch reads the caller's `total_tokens` and the backward's
//! `grad_loss` in device memory; the CPU branch reads them on the host. Also the
//! helpers the z-loss bindings (`z_loss.rs`) share: the loss kernels are one module.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::common::{float_dispatch, score_function};
use crate::error::{internal_error, to_py_err, value_error};
use crate::tensor::{run, Args, Call, Elem, Element, Opts, Tensor};
use moe_router::cuda::losses::{LossesPass, LossesRawPtrs};
use moe_router::{AuxLossConfig, DType};

/// Options `topk`, `score_function` (default `"softmax"`) and `coeff` (default 1).
fn aux_config(op: &'static str, o: &Opts<'_>) -> PyResult<AuxLossConfig> {
    let topk: usize = o.req("topk", "an int >= 1")?;
    let sf: String = o.or(
        "score_function",
        "\"softmax\" or \"sigmoid\"",
        "softmax".to_string(),
    )?;
    let coeff: f32 = o.or("coeff", "a finite float", 1.0)?;
    Ok(AuxLossConfig {
        topk,
        score_function: score_function(op, &sf)?,
        coeff,
    })
}

/// `logits` `[T, E]` (float32 / float16 / bfloat16) and the optional `padding_mask`
/// `[T]` bool: `(dtype, T, E)`.
pub(crate) fn logits_and_mask(
    op: &str,
    logits: &Tensor<'_>,
    mask: Option<&Tensor<'_>>,
) -> PyResult<(DType, usize, usize)> {
    let dt = logits.float(op)?;
    let [t, e] = logits.dims::<2>(op)?;
    if let Some(m) = mask {
        m.expect(op, Elem::Bool, &[t])?;
    }
    Ok((dt, t, e))
}

/// `num_tokens / seq_len` (the sequences), or the core's `ValueError` for a `seq_len`
/// of 0 or one that does not divide `num_tokens`.
fn sequences(op: &str, num_tokens: usize, seq_len: usize) -> PyResult<usize> {
    if seq_len == 0 {
        return Err(value_error(
            op,
            "invalid `seq_len` = 0: seq_len must be >= 1",
        ));
    }
    if num_tokens % seq_len != 0 {
        return Err(value_error(
            op,
            format_args!(
                "invalid `seq_len` = {seq_len}: seq_len must divide num_tokens = {num_tokens} (logits are \
                 [batch * seq_len, num_experts])"
            ),
        ));
    }
    Ok(num_tokens / seq_len)
}

/// The one value of a 0-d tensor, read on the host (CPU calls only).
pub(crate) fn host_scalar<T: Element>(op: &str, t: &Tensor<'_>, call: &Call) -> PyResult<T> {
    t.slice::<T>(op, call)?
        .first()
        .copied()
        .ok_or_else(|| internal_error(op, format_args!("`{}` has no element", t.name())))
}

/// A count the core returns, as the int64 of its output tensor.
pub(crate) fn count_i64(op: &str, name: &str, v: usize) -> PyResult<i64> {
    i64::try_from(v)
        .map_err(|_| internal_error(op, format_args!("`{name}` = {v} does not fit int64")))
}

/// Copy a result of the core into its output tensor (same length by the shape checks).
pub(crate) fn write_out<T: Copy>(op: &str, name: &str, src: &[T], dst: &mut [T]) -> PyResult<()> {
    if src.len() != dst.len() {
        return Err(internal_error(
            op,
            format_args!(
                "`{name}`: the core returned {} elements for an output of {}",
                src.len(),
                dst.len()
            ),
        ));
    }
    dst.copy_from_slice(src);
    Ok(())
}

/// CPU calls: `valid_tokens` `[segments]` (as Python computed it for the CUDA kernels)
/// must be the non-padding tokens of each segment of `seq_len` tokens, which is what
/// the core's backward counts itself.
pub(crate) fn check_valid_tokens(
    op: &str,
    given: &[i64],
    mask: Option<&[bool]>,
    num_tokens: usize,
    seq_len: usize,
) -> PyResult<()> {
    let want: Vec<i64> = match mask {
        None => vec![seq_len as i64; given.len()],
        Some(m) => m
            .chunks(seq_len.max(1))
            .map(|c| c.iter().filter(|&&pad| !pad).count() as i64)
            .collect(),
    };
    if num_tokens > 0 && want.as_slice() != given {
        return Err(value_error(
            op,
            format_args!(
                "`valid_tokens` = {given:?} is not the number of non-padding tokens {want:?} (per \
                 sequence of {seq_len} tokens); pass the forward's `valid_tokens`"
            ),
        ));
    }
    Ok(())
}

/// f64 elements of the CUDA loss-forward workspace, or a `ValueError` for sizes whose
/// workspace would not fit the address space (so the core's formula cannot overflow).
pub(crate) fn forward_workspace_len(
    op: &str,
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
) -> PyResult<usize> {
    // At most one workspace row per token (plus one) of 2E + 2 elements, and 3 per
    // segment: below (2E + 5) (T + 1).
    let bound = num_experts
        .checked_mul(2)
        .and_then(|e| e.checked_add(5))
        .and_then(|e| e.checked_mul(num_tokens.saturating_add(1)));
    if !matches!(bound, Some(b) if b <= isize::MAX as usize / 8) {
        return Err(value_error(
            op,
            format_args!(
                "num_tokens = {num_tokens}, num_experts = {num_experts}: the CUDA workspace does not fit the \
                 address space"
            ),
        ));
    }
    Ok(moe_router::cuda::losses::losses_workspace_len(
        num_tokens,
        num_experts,
        seq_len,
    ))
}

/// What one CUDA loss pass needs besides the tensors' buffers.
pub(crate) struct LossLaunch {
    /// The pass, with its options.
    pub(crate) pass: LossesPass,
    pub(crate) dtype: DType,
    pub(crate) num_tokens: usize,
    pub(crate) num_experts: usize,
    pub(crate) ptrs: LossesRawPtrs,
}

/// Launch a loss pass (`moe_router::cuda::losses::losses_raw`) on the call's stream.
pub(crate) fn launch_losses(
    py: Python<'_>,
    op: &'static str,
    call: &Call,
    l: LossLaunch,
) -> PyResult<()> {
    // SAFETY: every buffer in `l.ptrs` is the data and element count of a tensor the
    // binding checked for this pass's dtypes (contiguous, on `call`'s device, outputs
    // overlapping nothing) or of a scratch tensor allocated for it on that device, kept
    // alive by its DLPack capsule until the launch is queued; torch's caching allocator
    // does not reuse that memory before the stream's queued work has run. `call.stream`
    // is torch's current stream of that device, whose context is the device's primary
    // context, the one the backend retains. The caller's T_total is only ever a device
    // buffer (`total_tokens_in`), never the pass's host value.
    crate::device::launch(py, op, call, move |be, stream| unsafe {
        moe_router::cuda::losses::losses_raw(
            be,
            stream,
            l.pass,
            l.dtype,
            l.num_tokens,
            l.num_experts,
            l.ptrs,
        )
    })
}

/// Switch / GShard load-balance loss of `logits` `[T, E]` with an optional
/// `padding_mask` `[T]` bool, optional caller `counts` `[E]` int64 and the
/// `total_tokens` `[]` int64 they cover (only with `counts`). Writes `loss` `[]`
/// float32, `counts_out` `[E]` int64 (the counts used) and `total_out` `[]` int64 (the
/// `T_total` used). Options: `topk`, `score_function`, `coeff`.
#[pyfunction]
// Seven tensors (four inputs, three outputs), every option in `**opts`.
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (logits, padding_mask, counts, total_tokens, loss, counts_out, total_out, **opts))]
pub(crate) fn aux_loss<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    counts: Option<&Bound<'py, PyAny>>,
    total_tokens: Option<&Bound<'py, PyAny>>,
    loss: &Bound<'py, PyAny>,
    counts_out: &Bound<'py, PyAny>,
    total_out: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "aux_loss";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let cfg = aux_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (counts, total) = (
        a.opt_input("counts", counts)?,
        a.opt_input("total_tokens", total_tokens)?,
    );
    let (loss, counts_out, total_out) = (
        a.output("loss", loss)?,
        a.output("counts_out", counts_out)?,
        a.output("total_out", total_out)?,
    );
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    if let Some(c) = &counts {
        c.expect(OP, Elem::I64, &[e])?;
    }
    if let Some(tt) = &total {
        tt.expect(OP, Elem::I64, &[])?;
    }
    loss.expect(OP, Elem::F32, &[])?;
    counts_out.expect(OP, Elem::I64, &[e])?;
    total_out.expect(OP, Elem::I64, &[])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        let c = counts
            .as_ref()
            .map(|c| c.slice::<i64>(OP, &call))
            .transpose()?;
        let total = match &total {
            None => None,
            Some(tt) => {
                let v: i64 = host_scalar(OP, tt, &call)?;
                Some(usize::try_from(v).map_err(|_| {
                    value_error(
                        OP,
                        format_args!(
                            "invalid `total_tokens` = {v}: total_tokens must be >= 1 (the number of tokens the \
                             counts cover)"
                        ),
                    )
                })?)
            }
        };
        let (l, co, to) = (
            loss.slice_mut::<f32>(OP, &call)?,
            counts_out.slice_mut::<i64>(OP, &call)?,
            total_out.slice_mut::<i64>(OP, &call)?,
        );
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || {
                let out = moe_router::aux_loss::<T>(z, t, e, m.as_deref(), c, total, &cfg)
                    .map_err(to_py_err)?;
                l[0] = out.loss;
                write_out(OP, "counts_out", &out.counts, co)?;
                to[0] = count_i64(OP, "total_out", out.total_tokens)?;
                Ok(())
            })
        });
    }
    // Host checks before any allocation; the raw entry repeats them.
    cfg.validate(OP, e).map_err(to_py_err)?;
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float64",
        forward_workspace_len(OP, t, e, None)?,
    )?;
    // Σ_t P[t, e]: written by the kernels, not an output of the op.
    let sums = call.scratch(py, OP, "scores_sum", "float32", e)?;
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        counts: counts.as_ref().map(Tensor::dev_buf),
        total_tokens_in: total.as_ref().map(Tensor::dev_buf),
        loss: loss.dev_buf(),
        out_counts: counts_out.dev_buf(),
        scores_sum: sums.dev_buf(),
        total_tokens: total_out.dev_buf(),
        workspace: ws.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::AuxForward {
            cfg,
            seq_len: None,
            total_tokens: None,
            z_loss_coeff: None,
        },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

/// Backward of [`aux_loss`]: `grad_logits` `[T, E]` (dtype of `logits`) for the 0-d
/// float32 `grad_loss`, with the forward's `counts` `[E]` int64 and `total_tokens` `[]`
/// int64 (its `counts_out`, `total_out`). Options as the forward's.
#[pyfunction]
#[pyo3(signature = (logits, padding_mask, counts, total_tokens, grad_loss, grad_logits, **opts))]
pub(crate) fn aux_loss_backward<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    counts: &Bound<'py, PyAny>,
    total_tokens: &Bound<'py, PyAny>,
    grad_loss: &Bound<'py, PyAny>,
    grad_logits: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "aux_loss_backward";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let cfg = aux_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (counts, total, gl) = (
        a.input("counts", counts)?,
        a.input("total_tokens", total_tokens)?,
        a.input("grad_loss", grad_loss)?,
    );
    let g = a.output("grad_logits", grad_logits)?;
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    counts.expect(OP, Elem::I64, &[e])?;
    total.expect(OP, Elem::I64, &[])?;
    gl.expect(OP, Elem::F32, &[])?;
    g.expect(OP, z.elem(), &[t, e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        let c = counts.slice::<i64>(OP, &call)?;
        let v: i64 = host_scalar(OP, &total, &call)?;
        let total = usize::try_from(v).map_err(|_| {
            value_error(
                OP,
                format_args!(
                    "invalid `total_tokens` = {v}: it must be >= 0 (the forward's `total_out`)"
                ),
            )
        })?;
        let grad_loss: f32 = host_scalar(OP, &gl, &call)?;
        return float_dispatch!(dt, T => {
            let (z, g) = (z.slice::<T>(OP, &call)?, g.slice_mut::<T>(OP, &call)?);
            run(py, OP, || {
                let m = m.as_deref();
                moe_router::aux_loss_backward_into::<T>(moe_router::RouterLogits::new(z, t, e).padding_mask(m), c, total, &cfg, grad_loss, g)
                    .map_err(to_py_err)
            })
        });
    }
    cfg.validate(OP, e).map_err(to_py_err)?;
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float32",
        moe_router::cuda::losses::aux_loss_backward_workspace_len(t, e, None),
    )?;
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        counts: Some(counts.dev_buf()),
        total_tokens: total.dev_buf(),
        grad_loss: gl.dev_buf(),
        workspace: ws.dev_buf(),
        grad_logits: g.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::AuxBackward { cfg, seq_len: None },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

/// Sequence-level load-balance loss (DeepSeek) of `logits` `[B * S, E]` with an
/// optional `padding_mask` `[B * S]` bool. Writes `loss` `[]` float32, `counts_out`
/// `[B, E]` int64 (per-sequence counts) and `valid_tokens` `[B]` int64 (valid tokens
/// per sequence). Options: `seq_len` (`S`), `topk`, `score_function`, `coeff`.
#[pyfunction]
#[pyo3(signature = (logits, padding_mask, loss, counts_out, valid_tokens, **opts))]
pub(crate) fn seq_aux_loss<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    loss: &Bound<'py, PyAny>,
    counts_out: &Bound<'py, PyAny>,
    valid_tokens: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "seq_aux_loss";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let seq_len: usize = o.req("seq_len", "an int >= 1")?;
    let cfg = aux_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (loss, counts_out, valid) = (
        a.output("loss", loss)?,
        a.output("counts_out", counts_out)?,
        a.output("valid_tokens", valid_tokens)?,
    );
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    let b = sequences(OP, t, seq_len)?;
    loss.expect(OP, Elem::F32, &[])?;
    counts_out.expect(OP, Elem::I64, &[b, e])?;
    valid.expect(OP, Elem::I64, &[b])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        let (l, co, vo) = (
            loss.slice_mut::<f32>(OP, &call)?,
            counts_out.slice_mut::<i64>(OP, &call)?,
            valid.slice_mut::<i64>(OP, &call)?,
        );
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || {
                let out = moe_router::seq_aux_loss::<T>(z, t, e, seq_len, m.as_deref(), None, &cfg)
                    .map_err(to_py_err)?;
                l[0] = out.loss;
                write_out(OP, "counts_out", &out.counts, co)?;
                let v = out
                    .valid_tokens
                    .iter()
                    .map(|&v| count_i64(OP, "valid_tokens", v))
                    .collect::<PyResult<Vec<_>>>()?;
                write_out(OP, "valid_tokens", &v, vo)
            })
        });
    }
    cfg.validate(OP, e).map_err(to_py_err)?;
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float64",
        forward_workspace_len(OP, t, e, Some(seq_len))?,
    )?;
    let sums = call.scratch(py, OP, "scores_sum", "float32", b * e)?;
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        loss: loss.dev_buf(),
        out_counts: counts_out.dev_buf(),
        scores_sum: sums.dev_buf(),
        total_tokens: valid.dev_buf(),
        workspace: ws.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::AuxForward {
            cfg,
            seq_len: Some(seq_len),
            total_tokens: None,
            z_loss_coeff: None,
        },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

/// Backward of [`seq_aux_loss`]: `grad_logits` `[B * S, E]` for the 0-d float32
/// `grad_loss`, with the forward's `counts` `[B, E]` int64 and `valid_tokens` `[B]`
/// int64 (read by the CUDA kernels; checked against `padding_mask` on the CPU).
/// Options as the forward's.
#[pyfunction]
#[pyo3(signature = (logits, padding_mask, counts, valid_tokens, grad_loss, grad_logits, **opts))]
pub(crate) fn seq_aux_loss_backward<'py>(
    logits: &Bound<'py, PyAny>,
    padding_mask: Option<&Bound<'py, PyAny>>,
    counts: &Bound<'py, PyAny>,
    valid_tokens: &Bound<'py, PyAny>,
    grad_loss: &Bound<'py, PyAny>,
    grad_logits: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "seq_aux_loss_backward";
    let py = logits.py();
    let o = Opts::new(OP, opts);
    let seq_len: usize = o.req("seq_len", "an int >= 1")?;
    let cfg = aux_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, mask) = (
        a.input("logits", logits)?,
        a.opt_input("padding_mask", padding_mask)?,
    );
    let (counts, valid, gl) = (
        a.input("counts", counts)?,
        a.input("valid_tokens", valid_tokens)?,
        a.input("grad_loss", grad_loss)?,
    );
    let g = a.output("grad_logits", grad_logits)?;
    let (dt, t, e) = logits_and_mask(OP, &z, mask.as_ref())?;
    let b = sequences(OP, t, seq_len)?;
    counts.expect(OP, Elem::I64, &[b, e])?;
    valid.expect(OP, Elem::I64, &[b])?;
    gl.expect(OP, Elem::F32, &[])?;
    g.expect(OP, z.elem(), &[t, e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let m = mask.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        check_valid_tokens(OP, valid.slice::<i64>(OP, &call)?, m.as_deref(), t, seq_len)?;
        let c = counts.slice::<i64>(OP, &call)?;
        let grad_loss: f32 = host_scalar(OP, &gl, &call)?;
        return float_dispatch!(dt, T => {
            let (z, g) = (z.slice::<T>(OP, &call)?, g.slice_mut::<T>(OP, &call)?);
            run(py, OP, || {
                let (m, s) = (m.as_deref(), seq_len);
                moe_router::seq_aux_loss_backward_into::<T>(moe_router::RouterLogits::new(z, t, e).padding_mask(m), s, c, &cfg, grad_loss, g)
                    .map_err(to_py_err)
            })
        });
    }
    cfg.validate(OP, e).map_err(to_py_err)?;
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float32",
        moe_router::cuda::losses::aux_loss_backward_workspace_len(t, e, Some(seq_len)),
    )?;
    let ptrs = LossesRawPtrs {
        logits: z.dev_buf(),
        padding_mask: mask.as_ref().map(Tensor::dev_buf),
        counts: Some(counts.dev_buf()),
        total_tokens: valid.dev_buf(),
        grad_loss: gl.dev_buf(),
        workspace: ws.dev_buf(),
        grad_logits: g.dev_buf(),
        ..Default::default()
    };
    let l = LossLaunch {
        pass: LossesPass::AuxBackward {
            cfg,
            seq_len: Some(seq_len),
        },
        dtype: dt,
        num_tokens: t,
        num_experts: e,
        ptrs,
    };
    launch_losses(py, OP, &call, l)
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(aux_loss, m)?)?;
    m.add_function(wrap_pyfunction!(aux_loss_backward, m)?)?;
    m.add_function(wrap_pyfunction!(seq_aux_loss, m)?)?;
    m.add_function(wrap_pyfunction!(seq_aux_loss_backward, m)?)?;
    Ok(())
}
