//! `router_stats`: tensors in, the core's CPU reference or CUDA kernels on the tensors'
//! device; every statistic is written into output tensors (no host values returned).

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::common::float_dispatch;
use crate::error::{internal_error, to_py_err};
use crate::tensor::{run, Args, Elem, Opts, Tensor};
use moe_router::RouterStatsConfig;

const OP: &str = "router_stats";

/// The error of strict mode, the same on both devices (the core's).
fn nonfinite(count: u64) -> PyErr {
    to_py_err(moe_router::Error::NonFinite {
        op: OP,
        arg: "logits",
        count,
    })
}

/// Router statistics in one pass over `logits` `[num_tokens, num_experts]` (float32 /
/// float16 / bfloat16) and the routing `indices` `[num_tokens, topk]` int32. Fills
/// `selected_counts` and `kept_counts` (`[num_experts]` int64; kept zeros without
/// `slot`), `scalars` `[4]` int64 = (valid tokens, dropped, non-finite logits,
/// Σ selected) and `floats` `[4]` float32 = (max_violation, mean_entropy, mean_lse,
/// max_lse). Keyword arguments: the optional input tensors `slot` (`[num_tokens, topk]`
/// int32, -1 = dropped) and `padding_mask` (`[num_tokens]` bool, `True` = padding),
/// and the option `strict` (`ValueError` when a valid token's logits hold NaN / ±Inf;
/// on CUDA this reads the non-finite count on the host, one synchronisation).
#[pyfunction]
#[pyo3(signature = (logits, indices, selected_counts, kept_counts, scalars, floats, **opts))]
pub(crate) fn router_stats<'py>(
    logits: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    selected_counts: &Bound<'py, PyAny>,
    kept_counts: &Bound<'py, PyAny>,
    scalars: &Bound<'py, PyAny>,
    floats: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    let py = logits.py(); // (from a tensor: one parameter fewer)
    let o = Opts::new(OP, opts);
    let slots: Option<Bound<'py, PyAny>> = o.opt("slot", "a torch.Tensor or None")?;
    let padding_mask: Option<Bound<'py, PyAny>> =
        o.opt("padding_mask", "a torch.Tensor or None")?;
    let strict: bool = o.req("strict", "a bool")?;
    o.done()?;
    let mut a = Args::new(OP);
    let (z, idx) = (a.input("logits", logits)?, a.input("indices", indices)?);
    let (sl, pm) = (
        a.opt_input("slot", slots.as_ref())?,
        a.opt_input("padding_mask", padding_mask.as_ref())?,
    );
    let (sel, kept) = (
        a.output("selected_counts", selected_counts)?,
        a.output("kept_counts", kept_counts)?,
    );
    let (sc, fl) = (a.output("scalars", scalars)?, a.output("floats", floats)?);
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    let [_, k] = idx.dims::<2>(OP)?;
    idx.expect(OP, Elem::I32, &[t, k])?;
    if let Some(s) = &sl {
        s.expect(OP, Elem::I32, &[t, k])?;
    }
    if let Some(m) = &pm {
        m.expect(OP, Elem::Bool, &[t])?;
    }
    sel.expect(OP, Elem::I64, &[e])?;
    kept.expect(OP, Elem::I64, &[e])?;
    sc.expect(OP, Elem::I64, &[4])?;
    fl.expect(OP, Elem::F32, &[4])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let idx = idx.slice::<i32>(OP, &call)?;
        let sl = sl.as_ref().map(|s| s.slice::<i32>(OP, &call)).transpose()?;
        let pm = pm.as_ref().map(|m| m.bools(OP, &call)).transpose()?;
        let (sel, kept) = (
            sel.slice_mut::<i64>(OP, &call)?,
            kept.slice_mut::<i64>(OP, &call)?,
        );
        let (sc, fl) = (
            sc.slice_mut::<i64>(OP, &call)?,
            fl.slice_mut::<f32>(OP, &call)?,
        );
        let cfg = RouterStatsConfig::new().strict(strict);
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || {
                let s = moe_router::router_stats::<T>(moe_router::RouterLogits::new(z, t, e).padding_mask(pm.as_deref()), idx, k, sl, &cfg).map_err(python_names)?;
                if s.selected_counts.len() != e || s.kept_counts.as_ref().is_some_and(|c| c.len() != e) {
                    return Err(internal_error(OP, "the core returned counts of another length"));
                }
                sel.copy_from_slice(&s.selected_counts);
                match &s.kept_counts {
                    Some(c) => kept.copy_from_slice(c),
                    None => kept.fill(0),
                }
                let total: i64 = s.selected_counts.iter().sum();
                sc.copy_from_slice(&[s.num_tokens as i64, s.dropped as i64, s.nonfinite_logits as i64, total]);
                fl.copy_from_slice(&[s.max_violation, s.mean_entropy, s.mean_lse, s.max_lse]);
                Ok(())
            })
        });
    }
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "float64",
        moe_router::cuda::router_stats::router_stats_workspace_len(t),
    )?;
    let ptrs = moe_router::cuda::router_stats::RouterStatsRawPtrs {
        logits: z.dev_buf(),
        indices: idx.dev_buf(),
        slots: sl.as_ref().map(Tensor::dev_buf),
        padding_mask: pm.as_ref().map(Tensor::dev_buf),
        selected_counts: sel.dev_buf(),
        kept_counts: kept.dev_buf(),
        scalars: sc.dev_buf(),
        floats: fl.dev_buf(),
        workspace: ws.dev_buf(),
    };
    // SAFETY: every buffer given is the data and element count of a tensor checked
    // above for its dtype (`logits` of `dt`, `indices` / `slot` int32, `padding_mask`
    // bool, counts and `scalars` int64, `floats` float32), contiguous, on `call`'s
    // device, outputs overlapping nothing; the workspace is a fresh float64 tensor from
    // torch's allocator on that device. Each is kept alive by its DLPack capsule
    // until the launch is queued, and torch's caching allocator does not reuse that
    // memory before the stream's queued work has run. `stream` is torch's current
    // stream of that device, whose context is the device's primary context, the one the
    // backend retains.
    crate::device::launch(py, OP, &call, move |be, stream| unsafe {
        moe_router::cuda::router_stats::router_stats_raw(be, stream, dt, t, e, k, ptrs)
    })?;
    if strict {
        // The one host read of the op (documented): the non-finite count, read through
        // torch on the current stream, after the kernels queued above.
        let count: i64 = scalars.get_item(2)?.call_method0("item")?.extract()?;
        if count > 0 {
            return Err(nonfinite(count as u64));
        }
    }
    Ok(())
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(router_stats, m)?)?;
    Ok(())
}

/// The core error with the argument named as Python names it: the core's `slots` is the
/// `slot` of `moe_router.router_stats`.
fn python_names(err: moe_router::Error) -> PyErr {
    match err {
        moe_router::Error::InvalidArgument {
            op,
            arg: "slots",
            value,
            valid,
        } => to_py_err(moe_router::Error::InvalidArgument {
            op,
            arg: "slot",
            value,
            valid,
        }),
        e => to_py_err(e),
    }
}
