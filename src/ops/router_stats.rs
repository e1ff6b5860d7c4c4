//! Router statistics: load per expert, drops, imbalance, router entropy and
//! logsumexp, and a count of non-finite logits, in one pass over the logits.

use crate::cpu;
use crate::dtype::RouterFloat;
use crate::error::{Error, Result};
use crate::ops::{
    as_rows, as_vec, check_indices, check_len, check_topk, checked_i32_product, LogitsLens,
    RouterLogits,
};
use ndarray::{ArrayView1, ArrayView2};

const OP: &str = "router_stats";

/// Options of [`router_stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RouterStatsConfig {
    /// Return [`Error::NonFinite`] when any valid token's logits hold NaN or ±Inf
    /// (default `false`: count them in [`RouterStats::nonfinite_logits`]).
    pub strict: bool,
}

impl RouterStatsConfig {
    /// The default config (not strict).
    pub fn new() -> Self {
        RouterStatsConfig::default()
    }

    /// Turn strict mode on or off.
    pub fn strict(mut self, strict: bool) -> Self {
        self.strict = strict;
        self
    }
}

/// Statistics of one routing step, from [`router_stats`].
///
/// Padding tokens are excluded from everything. Means are over the valid tokens;
/// with no valid token every statistic is 0.
#[derive(Debug, Clone, PartialEq)]
pub struct RouterStats {
    /// Number of valid (non-padding) tokens.
    pub num_tokens: usize,
    /// `c_e [num_experts]`: routed assignments (`index >= 0`) per expert (`i64`, so
    /// that counts summed over ranks and steps cannot overflow).
    pub selected_counts: Vec<i64>,
    /// `[num_experts]`: assignments with a slot (`slot >= 0`) per expert, when slots
    /// were given.
    pub kept_counts: Option<Vec<i64>>,
    /// Routed assignments whose slot is `-1` (dropped by capacity); 0 without slots.
    pub dropped: u64,
    /// `max_e c_e / mean_e c_e − 1` over [`Self::selected_counts`] (0 when no
    /// assignment was routed): 0 is perfect balance, `E − 1` all on one expert.
    pub max_violation: f32,
    /// Mean over valid tokens of the router entropy `−Σ_e p_e ln p_e`,
    /// `p = softmax(z)` (natural log; `0 · ln 0 = 0`).
    pub mean_entropy: f32,
    /// Mean over valid tokens of `logsumexp_e z[t, e]`.
    pub mean_lse: f32,
    /// Max over valid tokens of `logsumexp_e z[t, e]`.
    pub max_lse: f32,
    /// Number of NaN or ±Inf logits of valid tokens.
    pub nonfinite_logits: u64,
}

/// The single validation of [`router_stats`] (every backend), before the pass: the
/// sizes, `topk`, and the lengths of `logits [num_tokens, num_experts]`,
/// `indices [num_tokens, topk]`, `slots [num_tokens, topk]` and
/// `padding_mask [num_tokens]` (the optional ones when given). The values of
/// `indices` and `slots` are checked where the host can read them ([`router_stats`]).
pub(crate) fn validate_router_stats(
    logits: LogitsLens,
    indices: usize,
    topk: usize,
    slots: Option<usize>,
) -> Result<()> {
    let (num_tokens, num_experts) = (logits.num_tokens, logits.num_experts);
    check_topk(OP, num_experts, topk)?;
    checked_i32_product(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let nk = checked_i32_product(OP, "num_tokens * topk", num_tokens, topk)?;
    let kshape = format!("[num_tokens, topk] = [{num_tokens}, {topk}]");
    check_len(OP, "indices", indices, nk, &kshape)?;
    if let Some(len) = slots {
        check_len(OP, "slots", len, nk, &kshape)?;
    }
    logits.check(OP)
}

/// The host-side checks of the routing's values: `indices` in range or `-1` and
/// distinct per token; `slots` `>= -1`, and `-1` where the index is `-1`.
fn check_routing_values(
    indices: &[i32],
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    slots: Option<&[i32]>,
) -> Result<()> {
    check_indices(OP, "indices", indices, num_tokens, topk, num_experts, true)?;
    for (i, (&s, &e)) in slots.unwrap_or_default().iter().zip(indices).enumerate() {
        if s < -1 {
            return Err(Error::invalid(
                OP,
                "slots",
                format_args!("{s} at token {}, choice {}", i / topk, i % topk),
                "slots must be >= 0 (kept) or -1 (dropped)",
            ));
        }
        if s >= 0 && e < 0 {
            return Err(Error::invalid(
                OP,
                "slots",
                format_args!(
                    "{s} at token {}, choice {} whose index is -1",
                    i / topk,
                    i % topk
                ),
                "an unrouted assignment (index -1) must have slot -1",
            ));
        }
    }
    Ok(())
}

/// Router statistics in one pass over `logits [num_tokens, num_experts]` (with its
/// optional `padding_mask [num_tokens]`, `true` = padding, excluded from every
/// statistic) and the routing `indices [num_tokens, topk]` (`-1` = not routed),
/// optionally the dispatch `slots [num_tokens, topk]` (`-1` = dropped).
///
/// See [`RouterStats`] for the definitions. Per-token math is f32 (logits widened
/// on load); reductions over tokens are f64 partials over fixed chunks combined in
/// order, so the result is bitwise independent of the thread count.
///
/// Non-finite logits are counted, not skipped: a row holding NaN (or only `-inf`) has
/// NaN entropy and logsumexp, which makes `mean_entropy`, `mean_lse` and `max_lse`
/// NaN; a row whose max is `+inf` has NaN entropy and logsumexp `+inf` (as
/// `torch.logsumexp`), which makes `mean_lse` and `max_lse` `+inf` unless another row
/// is NaN; `-inf` entries next to finite ones (masked experts) contribute 0
/// to the entropy and leave the row's statistics finite, but are still counted in
/// `nonfinite_logits`. With `cfg.strict`, any non-finite logit is an error instead.
///
/// # Errors
/// [`Error::InvalidArgument`] if `num_experts == 0`, `topk` is not in
/// `[1, num_experts]`, `indices` holds an entry outside `[0, num_experts)` other than
/// `-1` or an expert twice within a token, a slot is below `-1`, or a slot is `>= 0`
/// where the index is `-1`; [`Error::Overflow`] if `num_tokens * num_experts`
/// exceeds `i32::MAX`; [`Error::Shape`] if a slice has the wrong length;
/// [`Error::NonFinite`] (argument `logits`) in strict mode when a valid token's
/// logits hold NaN or ±Inf.
///
/// ```
/// use moe_router::{router_stats, RouterLogits, RouterStatsConfig};
///
/// // Two tokens, two experts, top-1: both pick expert 0, the second is dropped.
/// let logits = [0.0f32, 0.0, 3.0f32.ln(), 0.0];
/// let x = RouterLogits::new(&logits, 2, 2);
/// let stats = router_stats(x, &[0, 0], 1, Some(&[0, -1]), &RouterStatsConfig::new()).unwrap();
/// assert_eq!(stats.selected_counts, vec![2, 0]);
/// assert_eq!(stats.kept_counts, Some(vec![1, 0]));
/// assert_eq!(stats.dropped, 1);
/// assert_eq!(stats.max_violation, 1.0); // 2 / mean 1 - 1
/// // lse of the rows: ln 2 and ln 4.
/// assert!((stats.mean_lse - 1.5 * 2f32.ln()).abs() < 1e-6);
/// assert!((stats.max_lse - 4f32.ln()).abs() < 1e-6);
/// ```
pub fn router_stats<T: RouterFloat>(
    logits: RouterLogits<'_, T>,
    indices: &[i32],
    topk: usize,
    slots: Option<&[i32]>,
    cfg: &RouterStatsConfig,
) -> Result<RouterStats> {
    validate_router_stats(logits.lens(), indices.len(), topk, slots.map(<[i32]>::len))?;
    check_routing_values(indices, logits.num_tokens, logits.num_experts, topk, slots)?;
    let stats = cpu::router_stats::router_stats(logits, indices, topk, slots);
    if cfg.strict && stats.nonfinite_logits > 0 {
        return Err(Error::NonFinite {
            op: OP,
            arg: "logits",
            count: stats.nonfinite_logits,
        });
    }
    Ok(stats)
}

/// [`router_stats`] over arrays: `logits [num_tokens, num_experts]`,
/// `indices [num_tokens, topk]`, `slots [num_tokens, topk]`, `padding_mask [num_tokens]`.
///
/// # Errors
/// As [`router_stats`]; also [`Error::Shape`] if `indices` (or `slots`) does not
/// have `num_tokens` rows (or `slots` not the shape of `indices`), and
/// [`Error::Layout`] if an array is not standard layout.
pub fn router_stats_view<T: RouterFloat>(
    logits: ArrayView2<T>,
    indices: ArrayView2<i32>,
    slots: Option<ArrayView2<i32>>,
    padding_mask: Option<ArrayView1<bool>>,
    cfg: &RouterStatsConfig,
) -> Result<RouterStats> {
    let (num_tokens, num_experts) = logits.dim();
    let (rows, topk) = indices.dim();
    if rows != num_tokens {
        return Err(Error::shape(
            OP,
            "indices",
            format!("[num_tokens, topk] with num_tokens = {num_tokens} (the rows of `logits`)"),
            format!("{:?}", indices.dim()),
        ));
    }
    if let Some(s) = &slots {
        if s.dim() != indices.dim() {
            return Err(Error::shape(
                OP,
                "slots",
                format!(
                    "[num_tokens, topk] = {:?} (the shape of `indices`)",
                    indices.dim()
                ),
                format!("{:?}", s.dim()),
            ));
        }
    }
    let z = as_rows(OP, "logits", &logits)?;
    let idx = as_rows(OP, "indices", &indices)?;
    let sl = match &slots {
        Some(s) => Some(as_rows(OP, "slots", s)?),
        None => None,
    };
    let pad = match &padding_mask {
        Some(m) => Some(as_vec(OP, "padding_mask", m)?),
        None => None,
    };
    let x = RouterLogits::new(z, num_tokens, num_experts).padding_mask(pad);
    router_stats(x, idx, topk, sl, cfg)
}
