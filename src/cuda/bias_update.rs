//! Aux-loss-free expert-bias update on the GPU (`cuda/bias_update.cu`): the same
//! exact integer sign rule as `src/cpu/bias_update.rs`, in place on a device
//! `bias [num_experts]` from device `counts [num_experts]`.
//!
//! Negative counts (rejected on the CPU path) cannot be detected without a host
//! sync; the kernel applies the same formula to them and touches nothing out of
//! range.

use super::borrow;
use super::{CudaBackend, CudaView, CudaViewMut};
use crate::error::{Error, Result};
use crate::ops::check_len;
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
    if n == 0 {
        return Err(Error::invalid(
            OP,
            "bias",
            "an empty slice",
            "bias must have num_experts >= 1 entries",
        ));
    }
    check_len(
        OP,
        "counts",
        counts.len(),
        n,
        format_args!("[num_experts] = [{n}] (the length of `bias`)"),
    )?;
    if !rate.is_finite() {
        return Err(Error::invalid(
            OP,
            "rate",
            rate,
            "the bias update rate must be finite",
        ));
    }
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

/// [`update_expert_bias_cuda`] on raw device pointers and a caller-owned stream
/// (PyTorch's current stream), without synchronising: `bias [num_experts]` f32 in
/// place, `counts [num_experts]` i64.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernel has finished.
/// 2. `bias` and `counts` are device addresses in that context, valid for
///    `num_experts` elements of their type, and stay valid until the kernel has
///    finished on `stream`.
/// 3. `bias` does not overlap `counts`.
///
/// # Errors
/// As [`update_expert_bias_cuda`].
pub unsafe fn update_expert_bias_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    bias: u64,
    counts: u64,
    num_experts: usize,
    rate: f32,
) -> Result<()> {
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    // SAFETY: (2) and (3).
    let mut b = unsafe {
        borrow!(
            f32,
            be.stream(),
            bias,
            num_experts,
            "update_expert_bias_raw"
        )
    }?;
    // SAFETY: (2).
    let c = unsafe {
        borrow!(
            i64,
            be.stream(),
            counts,
            num_experts,
            "update_expert_bias_raw"
        )
    }?;
    update_expert_bias_cuda(&be, &mut b.view_mut(), &c.view(), rate)
}
