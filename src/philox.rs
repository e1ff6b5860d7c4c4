//! Philox-4x32-10, the counter-based generator behind every random choice in the crate.
//!
//! Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11); the same
//! generator as Random123's `philox4x32_10` and PyTorch's CUDA generator. Being
//! counter-based, the bits of element `i` depend only on `(seed, offset, domain, i)`:
//! CPU and GPU produce the same bits, whatever the thread count or launch shape.
//!
//! # Stream layout (the contract shared with the CUDA kernels)
//! - key     = `[seed as u32, (seed >> 32) as u32]`
//! - counter = `[index as u32, ((index >> 32) as u32 & 0x00FF_FFFF) | (domain << 24),
//!   offset as u32, (offset >> 32) as u32]`
//!
//! `index` is the element's own flat coordinate (for example `t * num_experts + e`);
//! `domain` separates the uses (see [`Domain`]), so the same `(seed, offset)` given
//! to two features never yields correlated draws.

/// What a random stream is used for. Part of the counter, so uses never collide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum Domain {
    /// Gaussian selection noise of top-k gating, index `t * E + e`.
    SelectionNoise = 1,
    /// Random drop priority of dispatch, index `t`.
    RandomDrop = 2,
    /// Expert masking before selection, index `t * E + e`.
    ExpertMasking = 3,
    /// Assignment dropout after gating, index `t * k + j`.
    AssignmentDropout = 4,
}

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// One Philox-4x32 block with 10 rounds: the raw bijection of Random123.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The four 32-bit words for element `index` of stream `(seed, offset, domain)`.
#[inline]
pub fn random_u32x4(seed: u64, offset: u64, domain: Domain, index: u64) -> [u32; 4] {
    let counter = [
        index as u32,
        ((index >> 32) as u32 & 0x00FF_FFFF) | ((domain as u32) << 24),
        offset as u32,
        (offset >> 32) as u32,
    ];
    philox4x32_10(counter, [seed as u32, (seed >> 32) as u32])
}

/// Uniform in `[0, 1)` from the top 24 bits of `x`: exact in `f32`, 2^24 levels.
#[inline(always)]
pub fn uniform_f32(x: u32) -> f32 {
    (x >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The uniform draw `u ∈ [0, 1)` of element `index` (first word of its block).
#[inline]
pub fn uniform(seed: u64, offset: u64, domain: Domain, index: u64) -> f32 {
    uniform_f32(random_u32x4(seed, offset, domain, index)[0])
}

/// A standard normal draw for element `index`, by Box–Muller on the block's first
/// two words: `u1 = ((x0 >> 8) + 1) / 2^24 ∈ (0, 1]`, `u2 = (x1 >> 8) / 2^24`,
/// `n = sqrt(-2 ln u1) · cos(2π u2)`, evaluated in `f64` and rounded once to `f32`
/// (so the kernels' double-precision libm gives the same `f32` in all but
/// pathological double-rounding cases).
#[inline]
pub fn normal(seed: u64, offset: u64, domain: Domain, index: u64) -> f32 {
    let x = random_u32x4(seed, offset, domain, index);
    let u1 = ((x[0] >> 8) as f64 + 1.0) * (1.0 / 16_777_216.0);
    let u2 = (x[1] >> 8) as f64 * (1.0 / 16_777_216.0);
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    // Known-answer vectors from Random123's kat_vectors (philox4x32_10).
    #[test]
    fn random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
                [0xa4093822, 0x299f31d0]
            ),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn domains_and_offsets_give_different_streams() {
        let a = random_u32x4(7, 0, Domain::SelectionNoise, 3);
        let b = random_u32x4(7, 0, Domain::RandomDrop, 3);
        let c = random_u32x4(7, 1, Domain::SelectionNoise, 3);
        let d = random_u32x4(7, 0, Domain::SelectionNoise, 4);
        assert_ne!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
        assert_eq!(a, random_u32x4(7, 0, Domain::SelectionNoise, 3));
    }

    #[test]
    fn uniform_and_normal_moments() {
        let n = 200_000u64;
        let (mut su, mut sn, mut sn2) = (0f64, 0f64, 0f64);
        for i in 0..n {
            let u = uniform(42, 5, Domain::RandomDrop, i);
            assert!((0.0..1.0).contains(&u));
            su += u as f64;
            let g = normal(42, 5, Domain::SelectionNoise, i) as f64;
            assert!(g.is_finite());
            sn += g;
            sn2 += g * g;
        }
        let n = n as f64;
        assert!((su / n - 0.5).abs() < 0.005, "uniform mean {}", su / n);
        assert!((sn / n).abs() < 0.01, "normal mean {}", sn / n);
        assert!((sn2 / n - 1.0).abs() < 0.02, "normal variance {}", sn2 / n);
    }
}
