//! `permute`, `permute_backward`, `unpermute`, `unpermute_backward`: tensors in, the
//! core's CPU reference or CUDA kernels on the tensors' device.

use pyo3::prelude::*;

use crate::common::float_dispatch;
use crate::error::to_py_err;
use crate::tensor::{run, Args, Elem};
use moe_router::{PermuteSizes, UnpermuteBackwardBuffers};

/// `out[r] = x[row_to_token[r]]` (zeros where the token index is -1): `x` `[T, H]`,
/// `row_to_token` `[R]` int32, `out` `[R, H]` (dtype of `x`). With `row` `[T, k]` int32
/// (the backward's map), CPU calls check that both maps agree
/// (`moe_router::check_permute_maps`); CUDA calls do not read indices on the host.
#[pyfunction]
#[pyo3(signature = (x, row_to_token, out, row=None))]
pub(crate) fn permute<'py>(
    py: Python<'py>,
    x: &Bound<'py, PyAny>,
    row_to_token: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
    row: Option<&Bound<'py, PyAny>>,
) -> PyResult<()> {
    const OP: &str = "permute";
    let mut a = Args::new(OP);
    let (x, r2t, out) = (
        a.input("x", x)?,
        a.input("row_to_token", row_to_token)?,
        a.output("out", out)?,
    );
    let row = a.opt_input("row", row)?;
    let dt = x.float(OP)?;
    let [t, h] = x.dims::<2>(OP)?;
    r2t.expect_elem(OP, Elem::I32)?;
    let [r] = r2t.dims::<1>(OP)?;
    out.expect(OP, x.elem(), &[r, h])?;
    if let Some(row) = &row {
        row.expect_elem(OP, Elem::I32)?;
        let [_, k] = row.dims::<2>(OP)?;
        row.expect(OP, Elem::I32, &[t, k])?;
    }
    let call = a.finish(py)?;
    if call.on_cpu() {
        if let Some(row) = &row {
            let k = row.shape()[1];
            moe_router::check_permute_maps(r2t.slice(OP, &call)?, row.slice(OP, &call)?, t, k)
                .map_err(to_py_err)?;
        }
        return float_dispatch!(dt, T => {
            let (x, r2t, out) = (x.slice::<T>(OP, &call)?, r2t.slice(OP, &call)?, out.slice_mut::<T>(OP, &call)?);
            run(py, OP, || moe_router::permute_into::<T>(x, t, h, r2t, out).map_err(to_py_err))
        });
    }
    cuda::launch_permute(
        py,
        OP,
        &call,
        dt,
        PermuteSizes {
            num_tokens: t,
            num_rows: r,
            hidden: h,
            k: 0,
        },
        |p| {
            p.x = x.dev_buf();
            p.row_to_token = r2t.dev_buf();
            p.buf = out.dev_buf();
        },
    )
}

/// Backward of permute: `grad_x[t] = Σ_j grad_buf[row[t, j]]` over `row[t, j] >= 0`:
/// `grad_buf` `[R, H]`, `row` `[T, k]` int32, `grad_x` `[T, H]`.
#[pyfunction]
pub(crate) fn permute_backward<'py>(
    py: Python<'py>,
    grad_buf: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    grad_x: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const OP: &str = "permute_backward";
    let mut a = Args::new(OP);
    let (gb, row, gx) = (
        a.input("grad_buf", grad_buf)?,
        a.input("row", row)?,
        a.output("grad_x", grad_x)?,
    );
    let dt = gb.float(OP)?;
    let [r, h] = gb.dims::<2>(OP)?;
    row.expect_elem(OP, Elem::I32)?;
    let [t, k] = row.dims::<2>(OP)?;
    gx.expect(OP, gb.elem(), &[t, h])?;
    let s = PermuteSizes {
        num_tokens: t,
        num_rows: r,
        hidden: h,
        k,
    };
    let call = a.finish(py)?;
    if call.on_cpu() {
        return float_dispatch!(dt, T => {
            let (gb, row, gx) = (gb.slice::<T>(OP, &call)?, row.slice(OP, &call)?, gx.slice_mut::<T>(OP, &call)?);
            run(py, OP, || moe_router::permute_backward_into::<T>(s, gb, row, gx).map_err(to_py_err))
        });
    }
    cuda::launch_permute(py, OP, &call, dt, s, |p| {
        p.grad_buf = gb.dev_buf();
        p.row = row.dev_buf();
        p.grad_x = gx.dev_buf();
    })
}

/// `out[t] = Σ_j weights[t, j] · y[row[t, j]]` over `row[t, j] >= 0`, accumulated in f32:
/// `y` `[R, H]`, `row` `[T, k]` int32, `weights` `[T, k]` float32, `out` `[T, H]`.
#[pyfunction]
pub(crate) fn unpermute<'py>(
    py: Python<'py>,
    y: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    out: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const OP: &str = "unpermute";
    let mut a = Args::new(OP);
    let (y, row, w, out) = (
        a.input("y", y)?,
        a.input("row", row)?,
        a.input("weights", weights)?,
        a.output("out", out)?,
    );
    let dt = y.float(OP)?;
    let [r, h] = y.dims::<2>(OP)?;
    row.expect_elem(OP, Elem::I32)?;
    let [t, k] = row.dims::<2>(OP)?;
    w.expect(OP, Elem::F32, &[t, k])?;
    out.expect(OP, y.elem(), &[t, h])?;
    let s = PermuteSizes {
        num_tokens: t,
        num_rows: r,
        hidden: h,
        k,
    };
    let call = a.finish(py)?;
    if call.on_cpu() {
        return float_dispatch!(dt, T => {
            let (y, row, w, out) =
                (y.slice::<T>(OP, &call)?, row.slice(OP, &call)?, w.slice(OP, &call)?, out.slice_mut::<T>(OP, &call)?);
            run(py, OP, || moe_router::unpermute_into::<T>(s, y, row, w, out).map_err(to_py_err))
        });
    }
    cuda::launch_permute(py, OP, &call, dt, s, |p| {
        p.y = y.dev_buf();
        p.row = row.dev_buf();
        p.weights = w.dev_buf();
        p.out = out.dev_buf();
    })
}

/// Backward of unpermute: `grad_y` `[R, H]` (dtype of `y`) and `grad_weights` `[T, k]`
/// float32 from `grad_out` `[T, H]`.
#[pyfunction]
pub(crate) fn unpermute_backward<'py>(
    py: Python<'py>,
    grad_out: &Bound<'py, PyAny>,
    y: &Bound<'py, PyAny>,
    row: &Bound<'py, PyAny>,
    weights: &Bound<'py, PyAny>,
    grad_y: &Bound<'py, PyAny>,
    grad_weights: &Bound<'py, PyAny>,
) -> PyResult<()> {
    const OP: &str = "unpermute_backward";
    let mut a = Args::new(OP);
    let (go, y, row, w) = (
        a.input("grad_out", grad_out)?,
        a.input("y", y)?,
        a.input("row", row)?,
        a.input("weights", weights)?,
    );
    let (gy, gw) = (
        a.output("grad_y", grad_y)?,
        a.output("grad_weights", grad_weights)?,
    );
    let dt = y.float(OP)?;
    let [r, h] = y.dims::<2>(OP)?;
    row.expect_elem(OP, Elem::I32)?;
    let [t, k] = row.dims::<2>(OP)?;
    go.expect(OP, y.elem(), &[t, h])?;
    w.expect(OP, Elem::F32, &[t, k])?;
    gy.expect(OP, y.elem(), &[r, h])?;
    gw.expect(OP, Elem::F32, &[t, k])?;
    let s = PermuteSizes {
        num_tokens: t,
        num_rows: r,
        hidden: h,
        k,
    };
    let call = a.finish(py)?;
    if call.on_cpu() {
        return float_dispatch!(dt, T => {
            let (go, y, row, w) =
                (go.slice::<T>(OP, &call)?, y.slice::<T>(OP, &call)?, row.slice(OP, &call)?, w.slice(OP, &call)?);
            let (gy, gw) = (gy.slice_mut::<T>(OP, &call)?, gw.slice_mut(OP, &call)?);
            run(py, OP, || {
                moe_router::unpermute_backward_into::<T>(s, go, y, row, w, UnpermuteBackwardBuffers { grad_y: gy, grad_weights: gw }).map_err(to_py_err)
            })
        });
    }
    let ws = call.scratch(
        py,
        OP,
        "workspace",
        "int32",
        moe_router::cuda::permute::unpermute_backward_workspace_len(r),
    )?;
    cuda::launch_permute(py, OP, &call, dt, s, |p| {
        p.grad_out = go.dev_buf();
        p.y = y.dev_buf();
        p.row = row.dev_buf();
        p.weights = w.dev_buf();
        p.grad_y = gy.dev_buf();
        p.grad_weights = gw.dev_buf();
        p.workspace = ws.dev_buf();
    })
}

mod cuda {
    use pyo3::prelude::*;

    use crate::device::launch;
    use crate::tensor::Call;
    use moe_router::cuda::permute::{permute_raw, PermutePass, PermuteRawPtrs};
    use moe_router::PermuteSizes;

    /// Launch the pass named by `op` with the addresses `fill` sets.
    pub(super) fn launch_permute(
        py: Python<'_>,
        op: &'static str,
        call: &Call,
        dt: moe_router::DType,
        sizes: PermuteSizes,
        fill: impl FnOnce(&mut PermuteRawPtrs),
    ) -> PyResult<()> {
        let pass = match op {
            "permute" => PermutePass::Permute,
            "permute_backward" => PermutePass::PermuteBackward,
            "unpermute" => PermutePass::Unpermute,
            _ => PermutePass::UnpermuteBackward,
        };
        let mut ptrs = PermuteRawPtrs::default();
        fill(&mut ptrs);
        // SAFETY: every buffer is the data and element count of a tensor the binding
        // checked for this pass's dtypes (contiguous, on `call`'s device, outputs
        // overlapping nothing), kept alive by its DLPack capsule until the launch is
        // queued; torch's caching allocator does not reuse that memory before the
        // stream's queued work has run. `call.stream` is torch's current stream of that
        // device, whose context is the device's primary context, the one the backend
        // retains.
        launch(py, op, call, move |be, stream| unsafe {
            permute_raw(be, stream, pass, dt, sizes, ptrs)
        })
    }
}

pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(permute, m)?)?;
    m.add_function(wrap_pyfunction!(permute_backward, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute, m)?)?;
    m.add_function(wrap_pyfunction!(unpermute_backward, m)?)?;
    Ok(())
}
