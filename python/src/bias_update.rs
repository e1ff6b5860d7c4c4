//! `update_expert_bias` (aux-loss-free balancing, in place): tensors in, the core's CPU
//! reference or CUDA kernel on the tensors' device.

use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::to_py_err;
use crate::tensor::{run, Args, Elem, Opts};

/// `bias[e] += rate · sign(mean(counts) − counts[e])`, in place: `bias` `[num_experts]`
/// float32 (contiguous; the tensor the op mutates), `counts` `[num_experts]` int64.
/// Option: `rate`. On CPU, negative counts are a `ValueError` and leave `bias`
/// unchanged; the CUDA kernel cannot see them without a host read and applies the same
/// formula to them.
#[pyfunction]
#[pyo3(signature = (bias, counts, **opts))]
pub(crate) fn update_expert_bias<'py>(
    py: Python<'py>,
    bias: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    opts: Option<&Bound<'py, PyDict>>,
) -> PyResult<()> {
    const OP: &str = "update_expert_bias";
    let o = Opts::new(OP, opts);
    let rate: f32 = o.req("rate", "a finite float")?;
    o.done()?;
    let mut a = Args::new(OP);
    // `bias` is read and written: an output, so that it may overlap nothing else.
    let (bias, counts) = (a.output("bias", bias)?, a.input("counts", counts)?);
    bias.expect_elem(OP, Elem::F32)?;
    let [e] = bias.dims::<1>(OP)?;
    counts.expect(OP, Elem::I64, &[e])?;
    let call = a.finish(py)?;
    if call.on_cpu() {
        let (b, c) = (
            bias.slice_mut::<f32>(OP, &call)?,
            counts.slice::<i64>(OP, &call)?,
        );
        return run(py, OP, || {
            moe_router::update_expert_bias(b, c, rate).map_err(to_py_err)
        });
    }
    let (b, c) = (bias.dev_buf(), counts.dev_buf());
    // SAFETY: `b` and `c` are the data and element counts of `bias` (float32) and
    // `counts` (int64), both contiguous on `call`'s device and disjoint (checked above:
    // `bias` is an output), kept alive by their DLPack capsules until the launch is
    // queued; torch's caching allocator does not reuse that memory before the stream's
    // queued work has run. `stream` is torch's current stream of that device, whose
    // context is the device's primary context, the one the backend retains.
    crate::device::launch(py, OP, &call, move |be, stream| unsafe {
        moe_router::cuda::bias_update::update_expert_bias_raw(be, stream, b, c, rate)
    })
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(update_expert_bias, m)?)?;
    Ok(())
}
