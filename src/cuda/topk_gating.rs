//! Top-k gating on the GPU: forward, routing replay and backward
//! (`cuda/topk_gating.cu`), with the validation of [`crate::ops::topk_gating()`].
//!
//! One warp per token for `num_experts <= 256` (4 tokens per block), one 256-thread
//! block per token for `num_experts <= 2048`; `topk <= 32`. Outputs match
//! `src/cpu/topk_gating.rs`: indices exactly (ties and NaN by the shared rank key),
//! weights and gradients within the tolerance of `docs/semantics.md` §1.7 (the
//! softmax sum over all experts is a tree reduction, the rest mirrors the CPU's order
//! of operations).
//!
//! What cannot be checked without reading device memory (a host-device sync) is not
//! checked: a non-finite `expert_bias` and replay `indices` out of range or repeated.
//! The kernels never access memory out of bounds for such input: an out-of-range
//! replay index gives a NaN weight and no gradient. Validate on the host with
//! [`crate::ops::topk_gating_replay_into`] when the indices are untrusted.

use super::{
    check_buf, check_unused, opt_len, CudaBackend, CudaStream, CudaView, CudaViewMut, DevBuf,
};
use crate::error::{Error, Result};
use crate::ops::topk_gating::{
    topk_gating_backward_lens, topk_gating_lens, topk_gating_replay_lens, validate_topk_gating,
};
use crate::ops::{ScoreFunction, TopkGatingConfig};
use crate::RouterFloat;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const OP: &str = "topk_gating";
const MODULE: &str = "topk_gating";

/// Largest `num_experts` the kernels take (one 256-thread block, 8 experts a thread).
pub const CUDA_MAX_EXPERTS: usize = super::kernels::abi::common::MAX_EXPERTS;
/// Largest `topk` the kernels take (one warp finishes the weights).
pub const CUDA_MAX_TOPK: usize = super::kernels::abi::topk_gating::MAX_TOPK;
/// Up to this many experts a token is handled by one warp.
const WARP_MAX_EXPERTS: usize = super::kernels::abi::common::WARP_MAX_EXPERTS;
const WARP_TOKENS_PER_BLOCK: u32 = super::kernels::abi::common::WARP_GROUPS_PER_BLOCK;

/// Kernel parameters: `struct GatingParams` of `cuda/topk_gating.cu`, field for field
/// (build.rs fails the build when the two disagree).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GatingParams {
    noise_seed: u64,
    noise_offset: u64,
    mask_seed: u64,
    mask_offset: u64,
    num_tokens: i32,
    num_experts: i32,
    topk: i32,
    sigmoid: i32,
    pre_softmax: i32,
    normalize: i32,
    num_groups: i32,
    group_topk: i32,
    scaling: f32,
    noise_std: f32,
    mask_rate: f32,
    has_bias: i32,
}

// SAFETY: `GatingParams` is `#[repr(C)]`, `Copy`, made of plain integers and floats,
// and has the same layout as the C struct the kernels take by value.
unsafe impl DeviceRepr for GatingParams {}

impl GatingParams {
    /// Validate the config for the CUDA kernels and pack it.
    ///
    /// # Errors
    /// Everything [`TopkGatingConfig::validate`] rejects; [`Error::Unsupported`] for
    /// `num_experts > 2048` or `topk > 32`; [`Error::Overflow`] for `num_tokens`
    /// beyond `i32`.
    pub fn new(
        cfg: &TopkGatingConfig,
        num_tokens: usize,
        num_experts: usize,
        has_bias: bool,
    ) -> Result<Self> {
        cfg.validate(num_experts, None)?;
        if num_experts > CUDA_MAX_EXPERTS {
            return Err(Error::Unsupported {
                op: OP,
                what: format!("the CUDA kernels take num_experts <= {CUDA_MAX_EXPERTS}, got num_experts = {num_experts}; use the CPU backend"),
            });
        }
        if cfg.topk > CUDA_MAX_TOPK {
            return Err(Error::Unsupported {
                op: OP,
                what: format!(
                    "the CUDA kernels take topk <= {CUDA_MAX_TOPK}, got topk = {}; use the CPU backend",
                    cfg.topk
                ),
            });
        }
        if num_tokens > i32::MAX as usize {
            return Err(Error::Overflow {
                op: OP,
                what: "num_tokens",
                value: num_tokens as u128,
                max: i32::MAX as i64,
            });
        }
        let (num_groups, group_topk) = cfg
            .group_limit
            .map_or((0, 0), |g| (g.num_groups as i32, g.group_topk as i32));
        let noise = cfg.noise.filter(|n| n.std > 0.0);
        let mask = cfg.expert_masking.filter(|m| m.rate > 0.0);
        Ok(GatingParams {
            noise_seed: noise.map_or(0, |n| n.seed),
            noise_offset: noise.map_or(0, |n| n.offset),
            mask_seed: mask.map_or(0, |m| m.seed),
            mask_offset: mask.map_or(0, |m| m.offset),
            num_tokens: num_tokens as i32,
            num_experts: num_experts as i32,
            topk: cfg.topk as i32,
            sigmoid: i32::from(cfg.score_function == ScoreFunction::Sigmoid),
            pre_softmax: i32::from(cfg.pre_softmax),
            normalize: i32::from(cfg.normalize),
            num_groups,
            group_topk,
            scaling: cfg.scaling_factor,
            noise_std: noise.map_or(0.0, |n| n.std),
            mask_rate: mask.map_or(0.0, |m| m.rate),
            has_bias: i32::from(has_bias),
        })
    }

    /// Entry-point root and launch shape for these sizes.
    fn launch(&self, root: &str) -> (String, LaunchConfig) {
        let t = self.num_tokens as u32;
        if self.num_experts as usize <= WARP_MAX_EXPERTS {
            (
                root.to_string(),
                LaunchConfig {
                    grid_dim: (t.div_ceil(WARP_TOKENS_PER_BLOCK), 1, 1),
                    block_dim: (32 * WARP_TOKENS_PER_BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        } else {
            (
                format!("{root}_large"),
                LaunchConfig {
                    grid_dim: (t, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        }
    }
}

fn kernel<T: RouterFloat>(
    backend: &CudaBackend,
    params: &GatingParams,
    root: &str,
) -> Result<(cudarc::driver::CudaFunction, LaunchConfig)> {
    let (root, cfg) = params.launch(root);
    let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
    Ok((f, cfg))
}

/// Outputs of [`topk_gating_cuda`], both `[num_tokens, topk]`.
#[derive(Debug)]
pub struct TopkGatingCudaBuffers<'a> {
    /// Routing weights (f32).
    pub weights: CudaViewMut<'a, f32>,
    /// Expert indices (i32), by descending selection score.
    pub indices: CudaViewMut<'a, i32>,
}

/// Top-k gating of `logits [num_tokens, num_experts]` on the GPU into
/// `out.weights [num_tokens, topk]` (f32) and `out.indices [num_tokens, topk]`
/// (i32), launched on `backend.stream()` without synchronising.
///
/// # Errors
/// As [`crate::ops::topk_gating_into`] (shapes, config), plus [`Error::Unsupported`]
/// for `num_experts > 2048` or `topk > 32`, [`Error::Compile`] / [`Error::Driver`].
/// A non-finite bias is not detected (see the module docs).
pub fn topk_gating_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<&CudaView<'_, f32>>,
    cfg: &TopkGatingConfig,
    out: TopkGatingCudaBuffers<'_>,
) -> Result<()> {
    let TopkGatingCudaBuffers {
        mut weights,
        mut indices,
    } = out;
    let lens = topk_gating_lens!(logits, expert_bias.map(CudaView::len), weights, indices);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    let params = GatingParams::new(cfg, num_tokens, num_experts, expert_bias.is_some())?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (f, lc) = kernel::<T>(backend, &params, "topk_gating_fwd")?;
    let stream: &CudaStream = backend.stream();
    let mut b = stream.launch_builder(&f);
    b.arg(logits);
    // A null bias pointer is never read (has_bias = 0).
    let null: u64 = 0;
    match expert_bias {
        Some(v) => b.arg(v),
        None => b.arg(&null),
    };
    b.arg(&params).arg(&mut weights).arg(&mut indices);
    // SAFETY: the argument list matches `topk_gating_fwd*_{dtype}(const T* logits,
    // const float* bias, GatingParams, float* weights, int* indices)`; every buffer
    // was checked above to hold the elements the kernel touches for these sizes.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Routing replay on the GPU: `weights [num_tokens, topk]` for recorded
/// `indices [num_tokens, topk]`, launched without synchronising.
///
/// # Errors
/// As [`topk_gating_cuda`]. Index range and distinctness are not checked (see the
/// module docs).
pub fn topk_gating_replay_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    indices: &CudaView<'_, i32>,
    cfg: &TopkGatingConfig,
    weights: &mut CudaViewMut<'_, f32>,
) -> Result<()> {
    let lens = topk_gating_replay_lens!(logits, indices, weights);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    let params = GatingParams::new(cfg, num_tokens, num_experts, false)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (f, lc) = kernel::<T>(backend, &params, "topk_gating_replay")?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(logits).arg(indices).arg(&params).arg(weights);
    // SAFETY: matches `topk_gating_replay*_{dtype}(const T* logits, const int*
    // indices, GatingParams, float* weights)`; lengths checked above.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Backward of top-k gating on the GPU: `grad_weights [num_tokens, topk] →
/// grad_logits [num_tokens, num_experts]` (every element written), launched without
/// synchronising.
///
/// # Errors
/// As [`topk_gating_replay_cuda`], plus [`Error::Shape`] for `grad_weights` or
/// `grad_logits` of the wrong length.
#[allow(clippy::too_many_arguments)]
pub fn topk_gating_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    indices: &CudaView<'_, i32>,
    grad_weights: &CudaView<'_, f32>,
    cfg: &TopkGatingConfig,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let lens = topk_gating_backward_lens!(logits, indices, grad_weights, grad_logits);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    let params = GatingParams::new(cfg, num_tokens, num_experts, false)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (f, lc) = kernel::<T>(backend, &params, "topk_gating_bwd")?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(logits)
        .arg(indices)
        .arg(grad_weights)
        .arg(&params)
        .arg(grad_logits);
    // SAFETY: matches `topk_gating_bwd*_{dtype}(const T* logits, const int* indices,
    // const float* grad_weights, GatingParams, T* grad_logits)`; lengths checked above.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Raw device buffers of a top-k gating call, for the Python layer (PyTorch tensors'
/// `data_ptr()` and `numel()`); a buffer the pass does not use is
/// [`DevBuf::NONE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TopkGatingRawPtrs {
    /// `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: DevBuf,
    /// `expert_bias [num_experts]` f32, if given (forward only).
    pub expert_bias: Option<DevBuf>,
    /// `indices [num_tokens, topk]` i32: output of the forward, input otherwise.
    pub indices: DevBuf,
    /// `weights [num_tokens, topk]` f32: output of forward and replay.
    pub weights: DevBuf,
    /// `grad_weights [num_tokens, topk]` f32 (backward).
    pub grad_weights: DevBuf,
    /// `grad_logits [num_tokens, num_experts]`, element type `dtype` (backward).
    pub grad_logits: DevBuf,
}

/// Which top-k gating kernel [`topk_gating_raw`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkGatingPass {
    /// Select and weigh (`logits`, `expert_bias` → `weights`, `indices`).
    Forward,
    /// Weigh given `indices` (`logits`, `indices` → `weights`).
    Replay,
    /// `logits`, `indices`, `grad_weights` → `grad_logits`.
    Backward,
}

/// The op's validation of `pass` on the raw buffers' lengths (the buffers the pass
/// does not use must be empty), then the host checks of the addresses.
fn check_raw(
    pass: TopkGatingPass,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    cfg: &TopkGatingConfig,
    p: &TopkGatingRawPtrs,
) -> Result<()> {
    const RAW: &str = "topk_gating_raw";
    let unused_bias = || check_unused(RAW, "expert_bias", p.expert_bias.unwrap_or_default());
    let lens = match pass {
        TopkGatingPass::Forward => {
            check_unused(RAW, "grad_weights", p.grad_weights)?;
            check_unused(RAW, "grad_logits", p.grad_logits)?;
            topk_gating_lens!(p.logits, opt_len(p.expert_bias), p.weights, p.indices)
        }
        TopkGatingPass::Replay => {
            unused_bias()?;
            check_unused(RAW, "grad_weights", p.grad_weights)?;
            check_unused(RAW, "grad_logits", p.grad_logits)?;
            topk_gating_replay_lens!(p.logits, p.indices, p.weights)
        }
        TopkGatingPass::Backward => {
            unused_bias()?;
            check_unused(RAW, "weights", p.weights)?;
            topk_gating_backward_lens!(p.logits, p.indices, p.grad_weights, p.grad_logits)
        }
    };
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    let z = dtype.size_in_bytes();
    check_buf(RAW, "logits", p.logits, z)?;
    check_buf(RAW, "indices", p.indices, 4)?;
    check_buf(RAW, "weights", p.weights, 4)?;
    check_buf(RAW, "expert_bias", p.expert_bias.unwrap_or_default(), 4)?;
    check_buf(RAW, "grad_weights", p.grad_weights, 4)?;
    check_buf(RAW, "grad_logits", p.grad_logits, z)
}

/// Launch a top-k gating kernel on raw device buffers and a caller-owned stream
/// (PyTorch's `torch.cuda.current_stream().cuda_stream`), without synchronising.
/// Every length is checked by the op's validator (the buffers the pass does not use
/// must be empty) before anything is launched.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context (the primary context of
///    its device, which is the one PyTorch uses), kept alive during the call.
/// 2. Every buffer the `pass` reads or writes (see [`TopkGatingPass`]) holds `len`
///    elements of its documented type (`dtype` for logits and grad_logits) at `ptr`
///    in that context, contiguous and row-major, and stays valid until the kernel
///    has finished on `stream`.
/// 3. Output buffers do not overlap any other buffer of the call.
///
/// # Errors
/// Config and size errors as [`topk_gating_cuda`] ([`Error::InvalidArgument`] for a
/// non-empty buffer the pass does not use); [`Error::Compile`], [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn topk_gating_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: TopkGatingPass,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    cfg: &TopkGatingConfig,
    ptrs: TopkGatingRawPtrs,
) -> Result<()> {
    check_raw(pass, dtype, num_tokens, num_experts, cfg, &ptrs)?;
    let has_bias = pass == TopkGatingPass::Forward && ptrs.expert_bias.is_some();
    let params = GatingParams::new(cfg, num_tokens, num_experts, has_bias)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let root = match pass {
        TopkGatingPass::Forward => "topk_gating_fwd",
        TopkGatingPass::Replay => "topk_gating_replay",
        TopkGatingPass::Backward => "topk_gating_bwd",
    };
    let (root, lc) = params.launch(root);
    let f = backend.function(MODULE, &format!("{root}_{}", dtype.as_str()))?;
    // SAFETY: the caller guarantees (1) that `stream` is a live stream of this
    // context; the wrapper does not own it and is dropped before returning.
    let s = unsafe { backend.context().wrap_borrowed_stream(stream) };
    let mut b = s.launch_builder(&f);
    let bias = ptrs.expert_bias.unwrap_or_default().ptr;
    match pass {
        TopkGatingPass::Forward => {
            b.arg(&ptrs.logits.ptr)
                .arg(&bias)
                .arg(&params)
                .arg(&ptrs.weights.ptr)
                .arg(&ptrs.indices.ptr);
        }
        TopkGatingPass::Replay => {
            b.arg(&ptrs.logits.ptr)
                .arg(&ptrs.indices.ptr)
                .arg(&params)
                .arg(&ptrs.weights.ptr);
        }
        TopkGatingPass::Backward => {
            b.arg(&ptrs.logits.ptr)
                .arg(&ptrs.indices.ptr)
                .arg(&ptrs.grad_weights.ptr)
                .arg(&params)
                .arg(&ptrs.grad_logits.ptr);
        }
    }
    // SAFETY: argument lists match the kernels' signatures (pointers are passed as
    // 64-bit device addresses); every buffer's length was checked above for these
    // sizes, and the caller guarantees (2) and (3) for the buffers.
    unsafe { b.launch(lc) }?;
    Ok(())
}
