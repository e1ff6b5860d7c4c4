//! Bindings of `topk_gating_into`, `topk_gating_replay_into`, `topk_gating_backward_into`.

use pyo3::prelude::*;

use crate::common::{float_dispatch, score_function};
use crate::error::{to_py_err, value_error};
use crate::tensor::{check_bufs, mul, run, Buf, RawBuf};
use moe_router::{DropoutConfig, GroupLimit, RouterFloat, SelectionNoise, TopkGatingConfig};

const OP: &str = "topk_gating";

/// The gating config from the flat options the Python layer passes. `noise_std == 0`
/// means no noise and `expert_mask_rate == 0` no expert masking (both use `seed` /
/// `offset`, in separate generator domains); any other value, valid or not, is handed
/// to the core, whose validation names it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gating_config(
    topk: usize,
    score: &str,
    pre_softmax: bool,
    normalize: bool,
    num_groups: Option<usize>,
    group_topk: Option<usize>,
    scaling_factor: f32,
    noise_std: f32,
    expert_mask_rate: f32,
    seed: u64,
    offset: u64,
) -> PyResult<TopkGatingConfig> {
    let mut cfg = TopkGatingConfig::new(topk);
    cfg.score_function = score_function(OP, score)?;
    cfg.pre_softmax = pre_softmax;
    cfg.normalize = normalize;
    cfg.group_limit = match (num_groups, group_topk) {
        (None, None) => None,
        (Some(num_groups), Some(group_topk)) => Some(GroupLimit { num_groups, group_topk }),
        (g, k) => {
            return Err(value_error(
                OP,
                format_args!("invalid `num_groups` = {g:?}, `group_topk` = {k:?}: give both (group-limited routing) or neither"),
            ))
        }
    };
    cfg.scaling_factor = scaling_factor;
    cfg.noise = (noise_std != 0.0).then_some(SelectionNoise {
        std: noise_std,
        seed,
        offset,
    });
    cfg.expert_masking =
        (expert_mask_rate != 0.0).then(|| DropoutConfig::new(expert_mask_rate, seed, offset));
    Ok(cfg)
}

/// Top-k gating: selects `topk` experts per token and writes their routing weights.
///
/// Args: `dtype` of `logits` ("f32" | "f16" | "bf16"); `logits` `[num_tokens, num_experts]`;
/// `expert_bias` `[num_experts]` f32 or None; options as in `moe_router.topk_gating`;
/// outputs `weights` `[num_tokens, topk]` f32 and `indices` `[num_tokens, topk]` i32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, expert_bias, topk, score_function, pre_softmax, normalize, num_groups, group_topk, scaling_factor, noise_std, expert_mask_rate, seed, offset, weights, indices))]
pub(crate) fn topk_gating(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<RawBuf>,
    topk: usize,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    num_groups: Option<usize>,
    group_topk: Option<usize>,
    scaling_factor: f32,
    noise_std: f32,
    expert_mask_rate: f32,
    seed: u64,
    offset: u64,
    weights: RawBuf,
    indices: RawBuf,
) -> PyResult<()> {
    let cfg = gating_config(
        topk,
        score_function,
        pre_softmax,
        normalize,
        num_groups,
        group_topk,
        scaling_factor,
        noise_std,
        expert_mask_rate,
        seed,
        offset,
    )?;
    float_dispatch!(
        OP,
        "logits",
        dtype,
        forward(
            py,
            logits,
            num_tokens,
            num_experts,
            expert_bias,
            &cfg,
            weights,
            indices
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn forward<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    expert_bias: Option<RawBuf>,
    cfg: &TopkGatingConfig,
    weights: RawBuf,
    indices: RawBuf,
) -> PyResult<()> {
    let logits = Buf::<T>::input("logits", logits);
    let bias = expert_bias.map(|b| Buf::<f32>::input("expert_bias", b));
    let weights = Buf::<f32>::output("weights", weights);
    let indices = Buf::<i32>::output("indices", indices);
    let tk = mul(OP, "num_tokens * topk", num_tokens, cfg.topk)?;
    logits.expect_len(
        OP,
        mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    if let Some(b) = &bias {
        b.expect_len(
            OP,
            num_experts,
            format_args!("[num_experts] = [{num_experts}]"),
        )?;
    }
    weights.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    indices.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    let mut spans = vec![logits.span(), weights.span(), indices.span()];
    spans.extend(bias.as_ref().map(Buf::span));
    check_bufs(OP, &spans)?;
    // SAFETY: `check_bufs` accepted all buffers (non-null, aligned, sized, outputs
    // disjoint from everything); `ops.py` passes contiguous CPU tensors of these dtypes
    // with these element counts, keeps them alive during the call, and allocated the
    // outputs fresh, so nothing else touches them while Rust runs.
    let (logits, bias, weights, indices) = unsafe {
        (
            logits.as_slice(),
            bias.as_ref().map(|b| b.as_slice()),
            weights.as_mut_slice(),
            indices.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::topk_gating_into::<T>(
            logits,
            num_tokens,
            num_experts,
            bias,
            cfg,
            weights,
            indices,
        )
        .map_err(to_py_err)
    })
}

/// Routing replay: the weights of given `indices` `[num_tokens, topk]` (i32), computed
/// exactly as if they had been selected. Output `weights` `[num_tokens, topk]` f32.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, indices, topk, score_function, pre_softmax, normalize, scaling_factor, weights))]
pub(crate) fn topk_gating_replay(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: f32,
    weights: RawBuf,
) -> PyResult<()> {
    let cfg = gating_config(
        topk,
        score_function,
        pre_softmax,
        normalize,
        None,
        None,
        scaling_factor,
        0.0,
        0.0,
        0,
        0,
    )?;
    float_dispatch!(
        OP,
        "logits",
        dtype,
        replay(py, logits, num_tokens, num_experts, indices, &cfg, weights)
    )
}

fn replay<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    cfg: &TopkGatingConfig,
    weights: RawBuf,
) -> PyResult<()> {
    const OP: &str = "topk_gating_replay";
    let logits = Buf::<T>::input("logits", logits);
    let indices = Buf::<i32>::input("indices", indices);
    let weights = Buf::<f32>::output("weights", weights);
    let tk = mul(OP, "num_tokens * topk", num_tokens, cfg.topk)?;
    logits.expect_len(
        OP,
        mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    indices.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    weights.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    check_bufs(OP, &[logits.span(), indices.span(), weights.span()])?;
    // SAFETY: as in `forward`: checked buffers, live contiguous CPU tensors of these
    // dtypes and sizes, the output fresh and exclusive.
    let (logits, indices, weights) = unsafe {
        (
            logits.as_slice(),
            indices.as_slice(),
            weights.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::topk_gating_replay_into::<T>(
            logits,
            num_tokens,
            num_experts,
            indices,
            cfg,
            weights,
        )
        .map_err(to_py_err)
    })
}

/// Backward of top-k gating (and of replay): `grad_weights` `[num_tokens, topk]` f32 →
/// `grad_logits` `[num_tokens, num_experts]` (dtype of `logits`).
#[pyfunction]
#[allow(clippy::too_many_arguments)]
#[pyo3(signature = (dtype, logits, num_tokens, num_experts, indices, topk, grad_weights, score_function, pre_softmax, normalize, scaling_factor, grad_logits))]
pub(crate) fn topk_gating_backward(
    py: Python<'_>,
    dtype: &str,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    topk: usize,
    grad_weights: RawBuf,
    score_function: &str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: f32,
    grad_logits: RawBuf,
) -> PyResult<()> {
    let cfg = gating_config(
        topk,
        score_function,
        pre_softmax,
        normalize,
        None,
        None,
        scaling_factor,
        0.0,
        0.0,
        0,
        0,
    )?;
    float_dispatch!(
        OP,
        "logits",
        dtype,
        backward(
            py,
            logits,
            num_tokens,
            num_experts,
            indices,
            grad_weights,
            &cfg,
            grad_logits
        )
    )
}

#[allow(clippy::too_many_arguments)]
fn backward<T: RouterFloat>(
    py: Python<'_>,
    logits: RawBuf,
    num_tokens: usize,
    num_experts: usize,
    indices: RawBuf,
    grad_weights: RawBuf,
    cfg: &TopkGatingConfig,
    grad_logits: RawBuf,
) -> PyResult<()> {
    const OP: &str = "topk_gating_backward";
    let logits = Buf::<T>::input("logits", logits);
    let indices = Buf::<i32>::input("indices", indices);
    let grad_weights = Buf::<f32>::input("grad_weights", grad_weights);
    let grad_logits = Buf::<T>::output("grad_logits", grad_logits);
    let te = mul(OP, "num_tokens * num_experts", num_tokens, num_experts)?;
    let tk = mul(OP, "num_tokens * topk", num_tokens, cfg.topk)?;
    logits.expect_len(
        OP,
        te,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    indices.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    grad_weights.expect_len(
        OP,
        tk,
        format_args!("[num_tokens, topk] = [{num_tokens}, {}]", cfg.topk),
    )?;
    grad_logits.expect_len(
        OP,
        te,
        format_args!("[num_tokens, num_experts] = [{num_tokens}, {num_experts}]"),
    )?;
    check_bufs(
        OP,
        &[
            logits.span(),
            indices.span(),
            grad_weights.span(),
            grad_logits.span(),
        ],
    )?;
    // SAFETY: as in `forward`: checked buffers, live contiguous CPU tensors of these
    // dtypes and sizes, the output fresh and exclusive.
    let (logits, indices, grad_weights, grad_logits) = unsafe {
        (
            logits.as_slice(),
            indices.as_slice(),
            grad_weights.as_slice(),
            grad_logits.as_mut_slice(),
        )
    };
    run(py, OP, || {
        moe_router::topk_gating_backward_into::<T>(
            logits,
            num_tokens,
            num_experts,
            indices,
            grad_weights,
            cfg,
            grad_logits,
        )
        .map_err(to_py_err)
    })
}

/// Register this file's functions.
pub(crate) fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(topk_gating, m)?)?;
    m.add_function(wrap_pyfunction!(topk_gating_replay, m)?)?;
    m.add_function(wrap_pyfunction!(topk_gating_backward, m)?)?;
    Ok(())
}
