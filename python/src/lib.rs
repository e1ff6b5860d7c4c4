//! `moe_router._native`: the native half of the `moe_router` PyTorch extension.
//!
//! One file per op, named as the op. Every function takes `torch.Tensor`s (inputs and
//! the outputs it fills) and keyword options; it reads each tensor's shape, dtype,
//! device and strides itself through DLPack (`tensor.rs`), checks them against the
//! op's main inputs, releases the GIL and runs the core crate: the CPU reference for
//! CPU tensors, the CUDA kernels on torch's current stream for CUDA tensors
//! (`device.rs`). Core errors map to Python exceptions in `error.rs`. The torch side
//! (custom ops, fake kernels, autograd) is `moe_router/ops.py`. All `unsafe` code of
//! the package is in this crate, each block with a `// SAFETY:` comment.

#![deny(unsafe_op_in_unsafe_fn)]

use pyo3::prelude::*;

mod aux_loss;
mod bias_update;
mod capacity;
mod common;
mod device;
mod dispatch;
mod dropout;
mod error;
mod expert_choice;
mod permute;
mod router_stats;
mod tensor;
mod topk_gating;
mod z_loss;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("SCORE_FUNCTIONS", common::SCORE_FUNCTIONS)?;
    topk_gating::register(m)?;
    capacity::register(m)?;
    dispatch::register(m)?;
    expert_choice::register(m)?;
    permute::register(m)?;
    dropout::register(m)?;
    bias_update::register(m)?;
    router_stats::register(m)?;
    aux_loss::register(m)?;
    z_loss::register(m)?;
    m.add_function(wrap_pyfunction!(device::cuda_device_count, m)?)?;
    m.add_function(wrap_pyfunction!(device::cuda_warmup, m)?)?;
    m.add_function(wrap_pyfunction!(device::_emulate_cuda_on_cpu, m)?)?;
    m.add_function(wrap_pyfunction!(device::_cuda_calls, m)?)?;
    Ok(())
}
