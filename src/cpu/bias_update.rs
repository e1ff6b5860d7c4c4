//! CPU reference for the aux-loss-free expert-bias update (DeepSeek-V3).

/// `b_e += rate · sign(mean(c) − c_e)` for every expert, with `sign(0) = 0`.
///
/// The sign is computed exactly in integers as `sign(Σ_i c_i − E · c_e)` (the same
/// as comparing `c_e` with the exact mean; no rounding even for counts beyond
/// 2^53). The update is `b + rate`, `b − rate` or `b` unchanged, in f32.
/// Assumes validated input (equal lengths, counts `>= 0`).
pub fn update_expert_bias(bias: &mut [f32], counts: &[i64], rate: f32) {
    let num_experts = counts.len() as i128;
    let total: i128 = counts.iter().map(|&c| c as i128).sum();
    for (b, &c) in bias.iter_mut().zip(counts) {
        match (total - num_experts * c as i128).signum() {
            1 => *b += rate,
            -1 => *b -= rate,
            _ => {}
        }
    }
}
