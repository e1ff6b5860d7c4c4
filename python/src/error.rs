//! Mapping of `moe_router::Error` (and of this module's own checks) to Python exceptions.
//! Every message starts with `moe_router.<op>:`.
//!
//! - `Shape`, `InvalidArgument`, `Layout`, `Overflow`, `NonFinite` → `ValueError`
//!   (the call is wrong or the data is; the message names the argument and the fix);
//! - `Unsupported` → `ValueError` too: the sizes are outside what the backend handles
//!   (e.g. more than 2048 experts or k > 32 on the CUDA kernels) and the message says
//!   what is valid;
//! - a wrong dtype or a non-tensor argument → `TypeError` (raised in `tensor.rs`);
//! - anything else (driver / compiler errors) → `RuntimeError`.

use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::PyErr;

/// Convert a core error to the Python exception described in the module docs.
pub(crate) fn to_py_err(err: moe_router::Error) -> PyErr {
    use moe_router::Error as E;
    match err {
        E::Shape { .. }
        | E::InvalidArgument { .. }
        | E::Layout { .. }
        | E::Overflow { .. }
        | E::NonFinite { .. }
        | E::Unsupported { .. } => PyValueError::new_err(format!("moe_router.{err}")),
        // Driver / compiler / device errors carry no op name.
        _ => PyRuntimeError::new_err(format!("moe_router: {err}")),
    }
}

/// A `ValueError` for a call whose arguments do not agree (raised before any memory is
/// read).
pub(crate) fn value_error(op: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("moe_router.{op}: {msg}"))
}

/// A `RuntimeError` for a broken internal invariant (a bug, never the caller's fault).
pub(crate) fn internal_error(op: &str, msg: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!(
        "moe_router.{op}: internal error in the moe_router native module ({msg}); please report it"
    ))
}
