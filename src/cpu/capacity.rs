//! The capacity formula (host arithmetic; the same on every backend).

/// `ceil((T * k / E) * capacity_factor)` in `f64`, evaluated exactly in that order
/// (Megatron-LM's `get_capacity` with `num_tokens = T * k`), before the minimum and
/// the rounding to a multiple. `T * k` is formed exactly (in `u128`) and converted
/// once, so for every `T * k <= 2^53` the quotient rounds exactly as Python's
/// `int / int`. Assumes `num_experts >= 1`; returns `+inf` only if the product
/// overflows `f64`.
#[inline]
pub fn capacity_f64(
    num_tokens: usize,
    num_experts: usize,
    topk: usize,
    capacity_factor: f64,
) -> f64 {
    let assignments = (num_tokens as u128) * (topk as u128);
    (((assignments as f64) / (num_experts as f64)) * capacity_factor).ceil()
}
