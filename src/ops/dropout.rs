//! Expert dropout: expert masking before selection, assignment dropout after gating.

use crate::cpu;
use crate::error::{Error, Result};
use crate::ops::{as_rows, check_indices, check_len, check_topk, checked_i32_product, lens_struct};
use ndarray::{Array2, ArrayView2};

/// Rate and random stream of a dropout-like op (expert masking, assignment dropout).
///
/// Deterministic from `(seed, offset)` (Philox-4x32-10, see [`crate::philox`]): the
/// same config gives the same mask on every backend and thread count. A rate of 0
/// is the identity. Apply it in training only (the Python module does this).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DropoutConfig {
    /// Probability in `[0, 1)` that a candidate / assignment is dropped.
    pub rate: f32,
    /// Generator seed.
    pub seed: u64,
    /// Generator offset (advance it every step).
    pub offset: u64,
}

impl DropoutConfig {
    /// A config with the given rate, seed and offset.
    pub fn new(rate: f32, seed: u64, offset: u64) -> Self {
        DropoutConfig { rate, seed, offset }
    }

    /// `rate` must be finite and in `[0, 1)`.
    pub fn validate(&self, op: &'static str, arg: &'static str) -> Result<()> {
        if !(self.rate.is_finite() && self.rate >= 0.0 && self.rate < 1.0) {
            return Err(Error::invalid(
                op,
                arg,
                format_args!("rate {}", self.rate),
                "the dropout rate must be finite and in [0, 1)",
            ));
        }
        Ok(())
    }
}

const OP_MASK: &str = "expert_mask";
const OP_DROP: &str = "assignment_dropout";
const OP_DROP_BWD: &str = "assignment_dropout_backward";

/// The single validation of [`expert_mask_into`] (every backend): sizes, `topk`,
/// the rate and the output length.
pub(crate) fn validate_expert_mask(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked_len: usize,
) -> Result<()> {
    let n = expert_mask_len(num_tokens, num_experts, topk, cfg)?;
    check_len(
        OP_MASK,
        "masked",
        masked_len,
        n,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )
}

/// The element count `num_tokens * num_experts` of the mask of [`expert_mask_into`],
/// after every check of the arguments but the buffer: call it before allocating
/// the mask, so that bad sizes are an error rather than a large allocation first.
///
/// # Errors
/// As [`expert_mask_into`], but for the length of `masked`.
///
/// ```
/// use moe_router::{expert_mask_len, DropoutConfig};
///
/// let cfg = DropoutConfig::new(0.5, 1, 0);
/// assert_eq!(expert_mask_len(4, 8, 2, &cfg).unwrap(), 32);
/// assert!(expert_mask_len(1 << 31, 2, 1, &cfg).is_err()); // nothing allocated
/// ```
pub fn expert_mask_len(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
) -> Result<usize> {
    check_topk(OP_MASK, num_experts, topk)?;
    cfg.validate(OP_MASK, "rate")?;
    checked_i32_product(OP_MASK, "num_tokens * num_experts", num_tokens, num_experts)
}

/// Expert masking (before selection) into a caller-owned mask
/// `masked [num_tokens, num_experts]` (row-major, `true` = masked).
///
/// Candidate `(t, e)` is masked when `uniform(seed, offset, ExpertMasking, t * E + e)
/// < rate`; if that leaves fewer than `topk` candidates of a token, the masked ones
/// with the largest draws are unmasked until exactly `topk` remain (see
/// [`crate::cpu::dropout::expert_mask_row`]; `O(E)` per token whatever the rate).
/// Rate 0 masks nothing. The mask depends only on `(seed, offset)` and the
/// coordinates, not on the thread count or backend.
///
/// # Errors
/// [`Error::InvalidArgument`] if `num_experts == 0`, `topk` is not in
/// `[1, num_experts]`, or `rate` is not finite in `[0, 1)`; [`Error::Overflow`] if
/// `num_tokens * num_experts` exceeds `i32::MAX`; [`Error::Shape`] if
/// `masked.len() != num_tokens * num_experts`.
pub fn expert_mask_into(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) -> Result<()> {
    validate_expert_mask(num_tokens, num_experts, topk, cfg, masked.len())?;
    cpu::dropout::expert_mask(num_tokens, num_experts, topk, cfg, masked);
    Ok(())
}

/// Expert masking (before selection): the mask `[num_tokens, num_experts]`
/// (`true` = masked), as [`expert_mask_into`]. Every row keeps at least `topk`
/// candidates unmasked.
///
/// # Errors
/// As [`expert_mask_into`].
///
/// ```
/// use moe_router::{expert_mask, DropoutConfig};
///
/// let mask = expert_mask(4, 8, 2, &DropoutConfig::new(0.5, 1234, 0)).unwrap();
/// assert_eq!(mask.dim(), (4, 8));
/// for row in mask.rows() {
///     assert!(row.iter().filter(|&&m| !m).count() >= 2);
/// }
/// // Rate 0 masks nothing.
/// let none = expert_mask(4, 8, 2, &DropoutConfig::new(0.0, 1234, 0)).unwrap();
/// assert!(none.iter().all(|&m| !m));
/// ```
pub fn expert_mask(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
) -> Result<Array2<bool>> {
    // Validate before allocating (a huge T * E must not allocate).
    let n = num_tokens.saturating_mul(num_experts);
    validate_expert_mask(num_tokens, num_experts, topk, cfg, n)?;
    let mut masked = vec![false; n];
    cpu::dropout::expert_mask(num_tokens, num_experts, topk, cfg, &mut masked);
    Array2::from_shape_vec((num_tokens, num_experts), masked).map_err(|e| {
        Error::shape(
            OP_MASK,
            "masked",
            format!("[{num_tokens}, {num_experts}]"),
            e.to_string(),
        )
    })
}

/// Routed assignments `[num_tokens, topk]` (row-major): expert `indices` (`-1` = not
/// routed) and their `weights`; the input of [`assignment_dropout_into`] and
/// [`assignment_dropout_backward_into`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Assignments<'a> {
    /// `[num_tokens, topk]` expert indices, `-1` where not routed.
    pub indices: &'a [i32],
    /// `[num_tokens, topk]` routing weights.
    pub weights: &'a [f32],
    /// Tokens (rows).
    pub num_tokens: usize,
    /// Assignments per token (columns).
    pub topk: usize,
}

impl<'a> Assignments<'a> {
    /// `indices` and `weights`, both `[num_tokens, topk]`.
    pub fn new(indices: &'a [i32], weights: &'a [f32], num_tokens: usize, topk: usize) -> Self {
        Assignments {
            indices,
            weights,
            num_tokens,
            topk,
        }
    }
}

/// Caller-owned outputs of [`assignment_dropout_into`], each `[num_tokens, topk]`
/// row-major.
#[derive(Debug)]
pub struct AssignmentDropoutBuffers<'a> {
    /// Expert indices after dropout: dropped (and already unrouted) entries are `-1`.
    pub indices: &'a mut [i32],
    /// Weights after dropout: dropped and unrouted entries are `0`; kept entries are
    /// rescaled if renormalising.
    pub weights: &'a mut [f32],
    /// `true` where the assignment is routed and survived.
    pub keep: &'a mut [bool],
}

/// Output of [`assignment_dropout`].
#[derive(Debug, Clone, PartialEq)]
pub struct AssignmentDropoutOutput {
    /// `[num_tokens, topk]` indices, `-1` where dropped or unrouted.
    pub indices: Array2<i32>,
    /// `[num_tokens, topk]` weights, `0` where dropped or unrouted.
    pub weights: Array2<f32>,
    /// `[num_tokens, topk]`, `true` where routed and kept (save it for backward).
    pub keep: Array2<bool>,
    /// Number of routed assignments dropped.
    pub dropped: usize,
}

lens_struct!(
    /// Element counts of the buffers of an assignment-dropout forward (every backend).
    AssignmentDropoutLens: indices weights out_indices out_weights keep
);

/// The [`AssignmentDropoutLens`] of `input` (the fields of [`Assignments`]) and `out`
/// (those of [`AssignmentDropoutBuffers`]), host slices or device views.
macro_rules! assignment_dropout_lens {
    ($input:expr, $out:expr) => {
        $crate::ops::lens_of!($crate::ops::dropout::AssignmentDropoutLens {
            indices: $input.indices,
            weights: $input.weights,
            out_indices: $out.indices,
            out_weights: $out.weights,
            keep: $out.keep
        })
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use assignment_dropout_lens;

/// The single validation of assignment dropout (every backend): sizes, `topk`, the
/// rate, and every buffer `[num_tokens, topk]`. The values of `indices` (in range
/// or `-1`, distinct per token) are checked where the host can read them
/// ([`assignment_dropout_into`]).
pub(crate) fn validate_assignment_dropout(
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    cfg: &DropoutConfig,
    lens: AssignmentDropoutLens,
) -> Result<()> {
    check_topk(OP_DROP, num_experts, topk)?;
    cfg.validate(OP_DROP, "rate")?;
    let n = checked_i32_product(OP_DROP, "num_tokens * topk", num_tokens, topk)?;
    let shape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP_DROP, "indices", lens.indices, n, &shape)?;
    check_len(OP_DROP, "weights", lens.weights, n, &shape)?;
    check_len(OP_DROP, "out.indices", lens.out_indices, n, &shape)?;
    check_len(OP_DROP, "out.weights", lens.out_weights, n, &shape)?;
    check_len(OP_DROP, "out.keep", lens.keep, n, &shape)
}

/// Assignment dropout (NLLB's expert output masking) after gating, into
/// caller-owned buffers; returns the number of routed assignments dropped.
///
/// Inputs `indices` and `weights` ([`Assignments`]) are `[num_tokens, topk]`
/// row-major; an index of `-1` marks an assignment that is already unrouted. Routed assignment `(t, j)` is
/// dropped when `uniform(seed, offset, AssignmentDropout, t * topk + j) < rate`: its
/// output index becomes `-1` (it takes no capacity downstream), its weight `0` and
/// `keep` `false`. Unrouted entries stay `-1` with weight `0` and `keep = false` and
/// are not counted as dropped. Rate 0 is the identity (up to zeroing the weights of
/// unrouted entries).
///
/// With `renormalize`, each token that lost at least one assignment has its kept
/// weights scaled so its weight sum is preserved:
/// `w'_j = keep_j · w_j · (S / (S_keep + 1e-20))`, `S = Σ_{routed j} w_j`,
/// `S_keep = Σ_j keep_j · w_j` (f32, summed in choice order). A token that lost
/// nothing is copied unchanged; one that lost everything gets all zeros.
///
/// # Errors
/// [`Error::InvalidArgument`] if `num_experts == 0`, `topk` is not in
/// `[1, num_experts]`, `rate` is not finite in `[0, 1)`, or `indices` holds an entry
/// outside `[0, num_experts)` other than `-1` or an expert twice within a token;
/// [`Error::Overflow`] if `num_tokens * topk` exceeds `i32::MAX`; [`Error::Shape`]
/// if any input or output slice is not `num_tokens * topk` long.
pub fn assignment_dropout_into(
    input: Assignments<'_>,
    num_experts: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
    out: AssignmentDropoutBuffers<'_>,
) -> Result<usize> {
    let (num_tokens, topk) = (input.num_tokens, input.topk);
    let lens = assignment_dropout_lens!(input, out);
    validate_assignment_dropout(num_tokens, topk, num_experts, cfg, lens)?;
    check_indices(
        OP_DROP,
        "indices",
        input.indices,
        num_tokens,
        topk,
        num_experts,
        true,
    )?;
    Ok(cpu::dropout::assignment_dropout(
        &input,
        cfg,
        renormalize,
        out,
    ))
}

/// Assignment dropout (NLLB's expert output masking) of `indices`, `weights`
/// `[num_tokens, topk]`; see [`assignment_dropout_into`] for the rule.
///
/// # Errors
/// As [`assignment_dropout_into`]; also [`Error::Shape`] if `weights` does not have
/// the shape of `indices`, [`Error::Layout`] if either is not standard layout.
///
/// ```
/// use moe_router::{assignment_dropout, DropoutConfig};
/// use ndarray::array;
///
/// let indices = array![[0, 3], [2, 1], [1, -1]];
/// let weights = array![[0.7f32, 0.3], [0.6, 0.4], [1.0, 0.0]];
/// let cfg = DropoutConfig::new(0.5, 7, 0);
/// let out = assignment_dropout(indices.view(), weights.view(), 4, &cfg, true).unwrap();
/// for t in 0..3 {
///     let kept: f32 = out.weights.row(t).sum();
///     if out.keep.row(t).iter().any(|&k| k) {
///         // Renormalised: the token's weight sum is preserved.
///         assert!((kept - weights.row(t).sum()).abs() < 1e-6);
///     } else {
///         assert_eq!(kept, 0.0);
///     }
/// }
/// assert_eq!(out.indices[[2, 1]], -1); // unrouted stays unrouted
/// assert!(!out.keep[[2, 1]]);
/// ```
pub fn assignment_dropout(
    indices: ArrayView2<i32>,
    weights: ArrayView2<f32>,
    num_experts: usize,
    cfg: &DropoutConfig,
    renormalize: bool,
) -> Result<AssignmentDropoutOutput> {
    let (num_tokens, topk) = indices.dim();
    if weights.dim() != indices.dim() {
        return Err(Error::shape(
            OP_DROP,
            "weights",
            format!(
                "[num_tokens, topk] = {:?} (the shape of `indices`)",
                indices.dim()
            ),
            format!("{:?}", weights.dim()),
        ));
    }
    let idx = as_rows(OP_DROP, "indices", &indices)?;
    let w = as_rows(OP_DROP, "weights", &weights)?;
    let input = Assignments::new(idx, w, num_tokens, topk);
    let n = idx.len();
    let lens = AssignmentDropoutLens {
        indices: n,
        weights: w.len(),
        out_indices: n,
        out_weights: n,
        keep: n,
    };
    // Every check before the outputs are allocated.
    validate_assignment_dropout(num_tokens, topk, num_experts, cfg, lens)?;
    check_indices(OP_DROP, "indices", idx, num_tokens, topk, num_experts, true)?;
    let mut oi = vec![-1i32; n];
    let mut ow = vec![0.0f32; n];
    let mut ok = vec![false; n];
    let dropped = cpu::dropout::assignment_dropout(
        &input,
        cfg,
        renormalize,
        AssignmentDropoutBuffers {
            indices: &mut oi,
            weights: &mut ow,
            keep: &mut ok,
        },
    );
    let shape_err = |e: ndarray::ShapeError| {
        Error::shape(
            OP_DROP,
            "indices",
            format!("[{num_tokens}, {topk}]"),
            e.to_string(),
        )
    };
    Ok(AssignmentDropoutOutput {
        indices: Array2::from_shape_vec((num_tokens, topk), oi).map_err(shape_err)?,
        weights: Array2::from_shape_vec((num_tokens, topk), ow).map_err(shape_err)?,
        keep: Array2::from_shape_vec((num_tokens, topk), ok).map_err(shape_err)?,
        dropped,
    })
}

lens_struct!(
    /// Element counts of the buffers of an assignment-dropout backward (every backend).
    AssignmentDropoutBackwardLens: indices weights keep grad_out grad_weights
);

/// The [`AssignmentDropoutBackwardLens`] of `input` (the fields of [`Assignments`]) and
/// the other buffers of the backward, host slices or device views.
macro_rules! assignment_dropout_backward_lens {
    ($input:expr, $keep:expr, $grad_out:expr, $grad_weights:expr) => {
        $crate::ops::lens_of!($crate::ops::dropout::AssignmentDropoutBackwardLens {
            indices: $input.indices,
            weights: $input.weights,
            keep: $keep,
            grad_out: $grad_out,
            grad_weights: $grad_weights
        })
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use assignment_dropout_backward_lens;

/// The single validation of the assignment-dropout backward (every backend): `topk`,
/// the size, and every buffer `[num_tokens, topk]`. The values of `indices` and
/// `keep` are checked where the host can read them
/// ([`assignment_dropout_backward_into`]).
pub(crate) fn validate_assignment_dropout_backward(
    num_tokens: usize,
    topk: usize,
    lens: AssignmentDropoutBackwardLens,
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
    check_len(OP_DROP_BWD, "indices", lens.indices, n, &shape)?;
    check_len(OP_DROP_BWD, "weights", lens.weights, n, &shape)?;
    check_len(OP_DROP_BWD, "keep", lens.keep, n, &shape)?;
    check_len(OP_DROP_BWD, "grad_out", lens.grad_out, n, &shape)?;
    check_len(OP_DROP_BWD, "grad_weights", lens.grad_weights, n, &shape)
}

/// The host-side value checks of the backward: indices `>= -1`, `keep` only where
/// routed.
fn check_backward_values(indices: &[i32], keep: &[bool], topk: usize) -> Result<()> {
    for (i, (&e, &k)) in indices.iter().zip(keep).enumerate() {
        if e < -1 {
            return Err(Error::invalid(
                OP_DROP_BWD,
                "indices",
                format_args!("{e} at token {}, choice {}", i / topk, i % topk),
                "expert indices must be >= 0, or -1 (not routed)",
            ));
        }
        if k && e < 0 {
            return Err(Error::invalid(
                OP_DROP_BWD,
                "keep",
                format_args!("true at token {}, choice {} whose index is -1", i / topk, i % topk),
                "keep may be true only for routed assignments (pass the forward's `keep` and input `indices`)",
            ));
        }
    }
    Ok(())
}

/// Backward of [`assignment_dropout_into`]: `grad_weights [num_tokens, topk]` (the
/// gradient with respect to the input weights) from `grad_out [num_tokens, topk]`
/// (with respect to the output weights).
///
/// Takes the forward's *input* `indices` and `weights` ([`Assignments`]) and its
/// `keep` mask (so the generator is not replayed). The Jacobian is exact:
/// - without `renormalize`, or for a token that lost nothing: `∂L/∂w_m = keep_m · g_m`;
/// - with `renormalize`, for a token that lost something, with `S`, `S_keep` as in
///   the forward, `D = S_keep + 1e-20`, `r = S / D` and `c = Σ_j keep_j g_j w_j / D`:
///   `∂L/∂w_m = keep_m · r · (g_m − c) + routed_m · c`. A dropped assignment still
///   gets `c` (its weight is part of the preserved sum `S`); unrouted entries get 0.
///
/// The indices are not range-checked against `num_experts` (the backward does not
/// need it), only for being `>= -1`.
///
/// # Errors
/// [`Error::InvalidArgument`] if `topk == 0`, an index is below `-1`, or `keep` is
/// `true` where the index is `-1`; [`Error::Overflow`] if `num_tokens * topk`
/// exceeds `i32::MAX`; [`Error::Shape`] if any slice is not `num_tokens * topk` long.
pub fn assignment_dropout_backward_into(
    input: Assignments<'_>,
    keep: &[bool],
    renormalize: bool,
    grad_out: &[f32],
    grad_weights: &mut [f32],
) -> Result<()> {
    let lens = assignment_dropout_backward_lens!(input, keep, grad_out, grad_weights);
    validate_assignment_dropout_backward(input.num_tokens, input.topk, lens)?;
    check_backward_values(input.indices, keep, input.topk)?;
    cpu::dropout::assignment_dropout_backward(&input, keep, renormalize, grad_out, grad_weights);
    Ok(())
}

/// Backward of [`assignment_dropout`] over arrays: `grad_weights [num_tokens, topk]`
/// from the forward's input `indices`, `weights`, its `keep`, and `grad_out`; see
/// [`assignment_dropout_backward_into`].
///
/// # Errors
/// As [`assignment_dropout_backward_into`]; [`Error::Shape`] if the arrays'
/// shapes differ from `indices`', [`Error::Layout`] if one is not standard layout.
pub fn assignment_dropout_backward(
    indices: ArrayView2<i32>,
    weights: ArrayView2<f32>,
    keep: ArrayView2<bool>,
    renormalize: bool,
    grad_out: ArrayView2<f32>,
) -> Result<Array2<f32>> {
    let dim = indices.dim();
    let (num_tokens, topk) = dim;
    for (arg, d) in [
        ("weights", weights.dim()),
        ("keep", keep.dim()),
        ("grad_out", grad_out.dim()),
    ] {
        if d != dim {
            return Err(Error::shape(
                OP_DROP_BWD,
                arg,
                format!("[num_tokens, topk] = {dim:?} (the shape of `indices`)"),
                format!("{d:?}"),
            ));
        }
    }
    let idx = as_rows(OP_DROP_BWD, "indices", &indices)?;
    let w = as_rows(OP_DROP_BWD, "weights", &weights)?;
    let kp = as_rows(OP_DROP_BWD, "keep", &keep)?;
    let g = as_rows(OP_DROP_BWD, "grad_out", &grad_out)?;
    let n = idx.len();
    let input = Assignments::new(idx, w, num_tokens, topk);
    let mut gw = vec![0.0f32; n];
    assignment_dropout_backward_into(input, kp, renormalize, g, &mut gw)?;
    Array2::from_shape_vec(dim, gw).map_err(|e| {
        Error::shape(
            OP_DROP_BWD,
            "grad_weights",
            format!("{dim:?}"),
            e.to_string(),
        )
    })
}
