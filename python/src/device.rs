//! CUDA plumbing of the bindings (feature `cuda`): one cached [`CudaBackend`] per
//! device, torch's current stream, and the launch wrapper every op's CUDA branch uses.
//!
//! The stream is never an argument: the binding asks torch for the current stream of
//! the tensors' device (`torch._C._cuda_getCurrentRawStream`), so no caller-supplied
//! handle reaches the driver. Kernels run on that stream without a host
//! synchronisation; results stay on the device.
//!
//! Emulator mode (tests only): with the CPU stand-in for `libcuda` of `emu/` loaded,
//! `_emulate_cuda_on_cpu(True)` sends CPU tensors down the CUDA branch (device 0,
//! legacy stream), where the emulator's "device memory" is host memory. It refuses to
//! turn on unless device 0 is that emulator, so it cannot hand host addresses to a GPU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use crate::error::to_py_err;
use crate::tensor::{run, torch_attr, Call, Device};
use moe_router::cuda::CudaBackend;

/// Device name the emulator's driver reports.
const EMULATOR_NAME: &str = "moe-router CPU emulator";

static EMULATE: AtomicBool = AtomicBool::new(false);

/// CUDA branch calls per op since the process started (the emulator tests check that
/// every op's CUDA branch ran; cheap enough to keep in every build).
static LAUNCHES: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

fn count_launch(op: &'static str) {
    if let Ok(mut v) = LAUNCHES.lock() {
        match v.iter_mut().find(|(n, _)| *n == op) {
            Some((_, c)) => *c += 1,
            None => v.push((op, 1)),
        }
    }
}

/// `{op: calls}` of the CUDA branch since the process started.
#[pyfunction]
pub(crate) fn _cuda_calls() -> std::collections::BTreeMap<&'static str, u64> {
    LAUNCHES
        .lock()
        .map(|v| v.iter().copied().collect())
        .unwrap_or_default()
}

/// Whether CPU tensors go down the CUDA branch (emulator tests).
pub(crate) fn emulated_cuda() -> bool {
    EMULATE.load(Ordering::Relaxed)
}

/// Number of CUDA devices the driver reports; 0 without `libcuda` (never panics).
#[pyfunction]
pub(crate) fn cuda_device_count() -> usize {
    moe_router::cuda::device_count()
}

/// Tests only: send CPU tensors down the CUDA branch, on the CPU emulator of `emu/`.
/// `RuntimeError` unless device 0 is that emulator.
#[pyfunction]
pub(crate) fn _emulate_cuda_on_cpu(py: Python<'_>, on: &Bound<'_, PyAny>) -> PyResult<()> {
    let on: bool =
        crate::tensor::Opts::new("_emulate_cuda_on_cpu", None).arg("on", on, "a bool")?;
    if on {
        let _restore = ContextGuard::save("_emulate_cuda_on_cpu")?;
        let be = backend("_emulate_cuda_on_cpu", 0)?;
        let name = py
            .detach(|| be.context().name())
            .map_err(|e| PyRuntimeError::new_err(format!("_emulate_cuda_on_cpu: {e}")))?;
        if name != EMULATOR_NAME {
            return Err(PyRuntimeError::new_err(format!(
                "_emulate_cuda_on_cpu: device 0 is {name:?}, not the {EMULATOR_NAME:?}: emulator mode \
                 would hand host addresses to a real device"
            )));
        }
    }
    EMULATE.store(on, Ordering::Relaxed);
    Ok(())
}

/// Create device `device`'s backend and compile (NVRTC, or the on-disk PTX cache) and
/// load every kernel module now, so that no later call does it: call it before
/// capturing a CUDA graph (module loading inside a capture would invalidate it) or to
/// keep compilation out of a timed region. Returns the number of modules loaded.
#[pyfunction]
pub(crate) fn cuda_warmup(py: Python<'_>, device: usize) -> PyResult<usize> {
    const OP: &str = "warmup";
    run(py, OP, move || {
        let _restore = ContextGuard::save(OP)?;
        let be = backend(OP, device)?;
        for m in moe_router::cuda::MODULES {
            if let Some(entry) = m.entries.first() {
                be.function(m.name, entry).map_err(to_py_err)?;
            }
        }
        Ok(moe_router::cuda::MODULES.len())
    })
}

/// The backend of device `ordinal`, created on first use and then shared by every call
/// (its kernel modules are compiled once per device and process).
pub(crate) fn backend(op: &str, ordinal: usize) -> PyResult<Arc<CudaBackend>> {
    static CACHE: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().map_err(|_| {
        PyRuntimeError::new_err(format!(
            "moe_router.{op}: the CUDA backend cache is poisoned (an earlier call panicked)"
        ))
    })?;
    if let Some(b) = cache.get(&ordinal) {
        return Ok(b.clone());
    }
    // `CudaBackend::new` checks that libcuda is present and that the device exists
    // (`device_count`, which never panics) before creating the context.
    let b = Arc::new(CudaBackend::new(ordinal).map_err(|e| {
        PyRuntimeError::new_err(format!(
            "moe_router.{op}: CUDA device {ordinal} is not usable: {e}"
        ))
    })?);
    cache.insert(ordinal, b.clone());
    Ok(b)
}

/// torch's current stream on CUDA device `index`, as the raw handle.
pub(crate) fn current_stream(py: Python<'_>, op: &str, index: usize) -> PyResult<u64> {
    static F: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    torch_attr(py, &F, "_C._cuda_getCurrentRawStream")?
        .call1((index,))?
        .extract::<u64>()
        .map_err(|e| {
            PyRuntimeError::new_err(format!("moe_router.{op}: no current CUDA stream: {e}"))
        })
}

/// Run the CUDA branch of `op`: `f(backend, stream)` with the GIL released.
pub(crate) fn launch(
    py: Python<'_>,
    op: &'static str,
    call: &Call,
    f: impl FnOnce(&CudaBackend, cudarc::driver::sys::CUstream) -> moe_router::Result<()> + Send,
) -> PyResult<()> {
    let Device::Cuda(ordinal) = call.device else {
        return Err(crate::error::internal_error(
            op,
            "CUDA launch for a CPU call",
        ));
    };
    let stream = call.stream;
    count_launch(op);
    run(py, op, move || {
        let _restore = ContextGuard::save(op)?;
        let be = backend(op, ordinal)?;
        f(&be, stream as usize as cudarc::driver::sys::CUstream).map_err(to_py_err)
    })
}

/// Restores the thread's current CUDA context on drop. The backend binds its device's
/// primary context to the calling thread; without the guard, an op on `cuda:1` would
/// leave that context current and PyTorch's next runtime call on this thread would run
/// on device 1 while `torch.cuda.current_device()` still says 0.
/// `None`: no driver (nothing was or can be made current, and cudarc's loader must not
/// be touched: it panics without libcuda); `Some(prev)`: the context to put back.
struct ContextGuard(Option<Option<cudarc::driver::sys::CUcontext>>);

impl ContextGuard {
    fn save(op: &str) -> PyResult<Self> {
        // `device_available` loads libcuda without panicking; without a device the
        // backend's own error follows and there is nothing to restore.
        if !moe_router::cuda::device_available() {
            return Ok(ContextGuard(None));
        }
        cudarc::driver::result::ctx::get_current()
            .map(|c| ContextGuard(Some(c)))
            .map_err(|e| {
                PyRuntimeError::new_err(format!("moe_router.{op}: cuCtxGetCurrent failed: {e}"))
            })
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        let Some(prev) = self.0 else { return };
        let prev = prev.unwrap_or(std::ptr::null_mut());
        // Nothing to undo if the thread had no context and still has none, or had this one.
        if matches!(cudarc::driver::result::ctx::get_current(), Ok(cur) if cur.unwrap_or(std::ptr::null_mut()) == prev)
        {
            return;
        }
        // SAFETY: `prev` is the context that was current on this thread when the guard
        // was made (or null: no context), still alive: contexts PyTorch or this module
        // made current are primary contexts, retained for the life of the process.
        let _ = unsafe { cudarc::driver::result::ctx::set_current(prev) };
    }
}
