//! CUDA bindings (feature `cuda`): the core crate's `unsafe` raw-pointer entries
//! (`moe_router::cuda::*::*_raw`), run on PyTorch's current stream.
//!
//! Every function takes the tensors' device addresses as `(data_ptr, numel)` pairs (as
//! the CPU bindings do), the CUDA device ordinal and the stream handle
//! (`torch.cuda.current_stream(device).cuda_stream`, an int; 0 is the legacy default
//! stream). Before anything touches a device, the binding checks every element count
//! against the sizes passed in, the options, and the addresses (non-null when
//! non-empty, aligned, no output overlapping another buffer): a wrong call is a
//! `ValueError` raised with no CUDA library loaded. Then it takes the device's cached
//! [`CudaBackend`] (one per ordinal, created on first use; a missing driver, device or
//! NVRTC is a `RuntimeError`, never a panic), releases the GIL and launches on the
//! caller's stream without synchronising. Results stay on the device.
//!
//! What the kernels cannot check without reading device memory (index ranges, counts)
//! is not checked; the kernels never access memory out of bounds for any values (see
//! the core crate's `cuda` module docs).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

use crate::dispatch::dispatch_config;
use crate::error::{to_py_err, value_error};
use crate::tensor::{check_bufs, mul, parse_float, run, Buf, Float, RawBuf, Span};
use crate::topk_gating::gating_config;
use moe_router::cuda::dispatch::DispatchRawPtrs;
use moe_router::cuda::dropout::AssignmentDropoutRawPtrs;
use moe_router::cuda::expert_choice::ExpertChoiceRawPtrs;
use moe_router::cuda::permute::{PermutePass, PermuteRawPtrs, PermuteSizes};
use moe_router::cuda::router_stats::RouterStatsRawPtrs;
use moe_router::cuda::topk_gating::{TopkGatingPass, TopkGatingRawPtrs};
use moe_router::cuda::CudaBackend;
use moe_router::{DType, DispatchConfig, DropoutConfig, TopkGatingConfig};

/// Number of CUDA devices the driver reports; 0 without `libcuda` (never panics).
#[pyfunction]
pub(crate) fn cuda_device_count() -> usize {
    moe_router::cuda::device_count()
}

/// The backend of device `ordinal`, created on first use and then shared by every call
/// (its kernel modules are compiled once per device and process).
fn backend(op: &str, ordinal: usize) -> PyResult<Arc<CudaBackend>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|_| {
        PyRuntimeError::new_err(format!(
            "{op}: the CUDA backend cache is poisoned (an earlier call panicked)"
        ))
    })?;
    if let Some(b) = cache.get(&ordinal) {
        return Ok(b.clone());
    }
    // `CudaBackend::new` checks that libcuda is present and that the device exists
    // (`device_count`, which never panics) before creating the context.
    let b = Arc::new(CudaBackend::new(ordinal).map_err(|e| {
        PyRuntimeError::new_err(format!("{op}: CUDA device {ordinal} is not usable: {e}"))
    })?);
    cache.insert(ordinal, b.clone());
    Ok(b)
}

/// `dtype` string → the core's [`DType`], or `TypeError`.
fn dtype(op: &str, arg: &str, s: &str) -> PyResult<DType> {
    Ok(match parse_float(op, arg, s)? {
        Float::F32 => DType::F32,
        Float::F16 => DType::F16,
        Float::BF16 => DType::BF16,
    })
}

/// The CUDA bindings never read device memory on the host: a `Buf` is typed by its
/// element size and alignment only, so every 2-byte float dtype uses `half::f16`.
type Half = half::f16;

/// A buffer of the float dtype `dt` (element size 4 or 2), for the length / alignment /
/// overlap checks.
fn fbuf_in(dt: DType, name: &'static str, raw: RawBuf) -> FBuf {
    match dt {
        DType::F32 => FBuf::F32(Buf::input(name, raw)),
        _ => FBuf::F16(Buf::input(name, raw)),
    }
}

fn fbuf_out(dt: DType, name: &'static str, raw: RawBuf) -> FBuf {
    match dt {
        DType::F32 => FBuf::F32(Buf::output(name, raw)),
        _ => FBuf::F16(Buf::output(name, raw)),
    }
}

enum FBuf {
    F32(Buf<f32>),
    F16(Buf<Half>),
}

impl FBuf {
    fn expect_len(&self, op: &str, n: usize, shape: impl std::fmt::Display) -> PyResult<()> {
        match self {
            FBuf::F32(b) => b.expect_len(op, n, shape),
            FBuf::F16(b) => b.expect_len(op, n, shape),
        }
    }
    fn span(&self) -> Span {
        match self {
            FBuf::F32(b) => b.span(),
            FBuf::F16(b) => b.span(),
        }
    }
    fn addr(&self) -> u64 {
        match self {
            FBuf::F32(b) => b.addr(),
            FBuf::F16(b) => b.addr(),
        }
    }
}

fn shape2(a: &str, x: usize, b: &str, y: usize) -> String {
    format!("[{a}, {b}] = [{x}, {y}]")
}

/// The stream handle as the driver's `CUstream` (a pointer; 0 = the legacy default
/// stream). Only converted here; the raw entries wrap it without owning it.
fn cu_stream(stream: u64) -> cudarc::driver::sys::CUstream {
    stream as usize as cudarc::driver::sys::CUstream
}

// --------------------------------------------------------------------------------------
// Top-k gating

/// Top-k gating forward on CUDA: as `topk_gating`, with `device`, `stream` first and
/// device addresses for every buffer.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, expert_bias, topk, score_function, pre_softmax, normalize, num_groups, group_topk, scaling_factor, noise_std, expert_mask_rate, seed, offset, weights, indices))]
pub(crate) fn cuda_topk_gating(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<RawBuf>,
    topk: usize,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    num_groups: Option<usize>,
    group_topk: Option<usize>,
    scaling_factor: f32,
    noise_std: f32,
    expert_mask_rate: f32,
    seed: u64,
    offset: u64,
    weights: RawBuf,
    indices: RawBuf,
) -> PyResult<()> {
    const OP: &str = "topk_gating";
    let dt = self::dtype(OP, "logits", dtype)?;
    let cfg = gating_config(
        topk,
        score_function,
        pre_softmax,
        normalize,
        num_groups,
        group_topk,
        scaling_factor,
        noise_std,
        expert_mask_rate,
        seed,
        offset,
    )?;
    let logits = fbuf_in(dt, "logits", logits);
    let bias = expert_bias.map(|b| Buf::<f32>::input("expert_bias", b));
    let weights = Buf::<f32>::output("weights", weights);
    let indices = Buf::<i32>::output("indices", indices);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    logits.expect_len(
        OP,
        te,
        shape2("num_tokens", num_tokens, "num_experts", num_experts),
    )?;
    if let Some(b) = &bias {
        b.expect_len(
            OP,
            num_experts,
            format_args!("[num_experts] = [{num_experts}]"),
        )?;
    }
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    weights.expect_len(OP, tk, &tk_shape)?;
    indices.expect_len(OP, tk, &tk_shape)?;
    let mut spans = vec![logits.span(), weights.span(), indices.span()];
    spans.extend(bias.as_ref().map(Buf::span));
    check_bufs(OP, &spans)?;
    let ptrs = TopkGatingRawPtrs {
        logits: logits.addr(),
        expert_bias: bias.as_ref().map_or(0, Buf::addr),
        indices: indices.addr(),
        weights: weights.addr(),
        grad_weights: 0,
        grad_logits: 0,
    };
    gating(
        py,
        OP,
        device,
        stream,
        TopkGatingPass::Forward,
        dt,
        num_tokens,
        num_experts,
        cfg,
        ptrs,
    )
}

#[allow(clippy::too_many_arguments)]
fn gating(
    py: Python<'_>,
    op: &'static str,
    device: usize,
    stream: u64,
    pass: TopkGatingPass,
    dt: DType,
    num_tokens: usize,
    num_experts: usize,
    cfg: TopkGatingConfig,
    ptrs: TopkGatingRawPtrs,
) -> PyResult<()> {
    // The config checks of the kernels, on the host: a bad option is a ValueError even
    // without a device.
    moe_router::cuda::topk_gating::GatingParams::new(
        &cfg,
        num_tokens,
        num_experts,
        pass == TopkGatingPass::Forward && ptrs.expert_bias != 0,
    )
    .map_err(to_py_err)?;
    run(py, op, move || {
        let be = backend(op, device)?;
        // SAFETY: `stream` is the caller's current torch stream on `device`, whose
        // context is the device's primary context (the one `CudaBackend::new` retains);
        // `ops.py` keeps every tensor alive and torch's caching allocator does not reuse
        // their memory before the work queued on that stream has run. Every address
        // was checked above (length for the sizes, non-null, alignment, outputs
        // disjoint from every other buffer).
        unsafe {
            moe_router::cuda::topk_gating::topk_gating_raw(
                &be,
                cu_stream(stream),
                pass,
                dt,
                num_tokens,
                num_experts,
                &cfg,
                ptrs,
            )
        }
        .map_err(to_py_err)
    })
}

/// The replay / backward config: no groups, noise or masking.
fn replay_config(
    topk: usize,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: f32,
) -> PyResult<TopkGatingConfig> {
    gating_config(
        topk,
        score_function,
        pre_softmax,
        normalize,
        None,
        None,
        scaling_factor,
        0.0,
        0.0,
        0,
        0,
    )
}

/// Routing replay on CUDA: as `topk_gating_replay`, with `device`, `stream` first.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, indices, topk, score_function, pre_softmax, normalize, scaling_factor, weights))]
pub(crate) fn cuda_topk_gating_replay(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: f32,
    weights: RawBuf,
) -> PyResult<()> {
    const OP: &str = "topk_gating_replay";
    let dt = self::dtype(OP, "logits", dtype)?;
    let cfg = replay_config(topk, score_function, pre_softmax, normalize, scaling_factor)?;
    let logits = fbuf_in(dt, "logits", logits);
    let indices = Buf::<i32>::input("indices", indices);
    let weights = Buf::<f32>::output("weights", weights);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    logits.expect_len(
        OP,
        te,
        shape2("num_tokens", num_tokens, "num_experts", num_experts),
    )?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    indices.expect_len(OP, tk, &tk_shape)?;
    weights.expect_len(OP, tk, &tk_shape)?;
    check_bufs(OP, &[logits.span(), indices.span(), weights.span()])?;
    let ptrs = TopkGatingRawPtrs {
        logits: logits.addr(),
        expert_bias: 0,
        indices: indices.addr(),
        weights: weights.addr(),
        grad_weights: 0,
        grad_logits: 0,
    };
    gating(
        py,
        OP,
        device,
        stream,
        TopkGatingPass::Replay,
        dt,
        num_tokens,
        num_experts,
        cfg,
        ptrs,
    )
}

/// Top-k gating backward on CUDA: as `topk_gating_backward`, with `device`, `stream`
/// first.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, indices, topk, grad_weights, score_function, pre_softmax, normalize, scaling_factor, grad_logits))]
pub(crate) fn cuda_topk_gating_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    grad_weights: RawBuf,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "topk_gating_backward";
    let dt = self::dtype(OP, "logits", dtype)?;
    let cfg = replay_config(topk, score_function, pre_softmax, normalize, scaling_factor)?;
    let logits = fbuf_in(dt, "logits", logits);
    let indices = Buf::<i32>::input("indices", indices);
    let grad_weights = Buf::<f32>::input("grad_weights", grad_weights);
    let grad_logits = fbuf_out(dt, "grad_logits", grad_logits);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let te_shape = shape2("num_tokens", num_tokens, "num_experts", num_experts);
    logits.expect_len(OP, te, &te_shape)?;
    grad_logits.expect_len(OP, te, &te_shape)?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    indices.expect_len(OP, tk, &tk_shape)?;
    grad_weights.expect_len(OP, tk, &tk_shape)?;
    check_bufs(
        OP,
        &[
            logits.span(),
            indices.span(),
            grad_weights.span(),
            grad_logits.span(),
        ],
    )?;
    let ptrs = TopkGatingRawPtrs {
        logits: logits.addr(),
        expert_bias: 0,
        indices: indices.addr(),
        weights: 0,
        grad_weights: grad_weights.addr(),
        grad_logits: grad_logits.addr(),
    };
    gating(
        py,
        OP,
        device,
        stream,
        TopkGatingPass::Backward,
        dt,
        num_tokens,
        num_experts,
        cfg,
        ptrs,
    )
}

// --------------------------------------------------------------------------------------
// Dispatch

/// The dispatch config and its row bound, validated on the host (the errors of the
/// core's `dispatch_max_rows`: capacity / layout / align / ep_size and the i32 limits).
#[allow(clippy::too_many_arguments)]
fn dispatch_plan(
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
) -> PyResult<(DispatchConfig, usize, usize)> {
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
    let ws_len = moe_router::cuda::dispatch::dispatch_workspace_len(num_tokens, topk, &cfg)
        .map_err(to_py_err)?;
    Ok((cfg, max_rows, ws_len))
}

/// i32 elements of the workspace of `cuda_dispatch` for these sizes and options (the
/// options of `dispatch_max_rows`; a bad one is a `ValueError`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (num_tokens, topk, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset))]
pub(crate) fn cuda_dispatch_workspace_len(
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
    Ok(dispatch_plan(
        num_tokens,
        topk,
        num_experts,
        capacity,
        drop_policy,
        layout,
        align,
        renormalize,
        ep_size,
        seed,
        offset,
    )?
    .2)
}

/// Capacity-factor dispatch on CUDA: as `dispatch`, with `device`, `stream` first and two
/// more device buffers: `counts` `[2]` i64 = (num_rows, dropped), written on the device
/// instead of returned, and `workspace` i32 of `cuda_dispatch_workspace_len(..)`. The
/// `indices` values are not checked (no host read): an index outside `[0, num_experts)`
/// counts as not routed, a repeated one is not rejected.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, indices, weights, num_tokens, topk, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset, slot, row, kept_weights, tokens_per_expert, row_to_token, expert_offsets, rows_per_rank, counts, workspace))]
pub(crate) fn cuda_dispatch(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    counts: RawBuf,
    workspace: RawBuf,
) -> PyResult<()> {
    const OP: &str = "dispatch";
    let (cfg, max_rows, ws_len) = dispatch_plan(
        num_tokens,
        topk,
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
    let idx = Buf::<i32>::input("indices", indices);
    let w = Buf::<f32>::input("weights", weights);
    let slot = Buf::<i32>::output("slot", slot);
    let row = Buf::<i32>::output("row", row);
    let kw = Buf::<f32>::output("kept_weights", kept_weights);
    let tpe = Buf::<i32>::output("tokens_per_expert", tokens_per_expert);
    let rtt = Buf::<i32>::output("row_to_token", row_to_token);
    let eo = Buf::<i32>::output("expert_offsets", expert_offsets);
    let rpr = Buf::<i32>::output("rows_per_rank", rows_per_rank);
    let cn = Buf::<i64>::output("counts", counts);
    let ws = Buf::<i32>::output("workspace", workspace);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    for b in [&idx, &slot, &row] {
        b.expect_len(OP, tk, &tk_shape)?;
    }
    w.expect_len(OP, tk, &tk_shape)?;
    kw.expect_len(OP, tk, &tk_shape)?;
    tpe.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    rtt.expect_len(OP, max_rows, format_args!("[max_rows] = [{max_rows}]"))?;
    eo.expect_len(
        OP,
        num_experts + 1,
        format_args!("[num_experts + 1] = [{}]", num_experts + 1),
    )?;
    rpr.expect_len(OP, ep_size, format_args!("[ep_size] = [{ep_size}]"))?;
    cn.expect_len(OP, 2, "[2] (num_rows, dropped)")?;
    ws.expect_len(
        OP,
        ws_len,
        format_args!("[cuda_dispatch_workspace_len(..)] = [{ws_len}]"),
    )?;
    check_bufs(
        OP,
        &[
            idx.span(),
            w.span(),
            slot.span(),
            row.span(),
            kw.span(),
            tpe.span(),
            rtt.span(),
            eo.span(),
            rpr.span(),
            cn.span(),
            ws.span(),
        ],
    )?;
    let ptrs = DispatchRawPtrs {
        indices: idx.addr(),
        weights: w.addr(),
        slot: slot.addr(),
        row: row.addr(),
        kept_weights: kw.addr(),
        tokens_per_expert: tpe.addr(),
        row_to_token: rtt.addr(),
        expert_offsets: eo.addr(),
        rows_per_rank: rpr.addr(),
        counts: cn.addr(),
        workspace: ws.addr(),
    };
    run(py, OP, move || {
        let be = backend(OP, device)?;
        // SAFETY: as in `gating`: the caller's live torch stream on the device's primary
        // context; every buffer was checked above for these sizes (the workspace for
        // `dispatch_workspace_len`), outputs are disjoint, ops.py keeps them alive.
        unsafe {
            moe_router::cuda::dispatch::dispatch_raw(
                &be,
                cu_stream(stream),
                num_tokens,
                topk,
                &cfg,
                ptrs,
            )
        }
        .map_err(to_py_err)
    })
}

// --------------------------------------------------------------------------------------
// Expert choice

/// The size checks of the core's expert-choice validation, on the host (the raw entry
/// repeats them, but only after the backend exists): `num_experts` in `[1, i32::MAX]`,
/// `num_tokens <= i32::MAX`, and (forward) `num_experts * capacity <= i32::MAX`.
fn expert_choice_sizes(
    num_tokens: usize,
    num_experts: usize,
    capacity: Option<usize>,
) -> PyResult<usize> {
    use moe_router::{Error, MAX_I32_INDEX};
    const OP: &str = "expert_choice";
    if num_experts == 0 || num_experts > MAX_I32_INDEX {
        return Err(to_py_err(Error::InvalidArgument {
            op: OP,
            arg: "num_experts",
            value: num_experts.to_string(),
            valid: format!("the number of experts must be in [1, {MAX_I32_INDEX}]"),
        }));
    }
    let overflow = |what: &'static str, value: u128| {
        to_py_err(Error::Overflow {
            op: OP,
            what,
            value,
            max: i32::MAX as i64,
        })
    };
    if num_tokens > MAX_I32_INDEX {
        return Err(overflow("num_tokens", num_tokens as u128));
    }
    match capacity {
        Some(c) => {
            let rows = num_experts as u128 * c as u128;
            if rows > MAX_I32_INDEX as u128 {
                return Err(overflow("num_experts * capacity", rows));
            }
            Ok(rows as usize)
        }
        None => Ok(0),
    }
}

#[allow(clippy::too_many_arguments)]
fn expert_choice_call(
    py: Python<'_>,
    op: &'static str,
    device: usize,
    stream: u64,
    backward: bool,
    dt: DType,
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    ptrs: ExpertChoiceRawPtrs,
) -> PyResult<()> {
    run(py, op, move || {
        let be = backend(op, device)?;
        // SAFETY: as in `gating`; every address the pass uses was checked above for
        // these sizes, outputs are disjoint, ops.py keeps every tensor alive.
        unsafe {
            moe_router::cuda::expert_choice::expert_choice_raw(
                &be,
                cu_stream(stream),
                backward,
                dt,
                num_tokens,
                num_experts,
                capacity,
                ptrs,
            )
        }
        .map_err(to_py_err)
    })
}

/// Expert-choice routing on CUDA: as `expert_choice`, with `device`, `stream` first.
/// Every integer output equals the CPU's given the same `p = softmax(logits)`; `p` is
/// computed to rounding of the CPU's, so a selection can differ between near-tied tokens.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, capacity, weights, row, row_to_token, row_weights, tokens_per_expert, expert_offsets))]
pub(crate) fn cuda_expert_choice(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    const OP: &str = "expert_choice";
    let dt = self::dtype(OP, "logits", dtype)?;
    let rows = expert_choice_sizes(num_tokens, num_experts, Some(capacity))?;
    let logits = fbuf_in(dt, "logits", logits);
    let w = Buf::<f32>::output("weights", weights);
    let row = Buf::<i32>::output("row", row);
    let rtt = Buf::<i32>::output("row_to_token", row_to_token);
    let rw = Buf::<f32>::output("row_weights", row_weights);
    let tpe = Buf::<i32>::output("tokens_per_expert", tokens_per_expert);
    let eo = Buf::<i32>::output("expert_offsets", expert_offsets);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let te_shape = shape2("num_tokens", num_tokens, "num_experts", num_experts);
    logits.expect_len(OP, te, &te_shape)?;
    w.expect_len(OP, te, &te_shape)?;
    row.expect_len(OP, te, &te_shape)?;
    let rows_shape = format!("[num_experts * capacity] = [{rows}]");
    rtt.expect_len(OP, rows, &rows_shape)?;
    rw.expect_len(OP, rows, &rows_shape)?;
    tpe.expect_len(
        OP,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )?;
    eo.expect_len(
        OP,
        num_experts + 1,
        format_args!("[num_experts + 1] = [{}]", num_experts + 1),
    )?;
    check_bufs(
        OP,
        &[
            logits.span(),
            w.span(),
            row.span(),
            rtt.span(),
            rw.span(),
            tpe.span(),
            eo.span(),
        ],
    )?;
    let ptrs = ExpertChoiceRawPtrs {
        logits: logits.addr(),
        weights: w.addr(),
        row: row.addr(),
        row_to_token: rtt.addr(),
        row_weights: rw.addr(),
        tokens_per_expert: tpe.addr(),
        expert_offsets: eo.addr(),
        ..Default::default()
    };
    expert_choice_call(
        py,
        OP,
        device,
        stream,
        false,
        dt,
        num_tokens,
        num_experts,
        capacity,
        ptrs,
    )
}

/// Backward of expert choice on CUDA: as `expert_choice_backward`, with `device`,
/// `stream` first. A `row` entry counts as chosen iff it is `>= 0` (entries below -1,
/// which the CPU rejects, are not checked: no host read).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, row, grad_weights, grad_logits))]
pub(crate) fn cuda_expert_choice_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    row: RawBuf,
    grad_weights: RawBuf,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "expert_choice_backward";
    let dt = self::dtype(OP, "logits", dtype)?;
    expert_choice_sizes(num_tokens, num_experts, None)?;
    let logits = fbuf_in(dt, "logits", logits);
    let row = Buf::<i32>::input("row", row);
    let gw = Buf::<f32>::input("grad_weights", grad_weights);
    let gl = fbuf_out(dt, "grad_logits", grad_logits);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let te_shape = shape2("num_tokens", num_tokens, "num_experts", num_experts);
    logits.expect_len(OP, te, &te_shape)?;
    row.expect_len(OP, te, &te_shape)?;
    gw.expect_len(OP, te, &te_shape)?;
    gl.expect_len(OP, te, &te_shape)?;
    check_bufs(OP, &[logits.span(), row.span(), gw.span(), gl.span()])?;
    let ptrs = ExpertChoiceRawPtrs {
        logits: logits.addr(),
        row: row.addr(),
        grad_weights: gw.addr(),
        grad_logits: gl.addr(),
        ..Default::default()
    };
    expert_choice_call(
        py,
        OP,
        device,
        stream,
        true,
        dt,
        num_tokens,
        num_experts,
        0,
        ptrs,
    )
}

// --------------------------------------------------------------------------------------
// Permute / unpermute

#[allow(clippy::too_many_arguments)]
fn permute_call(
    py: Python<'_>,
    op: &'static str,
    device: usize,
    stream: u64,
    pass: PermutePass,
    dt: DType,
    sizes: PermuteSizes,
    ptrs: PermuteRawPtrs,
) -> PyResult<()> {
    run(py, op, move || {
        let be = backend(op, device)?;
        // SAFETY: as in `gating`: the caller's live torch stream on the device's primary
        // context; every address checked above for these sizes and kept alive by ops.py.
        unsafe {
            moe_router::cuda::permute::permute_raw(&be, cu_stream(stream), pass, dt, sizes, ptrs)
        }
        .map_err(to_py_err)
    })
}

/// Permute on CUDA: `out [num_rows, hidden] = x[row_to_token]` (zero rows where the
/// token index is out of range, e.g. -1); `num_rows` is the length of `row_to_token`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, x, num_tokens, hidden, row_to_token, out))]
pub(crate) fn cuda_permute(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    x: RawBuf,
    num_tokens: usize,
    hidden: usize,
    row_to_token: RawBuf,
    out: RawBuf,
) -> PyResult<()> {
    const OP: &str = "permute";
    let dt = self::dtype(OP, "x", dtype)?;
    let x = fbuf_in(dt, "x", x);
    let r2t = Buf::<i32>::input("row_to_token", row_to_token);
    let out = fbuf_out(dt, "out", out);
    let num_rows = r2t.len();
    x.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        shape2("num_tokens", num_tokens, "hidden", hidden),
    )?;
    out.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        shape2("num_rows", num_rows, "hidden", hidden),
    )?;
    check_bufs(OP, &[x.span(), r2t.span(), out.span()])?;
    let sizes = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: 0,
    };
    let ptrs = PermuteRawPtrs {
        x: x.addr(),
        row_to_token: r2t.addr(),
        buf: out.addr(),
        ..Default::default()
    };
    permute_call(
        py,
        OP,
        device,
        stream,
        PermutePass::Permute,
        dt,
        sizes,
        ptrs,
    )
}

/// Backward of permute on CUDA: `grad_x [num_tokens, hidden]`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, grad_buf, num_rows, hidden, row, num_tokens, topk, grad_x))]
pub(crate) fn cuda_permute_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    grad_buf: RawBuf,
    num_rows: usize,
    hidden: usize,
    row: RawBuf,
    num_tokens: usize,
    topk: usize,
    grad_x: RawBuf,
) -> PyResult<()> {
    const OP: &str = "permute_backward";
    let dt = self::dtype(OP, "grad_buf", dtype)?;
    let gb = fbuf_in(dt, "grad_buf", grad_buf);
    let row = Buf::<i32>::input("row", row);
    let gx = fbuf_out(dt, "grad_x", grad_x);
    gb.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        shape2("num_rows", num_rows, "hidden", hidden),
    )?;
    row.expect_len(
        OP,
        mul(OP, "num_tokens * topk", num_tokens, topk)?,
        shape2("num_tokens", num_tokens, "topk", topk),
    )?;
    gx.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        shape2("num_tokens", num_tokens, "hidden", hidden),
    )?;
    check_bufs(OP, &[gb.span(), row.span(), gx.span()])?;
    let sizes = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: topk,
    };
    let ptrs = PermuteRawPtrs {
        grad_buf: gb.addr(),
        row: row.addr(),
        grad_x: gx.addr(),
        ..Default::default()
    };
    permute_call(
        py,
        OP,
        device,
        stream,
        PermutePass::PermuteBackward,
        dt,
        sizes,
        ptrs,
    )
}

/// Unpermute on CUDA: `out [num_tokens, hidden]` (dtype of `y`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, y, num_rows, hidden, row, weights, num_tokens, topk, out))]
pub(crate) fn cuda_unpermute(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    const OP: &str = "unpermute";
    let dt = self::dtype(OP, "y", dtype)?;
    let y = fbuf_in(dt, "y", y);
    let row = Buf::<i32>::input("row", row);
    let w = Buf::<f32>::input("weights", weights);
    let out = fbuf_out(dt, "out", out);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    y.expect_len(
        OP,
        mul(OP, "num_rows * hidden", num_rows, hidden)?,
        shape2("num_rows", num_rows, "hidden", hidden),
    )?;
    row.expect_len(OP, tk, &tk_shape)?;
    w.expect_len(OP, tk, &tk_shape)?;
    out.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        shape2("num_tokens", num_tokens, "hidden", hidden),
    )?;
    check_bufs(OP, &[y.span(), row.span(), w.span(), out.span()])?;
    let sizes = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: topk,
    };
    let ptrs = PermuteRawPtrs {
        y: y.addr(),
        row: row.addr(),
        weights: w.addr(),
        out: out.addr(),
        ..Default::default()
    };
    permute_call(
        py,
        OP,
        device,
        stream,
        PermutePass::Unpermute,
        dt,
        sizes,
        ptrs,
    )
}

/// Backward of unpermute on CUDA: `grad_y [num_rows, hidden]`, `grad_weights
/// [num_tokens, topk]` f32; `workspace` i32 of `unpermute_backward_workspace_len(num_rows)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, grad_out, y, num_rows, hidden, row, weights, num_tokens, topk, grad_y, grad_weights, workspace))]
pub(crate) fn cuda_unpermute_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    workspace: RawBuf,
) -> PyResult<()> {
    const OP: &str = "unpermute_backward";
    let dt = self::dtype(OP, "y", dtype)?;
    let go = fbuf_in(dt, "grad_out", grad_out);
    let y = fbuf_in(dt, "y", y);
    let row = Buf::<i32>::input("row", row);
    let w = Buf::<f32>::input("weights", weights);
    let gy = fbuf_out(dt, "grad_y", grad_y);
    let gw = Buf::<f32>::output("grad_weights", grad_weights);
    let ws = Buf::<i32>::output("workspace", workspace);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let rh = mul(OP, "num_rows * hidden", num_rows, hidden)?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    let rh_shape = shape2("num_rows", num_rows, "hidden", hidden);
    go.expect_len(
        OP,
        mul(OP, "num_tokens * hidden", num_tokens, hidden)?,
        shape2("num_tokens", num_tokens, "hidden", hidden),
    )?;
    y.expect_len(OP, rh, &rh_shape)?;
    gy.expect_len(OP, rh, &rh_shape)?;
    row.expect_len(OP, tk, &tk_shape)?;
    w.expect_len(OP, tk, &tk_shape)?;
    gw.expect_len(OP, tk, &tk_shape)?;
    let wl = moe_router::cuda::permute::unpermute_backward_workspace_len(num_rows);
    ws.expect_len(
        OP,
        wl,
        format_args!("[unpermute_backward_workspace_len({num_rows})]"),
    )?;
    check_bufs(
        OP,
        &[
            go.span(),
            y.span(),
            row.span(),
            w.span(),
            gy.span(),
            gw.span(),
            ws.span(),
        ],
    )?;
    let sizes = PermuteSizes {
        num_tokens,
        num_rows,
        hidden,
        k: topk,
    };
    let ptrs = PermuteRawPtrs {
        grad_out: go.addr(),
        y: y.addr(),
        row: row.addr(),
        weights: w.addr(),
        grad_y: gy.addr(),
        grad_weights: gw.addr(),
        workspace: ws.addr(),
        ..Default::default()
    };
    permute_call(
        py,
        OP,
        device,
        stream,
        PermutePass::UnpermuteBackward,
        dt,
        sizes,
        ptrs,
    )
}

// --------------------------------------------------------------------------------------
// Expert dropout, bias update, router statistics

/// Expert masking on CUDA: `masked` `[num_tokens, num_experts]` bool, the same bits as
/// the CPU's for the same `(seed, offset)`.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, num_tokens, num_experts, topk, rate, seed, offset, masked))]
pub(crate) fn cuda_expert_mask(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
        shape2("num_tokens", num_tokens, "num_experts", num_experts),
    )?;
    check_bufs(OP, &[masked.span()])?;
    cfg.validate(OP, "rate").map_err(to_py_err)?;
    let addr = masked.addr();
    run(py, OP, move || {
        let be = backend(OP, device)?;
        // SAFETY: as in `gating`; `masked` holds num_tokens * num_experts bytes (checked).
        unsafe {
            moe_router::cuda::dropout::expert_mask_raw(
                &be,
                cu_stream(stream),
                num_tokens,
                num_experts,
                topk,
                &cfg,
                addr,
            )
        }
        .map_err(to_py_err)
    })
}

#[allow(clippy::too_many_arguments)]
fn dropout_call(
    py: Python<'_>,
    op: &'static str,
    device: usize,
    stream: u64,
    backward: bool,
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    cfg: DropoutConfig,
    renormalize: bool,
    ptrs: AssignmentDropoutRawPtrs,
) -> PyResult<()> {
    if !backward {
        cfg.validate(op, "rate").map_err(to_py_err)?;
    }
    run(py, op, move || {
        let be = backend(op, device)?;
        // SAFETY: as in `gating`; every address the pass uses was checked above.
        unsafe {
            moe_router::cuda::dropout::assignment_dropout_raw(
                &be,
                cu_stream(stream),
                backward,
                num_tokens,
                topk,
                num_experts,
                &cfg,
                renormalize,
                ptrs,
            )
        }
        .map_err(to_py_err)
    })
}

/// Assignment dropout on CUDA: `out_indices`, `out_weights`, `keep` `[num_tokens, topk]`
/// and `dropped` `[1]` (a 64-bit integer: the number of routed assignments dropped).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, indices, weights, num_tokens, topk, num_experts, rate, seed, offset, renormalize, out_indices, out_weights, keep, dropped))]
pub(crate) fn cuda_assignment_dropout(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    dropped: RawBuf,
) -> PyResult<()> {
    const OP: &str = "assignment_dropout";
    let cfg = DropoutConfig::new(rate, seed, offset);
    let idx = Buf::<i32>::input("indices", indices);
    let w = Buf::<f32>::input("weights", weights);
    let oi = Buf::<i32>::output("out_indices", out_indices);
    let ow = Buf::<f32>::output("out_weights", out_weights);
    let kp = Buf::<u8>::output("keep", keep);
    let dr = Buf::<u64>::output("dropped", dropped);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let shape = shape2("num_tokens", num_tokens, "topk", topk);
    for b in [&idx, &oi] {
        b.expect_len(OP, tk, &shape)?;
    }
    for b in [&w, &ow] {
        b.expect_len(OP, tk, &shape)?;
    }
    kp.expect_len(OP, tk, &shape)?;
    scalar(OP, &dr)?;
    check_bufs(
        OP,
        &[
            idx.span(),
            w.span(),
            oi.span(),
            ow.span(),
            kp.span(),
            dr.span(),
        ],
    )?;
    let ptrs = AssignmentDropoutRawPtrs {
        indices: idx.addr(),
        weights: w.addr(),
        keep: kp.addr(),
        out_indices: oi.addr(),
        out_weights: ow.addr(),
        dropped: dr.addr(),
        ..Default::default()
    };
    dropout_call(
        py,
        OP,
        device,
        stream,
        false,
        num_tokens,
        topk,
        num_experts,
        cfg,
        renormalize,
        ptrs,
    )
}

/// Backward of assignment dropout on CUDA: `grad_weights` `[num_tokens, topk]` f32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, indices, weights, keep, num_tokens, topk, renormalize, grad_out, grad_weights))]
pub(crate) fn cuda_assignment_dropout_backward(
    py: Python<'_>,
    device: usize,
    stream: u64,
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
    let idx = Buf::<i32>::input("indices", indices);
    let w = Buf::<f32>::input("weights", weights);
    let kp = Buf::<u8>::input("keep", keep);
    let go = Buf::<f32>::input("grad_out", grad_out);
    let gw = Buf::<f32>::output("grad_weights", grad_weights);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let shape = shape2("num_tokens", num_tokens, "topk", topk);
    idx.expect_len(OP, tk, &shape)?;
    kp.expect_len(OP, tk, &shape)?;
    for b in [&w, &go, &gw] {
        b.expect_len(OP, tk, &shape)?;
    }
    check_bufs(OP, &[idx.span(), w.span(), kp.span(), go.span(), gw.span()])?;
    let ptrs = AssignmentDropoutRawPtrs {
        indices: idx.addr(),
        weights: w.addr(),
        keep: kp.addr(),
        grad_out: go.addr(),
        grad_weights: gw.addr(),
        ..Default::default()
    };
    // The backward does not use the dropout config or num_experts.
    dropout_call(
        py,
        OP,
        device,
        stream,
        true,
        num_tokens,
        topk,
        0,
        DropoutConfig::new(0.0, 0, 0),
        renormalize,
        ptrs,
    )
}

/// Aux-loss-free bias update on CUDA, in place: `bias` `[num_experts]` f32, `counts`
/// `[num_experts]` i64.
#[pyfunction]
#[pyo3(signature = (device, stream, bias, counts, rate))]
pub(crate) fn cuda_update_expert_bias(
    py: Python<'_>,
    device: usize,
    stream: u64,
    bias: RawBuf,
    counts: RawBuf,
    rate: f32,
) -> PyResult<()> {
    const OP: &str = "update_expert_bias";
    let bias = Buf::<f32>::output("bias", bias);
    let counts = Buf::<i64>::input("counts", counts);
    let n = bias.len();
    counts.expect_len(
        OP,
        n,
        format_args!("[num_experts] = [{n}] (the length of `bias`)"),
    )?;
    check_bufs(OP, &[bias.span(), counts.span()])?;
    let (b, c) = (bias.addr(), counts.addr());
    run(py, OP, move || {
        let be = backend(OP, device)?;
        // SAFETY: as in `gating`; both buffers hold `n` elements (checked) and are
        // disjoint; `bias` is the tensor the torch op declares as mutated.
        unsafe {
            moe_router::cuda::bias_update::update_expert_bias_raw(
                &be,
                cu_stream(stream),
                b,
                c,
                n,
                rate,
            )
        }
        .map_err(to_py_err)
    })
}

/// Router statistics on CUDA. Outputs on the device: `selected_counts`, `kept_counts`
/// `[num_experts]` i64 (zeros without `slots`), `scalars` `[4]` i64 = (valid tokens,
/// dropped, non-finite logits, Σ selected), `floats` `[4]` f32 = (max_violation,
/// mean_entropy, mean_lse, max_lse); `workspace` f64 of
/// `router_stats_workspace_len(num_tokens)`. No strict mode (it needs a host read).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (device, stream, dtype, logits, num_tokens, num_experts, indices, topk, slots, padding_mask, selected_counts, kept_counts, scalars, floats, workspace))]
pub(crate) fn cuda_router_stats(
    py: Python<'_>,
    device: usize,
    stream: u64,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    slots: Option<RawBuf>,
    padding_mask: Option<RawBuf>,
    selected_counts: RawBuf,
    kept_counts: RawBuf,
    scalars: RawBuf,
    floats: RawBuf,
    workspace: RawBuf,
) -> PyResult<()> {
    const OP: &str = "router_stats";
    let dt = self::dtype(OP, "logits", dtype)?;
    let (logits, mask) = logits_mask(OP, dt, logits, num_tokens, num_experts, padding_mask)?;
    let idx = Buf::<i32>::input("indices", indices);
    let slots = slots.map(|s| Buf::<i32>::input("slots", s));
    let sel = Buf::<i64>::output("selected_counts", selected_counts);
    let kept = Buf::<i64>::output("kept_counts", kept_counts);
    let sc = Buf::<i64>::output("scalars", scalars);
    let fl = Buf::<f32>::output("floats", floats);
    let ws = Buf::<f64>::output("workspace", workspace);
    let tk = mul(OP, "num_tokens * topk", num_tokens, topk)?;
    let tk_shape = shape2("num_tokens", num_tokens, "topk", topk);
    idx.expect_len(OP, tk, &tk_shape)?;
    if let Some(s) = &slots {
        s.expect_len(OP, tk, &tk_shape)?;
    }
    let e_shape = format!("[num_experts] = [{num_experts}]");
    sel.expect_len(OP, num_experts, &e_shape)?;
    kept.expect_len(OP, num_experts, &e_shape)?;
    sc.expect_len(OP, 4, "[4]")?;
    fl.expect_len(OP, 4, "[4]")?;
    ws.expect_len(
        OP,
        moe_router::cuda::router_stats::router_stats_workspace_len(num_tokens),
        "[router_stats_workspace_len(num_tokens)]",
    )?;
    let mut spans = vec![
        logits.span(),
        idx.span(),
        sel.span(),
        kept.span(),
        sc.span(),
        fl.span(),
        ws.span(),
    ];
    spans.extend(mask.as_ref().map(Buf::span));
    spans.extend(slots.as_ref().map(Buf::span));
    check_bufs(OP, &spans)?;
    let ptrs = RouterStatsRawPtrs {
        logits: logits.addr(),
        indices: idx.addr(),
        slots: slots.as_ref().map_or(0, Buf::addr),
        padding_mask: mask.as_ref().map_or(0, Buf::addr),
        selected_counts: sel.addr(),
        kept_counts: kept.addr(),
        scalars: sc.addr(),
        floats: fl.addr(),
        workspace: ws.addr(),
    };
    run(py, OP, move || {
        let be = backend(OP, device)?;
        // SAFETY: as in `gating`; every non-zero address was checked above.
        unsafe {
            moe_router::cuda::router_stats::router_stats_raw(
                &be,
                cu_stream(stream),
                dt,
                num_tokens,
                num_experts,
                topk,
                ptrs,
            )
        }
        .map_err(to_py_err)
    })
}

// --------------------------------------------------------------------------------------
// Workspace sizes (pure functions: no device needed)

/// f64 elements of the router-statistics workspace.
#[pyfunction]
pub(crate) fn router_stats_workspace_len(num_tokens: usize) -> usize {
    moe_router::cuda::router_stats::router_stats_workspace_len(num_tokens)
}

/// i32 elements of the unpermute-backward workspace.
#[pyfunction]
pub(crate) fn unpermute_backward_workspace_len(num_rows: usize) -> usize {
    moe_router::cuda::permute::unpermute_backward_workspace_len(num_rows)
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_topk_gating, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_topk_gating_replay, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_topk_gating_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_dispatch, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_dispatch_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_expert_choice, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_expert_choice_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_permute, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_permute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_unpermute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_expert_mask, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_assignment_dropout, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_assignment_dropout_backward, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_update_expert_bias, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_router_stats, m)?)?;
    m.add_function(wrap_pyfunction!(router_stats_workspace_len, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute_backward_workspace_len, m)?)?;
    Ok(())
}
