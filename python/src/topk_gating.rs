//! `topk_gating`, `topk_gating_replay`, `topk_gating_backward`: tensors in, the core's
//! CPU reference or CUDA kernels on the tensors' device.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::common::{float_dispatch, score_function};
use crate::error::{to_py_err, value_error};
use crate::tensor::{run, Args, Call, Elem, Opts, Tensor};
use moe_router::cuda::topk_gating::{topk_gating_raw, TopkGatingPass, TopkGatingRawPtrs};
use moe_router::{DropoutConfig, GroupLimit, SelectionNoise, TopkGatingConfig};

/// The gating config from the keyword options. `noise_std == 0` means no noise and
/// `expert_mask_rate == 0` no expert masking (both draw from `seed` / `offset`, in
/// separate generator domains); every other value, valid or not, goes to the core,
/// whose validation names it. Replay and backward take no groups, noise or masking.
fn gating_config(
    op: &'static str,
    o: &Opts<'_>,
    topk: usize,
    forward: bool,
) -> PyResult<TopkGatingConfig> {
    let mut cfg = TopkGatingConfig::new(topk);
    cfg.score_function = score_function(
        op,
        &o.or::<String>(
            "score_function",
            "\"softmax\" or \"sigmoid\"",
            "softmax".into(),
        )?,
    )?;
    cfg.pre_softmax = o.or("pre_softmax", "a bool", false)?;
    cfg.normalize = o.or("normalize", "a bool", false)?;
    cfg.scaling_factor = o.or("scaling_factor", "a float", 1.0)?;
    if !forward {
        return Ok(cfg);
    }
    cfg.group_limit = match (o.opt::<usize>("num_groups", "an int >= 1")?, o.opt::<usize>("group_topk", "an int >= 1")?) {
        (None, None) => None,
        (Some(num_groups), Some(group_topk)) => Some(GroupLimit { num_groups, group_topk }),
        (g, k) => {
            return Err(value_error(
                op,
                format_args!(
                    "invalid `num_groups` = {g:?}, `group_topk` = {k:?}: give both (group-limited routing) or neither"
                ),
            ))
        }
    };
    let seed: u64 = o.or("seed", "an int in [0, 2**64)", 0)?;
    let offset: u64 = o.or("offset", "an int in [0, 2**64)", 0)?;
    let noise_std: f32 = o.or("noise_std", "a float >= 0", 0.0)?;
    let mask_rate: f32 = o.or("expert_mask_rate", "a float in [0, 1)", 0.0)?;
    cfg.noise = (noise_std != 0.0).then_some(SelectionNoise {
        std: noise_std,
        seed,
        offset,
    });
    cfg.expert_masking = (mask_rate != 0.0).then(|| DropoutConfig::new(mask_rate, seed, offset));
    Ok(cfg)
}

/// Top-k gating: `logits` `[T, E]` (float32 / float16 / bfloat16), `expert_bias` `[E]`
/// float32 or None → `weights` `[T, k]` float32 and `indices` `[T, k]` int32.
/// Options: `topk`, `score_function`, `pre_softmax`, `normalize`, `num_groups`,
/// `group_topk`, `scaling_factor`, `noise_std`, `expert_mask_rate`, `seed`, `offset`.
#[pyfunction]
#[pyo3(signature = (logits, expert_bias, weights, indices, **opts))]
pub(crate) fn topk_gating<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    expert_bias: Option<&Bound<'py, PyAny>>,
    weights: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "topk_gating";
    let o = Opts::new(OP, opts);
    let cfg = gating_config(OP, &o, o.req("topk", "an int >= 1")?, true)?;
    o.done()?;
    let mut a = Args::new(OP);
    let z = a.input("logits", logits)?;
    let bias = a.opt_input("expert_bias", expert_bias)?;
    let (w, idx) = (a.output("weights", weights)?, a.output("indices", indices)?);
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    if let Some(b) = &bias {
        b.expect(OP, Elem::F32, &[e])?;
    }
    w.expect(OP, Elem::F32, &[t, cfg.topk])?;
    idx.expect(OP, Elem::I32, &[t, cfg.topk])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let bias = bias
            .as_ref()
            .map(|b| b.slice::<f32>(OP, &call))
            .transpose()?;
        let (w, idx) = (w.slice_mut(OP, &call)?, idx.slice_mut(OP, &call)?);
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || moe_router::topk_gating_into::<T>(z, t, e, bias, &cfg, w, idx).map_err(to_py_err))
        });
    }
    let ptrs = TopkGatingRawPtrs {
        logits: z.dev_buf(),
        expert_bias: bias.as_ref().map(Tensor::dev_buf),
        indices: idx.dev_buf(),
        weights: w.dev_buf(),
        ..Default::default()
    };
    launch_gating(py, OP, &call, TopkGatingPass::Forward, &z, cfg, ptrs)
}

/// Routing replay: the weights `[T, k]` float32 of given `indices` `[T, k]` int32,
/// computed as if they had been selected (`k` from `indices`). Options: `score_function`,
/// `pre_softmax`, `normalize`, `scaling_factor`.
#[pyfunction]
#[pyo3(signature = (logits, indices, weights, **opts))]
pub(crate) fn topk_gating_replay<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "topk_gating_replay";
    let mut a = Args::new(OP);
    let (z, idx, w) = (
        a.input("logits", logits)?,
        a.input("indices", indices)?,
        a.output("weights", weights)?,
    );
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    idx.expect_elem(OP, Elem::I32)?;
    let [_, k] = idx.dims::<2>(OP)?;
    let o = Opts::new(OP, opts);
    let cfg = gating_config(OP, &o, k, false)?;
    o.done()?;
    idx.expect(OP, Elem::I32, &[t, k])?;
    w.expect(OP, Elem::F32, &[t, k])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (idx, w) = (idx.slice(OP, &call)?, w.slice_mut(OP, &call)?);
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || moe_router::topk_gating_replay_into::<T>(z, t, e, idx, &cfg, w).map_err(to_py_err))
        });
    }
    let ptrs = TopkGatingRawPtrs {
        logits: z.dev_buf(),
        indices: idx.dev_buf(),
        weights: w.dev_buf(),
        ..Default::default()
    };
    launch_gating(py, OP, &call, TopkGatingPass::Replay, &z, cfg, ptrs)
}

/// Backward of top-k gating and of replay: `grad_weights` `[T, k]` float32 →
/// `grad_logits` `[T, E]` (dtype of `logits`). Options as `topk_gating_replay`.
#[pyfunction]
#[pyo3(signature = (logits, indices, grad_weights, grad_logits, **opts))]
pub(crate) fn topk_gating_backward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    indices: &Bound<'py, PyAny>,
    grad_weights: &Bound<'py, PyAny>,
    grad_logits: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "topk_gating_backward";
    let mut a = Args::new(OP);
    let (z, idx) = (a.input("logits", logits)?, a.input("indices", indices)?);
    let (gw, gz) = (
        a.input("grad_weights", grad_weights)?,
        a.output("grad_logits", grad_logits)?,
    );
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    idx.expect_elem(OP, Elem::I32)?;
    let [_, k] = idx.dims::<2>(OP)?;
    let o = Opts::new(OP, opts);
    let cfg = gating_config(OP, &o, k, false)?;
    o.done()?;
    gw.expect(OP, Elem::F32, &[t, k])?;
    gz.expect(OP, z.elem(), &[t, e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (idx, gw) = (idx.slice(OP, &call)?, gw.slice(OP, &call)?);
        return float_dispatch!(dt, T => {
            let (z, gz) = (z.slice::<T>(OP, &call)?, gz.slice_mut::<T>(OP, &call)?);
            run(py, OP, || moe_router::topk_gating_backward_into::<T>(z, t, e, idx, gw, &cfg, gz).map_err(to_py_err))
        });
    }
    let ptrs = TopkGatingRawPtrs {
        logits: z.dev_buf(),
        indices: idx.dev_buf(),
        grad_weights: gw.dev_buf(),
        grad_logits: gz.dev_buf(),
        ..Default::default()
    };
    launch_gating(py, OP, &call, TopkGatingPass::Backward, &z, cfg, ptrs)
}

/// Launch `pass` on the call's stream; the sizes and dtype are those of `logits`.
fn launch_gating(
    py: Python<'_>,
    op: &'static str,
    call: &Call,
    pass: TopkGatingPass,
    logits: &Tensor<'_>,
    cfg: TopkGatingConfig,
    ptrs: TopkGatingRawPtrs,
) -> PyResult<()> {
    let dt = logits.float(op)?;
    let [t, e] = logits.dims::<2>(op)?;
    crate::device::launch(py, op, call, move |be, stream| {
        // SAFETY: every buffer is the data and element count of a tensor the binding
        // checked for this pass's dtypes (contiguous, on `call`'s device, outputs
        // overlapping nothing), kept alive by its DLPack capsule until the launch is
        // queued; torch's caching allocator does not reuse that memory before the
        // stream's queued work has run. `stream` is torch's current stream of that
        // device, whose context is the device's primary context, the one the backend
        // retains.
        unsafe { topk_gating_raw(be, stream, pass, dt, t, e, &cfg, ptrs) }
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk_gating, m)?)?;
    m.add_function(wrap_pyfunction!(topk_gating_replay, m)?)?;
    m.add_function(wrap_pyfunction!(topk_gating_backward, m)?)?;
    Ok(())
}
