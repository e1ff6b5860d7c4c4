//! CPU reference for expert masking and assignment dropout.

use crate::ops::DropoutConfig;
use crate::philox::{uniform, Domain};

/// Expert-masking mask of token `t` into `masked [num_experts]` (`true` = masked).
///
/// Rule (mirrored by the kernels): candidate `e` is masked when
/// `u = uniform(seed, offset, ExpertMasking, t * E + e) < rate`. If that leaves fewer
/// than `topk` unmasked candidates, the masked candidates with the largest `u`
/// (ties: lower expert index) are unmasked until exactly `topk` remain.
pub fn expert_mask_row(
    t: usize,
    num_experts: usize,
    topk: usize,
    cfg: &DropoutConfig,
    masked: &mut [bool],
) {
    let base = (t * num_experts) as u64;
    let mut unmasked = 0usize;
    for (e, m) in masked.iter_mut().enumerate().take(num_experts) {
        let u = uniform(cfg.seed, cfg.offset, Domain::ExpertMasking, base + e as u64);
        *m = u < cfg.rate;
        unmasked += usize::from(!*m);
    }
    while unmasked < topk {
        // Unmask the masked candidate with the largest u (ties: lower index).
        let mut best: Option<(f32, usize)> = None;
        for (e, &m) in masked.iter().enumerate().take(num_experts) {
            if m {
                let u = uniform(cfg.seed, cfg.offset, Domain::ExpertMasking, base + e as u64);
                if best.is_none_or(|(bu, _)| u > bu) {
                    best = Some((u, e));
                }
            }
        }
        match best {
            Some((_, e)) => {
                masked[e] = false;
                unmasked += 1;
            }
            None => break,
        }
    }
}
