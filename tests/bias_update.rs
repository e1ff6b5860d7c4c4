//! Aux-loss-free balancing (DeepSeek-V3): `b_e += rate * sign(mean(c) - c_e)`.

mod common;

use common::Rng;
use moe_router::{update_expert_bias, Error};
use proptest::prelude::*;

#[test]
fn hand_case_with_sign_zero() {
    // mean(c) = (1 + 2 + 3 + 2) / 4 = 2: expert 0 below (+), 2 above (-), 1 and 3 equal (0).
    let mut bias = [0.5f32, 0.5, 0.5, -0.25];
    update_expert_bias(&mut bias, &[1, 2, 3, 2], 0.125).unwrap();
    assert_eq!(bias, [0.625, 0.5, 0.375, -0.25]);
}

#[test]
fn hand_case_fractional_mean() {
    // mean = 1/3: the expert with 1 is above it, the two with 0 below.
    let mut bias = [0.0f32; 3];
    update_expert_bias(&mut bias, &[0, 1, 0], 1.0).unwrap();
    assert_eq!(bias, [1.0, -1.0, 1.0]);
}

#[test]
fn balanced_and_empty_counts_leave_bias() {
    let mut bias = [0.1f32, -0.2, 0.3];
    update_expert_bias(&mut bias, &[5, 5, 5], 0.01).unwrap();
    assert_eq!(bias, [0.1, -0.2, 0.3]);
    update_expert_bias(&mut bias, &[0, 0, 0], 0.01).unwrap();
    assert_eq!(bias, [0.1, -0.2, 0.3]);
    // A single expert is always at the mean.
    let mut one = [0.7f32];
    update_expert_bias(&mut one, &[123], 0.5).unwrap();
    assert_eq!(one, [0.7]);
    // Rate 0 changes nothing.
    update_expert_bias(&mut bias, &[1, 9, 2], 0.0).unwrap();
    assert_eq!(bias, [0.1, -0.2, 0.3]);
}

#[test]
fn exact_beyond_f64_integers() {
    // sum = 2^54 + 1, mean = 2^53 + 0.5: c_0 = 2^53 + 1 is above, c_1 = 2^53 below.
    // (In f64, 2^53 + 1 rounds to 2^53 and the mean to 2^53, which would give 0.)
    let big = 1i64 << 53;
    let mut bias = [0.0f32, 0.0];
    update_expert_bias(&mut bias, &[big + 1, big], 0.5).unwrap();
    assert_eq!(bias, [-0.5, 0.5]);
    // Counts near i64::MAX do not overflow.
    let mut bias = [0.0f32; 3];
    update_expert_bias(&mut bias, &[i64::MAX, i64::MAX, 0], 1.0).unwrap();
    assert_eq!(bias, [-1.0, -1.0, 1.0]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Against the definition with the mean in f64 (counts small enough to be exact).
    #[test]
    fn matches_definition(seed in any::<u64>(), e_n in 1usize..40, rate in 0.0f32..0.1) {
        let mut rng = Rng::new(seed);
        let counts: Vec<i64> = (0..e_n).map(|_| rng.below(20) as i64).collect();
        let bias0: Vec<f32> = rng.normal_vec(e_n, 0.1);
        let mut bias = bias0.clone();
        update_expert_bias(&mut bias, &counts, rate).unwrap();
        let mean = counts.iter().sum::<i64>() as f64 / e_n as f64;
        for e in 0..e_n {
            let d = mean - counts[e] as f64;
            let want = if d > 0.0 { bias0[e] + rate } else if d < 0.0 { bias0[e] - rate } else { bias0[e] };
            prop_assert_eq!(bias[e], want, "expert {}", e);
        }
    }
}

#[test]
fn bad_inputs_leave_bias_unchanged() {
    let mut bias = [0.25f32, 0.5];
    let err = update_expert_bias(&mut bias, &[1, 2, 3], 0.1).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "counts", .. }), "{err}");
    assert!(err.to_string().contains("counts"), "{err}");
    let err = update_expert_bias(&mut bias, &[1], 0.1).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "counts", .. }), "{err}");
    for rate in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let err = update_expert_bias(&mut bias, &[1, 2], rate).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { arg: "rate", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("rate"), "{err}");
    }
    let err = update_expert_bias(&mut bias, &[3, -1], 0.1).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "counts", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("-1"), "{err}");
    assert_eq!(bias, [0.25, 0.5]);
    let err = update_expert_bias(&mut [], &[], 0.1).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "bias", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("num_experts"), "{err}");
}
