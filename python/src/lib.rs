//! `moe_router._native`: the native half of the `moe_router` PyTorch extension.
//!
//! Thin PyO3 bindings of the `moe-router` crate's `*_into` functions. Every function
//! takes tensors as `(data_ptr, numel)` pairs plus explicit sizes and a dtype string,
//! checks what it can about the memory and every element count (`tensor.rs`), releases
//! the GIL, calls the core crate and maps its error to a Python exception (`error.rs`).
//! The module never imports torch and links nothing of libtorch; the torch side
//! (custom ops, fake kernels, autograd, argument validation) is `moe_router/ops.py` and
//! `moe_router/functional.py`. All `unsafe` code of the package is in this crate, each
//! block with a `// SAFETY:` comment.

#![deny(unsafe_op_in_unsafe_fn)]

use pyo3::prelude::*;

// Bindings are compiled as their core op lands on main (each file is written against the
// signatures in PYAPI.md); until then the Python layer reports the op as not built.
// Pending: bias, capacity, common, dispatch, dropout, expert_choice, losses, permute,
// stats, topk_gating.
#[allow(dead_code)]
mod error;
#[allow(dead_code)]
mod tensor;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA", cfg!(feature = "cuda"))?;
    Ok(())
}
