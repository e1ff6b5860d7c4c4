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
use super::{check_unused, CudaBackend, CudaView, CudaViewMut, DevBuf};
use crate::error::{Error, Result};
use crate::ops::check_len;
use crate::ops::dropout::{
    assignment_dropout_backward_lens, assignment_dropout_lens, validate_assignment_dropout,
    validate_assignment_dropout_backward, validate_expert_mask,
};
use crate::ops::DropoutConfig;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "dropout";
const OP_MASK: &str = "expert_mask";
const OP_DROP: &str = "assignment_dropout";

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
    validate_expert_mask(num_tokens, num_experts, topk, cfg, masked.len())?;
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

/// Routed assignments `[num_tokens, topk]` on the device: the input of
/// [`assignment_dropout_cuda`] and [`assignment_dropout_backward_cuda`]; the GPU form
/// of [`crate::ops::Assignments`].
#[derive(Debug)]
pub struct AssignmentsCuda<'a> {
    /// `[num_tokens, topk]` expert indices, `-1` where not routed.
    pub indices: CudaView<'a, i32>,
    /// `[num_tokens, topk]` routing weights.
    pub weights: CudaView<'a, f32>,
    /// Tokens (rows).
    pub num_tokens: usize,
    /// Assignments per token (columns).
    pub topk: usize,
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

/// Assignment dropout of `input` on the GPU; the same result as
/// [`crate::ops::assignment_dropout_into`].
///
/// # Errors
/// The config and length checks of [`crate::ops::assignment_dropout_into`] (index
/// range and distinctness are not checked: module docs), [`Error::Shape`] for
/// `out.dropped` not `[1]`, [`Error::Compile`] / [`Error::Driver`].
pub fn assignment_dropout_cuda(
    backend: &CudaBackend,
    input: AssignmentsCuda<'_>,
    num_experts: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
    mut out: AssignmentDropoutCudaBuffers<'_>,
) -> Result<()> {
    let (num_tokens, topk) = (input.num_tokens, input.topk);
    let lens = assignment_dropout_lens!(input, out);
    validate_assignment_dropout(num_tokens, topk, num_experts, cfg, lens)?;
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
        .arg(&input.indices)
        .arg(&input.weights)
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
/// from `grad_out`, given the forward's input (`input`) and its `keep`; the same as
/// [`crate::ops::assignment_dropout_backward_into`].
///
/// # Errors
/// The length checks of [`crate::ops::assignment_dropout_backward_into`] (the
/// value checks of `indices` / `keep` need the host: module docs),
/// [`Error::Compile`] / [`Error::Driver`].
pub fn assignment_dropout_backward_cuda(
    backend: &CudaBackend,
    input: AssignmentsCuda<'_>,
    keep: &CudaView<'_, bool>,
    renormalize: bool,
    grad_out: &CudaView<'_, f32>,
    grad_weights: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let (num_tokens, topk) = (input.num_tokens, input.topk);
    let lens = assignment_dropout_backward_lens!(input, keep, grad_out, grad_weights);
    validate_assignment_dropout_backward(num_tokens, topk, lens)?;
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
        .arg(&input.indices)
        .arg(&input.weights)
        .arg(keep)
        .arg(grad_out)
        .arg(grad_weights);
    // SAFETY: matches `assignment_dropout_bwd(DropoutParams, const int*, const
    // float*, const unsigned char*, const float*, float*)`; lengths checked above.
    unsafe { b.launch(per_token(num_tokens)) }?;
    Ok(())
}

/// Device buffers of an assignment-dropout call (forward or backward), each
/// `[num_tokens, topk]` but `dropped` (`[1]` u64). A buffer the pass does not use is
/// [`DevBuf::NONE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AssignmentDropoutRawPtrs {
    /// Input `indices` i32.
    pub indices: DevBuf,
    /// Input `weights` f32.
    pub weights: DevBuf,
    /// Forward output / backward input: `keep` (bytes, 0 or 1).
    pub keep: DevBuf,
    /// Forward output: surviving `indices` i32.
    pub out_indices: DevBuf,
    /// Forward output: surviving `weights` f32.
    pub out_weights: DevBuf,
    /// Forward output: `dropped [1]` u64.
    pub dropped: DevBuf,
    /// Backward input: `grad_out` f32.
    pub grad_out: DevBuf,
    /// Backward output: `grad_weights` f32.
    pub grad_weights: DevBuf,
}

/// Which assignment-dropout pass [`assignment_dropout_raw`] runs, with the options
/// only that pass takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AssignmentDropoutPass {
    /// [`assignment_dropout_cuda`]: `indices`, `weights` → `out_indices`,
    /// `out_weights`, `keep`, `dropped`.
    Forward {
        /// Experts (the range of the indices).
        num_experts: usize,
        /// Rate and random stream.
        cfg: DropoutConfig,
    },
    /// [`assignment_dropout_backward_cuda`]: `indices`, `weights`, `keep`, `grad_out`
    /// → `grad_weights`.
    Backward,
}

/// [`expert_mask_cuda`] on a raw `masked [num_tokens, num_experts]` (bytes) and a
/// caller-owned stream, without synchronising. Its length is checked by the op's
/// validator before anything is launched.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernel has finished.
/// 2. `masked` holds `masked.len` bytes at `masked.ptr` in that context, valid until
///    the kernel has finished on `stream`.
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
    masked: DevBuf,
) -> Result<()> {
    validate_expert_mask(num_tokens, num_experts, topk, cfg, masked.len)?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    // SAFETY: (2).
    let mut m = unsafe { borrow!(bool, be.stream(), masked, "expert_mask_raw") }?;
    expert_mask_cuda(&be, num_tokens, num_experts, topk, cfg, &mut m.view_mut())
}

/// [`assignment_dropout_cuda`] or [`assignment_dropout_backward_cuda`] (see `pass`)
/// on raw device buffers and a caller-owned stream, without synchronising: the same
/// checks (the op's validator, on the buffers' lengths) and kernels; nothing is
/// launched unless every length is right. The buffers the pass does not use must be
/// empty.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every buffer of `ptrs` the pass uses holds `len` elements of its documented
///    type ([`AssignmentDropoutRawPtrs`]) at `ptr` in that context, and stays valid
///    until the kernels have finished on `stream`.
/// 3. Output buffers do not overlap any other buffer of the call.
///
/// # Errors
/// As the safe functions; [`Error::InvalidArgument`] for a non-empty buffer the pass
/// does not use.
pub unsafe fn assignment_dropout_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: AssignmentDropoutPass,
    num_tokens: usize,
    topk: usize,
    renormalize: bool,
    ptrs: AssignmentDropoutRawPtrs,
) -> Result<()> {
    const RAW: &str = "assignment_dropout_raw";
    let p = &ptrs;
    match pass {
        AssignmentDropoutPass::Forward { .. } => {
            check_unused(RAW, "grad_out", p.grad_out)?;
            check_unused(RAW, "grad_weights", p.grad_weights)?;
        }
        AssignmentDropoutPass::Backward => {
            check_unused(RAW, "out_indices", p.out_indices)?;
            check_unused(RAW, "out_weights", p.out_weights)?;
            check_unused(RAW, "dropped", p.dropped)?;
        }
    }
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: (2) and (3) for the three buffers both passes use.
    let (idx, w, mut keep) = unsafe {
        (
            borrow!(i32, s, ptrs.indices, RAW)?,
            borrow!(f32, s, ptrs.weights, RAW)?,
            borrow!(bool, s, ptrs.keep, RAW)?,
        )
    };
    let input = AssignmentsCuda {
        indices: idx.view(),
        weights: w.view(),
        num_tokens,
        topk,
    };
    match pass {
        AssignmentDropoutPass::Forward { num_experts, cfg } => {
            // SAFETY: (2) and (3) for the forward's outputs.
            let (mut oi, mut ow, mut dr) = unsafe {
                (
                    borrow!(i32, s, ptrs.out_indices, RAW)?,
                    borrow!(f32, s, ptrs.out_weights, RAW)?,
                    borrow!(u64, s, ptrs.dropped, RAW)?,
                )
            };
            let out = AssignmentDropoutCudaBuffers {
                indices: oi.view_mut(),
                weights: ow.view_mut(),
                keep: keep.view_mut(),
                dropped: dr.view_mut(),
            };
            assignment_dropout_cuda(&be, input, num_experts, &cfg, renormalize, out)
        }
        AssignmentDropoutPass::Backward => {
            // SAFETY: (2) and (3) for the backward's gradient buffers.
            let (go, mut gw) = unsafe {
                (
                    borrow!(f32, s, ptrs.grad_out, RAW)?,
                    borrow!(f32, s, ptrs.grad_weights, RAW)?,
                )
            };
            assignment_dropout_backward_cuda(
                &be,
                input,
                &keep.view(),
                renormalize,
                &go.view(),
                &mut gw.view_mut(),
            )
        }
    }
}
