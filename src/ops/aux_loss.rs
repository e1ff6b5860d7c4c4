//! Auxiliary load-balance loss: Switch / GShard (global, optionally with counts from
//! a larger batch) and sequence-level (DeepSeek-V2/V3), forward and gradient.
//!
//! # Definition
//! Aux scores `P [T, E]` (f32 per token): `softmax(z)` for softmax routers,
//! `σ(z) / (Σ_e σ(z_e) + 1e-20)` for sigmoid routers. Counts `c_e` = number of
//! assignments to expert `e` in the plain top-k of `P` over valid tokens (no bias, no
//! groups; ranked with [`crate::select::rank_key`]: lower expert index first on ties,
//! NaN lowest), unless the caller passes counts (global batch: summed over
//! micro-batches / data-parallel ranks).
//!
//! Switch / GShard (Megatron `switch_load_balancing_loss_func`):
//! `L = coeff · E / (k · T_total²) · Σ_e c_e · Σ_t P[t, e]`, where the inner sum runs
//! over valid tokens and `T_total` is the number of valid tokens unless the caller
//! says how many tokens its counts cover. The gradient flows through `P` only.
//!
//! HF Mixtral's `load_balancing_loss_func` (`E · Σ_{j,e} mean_t(onehot_j[t, e]) ·
//! mean_t P[t, e]`, with the attention mask as our padding mask inverted) is exactly
//! this loss with `coeff = k`: `E · Σ_e (c_e / T) · (Σ_t P[t, e] / T)`
//! `= k · E / (k · T²) · Σ_e c_e Σ_t P[t, e]`. HF then multiplies by
//! `router_aux_loss_coef` outside the function.
//!
//! Sequence-level (DeepSeek-V2/V3 `seq_aux_loss`): logits are `[B · S, E]`, batch-major
//! (`S = seq_len` consecutive tokens per sequence). The same loss is computed for every
//! sequence from that sequence's own counts and scores, with that sequence's valid
//! token count as `T_total`, then averaged over the sequences that have at least one
//! valid token (0 if none has).
//!
//! Padding masks (`true` = padding) remove tokens from counts, scores and `T`;
//! padding tokens get zero gradient. `T = 0` is valid: the loss is 0.
//!
//! Sums over tokens use f64 accumulators in a fixed chunk order, so results are
//! bitwise independent of the number of threads.

use crate::cpu;
use crate::cpu::aux_loss::AuxProblem;
use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use crate::ops::{
    as_rows, check_finite, check_len, check_logits, logits_grad, LogitsLens, RouterLogits,
};
use ndarray::{Array2, ArrayView2};

pub use crate::ops::topk_gating::ScoreFunction;

const OP: &str = "aux_loss";
const SEQ_OP: &str = "seq_aux_loss";

/// Configuration of the auxiliary load-balance loss.
///
/// ```
/// use moe_router::{AuxLossConfig, ScoreFunction};
/// let cfg = AuxLossConfig::new(2).score_function(ScoreFunction::Sigmoid).coeff(1e-2);
/// assert_eq!(cfg.topk, 2);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AuxLossConfig {
    /// `k`: assignments per token used for the counts and in `E / (k · T²)`; in `1..=E`.
    pub topk: usize,
    /// How logits become aux scores (softmax, or sigmoid normalised over experts).
    pub score_function: ScoreFunction,
    /// Loss coefficient (`α`, `moe_aux_loss_coeff`); must be finite.
    pub coeff: f32,
}

impl AuxLossConfig {
    /// `topk = k`, softmax scores, `coeff = 1`.
    pub fn new(topk: usize) -> Self {
        AuxLossConfig {
            topk,
            score_function: ScoreFunction::Softmax,
            coeff: 1.0,
        }
    }

    /// Set the score function.
    pub fn score_function(mut self, score_function: ScoreFunction) -> Self {
        self.score_function = score_function;
        self
    }

    /// Set the loss coefficient.
    pub fn coeff(mut self, coeff: f32) -> Self {
        self.coeff = coeff;
        self
    }

    /// Check the config against `num_experts`: `num_experts >= 1`, `topk` in
    /// `1..=num_experts`, `coeff` finite. `op` names the calling op in errors.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `num_experts`, `topk` or `coeff`.
    pub fn validate(&self, op: &'static str, num_experts: usize) -> Result<()> {
        if num_experts == 0 {
            return Err(Error::invalid(
                op,
                "num_experts",
                0,
                "there must be at least 1 expert",
            ));
        }
        if self.topk == 0 || self.topk > num_experts {
            return Err(Error::invalid(
                op,
                "topk",
                self.topk,
                format!("topk must be in 1..={num_experts} (num_experts)"),
            ));
        }
        check_finite(
            op,
            "coeff",
            self.coeff as f64,
            "the loss coefficient must be finite",
        )
    }
}

/// Result of [`aux_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct AuxLossOutput {
    /// The loss `L`.
    pub loss: f32,
    /// `[num_experts]`: the counts `c_e` used (computed, or the caller's). `i64`
    /// because counts summed over many ranks can exceed `i32`.
    pub counts: Vec<i64>,
    /// `[num_experts]`: `Σ_t P[t, e]` over valid tokens (summed in f64).
    pub scores_sum: Vec<f32>,
    /// `T_total` used: the caller's `total_tokens`, or the number of valid tokens.
    /// Pass it (with `counts`) to [`aux_loss_backward_into`].
    pub total_tokens: usize,
}

/// Result of [`seq_aux_loss`].
#[derive(Debug, Clone, PartialEq)]
pub struct SeqAuxLossOutput {
    /// The loss, averaged over sequences with at least one valid token.
    pub loss: f32,
    /// `[batch, num_experts]`: per-sequence counts used (computed, or the caller's).
    pub counts: Vec<i64>,
    /// `[batch, num_experts]`: per-sequence `Σ_t P[t, e]` over valid tokens.
    pub scores_sum: Vec<f32>,
    /// `[batch]`: valid tokens of each sequence (its `T_total`).
    pub valid_tokens: Vec<usize>,
}

/// The host-side check of caller counts: `>= 0`.
fn check_count_values(op: &'static str, counts: &[i64]) -> Result<()> {
    if let Some((i, &c)) = counts.iter().enumerate().find(|(_, &c)| c < 0) {
        return Err(Error::invalid(
            op,
            "counts",
            format_args!("{c} at index {i}"),
            "counts must be >= 0",
        ));
    }
    Ok(())
}

/// `arg` holds one row of `num_experts` per segment: `[num_experts]` for the global
/// loss (`seq_len = None`), `[batch, num_experts]` with `batch = num_tokens / seq_len`
/// for the sequence-level loss (`seq_len` checked by [`check_seq_len`]). For the
/// counts, the scores' sums and the backward's per-segment gradient.
pub(crate) fn check_segment_rows(
    op: &'static str,
    arg: &'static str,
    got: usize,
    seq_len: Option<usize>,
    num_tokens: usize,
    num_experts: usize,
) -> Result<()> {
    match seq_len {
        None => check_len(
            op,
            arg,
            got,
            num_experts,
            format_args!("[num_experts] = [{num_experts}]"),
        ),
        Some(s) => {
            let batch = num_tokens / s.max(1);
            check_len(
                op,
                arg,
                got,
                batch * num_experts,
                format_args!("[batch, num_experts] = [{batch}, {num_experts}]"),
            )
        }
    }
}

/// The op name of the global (`seq_len = None`) or the sequence-level loss.
pub(crate) fn aux_op(seq_len: Option<usize>) -> &'static str {
    if seq_len.is_some() {
        SEQ_OP
    } else {
        OP
    }
}

/// The single validation of the aux-loss forward (every backend; global with
/// `seq_len = None`, else sequence-level): the config, `seq_len`, the logits and
/// mask lengths, and the length of the caller's `counts` if given. The counts'
/// values (`>= 0`) are checked where the host can read them ([`aux_loss`]).
pub(crate) fn validate_aux_loss(
    x: LogitsLens,
    seq_len: Option<usize>,
    counts: Option<usize>,
    cfg: &AuxLossConfig,
) -> Result<()> {
    let op = aux_op(seq_len);
    cfg.validate(op, x.num_experts)?;
    if let Some(s) = seq_len {
        check_seq_len(op, s, x.num_tokens)?;
    }
    x.check(op)?;
    if let Some(len) = counts {
        check_segment_rows(op, "counts", len, seq_len, x.num_tokens, x.num_experts)?;
    }
    Ok(())
}

/// The single validation of the aux-loss backward (every backend): as
/// [`validate_aux_loss`] with the forward's `counts`, and
/// `grad_logits [num_tokens, num_experts]`.
pub(crate) fn validate_aux_loss_backward(
    x: LogitsLens,
    seq_len: Option<usize>,
    counts: usize,
    cfg: &AuxLossConfig,
    grad_logits: usize,
) -> Result<()> {
    validate_aux_loss(x, seq_len, Some(counts), cfg)?;
    let op = aux_op(seq_len);
    check_logits(op, "grad_logits", grad_logits, x.num_tokens, x.num_experts)
}

/// Why `total_tokens` without `counts` is an error (also for a device value on CUDA).
pub(crate) const TOTAL_NEEDS_COUNTS: &str = "total_tokens requires `counts`: it is the number \
     of tokens the caller's counts cover; without counts, T_total is the number of valid \
     tokens of these logits (pass neither, or both)";

/// The caller's `total_tokens` (`T_total`, the tokens the caller's counts cover)
/// needs those counts, and is `>= 1`. Without counts the loss uses the counts and the
/// valid tokens of these logits, so a `T_total` of another batch would scale it by
/// `(valid / T_total)²`: an error, not a silently wrong loss.
pub(crate) fn check_total(
    op: &'static str,
    counts_given: bool,
    total_tokens: Option<usize>,
) -> Result<()> {
    match total_tokens {
        Some(t) if !counts_given => Err(Error::invalid(op, "total_tokens", t, TOTAL_NEEDS_COUNTS)),
        Some(0) => Err(Error::invalid(
            op,
            "total_tokens",
            0,
            "total_tokens must be >= 1 (the number of tokens the counts cover)",
        )),
        _ => Ok(()),
    }
}

pub(crate) fn check_seq_len(op: &'static str, seq_len: usize, num_tokens: usize) -> Result<()> {
    if seq_len == 0 {
        return Err(Error::invalid(op, "seq_len", 0, "seq_len must be >= 1"));
    }
    if num_tokens % seq_len != 0 {
        return Err(Error::invalid(
            op,
            "seq_len",
            seq_len,
            format!("seq_len must divide num_tokens = {num_tokens} (logits are [batch * seq_len, num_experts])"),
        ));
    }
    Ok(())
}

/// Switch / GShard auxiliary load-balance loss of router logits
/// `[num_tokens, num_experts]` (see the [module docs](self) for the formula).
///
/// - `padding_mask [num_tokens]`: `true` = padding, excluded from counts, scores and `T`.
/// - `counts [num_experts]`: the caller's counts (global batch); computed from the
///   plain top-k of `P` over valid tokens when `None`.
/// - `total_tokens`: `T_total`, the number of tokens the caller's `counts` cover (only
///   with `counts`); the number of valid tokens when `None`. With zero valid tokens and
///   no `total_tokens` the loss is 0.
///
/// # Errors
/// [`Error::InvalidArgument`] for `num_experts == 0`, `topk` outside `1..=E`,
/// non-finite `coeff`, a negative count, `total_tokens` without `counts`,
/// `total_tokens == Some(0)`;
/// [`Error::Shape`] for `logits`, `padding_mask` or `counts` of the wrong length.
///
/// # Example
/// ```
/// use moe_router::{aux_loss, AuxLossConfig};
/// // two tokens, two experts, k = 1: P = [0.5, 0.5] and [0.75, 0.25];
/// // both tokens pick expert 0 (the first one by the tie rule), so c = [2, 0]
/// let z = [0.0f32, 0.0, 3f32.ln(), 0.0];
/// let out = aux_loss(&z, 2, 2, None, None, None, &AuxLossConfig::new(1)).unwrap();
/// assert_eq!(out.counts, vec![2, 0]);
/// // L = E / (k T²) · c_0 · (0.5 + 0.75) = 2 / 4 · 2 · 1.25
/// assert!((out.loss - 1.25).abs() < 1e-6);
/// ```
pub fn aux_loss<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    padding_mask: Option<&[bool]>,
    counts: Option<&[i64]>,
    total_tokens: Option<usize>,
    cfg: &AuxLossConfig,
) -> Result<AuxLossOutput> {
    let x = RouterLogits::new(logits, num_tokens, num_experts).padding_mask(padding_mask);
    validate_aux_loss(x.lens(), None, counts.map(<[i64]>::len), cfg)?;
    if let Some(c) = counts {
        check_count_values(OP, c)?;
    }
    check_total(OP, counts.is_some(), total_tokens)?;
    let problem = AuxProblem::new(x, num_tokens, cfg.score_function);
    let stats = cpu::aux_loss::aux_stats(&problem, counts.is_none().then_some(cfg.topk));
    let mut scores_sum = stats.scores_sum;
    scores_sum.resize(num_experts, 0.0); // T = 0: no segment
    let counts = match counts {
        Some(c) => c.to_vec(),
        None => {
            let mut c = stats.counts;
            c.resize(num_experts, 0);
            c
        }
    };
    let total = total_tokens.unwrap_or_else(|| stats.valid_tokens.first().copied().unwrap_or(0));
    let loss = cpu::aux_loss::switch_loss(&scores_sum, &counts, cfg.topk, total, cfg.coeff);
    Ok(AuxLossOutput {
        loss: loss as f32,
        counts,
        scores_sum: scores_sum.iter().map(|&s| s as f32).collect(),
        total_tokens: total,
    })
}

/// Gradient of [`aux_loss`] w.r.t. the logits `x.logits [num_tokens, num_experts]`
/// (with `x.padding_mask`), written into `grad_logits [num_tokens, num_experts]`
/// (overwritten): `grad_loss · ∂L/∂z` with the counts held fixed (the gradient flows
/// through `P` only). Padding tokens get 0.
///
/// Pass the `counts` and `total_tokens` the forward used ([`AuxLossOutput::counts`],
/// [`AuxLossOutput::total_tokens`]); `total_tokens` may be 0 only when no token is
/// valid (the gradient is then 0).
///
/// # Errors
/// As [`aux_loss`], plus [`Error::Shape`] for `grad_logits` of the wrong length and
/// [`Error::InvalidArgument`] for `total_tokens == 0` with valid tokens present.
///
/// ```
/// use moe_router::{aux_loss, aux_loss_backward_into, AuxLossConfig, RouterLogits};
///
/// let z = [0.0f32, 0.0, 3f32.ln(), 0.0];
/// let cfg = AuxLossConfig::new(1);
/// let out = aux_loss(&z, 2, 2, None, None, None, &cfg).unwrap();
/// let mut g = [0.0f32; 4];
/// let x = RouterLogits::new(&z, 2, 2);
/// aux_loss_backward_into(x, &out.counts, out.total_tokens, &cfg, 1.0, &mut g).unwrap();
/// assert!(g.iter().all(|v| v.is_finite()));
/// ```
pub fn aux_loss_backward_into<T: RouterFloat>(
    x: RouterLogits<'_, T>,
    counts: &[i64],
    total_tokens: usize,
    cfg: &AuxLossConfig,
    grad_loss: f32,
    grad_logits: &mut [T],
) -> Result<()> {
    validate_aux_loss_backward(x.lens(), None, counts.len(), cfg, grad_logits.len())?;
    check_count_values(OP, counts)?;
    let (num_tokens, num_experts) = (x.num_tokens, x.num_experts);
    if total_tokens == 0 {
        let any_valid = match x.padding_mask {
            None => num_tokens > 0,
            Some(m) => m.iter().any(|&pad| !pad),
        };
        if any_valid {
            return Err(Error::invalid(
                OP,
                "total_tokens",
                0,
                "total_tokens must be >= 1 when some token is valid (pass AuxLossOutput::total_tokens)",
            ));
        }
    }
    let problem = AuxProblem::new(x, num_tokens, cfg.score_function);
    let scale = cpu::aux_loss::switch_scale(num_experts, cfg.topk, total_tokens, cfg.coeff)
        * grad_loss as f64;
    let mut g = vec![0.0f32; num_experts];
    cpu::aux_loss::switch_grad_p(counts, scale, &mut g);
    cpu::aux_loss::aux_grad_into(&problem, &g, grad_logits);
    Ok(())
}

/// Allocating form of [`aux_loss_backward_into`] over an [`ndarray`] view of the
/// logits `[num_tokens, num_experts]`; returns `grad_logits` of the same shape.
///
/// # Errors
/// As [`aux_loss_backward_into`], plus [`Error::Layout`] for a non-contiguous `logits`.
pub fn aux_loss_backward<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    padding_mask: Option<&[bool]>,
    counts: &[i64],
    total_tokens: usize,
    cfg: &AuxLossConfig,
    grad_loss: f32,
) -> Result<Array2<T>> {
    let (t, e) = logits.dim();
    let z = as_rows(OP, "logits", &logits)?;
    let x = RouterLogits::new(z, t, e).padding_mask(padding_mask);
    validate_aux_loss(x.lens(), None, None, cfg)?;
    logits_grad(OP, (t, e), |out| {
        aux_loss_backward_into(x, counts, total_tokens, cfg, grad_loss, out)
    })
}

/// Per-sequence `∂L/∂P` rows `[batch, E]` of the sequence-level loss:
/// `coeff · E / (k · T_b²) · c_{b,e} · grad_loss / n`, `n` = sequences with valid tokens.
fn seq_grad_p(
    counts: &[i64],
    valid: &[usize],
    num_experts: usize,
    cfg: &AuxLossConfig,
    grad_loss: f32,
) -> Vec<f32> {
    let n_valid = valid.iter().filter(|&&v| v > 0).count();
    let mut g = vec![0.0f32; valid.len() * num_experts];
    if n_valid == 0 {
        return g;
    }
    for ((gb, cb), &v) in g
        .chunks_mut(num_experts)
        .zip(counts.chunks(num_experts))
        .zip(valid)
    {
        let scale = cpu::aux_loss::switch_scale(num_experts, cfg.topk, v, cfg.coeff)
            * grad_loss as f64
            / n_valid as f64;
        cpu::aux_loss::switch_grad_p(cb, scale, gb);
    }
    g
}

/// Sequence-level auxiliary load-balance loss (DeepSeek-V2/V3) of router logits
/// `[batch * seq_len, num_experts]`, batch-major (see the [module docs](self)): the
/// Switch loss of every sequence, with its own counts and its valid tokens as
/// `T_total`, averaged over the sequences that have at least one valid token (0 if
/// none has).
///
/// - `padding_mask [num_tokens]`: `true` = padding.
/// - `counts [batch, num_experts]`: caller counts per sequence; computed from the
///   plain top-k of `P` when `None`.
///
/// # Errors
/// As [`aux_loss`], plus [`Error::InvalidArgument`] for `seq_len == 0` or `seq_len`
/// not dividing `num_tokens`; `counts` must have `batch * num_experts` elements.
///
/// # Example
/// ```
/// use moe_router::{seq_aux_loss, AuxLossConfig};
/// // two sequences of one token each, uniform scores: each sequence's loss is coeff
/// let z = [0.0f32; 2 * 4];
/// let out = seq_aux_loss(&z, 2, 4, 1, None, None, &AuxLossConfig::new(2).coeff(0.1)).unwrap();
/// assert!((out.loss - 0.1).abs() < 1e-7);
/// assert_eq!(out.counts, vec![1, 1, 0, 0, 1, 1, 0, 0]);
/// ```
pub fn seq_aux_loss<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    seq_len: usize,
    padding_mask: Option<&[bool]>,
    counts: Option<&[i64]>,
    cfg: &AuxLossConfig,
) -> Result<SeqAuxLossOutput> {
    let x = RouterLogits::new(logits, num_tokens, num_experts).padding_mask(padding_mask);
    validate_aux_loss(x.lens(), Some(seq_len), counts.map(<[i64]>::len), cfg)?;
    if let Some(c) = counts {
        check_count_values(SEQ_OP, c)?;
    }
    let problem = AuxProblem::new(x, seq_len, cfg.score_function);
    let stats = cpu::aux_loss::aux_stats(&problem, counts.is_none().then_some(cfg.topk));
    let counts = counts.map_or(stats.counts, <[i64]>::to_vec);
    let mut total = 0.0f64;
    let mut n_valid = 0usize;
    for ((s, c), &v) in stats
        .scores_sum
        .chunks(num_experts)
        .zip(counts.chunks(num_experts))
        .zip(&stats.valid_tokens)
    {
        if v > 0 {
            total += cpu::aux_loss::switch_loss(s, c, cfg.topk, v, cfg.coeff);
            n_valid += 1;
        }
    }
    let loss = if n_valid > 0 {
        total / n_valid as f64
    } else {
        0.0
    };
    Ok(SeqAuxLossOutput {
        loss: loss as f32,
        counts,
        scores_sum: stats.scores_sum.iter().map(|&s| s as f32).collect(),
        valid_tokens: stats.valid_tokens,
    })
}

/// Gradient of [`seq_aux_loss`] w.r.t. the logits `x.logits [batch * seq_len,
/// num_experts]` (with `x.padding_mask`), written into `grad_logits [num_tokens,
/// num_experts]` (overwritten), counts held fixed. Pass the `counts [batch,
/// num_experts]` the forward used ([`SeqAuxLossOutput::counts`]). Padding tokens
/// get 0.
///
/// # Errors
/// As [`seq_aux_loss`], plus [`Error::Shape`] for `grad_logits` of the wrong length.
pub fn seq_aux_loss_backward_into<T: RouterFloat>(
    x: RouterLogits<'_, T>,
    seq_len: usize,
    counts: &[i64],
    cfg: &AuxLossConfig,
    grad_loss: f32,
    grad_logits: &mut [T],
) -> Result<()> {
    validate_aux_loss_backward(
        x.lens(),
        Some(seq_len),
        counts.len(),
        cfg,
        grad_logits.len(),
    )?;
    check_count_values(SEQ_OP, counts)?;
    let valid = cpu::aux_loss::valid_per_segment(x.padding_mask, x.num_tokens, seq_len);
    let g = seq_grad_p(counts, &valid, x.num_experts, cfg, grad_loss);
    let problem = AuxProblem::new(x, seq_len, cfg.score_function);
    cpu::aux_loss::aux_grad_into(&problem, &g, grad_logits);
    Ok(())
}

/// Allocating form of [`seq_aux_loss_backward_into`] over an [`ndarray`] view of the
/// logits `[batch * seq_len, num_experts]`; returns `grad_logits` of the same shape.
///
/// # Errors
/// As [`seq_aux_loss_backward_into`], plus [`Error::Layout`] for a non-contiguous
/// `logits`.
pub fn seq_aux_loss_backward<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    seq_len: usize,
    padding_mask: Option<&[bool]>,
    counts: &[i64],
    cfg: &AuxLossConfig,
    grad_loss: f32,
) -> Result<Array2<T>> {
    let (t, e) = logits.dim();
    let z = as_rows(SEQ_OP, "logits", &logits)?;
    let x = RouterLogits::new(z, t, e).padding_mask(padding_mask);
    validate_aux_loss(x.lens(), Some(seq_len), None, cfg)?;
    logits_grad(SEQ_OP, (t, e), |out| {
        seq_aux_loss_backward_into(x, seq_len, counts, cfg, grad_loss, out)
    })
}
