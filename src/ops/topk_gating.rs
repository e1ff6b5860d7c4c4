//! Top-k gating: scores, expert bias, group-limited routing, selection noise, expert
//! masking, top-k selection and routing weights; routing replay; backward.
//!
//! `docs/semantics.md` §2 "Top-k gating". Modes:
//! - **softmax, `pre_softmax = true`** (Switch, DeepSeek-V2, Qwen-MoE): `p = softmax(z)`
//!   over all experts, select on `q = p + b`, `w_j = p[i_j]`;
//! - **softmax, `pre_softmax = false`** (Mixtral; Megatron's default): select on
//!   `q = z + b`, `w = softmax(z[i_1..i_k])` over the selected k only;
//! - **sigmoid** (DeepSeek-V3): `p = σ(z)`, select on `q = p + b`, `w_j = p[i_j]`.
//!
//! Then `normalize` divides by `Σ_j w_j + 1e-20` (Megatron renormalises sigmoid
//! weights when `k > 1`: set `normalize(topk > 1)` to match), and `w *= scaling_factor`.
//! The expert bias `b` (and the selection noise) change *which* experts are
//! selected, never the weights.
//!
//! **Ties**: equal selection scores rank the lower expert index first (and the lower
//! group index for groups); a NaN score ranks below every number, `-inf` included.
//! Output indices of a token are ordered by descending selection score.
//!
//! **Precision**: logits are widened to `f32` on load; every score, sum and weight is
//! computed in `f32`; gradients are rounded to the logits' dtype on the final store.

use crate::cpu;
use crate::error::{Error, Result};
use crate::ops::{as_rows, as_vec, check_indices, check_len, check_logits, DropoutConfig};
use crate::RouterFloat;
use ndarray::{Array2, ArrayView1, ArrayView2};

const OP: &str = "topk_gating";

/// How router logits become scores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ScoreFunction {
    /// Softmax over the experts (see `pre_softmax`).
    #[default]
    Softmax,
    /// Logistic sigmoid per expert (DeepSeek-V3).
    Sigmoid,
}

/// Group-limited routing (DeepSeek-V2 device-limited, V3 node-limited).
///
/// Experts form `num_groups` contiguous groups of `num_experts / num_groups`; a
/// group's score is the sum of its top `topk / group_topk` selection scores; the
/// `group_topk` best groups stay eligible and the top k are taken among their experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimit {
    /// Number of expert groups; must divide `num_experts`.
    pub num_groups: usize,
    /// Number of groups kept per token, in `1..=min(num_groups, topk)`.
    pub group_topk: usize,
}

/// Gaussian noise added to the selection score only (DeepSpeed's RSample): the
/// weights stay noise-free. Drawn from Philox stream `(seed, offset)`, element
/// `t * num_experts + e` (see [`crate::philox::normal`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SelectionNoise {
    /// Standard deviation (finite, `>= 0`).
    pub std: f32,
    /// Generator seed.
    pub seed: u64,
    /// Generator offset (advance it every step).
    pub offset: u64,
}

/// Options of [`topk_gating`], [`topk_gating_replay`] and [`topk_gating_backward`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopkGatingConfig {
    /// Experts per token, `1..=num_experts`.
    pub topk: usize,
    /// Softmax or sigmoid scores.
    pub score_function: ScoreFunction,
    /// Softmax over all experts before selection (softmax only).
    pub pre_softmax: bool,
    /// Renormalise the k weights to sum to 1 (before scaling).
    pub normalize: bool,
    /// Group-limited routing, if any.
    pub group_limit: Option<GroupLimit>,
    /// Factor applied to the weights last.
    pub scaling_factor: f32,
    /// Selection noise, if any (training only).
    pub noise: Option<SelectionNoise>,
    /// Expert masking before selection (training only); see
    /// [`crate::cpu::dropout::expert_mask_row`] for the rule. Masked candidates get
    /// selection score `-inf`.
    pub expert_masking: Option<DropoutConfig>,
}

impl TopkGatingConfig {
    /// Softmax scores, `pre_softmax = false`, no normalisation, no groups, scaling 1.
    pub fn new(topk: usize) -> Self {
        TopkGatingConfig {
            topk,
            score_function: ScoreFunction::Softmax,
            pre_softmax: false,
            normalize: false,
            group_limit: None,
            scaling_factor: 1.0,
            noise: None,
            expert_masking: None,
        }
    }
    /// Set the score function.
    pub fn score_function(mut self, f: ScoreFunction) -> Self {
        self.score_function = f;
        self
    }
    /// Set `pre_softmax`.
    pub fn pre_softmax(mut self, v: bool) -> Self {
        self.pre_softmax = v;
        self
    }
    /// Set `normalize`.
    pub fn normalize(mut self, v: bool) -> Self {
        self.normalize = v;
        self
    }
    /// Enable group-limited routing.
    pub fn group_limit(mut self, num_groups: usize, group_topk: usize) -> Self {
        self.group_limit = Some(GroupLimit {
            num_groups,
            group_topk,
        });
        self
    }
    /// Set the scaling factor.
    pub fn scaling_factor(mut self, s: f32) -> Self {
        self.scaling_factor = s;
        self
    }
    /// Enable Gaussian selection noise.
    pub fn noise(mut self, std: f32, seed: u64, offset: u64) -> Self {
        self.noise = Some(SelectionNoise { std, seed, offset });
        self
    }
    /// Enable expert masking before selection.
    pub fn expert_masking(mut self, rate: f32, seed: u64, offset: u64) -> Self {
        self.expert_masking = Some(DropoutConfig::new(rate, seed, offset));
        self
    }

    /// Check the options against `num_experts` (and the bias length, if any).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for `num_experts = 0`, `topk` outside
    /// `1..=num_experts`, `pre_softmax` with sigmoid, `num_experts` not divisible by
    /// `num_groups`, `group_topk` outside `1..=min(num_groups, topk)`, `topk` not
    /// reachable within `group_topk` groups, non-finite scaling or noise std, a bad
    /// masking rate; [`Error::Shape`] for a bias of the wrong length.
    pub fn validate(&self, num_experts: usize, expert_bias: Option<&[f32]>) -> Result<()> {
        if num_experts == 0 {
            return Err(Error::invalid(
                OP,
                "num_experts",
                0,
                "need at least one expert",
            ));
        }
        if num_experts > i32::MAX as usize {
            return Err(Error::invalid(
                OP,
                "num_experts",
                num_experts,
                "expert indices are i32: at most 2147483647 experts",
            ));
        }
        if self.topk == 0 || self.topk > num_experts {
            return Err(Error::invalid(
                OP,
                "topk",
                self.topk,
                format!("topk must be in 1..={num_experts} (num_experts)"),
            ));
        }
        if self.pre_softmax && self.score_function == ScoreFunction::Sigmoid {
            return Err(Error::invalid(OP, "pre_softmax", true, "pre_softmax applies to the softmax score function only; set it to false for sigmoid"));
        }
        if let Some(g) = self.group_limit {
            if g.num_groups == 0 || num_experts % g.num_groups != 0 {
                return Err(Error::invalid(
                    OP,
                    "num_groups",
                    g.num_groups,
                    format!("num_groups must be >= 1 and divide num_experts = {num_experts}"),
                ));
            }
            if g.group_topk == 0 || g.group_topk > g.num_groups {
                return Err(Error::invalid(
                    OP,
                    "group_topk",
                    g.group_topk,
                    format!("group_topk must be in 1..={} (num_groups)", g.num_groups),
                ));
            }
            if g.group_topk > self.topk {
                return Err(Error::invalid(
                    OP,
                    "group_topk",
                    g.group_topk,
                    format!("a group's score sums its top topk / group_topk experts, so group_topk must be <= topk = {}", self.topk),
                ));
            }
            let per_group = num_experts / g.num_groups;
            if g.group_topk * per_group < self.topk {
                return Err(Error::invalid(
                    OP,
                    "topk",
                    self.topk,
                    format!(
                        "topk is not reachable within group_topk = {} groups of {per_group} experts; need group_topk * num_experts / num_groups >= topk",
                        g.group_topk
                    ),
                ));
            }
        }
        if !self.scaling_factor.is_finite() {
            return Err(Error::invalid(
                OP,
                "scaling_factor",
                self.scaling_factor,
                "must be finite",
            ));
        }
        if let Some(n) = self.noise {
            if !(n.std.is_finite() && n.std >= 0.0) {
                return Err(Error::invalid(
                    OP,
                    "noise.std",
                    n.std,
                    "the noise standard deviation must be finite and >= 0",
                ));
            }
        }
        if let Some(m) = &self.expert_masking {
            m.validate(OP, "expert_masking")?;
        }
        if let Some(b) = expert_bias {
            check_bias_len(num_experts, b.len())?;
            check_bias_values(b)?;
        }
        Ok(())
    }
}

/// `expert_bias [num_experts]`.
fn check_bias_len(num_experts: usize, len: usize) -> Result<()> {
    check_len(
        OP,
        "expert_bias",
        len,
        num_experts,
        format_args!("[num_experts] = [{num_experts}]"),
    )
}

/// The host-side check of the bias values: finite.
fn check_bias_values(expert_bias: &[f32]) -> Result<()> {
    if let Some((e, v)) = expert_bias.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::invalid(
            OP,
            "expert_bias",
            format_args!("{v} at expert {e}"),
            "the expert bias must be finite",
        ));
    }
    Ok(())
}

/// The host-side check of given `indices [num_tokens, topk]` (replay, backward): in
/// `[0, num_experts)`, distinct within a token.
fn check_given_indices(
    indices: &[i32],
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
) -> Result<()> {
    check_indices(OP, "indices", indices, num_tokens, topk, num_experts, false)
}

/// `[num_tokens, topk] = [t, k]` of `arg`.
fn check_tk(arg: &'static str, got: usize, num_tokens: usize, k: usize) -> Result<()> {
    check_len(
        OP,
        arg,
        got,
        num_tokens * k,
        format_args!("[num_tokens, topk] = [{num_tokens}, {k}]"),
    )
}

/// Element counts of the buffers of a top-k gating pass (every backend).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopkGatingLens {
    /// `logits`, the bias (if given), `weights` and `indices`.
    Forward {
        logits: usize,
        expert_bias: Option<usize>,
        weights: usize,
        indices: usize,
    },
    /// `logits`, the given `indices`, `weights`.
    Replay {
        logits: usize,
        indices: usize,
        weights: usize,
    },
    /// `logits`, `indices`, `grad_weights`, `grad_logits`.
    Backward {
        logits: usize,
        indices: usize,
        grad_weights: usize,
        grad_logits: usize,
    },
}

/// The forward's [`TopkGatingLens`]: `expert_bias` is the bias's element count if one
/// is given; the buffers are host slices, device views or raw device buffers.
macro_rules! topk_gating_lens {
    ($logits:expr, $expert_bias:expr, $weights:expr, $indices:expr) => {
        $crate::ops::topk_gating::TopkGatingLens::Forward {
            logits: $logits.len(),
            expert_bias: $expert_bias,
            weights: $weights.len(),
            indices: $indices.len(),
        }
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use topk_gating_lens;

/// Routing replay's [`TopkGatingLens`].
macro_rules! topk_gating_replay_lens {
    ($logits:expr, $indices:expr, $weights:expr) => {
        $crate::ops::lens_of!($crate::ops::topk_gating::TopkGatingLens::Replay {
            logits: $logits,
            indices: $indices,
            weights: $weights
        })
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use topk_gating_replay_lens;

/// The backward's [`TopkGatingLens`].
macro_rules! topk_gating_backward_lens {
    ($logits:expr, $indices:expr, $grad_weights:expr, $grad_logits:expr) => {
        $crate::ops::lens_of!($crate::ops::topk_gating::TopkGatingLens::Backward {
            logits: $logits,
            indices: $indices,
            grad_weights: $grad_weights,
            grad_logits: $grad_logits
        })
    };
}
#[cfg_attr(not(feature = "cuda"), allow(unused_imports))] // used by the CUDA wrappers
pub(crate) use topk_gating_backward_lens;

/// The single validation of top-k gating, replay and backward (every backend): the
/// config, and the buffers of the pass: `logits` and `grad_logits`
/// `[num_tokens, num_experts]`, `expert_bias [num_experts]`, `weights`, `indices` and
/// `grad_weights [num_tokens, topk]`. The values of the bias (finite) and of given
/// indices are checked where the host can read them ([`topk_gating_into`],
/// [`topk_gating_replay_into`], [`topk_gating_backward_into`]).
pub(crate) fn validate_topk_gating(
    cfg: &TopkGatingConfig,
    num_tokens: usize,
    num_experts: usize,
    lens: TopkGatingLens,
) -> Result<()> {
    cfg.validate(num_experts, None)?;
    let logits = |arg, got| check_logits(OP, arg, got, num_tokens, num_experts);
    let tk = |arg, got| check_tk(arg, got, num_tokens, cfg.topk);
    match lens {
        TopkGatingLens::Forward {
            logits: z,
            expert_bias,
            weights,
            indices,
        } => {
            if let Some(len) = expert_bias {
                check_bias_len(num_experts, len)?;
            }
            logits("logits", z)?;
            tk("weights", weights)?;
            tk("indices", indices)
        }
        TopkGatingLens::Replay {
            logits: z,
            indices,
            weights,
        } => {
            logits("logits", z)?;
            tk("indices", indices)?;
            tk("weights", weights)
        }
        TopkGatingLens::Backward {
            logits: z,
            indices,
            grad_weights,
            grad_logits,
        } => {
            logits("logits", z)?;
            tk("indices", indices)?;
            tk("grad_weights", grad_weights)?;
            logits("grad_logits", grad_logits)
        }
    }
}

/// Outputs of [`topk_gating`].
#[derive(Debug, Clone, PartialEq)]
pub struct TopkGatingOutput {
    /// `[num_tokens, topk]` routing weights (`f32`).
    pub weights: Array2<f32>,
    /// `[num_tokens, topk]` expert indices, by descending selection score.
    pub indices: Array2<i32>,
}

/// Top-k gating into caller-owned buffers.
///
/// `logits [num_tokens, num_experts]` row-major, `expert_bias [num_experts]`,
/// outputs `weights [num_tokens, topk]` and `indices [num_tokens, topk]`.
///
/// # Errors
/// Everything [`TopkGatingConfig::validate`] rejects, and [`Error::Shape`] for any
/// buffer of the wrong length.
pub fn topk_gating_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
    weights: &mut [f32],
    indices: &mut [i32],
) -> Result<()> {
    let lens = topk_gating_lens!(logits, expert_bias.map(<[f32]>::len), weights, indices);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    if let Some(b) = expert_bias {
        check_bias_values(b)?;
    }
    cpu::topk_gating::forward(
        logits,
        num_tokens,
        num_experts,
        expert_bias,
        cfg,
        weights,
        indices,
    );
    Ok(())
}

/// Top-k gating of `logits [num_tokens, num_experts]`.
///
/// ```
/// use moe_router::{topk_gating, ScoreFunction, TopkGatingConfig};
/// let logits = ndarray::array![[0.0f32, 2.0, 1.0, 2.0]];
/// // Sigmoid scores, renormalised (DeepSeek-V3 style), scaled by 2.5.
/// let cfg = TopkGatingConfig::new(2).score_function(ScoreFunction::Sigmoid).normalize(true).scaling_factor(2.5);
/// let out = topk_gating(logits.view(), None, &cfg).unwrap();
/// assert_eq!(out.indices.row(0).to_vec(), vec![1, 3]); // tie at 2.0: lower index first
/// assert!((out.weights.row(0).sum() - 2.5).abs() < 1e-6);
/// ```
///
/// # Errors
/// As [`topk_gating_into`]; [`Error::Layout`] for a non-standard-layout view.
pub fn topk_gating<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    expert_bias: Option<ArrayView1<'_, f32>>,
    cfg: &TopkGatingConfig,
) -> Result<TopkGatingOutput> {
    let (t, e) = logits.dim();
    let z = as_rows(OP, "logits", &logits)?;
    let bias = match &expert_bias {
        Some(b) => Some(as_vec(OP, "expert_bias", b)?),
        None => None,
    };
    cfg.validate(e, bias)?;
    let mut w = Array2::<f32>::zeros((t, cfg.topk));
    let mut i = Array2::<i32>::zeros((t, cfg.topk));
    cpu::topk_gating::forward(
        z,
        t,
        e,
        bias,
        cfg,
        w.as_slice_mut().expect("fresh array is contiguous"),
        i.as_slice_mut().expect("fresh array is contiguous"),
    );
    Ok(TopkGatingOutput {
        weights: w,
        indices: i,
    })
}

/// Routing replay into a caller-owned buffer: the weights `[num_tokens, topk]` for
/// given `indices [num_tokens, topk]`, exactly as if they had been selected (bias,
/// noise, groups and masking play no part: they only affect selection).
///
/// # Errors
/// As [`topk_gating_into`], plus [`Error::InvalidArgument`] for an index outside
/// `[0, num_experts)` or repeated within a token.
pub fn topk_gating_replay_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    indices: &[i32],
    cfg: &TopkGatingConfig,
    weights: &mut [f32],
) -> Result<()> {
    let lens = topk_gating_replay_lens!(logits, indices, weights);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    check_given_indices(indices, num_tokens, num_experts, cfg.topk)?;
    cpu::topk_gating::replay(logits, num_tokens, num_experts, indices, cfg, weights);
    Ok(())
}

/// Routing replay: weights `[num_tokens, topk]` for recorded `indices`.
///
/// # Errors
/// As [`topk_gating_replay_into`].
pub fn topk_gating_replay<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    indices: ArrayView2<'_, i32>,
    cfg: &TopkGatingConfig,
) -> Result<Array2<f32>> {
    let (t, e) = logits.dim();
    let z = as_rows(OP, "logits", &logits)?;
    let idx = as_rows(OP, "indices", &indices)?;
    if indices.dim() != (t, cfg.topk) {
        return Err(Error::shape(
            OP,
            "indices",
            format!("[num_tokens, topk] = [{t}, {}]", cfg.topk),
            format!("{:?}", indices.shape()),
        ));
    }
    let mut w = Array2::<f32>::zeros((t, cfg.topk));
    topk_gating_replay_into(
        z,
        t,
        e,
        idx,
        cfg,
        w.as_slice_mut().expect("fresh array is contiguous"),
    )?;
    Ok(w)
}

/// Backward of top-k gating (and of replay) into a caller-owned buffer:
/// `grad_weights [num_tokens, topk] → grad_logits [num_tokens, num_experts]`.
///
/// Exact for every mode: the softmax Jacobian over all experts (`pre_softmax`) or
/// over the k selected, `σ' = σ(1-σ)`, through the renormalisation and scaling.
/// Selection has no gradient; the bias, noise and masking do not enter. Recomputes
/// the scores from `logits` rather than storing `[T, E]` intermediates.
///
/// # Errors
/// As [`topk_gating_replay_into`], plus [`Error::Shape`] for `grad_weights` or
/// `grad_logits` of the wrong length.
pub fn topk_gating_backward_into<T: RouterFloat>(
    logits: &[T],
    num_tokens: usize,
    num_experts: usize,
    indices: &[i32],
    grad_weights: &[f32],
    cfg: &TopkGatingConfig,
    grad_logits: &mut [T],
) -> Result<()> {
    let lens = topk_gating_backward_lens!(logits, indices, grad_weights, grad_logits);
    validate_topk_gating(cfg, num_tokens, num_experts, lens)?;
    check_given_indices(indices, num_tokens, num_experts, cfg.topk)?;
    cpu::topk_gating::backward(
        logits,
        num_tokens,
        num_experts,
        indices,
        grad_weights,
        cfg,
        grad_logits,
    );
    Ok(())
}

/// Backward of top-k gating: `grad_logits [num_tokens, num_experts]` in the logits'
/// dtype.
///
/// # Errors
/// As [`topk_gating_backward_into`].
pub fn topk_gating_backward<T: RouterFloat>(
    logits: ArrayView2<'_, T>,
    indices: ArrayView2<'_, i32>,
    grad_weights: ArrayView2<'_, f32>,
    cfg: &TopkGatingConfig,
) -> Result<Array2<T>> {
    let (t, e) = logits.dim();
    let z = as_rows(OP, "logits", &logits)?;
    let idx = as_rows(OP, "indices", &indices)?;
    let gw = as_rows(OP, "grad_weights", &grad_weights)?;
    let mut g = Array2::<T>::default((t, e));
    topk_gating_backward_into(
        z,
        t,
        e,
        idx,
        gw,
        cfg,
        g.as_slice_mut().expect("fresh array is contiguous"),
    )?;
    Ok(g)
}
