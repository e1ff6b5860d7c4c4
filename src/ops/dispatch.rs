//! Capacity-factor dispatch: which `(token, choice)` assignments each expert keeps,
//! and where their hidden states sit in the expert-major buffer.

use crate::cpu::CHUNK;
use crate::error::{Error, Result};
use crate::ops::{
    as_rows, check_indices, check_len, checked_i32_product, lens_struct, MAX_I32_INDEX,
};
use ndarray::{Array1, Array2, ArrayView2};
use rayon::prelude::*;

const OP: &str = "dispatch";

/// Which assignments an expert keeps when more than `capacity` are routed to it.
///
/// Each policy is a key per assignment; a lower key is kept first. Keys never tie
/// within an expert (a token routes to an expert at most once, and every key ends
/// with the token index `t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// Key `t`: earlier tokens win (Megatron "position", Switch).
    Position,
    /// Key `(j, t)`: every first choice outranks every second choice (GShard,
    /// DeepSpeed top-2).
    ChoiceThenPosition,
    /// Key `(-w[t, j], t)`: the highest-weight assignments are kept (Megatron
    /// "probs"). A NaN weight ranks last (below `-inf`).
    Probs,
    /// Key `(-max_j w[t, j], t)` over the token's routed choices: tokens the router is
    /// surest of go first (Switch / Tutel batch-prioritised routing). NaN weights are
    /// ignored in the max (a token whose routed weights are all NaN ranks last).
    BatchPrioritized,
    /// Key `(u, t)` with `u = uniform(seed, offset, Domain::RandomDrop, t)` from
    /// [`crate::philox`], ascending: random token priority (DeepSpeed RTS).
    Random {
        /// Generator seed.
        seed: u64,
        /// Generator offset (advance it every step).
        offset: u64,
    },
}

/// How kept assignments are laid out in the expert-major buffer (`row` of each
/// assignment; expert `e` owns rows `expert_offsets[e] .. expert_offsets[e + 1]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchLayout {
    /// `num_experts * capacity` rows, `row = e * capacity + slot`; rows past an
    /// expert's kept count are padding. Fixed shapes (all-to-all, CUDA graphs).
    /// Needs a capacity.
    PadToCapacity,
    /// `Σ kept` rows, `row = expert_offsets[e] + slot` with the exclusive prefix sum
    /// of the kept counts. Without a capacity every assignment is kept.
    Compact,
    /// No capacity: every routed assignment is kept, and each expert's segment is
    /// padded up to a multiple of `align` rows (`align = 1`: no padding; a grouped
    /// GEMM block size otherwise, as vLLM's `moe_align_block_size`).
    Dropless {
        /// Segment alignment in rows, `>= 1`.
        align: usize,
    },
}

/// Configuration of [`dispatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchConfig {
    /// Number of experts `E`, `>= 1`.
    pub num_experts: usize,
    /// Assignments each expert may keep (see [`crate::capacity()`]); `None` keeps all.
    pub capacity: Option<usize>,
    /// Which assignments are kept when an expert is over capacity; `None` (the
    /// default) is [`DropPolicy::Position`] (see [`DispatchConfig::effective_drop_policy`]).
    /// A policy only matters with a capacity: setting one without a capacity is an
    /// error (it would be silently ignored, every assignment being kept).
    pub drop_policy: Option<DropPolicy>,
    /// Row layout of the expert-major buffer.
    pub layout: DispatchLayout,
    /// Rescale each token's kept weights to the sum of its routed weights.
    pub renormalize: bool,
    /// Expert-parallel ranks; each owns `E / ep_size` consecutive experts. Must
    /// divide `num_experts`.
    pub ep_size: usize,
}

impl DispatchConfig {
    /// `num_experts` experts, no capacity, no drop policy given (so
    /// [`DropPolicy::Position`] once a capacity is set), [`DispatchLayout::Compact`],
    /// no renormalisation, one rank.
    pub fn new(num_experts: usize) -> Self {
        DispatchConfig {
            num_experts,
            capacity: None,
            drop_policy: None,
            layout: DispatchLayout::Compact,
            renormalize: false,
            ep_size: 1,
        }
    }

    /// Set the per-expert capacity.
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = Some(capacity);
        self
    }

    /// Set the drop policy (it needs a capacity: see [`DispatchConfig::capacity`]).
    pub fn drop_policy(mut self, policy: DropPolicy) -> Self {
        self.drop_policy = Some(policy);
        self
    }

    /// The drop policy in force: the one given, or [`DropPolicy::Position`].
    pub fn effective_drop_policy(&self) -> DropPolicy {
        self.drop_policy.unwrap_or(DropPolicy::Position)
    }

    /// Set the row layout.
    pub fn layout(mut self, layout: DispatchLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Rescale kept weights to each token's routed sum (or not).
    pub fn renormalize(mut self, renormalize: bool) -> Self {
        self.renormalize = renormalize;
        self
    }

    /// Set the number of expert-parallel ranks.
    pub fn ep_size(mut self, ep_size: usize) -> Self {
        self.ep_size = ep_size;
        self
    }

    /// Validate the config for `num_tokens` tokens with `topk` choices each and
    /// return the number of rows the buffer needs ([`dispatch_max_rows`]).
    fn validate(&self, num_tokens: usize, topk: usize) -> Result<usize> {
        let e = self.num_experts;
        if e == 0 || e > MAX_I32_INDEX {
            return Err(Error::invalid(
                OP,
                "num_experts",
                e,
                format!("the number of experts must be in [1, {MAX_I32_INDEX}]"),
            ));
        }
        if topk == 0 || topk > e {
            return Err(Error::invalid(
                OP,
                "topk",
                topk,
                format!("topk must be in [1, num_experts = {e}]"),
            ));
        }
        if self.ep_size == 0 || e % self.ep_size != 0 {
            return Err(Error::invalid(
                OP,
                "ep_size",
                self.ep_size,
                format!("the expert-parallel size must be >= 1 and divide num_experts = {e}"),
            ));
        }
        if let (Some(policy), None) = (self.drop_policy, self.capacity) {
            return Err(Error::invalid(
                OP,
                "drop_policy",
                format_args!("{policy:?}"),
                "a drop policy needs a capacity: set one with `capacity()` (see `capacity`), or leave the drop policy unset when every assignment is kept",
            ));
        }
        let assignments = checked_i32_product(OP, "num_tokens * topk", num_tokens, topk)?;
        if let Some(cap) = self.capacity {
            if cap > MAX_I32_INDEX {
                return Err(Error::Overflow {
                    op: OP,
                    what: "capacity",
                    value: cap as u128,
                    max: i32::MAX as i64,
                });
            }
        }
        match (self.layout, self.capacity) {
            (DispatchLayout::PadToCapacity, None) => Err(Error::invalid(
                OP,
                "capacity",
                "None",
                "the PadToCapacity layout needs a capacity (see `capacity()`); use Compact or Dropless to keep every assignment",
            )),
            (DispatchLayout::PadToCapacity, Some(cap)) => checked_i32_product(OP, "num_experts * capacity", e, cap),
            (DispatchLayout::Compact, None) => Ok(assignments),
            (DispatchLayout::Compact, Some(cap)) => Ok(assignments.min(e.saturating_mul(cap))),
            (DispatchLayout::Dropless { align: 0 }, _) => Err(Error::invalid(
                OP,
                "align",
                0,
                "the Dropless segment alignment must be >= 1 (1 = no padding)",
            )),
            (DispatchLayout::Dropless { .. }, Some(cap)) => Err(Error::invalid(
                OP,
                "capacity",
                cap,
                "the Dropless layout keeps every assignment: set capacity to None, or use Compact / PadToCapacity",
            )),
            (DispatchLayout::Dropless { align }, None) => {
                let rows = assignments as u128 + (e as u128) * (align as u128 - 1);
                if rows > MAX_I32_INDEX as u128 {
                    return Err(Error::Overflow {
                        op: OP,
                        what: "num_tokens * topk + num_experts * (align - 1) rows",
                        value: rows,
                        max: i32::MAX as i64,
                    });
                }
                Ok(rows as usize)
            }
        }
    }
}

/// Kept-row count and dropped count returned by [`dispatch_into`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DispatchCounts {
    /// Rows used in the expert-major buffer (`expert_offsets[E]`), padding included.
    pub num_rows: usize,
    /// Routed assignments that were not kept (unrouted `-1` entries are not counted).
    pub dropped: usize,
}

/// Caller-owned outputs of [`dispatch_into`] (flat, row-major).
#[derive(Debug)]
pub struct DispatchBuffers<'a> {
    /// `[num_tokens, topk]`: position inside the expert's segment, `-1` if dropped or
    /// unrouted.
    pub slot: &'a mut [i32],
    /// `[num_tokens, topk]`: row of the assignment in the expert-major buffer, `-1`
    /// if dropped or unrouted.
    pub row: &'a mut [i32],
    /// `[num_tokens, topk]`: the weight if kept (renormalised if asked), else 0.
    pub kept_weights: &'a mut [f32],
    /// `[num_experts]`: kept assignments per expert.
    pub tokens_per_expert: &'a mut [i32],
    /// `[max_rows]` ([`dispatch_max_rows`]): token of each row; `-1` for padding rows
    /// and for every entry `>= num_rows`.
    pub row_to_token: &'a mut [i32],
    /// `[num_experts + 1]`: expert `e` owns rows `expert_offsets[e] ..
    /// expert_offsets[e + 1]`; `expert_offsets[E] = num_rows`.
    pub expert_offsets: &'a mut [i32],
    /// `[ep_size]`: rows owned by each expert-parallel rank (its `E / ep_size`
    /// consecutive experts), the split sizes for `all_to_all_single`.
    pub rows_per_rank: &'a mut [i32],
}

/// The number of rows `row_to_token` must hold for [`dispatch_into`]:
/// `E * capacity` (PadToCapacity), `min(T * k, E * capacity)` or `T * k` without a
/// capacity (Compact), `T * k + E * (align - 1)` (Dropless).
///
/// # Errors
/// The config errors of [`dispatch`] (everything but the `indices`/`weights`
/// checks).
pub fn dispatch_max_rows(num_tokens: usize, topk: usize, cfg: &DispatchConfig) -> Result<usize> {
    cfg.validate(num_tokens, topk)
}

/// [`dispatch`] over flat row-major slices into caller-owned buffers.
///
/// `indices` and `weights` are `[num_tokens, topk]`; every buffer in `out` must have
/// exactly the length its doc gives. Returns the used row count and the dropped
/// count.
///
/// # Errors
/// As [`dispatch`], plus [`Error::Shape`] for any input or output slice of the wrong
/// length.
pub fn dispatch_into(
    indices: &[i32],
    weights: &[f32],
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
    out: DispatchBuffers<'_>,
) -> Result<DispatchCounts> {
    validate_dispatch(
        num_tokens,
        topk,
        cfg,
        &dispatch_lens!(indices, weights, out),
    )?;
    check_index_values(indices, num_tokens, topk, cfg.num_experts)?;
    Ok(crate::cpu::dispatch::dispatch(
        indices, weights, num_tokens, topk, cfg, out,
    ))
}

lens_struct!(
    /// Element counts of the buffers of a dispatch (every backend; the CUDA backend's
    /// `counts` and workspace come on top).
    DispatchLens: indices weights slot row kept_weights tokens_per_expert row_to_token expert_offsets rows_per_rank
);

/// The [`DispatchLens`] of `indices`, `weights` and the outputs in `out` (a struct with
/// the fields of [`DispatchBuffers`]: host slices or device views).
macro_rules! dispatch_lens {
    ($indices:expr, $weights:expr, $out:expr) => {
        $crate::ops::lens_of!($crate::ops::dispatch::DispatchLens { indices: $indices, weights: $weights }; $out => slot row kept_weights tokens_per_expert row_to_token expert_offsets rows_per_rank)
    };
}
pub(crate) use dispatch_lens;

/// The single validation of [`dispatch`] (every backend): the config, the sizes and
/// every buffer's length; returns [`dispatch_max_rows`]. The values of `indices` are
/// checked where the host can read them ([`dispatch_into`]).
pub(crate) fn validate_dispatch(
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
    lens: &DispatchLens,
) -> Result<usize> {
    let max_rows = cfg.validate(num_tokens, topk)?;
    let e = cfg.num_experts;
    let n = num_tokens * topk; // fits i32: checked by validate
    let tk = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP, "indices", lens.indices, n, &tk)?;
    check_len(OP, "weights", lens.weights, n, &tk)?;
    check_len(OP, "slot", lens.slot, n, &tk)?;
    check_len(OP, "row", lens.row, n, &tk)?;
    check_len(OP, "kept_weights", lens.kept_weights, n, &tk)?;
    check_len(
        OP,
        "tokens_per_expert",
        lens.tokens_per_expert,
        e,
        format_args!("[num_experts] = [{e}]"),
    )?;
    check_len(
        OP,
        "row_to_token",
        lens.row_to_token,
        max_rows,
        format_args!("[max_rows] = [{max_rows}]"),
    )?;
    check_len(
        OP,
        "expert_offsets",
        lens.expert_offsets,
        e + 1,
        format_args!("[num_experts + 1] = [{}]", e + 1),
    )?;
    check_len(
        OP,
        "rows_per_rank",
        lens.rows_per_rank,
        cfg.ep_size,
        format_args!("[ep_size] = [{}]", cfg.ep_size),
    )?;
    Ok(max_rows)
}

/// The host-side check of `indices [num_tokens, topk]` (length checked): each entry
/// in `[0, num_experts)` or `-1`, routed entries distinct within a token.
fn check_index_values(
    indices: &[i32],
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
) -> Result<()> {
    if !indices_valid(indices, topk, num_experts) {
        // The serial check finds the first bad entry and words the error.
        check_indices(OP, "indices", indices, num_tokens, topk, num_experts, true)?;
    }
    Ok(())
}

/// Parallel fast path of `check_indices(.., allow_unrouted = true)` for valid input:
/// every entry in `[0, num_experts)` or `-1`, routed entries distinct within a token.
fn indices_valid(indices: &[i32], topk: usize, num_experts: usize) -> bool {
    indices.par_chunks(CHUNK * topk).all(|c| {
        c.chunks(topk).all(|row| {
            row.iter().enumerate().all(|(j, &e)| {
                e == -1 || (e >= 0 && (e as usize) < num_experts && !row[..j].contains(&e))
            })
        })
    })
}

/// Outputs of [`dispatch`].
#[derive(Debug, Clone, PartialEq)]
pub struct DispatchOutput {
    /// `[num_tokens, topk]`: position inside the expert's segment, `-1` if dropped or
    /// unrouted.
    pub slot: Array2<i32>,
    /// `[num_tokens, topk]`: row in the expert-major buffer, `-1` if dropped or
    /// unrouted.
    pub row: Array2<i32>,
    /// `[num_tokens, topk]`: the weight if kept (renormalised if asked), else 0.
    pub kept_weights: Array2<f32>,
    /// `[num_experts]`: kept assignments per expert.
    pub tokens_per_expert: Array1<i32>,
    /// Routed assignments that were not kept.
    pub dropped: usize,
    /// Rows of the expert-major buffer, padding included.
    pub num_rows: usize,
    /// `[num_rows]`: token of each row, `-1` for padding.
    pub row_to_token: Array1<i32>,
    /// `[num_experts + 1]`: expert `e` owns rows `expert_offsets[e] ..
    /// expert_offsets[e + 1]`.
    pub expert_offsets: Array1<i32>,
    /// `[ep_size]`: rows owned by each expert-parallel rank.
    pub rows_per_rank: Array1<i32>,
}

/// Capacity-factor dispatch of routed assignments to experts.
///
/// `indices [num_tokens, topk]` holds expert indices in `[0, num_experts)` or `-1`
/// (not routed, for example removed by assignment dropout: it takes no capacity, gets
/// slot and row `-1` and weight 0, and is not counted as dropped), distinct within a
/// token; `weights [num_tokens, topk]` the routing weights.
///
/// Each expert keeps at most `capacity` of its assignments, chosen by
/// [`DropPolicy`] (lower key kept first); within an expert the kept assignments are
/// stored in token order (`slot` = rank among the kept by token index). The
/// [`DispatchLayout`] decides the rows; every layout gives `row_to_token`,
/// `expert_offsets` and per-rank row counts (rows are expert-major, so each rank's
/// rows are contiguous). With `renormalize`, a token's kept weights are rescaled to
/// its routed sum `S`: `w * S / (S_kept + 1e-20)` (all 0 if nothing was kept).
///
/// # Errors
/// - [`Error::InvalidArgument`]: `num_experts == 0`, `topk == 0` or `> num_experts`,
///   `ep_size` 0 or not dividing `num_experts`, `align == 0`, PadToCapacity without a
///   capacity, Dropless with a capacity, a drop policy without a capacity, an index
///   outside `[0, E)` and not `-1`, an expert repeated within a token;
/// - [`Error::Shape`]: `weights` not of the shape of `indices`;
/// - [`Error::Layout`]: a non-contiguous input;
/// - [`Error::Overflow`]: `T * k`, the row count or the capacity exceed `i32::MAX`.
///
/// # Examples
/// ```
/// use moe_router::{dispatch, DispatchConfig, DispatchLayout, DropPolicy};
/// use ndarray::array;
///
/// // 3 tokens, top-1 of 2 experts, capacity 1: token 1 loses to token 0 on expert 0.
/// let indices = array![[0], [0], [1]];
/// let weights = array![[0.6f32], [0.9], [0.7]];
/// let cfg = DispatchConfig::new(2).capacity(1).layout(DispatchLayout::PadToCapacity);
/// let out = dispatch(indices.view(), weights.view(), &cfg).unwrap();
/// assert_eq!(out.slot.column(0).to_vec(), vec![0, -1, 0]);
/// assert_eq!(out.row_to_token.to_vec(), vec![0, 2]);
/// assert_eq!(out.dropped, 1);
///
/// // By weight instead, token 1 wins.
/// let out = dispatch(indices.view(), weights.view(), &cfg.drop_policy(DropPolicy::Probs)).unwrap();
/// assert_eq!(out.row.column(0).to_vec(), vec![-1, 0, 1]);
/// ```
pub fn dispatch(
    indices: ArrayView2<i32>,
    weights: ArrayView2<f32>,
    cfg: &DispatchConfig,
) -> Result<DispatchOutput> {
    let (num_tokens, topk) = indices.dim();
    if weights.dim() != indices.dim() {
        return Err(Error::shape(
            OP,
            "weights",
            format!("[num_tokens, topk] = [{num_tokens}, {topk}] (the shape of `indices`)"),
            format!("{:?}", weights.shape()),
        ));
    }
    let idx = as_rows(OP, "indices", &indices)?;
    let w = as_rows(OP, "weights", &weights)?;
    // Everything is checked before the outputs (`row_to_token` may be E * capacity
    // long) are allocated: a bad index must not cost a large allocation first.
    let max_rows = cfg.validate(num_tokens, topk)?;
    let (e, n) = (cfg.num_experts, num_tokens * topk);
    let lens = DispatchLens {
        indices: idx.len(),
        weights: w.len(),
        slot: n,
        row: n,
        kept_weights: n,
        tokens_per_expert: e,
        row_to_token: max_rows,
        expert_offsets: e + 1,
        rows_per_rank: cfg.ep_size,
    };
    validate_dispatch(num_tokens, topk, cfg, &lens)?;
    check_index_values(idx, num_tokens, topk, e)?;
    let mut slot = Array2::<i32>::zeros((num_tokens, topk));
    let mut row = Array2::<i32>::zeros((num_tokens, topk));
    let mut kept_weights = Array2::<f32>::zeros((num_tokens, topk));
    let mut tokens_per_expert = Array1::<i32>::zeros(e);
    let mut row_to_token = vec![0i32; max_rows];
    let mut expert_offsets = Array1::<i32>::zeros(e + 1);
    let mut rows_per_rank = Array1::<i32>::zeros(cfg.ep_size);
    let counts = crate::cpu::dispatch::dispatch(
        idx,
        w,
        num_tokens,
        topk,
        cfg,
        DispatchBuffers {
            slot: slice_mut(&mut slot),
            row: slice_mut(&mut row),
            kept_weights: slice_mut(&mut kept_weights),
            tokens_per_expert: slice_mut(&mut tokens_per_expert),
            row_to_token: &mut row_to_token,
            expert_offsets: slice_mut(&mut expert_offsets),
            rows_per_rank: slice_mut(&mut rows_per_rank),
        },
    );
    row_to_token.truncate(counts.num_rows);
    Ok(DispatchOutput {
        slot,
        row,
        kept_weights,
        tokens_per_expert,
        dropped: counts.dropped,
        num_rows: counts.num_rows,
        row_to_token: Array1::from_vec(row_to_token),
        expert_offsets,
        rows_per_rank,
    })
}

/// The data of a freshly allocated (hence standard-layout) array.
fn slice_mut<A, D: ndarray::Dimension>(a: &mut ndarray::Array<A, D>) -> &mut [A] {
    a.as_slice_mut().unwrap_or_default()
}
