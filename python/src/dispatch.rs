//! `dispatch` and `dispatch_max_rows`: tensors in, the core's CPU reference or CUDA
//! kernels on the tensors' device.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::{to_py_err, value_error};
use crate::tensor::{run, Args, Elem, Opts};
use moe_router::cuda::dispatch::{dispatch_raw, dispatch_workspace_len, DispatchRawPtrs};
use moe_router::{DispatchBuffers, DispatchConfig, DispatchLayout, DropPolicy};

/// Valid `drop_policy` values, in the order the docs list them.
pub(crate) const DROP_POLICIES: [&str; 5] = [
    "position",
    "choice_then_position",
    "probs",
    "batch_prioritized",
    "random",
];
/// Valid `layout` values.
pub(crate) const LAYOUTS: [&str; 3] = ["pad_to_capacity", "compact", "dropless"];

/// The dispatch config from the keyword options `num_experts`, `capacity`,
/// `drop_policy`, `layout`, `align`, `renormalize`, `ep_size`, `seed`, `offset`.
fn dispatch_config(op: &'static str, o: &Opts<'_>) -> PyResult<DispatchConfig> {
    let num_experts: usize = o.req("num_experts", "an int >= 1")?;
    let capacity: Option<usize> = o.opt("capacity", "an int >= 0 or None")?;
    let policy: Option<String> = o.opt("drop_policy", "a str")?;
    let layout: String = o.or("layout", "a str", "compact".into())?;
    let align: usize = o.or("align", "an int >= 1", 1)?;
    let renormalize: bool = o.or("renormalize", "a bool", false)?;
    let ep_size: usize = o.or("ep_size", "an int >= 1", 1)?;
    let seed: u64 = o.or("seed", "an int in [0, 2**64)", 0)?;
    let offset: u64 = o.or("offset", "an int in [0, 2**64)", 0)?;
    // `None`: no policy given (needs none without a capacity; `position` with one). A
    // policy given without a capacity is the core's error.
    let drop_policy = match policy.as_deref() {
        None => None,
        Some("position") => Some(DropPolicy::Position),
        Some("choice_then_position") => Some(DropPolicy::ChoiceThenPosition),
        Some("probs") => Some(DropPolicy::Probs),
        Some("batch_prioritized") => Some(DropPolicy::BatchPrioritized),
        Some("random") => Some(DropPolicy::Random { seed, offset }),
        Some(p) => {
            return Err(value_error(
                op,
                format_args!("invalid `drop_policy` = {p:?}: valid values are {DROP_POLICIES:?}"),
            ))
        }
    };
    let layout = match layout.as_str() {
        "pad_to_capacity" => DispatchLayout::PadToCapacity,
        "compact" => DispatchLayout::Compact,
        "dropless" => DispatchLayout::Dropless { align },
        l => {
            return Err(value_error(
                op,
                format_args!("invalid `layout` = {l:?}: valid values are {LAYOUTS:?}"),
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

/// Rows of the dispatch buffer (length of `row_to_token`) for these sizes and options
/// (every option of `dispatch`, validated as `dispatch` does).
#[pyfunction]
#[pyo3(signature = (num_tokens, topk, **opts))]
pub(crate) fn dispatch_max_rows(
    num_tokens: &Bound<'_, PyAny>,
    topk: &Bound<'_, PyAny>,
    opts: Option<&Bound<'_, PyDict>>,
) -> PyResult<usize> {
    const OP: &str = "dispatch_max_rows";
    let o = Opts::new(OP, opts);
    let num_tokens: usize = o.arg("num_tokens", num_tokens, "an int >= 0")?;
    let topk: usize = o.arg("topk", topk, "an int >= 1")?;
    let cfg = dispatch_config(OP, &o)?;
    o.done()?;
    moe_router::dispatch_max_rows(num_tokens, topk, &cfg).map_err(to_py_err)
}

/// Capacity-factor dispatch of `indices` `[T, k]` int32 with `weights` `[T, k]` float32:
/// fills `slot`, `row`, `kept_weights` `[T, k]`, `tokens_per_expert` `[E]`,
/// `row_to_token` `[dispatch_max_rows(..)]`, `expert_offsets` `[E + 1]`,
/// `rows_per_rank` `[ep_size]` (int32 but `kept_weights`) and `counts` `[2]` int64 =
/// (num_rows, dropped). Options as `dispatch_max_rows`. On CUDA the index values are not
/// read on the host: one outside `[0, E)` counts as not routed.
#[pyfunction]
#[pyo3(signature = (indices, weights, slot, row, kept_weights, tokens_per_expert, row_to_token, expert_offsets, rows_per_rank, counts, **opts))]
#[allow(clippy::too_many_arguments)] // one argument per output tensor
pub(crate) fn dispatch<'py>(
    py: Python<'py>,
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    slot: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    kept_weights: &Bound<'py, PyAny>,
    tokens_per_expert: &Bound<'py, PyAny>,
    row_to_token: &Bound<'py, PyAny>,
    expert_offsets: &Bound<'py, PyAny>,
    rows_per_rank: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "dispatch";
    let o = Opts::new(OP, opts);
    let cfg = dispatch_config(OP, &o)?;
    o.done()?;
    let mut a = Args::new(OP);
    let (idx, w) = (a.input("indices", indices)?, a.input("weights", weights)?);
    idx.expect_elem(OP, Elem::I32)?;
    let [t, k] = idx.dims::<2>(OP)?;
    let max_rows = moe_router::dispatch_max_rows(t, k, &cfg).map_err(to_py_err)?;
    let e = cfg.num_experts;
    w.expect(OP, Elem::F32, &[t, k])?;
    let outs = [
        ("slot", slot, Elem::I32, vec![t, k]),
        ("row", row, Elem::I32, vec![t, k]),
        ("kept_weights", kept_weights, Elem::F32, vec![t, k]),
        ("tokens_per_expert", tokens_per_expert, Elem::I32, vec![e]),
        ("row_to_token", row_to_token, Elem::I32, vec![max_rows]),
        ("expert_offsets", expert_offsets, Elem::I32, vec![e + 1]),
        ("rows_per_rank", rows_per_rank, Elem::I32, vec![cfg.ep_size]),
        ("counts", counts, Elem::I64, vec![2]),
    ];
    let mut out = Vec::with_capacity(outs.len());
    for (name, obj, elem, shape) in outs {
        let t = a.output(name, obj)?;
        t.expect(OP, elem, &shape)?;
        out.push(t);
    }
    let call = a.finish(py)?;
    let [slot, row, kept, tpe, r2t, offsets, per_rank, counts] = &out[..] else {
        unreachable!()
    };
    if call.on_cpu() {
        let (idx, w) = (idx.slice(OP, &call)?, w.slice(OP, &call)?);
        let bufs = DispatchBuffers {
            slot: slot.slice_mut(OP, &call)?,
            row: row.slice_mut(OP, &call)?,
            kept_weights: kept.slice_mut(OP, &call)?,
            tokens_per_expert: tpe.slice_mut(OP, &call)?,
            row_to_token: r2t.slice_mut(OP, &call)?,
            expert_offsets: offsets.slice_mut(OP, &call)?,
            rows_per_rank: per_rank.slice_mut(OP, &call)?,
        };
        let n = run(py, OP, || {
            moe_router::dispatch_into(idx, w, t, k, &cfg, bufs).map_err(to_py_err)
        })?;
        counts
            .slice_mut::<i64>(OP, &call)?
            .copy_from_slice(&[n.num_rows as i64, n.dropped as i64]);
        return Ok(());
    }
    let ws_len = dispatch_workspace_len(t, k, &cfg).map_err(to_py_err)?;
    let ws = call.scratch(py, OP, "workspace", "int32", ws_len)?;
    let ptrs = DispatchRawPtrs {
        indices: idx.dev_buf(),
        weights: w.dev_buf(),
        slot: slot.dev_buf(),
        row: row.dev_buf(),
        kept_weights: kept.dev_buf(),
        tokens_per_expert: tpe.dev_buf(),
        row_to_token: r2t.dev_buf(),
        expert_offsets: offsets.dev_buf(),
        rows_per_rank: per_rank.dev_buf(),
        counts: counts.dev_buf(),
        workspace: ws.dev_buf(),
    };
    crate::device::launch(py, OP, &call, move |be, stream| {
        // SAFETY: every address is the data of a tensor checked above for the shapes
        // these sizes and options give (the workspace sized by `dispatch_workspace_len`),
        // contiguous, on `call`'s device, outputs overlapping nothing, kept alive by its
        // DLPack capsule until the launch is queued (torch's caching allocator does not
        // reuse it before the stream's queued work has run); `stream` is torch's current
        // stream of that device, on its primary context, which the backend retains.
        unsafe { dispatch_raw(be, stream, t, k, &cfg, ptrs) }
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(dispatch_max_rows, m)?)?;
    m.add_function(wrap_pyfunction!(dispatch, m)?)?;
    m.add("DROP_POLICIES", DROP_POLICIES)?;
    m.add("LAYOUTS", LAYOUTS)?;
    Ok(())
}
