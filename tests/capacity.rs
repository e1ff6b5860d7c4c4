//! `capacity`: Megatron's `get_capacity` formula, the minimum, the rounding, errors.
mod common;

use moe_router::{capacity, CapacityConfig, Error};
use proptest::prelude::*;

fn cap(t: usize, e: usize, k: usize, cfg: &CapacityConfig) -> usize {
    capacity(t, e, k, cfg).unwrap()
}

#[test]
fn megatron_examples() {
    // get_capacity(num_tokens = T*k, num_experts, capacity_factor) = ceil(T*k/E * cf).
    assert_eq!(cap(4096, 8, 2, &CapacityConfig::new(1.0)), 1024);
    assert_eq!(cap(4096, 8, 2, &CapacityConfig::new(1.25)), 1280);
    assert_eq!(cap(4096, 64, 8, &CapacityConfig::new(1.0)), 512);
    // 10 / 3 = 3.33.. -> 4
    assert_eq!(cap(10, 3, 1, &CapacityConfig::new(1.0)), 4);
    // 5 * 2 / 4 = 2.5 -> 3
    assert_eq!(cap(5, 4, 2, &CapacityConfig::new(1.0)), 3);
    // 7 * 1 / 2 * 0.5 = 1.75 -> 2
    assert_eq!(cap(7, 2, 1, &CapacityConfig::new(0.5)), 2);
    // exact integer results are not rounded up: 8 / 4 * 1.5 = 3
    assert_eq!(cap(8, 4, 1, &CapacityConfig::new(1.5)), 3);
}

#[test]
fn evaluated_in_f64_exactly_as_written() {
    // Python: math.ceil((25 / 5) * 2.2) == math.ceil(11.0) == 11, whereas the
    // algebraically equal 25 * 2.2 / 5 == 11.000000000000002 would give 12.
    assert_eq!(cap(25, 5, 1, &CapacityConfig::new(2.2)), 11);
    // math.ceil((50 / 11) * 1.1) == math.ceil(5.000000000000001) == 6 (exact: 5).
    assert_eq!(cap(25, 11, 2, &CapacityConfig::new(1.1)), 6);
    // math.ceil((50 / 1) * 1.1) == math.ceil(55.00000000000001) == 56.
    assert_eq!(cap(50, 1, 1, &CapacityConfig::new(1.1)), 56);
    // (10 / 10) * 1.1 = 1.1 -> 2
    assert_eq!(cap(10, 10, 1, &CapacityConfig::new(1.1)), 2);
}

#[test]
fn zero_tokens() {
    assert_eq!(cap(0, 8, 2, &CapacityConfig::new(1.0)), 0);
    assert_eq!(cap(0, 8, 2, &CapacityConfig::new(1.0).min_capacity(4)), 4);
    assert_eq!(
        cap(0, 8, 2, &CapacityConfig::new(1.0).capacity_multiple(8)),
        0
    );
}

#[test]
fn min_capacity() {
    assert_eq!(cap(10, 3, 1, &CapacityConfig::new(1.0).min_capacity(6)), 6);
    assert_eq!(cap(10, 3, 1, &CapacityConfig::new(1.0).min_capacity(4)), 4);
    assert_eq!(cap(10, 3, 1, &CapacityConfig::new(1.0).min_capacity(2)), 4);
    // DeepSpeed's default min_capacity = 4 on a tiny batch
    assert_eq!(cap(2, 8, 1, &CapacityConfig::new(1.0).min_capacity(4)), 4);
}

#[test]
fn capacity_multiple() {
    let base = CapacityConfig::new(1.0);
    assert_eq!(cap(10, 3, 1, &base.clone().capacity_multiple(1)), 4);
    assert_eq!(cap(10, 3, 1, &base.clone().capacity_multiple(4)), 4);
    assert_eq!(cap(10, 3, 1, &base.clone().capacity_multiple(3)), 6);
    assert_eq!(cap(10, 3, 1, &base.clone().capacity_multiple(16)), 16);
    // minimum first, then the rounding: max(4, 6) = 6 -> 8
    assert_eq!(
        cap(10, 3, 1, &base.clone().min_capacity(6).capacity_multiple(4)),
        8
    );
    assert_eq!(
        cap(4096, 8, 2, &CapacityConfig::new(1.1).capacity_multiple(16)),
        1136
    );
}

#[test]
fn bad_capacity_factor() {
    for cf in [0.0, -0.0, -1.0, f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let err = capacity(16, 4, 2, &CapacityConfig::new(cf)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    arg: "capacity_factor",
                    ..
                }
            ),
            "{cf}: {err}"
        );
        assert!(err.to_string().contains("capacity_factor"), "{err}");
    }
}

#[test]
fn bad_num_experts_topk_multiple() {
    let cfg = CapacityConfig::new(1.0);
    let err = capacity(16, 0, 2, &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "num_experts",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("num_experts"));
    let err = capacity(16, 4, 0, &cfg).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "topk", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("topk"));
    let err = capacity(16, 4, 2, &cfg.clone().capacity_multiple(0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidArgument {
                arg: "capacity_multiple",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("capacity_multiple"));
}

#[test]
fn topk_above_num_experts_is_an_error() {
    // Regression: capacity(16, 8, 9) returned ceil(16 * 9 / 8) = 18 for a routing
    // that cannot exist (a token's topk experts are distinct).
    let cfg = CapacityConfig::new(1.0);
    for (e, k) in [(8usize, 9usize), (1, 2), (4, usize::MAX)] {
        let err = capacity(16, e, k, &cfg).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    op: "capacity",
                    arg: "topk",
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("capacity: invalid `topk`"), "{msg}");
        assert!(msg.contains("topk must be <= num_experts"), "{msg}");
        assert!(msg.contains(&format!("num_experts = {e}")), "{msg}");
    }
    // topk = num_experts is valid: every token goes to every expert.
    assert_eq!(cap(16, 8, 8, &cfg), 16);
    assert_eq!(cap(3, 1, 1, &cfg), 3);
}

#[test]
fn overflow() {
    let max = i32::MAX as usize;
    // exactly i32::MAX is fine
    assert_eq!(cap(max, 1, 1, &CapacityConfig::new(1.0)), max);
    let err = capacity(max + 1, 1, 1, &CapacityConfig::new(1.0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Overflow {
                what: "capacity from num_tokens * topk / num_experts * capacity_factor",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("capacity_factor"));
    let err = capacity(1 << 20, 1 << 12, 1 << 12, &CapacityConfig::new(4096.0)).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    let err = capacity(
        usize::MAX,
        usize::MAX,
        usize::MAX,
        &CapacityConfig::new(1e300),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    let err = capacity(1, 1, 1, &CapacityConfig::new(1.0).min_capacity(max + 1)).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    let err = capacity(max, 1, 1, &CapacityConfig::new(1.0).capacity_multiple(2)).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn formula_properties(t in 0usize..100_000, e in 1usize..512, k in 1usize..16,
                          cf in 0.01f64..8.0, min in 0usize..64, mult in proptest::option::of(1usize..32)) {
        let mut cfg = CapacityConfig::new(cf).min_capacity(min);
        if let Some(m) = mult {
            cfg = cfg.capacity_multiple(m);
        }
        let k = k.min(e);
        let c = capacity(t, e, k, &cfg).unwrap();
        // Python: max(math.ceil(T * k / E * cf), min), rounded up
        let base = (((t * k) as f64 / e as f64) * cf).ceil() as usize;
        let base = base.max(min);
        let m = mult.unwrap_or(1);
        prop_assert_eq!(c, base.div_ceil(m) * m);
        prop_assert!(c >= min && c % m == 0);
        // at least the balanced load times the factor (up to f64 rounding)
        prop_assert!(c as f64 >= (t * k) as f64 * cf / e as f64 - 1e-6);
    }
}
