//! Expert capacity: how many assignments each expert may keep (Megatron's
//! `get_capacity`).

use crate::error::{Error, Result};
use crate::ops::MAX_I32_INDEX;

const OP: &str = "capacity";

/// How the per-expert capacity is derived from the batch size.
///
/// `capacity = ceil((T * k / E) * capacity_factor)` in `f64`, exactly as written,
/// then `max(capacity, min_capacity)`, then rounded up to a multiple of
/// `capacity_multiple` when that is set. See [`capacity`].
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityConfig {
    /// Multiplier on the balanced load `T * k / E`; finite and `> 0`
    /// (Switch uses 1.0 to 1.25 in training, 2.0 in evaluation).
    pub capacity_factor: f64,
    /// Lower bound on the capacity (DeepSpeed's `min_capacity`); default 0.
    pub min_capacity: usize,
    /// Round the capacity up to a multiple of this (for example 8 or 16 for
    /// tensor-core friendly expert GEMMs); default `None`. Must be `>= 1` when set.
    pub capacity_multiple: Option<usize>,
}

impl CapacityConfig {
    /// A config with the given capacity factor, no minimum and no rounding.
    pub fn new(capacity_factor: f64) -> Self {
        CapacityConfig {
            capacity_factor,
            min_capacity: 0,
            capacity_multiple: None,
        }
    }

    /// Set the lower bound on the capacity.
    pub fn min_capacity(mut self, n: usize) -> Self {
        self.min_capacity = n;
        self
    }

    /// Round the capacity up to a multiple of `m` (`m >= 1`).
    pub fn capacity_multiple(mut self, m: usize) -> Self {
        self.capacity_multiple = Some(m);
        self
    }

    /// Check the config on its own: `capacity_factor` finite and `> 0`,
    /// `capacity_multiple >= 1` when set.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming `capacity_factor` or `capacity_multiple`.
    pub fn validate(&self) -> Result<()> {
        let cf = self.capacity_factor;
        if !(cf.is_finite() && cf > 0.0) {
            return Err(Error::invalid(
                OP,
                "capacity_factor",
                cf,
                "the capacity factor must be finite and > 0 (for example 1.0 or 1.25)",
            ));
        }
        if self.capacity_multiple == Some(0) {
            return Err(Error::invalid(
                OP,
                "capacity_multiple",
                0,
                "the capacity multiple must be >= 1 (or None for no rounding)",
            ));
        }
        Ok(())
    }
}

/// The per-expert capacity for `num_tokens` tokens routed to `topk` of
/// `num_experts` experts.
///
/// `capacity = ceil((T * k / E) * capacity_factor)`, evaluated in `f64` exactly in
/// that order (as Megatron-LM's `get_capacity(num_tokens=T*k, ...)`; so for example
/// `T*k = 50, E = 11, capacity_factor = 1.1` gives `ceil(5.000000000000001) = 6`, and
/// `T*k = 25, E = 5, capacity_factor = 2.2` gives `ceil(5.0 * 2.2) = 11`, where
/// `25 * 2.2 / 5` would give 12), then `max(capacity, min_capacity)`, then rounded
/// up to a multiple of `capacity_multiple` if set. `T = 0` is valid (capacity
/// `max(0, min_capacity)` rounded). In expert-parallel or global mode pass as
/// `num_tokens` the token count the capacity covers.
///
/// # Errors
/// - [`Error::InvalidArgument`]: `capacity_factor <= 0` or non-finite,
///   `num_experts == 0`, `topk == 0` or `topk > num_experts`,
///   `capacity_multiple == Some(0)`;
/// - [`Error::Overflow`]: the capacity exceeds `i32::MAX` (slots are `i32`).
///
/// # Examples
/// ```
/// use moe_router::{capacity, CapacityConfig};
///
/// // 4096 tokens, top-2 of 8 experts, capacity factor 1.25: 4096*2/8*1.25 = 1280.
/// assert_eq!(capacity(4096, 8, 2, &CapacityConfig::new(1.25)).unwrap(), 1280);
/// // 10 tokens, top-1 of 3 experts: ceil(3.33) = 4, at least 6, a multiple of 4.
/// let cfg = CapacityConfig::new(1.0).min_capacity(6).capacity_multiple(4);
/// assert_eq!(capacity(10, 3, 1, &cfg).unwrap(), 8);
/// ```
pub fn capacity(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    cfg: &CapacityConfig,
) -> Result<usize> {
    cfg.validate()?;
    if num_experts == 0 {
        return Err(Error::invalid(
            OP,
            "num_experts",
            0,
            "the number of experts must be >= 1",
        ));
    }
    if topk == 0 || topk > num_experts {
        // A token routes to `topk` distinct experts: topk > E has no routing, and the
        // formula would silently give a capacity for it.
        return Err(Error::invalid(
            OP,
            "topk",
            topk,
            format!("topk must be >= 1 and topk must be <= num_experts = {num_experts}"),
        ));
    }
    // The message names the arguments that made the capacity overflow.
    let overflow = |what: &'static str, value: u128| Error::Overflow {
        op: OP,
        what,
        value,
        max: i32::MAX as i64,
    };
    let raw =
        crate::cpu::capacity::capacity_f64(num_tokens, num_experts, topk, cfg.capacity_factor);
    // `raw` is >= 0 and not NaN (validated factor); `+inf` only if f64 overflowed.
    if raw > MAX_I32_INDEX as f64 {
        let value = if raw.is_finite() {
            raw as u128
        } else {
            u128::MAX
        };
        return Err(overflow(
            "capacity from num_tokens * topk / num_experts * capacity_factor",
            value,
        ));
    }
    let mut cap = (raw as usize).max(cfg.min_capacity);
    if let Some(m) = cfg.capacity_multiple {
        let rounded = (cap as u128).div_ceil(m as u128) * m as u128;
        if rounded > MAX_I32_INDEX as u128 {
            return Err(overflow(
                "capacity rounded up to capacity_multiple",
                rounded,
            ));
        }
        cap = rounded as usize;
    }
    if cap > MAX_I32_INDEX {
        return Err(overflow("capacity raised to min_capacity", cap as u128));
    }
    Ok(cap)
}
