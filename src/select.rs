//! Total order for selection scores, shared by every op that ranks (and mirrored
//! bit for bit by the CUDA kernels in `cuda/common.cuh`).
//!
//! The tie rule of `docs/semantics.md` §1.3: among equal scores the lower index ranks
//! first; a NaN score ranks below every finite score and below `-inf`;
//! `-0.0 == +0.0`. Both facts are folded
//! into one `u64` key, larger = better, so ranking is plain integer comparison:
//! `key = (score_key(q) << 32) | (u32::MAX - index)`.

/// Order-preserving map of a score to `u32`: NaN → 0 (lowest), `-0.0` and `+0.0`
/// map to the same key, `-inf` → 0x007F_FFFF, `+inf` → 0xFF80_0000.
#[inline(always)]
pub fn score_key(q: f32) -> u32 {
    if q.is_nan() {
        return 0;
    }
    let bits = (q + 0.0).to_bits(); // -0.0 + 0.0 == +0.0
    if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

/// The packed ranking key of `(score, index)`: larger ranks first.
#[inline(always)]
pub fn rank_key(q: f32, index: usize) -> u64 {
    ((score_key(q) as u64) << 32) | (u32::MAX - index as u32) as u64
}

/// The index encoded in a [`rank_key`].
#[inline(always)]
pub fn key_index(key: u64) -> usize {
    (u32::MAX - key as u32) as usize
}

/// Reorder `keys` so that its first `k` entries are the `k` largest, in descending
/// order. `k <= keys.len()`.
#[inline]
pub fn top_k_desc(keys: &mut [u64], k: usize) {
    debug_assert!(k <= keys.len());
    if k == 0 {
        return;
    }
    if k < keys.len() {
        keys.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
    }
    keys[..k].sort_unstable_by(|a, b| b.cmp(a));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_order_matches_spec() {
        let vals = [
            f32::NAN,
            f32::NEG_INFINITY,
            -3.0,
            -1e-30,
            0.0,
            1e-30,
            2.0,
            f32::INFINITY,
        ];
        for w in vals.windows(2) {
            assert!(score_key(w[0]) < score_key(w[1]), "{:?}", w);
        }
        assert_eq!(score_key(-0.0), score_key(0.0));
        assert_eq!(score_key(-f32::NAN), 0);
        // equal scores: lower index first
        assert!(rank_key(1.0, 2) > rank_key(1.0, 5));
        assert_eq!(key_index(rank_key(0.5, 77)), 77);
    }

    #[test]
    fn top_k_desc_orders() {
        let qs = [0.5f32, 0.9, 0.5, f32::NAN, -1.0, 0.9];
        let mut keys: Vec<u64> = qs
            .iter()
            .enumerate()
            .map(|(i, &q)| rank_key(q, i))
            .collect();
        top_k_desc(&mut keys, 4);
        let idx: Vec<usize> = keys[..4].iter().map(|&k| key_index(k)).collect();
        assert_eq!(idx, vec![1, 5, 0, 2]);
    }
}
