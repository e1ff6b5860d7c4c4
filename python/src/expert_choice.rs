//! `expert_choice`, `expert_choice_backward`: tensors in, the core's CPU reference or
//! CUDA kernels on the tensors' device.

use pyo3::prelude::*;

use crate::common::float_dispatch;
use crate::error::to_py_err;
use crate::tensor::{run, Args, Call, Elem};
use moe_router::cuda::expert_choice::{expert_choice_raw, ExpertChoicePass, ExpertChoiceRawPtrs};
use moe_router::{DType, ExpertChoiceBuffers};

/// Rows of the expert-choice buffer, `num_experts * capacity`, validated as
/// `expert_choice` does: call it before allocating the `[E * capacity]` outputs.
#[pyfunction]
pub(crate) fn expert_choice_num_rows(
    num_tokens: &Bound<'_, PyAny>,
    num_experts: &Bound<'_, PyAny>,
    capacity: &Bound<'_, PyAny>,
) -> PyResult<usize> {
    let o = crate::tensor::Opts::new("expert_choice", None);
    let t: usize = o.arg("num_tokens", num_tokens, "an int >= 0")?;
    let e: usize = o.arg("num_experts", num_experts, "an int >= 1")?;
    let c: usize = o.arg("capacity", capacity, "an int >= 0")?;
    moe_router::expert_choice_num_rows(t, e, c).map_err(to_py_err)
}

/// Expert-choice routing: each expert picks its `capacity` best tokens of `logits`
/// `[T, E]` (capacity = rows of `row_to_token` / E). Fills `weights` `[T, E]` float32,
/// `row` `[T, E]` int32, `row_to_token` `[E * capacity]` int32, `row_weights`
/// `[E * capacity]` float32, `tokens_per_expert` `[E]` int32, `expert_offsets` `[E + 1]`
/// int32.
#[pyfunction]
#[allow(clippy::too_many_arguments)] // one argument per output tensor
pub(crate) fn expert_choice<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    row_to_token: &Bound<'py, PyAny>,
    row_weights: &Bound<'py, PyAny>,
    tokens_per_expert: &Bound<'py, PyAny>,
    expert_offsets: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const OP: &str = "expert_choice";
    let mut a = Args::new(OP);
    let z = a.input("logits", logits)?;
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    let w = a.output("weights", weights)?;
    w.expect(OP, Elem::F32, &[t, e])?;
    let row = a.output("row", row)?;
    row.expect(OP, Elem::I32, &[t, e])?;
    let r2t = a.output("row_to_token", row_to_token)?;
    r2t.expect_elem(OP, Elem::I32)?;
    let [rows] = r2t.dims::<1>(OP)?;
    let capacity = rows.checked_div(e).unwrap_or(0); // E = 0 is the core's error
    r2t.expect(OP, Elem::I32, &[e * capacity])?;
    let rw = a.output("row_weights", row_weights)?;
    rw.expect(OP, Elem::F32, &[rows])?;
    let tpe = a.output("tokens_per_expert", tokens_per_expert)?;
    tpe.expect(OP, Elem::I32, &[e])?;
    let offsets = a.output("expert_offsets", expert_offsets)?;
    offsets.expect(OP, Elem::I32, &[e + 1])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let bufs = ExpertChoiceBuffers {
            weights: w.slice_mut(OP, &call)?,
            row: row.slice_mut(OP, &call)?,
            row_to_token: r2t.slice_mut(OP, &call)?,
            row_weights: rw.slice_mut(OP, &call)?,
            tokens_per_expert: tpe.slice_mut(OP, &call)?,
            expert_offsets: offsets.slice_mut(OP, &call)?,
        };
        return float_dispatch!(dt, T => {
            let z = z.slice::<T>(OP, &call)?;
            run(py, OP, || moe_router::expert_choice_into::<T>(z, t, e, capacity, bufs).map_err(to_py_err))
        });
    }
    let ptrs = ExpertChoiceRawPtrs {
        logits: z.dev_buf(),
        weights: w.dev_buf(),
        row: row.dev_buf(),
        row_to_token: r2t.dev_buf(),
        row_weights: rw.dev_buf(),
        tokens_per_expert: tpe.dev_buf(),
        expert_offsets: offsets.dev_buf(),
        ..Default::default()
    };
    launch(
        py,
        OP,
        &call,
        ExpertChoicePass::Forward { capacity },
        dt,
        (t, e),
        ptrs,
    )
}

/// Backward of expert choice: `grad_weights` `[T, E]` float32 → `grad_logits` `[T, E]`
/// (dtype of `logits`), through the selection recorded in `row` `[T, E]` int32.
#[pyfunction]
pub(crate) fn expert_choice_backward<'py>(
    py: Python<'py>,
    logits: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    grad_weights: &Bound<'py, PyAny>,
    grad_logits: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const OP: &str = "expert_choice_backward";
    let mut a = Args::new(OP);
    let (z, row) = (a.input("logits", logits)?, a.input("row", row)?);
    let (gw, gz) = (
        a.input("grad_weights", grad_weights)?,
        a.output("grad_logits", grad_logits)?,
    );
    let dt = z.float(OP)?;
    let [t, e] = z.dims::<2>(OP)?;
    row.expect(OP, Elem::I32, &[t, e])?;
    gw.expect(OP, Elem::F32, &[t, e])?;
    gz.expect(OP, z.elem(), &[t, e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (row, gw) = (row.slice(OP, &call)?, gw.slice(OP, &call)?);
        return float_dispatch!(dt, T => {
            let (z, gz) = (z.slice::<T>(OP, &call)?, gz.slice_mut::<T>(OP, &call)?);
            run(py, OP, || moe_router::expert_choice_backward_into::<T>(z, t, e, row, gw, gz).map_err(to_py_err))
        });
    }
    let ptrs = ExpertChoiceRawPtrs {
        logits: z.dev_buf(),
        row: row.dev_buf(),
        grad_weights: gw.dev_buf(),
        grad_logits: gz.dev_buf(),
        ..Default::default()
    };
    launch(py, OP, &call, ExpertChoicePass::Backward, dt, (t, e), ptrs)
}

fn launch(
    py: Python<'_>,
    op: &'static str,
    call: &Call,
    pass: ExpertChoicePass,
    dt: DType,
    (t, e): (usize, usize),
    ptrs: ExpertChoiceRawPtrs,
) -> PyResult<()> {
    crate::device::launch(py, op, call, move |be, stream| {
        // SAFETY: every buffer is the data and element count of a tensor checked above
        // (contiguous, on `call`'s device, outputs overlapping nothing), kept alive by its
        // DLPack capsule until the launch is queued (torch's caching allocator does not
        // reuse it before the stream's queued work has run); `stream` is torch's current
        // stream of that device, on its primary context, which the backend retains.
        unsafe { expert_choice_raw(be, stream, pass, dt, t, e, ptrs) }
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(expert_choice_num_rows, m)?)?;
    m.add_function(wrap_pyfunction!(expert_choice, m)?)?;
    m.add_function(wrap_pyfunction!(expert_choice_backward, m)?)?;
    Ok(())
}
