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

mod bias;
mod capacity;
mod common;
#[cfg(feature = "cuda")]
mod cuda;
mod dispatch;
mod dropout;
mod error;
mod expert_choice;
mod losses;
mod permute;
mod stats;
mod tensor;
mod topk_gating;

/// Whether this build has the CUDA bindings (`cuda_*` functions; the `cuda` feature,
/// on by default). Says nothing about a device being present: see `cuda_device_count`.
#[pyfunction]
fn has_cuda() -> bool {
    cfg!(feature = "cuda")
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("CUDA", cfg!(feature = "cuda"))?;
    topk_gating::register(m)?;
    capacity::register(m)?;
    dispatch::register(m)?;
    expert_choice::register(m)?;
    permute::register(m)?;
    losses::register_aux(m)?;
    losses::register_z(m)?;
    dropout::register(m)?;
    bias::register(m)?;
    stats::register(m)?;
    m.add_function(wrap_pyfunction!(has_cuda, m)?)?;
    #[cfg(feature = "cuda")]
    cuda::register(m)?;
    Ok(())
}
