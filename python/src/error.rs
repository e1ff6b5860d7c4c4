//! Mapping of `moe_router::Error` (and of this module's own checks) to Python exceptions.
//!
//! - `Shape`, `InvalidArgument`, `Layout`, `Overflow`, `NonFinite` → `ValueError`
//!   (the call is wrong or the data is; the message names the argument and the fix);
//! - `Unsupported` → `ValueError` too: the sizes are outside what the backend handles
//!   (e.g. more than 2048 experts or k > 32 on the CUDA kernels) and the message says
//!   what is valid;
//! - a dtype this module does not know → `TypeError` (raised in `tensor.rs`);
//! - anything else (future driver / compiler errors) → `RuntimeError`.

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

/// Convert a core error to the Python exception described in the module docs.
pub(crate) fn to_py_err(err: moe_router::Error) -> PyErr {
    use moe_router::Error as E;
    let msg = err.to_string();
    match err {
        E::Shape { .. }
        | E::InvalidArgument { .. }
        | E::Layout { .. }
        | E::Overflow { .. }
        | E::NonFinite { .. }
        | E::Unsupported { .. } => PyValueError::new_err(msg),
        _ => PyRuntimeError::new_err(msg),
    }
}

/// A `ValueError` for a call whose sizes do not agree (raised before any memory is read).
pub(crate) fn value_error(op: &str, msg: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(format!("{op}: {msg}"))
}

/// A `TypeError` for an unknown dtype string.
pub(crate) fn dtype_error(op: &str, arg: &str, dtype: &str, valid: &str) -> PyErr {
    PyTypeError::new_err(format!(
        "{op}: `{arg}` has dtype {dtype:?}; valid dtypes are {valid}"
    ))
}

/// A `RuntimeError` for a broken internal invariant (a bug, never the caller's fault).
pub(crate) fn internal_error(op: &str, msg: impl std::fmt::Display) -> PyErr {
    PyRuntimeError::new_err(format!(
        "{op}: internal error in the moe_router native module ({msg}); please report it"
    ))
}
