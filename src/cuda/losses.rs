//! Auxiliary load-balance loss (Switch/GShard, sequence-level) and router z-loss on
//! the GPU (`cuda/losses.cu`), with the validation of [`crate::ops::aux_loss()`] and
//! [`crate::ops::z_loss()`].
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
use super::{
    check_unused, BorrowedSlice, CudaBackend, CudaStream, CudaView, CudaViewMut, DevBuf,
    RouterLogitsCuda,
};
use crate::error::{Error, Result};
use crate::ops::aux_loss::{
    aux_op, check_segment_rows, check_total, validate_aux_loss, validate_aux_loss_backward,
    TOTAL_NEEDS_COUNTS,
};
use crate::ops::z_loss::{validate_z_loss, validate_z_loss_backward};
use crate::ops::{check_len, AuxLossConfig, ScoreFunction};
use crate::RouterFloat;
use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

const MODULE: &str = "losses";
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

/// The kernel parameters of these logits cut by `plan` (no loss selected yet), after
/// the kernels' own limits: `num_experts <= 2048`, `num_tokens * num_experts` within
/// `i32`.
fn base_params<T>(
    op: &'static str,
    plan: &Plan,
    x: &RouterLogitsCuda<'_, T>,
) -> Result<LossParams> {
    check_experts(op, x.num_experts)?;
    let num_tokens = check_i32(op, "num_tokens", x.num_tokens)?;
    check_i32(
        op,
        "num_tokens * num_experts",
        x.num_tokens.saturating_mul(x.num_experts),
    )?;
    Ok(LossParams {
        num_tokens,
        num_experts: x.num_experts as i32,
        seq_len: plan.seq_len as i32,
        num_segments: plan.segments as i32,
        chunk: plan.chunk as i32,
        chunks_per_seg: plan.chunks_per_seg as i32,
        has_mask: i32::from(x.padding_mask.is_some()),
        ..Default::default()
    })
}

/// `p` with the aux loss of `cfg` selected (`seq_mode`: the sequence-level loss).
fn aux_params(p: LossParams, cfg: &AuxLossConfig, seq_mode: bool) -> LossParams {
    LossParams {
        aux_coeff: cfg.coeff,
        topk: cfg.topk as i32,
        sigmoid: i32::from(cfg.score_function == ScoreFunction::Sigmoid),
        want_aux: 1,
        seq_mode: i32::from(seq_mode),
        ..p
    }
}

/// `p` with the z-loss of coefficient `coeff` selected.
fn z_params(p: LossParams, coeff: f32) -> LossParams {
    LossParams {
        z_coeff: coeff,
        want_z: 1,
        ..p
    }
}

/// Output buffers of the z-loss (its own forward, or fused into the aux loss's).
#[derive(Debug)]
pub struct ZLossCudaBuffers<'a> {
    /// `[1]`: `coeff · mean_t lse_t²` over the valid tokens (0 if none).
    pub loss: CudaViewMut<'a, f32>,
    /// `[1]`: number of valid (non-padding) tokens; the backward's `valid_tokens`.
    pub valid_tokens: CudaViewMut<'a, i64>,
}

impl ZLossCudaBuffers<'_> {
    fn check(&self) -> Result<()> {
        check_len(Z_OP, "loss", self.loss.len(), 1, "[1]")?;
        check_len(Z_OP, "valid_tokens", self.valid_tokens.len(), 1, "[1]")
    }
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

/// The device inputs of the aux-loss backward besides the logits: the forward's
/// `counts` and `total_tokens` outputs ([`AuxLossCudaBuffers`]) and the gradient of
/// the loss.
#[derive(Debug)]
pub struct AuxLossBackwardCudaInputs<'a> {
    /// `[segments, num_experts]` i64: the counts the forward used.
    pub counts: CudaView<'a, i64>,
    /// `[segments]` i64: the forward's `total_tokens` (global: `[1]`, its `T_total`;
    /// sequence-level: each sequence's valid tokens).
    pub total_tokens: CudaView<'a, i64>,
    /// `[1]` f32: the gradient of the loss.
    pub grad_loss: CudaView<'a, f32>,
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

/// What one forward pass reads besides the logits, and what it writes besides the
/// workspace.
struct Forward<'r, 'c, 'o> {
    /// The caller's counts (aux loss; `None`: the plain top-k counts).
    counts_in: Option<&'r CudaView<'c, i64>>,
    /// The caller's `T_total` on the device (global aux loss).
    total_in: Option<&'r CudaView<'c, i64>>,
    aux: Option<AuxOutRefs<'r, 'o>>,
    z: Option<&'r mut ZLossCudaBuffers<'o>>,
}

/// The three launches of the forward. Buffers already checked.
fn run_forward<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    p: &LossParams,
    plan: &Plan,
    x: &RouterLogitsCuda<'_, T>,
    fw: Forward<'_, '_, '_>,
    workspace: &mut CudaViewMut<'_, f64>,
) -> Result<()> {
    let Forward {
        counts_in,
        total_in,
        mut aux,
        mut z,
    } = fw;
    let stream: &CudaStream = backend.stream();
    let null: u64 = 0;
    let e = p.num_experts as usize;
    if plan.rows() > 0 {
        let (root, lc) = kernel_shape("losses_fwd", e, plan.rows());
        let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
        let mut b = stream.launch_builder(&f);
        b.arg(&x.logits);
        match &x.padding_mask {
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

/// Which aux loss a pass computes: the global one with its `T_total`, or the
/// sequence-level one of sequences of `seq_len` tokens.
#[derive(Debug, Clone, Copy)]
enum AuxMode<'r, 'a> {
    Global(CudaTotalTokens<'r, 'a>),
    Seq(usize),
}

impl AuxMode<'_, '_> {
    fn seq_len(&self) -> Option<usize> {
        match self {
            AuxMode::Global(_) => None,
            AuxMode::Seq(s) => Some(*s),
        }
    }
}

fn aux_forward<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    mode: AuxMode<'_, '_>,
    counts: Option<&CudaView<'_, i64>>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    mut out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    let seq_len = mode.seq_len();
    let op = aux_op(seq_len);
    validate_aux_loss(x.lens(), seq_len, counts.map(CudaView::len), cfg)?;
    if let Some(c) = z_loss_coeff {
        validate_z_loss(x.lens(), c)?;
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
    let (total_override, total_in) = match mode {
        AuxMode::Seq(_) | AuxMode::Global(CudaTotalTokens::Valid) => (None, None),
        AuxMode::Global(CudaTotalTokens::Host(t)) => {
            check_total(op, counts.is_some(), Some(t))?;
            (Some(t), None)
        }
        AuxMode::Global(CudaTotalTokens::Device(v)) => {
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
    let plan = Plan::new(x.num_tokens, seq_len);
    let segs = plan.segments;
    let (t, e) = (x.num_tokens, x.num_experts);
    check_len(op, "loss", out.loss.len(), 1, "[1]")?;
    check_segment_rows(op, "out.counts", out.counts.len(), seq_len, t, e)?;
    check_segment_rows(op, "scores_sum", out.scores_sum.len(), seq_len, t, e)?;
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
        plan.workspace_len(e),
        "losses_workspace_len(num_tokens, num_experts, seq_len)",
    )?;
    if let Some(z) = &out.z_loss {
        z.check()?;
    }
    let mut p = aux_params(base_params(op, &plan, &x)?, cfg, seq_len.is_some());
    p.count_topk = i32::from(counts.is_none());
    p.total_override = total_override.map_or(0.0, |t| t as f64);
    if let Some(c) = z_loss_coeff {
        p = z_params(p, c);
    }
    let AuxLossCudaBuffers {
        loss,
        counts: counts_out,
        scores_sum,
        total_tokens: total_out,
        workspace,
        z_loss,
    } = &mut out;
    let fw = Forward {
        counts_in: counts,
        total_in,
        aux: Some((loss, counts_out, scores_sum, total_out)),
        z: z_loss.as_mut(),
    };
    run_forward(backend, &p, &plan, &x, fw, workspace)
}

/// Switch/GShard aux loss (see [`crate::ops::aux_loss()`]) of `x.logits [num_tokens,
/// num_experts]` (with `x.padding_mask`) on the GPU, optionally with the caller's
/// `counts [num_experts]` and the `total_tokens` they cover (a host or a device
/// value, see [`CudaTotalTokens`]), and optionally the z-loss fused into the same
/// pass over the logits (`z_loss_coeff` with `out.z_loss`). Launches on
/// `backend.stream()` without synchronising.
///
/// # Errors
/// What [`crate::ops::aux_loss()`] rejects (config, shapes, `total_tokens` without
/// `counts`, a host `total_tokens` of 0),
/// plus [`Error::Shape`] for an output or workspace of the wrong length,
/// [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`]. Negative caller counts are not detected (module docs).
pub fn aux_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    counts: Option<&CudaView<'_, i64>>,
    total_tokens: CudaTotalTokens<'_, '_>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    let mode = AuxMode::Global(total_tokens);
    aux_forward(backend, x, mode, counts, cfg, z_loss_coeff, out)
}

/// Sequence-level aux loss (see [`crate::ops::seq_aux_loss`]) of `x.logits [batch *
/// seq_len, num_experts]` on the GPU, optionally with the caller's `counts [batch,
/// num_experts]`, optionally with the z-loss fused. `out.total_tokens` receives the
/// valid tokens of each sequence.
///
/// # Errors
/// As [`aux_loss_cuda`], plus `seq_len` not dividing `num_tokens`.
pub fn seq_aux_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    seq_len: usize,
    counts: Option<&CudaView<'_, i64>>,
    cfg: &AuxLossConfig,
    z_loss_coeff: Option<f32>,
    out: AuxLossCudaBuffers<'_>,
) -> Result<()> {
    let mode = AuxMode::Seq(seq_len);
    aux_forward(backend, x, mode, counts, cfg, z_loss_coeff, out)
}

/// Router z-loss (see [`crate::ops::z_loss()`]) of `x.logits [num_tokens, num_experts]`
/// (with `x.padding_mask`) on the GPU into `out.loss [1]` and `out.valid_tokens [1]`,
/// with an f64 scratch `workspace [losses_workspace_len(num_tokens, num_experts,
/// None)]`.
///
/// # Errors
/// What [`crate::ops::z_loss()`] rejects, plus output / workspace lengths,
/// [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`].
pub fn z_loss_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    coeff: f32,
    workspace: &mut CudaViewMut<'_, f64>,
    mut out: ZLossCudaBuffers<'_>,
) -> Result<()> {
    validate_z_loss(x.lens(), coeff)?;
    let plan = Plan::new(x.num_tokens, None);
    out.check()?;
    check_len(
        Z_OP,
        "workspace",
        workspace.len(),
        plan.workspace_len(x.num_experts),
        "losses_workspace_len(num_tokens, num_experts, None)",
    )?;
    let p = z_params(base_params(Z_OP, &plan, &x)?, coeff);
    let fw = Forward {
        counts_in: None,
        total_in: None,
        aux: None,
        z: Some(&mut out),
    };
    run_forward(backend, &p, &plan, &x, fw, workspace)
}

/// Output (and scratch) of the aux-loss backward.
#[derive(Debug)]
pub struct AuxLossBackwardCudaBuffers<'a, T> {
    /// `[aux_loss_backward_workspace_len(..)]` f32 scratch.
    pub workspace: CudaViewMut<'a, f32>,
    /// `[num_tokens, num_experts]`: every element written; padding tokens 0.
    pub grad_logits: CudaViewMut<'a, T>,
}

fn aux_backward<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    seq_len: Option<usize>,
    inputs: AuxLossBackwardCudaInputs<'_>,
    cfg: &AuxLossConfig,
    mut out: AuxLossBackwardCudaBuffers<'_, T>,
) -> Result<()> {
    let op = aux_op(seq_len);
    let grad_len = out.grad_logits.len();
    validate_aux_loss_backward(x.lens(), seq_len, inputs.counts.len(), cfg, grad_len)?;
    let (num_tokens, num_experts) = (x.num_tokens, x.num_experts);
    let plan = Plan::new(num_tokens, seq_len);
    let segs = plan.segments;
    check_len(
        op,
        "total_tokens",
        inputs.total_tokens.len(),
        segs,
        format_args!("[segments] = [{segs}]"),
    )?;
    check_len(op, "grad_loss", inputs.grad_loss.len(), 1, "[1]")?;
    check_segment_rows(
        op,
        "workspace",
        out.workspace.len(),
        seq_len,
        num_tokens,
        num_experts,
    )?;
    let p = aux_params(base_params(op, &plan, &x)?, cfg, seq_len.is_some());
    if num_tokens == 0 || segs == 0 {
        return Ok(());
    }
    let stream = backend.stream();
    let f = backend.function(MODULE, "aux_loss_bwd_prep")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p)
        .arg(&inputs.counts)
        .arg(&inputs.total_tokens)
        .arg(&inputs.grad_loss)
        .arg(&mut out.workspace);
    // SAFETY: matches `aux_loss_bwd_prep(LossParams, const long long* counts, const
    // long long* total_tokens, const float* grad_loss, float* g)`; counts and g hold
    // [segments, E], total_tokens [segments], grad_loss 1 element (checked above).
    unsafe { b.launch(one_block(256, segs)) }?;
    let (root, lc) = kernel_shape("aux_loss_bwd", num_experts, num_tokens);
    let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
    let null: u64 = 0;
    let mut b = stream.launch_builder(&f);
    b.arg(&x.logits);
    match &x.padding_mask {
        Some(m) => b.arg(m),
        None => b.arg(&null),
    };
    b.arg(&mut out.workspace).arg(&p).arg(&mut out.grad_logits);
    // SAFETY: matches `aux_loss_bwd*_{dtype}(const T* logits, const unsigned char*
    // mask, const float* g, LossParams, T* grad)`; logits and grad hold
    // num_tokens * E elements, the mask num_tokens (or null, unread), g [segments, E];
    // token t reads row t / seq_len < segments.
    unsafe { b.launch(lc) }?;
    Ok(())
}

/// Backward of the Switch/GShard aux loss on the GPU: `out.grad_logits [num_tokens,
/// num_experts]` (every element written; padding tokens 0) for the gradient
/// `inputs.grad_loss [1]` of the loss, given the forward's `inputs.counts
/// [num_experts]` and `inputs.total_tokens [1]` (device buffers, read by the
/// kernels), with an f32 scratch `out.workspace [aux_loss_backward_workspace_len(..)]`.
///
/// # Errors
/// As [`crate::ops::aux_loss_backward_into`] for config and shapes, plus buffer
/// lengths, [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`]. A `total_tokens` of 0 gives a zero gradient (module docs).
pub fn aux_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    inputs: AuxLossBackwardCudaInputs<'_>,
    cfg: &AuxLossConfig,
    out: AuxLossBackwardCudaBuffers<'_, T>,
) -> Result<()> {
    aux_backward(backend, x, None, inputs, cfg, out)
}

/// Backward of the sequence-level aux loss on the GPU, given the forward's `counts
/// [batch, num_experts]` and per-sequence valid tokens `[batch]` (its
/// `total_tokens` output) in `inputs`.
///
/// # Errors
/// As [`aux_loss_backward_cuda`], plus `seq_len` not dividing `num_tokens`.
pub fn seq_aux_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    seq_len: usize,
    inputs: AuxLossBackwardCudaInputs<'_>,
    cfg: &AuxLossConfig,
    out: AuxLossBackwardCudaBuffers<'_, T>,
) -> Result<()> {
    aux_backward(backend, x, Some(seq_len), inputs, cfg, out)
}

/// Backward of the z-loss on the GPU: `grad_logits [num_tokens, num_experts]`
/// (every element written; padding tokens 0) for `grad_loss [1]`, given the
/// forward's `valid_tokens [1]` (device buffers).
///
/// # Errors
/// As [`crate::ops::z_loss_backward_into`] for config and shapes, plus buffer
/// lengths, [`Error::Unsupported`] for `num_experts > 2048`, [`Error::Compile`] /
/// [`Error::Driver`].
pub fn z_loss_backward_cuda<T: RouterFloat + DeviceRepr>(
    backend: &CudaBackend,
    x: RouterLogitsCuda<'_, T>,
    valid_tokens: &CudaView<'_, i64>,
    coeff: f32,
    grad_loss: &CudaView<'_, f32>,
    grad_logits: &mut CudaViewMut<'_, T>,
) -> Result<()> {
    validate_z_loss_backward(x.lens(), coeff, grad_logits.len())?;
    check_len(Z_OP, "valid_tokens", valid_tokens.len(), 1, "[1]")?;
    check_len(Z_OP, "grad_loss", grad_loss.len(), 1, "[1]")?;
    let plan = Plan::new(x.num_tokens, None);
    let p = z_params(base_params(Z_OP, &plan, &x)?, coeff);
    if x.num_tokens == 0 {
        return Ok(());
    }
    let (root, lc) = kernel_shape("z_loss_bwd", x.num_experts, x.num_tokens);
    let f = backend.function(MODULE, &crate::kernel_name::<T>(&root))?;
    let null: u64 = 0;
    let mut b = backend.stream().launch_builder(&f);
    b.arg(&x.logits);
    match &x.padding_mask {
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

/// Which loss kernels [`losses_raw`] launches, with the options only that pass
/// takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossesPass {
    /// [`aux_loss_cuda`] (`seq_len = None`) or [`seq_aux_loss_cuda`], with the z-loss
    /// fused when `z_loss_coeff` is given.
    AuxForward {
        /// The aux loss's config.
        cfg: AuxLossConfig,
        /// `Some`: the sequence-level loss of sequences of `seq_len` tokens.
        seq_len: Option<usize>,
        /// The global loss's caller `T_total` as a host value (with caller counts;
        /// `ptrs.total_tokens_in` as a device value; at most one of the two).
        total_tokens: Option<usize>,
        /// The z-loss coefficient, to fuse the z-loss (`ptrs.z_loss`,
        /// `ptrs.valid_tokens`).
        z_loss_coeff: Option<f32>,
    },
    /// [`aux_loss_backward_cuda`] (`seq_len = None`) or [`seq_aux_loss_backward_cuda`].
    AuxBackward {
        /// The aux loss's config.
        cfg: AuxLossConfig,
        /// `Some`: the sequence-level loss.
        seq_len: Option<usize>,
    },
    /// [`z_loss_cuda`].
    ZForward {
        /// The z-loss coefficient.
        coeff: f32,
    },
    /// [`z_loss_backward_cuda`].
    ZBackward {
        /// The z-loss coefficient.
        coeff: f32,
    },
}

/// Device buffers of a [`losses_raw`] call ([`DevBuf::NONE`] where the pass does
/// not use one, `None` for an absent optional input); shapes and types as in the
/// safe functions' arguments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LossesRawPtrs {
    /// `logits [num_tokens, num_experts]`, element type `dtype`.
    pub logits: DevBuf,
    /// Aux forward outputs (see [`AuxLossCudaBuffers`]): `[1]` f32.
    pub loss: DevBuf,
    /// `[segments, num_experts]` i64 (aux forward output).
    pub out_counts: DevBuf,
    /// `[segments, num_experts]` f32 (aux forward output).
    pub scores_sum: DevBuf,
    /// `[segments]` i64: aux forward output, aux backward input.
    pub total_tokens: DevBuf,
    /// f64 forward workspace ([`losses_workspace_len`]) or f32 aux backward workspace
    /// ([`aux_loss_backward_workspace_len`]).
    pub workspace: DevBuf,
    /// `[1]` f32: the z-loss (z forward, or fused into the aux forward).
    pub z_loss: DevBuf,
    /// `[1]` i64: valid tokens (z forward output, z backward input).
    pub valid_tokens: DevBuf,
    /// `[1]` f32 (backward input).
    pub grad_loss: DevBuf,
    /// `[num_tokens, num_experts]`, element type `dtype` (backward output).
    pub grad_logits: DevBuf,
    /// `padding_mask [num_tokens]` bytes, if given.
    pub padding_mask: Option<DevBuf>,
    /// Aux forward: caller counts `[segments, num_experts]` i64, if given; aux
    /// backward: the forward's counts (required).
    pub counts: Option<DevBuf>,
    /// Global aux forward: the caller's `T_total` `[1]` i64, read on the device
    /// ([`CudaTotalTokens::Device`]), if given (else the pass's `total_tokens`, or
    /// the valid tokens).
    pub total_tokens_in: Option<DevBuf>,
}

/// Refuse the buffers `pass` does not use unless they are empty.
fn check_raw_unused(pass: &LossesPass, p: &LossesRawPtrs) -> Result<()> {
    const RAW: &str = "losses_raw";
    let opt = |b: Option<DevBuf>| b.unwrap_or_default();
    let unused: &[(&'static str, DevBuf)] = match pass {
        LossesPass::AuxForward { z_loss_coeff, .. } => {
            if z_loss_coeff.is_none() {
                check_unused(RAW, "z_loss", p.z_loss)?;
                check_unused(RAW, "valid_tokens", p.valid_tokens)?;
            }
            &[("grad_loss", p.grad_loss), ("grad_logits", p.grad_logits)]
        }
        LossesPass::AuxBackward { .. } => &[
            ("total_tokens_in", opt(p.total_tokens_in)),
            ("loss", p.loss),
            ("out_counts", p.out_counts),
            ("scores_sum", p.scores_sum),
            ("z_loss", p.z_loss),
            ("valid_tokens", p.valid_tokens),
        ],
        LossesPass::ZForward { .. } => &[
            ("counts", opt(p.counts)),
            ("total_tokens_in", opt(p.total_tokens_in)),
            ("loss", p.loss),
            ("out_counts", p.out_counts),
            ("scores_sum", p.scores_sum),
            ("total_tokens", p.total_tokens),
            ("grad_loss", p.grad_loss),
            ("grad_logits", p.grad_logits),
        ],
        LossesPass::ZBackward { .. } => &[
            ("counts", opt(p.counts)),
            ("total_tokens_in", opt(p.total_tokens_in)),
            ("loss", p.loss),
            ("out_counts", p.out_counts),
            ("scores_sum", p.scores_sum),
            ("total_tokens", p.total_tokens),
            ("workspace", p.workspace),
            ("z_loss", p.z_loss),
        ],
    };
    for &(name, buf) in unused {
        check_unused(RAW, name, buf)?;
    }
    Ok(())
}

/// Launch a loss pass on raw device buffers and a caller-owned stream (PyTorch's
/// current stream), without synchronising: the checks (the op's validator, on the
/// buffers' lengths) and kernels of the safe functions named in [`LossesPass`];
/// nothing is launched unless every length is right, and the buffers the pass does
/// not use must be empty.
///
/// # Safety
/// 1. `stream` is a live CUDA stream of `backend`'s context, kept alive until the
///    kernels have finished.
/// 2. Every buffer the pass uses holds `len` elements of its documented type
///    ([`LossesRawPtrs`]; `dtype` for the logits and their gradient) at `ptr` in
///    that context, and stays valid until the kernels have finished on `stream`.
/// 3. Output buffers (and workspaces) do not overlap any other buffer of the call.
///
/// # Errors
/// As the safe functions; [`Error::InvalidArgument`] for a non-empty buffer the pass
/// does not use, or a caller `T_total` given both as a host and a device value.
pub unsafe fn losses_raw(
    backend: &CudaBackend,
    stream: cudarc::driver::sys::CUstream,
    pass: LossesPass,
    dtype: crate::DType,
    num_tokens: usize,
    num_experts: usize,
    ptrs: LossesRawPtrs,
) -> Result<()> {
    use crate::DType;
    const RAW: &str = "losses_raw";
    check_raw_unused(&pass, &ptrs)?;
    // SAFETY: (1).
    let be = unsafe { backend.on_borrowed_stream(stream) };
    let s = be.stream();
    // SAFETY: (2) and (3) for the optional inputs every pass may read.
    let (mask, counts) = unsafe {
        (
            BorrowedSlice::<bool>::optional(s, ptrs.padding_mask, RAW, "padding_mask")?,
            BorrowedSlice::<i64>::optional(s, ptrs.counts, RAW, "counts")?,
        )
    };
    macro_rules! run {
        ($t:ty) => {{
            // SAFETY: (2) and (3) for the logits.
            let z = unsafe { borrow!($t, s, ptrs.logits, RAW) }?;
            let x = RouterLogitsCuda::new(z.view(), num_tokens, num_experts)
                .padding_mask(mask.as_ref().map(|m| m.view()));
            match pass {
                LossesPass::AuxForward {
                    cfg,
                    seq_len,
                    total_tokens,
                    z_loss_coeff,
                } => {
                    // SAFETY: (2) and (3) for the aux forward's buffers (the z-loss's
                    // are empty unless it is fused).
                    let (total_in, mut loss, mut oc, mut ss, mut tt, mut ws, mut zl, mut vt) = unsafe {
                        (
                            BorrowedSlice::<i64>::optional(s, ptrs.total_tokens_in, RAW, "total_tokens_in")?,
                            borrow!(f32, s, ptrs.loss, RAW)?,
                            borrow!(i64, s, ptrs.out_counts, RAW)?,
                            borrow!(f32, s, ptrs.scores_sum, RAW)?,
                            borrow!(i64, s, ptrs.total_tokens, RAW)?,
                            borrow!(f64, s, ptrs.workspace, RAW)?,
                            borrow!(f32, s, ptrs.z_loss, RAW)?,
                            borrow!(i64, s, ptrs.valid_tokens, RAW)?,
                        )
                    };
                    let total_in_v = total_in.as_ref().map(|b| b.view());
                    let total = match (&total_in_v, total_tokens) {
                        (Some(_), Some(_)) => {
                            return Err(Error::invalid(
                                aux_op(seq_len),
                                "total_tokens",
                                "a host and a device value",
                                "pass the caller's T_total once: as a host value or a device one",
                            ))
                        }
                        (Some(v), None) => CudaTotalTokens::Device(v),
                        (None, Some(t)) => CudaTotalTokens::Host(t),
                        (None, None) => CudaTotalTokens::Valid,
                    };
                    let mode = match seq_len {
                        None => AuxMode::Global(total),
                        Some(_) if !matches!(total, CudaTotalTokens::Valid) => {
                            return Err(Error::invalid(
                                aux_op(seq_len),
                                "total_tokens",
                                "given",
                                "the sequence-level loss uses each sequence's valid tokens as its T_total",
                            ))
                        }
                        Some(sl) => AuxMode::Seq(sl),
                    };
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
                    let counts_v = counts.as_ref().map(|b| b.view());
                    aux_forward::<$t>(&be, x, mode, counts_v.as_ref(), &cfg, z_loss_coeff, out)
                }
                LossesPass::AuxBackward { cfg, seq_len } => {
                    // SAFETY: (2) and (3) for the aux backward's buffers.
                    let (tt, gl, mut ws, mut g) = unsafe {
                        (
                            borrow!(i64, s, ptrs.total_tokens, RAW)?,
                            borrow!(f32, s, ptrs.grad_loss, RAW)?,
                            borrow!(f32, s, ptrs.workspace, RAW)?,
                            borrow!($t, s, ptrs.grad_logits, RAW)?,
                        )
                    };
                    let inputs = AuxLossBackwardCudaInputs {
                        // Required here: absent counts are an empty buffer, which the
                        // validator refuses.
                        counts: match &counts {
                            Some(c) => c.view(),
                            None => tt.view().slice(0..0),
                        },
                        total_tokens: tt.view(),
                        grad_loss: gl.view(),
                    };
                    let out = AuxLossBackwardCudaBuffers {
                        workspace: ws.view_mut(),
                        grad_logits: g.view_mut(),
                    };
                    aux_backward::<$t>(&be, x, seq_len, inputs, &cfg, out)
                }
                LossesPass::ZForward { coeff } => {
                    // SAFETY: (2) and (3) for the z forward's buffers.
                    let (mut ws, mut zl, mut vt) = unsafe {
                        (
                            borrow!(f64, s, ptrs.workspace, RAW)?,
                            borrow!(f32, s, ptrs.z_loss, RAW)?,
                            borrow!(i64, s, ptrs.valid_tokens, RAW)?,
                        )
                    };
                    let out = ZLossCudaBuffers {
                        loss: zl.view_mut(),
                        valid_tokens: vt.view_mut(),
                    };
                    z_loss_cuda::<$t>(&be, x, coeff, &mut ws.view_mut(), out)
                }
                LossesPass::ZBackward { coeff } => {
                    // SAFETY: (2) and (3) for the z backward's buffers.
                    let (vt, gl, mut g) = unsafe {
                        (
                            borrow!(i64, s, ptrs.valid_tokens, RAW)?,
                            borrow!(f32, s, ptrs.grad_loss, RAW)?,
                            borrow!($t, s, ptrs.grad_logits, RAW)?,
                        )
                    };
                    let (vt, gl) = (vt.view(), gl.view());
                    z_loss_backward_cuda::<$t>(&be, x, &vt, coeff, &gl, &mut g.view_mut())
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
