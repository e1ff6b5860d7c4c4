//! Router statistics on the GPU (`cuda/router_stats.cu`): one pass over the logits
//! and the routing, deterministic (f64 partials per chunk of tokens combined in a
//! fixed order; per-expert counts by integer atomics, which do not depend on order).
//! Counts equal `src/cpu/router_stats.rs`'s exactly; the float statistics match
//! to rounding.
//!
//! Results stay on the device ([`RouterStatsCudaBuffers`]). What needs a host sync
//! is left to the caller: the strict mode (read `scalars[2]`, the non-finite count,
//! and raise), and the range / distinctness / slot checks of device-resident
//! `indices` and `slots` (indices outside `[0, num_experts)` are skipped, as on the
//! CPU, so nothing is written out of range).

use super::borrow;
use super::{CudaBackend, CudaView, CudaViewMut};
use crate::error::{Error, Result};
use crate::ops::{check_len, checked_i32_product};
use crate::RouterFloat;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const OP: &str = "router_stats";
const MODULE: &str = "router_stats";
/// Largest `num_experts` the kernels take.
pub const ROUTER_STATS_CUDA_MAX_EXPERTS: usize = super::kernels::abi::common::MAX_EXPERTS;
const WARP_MAX_EXPERTS: usize = super::kernels::abi::common::WARP_MAX_EXPERTS;
const WARP_GROUPS_PER_BLOCK: u32 = super::kernels::abi::common::WARP_GROUPS_PER_BLOCK;
const TARGET_ROWS: usize = 2048;
const ROW: usize = super::kernels::abi::router_stats::ROW;

/// Kernel parameters: `struct StatsParams` of `cuda/router_stats.cu`, field for field
/// (build.rs fails the build when the two disagree).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct StatsParams {
    num_tokens: i32,
    num_experts: i32,
    topk: i32,
    chunk: i32,
    num_rows: i32,
    has_slots: i32,
    has_mask: i32,
    pad: i32,
}

// SAFETY: `#[repr(C)]`, `Copy`, plain integers, the layout of the C struct.
unsafe impl DeviceRepr for StatsParams {}

fn chunk(num_tokens: usize) -> usize {
    num_tokens.div_ceil(TARGET_ROWS).clamp(16, 256)
}

/// f64 elements of the workspace [`router_stats_cuda`] needs.
pub fn router_stats_workspace_len(num_tokens: usize) -> usize {
    num_tokens.div_ceil(chunk(num_tokens)) * ROW
}

/// Device outputs of [`router_stats_cuda`] (every one overwritten).
#[derive(Debug)]
pub struct RouterStatsCudaBuffers<'a> {
    /// `[num_experts]`: selected assignments per expert (valid tokens only).
    pub selected_counts: CudaViewMut<'a, i64>,
    /// `[num_experts]`: kept assignments per expert (`slots >= 0`); zeros without slots.
    pub kept_counts: CudaViewMut<'a, i64>,
    /// `[4]`: valid tokens, dropped assignments, non-finite logits, Σ selected.
    pub scalars: CudaViewMut<'a, i64>,
    /// `[4]`: max_violation, mean entropy, mean logsumexp, max logsumexp.
    pub floats: CudaViewMut<'a, f32>,
    /// `[router_stats_workspace_len(num_tokens)]` f64 scratch.
    pub workspace: CudaViewMut<'a, f64>,
}

/// Router statistics (see [`crate::ops::router_stats`]) of `logits [num_tokens,
/// num_experts]` and the routing `indices [num_tokens, topk]` (and optionally
/// `slots`, `padding_mask`) on the GPU, launched on `backend.stream()` without
/// synchronising.
///
/// # Errors
/// The config and length checks of [`crate::ops::router_stats`] (value checks of
/// device-resident indices and slots, and the strict mode, are the caller's: module
/// docs), [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn router_stats_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    indices: &CudaView<'_, i32>,
    topk: usize,
    slots: Option<&CudaView<'_, i32>>,
    padding_mask: Option<&CudaView<'_, bool>>,
    mut out: RouterStatsCudaBuffers<'_>,
) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::invalid(
            OP,
            "num_experts",
            0,
            "num_experts must be at least 1",
        ));
    }
    if topk == 0 || topk > num_experts {
        return Err(Error::invalid(
            OP,
            "topk",
            topk,
            format!("topk must be in [1, num_experts] = [1, {num_experts}]"),
        ));
    }
    let n = checked_i32_product(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let nk = checked_i32_product(OP, "num_tokens * topk", num_tokens, topk)?;
    check_len(
        OP,
        "logits",
        logits.len(),
        n,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    let kshape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP, "indices", indices.len(), nk, &kshape)?;
    if let Some(s) = slots {
        check_len(OP, "slots", s.len(), nk, &kshape)?;
    }
    if let Some(m) = padding_mask {
        check_len(
            OP,
            "padding_mask",
            m.len(),
            num_tokens,
            format_args!("[num_tokens] = [{num_tokens}]"),
        )?;
    }
    if num_experts > ROUTER_STATS_CUDA_MAX_EXPERTS {
        return Err(Error::Unsupported {
            op: OP,
            what: format!("the CUDA kernels take num_experts <= {ROUTER_STATS_CUDA_MAX_EXPERTS}, got num_experts = {num_experts}; use the CPU backend"),
        });
    }
    let eshape = format!("[num_experts] = [{num_experts}]");
    check_len(
        OP,
        "selected_counts",
        out.selected_counts.len(),
        num_experts,
        &eshape,
    )?;
    check_len(
        OP,
        "kept_counts",
        out.kept_counts.len(),
        num_experts,
        &eshape,
    )?;
    check_len(OP, "scalars", out.scalars.len(), 4, "[4]")?;
    check_len(OP, "floats", out.floats.len(), 4, "[4]")?;
    check_len(
        OP,
        "workspace",
        out.workspace.len(),
        router_stats_workspace_len(num_tokens),
        "router_stats_workspace_len(num_tokens)",
    )?;
    let ch = chunk(num_tokens);
    let rows = num_tokens.div_ceil(ch);
    let p = StatsParams {
        num_tokens: num_tokens as i32,
        num_experts: num_experts as i32,
        topk: topk as i32,
        chunk: ch as i32,
        num_rows: rows as i32,
        has_slots: i32::from(slots.is_some()),
        has_mask: i32::from(padding_mask.is_some()),
        pad: 0,
    };
    let stream = backend.stream();
    stream.memset_zeros(&mut out.selected_counts)?;
    stream.memset_zeros(&mut out.kept_counts)?;
    let null: u64 = 0;
    if rows > 0 {
        let (root, lc) = if num_experts <= WARP_MAX_EXPERTS {
            (
                "router_stats_pass",
                LaunchConfig {
                    grid_dim: ((rows as u32).div_ceil(WARP_GROUPS_PER_BLOCK), 1, 1),
                    block_dim: (32 * WARP_GROUPS_PER_BLOCK, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        } else {
            (
                "router_stats_pass_large",
                LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                },
            )
        };
        let f = backend.function(MODULE, &crate::kernel_name::<T>(root))?;
        let mut b = stream.launch_builder(&f);
        b.arg(logits).arg(indices);
        match slots {
            Some(s) => b.arg(s),
            None => b.arg(&null),
        };
        match padding_mask {
            Some(m) => b.arg(m),
            None => b.arg(&null),
        };
        b.arg(&p)
            .arg(&mut out.workspace)
            .arg(&mut out.selected_counts)
            .arg(&mut out.kept_counts);
        // SAFETY: matches `router_stats_pass*_{dtype}(const T* logits, const int*
        // indices, const int* slots, const unsigned char* mask, StatsParams, double*
        // ws, unsigned long long* selected, unsigned long long* kept)`; every buffer
        // was checked above (slots / mask null and unread when absent); counts are
        // only incremented at indices in [0, num_experts).
        unsafe { b.launch(lc) }?;
    }
    let f = backend.function(MODULE, "router_stats_finalize")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(&mut out.workspace)
        .arg(&mut out.selected_counts)
        .arg(&mut out.scalars)
        .arg(&mut out.floats);
    // SAFETY: matches `router_stats_finalize(StatsParams, const double* ws, const
    // unsigned long long* selected, long long* out_i64, float* out_f32)`; it reads
    // num_rows workspace rows and num_experts counts, writes 4 + 4 elements.
    unsafe {
        b.launch(LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        })
    }?;
    Ok(())
}

/// Device addresses of a [`router_stats_cuda`] call (`0` for an absent optional
/// input).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStatsRawPtrs {
    /// `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: u64,
    /// `indices [num_tokens, topk]` i32.
    pub indices: u64,
    /// `slots [num_tokens, topk]` i32, or 0.
    pub slots: u64,
    /// `padding_mask [num_tokens]` bytes, or 0.
    pub padding_mask: u64,
    /// Outputs, as in [`RouterStatsCudaBuffers`].
    pub selected_counts: u64,
    /// `[num_experts]` i64.
    pub kept_counts: u64,
    /// `[4]` i64.
    pub scalars: u64,
    /// `[4]` f32.
    pub floats: u64,
    /// `[router_stats_workspace_len(num_tokens)]` f64.
    pub workspace: u64,
}

/// [`router_stats_cuda`] on raw device pointers and a caller-owned stream, without
/// synchronising.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every non-zero pointer of `ptrs` is a device address in that context, valid
///    for its documented shape and type (`dtype` for the logits), and stays valid
///    until the kernels have finished on `stream`.
/// 3. Output buffers do not overlap any other buffer of the call.
///
/// # Errors
/// As [`router_stats_cuda`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn router_stats_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    ptrs: RouterStatsRawPtrs,
) -> Result<()> {
    use super::BorrowedSlice;
    use crate::DType;
    let nl = num_tokens.checked_mul(num_experts).ok_or(Error::Overflow {
        op: OP,
        what: "num_tokens * num_experts",
        value: num_tokens as u128 * num_experts as u128,
        max: i64::MAX,
    })?;
    let na = crate::ops::checked_i32_product(OP, "num_tokens * topk", num_tokens, topk)?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: for every BorrowedSlice here, (2) and (3).
    let idx = unsafe { borrow!(i32, s, ptrs.indices, na, "router_stats_raw") }?;
    // SAFETY: (2) and (3) of this entry's contract, for this buffer.
    let slots = (ptrs.slots != 0).then(|| unsafe { BorrowedSlice::<i32>::new(s, ptrs.slots, na) });
    let mask = (ptrs.padding_mask != 0)
        // SAFETY: (2) and (3) of this entry's contract, for this buffer.
        .then(|| unsafe { BorrowedSlice::<bool>::new(s, ptrs.padding_mask, num_tokens) });
    // SAFETY: (2) and (3) of this entry's contract, for this buffer.
    let mut sel = unsafe {
        borrow!(
            i64,
            s,
            ptrs.selected_counts,
            num_experts,
            "router_stats_raw"
        )
    }?;
    // SAFETY: (2) and (3) of this entry's contract, for this buffer.
    let (mut kept, mut sc, mut fl) = unsafe {
        (
            borrow!(i64, s, ptrs.kept_counts, num_experts, "router_stats_raw")?,
            borrow!(i64, s, ptrs.scalars, 4, "router_stats_raw")?,
            borrow!(f32, s, ptrs.floats, 4, "router_stats_raw")?,
        )
    };
    // SAFETY: (2) and (3) of this entry's contract, for this buffer.
    let mut ws = unsafe {
        borrow!(
            f64,
            s,
            ptrs.workspace,
            router_stats_workspace_len(num_tokens),
            "router_stats_raw"
        )
    }?;
    let slots_v = slots.as_ref().map(|b| b.view());
    let mask_v = mask.as_ref().map(|b| b.view());
    let out = RouterStatsCudaBuffers {
        selected_counts: sel.view_mut(),
        kept_counts: kept.view_mut(),
        scalars: sc.view_mut(),
        floats: fl.view_mut(),
        workspace: ws.view_mut(),
    };
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: the raw entry's contract covers this buffer (see its # Safety).
            let z = unsafe { borrow!($t, s, ptrs.logits, nl, "router_stats_raw") }?;
            router_stats_cuda::<$t>(
                &be,
                &z.view(),
                num_tokens,
                num_experts,
                &idx.view(),
                topk,
                slots_v.as_ref(),
                mask_v.as_ref(),
                out,
            )
        }};
    }
    match dtype {
        DType::F32 => run!(f32),
        DType::F16 => run!(half::f16),
        DType::BF16 => run!(half::bf16),
    }
}
