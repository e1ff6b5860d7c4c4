//! Auxiliary load-balance loss (Switch/GShard, sequence-level) and router z-loss on
//! the GPU (`cuda/losses.cu`), with the validation of [`crate::ops::aux_loss`] and
//! [`crate::ops::z_loss`].
//!
//! Forward: one pass over the logits computes the aux scores' per-expert sums, the
//! plain top-k counts and (optionally, fused) `Σ lse²` for the z-loss, as f64
//! partials per chunk of tokens in a caller-provided workspace; two tiny kernels
//! then add the partials in a fixed order. No float atomics: the same input gives
//! bitwise the same output. Results match `src/cpu/aux_loss.rs` /
//! `src/cpu/z_loss.rs`: counts exactly (up to near-ties of the aux scores, which
//! the GPU's `expf` may round differently), losses and sums within rounding.
//!
//! Backward: elementwise per token, one warp per token for `num_experts <= 256`,
//! one 256-thread block for `num_experts <= 2048` (the CUDA limit of these kernels).
//!
//! Everything stays on the device: the losses, counts and token totals are written
//! to device buffers, and the backward reads the forward's `total_tokens` /
//! `valid_tokens` and `grad_loss` from device memory, so nothing synchronises with
//! the host; the global loss's caller `T_total` may be a device value too
//! ([`CudaTotalTokens::Device`]). What cannot be checked without reading device memory
//! is not checked: caller counts `< 0` are used as they are, and a device `T_total` or
//! a backward `total_tokens` of 0 (or below) gives a zero loss / gradient rather than
//! an error. No kernel reads or writes out of bounds for any values.

use super::borrow;
use super::{CudaBackend, CudaStream, CudaView, CudaViewMut};
use crate::error::{Error, Result};
use crate::ops::aux_loss::{check_logits, check_seq_len, check_total, TOTAL_NEEDS_COUNTS};
use crate::ops::{check_finite, check_len, AuxLossConfig, ScoreFunction};
use crate::RouterFloat;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "losses";
const AUX_OP: &str = "aux_loss";
const SEQ_OP: &str = "seq_aux_loss";
const Z_OP: &str = "z_loss";

/// Largest `num_experts` the loss kernels take.
pub const LOSSES_CUDA_MAX_EXPERTS: usize = super::kernels::abi::common::MAX_EXPERTS;
const WARP_MAX_EXPERTS: usize = super::kernels::abi::common::WARP_MAX_EXPERTS;
const WARP_GROUPS_PER_BLOCK: u32 = super::kernels::abi::common::WARP_GROUPS_PER_BLOCK;
/// Workspace rows (chunks of tokens) the forward aims for: enough blocks to fill a
/// GPU, few enough that the reduction over rows stays cheap.
const TARGET_ROWS: usize = 2048;

/// Kernel parameters: `struct LossParams` of `cuda/losses.cu`, field for field
/// (build.rs fails the build when the two disagree).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LossParams {
    total_override: f64,
    aux_coeff: f32,
    z_coeff: f32,
    num_tokens: i32,
    num_experts: i32,
    seq_len: i32,
    num_segments: i32,
    chunk: i32,
    chunks_per_seg: i32,
    topk: i32,
    count_topk: i32,
    sigmoid: i32,
    want_aux: i32,
    want_z: i32,
    has_mask: i32,
    seq_mode: i32,
}

// SAFETY: `#[repr(C)]`, `Copy`, plain numbers; the same layout as the C struct the
// kernels take by value.
unsafe impl DeviceRepr for LossParams {}

/// How the tokens are cut: segments of `seq_len`, each in chunks of `chunk` tokens.
#[derive(Debug, Clone, Copy)]
struct Plan {
    segments: usize,
    seq_len: usize,
    chunk: usize,
    chunks_per_seg: usize,
}

impl Plan {
    /// `seq_len = None`: the global loss (one segment, also when `num_tokens == 0`).
    fn new(num_tokens: usize, seq_len: Option<usize>) -> Plan {
        let (segments, s) = match seq_len {
            None => (1, num_tokens),
            Some(s) if num_tokens == 0 || s == 0 => (0, s),
            Some(s) => (num_tokens / s, s),
        };
        let chunk = num_tokens.div_ceil(TARGET_ROWS).clamp(16, 256);
        let chunks_per_seg = if segments == 0 {
            0
        } else {
            s.div_ceil(chunk).max(1)
        };
        Plan {
            segments,
            seq_len: s,
            chunk,
            chunks_per_seg,
        }
    }

    fn rows(&self) -> usize {
        self.segments * self.chunks_per_seg
    }

    fn workspace_len(&self, num_experts: usize) -> usize {
        self.rows() * (2 * num_experts + 2) + 3 * self.segments
    }
}

/// f64 elements of the forward workspace for `num_tokens` tokens and
/// `num_experts` experts, for the global losses (`seq_len = None`) or the
/// sequence-level loss.
pub fn losses_workspace_len(
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
) -> usize {
    Plan::new(num_tokens, seq_len).workspace_len(num_experts)
}

/// f32 elements of the aux-loss backward workspace: `[segments, num_experts]`
/// (`segments = 1` for the global loss, `num_tokens / seq_len` sequence-level).
pub fn aux_loss_backward_workspace_len(
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
) -> usize {
    Plan::new(num_tokens, seq_len).segments * num_experts
}

fn check_experts(op: &'static str, num_experts: usize) -> Result<()> {
    if num_experts > LOSSES_CUDA_MAX_EXPERTS {
        return Err(Error::Unsupported {
            op,
            what: format!("the CUDA kernels take num_experts <= {LOSSES_CUDA_MAX_EXPERTS}, got num_experts = {num_experts}; use the CPU backend"),
        });
    }
    Ok(())
}

fn check_i32(op: &'static str, what: &'static str, value: usize) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::Overflow {
        op,
        what,
        value: value as u128,
        max: i32::MAX as i64,
    })
}

fn check_mask(
    op: &'static str,
    mask: Option<&CudaView<'_, bool>>,
    num_tokens: usize,
) -> Result<()> {
    if let Some(m) = mask {
        check_len(
            op,
            "padding_mask",
            m.len(),
            num_tokens,
            format_args!("[num_tokens] = [{num_tokens}]"),
        )?;
    }
    Ok(())
}

/// The z-loss's own checks (those of `crate::ops::z_loss`), on lengths.
fn validate_z(
    op: &'static str,
    logits_len: usize,
    num_tokens: usize,
    num_experts: usize,
    coeff: f32,
) -> Result<()> {
    if num_experts == 0 {
        return Err(Error::invalid(
            op,
            "num_experts",
            0,
            "there must be at least 1 expert",
        ));
    }
    check_finite(
        op,
        "coeff",
        coeff as f64,
        "the loss coefficient must be finite",
    )?;
    check_logits(op, "logits", logits_len, num_tokens, num_experts)
}

#[allow(clippy::too_many_arguments)]
fn params(
    op: &'static str,
    plan: &Plan,
    num_tokens: usize,
    num_experts: usize,
    aux: Option<&AuxLossConfig>,
    count_topk: bool,
    z_coeff: Option<f32>,
    has_mask: bool,
    seq_mode: bool,
    total_override: Option<usize>,
) -> Result<LossParams> {
    check_experts(op, num_experts)?;
    let num_tokens_i = check_i32(op, "num_tokens", num_tokens)?;
    check_i32(
        op,
        "num_tokens * num_experts",
        num_tokens.saturating_mul(num_experts),
    )?;
    Ok(LossParams {
        total_override: total_override.map_or(0.0, |t| t as f64),
        aux_coeff: aux.map_or(0.0, |c| c.coeff),
        z_coeff: z_coeff.unwrap_or(0.0),
        num_tokens: num_tokens_i,
        num_experts: num_experts as i32,
        seq_len: plan.seq_len as i32,
        num_segments: plan.segments as i32,
        chunk: plan.chunk as i32,
        chunks_per_seg: plan.chunks_per_seg as i32,
        topk: aux.map_or(0, |c| c.topk as i32),
        count_topk: i32::from(count_topk),
        sigmoid: i32::from(aux.is_some_and(|c| c.score_function == ScoreFunction::Sigmoid)),
        want_aux: i32::from(aux.is_some()),
        want_z: i32::from(z_coeff.is_some()),
        has_mask: i32::from(has_mask),
        seq_mode: i32::from(seq_mode),
    })
}

/// Output buffers of the z-loss (its own forward, or fused into the aux loss's).
#[derive(Debug)]
pub struct ZLossCudaBuffers<'a> {
    /// `[1]`: `coeff · mean_t lse_t²` over the valid tokens (0 if none).
    pub loss: CudaViewMut<'a, f32>,
    /// `[1]`: number of valid (non-padding) tokens; the backward's `valid_tokens`.
    pub valid_tokens: CudaViewMut<'a, i64>,
}

/// Output buffers of the aux-loss forward (`segments = 1` for the global loss,
/// `num_tokens / seq_len` for the sequence-level loss).
#[derive(Debug)]
pub struct AuxLossCudaBuffers<'a> {
    /// `[1]`: the loss.
    pub loss: CudaViewMut<'a, f32>,
    /// `[segments, num_experts]`: the plain top-k counts, or a copy of the caller's.
    pub counts: CudaViewMut<'a, i64>,
    /// `[segments, num_experts]`: `Σ_t P[t, e]` over valid tokens.
    pub scores_sum: CudaViewMut<'a, f32>,
    /// `[segments]`: `T_total` of each segment (global: the caller's `total_tokens`
    /// or the valid tokens; sequence-level: the sequence's valid tokens). The
    /// backward takes it as is.
    pub total_tokens: CudaViewMut<'a, i64>,
    /// `[losses_workspace_len(..)]` f64 scratch (contents on entry do not matter).
    pub workspace: CudaViewMut<'a, f64>,
    /// Also compute the z-loss in the same pass (with `z_loss_coeff`).
    pub z_loss: Option<ZLossCudaBuffers<'a>>,
}

/// `T_total` of the global aux loss on the GPU ([`aux_loss_cuda`]): the number of
/// tokens the caller's counts cover.
#[derive(Debug, Clone, Copy)]
pub enum CudaTotalTokens<'r, 'a> {
    /// The valid tokens of these logits (what the loss uses without caller counts).
    Valid,
    /// A host value, `>= 1`; only with caller counts.
    Host(usize),
    /// `[1]` i64 in device memory, read by the kernels (no host synchronisation); only
    /// with caller counts. A value `<= 0` cannot be rejected without reading it: it
    /// gives loss 0 and `total_tokens` 0 (so the backward's gradient is 0).
    Device(&'r CudaView<'a, i64>),
}

fn kernel_shape(root: &str, num_experts: usize, groups: usize) -> (String, LaunchConfig) {
    let g = groups as u32;
    if num_experts <= WARP_MAX_EXPERTS {
        (
            root.to_string(),
            LaunchConfig {
                grid_dim: (g.div_ceil(WARP_GROUPS_PER_BLOCK), 1, 1),
                block_dim: (32 * WARP_GROUPS_PER_BLOCK, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    } else {
        (
            format!("{root}_large"),
            LaunchConfig {
                grid_dim: (g, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    }
}

fn one_block(threads: u32, blocks: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The aux outputs of [`run_forward`]: loss, counts, scores_sum, total_tokens.
type AuxOutRefs<'r, 'a> = (
    &'r mut CudaViewMut<'a, f32>,
    &'r mut CudaViewMut<'a, i64>,
    &'r mut CudaViewMut<'a, f32>,
    &'r mut CudaViewMut<'a, i64>,
);

/// The three launches of the forward. Buffers already checked.
#[allow(clippy::too_many_arguments)]
fn run_forward<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    p: &LossParams,
    plan: &Plan,
    logits: &CudaView<'_, T>,
    mask: Option<&CudaView<'_, bool>>,
    counts_in: Option<&CudaView<'_, i64>>,
    total_in: Option<&CudaView<'_, i64>>,
    mut aux: Option<AuxOutRefs<'_, '_>>,
    mut z: Option<&mut ZLossCudaBuffers<'_>>,
    workspace: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let stream: &CudaStream = backend.stream();
    let null: u64 = 0;
    let e = p.num_experts as usize;
    if plan.rows() > 0 {
        let (root, lc) = kernel_shape("losses_fwd", e, plan.rows());
        let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
        let mut b = stream.launch_builder(&f);
        b.arg(logits);
        match mask {
            Some(m) => b.arg(m),
            None => b.arg(&null),
        };
        b.arg(p).arg(&mut *workspace);
        // SAFETY: matches `losses_fwd*_{dtype}(const T* logits, const unsigned char*
        // mask, LossParams, double* ws)`; logits hold num_tokens * num_experts
        // elements, the mask num_tokens (or is null and unread: has_mask = 0), the
        // workspace losses_workspace_len(..) elements (checked by the callers).
        unsafe { b.launch(lc) }?;
        let f = backend.function(MODULE, "losses_reduce")?;
        let mut b = stream.launch_builder(&f);
        b.arg(p);
        match counts_in {
            Some(c) => b.arg(c),
            None => b.arg(&null),
        };
        match total_in {
            Some(t) => b.arg(t),
            None => b.arg(&null),
        };
        b.arg(&mut *workspace);
        match &mut aux {
            Some((_, counts, scores, total)) => {
                b.arg(&mut **scores).arg(&mut **counts).arg(&mut **total);
            }
            None => {
                b.arg(&null).arg(&null).arg(&null);
            }
        }
        // SAFETY: matches `losses_reduce(LossParams, const long long* counts_in,
        // const long long* total_in, double* ws, float* scores_sum, long long*
        // counts_out, long long* total_tokens)`; the aux outputs hold [segments, E] /
        // [segments] elements and are only touched when want_aux = 1 (then they are
        // non-null); counts_in is read only when count_topk = 0 (then it holds
        // [segments, E]); total_in is null or holds 1 element (read when non-null).
        unsafe { b.launch(one_block(256, plan.segments)) }?;
    }
    let f = backend.function(MODULE, "losses_finalize")?;
    let mut b = stream.launch_builder(&f);
    b.arg(p).arg(&mut *workspace);
    match &mut aux {
        Some((loss, ..)) => b.arg(&mut **loss),
        None => b.arg(&null),
    };
    match &mut z {
        Some(zb) => {
            b.arg(&mut zb.loss).arg(&mut zb.valid_tokens);
        }
        None => {
            b.arg(&null).arg(&null);
        }
    }
    // SAFETY: matches `losses_finalize(LossParams, const double* ws, float* aux_loss,
    // float* z_loss, long long* z_valid)`; it reads the segments area of the
    // workspace (segments * 3 elements after the rows) and writes one element of
    // each output it is asked for (non-null then).
    unsafe { b.launch(one_block(32, 1)) }?;
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn aux_forward<T: RouterFloat + DeviceRepr>(
    op: &'static str,
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: Option<&CudaView<'_, i64>>,
    total_tokens: CudaTotalTokens<'_, '_>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    mut out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    cfg.validate(op, num_experts)?;
    if let Some(s) = seq_len {
        check_seq_len(op, s, num_tokens)?;
    }
    check_logits(op, "logits", logits.len(), num_tokens, num_experts)?;
    check_mask(op, padding_mask, num_tokens)?;
    if let Some(c) = z_loss_coeff {
        validate_z(Z_OP, logits.len(), num_tokens, num_experts, c)?;
    }
    if z_loss_coeff.is_some() != out.z_loss.is_some() {
        return Err(Error::invalid(
            Z_OP,
            "z_loss_coeff",
            format_args!(
                "{z_loss_coeff:?} with out.z_loss {}",
                if out.z_loss.is_some() {
                    "given"
                } else {
                    "absent"
                }
            ),
            "pass both z_loss_coeff and out.z_loss to fuse the z-loss, or neither",
        ));
    }
    let (total_override, total_in) = match total_tokens {
        CudaTotalTokens::Valid => (None, None),
        CudaTotalTokens::Host(t) => {
            check_total(op, counts.is_some(), Some(t))?;
            (Some(t), None)
        }
        CudaTotalTokens::Device(v) => {
            // The value is on the device: only its presence and length are checked.
            if counts.is_none() {
                return Err(Error::invalid(
                    op,
                    "total_tokens",
                    "a device value",
                    TOTAL_NEEDS_COUNTS,
                ));
            }
            check_len(op, "total_tokens", v.len(), 1, "[1]")?;
            (None, Some(v))
        }
    };
    if seq_len.is_some() && !matches!(total_tokens, CudaTotalTokens::Valid) {
        return Err(Error::invalid(
            op,
            "total_tokens",
            "given",
            "the sequence-level loss uses each sequence's valid tokens as its T_total",
        ));
    }
    let plan = Plan::new(num_tokens, seq_len);
    let segs = plan.segments;
    let seg_shape = if seq_len.is_some() {
        format!("[batch, num_experts] = [{segs}, {num_experts}]")
    } else {
        format!("[num_experts] = [{num_experts}]")
    };
    if let Some(c) = counts {
        check_len(op, "counts", c.len(), segs * num_experts, &seg_shape)?;
    }
    check_len(op, "loss", out.loss.len(), 1, "[1]")?;
    check_len(
        op,
        "out.counts",
        out.counts.len(),
        segs * num_experts,
        &seg_shape,
    )?;
    check_len(
        op,
        "scores_sum",
        out.scores_sum.len(),
        segs * num_experts,
        &seg_shape,
    )?;
    check_len(
        op,
        "total_tokens",
        out.total_tokens.len(),
        segs,
        format_args!("[segments] = [{segs}]"),
    )?;
    check_len(
        op,
        "workspace",
        out.workspace.len(),
        plan.workspace_len(num_experts),
        "losses_workspace_len(num_tokens, num_experts, seq_len)",
    )?;
    if let Some(z) = &out.z_loss {
        check_len(Z_OP, "loss", z.loss.len(), 1, "[1]")?;
        check_len(Z_OP, "valid_tokens", z.valid_tokens.len(), 1, "[1]")?;
    }
    let p = params(
        op,
        &plan,
        num_tokens,
        num_experts,
        Some(cfg),
        counts.is_none(),
        z_loss_coeff,
        padding_mask.is_some(),
        seq_len.is_some(),
        total_override,
    )?;
    let AuxLossCudaBuffers {
        loss,
        counts: counts_out,
        scores_sum,
        total_tokens: total_out,
        workspace,
        z_loss,
    } = &mut out;
    run_forward(
        backend,
        &p,
        &plan,
        logits,
        padding_mask,
        counts,
        total_in,
        Some((loss, counts_out, scores_sum, total_out)),
        z_loss.as_mut(),
        workspace,
    )
}

/// Switch/GShard aux loss (see [`crate::ops::aux_loss`]) of `logits [num_tokens,
/// num_experts]` on the GPU, optionally with the caller's `counts [num_experts]`
/// and the `total_tokens` they cover (a host or a device value, see
/// [`CudaTotalTokens`]), and optionally the z-loss fused into the same pass over the
/// logits (`z_loss_coeff` with `out.z_loss`). Launches on `backend.stream()` without
/// synchronising.
///
/// # Errors
/// What [`crate::ops::aux_loss`] rejects (config, shapes, `total_tokens` without
/// `counts`, a host `total_tokens` of 0),
/// plus [`Error::Shape`] for an output or workspace of the wrong length,
/// [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`]. Negative caller counts are not detected (module docs).
#[allow(clippy::too_many_arguments)]
pub fn aux_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: Option<&CudaView<'_, i64>>,
    total_tokens: CudaTotalTokens<'_, '_>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    aux_forward(
        AUX_OP,
        backend,
        logits,
        num_tokens,
        num_experts,
        None,
        padding_mask,
        counts,
        total_tokens,
        cfg,
        z_loss_coeff,
        out,
    )
}

/// Sequence-level aux loss (see [`crate::ops::seq_aux_loss`]) of `logits [batch *
/// seq_len, num_experts]` on the GPU, optionally with the caller's `counts [batch,
/// num_experts]`, optionally with the z-loss fused. `out.total_tokens` receives the
/// valid tokens of each sequence.
///
/// # Errors
/// As [`aux_loss_cuda`], plus `seq_len` not dividing `num_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn seq_aux_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: Option<&CudaView<'_, i64>>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    aux_forward(
        SEQ_OP,
        backend,
        logits,
        num_tokens,
        num_experts,
        Some(seq_len),
        padding_mask,
        counts,
        CudaTotalTokens::Valid,
        cfg,
        z_loss_coeff,
        out,
    )
}

/// Router z-loss (see [`crate::ops::z_loss`]) of `logits [num_tokens, num_experts]`
/// on the GPU into `out.loss [1]` and `out.valid_tokens [1]`, with an f64 scratch
/// `workspace [losses_workspace_len(num_tokens, num_experts, None)]`.
///
/// # Errors
/// What [`crate::ops::z_loss`] rejects, plus output / workspace lengths,
/// [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn z_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    coeff: f32,
    workspace: &mut CudaViewMut<'_, f64>,
    mut out: ZLossCudaBuffers<'_>,
) -> Result<()> {
    validate_z(Z_OP, logits.len(), num_tokens, num_experts, coeff)?;
    check_mask(Z_OP, padding_mask, num_tokens)?;
    let plan = Plan::new(num_tokens, None);
    check_len(Z_OP, "loss", out.loss.len(), 1, "[1]")?;
    check_len(Z_OP, "valid_tokens", out.valid_tokens.len(), 1, "[1]")?;
    check_len(
        Z_OP,
        "workspace",
        workspace.len(),
        plan.workspace_len(num_experts),
        "losses_workspace_len(num_tokens, num_experts, None)",
    )?;
    let p = params(
        Z_OP,
        &plan,
        num_tokens,
        num_experts,
        None,
        false,
        Some(coeff),
        padding_mask.is_some(),
        false,
        None,
    )?;
    run_forward(
        backend,
        &p,
        &plan,
        logits,
        padding_mask,
        None,
        None,
        None,
        Some(&mut out),
        workspace,
    )
}

#[allow(clippy::too_many_arguments)]
fn aux_backward<T: RouterFloat + DeviceRepr>(
    op: &'static str,
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: &CudaView<'_, i64>,
    total_tokens: &CudaView<'_, i64>,
    cfg: &AuxLossConfig,
    grad_loss: &CudaView<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    cfg.validate(op, num_experts)?;
    if let Some(s) = seq_len {
        check_seq_len(op, s, num_tokens)?;
    }
    check_logits(op, "logits", logits.len(), num_tokens, num_experts)?;
    check_mask(op, padding_mask, num_tokens)?;
    let plan = Plan::new(num_tokens, seq_len);
    let segs = plan.segments;
    let seg_shape = if seq_len.is_some() {
        format!("[batch, num_experts] = [{segs}, {num_experts}]")
    } else {
        format!("[num_experts] = [{num_experts}]")
    };
    check_len(op, "counts", counts.len(), segs * num_experts, &seg_shape)?;
    check_len(
        op,
        "total_tokens",
        total_tokens.len(),
        segs,
        format_args!("[segments] = [{segs}]"),
    )?;
    check_len(op, "grad_loss", grad_loss.len(), 1, "[1]")?;
    check_len(
        op,
        "workspace",
        workspace.len(),
        segs * num_experts,
        "aux_loss_backward_workspace_len(num_tokens, num_experts, seq_len)",
    )?;
    check_logits(
        op,
        "grad_logits",
        grad_logits.len(),
        num_tokens,
        num_experts,
    )?;
    let p = params(
        op,
        &plan,
        num_tokens,
        num_experts,
        Some(cfg),
        false,
        None,
        padding_mask.is_some(),
        seq_len.is_some(),
        None,
    )?;
    if num_tokens == 0 || segs == 0 {
        return Ok(());
    }
    let stream = backend.stream();
    let f = backend.function(MODULE, "aux_loss_bwd_prep")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(counts)
        .arg(total_tokens)
        .arg(grad_loss)
        .arg(&mut *workspace);
    // SAFETY: matches `aux_loss_bwd_prep(LossParams, const long long* counts, const
    // long long* total_tokens, const float* grad_loss, float* g)`; counts and g hold
    // [segments, E], total_tokens [segments], grad_loss 1 element (checked above).
    unsafe { b.launch(one_block(256, segs)) }?;
    let (root, lc) = kernel_shape("aux_loss_bwd", num_experts, num_tokens);
    let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
    let null: u64 = 0;
    let mut b = stream.launch_builder(&f);
    b.arg(logits);
    match padding_mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(&mut *workspace).arg(&p).arg(grad_logits);
    // SAFETY: matches `aux_loss_bwd*_{dtype}(const T* logits, const unsigned char*
    // mask, const float* g, LossParams, T* grad)`; logits and grad hold
    // num_tokens * E elements, the mask num_tokens (or null, unread), g [segments, E];
    // token t reads row t / seq_len < segments.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Backward of the Switch/GShard aux loss on the GPU: `grad_logits [num_tokens,
/// num_experts]` (every element written; padding tokens 0) for the gradient
/// `grad_loss [1]` of the loss, given the forward's `counts [num_experts]` and
/// `total_tokens [1]` (device buffers, read by the kernels), with an f32 scratch
/// `workspace [aux_loss_backward_workspace_len(..)]`.
///
/// # Errors
/// As [`crate::ops::aux_loss_backward_into`] for config and shapes, plus buffer
/// lengths, [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`]. A `total_tokens` of 0 gives a zero gradient (module docs).
#[allow(clippy::too_many_arguments)]
pub fn aux_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: &CudaView<'_, i64>,
    total_tokens: &CudaView<'_, i64>,
    cfg: &AuxLossConfig,
    grad_loss: &CudaView<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    aux_backward(
        AUX_OP,
        backend,
        logits,
        num_tokens,
        num_experts,
        None,
        padding_mask,
        counts,
        total_tokens,
        cfg,
        grad_loss,
        workspace,
        grad_logits,
    )
}

/// Backward of the sequence-level aux loss on the GPU, given the forward's `counts
/// [batch, num_experts]` and per-sequence `valid_tokens [batch]` (its
/// `total_tokens` output).
///
/// # Errors
/// As [`aux_loss_backward_cuda`], plus `seq_len` not dividing `num_tokens`.
#[allow(clippy::too_many_arguments)]
pub fn seq_aux_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    counts: &CudaView<'_, i64>,
    valid_tokens: &CudaView<'_, i64>,
    cfg: &AuxLossConfig,
    grad_loss: &CudaView<'_, f32>,
    workspace: &mut CudaViewMut<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    aux_backward(
        SEQ_OP,
        backend,
        logits,
        num_tokens,
        num_experts,
        Some(seq_len),
        padding_mask,
        counts,
        valid_tokens,
        cfg,
        grad_loss,
        workspace,
        grad_logits,
    )
}

/// Backward of the z-loss on the GPU: `grad_logits [num_tokens, num_experts]`
/// (every element written; padding tokens 0) for `grad_loss [1]`, given the
/// forward's `valid_tokens [1]` (device buffers).
///
/// # Errors
/// As [`crate::ops::z_loss_backward_into`] for config and shapes, plus buffer
/// lengths, [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`].
#[allow(clippy::too_many_arguments)]
pub fn z_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    logits: &CudaView<'_, T>,
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&CudaView<'_, bool>>,
    valid_tokens: &CudaView<'_, i64>,
    coeff: f32,
    grad_loss: &CudaView<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    validate_z(Z_OP, logits.len(), num_tokens, num_experts, coeff)?;
    check_mask(Z_OP, padding_mask, num_tokens)?;
    check_len(Z_OP, "valid_tokens", valid_tokens.len(), 1, "[1]")?;
    check_len(Z_OP, "grad_loss", grad_loss.len(), 1, "[1]")?;
    check_logits(
        Z_OP,
        "grad_logits",
        grad_logits.len(),
        num_tokens,
        num_experts,
    )?;
    let plan = Plan::new(num_tokens, None);
    let p = params(
        Z_OP,
        &plan,
        num_tokens,
        num_experts,
        None,
        false,
        Some(coeff),
        padding_mask.is_some(),
        false,
        None,
    )?;
    if num_tokens == 0 {
        return Ok(());
    }
    let (root, lc) = kernel_shape("z_loss_bwd", num_experts, num_tokens);
    let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
    let null: u64 = 0;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(logits);
    match padding_mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(grad_loss).arg(valid_tokens).arg(&p).arg(grad_logits);
    // SAFETY: matches `z_loss_bwd*_{dtype}(const T* logits, const unsigned char* mask,
    // const float* grad_loss, const long long* valid, LossParams, T* grad)`; lengths
    // checked above.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Which loss kernels [`losses_raw`] launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossesPass {
    /// [`aux_loss_cuda`] (`seq_len = None`) or [`seq_aux_loss_cuda`], with the z-loss
    /// fused when `z_loss_coeff` is given.
    AuxForward,
    /// [`aux_loss_backward_cuda`] or [`seq_aux_loss_backward_cuda`].
    AuxBackward,
    /// [`z_loss_cuda`] (coefficient `z_loss_coeff`).
    ZForward,
    /// [`z_loss_backward_cuda`] (coefficient `z_loss_coeff`).
    ZBackward,
}

/// Device addresses of a [`losses_raw`] call (`0` for an absent optional buffer);
/// shapes and types as in the safe functions' arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossesRawPtrs {
    /// `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: u64,
    /// `padding_mask [num_tokens]` bytes, or 0.
    pub padding_mask: u64,
    /// Aux forward: caller counts `[segments, num_experts]` i64 or 0; aux backward:
    /// the forward's counts.
    pub counts: u64,
    /// Aux forward outputs (see [`AuxLossCudaBuffers`]).
    pub loss: u64,
    /// `[segments, num_experts]` i64 (aux forward output).
    pub out_counts: u64,
    /// `[segments, num_experts]` f32 (aux forward output).
    pub scores_sum: u64,
    /// `[segments]` i64: aux forward output, aux backward input.
    pub total_tokens: u64,
    /// Global aux forward: the caller's `T_total` `[1]` i64, read on the device
    /// ([`CudaTotalTokens::Device`]), or 0 (then the `total_tokens` argument of
    /// [`losses_raw`], or the valid tokens).
    pub total_tokens_in: u64,
    /// f64 forward workspace ([`losses_workspace_len`]) or f32 aux backward workspace
    /// ([`aux_loss_backward_workspace_len`]).
    pub workspace: u64,
    /// `[1]` f32: the z-loss (z forward, or fused into the aux forward).
    pub z_loss: u64,
    /// `[1]` i64: valid tokens (z forward output, z / sequence-level backward input).
    pub valid_tokens: u64,
    /// `[1]` f32 (backward input).
    pub grad_loss: u64,
    /// `[num_tokens, num_experts]`, element type `dtype` (backward output).
    pub grad_logits: u64,
}

/// Launch a loss pass on raw device pointers and a caller-owned stream (PyTorch's
/// current stream), without synchronising; the checks and kernels of the safe
/// functions named in [`LossesPass`]. `seq_len` selects the sequence-level aux loss;
/// `total_tokens` is the global aux loss's caller `T_total` as a host value
/// (`ptrs.total_tokens_in` as a device value; at most one of the two).
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every pointer the pass uses is a device address in that context, valid for
///    its documented shape and type, and stays valid until the kernels have
///    finished on `stream`.
/// 3. Output buffers (and workspaces) do not overlap any other buffer of the call.
///
/// # Errors
/// As the safe functions.
#[allow(clippy::too_many_arguments)]
pub unsafe fn losses_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: LossesPass,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    seq_len: Option<usize>,
    total_tokens: Option<usize>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    ptrs: LossesRawPtrs,
) -> Result<()> {
    use super::BorrowedSlice;
    use crate::DType;
    let op = match pass {
        LossesPass::AuxForward | LossesPass::AuxBackward => AUX_OP,
        _ => Z_OP,
    };
    let nl = num_tokens.checked_mul(num_experts).ok_or(Error::Overflow {
        op,
        what: "num_tokens * num_experts",
        value: num_tokens as u128 * num_experts as u128,
        max: i64::MAX,
    })?;
    let plan = Plan::new(num_tokens, seq_len);
    let segs = plan.segments;
    let ne_s = segs.saturating_mul(num_experts);
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY (every BorrowedSlice below): (2) and (3); lengths are the documented
    // shapes for these sizes.
    let mask = (ptrs.padding_mask != 0)
        .then(|| unsafe { BorrowedSlice::<bool>::new(s, ptrs.padding_mask, num_tokens) });
    let mask_v = mask.as_ref().map(|b| b.view());
    let z_coeff = z_loss_coeff.unwrap_or(0.0);
    macro_rules! run {
        ($t:ty) => {{
            let z = unsafe { borrow!($t, s, ptrs.logits, nl, "losses_raw") }?;
            match pass {
                LossesPass::AuxForward => {
                    // The z-loss buffers are used (and may not be null) only when the
                    // z-loss is fused into this pass.
                    let fused = usize::from(z_loss_coeff.is_some());
                    let counts = (ptrs.counts != 0)
                        .then(|| unsafe { BorrowedSlice::<i64>::new(s, ptrs.counts, ne_s) });
                    let counts_v = counts.as_ref().map(|b| b.view());
                    let total_in = if ptrs.total_tokens_in == 0 {
                        None
                    } else if total_tokens.is_some() {
                        return Err(Error::invalid(
                            op,
                            "total_tokens",
                            "a host and a device value",
                            "pass the caller's T_total once: as a host value or a device one",
                        ));
                    } else {
                        Some(unsafe { borrow!(i64, s, ptrs.total_tokens_in, 1, "losses_raw") }?)
                    };
                    let total_in_v = total_in.as_ref().map(|b| b.view());
                    let total = match (&total_in_v, total_tokens) {
                        (Some(v), _) => CudaTotalTokens::Device(v),
                        (None, Some(t)) => CudaTotalTokens::Host(t),
                        (None, None) => CudaTotalTokens::Valid,
                    };
                    let mut loss = unsafe { borrow!(f32, s, ptrs.loss, 1, "losses_raw") }?;
                    let mut oc = unsafe { borrow!(i64, s, ptrs.out_counts, ne_s, "losses_raw") }?;
                    let mut ss = unsafe { borrow!(f32, s, ptrs.scores_sum, ne_s, "losses_raw") }?;
                    let mut tt = unsafe { borrow!(i64, s, ptrs.total_tokens, segs, "losses_raw") }?;
                    let mut ws = unsafe {
                        borrow!(
                            f64,
                            s,
                            ptrs.workspace,
                            plan.workspace_len(num_experts),
                            "losses_raw"
                        )
                    }?;
                    let mut zl = unsafe { borrow!(f32, s, ptrs.z_loss, fused, "losses_raw") }?;
                    let mut vt =
                        unsafe { borrow!(i64, s, ptrs.valid_tokens, fused, "losses_raw") }?;
                    let out = AuxLossCudaBuffers {
                        loss: loss.view_mut(),
                        counts: oc.view_mut(),
                        scores_sum: ss.view_mut(),
                        total_tokens: tt.view_mut(),
                        workspace: ws.view_mut(),
                        z_loss: z_loss_coeff.map(|_| ZLossCudaBuffers {
                            loss: zl.view_mut(),
                            valid_tokens: vt.view_mut(),
                        }),
                    };
                    match seq_len {
                        None => aux_loss_cuda::<$t>(
                            &be,
                            &z.view(),
                            num_tokens,
                            num_experts,
                            mask_v.as_ref(),
                            counts_v.as_ref(),
                            total,
                            cfg,
                            z_loss_coeff,
                            out,
                        ),
                        Some(sl) => aux_forward::<$t>(
                            SEQ_OP,
                            &be,
                            &z.view(),
                            num_tokens,
                            num_experts,
                            Some(sl),
                            mask_v.as_ref(),
                            counts_v.as_ref(),
                            total,
                            cfg,
                            z_loss_coeff,
                            out,
                        ),
                    }
                }
                LossesPass::AuxBackward => {
                    let counts = unsafe { borrow!(i64, s, ptrs.counts, ne_s, "losses_raw") }?;
                    let gl = unsafe { borrow!(f32, s, ptrs.grad_loss, 1, "losses_raw") }?;
                    let mut ws = unsafe {
                        borrow!(
                            f32,
                            s,
                            ptrs.workspace,
                            aux_loss_backward_workspace_len(num_tokens, num_experts, seq_len),
                            "losses_raw"
                        )
                    }?;
                    let mut g = unsafe { borrow!($t, s, ptrs.grad_logits, nl, "losses_raw") }?;
                    match seq_len {
                        None => {
                            let tt =
                                unsafe { borrow!(i64, s, ptrs.total_tokens, 1, "losses_raw") }?;
                            aux_loss_backward_cuda::<$t>(
                                &be,
                                &z.view(),
                                num_tokens,
                                num_experts,
                                mask_v.as_ref(),
                                &counts.view(),
                                &tt.view(),
                                cfg,
                                &gl.view(),
                                &mut ws.view_mut(),
                                &mut g.view_mut(),
                            )
                        }
                        Some(sl) => {
                            let vt =
                                unsafe { borrow!(i64, s, ptrs.total_tokens, segs, "losses_raw") }?;
                            seq_aux_loss_backward_cuda::<$t>(
                                &be,
                                &z.view(),
                                num_tokens,
                                num_experts,
                                sl,
                                mask_v.as_ref(),
                                &counts.view(),
                                &vt.view(),
                                cfg,
                                &gl.view(),
                                &mut ws.view_mut(),
                                &mut g.view_mut(),
                            )
                        }
                    }
                }
                LossesPass::ZForward => {
                    let mut ws = unsafe {
                        borrow!(
                            f64,
                            s,
                            ptrs.workspace,
                            losses_workspace_len(num_tokens, num_experts, None),
                            "losses_raw"
                        )
                    }?;
                    let mut zl = unsafe { borrow!(f32, s, ptrs.z_loss, 1, "losses_raw") }?;
                    let mut vt = unsafe { borrow!(i64, s, ptrs.valid_tokens, 1, "losses_raw") }?;
                    z_loss_cuda::<$t>(
                        &be,
                        &z.view(),
                        num_tokens,
                        num_experts,
                        mask_v.as_ref(),
                        z_coeff,
                        &mut ws.view_mut(),
                        ZLossCudaBuffers {
                            loss: zl.view_mut(),
                            valid_tokens: vt.view_mut(),
                        },
                    )
                }
                LossesPass::ZBackward => {
                    let vt = unsafe { borrow!(i64, s, ptrs.valid_tokens, 1, "losses_raw") }?;
                    let gl = unsafe { borrow!(f32, s, ptrs.grad_loss, 1, "losses_raw") }?;
                    let mut g = unsafe { borrow!($t, s, ptrs.grad_logits, nl, "losses_raw") }?;
                    z_loss_backward_cuda::<$t>(
                        &be,
                        &z.view(),
                        num_tokens,
                        num_experts,
                        mask_v.as_ref(),
                        &vt.view(),
                        z_coeff,
                        &gl.view(),
                        &mut g.view_mut(),
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
