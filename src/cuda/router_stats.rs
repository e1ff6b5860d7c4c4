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
use super::{BorrowedSlice, CudaBackend, CudaView, CudaViewMut, DevBuf, RouterLogitsCuda};
use crate::error::{Error, Result};
use crate::ops::check_len;
use crate::ops::router_stats::validate_router_stats;
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

/// Router statistics (see [`crate::ops::router_stats()`]) of `x.logits [num_tokens,
/// num_experts]` (with `x.padding_mask`) and the routing `indices [num_tokens,
/// topk]` (and optionally `slots`) on the GPU, launched on `backend.stream()`
/// without synchronising.
///
/// # Errors
/// The config and length checks of [`crate::ops::router_stats()`] (value checks of
/// device-resident indices and slots, and the strict mode, are the caller's: module
/// docs), [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Shape`] for an
/// output of the wrong length, [`Error::Compile`] / [`Error::Driver`].
pub fn router_stats_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    indices: &CudaView<'_, i32>,
    topk: usize,
    slots: Option<&CudaView<'_, i32>>,
    mut out: RouterStatsCudaBuffers<'_>,
) -> Result<()> {
    validate_router_stats(x.lens(), indices.len(), topk, slots.map(CudaView::len))?;
    let (num_tokens, num_experts) = (x.num_tokens, x.num_experts);
    let padding_mask = x.padding_mask.as_ref();
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
        b.arg(&x.logits).arg(indices);
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

/// Device buffers of a [`router_stats_cuda`] call (`None` for an absent optional
/// input).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouterStatsRawPtrs {
    /// `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: DevBuf,
    /// `indices [num_tokens, topk]` i32.
    pub indices: DevBuf,
    /// Outputs, as in [`RouterStatsCudaBuffers`]: `[num_experts]` i64.
    pub selected_counts: DevBuf,
    /// `[num_experts]` i64.
    pub kept_counts: DevBuf,
    /// `[4]` i64.
    pub scalars: DevBuf,
    /// `[4]` f32.
    pub floats: DevBuf,
    /// `[router_stats_workspace_len(num_tokens)]` f64.
    pub workspace: DevBuf,
    /// `slots [num_tokens, topk]` i32, if given.
    pub slots: Option<DevBuf>,
    /// `padding_mask [num_tokens]` bytes, if given.
    pub padding_mask: Option<DevBuf>,
}

/// [`router_stats_cuda`] on raw device buffers and a caller-owned stream, without
/// synchronising: the same checks (the op's validator, on the buffers' lengths) and
/// kernels; nothing is launched unless every length is right.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every buffer of `ptrs` (the optional ones when given) holds `len` elements of
///    its documented type (`dtype` for the logits) at `ptr` in that context, and
///    stays valid until the kernels have finished on `stream`.
/// 3. Output buffers do not overlap any other buffer of the call.
///
/// # Errors
/// As [`router_stats_cuda`].
pub unsafe fn router_stats_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    ptrs: RouterStatsRawPtrs,
) -> Result<()> {
    use crate::DType;
    const RAW: &str = "router_stats_raw";
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: for every BorrowedSlice here, (2) and (3).
    let (idx, slots, mask) = unsafe {
        (
            borrow!(i32, s, ptrs.indices, RAW)?,
            BorrowedSlice::<i32>::optional(s, ptrs.slots, RAW, "slots")?,
            BorrowedSlice::<bool>::optional(s, ptrs.padding_mask, RAW, "padding_mask")?,
        )
    };
    // SAFETY: (2) and (3) for the outputs.
    let (mut sel, mut kept, mut sc, mut fl, mut ws) = unsafe {
        (
            borrow!(i64, s, ptrs.selected_counts, RAW)?,
            borrow!(i64, s, ptrs.kept_counts, RAW)?,
            borrow!(i64, s, ptrs.scalars, RAW)?,
            borrow!(f32, s, ptrs.floats, RAW)?,
            borrow!(f64, s, ptrs.workspace, RAW)?,
        )
    };
    let slots_v = slots.as_ref().map(|b| b.view());
    let out = RouterStatsCudaBuffers {
        selected_counts: sel.view_mut(),
        kept_counts: kept.view_mut(),
        scalars: sc.view_mut(),
        floats: fl.view_mut(),
        workspace: ws.view_mut(),
    };
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: (2) and (3) for the logits.
            let z = unsafe { borrow!($t, s, ptrs.logits, RAW) }?;
            let x = RouterLogitsCuda::new(z.view(), num_tokens, num_experts)
                .padding_mask(mask.as_ref().map(|m| m.view()));
            router_stats_cuda::<$t>(&be, x, &idx.view(), topk, slots_v.as_ref(), out)
        }};
    }
    match dtype {
        DType::F32 => run!(f32),
        DType::F16 => run!(half::f16),
        DType::BF16 => run!(half::bf16),
    }
}
