//! Capacity-factor dispatch on the GPU (`cuda/dispatch.cu`), with the validation of
//! [`crate::ops::dispatch()`] ([`dispatch_max_rows`]).
//!
//! Every output equals `src/cpu/dispatch.rs`'s bit for bit: slots, rows,
//! `row_to_token`, `expert_offsets`, `rows_per_rank`, `tokens_per_expert`, the row
//! and dropped counts, and the kept weights (renormalised by the same `f32`
//! operations in the same order). The kernels (see `cuda/dispatch.cu`): per-chunk
//! expert histograms and their scans give a stable counting sort of the assignments
//! into expert segments in `(t, j)` order; each over-capacity expert keeps its
//! `capacity` largest drop keys (`drop_key` in `src/cpu/dispatch.rs`; a radix
//! select in one block) and numbers them in token order. Integer atomics only count; no result
//! depends on the order of atomics or blocks.
//!
//! Nothing synchronises with the host: every buffer is sized by the host-known
//! [`dispatch_max_rows`], `row_to_token` is filled with `-1` past the used rows,
//! and the used row count and the dropped count are written to a device buffer
//! (`counts [2]` i64). What would need a host sync is not checked: the range and
//! distinctness of device-resident `indices`. An index outside `[0, num_experts)`
//! is treated as not routed (as `-1`) and never addresses memory; a token naming an
//! expert twice still gets at most `capacity` kept per expert and in-range rows.
//! Validate on the host with [`crate::ops::dispatch()`] when the indices are
//! untrusted.

use super::borrow;
use super::kernels::abi::dispatch::*; // POLICY_*, LAYOUT_*: the codes the kernels read
use super::{CudaBackend, CudaView, CudaViewMut, DevBuf};
use crate::error::{Error, Result};
use crate::ops::dispatch::{dispatch_lens, validate_dispatch};
use crate::ops::{check_len, dispatch_max_rows, DispatchConfig, DispatchLayout, DropPolicy};
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "dispatch";
const OP: &str = "dispatch";

/// Experts up to which the per-chunk histograms and cursors live in shared memory
/// (4 bytes each); above it they stay in the (global) workspace.
const SMEM_EXPERTS: usize = 8192;
/// Tokens per chunk of the counting sort, at least.
const CHUNK_TOKENS: usize = 256;
/// Upper bound on the histogram entries `num_chunks * num_experts` (more chunks
/// for few experts, fewer for many).
const MAX_HIST: usize = 1 << 22;
/// Grid-stride loops: at most this many blocks per launch.
const MAX_BLOCKS: usize = 1 << 16;

/// Kernel parameters: `struct DispatchParams` of `cuda/dispatch.cu`, field for field
/// (build.rs fails the build when the two disagree).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DispatchParams {
    seed: u64,
    offset: u64,
    num_tokens: i32,
    topk: i32,
    num_experts: i32,
    capacity: i32,
    policy: i32,
    layout: i32,
    align: i32,
    ep_size: i32,
    chunk_tokens: i32,
    num_chunks: i32,
    max_rows: i32,
    smem_cursor: i32,
}

// SAFETY: `#[repr(C)]`, `Copy`, plain numbers (two u64 then twelve i32: no padding),
// the layout of the C struct the kernels take by value.
unsafe impl DeviceRepr for DispatchParams {}

/// Chunking of the counting sort.
#[derive(Debug, Clone, Copy)]
struct Plan {
    chunk_tokens: usize,
    num_chunks: usize,
}

impl Plan {
    fn new(num_tokens: usize, num_experts: usize) -> Plan {
        let max_chunks = (MAX_HIST / num_experts.max(1)).max(1);
        let chunk_tokens = CHUNK_TOKENS.max(num_tokens.div_ceil(max_chunks));
        Plan {
            chunk_tokens,
            num_chunks: num_tokens.div_ceil(chunk_tokens),
        }
    }

    /// i32 words: hist [chunks * E] | counts [E] | starts [E + 1] | pos_of [N] |
    /// seg_slot [N] | keys [N].
    fn workspace_len(&self, num_experts: usize, assignments: usize) -> usize {
        self.num_chunks * num_experts + 2 * num_experts + 1 + 3 * assignments
    }
}

/// i32 elements of the workspace [`dispatch_cuda`] needs for `num_tokens` tokens
/// with `topk` choices under `cfg` (contents on entry do not matter).
///
/// # Errors
/// The config errors of [`crate::ops::dispatch()`] ([`dispatch_max_rows`]).
pub fn dispatch_workspace_len(
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
) -> Result<usize> {
    dispatch_max_rows(num_tokens, topk, cfg)?;
    Ok(Plan::new(num_tokens, cfg.num_experts).workspace_len(cfg.num_experts, num_tokens * topk))
}

/// Caller-owned outputs (and scratch) of [`dispatch_cuda`]; shapes as in
/// [`crate::ops::DispatchBuffers`], plus `counts` and `workspace`.
#[derive(Debug)]
pub struct DispatchCudaBuffers<'a> {
    /// `[num_tokens, topk]`: slot in the expert's segment, `-1` if dropped or not
    /// routed.
    pub slot: CudaViewMut<'a, i32>,
    /// `[num_tokens, topk]`: row in the expert-major buffer, `-1` if dropped or not
    /// routed.
    pub row: CudaViewMut<'a, i32>,
    /// `[num_tokens, topk]`: the weight if kept (renormalised if asked), else 0.
    pub kept_weights: CudaViewMut<'a, f32>,
    /// `[num_experts]`: kept assignments per expert.
    pub tokens_per_expert: CudaViewMut<'a, i32>,
    /// `[max_rows]` ([`dispatch_max_rows`]): token of each row, `-1` for padding
    /// rows and every entry `>= num_rows`.
    pub row_to_token: CudaViewMut<'a, i32>,
    /// `[num_experts + 1]`: expert `e` owns rows `expert_offsets[e] ..
    /// expert_offsets[e + 1]`.
    pub expert_offsets: CudaViewMut<'a, i32>,
    /// `[ep_size]`: rows owned by each expert-parallel rank.
    pub rows_per_rank: CudaViewMut<'a, i32>,
    /// `[2]` i64: the used row count `num_rows` and the `dropped` count (the fields
    /// of [`crate::ops::DispatchCounts`]), left on the device.
    pub counts: CudaViewMut<'a, i64>,
    /// `[dispatch_workspace_len(..)]` i32 scratch.
    pub workspace: CudaViewMut<'a, i32>,
}

fn grid(items: usize, threads: usize) -> u32 {
    items.div_ceil(threads).clamp(1, MAX_BLOCKS) as u32
}

/// [`crate::ops::dispatch_into`] on the GPU, launched on `backend.stream()` without
/// synchronising: `indices` and `weights` are `[num_tokens, topk]`, the outputs as
/// documented on [`DispatchCudaBuffers`]. Every output is written (no need to clear
/// them first).
///
/// # Errors
/// The config errors of [`crate::ops::dispatch()`], [`Error::Shape`] for a buffer of
/// the wrong length (the `indices` values are not checked: module docs),
/// [`Error::Compile`] / [`Error::Driver`].
pub fn dispatch_cuda(
    backend: &CudaBackend,
    indices: &CudaView<'_, i32>,
    weights: &CudaView<'_, f32>,
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
    mut out: DispatchCudaBuffers<'_>,
) -> Result<()> {
    let max_rows = validate_dispatch(
        num_tokens,
        topk,
        cfg,
        &dispatch_lens!(indices, weights, out),
    )?;
    let e = cfg.num_experts;
    let n = num_tokens * topk; // fits i32: checked by validate_dispatch
    check_len(OP, "counts", out.counts.len(), 2, "[2]")?;
    let plan = Plan::new(num_tokens, e);
    let ws_len = plan.workspace_len(e, n);
    check_len(
        OP,
        "workspace",
        out.workspace.len(),
        ws_len,
        format_args!("[dispatch_workspace_len(num_tokens, topk, cfg)] = [{ws_len}]"),
    )?;
    if plan.chunk_tokens > i32::MAX as usize {
        // Not reachable with num_tokens * topk <= i32::MAX; kept as a guard.
        return Err(Error::Overflow {
            op: OP,
            what: "tokens per chunk",
            value: plan.chunk_tokens as u128,
            max: i32::MAX as i64,
        });
    }
    let (capacity, layout, align) = match cfg.layout {
        DispatchLayout::PadToCapacity => (cfg.capacity.map_or(-1, |c| c as i32), LAYOUT_PAD, 1),
        DispatchLayout::Compact => (cfg.capacity.map_or(-1, |c| c as i32), LAYOUT_COMPACT, 1),
        DispatchLayout::Dropless { align } => (-1, LAYOUT_DROPLESS, align as i32),
    };
    let (policy, seed, offset) = match cfg.effective_drop_policy() {
        DropPolicy::Position => (POLICY_POSITION, 0, 0),
        DropPolicy::ChoiceThenPosition => (POLICY_CHOICE_THEN_POSITION, 0, 0),
        DropPolicy::Probs => (POLICY_PROBS, 0, 0),
        DropPolicy::BatchPrioritized => (POLICY_BATCH_PRIORITIZED, 0, 0),
        DropPolicy::Random { seed, offset } => (POLICY_RANDOM, seed, offset),
    };
    let smem = e <= SMEM_EXPERTS;
    let p = DispatchParams {
        seed,
        offset,
        num_tokens: num_tokens as i32,
        topk: topk as i32,
        num_experts: e as i32,
        capacity,
        policy,
        layout,
        align,
        ep_size: cfg.ep_size as i32,
        chunk_tokens: plan.chunk_tokens as i32,
        num_chunks: plan.num_chunks as i32,
        max_rows: max_rows as i32,
        smem_cursor: i32::from(smem),
    };
    let smem_bytes = if smem { (e * 4) as u32 } else { 0 };
    let stream = backend.stream();
    let ws = &mut out.workspace;

    // row_to_token = -1 (the finish kernel then scatters the used rows).
    if max_rows > 0 {
        let f = backend.function(MODULE, "dispatch_fill")?;
        let len = max_rows as i64;
        let minus_one = -1i32;
        let mut b = stream.launch_builder(&f);
        b.arg(&mut out.row_to_token).arg(&len).arg(&minus_one);
        // SAFETY: `dispatch_fill(int* out, long long n, int value)`; row_to_token
        // holds max_rows i32 (checked above).
        unsafe { b.launch(flat(max_rows, 256)) }?;
    }
    // 1. Per-chunk histograms.
    if plan.num_chunks > 0 {
        let f = backend.function(MODULE, "dispatch_count")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(indices).arg(&mut *ws);
        let lc = LaunchConfig {
            grid_dim: (plan.num_chunks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: smem_bytes,
        };
        // SAFETY: `dispatch_count(DispatchParams, const int* indices, int* ws)`;
        // indices holds num_tokens * topk i32, the workspace its checked length.
        unsafe { b.launch(lc) }?;
    }
    // 2. Column scans (also when there are no tokens: they write zero counts).
    {
        let f = backend.function(MODULE, "dispatch_scan_chunks")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&mut *ws);
        let lc = LaunchConfig {
            grid_dim: (e.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `dispatch_scan_chunks(DispatchParams, int* ws)`; workspace checked.
        unsafe { b.launch(lc) }?;
    }
    // 3. Starts, kept counts, offsets, per-rank rows, num_rows, dropped.
    {
        let f = backend.function(MODULE, "dispatch_scan_experts")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(&mut *ws)
            .arg(&mut out.tokens_per_expert)
            .arg(&mut out.expert_offsets)
            .arg(&mut out.rows_per_rank)
            .arg(&mut out.counts);
        let lc = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1024, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `dispatch_scan_experts(DispatchParams, int* ws, int*
        // tokens_per_expert, int* expert_offsets, int* rows_per_rank, long long*
        // counts)`; lengths checked above.
        unsafe { b.launch(lc) }?;
    }
    if num_tokens == 0 {
        return Ok(());
    }
    // 4. Stable scatter into expert segments (with the drop keys).
    {
        let f = backend.function(MODULE, "dispatch_scatter")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(indices).arg(weights).arg(&mut *ws);
        let lc = LaunchConfig {
            grid_dim: (plan.num_chunks as u32, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: smem_bytes,
        };
        // SAFETY: `dispatch_scatter(DispatchParams, const int* indices, const float*
        // weights, int* ws)`; lengths checked above.
        unsafe { b.launch(lc) }?;
    }
    // 5. Per-expert selection.
    {
        let f = backend.function(MODULE, "dispatch_select")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&p).arg(&mut *ws);
        let lc = LaunchConfig {
            grid_dim: (e as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: `dispatch_select(DispatchParams, int* ws)`; workspace checked.
        unsafe { b.launch(lc) }?;
    }
    // 6. Per-token outputs and row_to_token.
    {
        let f = backend.function(MODULE, "dispatch_finish")?;
        let renormalize = i32::from(cfg.renormalize);
        let mut b = stream.launch_builder(&f);
        b.arg(&p)
            .arg(indices)
            .arg(weights)
            .arg(&mut *ws)
            .arg(&mut out.expert_offsets)
            .arg(&mut out.slot)
            .arg(&mut out.row)
            .arg(&mut out.kept_weights)
            .arg(&mut out.row_to_token)
            .arg(&renormalize);
        // SAFETY: `dispatch_finish(DispatchParams, const int* indices, const float*
        // weights, int* ws, const int* expert_offsets, int* slot, int* row, float*
        // kept_weights, int* row_to_token, int renormalize)`; lengths checked above.
        unsafe { b.launch(flat(num_tokens, 256)) }?;
    }
    Ok(())
}

fn flat(items: usize, threads: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid(items, threads), 1, 1),
        block_dim: (threads as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Device buffers of a [`dispatch_raw`] call; shapes and types as in
/// [`DispatchCudaBuffers`] and [`dispatch_cuda`]'s inputs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DispatchRawPtrs {
    /// Input `indices [num_tokens, topk]` i32.
    pub indices: DevBuf,
    /// Input `weights [num_tokens, topk]` f32.
    pub weights: DevBuf,
    /// Output `slot [num_tokens, topk]` i32.
    pub slot: DevBuf,
    /// Output `row [num_tokens, topk]` i32.
    pub row: DevBuf,
    /// Output `kept_weights [num_tokens, topk]` f32.
    pub kept_weights: DevBuf,
    /// Output `tokens_per_expert [num_experts]` i32.
    pub tokens_per_expert: DevBuf,
    /// Output `row_to_token [max_rows]` i32 ([`dispatch_max_rows`]).
    pub row_to_token: DevBuf,
    /// Output `expert_offsets [num_experts + 1]` i32.
    pub expert_offsets: DevBuf,
    /// Output `rows_per_rank [ep_size]` i32.
    pub rows_per_rank: DevBuf,
    /// Output `counts [2]` i64: `num_rows`, `dropped`.
    pub counts: DevBuf,
    /// Scratch `[dispatch_workspace_len(..)]` i32.
    pub workspace: DevBuf,
}

/// [`dispatch_cuda`] on raw device buffers and a caller-owned stream (PyTorch's
/// `torch.cuda.current_stream().cuda_stream`), without synchronising: the same
/// checks (the op's validator, on the buffers' lengths) and kernels; nothing is
/// launched unless every length is right.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every buffer of `ptrs` holds `len` elements of its documented type
///    ([`DispatchRawPtrs`]) at `ptr` in that context, and stays valid until the
///    kernels have finished on `stream`.
/// 3. Output buffers and the workspace do not overlap each other or the inputs.
///
/// # Errors
/// As [`dispatch_cuda`].
pub unsafe fn dispatch_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
    ptrs: DispatchRawPtrs,
) -> Result<()> {
    const RAW: &str = "dispatch_raw";
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: for every BorrowedSlice here, (2) and (3).
    let (idx, w, mut slot, mut row, mut kw, mut tpe, mut rtt, mut eo, mut rpr, mut counts, mut ws) = unsafe {
        (
            borrow!(i32, s, ptrs.indices, RAW)?,
            borrow!(f32, s, ptrs.weights, RAW)?,
            borrow!(i32, s, ptrs.slot, RAW)?,
            borrow!(i32, s, ptrs.row, RAW)?,
            borrow!(f32, s, ptrs.kept_weights, RAW)?,
            borrow!(i32, s, ptrs.tokens_per_expert, RAW)?,
            borrow!(i32, s, ptrs.row_to_token, RAW)?,
            borrow!(i32, s, ptrs.expert_offsets, RAW)?,
            borrow!(i32, s, ptrs.rows_per_rank, RAW)?,
            borrow!(i64, s, ptrs.counts, RAW)?,
            borrow!(i32, s, ptrs.workspace, RAW)?,
        )
    };
    dispatch_cuda(
        &be,
        &idx.view(),
        &w.view(),
        num_tokens,
        topk,
        cfg,
        DispatchCudaBuffers {
            slot: slot.view_mut(),
            row: row.view_mut(),
            kept_weights: kw.view_mut(),
            tokens_per_expert: tpe.view_mut(),
            row_to_token: rtt.view_mut(),
            expert_offsets: eo.view_mut(),
            rows_per_rank: rpr.view_mut(),
            counts: counts.view_mut(),
            workspace: ws.view_mut(),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_bounds_the_histogram_and_covers_every_token() {
        for &(t, e) in &[
            (0usize, 1usize),
            (1, 1),
            (257, 8),
            (65_537, 256),
            (1 << 20, 64),
            (1 << 20, 1 << 20),
            (3, 1 << 23),
        ] {
            let p = Plan::new(t, e);
            assert!(p.chunk_tokens >= CHUNK_TOKENS);
            assert!(p.num_chunks * p.chunk_tokens >= t);
            assert!(p.num_chunks == 0 || (p.num_chunks - 1) * p.chunk_tokens < t);
            assert!(p.num_chunks * e <= MAX_HIST.max(e), "{t} x {e}");
        }
    }

    #[test]
    fn params_have_the_c_layout() {
        assert_eq!(std::mem::size_of::<DispatchParams>(), 64);
        assert_eq!(std::mem::align_of::<DispatchParams>(), 8);
    }

    #[test]
    fn workspace_len_reuses_the_op_validation() {
        let cfg = DispatchConfig::new(8).layout(DispatchLayout::PadToCapacity);
        let err = dispatch_workspace_len(4, 2, &cfg).unwrap_err();
        assert!(err.to_string().contains("capacity"), "{err}");
        let cfg = DispatchConfig::new(8).capacity(3);
        let n = dispatch_workspace_len(300, 2, &cfg).unwrap();
        let p = Plan::new(300, 8);
        assert_eq!(n, p.num_chunks * 8 + 17 + 3 * 600);
    }
}
