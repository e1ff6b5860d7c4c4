//! Expert masking and assignment dropout on the GPU (`cuda/dropout.cu`), with the
//! validation of [`crate::ops::dropout`]; the same Philox bits as
//! [`crate::cpu::dropout`], so masks, keep flags and dropped counts equal the CPU's
//! exactly and weights match to rounding of the same f32 operations.
//!
//! What would need a host sync is not checked: the range and distinctness of
//! device-resident `indices` (the kernels never address memory with them, so no
//! value can cause an out-of-bounds access; a non-negative index counts as routed),
//! and the consistency of `keep` with `indices` in the backward.

use super::borrow;
use super::{CudaBackend, CudaView, CudaViewMut};
use crate::error::{Error, Result};
use crate::ops::{check_len, checked_i32_product, DropoutConfig};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "dropout";
const OP_MASK: &str = "expert_mask";
const OP_DROP: &str = "assignment_dropout";
const OP_DROP_BWD: &str = "assignment_dropout_backward";

/// Largest `num_experts` the expert-masking kernel takes.
pub const DROPOUT_CUDA_MAX_EXPERTS: usize = super::kernels::abi::common::MAX_EXPERTS;
const WARP_MAX_EXPERTS: usize = super::kernels::abi::common::WARP_MAX_EXPERTS;
const WARP_GROUPS_PER_BLOCK: u32 = super::kernels::abi::common::WARP_GROUPS_PER_BLOCK;

/// Kernel parameters: `struct DropoutParams` of `cuda/dropout.cu`, field for field
/// (build.rs fails the build when the two disagree).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DropoutParams {
    seed: u64,
    offset: u64,
    rate: f32,
    num_tokens: i32,
    num_experts: i32,
    topk: i32,
    renormalize: i32,
    pad: i32,
}

// SAFETY: `#[repr(C)]`, `Copy`, plain numbers, the layout of the C struct (whose
// trailing 4 bytes of padding `pad` makes explicit).
unsafe impl DeviceRepr for DropoutParams {}

fn check_topk(op: &'static str, num_experts: usize, topk: usize) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::invalid(
            op,
            "num_experts",
            0,
            "num_experts must be at least 1",
        ));
    }
    if topk == 0 || topk > num_experts {
        return Err(Error::invalid(
            op,
            "topk",
            topk,
            format!("topk must be in [1, num_experts] = [1, {num_experts}]"),
        ));
    }
    Ok(())
}

fn per_token(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Expert-masking mask of every token into `masked [num_tokens, num_experts]`
/// (`true` = masked) on the GPU; the same mask as [`crate::ops::expert_mask_into`].
///
/// # Errors
/// As [`crate::ops::expert_mask_into`], plus [`Error::Unsupported`] for
/// `num_experts > 2048`, [`Error::Compile`] / [`Error::Driver`].
pub fn expert_mask_cuda(
    backend: &CudaBackend,
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut CudaViewMut<'_, bool>,
) -> Result<()> {
    crate::ops::dropout::validate_expert_mask(num_tokens, num_experts, topk, cfg, masked.len())?;
    if num_experts > DROPOUT_CUDA_MAX_EXPERTS {
        return Err(Error::Unsupported {
            op: OP_MASK,
            what: format!("the CUDA kernel takes num_experts <= {DROPOUT_CUDA_MAX_EXPERTS}, got num_experts = {num_experts}; use the CPU backend"),
        });
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let p = DropoutParams {
        seed: cfg.seed,
        offset: cfg.offset,
        rate: cfg.rate,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        topk: topk as i32,
        ..Default::default()
    };
    let t = num_tokens as u32;
    let (name, lc) = if num_experts <= WARP_MAX_EXPERTS {
        (
            "expert_mask",
            LaunchConfig {
                grid_dim: (t.div_ceil(WARP_GROUPS_PER_BLOCK), 1, 1),
                block_dim: (32 * WARP_GROUPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    } else {
        (
            "expert_mask_large",
            LaunchConfig {
                grid_dim: (t, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    };
    let f = backend.function(MODULE, name)?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(&p).arg(masked);
    // SAFETY: matches `expert_mask*(DropoutParams, unsigned char* masked)`; masked
    // holds num_tokens * num_experts bytes (validated), each written with 0 or 1.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Output buffers of [`assignment_dropout_cuda`], each `[num_tokens, topk]` but
/// `dropped` (`[1]`, zeroed by the call, then the number of routed assignments
/// dropped).
#[derive(Debug)]
pub struct AssignmentDropoutCudaBuffers<'a> {
    /// Surviving indices, `-1` where dropped or unrouted.
    pub indices: CudaViewMut<'a, i32>,
    /// Surviving weights (renormalised if asked), 0 where dropped.
    pub weights: CudaViewMut<'a, f32>,
    /// Whether each assignment survived.
    pub keep: CudaViewMut<'a, bool>,
    /// `[1]`: routed assignments dropped.
    pub dropped: CudaViewMut<'a, u64>,
}

/// Assignment dropout of `indices`/`weights [num_tokens, topk]` on the GPU; the same
/// result as [`crate::ops::assignment_dropout_into`].
///
/// # Errors
/// The config and length checks of [`crate::ops::assignment_dropout_into`] (index
/// range and distinctness are not checked: module docs), [`Error::Compile`] /
/// [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn assignment_dropout_cuda(
    backend: &CudaBackend,
    indices: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
    mut out: AssignmentDropoutCudaBuffers<'_>,
) -> Result<()> {
    check_topk(OP_DROP, num_experts, topk)?;
    cfg.validate(OP_DROP, "rate")?;
    let n = checked_i32_product(OP_DROP, "num_tokens * topk", num_tokens, topk)?;
    let shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP_DROP, "indices", indices.len(), n, &shape)?;
    check_len(OP_DROP, "weights", weights.len(), n, &shape)?;
    check_len(OP_DROP, "out.indices", out.indices.len(), n, &shape)?;
    check_len(OP_DROP, "out.weights", out.weights.len(), n, &shape)?;
    check_len(OP_DROP, "out.keep", out.keep.len(), n, &shape)?;
    check_len(OP_DROP, "out.dropped", out.dropped.len(), 1, "[1]")?;
    let stream = backend.stream();
    stream.memset_zeros(&mut out.dropped)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let p = DropoutParams {
        seed: cfg.seed,
        offset: cfg.offset,
        rate: cfg.rate,
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        topk: topk as i32,
        renormalize: i32::from(renormalize),
        pad: 0,
    };
    let f = backend.function(MODULE, "assignment_dropout_fwd")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(indices)
        .arg(weights)
        .arg(&mut out.indices)
        .arg(&mut out.weights)
        .arg(&mut out.keep)
        .arg(&mut out.dropped);
    // SAFETY: matches `assignment_dropout_fwd(DropoutParams, const int*, const
    // float*, int*, float*, unsigned char*, unsigned long long*)`; the five
    // [num_tokens, topk] buffers and dropped [1] were checked above.
    unsafe { b.launch(per_token(num_tokens)) }?;
    Ok(())
}

/// Backward of assignment dropout on the GPU: `grad_weights [num_tokens, topk]`
/// from `grad_out`, given the forward's input `indices`, `weights` and its `keep`;
/// the same as [`crate::ops::assignment_dropout_backward_into`].
///
/// # Errors
/// The length checks of [`crate::ops::assignment_dropout_backward_into`] (the
/// value checks of `indices` / `keep` need the host: module docs),
/// [`Error::Compile`] / [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn assignment_dropout_backward_cuda(
    backend: &CudaBackend,
    indices: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    keep: &CudaView<'_, bool>,
    num_tokens: usize,
    topk: usize,
    renormalize: bool,
    grad_out: &CudaView<'_, f32>,
    grad_weights: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    if topk == 0 {
        return Err(Error::invalid(
            OP_DROP_BWD,
            "topk",
            0,
            "topk must be at least 1",
        ));
    }
    let n = checked_i32_product(OP_DROP_BWD, "num_tokens * topk", num_tokens, topk)?;
    let shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP_DROP_BWD, "indices", indices.len(), n, &shape)?;
    check_len(OP_DROP_BWD, "weights", weights.len(), n, &shape)?;
    check_len(OP_DROP_BWD, "keep", keep.len(), n, &shape)?;
    check_len(OP_DROP_BWD, "grad_out", grad_out.len(), n, &shape)?;
    check_len(OP_DROP_BWD, "grad_weights", grad_weights.len(), n, &shape)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let p = DropoutParams {
        num_tokens: num_tokens as i32,
        topk: topk as i32,
        renormalize: i32::from(renormalize),
        ..Default::default()
    };
    let f = backend.function(MODULE, "assignment_dropout_bwd")?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(&p)
        .arg(indices)
        .arg(weights)
        .arg(keep)
        .arg(grad_out)
        .arg(grad_weights);
    // SAFETY: matches `assignment_dropout_bwd(DropoutParams, const int*, const
    // float*, const unsigned char*, const float*, float*)`; lengths checked above.
    unsafe { b.launch(per_token(num_tokens)) }?;
    Ok(())
}

/// Device addresses of an assignment-dropout call (forward or backward), each
/// `[num_tokens, topk]` but `dropped` (`[1]` u64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssignmentDropoutRawPtrs {
    /// Input `indices` i32.
    pub indices: u64,
    /// Input `weights` f32.
    pub weights: u64,
    /// Forward output / backward input: `keep` (bytes, 0 or 1).
    pub keep: u64,
    /// Forward output: surviving `indices` i32.
    pub out_indices: u64,
    /// Forward output: surviving `weights` f32.
    pub out_weights: u64,
    /// Forward output: `dropped [1]` u64.
    pub dropped: u64,
    /// Backward input: `grad_out` f32.
    pub grad_out: u64,
    /// Backward output: `grad_weights` f32.
    pub grad_weights: u64,
}

/// [`expert_mask_cuda`] on a raw `masked [num_tokens, num_experts]` (bytes) and a
/// caller-owned stream, without synchronising.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernel has finished.
/// 2. `masked` is a device address in that context valid for
///    `num_tokens * num_experts` bytes until the kernel has finished on `stream`.
///
/// # Errors
/// As [`expert_mask_cuda`].
pub unsafe fn expert_mask_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: u64,
) -> Result<()> {
    let n = num_tokens.checked_mul(num_experts).ok_or(Error::Overflow {
        op: OP_MASK,
        what: "num_tokens * num_experts",
        value: num_tokens as u128 * num_experts as u128,
        max: i64::MAX,
    })?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    // SAFETY: (2).
    let mut m = unsafe { borrow!(bool, be.stream(), masked, n, "expert_mask_raw") }?;
    expert_mask_cuda(&be, num_tokens, num_experts, topk, cfg, &mut m.view_mut())
}

/// [`assignment_dropout_cuda`] (`backward = false`) or
/// [`assignment_dropout_backward_cuda`] (`backward = true`) on raw device pointers
/// and a caller-owned stream, without synchronising.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every pointer of `ptrs` the pass uses (see [`AssignmentDropoutRawPtrs`]) is a
///    device address in that context, valid for its documented shape and type, and
///    stays valid until the kernels have finished on `stream`.
/// 3. Output buffers do not overlap any other buffer of the call.
///
/// # Errors
/// As the safe functions.
#[allow(clippy::too_many_arguments)]
pub unsafe fn assignment_dropout_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    backward: bool,
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
    ptrs: AssignmentDropoutRawPtrs,
) -> Result<()> {
    let op = if backward { OP_DROP_BWD } else { OP_DROP };
    let n = checked_i32_product(op, "num_tokens * topk", num_tokens, topk)?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: for every BorrowedSlice here, (2) and (3).
    let (idx, w, mut keep) = unsafe {
        (
            borrow!(i32, s, ptrs.indices, n, "assignment_dropout_raw")?,
            borrow!(f32, s, ptrs.weights, n, "assignment_dropout_raw")?,
            borrow!(bool, s, ptrs.keep, n, "assignment_dropout_raw")?,
        )
    };
    if backward {
        // SAFETY: (2) and (3) of this entry's contract, for this buffer.
        let (go, mut gw) = unsafe {
            (
                borrow!(f32, s, ptrs.grad_out, n, "assignment_dropout_raw")?,
                borrow!(f32, s, ptrs.grad_weights, n, "assignment_dropout_raw")?,
            )
        };
        return assignment_dropout_backward_cuda(
            &be,
            &idx.view(),
            &w.view(),
            &keep.view(),
            num_tokens,
            topk,
            renormalize,
            &go.view(),
            &mut gw.view_mut(),
        );
    }
    // SAFETY: (2) and (3) of this entry's contract, for this buffer.
    let (mut oi, mut ow, mut dr) = unsafe {
        (
            borrow!(i32, s, ptrs.out_indices, n, "assignment_dropout_raw")?,
            borrow!(f32, s, ptrs.out_weights, n, "assignment_dropout_raw")?,
            borrow!(u64, s, ptrs.dropped, 1, "assignment_dropout_raw")?,
        )
    };
    assignment_dropout_cuda(
        &be,
        &idx.view(),
        &w.view(),
        num_tokens,
        topk,
        num_experts,
        cfg,
        renormalize,
        AssignmentDropoutCudaBuffers {
            indices: oi.view_mut(),
            weights: ow.view_mut(),
            keep: keep.view_mut(),
            dropped: dr.view_mut(),
        },
    )
}
