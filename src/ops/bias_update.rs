//! Aux-loss-free load balancing (DeepSeek-V3): the expert-bias update.
//!
//! The bias `b [num_experts]` is added to the selection scores of top-k gating (it
//! changes which experts are chosen, never the weights). After each step, experts
//! that got more than their share of tokens are pushed down and the others up:
//! `b_e ← b_e + rate · sign(mean(c) − c_e)`. In data-parallel training the counts
//! are all-reduced across ranks first (the Python layer does this).

use crate::cpu;
use crate::error::{Error, Result};
use crate::ops::check_len;

const OP: &str = "update_expert_bias";

/// The single validation of [`update_expert_bias`] (every backend): `bias`
/// non-empty, `counts` of the same length, `rate` finite. The values of `counts`
/// (`>= 0`) are checked where the host can read them ([`update_expert_bias`]).
pub(crate) fn validate_update_expert_bias(
    bias_len: usize,
    counts_len: usize,
    rate: f32,
) -> Result<()> {
    if bias_len == 0 {
        return Err(Error::invalid(
            OP,
            "bias",
            "an empty slice",
            "bias must have num_experts >= 1 entries",
        ));
    }
    check_len(
        OP,
        "counts",
        counts_len,
        bias_len,
        format_args!("[num_experts] = [{bias_len}] (the length of `bias`)"),
    )?;
    if !rate.is_finite() {
        return Err(Error::invalid(
            OP,
            "rate",
            rate,
            "the bias update rate must be finite",
        ));
    }
    Ok(())
}

/// Aux-loss-free balancing step, in place: `b_e ← b_e + rate · sign(mean(c) − c_e)`
/// for every expert `e`, with `sign(0) = 0` (an expert exactly at the mean keeps its
/// bias).
///
/// `bias [num_experts]` is the expert bias (f32), `counts [num_experts]` the number
/// of assignments each expert received this step (`i64`: summed over ranks and
/// micro-batches they can exceed `i32`). The comparison with the mean is exact (done
/// in integers as `sign(Σ_i c_i − E · c_e)`), so it agrees with a float64
/// `mean(c) − c_e` whenever that is exact, and stays right for counts beyond 2^53.
///
/// # Errors
/// [`Error::InvalidArgument`] if `bias` is empty, `rate` is not finite, or a count is
/// negative; [`Error::Shape`] if `counts.len() != bias.len()`. On error `bias` is
/// unchanged.
///
/// ```
/// use moe_router::update_expert_bias;
///
/// let mut bias = [0.0f32, 0.0, 0.0, 0.5];
/// // mean count 2: expert 0 is under-loaded, 2 over-loaded, 1 and 3 at the mean.
/// update_expert_bias(&mut bias, &[1, 2, 3, 2], 0.001).unwrap();
/// assert_eq!(bias, [0.001, 0.0, -0.001, 0.5]);
/// ```
pub fn update_expert_bias(bias: &mut [f32], counts: &[i64], rate: f32) -> Result<()> {
    validate_update_expert_bias(bias.len(), counts.len(), rate)?;
    if let Some((e, &c)) = counts.iter().enumerate().find(|(_, &c)| c < 0) {
        return Err(Error::invalid(
            OP,
            "counts",
            format_args!("{c} at expert {e}"),
            "token counts must be >= 0",
        ));
    }
    cpu::bias_update::update_expert_bias(bias, counts, rate);
    Ok(())
}
