//! Aux-loss-free expert-bias update on the GPU (`cuda/bias_update.cu`): the same
//! exact integer sign rule as `src/cpu/bias_update.rs`, in place on a device
//! `bias [num_experts]` from device `counts [num_experts]`.
//!
//! Negative counts (rejected on the CPU path) cannot be detected without a host
//! sync; the kernel applies the same formula to them and touches nothing out of
//! range.

use super::borrow;
use super::{CudaBackend, CudaView, CudaViewMut, DevBuf};
use crate::error::{Error, Result};
use crate::ops::bias_update::validate_update_expert_bias;
use cudarc::driver::{LaunchConfig, PushKernelArg};

const OP: &str = "update_expert_bias";

/// `bias[e] += rate · sign(mean(counts) − counts[e])` on the GPU (launched on
/// `backend.stream()`, no synchronisation).
///
/// # Errors
/// The length and rate checks of [`crate::ops::update_expert_bias`],
/// [`Error::Overflow`] for more than `i32::MAX` experts, [`Error::Compile`] /
/// [`Error::Driver`].
pub fn update_expert_bias_cuda(
    backend: &CudaBackend,
    bias: &mut CudaViewMut<'_, f32>,
    counts: &CudaView<'_, i64>,
    rate: f32,
) -> Result<()> {
    let n = bias.len();
    validate_update_expert_bias(n, counts.len(), rate)?;
    let e = i32::try_from(n).map_err(|_| Error::Overflow {
        op: OP,
        what: "num_experts",
        value: n as u128,
        max: i32::MAX as i64,
    })?;
    let f = backend.function("bias_update", "update_expert_bias")?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(bias).arg(counts).arg(&e).arg(&rate);
    // SAFETY: matches `update_expert_bias(float* bias, const long long* counts, int
    // num_experts, float rate)`; both buffers hold num_experts elements.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

/// [`update_expert_bias_cuda`] on raw device buffers and a caller-owned stream
/// (PyTorch's current stream), without synchronising: `bias [num_experts]` f32 in
/// place, `counts [num_experts]` i64 (`num_experts = bias.len`). The lengths are
/// checked by the op's validator before anything is launched.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernel has finished.
/// 2. `bias` and `counts` each hold `len` elements of their type at `ptr` in that
///    context, and stay valid until the kernel has finished on `stream`.
/// 3. `bias` does not overlap `counts`.
///
/// # Errors
/// As [`update_expert_bias_cuda`].
pub unsafe fn update_expert_bias_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    bias: DevBuf,
    counts: DevBuf,
    rate: f32,
) -> Result<()> {
    validate_update_expert_bias(bias.len, counts.len, rate)?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    // SAFETY: (2) and (3).
    let mut b = unsafe { borrow!(f32, be.stream(), bias, "update_expert_bias_raw") }?;
    // SAFETY: (2).
    let c = unsafe { borrow!(i64, be.stream(), counts, "update_expert_bias_raw") }?;
    update_expert_bias_cuda(&be, &mut b.view_mut(), &c.view(), rate)
}
