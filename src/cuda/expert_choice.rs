//! Expert-choice routing on the GPU (`cuda/expert_choice.cu`), with the validation
//! of [`crate::ops::expert_choice()`].
//!
//! The CPU reference's steps (`src/cpu/expert_choice.rs`) with the same
//! arithmetic: `p = softmax(z_t)` in `f32` in `softmax_row`'s operation order (the
//! sum over experts is sequential), each expert's `capacity` largest
//! [`crate::select::rank_key`]`(p[t, e], t)` found by a radix select in one block
//! and stored in token order, then `row` and the zeroed weights. `exp` is
//! evaluated in double and rounded once, which is the correctly rounded `f32` but
//! for pathological cases; the CPU's libm `expf` can still differ by an ulp, so `p`
//! matches the CPU to rounding and a selection can differ only between tokens whose
//! `p` are that close (near-ties). Given the same `p`, every integer output equals
//! the CPU's, and the same input gives bitwise the same output on every run.
//!
//! As on the CPU, `p` is kept transposed (`[E, T]`, as f32 bits) in the `row`
//! output between the softmax and the selection: no workspace. Nothing synchronises
//! with the host. The backward cannot check `row` entries below `-1` (the CPU
//! rejects them) without reading device memory: it counts an entry as chosen iff it
//! is `>= 0`. Row entries the kernels read back (`row_to_token`) are bounds-checked.

use super::borrow;
use super::{check_unused, CudaBackend, CudaView, CudaViewMut, DevBuf};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::expert_choice::{
    expert_choice_backward_lens, expert_choice_lens, validate_expert_choice,
    validate_expert_choice_backward,
};
use crate::RouterFloat;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "expert_choice";

/// Tokens (warps) per block of the softmax and backward kernels.
const WARPS: usize = super::kernels::abi::expert_choice::EC_WARPS;
/// Grid-stride loops: at most this many blocks per launch.
const MAX_BLOCKS: usize = 1 << 16;

fn flat(items: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.div_ceil(threads).clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Caller-owned outputs of [`expert_choice_cuda`]; shapes as in
/// [`crate::ops::ExpertChoiceBuffers`].
#[derive(Debug)]
pub struct ExpertChoiceCudaBuffers<'a> {
    /// `[num_tokens, num_experts]`: `p[t, e]` if expert `e` chose token `t`, else 0.
    pub weights: CudaViewMut<'a, f32>,
    /// `[num_tokens, num_experts]`: row of `(t, e)`, or `-1`.
    pub row: CudaViewMut<'a, i32>,
    /// `[num_experts * capacity]`: token of each row, `-1` if unused.
    pub row_to_token: CudaViewMut<'a, i32>,
    /// `[num_experts * capacity]`: `p` of each row, 0 if unused.
    pub row_weights: CudaViewMut<'a, f32>,
    /// `[num_experts]`: `min(capacity, num_tokens)`.
    pub tokens_per_expert: CudaViewMut<'a, i32>,
    /// `[num_experts + 1]`: `e * capacity`.
    pub expert_offsets: CudaViewMut<'a, i32>,
}

/// [`crate::ops::expert_choice_into`] on the GPU, launched on `backend.stream()`
/// without synchronising: `logits [num_tokens, num_experts]`, every output written.
///
/// # Errors
/// As [`crate::ops::expert_choice_into`] ([`crate::Error::InvalidArgument`] for
/// `num_experts == 0`, [`crate::Error::Overflow`], [`crate::Error::Shape`] for a
/// buffer of the wrong length), [`crate::Error::Compile`] / [`crate::Error::Driver`].
pub fn expert_choice_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    capacity: usize,
    mut out: ExpertChoiceCudaBuffers<'_>,
) -> Result<()> {
    let lens = expert_choice_lens!(logits, out);
    let (te, _) = validate_expert_choice(num_tokens, num_experts, capacity, lens)?;
    let taken = capacity.min(num_tokens);
    let (nt, ne, cap) = (num_tokens as i32, num_experts as i32, capacity as i32);
    let stream = backend.stream();

    // 1. p into weights (and, transposed, into row when some expert takes tokens).
    if num_tokens > 0 {
        let f = backend.function(MODULE, &crate::kernel_name::<T>("expert_choice_softmax"))?;
        let null = 0u64;
        let mut b = stream.launch_builder(&f);
        b.arg(logits).arg(&nt).arg(&ne).arg(&mut out.weights);
        if taken > 0 {
            b.arg(&mut out.row);
        } else {
            b.arg(&null);
        }
        // SAFETY: matches `expert_choice_softmax_{dtype}(const T* logits, int
        // num_tokens, int num_experts, float* weights, int* pt (or null))`; logits,
        // weights and row hold num_tokens * num_experts elements (checked above).
        unsafe { b.launch(flat(num_tokens, 32 * WARPS)) }?;
    }
    // 2. Per-expert selection, counts and offsets.
    {
        let f = backend.function(MODULE, "expert_choice_select")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out.row)
            .arg(&nt)
            .arg(&ne)
            .arg(&cap)
            .arg(&mut out.row_to_token)
            .arg(&mut out.row_weights)
            .arg(&mut out.tokens_per_expert)
            .arg(&mut out.expert_offsets);
        let lc = LaunchConfig {
            grid_dim: (num_experts as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: matches `expert_choice_select(const int* pt, int num_tokens, int
        // num_experts, int capacity, int* row_to_token, float* row_weights, int*
        // tokens_per_expert, int* expert_offsets)`; lengths checked above.
        unsafe { b.launch(lc) }?;
    }
    if te == 0 {
        return Ok(());
    }
    // 3. row = -1, the chosen rows scattered, unchosen weights zeroed.
    let len = te as i64;
    {
        let f = backend.function(MODULE, "expert_choice_fill")?;
        let minus_one = -1i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out.row).arg(&len).arg(&minus_one);
        // SAFETY: `expert_choice_fill(int* out, long long n, int value)`; row holds
        // num_tokens * num_experts i32.
        unsafe { b.launch(flat(te, 256)) }?;
    }
    if taken > 0 {
        let f = backend.function(MODULE, "expert_choice_scatter")?;
        let tk = taken as i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out.row_to_token)
            .arg(&nt)
            .arg(&ne)
            .arg(&cap)
            .arg(&tk)
            .arg(&mut out.row);
        // SAFETY: `expert_choice_scatter(const int* row_to_token, int num_tokens, int
        // num_experts, int capacity, int taken, int* row)`; token entries are
        // bounds-checked in the kernel.
        unsafe { b.launch(flat(num_experts * taken, 256)) }?;
    }
    {
        let f = backend.function(MODULE, "expert_choice_zero")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out.row).arg(&mut out.weights).arg(&len);
        // SAFETY: `expert_choice_zero(const int* row, float* weights, long long n)`;
        // both hold num_tokens * num_experts elements.
        unsafe { b.launch(flat(te, 256)) }?;
    }
    Ok(())
}

/// [`crate::ops::expert_choice_backward_into`] on the GPU, launched without
/// synchronising: `grad_logits[t] = p_t ⊙ (g_t − <g_t, p_t>)` with `g =
/// grad_weights` masked by `row >= 0`; `logits`, `row`, `grad_weights` and
/// `grad_logits` are `[num_tokens, num_experts]`.
///
/// # Errors
/// As [`crate::ops::expert_choice_backward_into`] but for the `row` values (module
/// docs), [`crate::Error::Compile`] / [`crate::Error::Driver`].
pub fn expert_choice_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    row: &CudaView<'_, i32>,
    grad_weights: &CudaView<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    let lens = expert_choice_backward_lens!(logits, row, grad_weights, grad_logits);
    let te = validate_expert_choice_backward(num_tokens, num_experts, lens)?;
    if te == 0 {
        return Ok(());
    }
    let (nt, ne) = (num_tokens as i32, num_experts as i32);
    let f = backend.function(MODULE, &crate::kernel_name::<T>("expert_choice_bwd"))?;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(logits)
        .arg(&nt)
        .arg(&ne)
        .arg(row)
        .arg(grad_weights)
        .arg(grad_logits);
    // SAFETY: matches `expert_choice_bwd_{dtype}(const T* logits, int num_tokens, int
    // num_experts, const int* row, const float* grad_weights, T* grad_logits)`;
    // lengths checked above.
    unsafe { b.launch(flat(num_tokens, 32 * WARPS)) }?;
    Ok(())
}

/// Device buffers of an [`expert_choice_raw`] call; shapes as in
/// [`ExpertChoiceCudaBuffers`] and the safe functions' inputs. A buffer the pass does
/// not use is [`DevBuf::NONE`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExpertChoiceRawPtrs {
    /// Input `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: DevBuf,
    /// Forward output `weights [num_tokens, num_experts]` f32.
    pub weights: DevBuf,
    /// Forward output / backward input `row [num_tokens, num_experts]` i32.
    pub row: DevBuf,
    /// Forward output `row_to_token [num_experts * capacity]` i32.
    pub row_to_token: DevBuf,
    /// Forward output `row_weights [num_experts * capacity]` f32.
    pub row_weights: DevBuf,
    /// Forward output `tokens_per_expert [num_experts]` i32.
    pub tokens_per_expert: DevBuf,
    /// Forward output `expert_offsets [num_experts + 1]` i32.
    pub expert_offsets: DevBuf,
    /// Backward input `grad_weights [num_tokens, num_experts]` f32.
    pub grad_weights: DevBuf,
    /// Backward output `grad_logits [num_tokens, num_experts]`, element type `dtype`.
    pub grad_logits: DevBuf,
}

/// Which expert-choice pass [`expert_choice_raw`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertChoicePass {
    /// [`expert_choice_cuda`]: `logits` → `weights`, `row`, `row_to_token`,
    /// `row_weights`, `tokens_per_expert`, `expert_offsets`.
    Forward {
        /// Tokens each expert takes.
        capacity: usize,
    },
    /// [`expert_choice_backward_cuda`]: `logits`, `row`, `grad_weights` →
    /// `grad_logits`.
    Backward,
}

/// [`expert_choice_cuda`] or [`expert_choice_backward_cuda`] (see `pass`) on raw
/// device buffers and a caller-owned stream (PyTorch's current stream), without
/// synchronising: the same checks (the op's validator, on the buffers' lengths) and
/// kernels; nothing is launched unless every length is right. The buffers the pass
/// does not use must be empty.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every buffer of `ptrs` the pass uses holds `len` elements of its documented
///    type at `ptr` in that context, and stays valid until the kernels have finished
///    on `stream`.
/// 3. Output buffers do not overlap each other or the inputs.
///
/// # Errors
/// As the safe functions; [`crate::Error::InvalidArgument`] for a non-empty buffer
/// the pass does not use.
pub unsafe fn expert_choice_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: ExpertChoicePass,
    dtype: DType,
    num_tokens: usize,
    num_experts: usize,
    ptrs: ExpertChoiceRawPtrs,
) -> Result<()> {
    const RAW: &str = "expert_choice_raw";
    let p = &ptrs;
    match pass {
        ExpertChoicePass::Forward { .. } => {
            check_unused(RAW, "grad_weights", p.grad_weights)?;
            check_unused(RAW, "grad_logits", p.grad_logits)?;
        }
        ExpertChoicePass::Backward => {
            check_unused(RAW, "weights", p.weights)?;
            check_unused(RAW, "row_to_token", p.row_to_token)?;
            check_unused(RAW, "row_weights", p.row_weights)?;
            check_unused(RAW, "tokens_per_expert", p.tokens_per_expert)?;
            check_unused(RAW, "expert_offsets", p.expert_offsets)?;
        }
    }
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: (2) and (3) for the input both passes read.
            let z = unsafe { borrow!($t, s, ptrs.logits, RAW) }?;
            match pass {
                ExpertChoicePass::Backward => {
                    // SAFETY: (2) and (3) for the backward's other buffers.
                    let (row, g, mut gz) = unsafe {
                        (
                            borrow!(i32, s, ptrs.row, RAW)?,
                            borrow!(f32, s, ptrs.grad_weights, RAW)?,
                            borrow!($t, s, ptrs.grad_logits, RAW)?,
                        )
                    };
                    expert_choice_backward_cuda::<$t>(
                        &be,
                        &z.view(),
                        num_tokens,
                        num_experts,
                        &row.view(),
                        &g.view(),
                        &mut gz.view_mut(),
                    )
                }
                ExpertChoicePass::Forward { capacity } => {
                    // SAFETY: (2) and (3) for the forward's outputs.
                    let (mut w, mut row, mut rtt, mut rw, mut tpe, mut eo) = unsafe {
                        (
                            borrow!(f32, s, ptrs.weights, RAW)?,
                            borrow!(i32, s, ptrs.row, RAW)?,
                            borrow!(i32, s, ptrs.row_to_token, RAW)?,
                            borrow!(f32, s, ptrs.row_weights, RAW)?,
                            borrow!(i32, s, ptrs.tokens_per_expert, RAW)?,
                            borrow!(i32, s, ptrs.expert_offsets, RAW)?,
                        )
                    };
                    expert_choice_cuda::<$t>(
                        &be,
                        &z.view(),
                        num_tokens,
                        num_experts,
                        capacity,
                        ExpertChoiceCudaBuffers {
                            weights: w.view_mut(),
                            row: row.view_mut(),
                            row_to_token: rtt.view_mut(),
                            row_weights: rw.view_mut(),
                            tokens_per_expert: tpe.view_mut(),
                            expert_offsets: eo.view_mut(),
                        },
                    )
                }
            }
        }};
    }
    match dtype {
        DType::F32 => run!(f32),
        DType::F16 => run!(half::f16),
        DType::BF16 => run!(half::bf16),
    }
}
