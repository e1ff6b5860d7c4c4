//! Router statistics: hand-computed entropy / logsumexp / imbalance, padding,
//! non-finite counting and strict mode, an independent float64 reference for every
//! dtype, thread independence and every bad input.

mod common;

use common::{assert_close, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{
    router_stats, router_stats_view, Error, RouterFloat, RouterLogits, RouterStats,
    RouterStatsConfig,
};
use ndarray::{Array1, Array2, ShapeBuilder};
use proptest::prelude::*;

fn cfg() -> RouterStatsConfig {
    RouterStatsConfig::new()
}

/// Naive float64 statistics, written from the definitions of `docs/semantics.md` §11.
struct RefStats {
    valid: usize,
    selected: Vec<i64>,
    kept: Vec<i64>,
    dropped: u64,
    max_violation: f64,
    mean_entropy: f64,
    mean_lse: f64,
    max_lse: f64,
    nonfinite: u64,
}

#[allow(clippy::too_many_arguments)]
fn reference(
    z: &[f64],
    t_n: usize,
    e_n: usize,
    idx: &[i32],
    k: usize,
    slots: Option<&[i32]>,
    pad: Option<&[bool]>,
) -> RefStats {
    let mut r = RefStats {
        valid: 0,
        selected: vec![0; e_n],
        kept: vec![0; e_n],
        dropped: 0,
        max_violation: 0.0,
        mean_entropy: 0.0,
        mean_lse: 0.0,
        max_lse: f64::NEG_INFINITY,
        nonfinite: 0,
    };
    for t in 0..t_n {
        if pad.is_some_and(|p| p[t]) {
            continue;
        }
        r.valid += 1;
        let row = &z[t * e_n..(t + 1) * e_n];
        r.nonfinite += row.iter().filter(|v| !v.is_finite()).count() as u64;
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|&v| (v - m).exp()).sum::<f64>().ln();
        let h: f64 = row
            .iter()
            .map(|&v| {
                let p = (v - lse).exp();
                if p == 0.0 {
                    0.0
                } else {
                    -p * p.ln()
                }
            })
            .sum();
        r.mean_entropy += h;
        r.mean_lse += lse;
        r.max_lse = r.max_lse.max(lse);
        for j in 0..k {
            let e = idx[t * k + j];
            if e < 0 {
                continue;
            }
            r.selected[e as usize] += 1;
            if let Some(s) = slots {
                if s[t * k + j] >= 0 {
                    r.kept[e as usize] += 1;
                } else {
                    r.dropped += 1;
                }
            }
        }
    }
    if r.valid > 0 {
        r.mean_entropy /= r.valid as f64;
        r.mean_lse /= r.valid as f64;
    } else {
        r.max_lse = 0.0;
    }
    let total: i64 = r.selected.iter().sum();
    if total > 0 {
        let mean = total as f64 / e_n as f64;
        r.max_violation = *r.selected.iter().max().unwrap() as f64 / mean - 1.0;
    }
    r
}

fn check_against(got: &RouterStats, want: &RefStats, slots: bool, what: &str) {
    assert_eq!(got.num_tokens, want.valid, "{what}: num_tokens");
    assert_eq!(
        got.selected_counts, want.selected,
        "{what}: selected_counts"
    );
    assert_eq!(
        got.kept_counts,
        slots.then(|| want.kept.clone()),
        "{what}: kept_counts"
    );
    assert_eq!(got.dropped, want.dropped, "{what}: dropped");
    assert_eq!(got.nonfinite_logits, want.nonfinite, "{what}: nonfinite");
    assert_close(
        &[got.max_violation as f64],
        &[want.max_violation],
        1e-6,
        1e-7,
        &format!("{what}: max_violation"),
    );
    assert_close(
        &[got.mean_entropy as f64],
        &[want.mean_entropy],
        1e-5,
        1e-5,
        &format!("{what}: mean_entropy"),
    );
    assert_close(
        &[got.mean_lse as f64],
        &[want.mean_lse],
        1e-5,
        1e-5,
        &format!("{what}: mean_lse"),
    );
    assert_close(
        &[got.max_lse as f64],
        &[want.max_lse],
        1e-6,
        1e-5,
        &format!("{what}: max_lse"),
    );
}

/// Random routing for `t` tokens: distinct experts, some unrouted; slots -1 with
/// probability 0.3 (always -1 where unrouted); padding with probability 0.2.
fn random_case(
    rng: &mut Rng,
    t: usize,
    e_n: usize,
    k: usize,
) -> (Vec<f32>, Vec<i32>, Vec<i32>, Vec<bool>) {
    let z = rng.normal_vec(t * e_n, 3.0);
    let mut idx = Vec::new();
    let mut slots = Vec::new();
    let mut perm: Vec<i32> = (0..e_n as i32).collect();
    for _ in 0..t {
        for j in 0..k {
            let r = j + rng.below(e_n - j);
            perm.swap(j, r);
            let e = if rng.uniform() < 0.1 { -1 } else { perm[j] };
            idx.push(e);
            slots.push(if e < 0 || rng.uniform() < 0.3 {
                -1
            } else {
                rng.below(50) as i32
            });
        }
    }
    let pad = (0..t).map(|_| rng.uniform() < 0.2).collect();
    (z, idx, slots, pad)
}

// ---------------------------------------------------------------- hand cases

#[test]
fn hand_case_three_experts() {
    let ninf = f32::NEG_INFINITY;
    #[rustfmt::skip]
    let z = [
        0.0f32, 0.0, 0.0,          // uniform: H = ln 3, lse = ln 3
        3.0f32.ln(), 0.0, ninf,    // p = (3/4, 1/4, 0): lse = ln 4; the -inf is counted
        f32::NAN, 5.0, 5.0,        // padding: ignored, its NaN not counted
    ];
    let idx = [0, 1, 0, -1, 2, 1];
    let slots = [0, -1, 1, -1, 0, 0];
    let pad = [false, false, true];
    let s = router_stats(
        RouterLogits::new(&z, 3, 3).padding_mask(Some(&pad)),
        &idx,
        2,
        Some(&slots),
        &cfg(),
    )
    .unwrap();
    assert_eq!(s.num_tokens, 2);
    assert_eq!(s.selected_counts, vec![2, 1, 0]);
    assert_eq!(s.kept_counts, Some(vec![2, 0, 0]));
    assert_eq!(
        s.dropped, 1,
        "token 0 choice 1 was dropped; the unrouted entry is not a drop"
    );
    assert_eq!(s.nonfinite_logits, 1);
    // mean count 1, max 2.
    assert_eq!(s.max_violation, 1.0);
    let h1 = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
    let ln3 = 3f64.ln();
    let ln4 = 4f64.ln();
    assert_close(
        &[s.mean_entropy as f64],
        &[(ln3 + h1) / 2.0],
        1e-6,
        0.0,
        "mean_entropy",
    );
    assert_close(
        &[s.mean_lse as f64],
        &[(ln3 + ln4) / 2.0],
        1e-6,
        0.0,
        "mean_lse",
    );
    assert_close(&[s.max_lse as f64], &[ln4], 1e-6, 0.0, "max_lse");
    // Without slots: no kept counts, no drops.
    let s = router_stats(
        RouterLogits::new(&z, 3, 3).padding_mask(Some(&pad)),
        &idx,
        2,
        None,
        &cfg(),
    )
    .unwrap();
    assert_eq!(s.kept_counts, None);
    assert_eq!(s.dropped, 0);
    assert_eq!(s.selected_counts, vec![2, 1, 0]);
}

#[test]
fn hand_case_balance() {
    // Four tokens, top-1 over two experts, perfectly balanced: violation 0;
    // one-hot logits of gap ln 3 give H = -(3/4 ln 3/4 + 1/4 ln 1/4) on every row.
    let l = 3.0f32.ln();
    let z = [l, 0.0, 0.0, l, l, 0.0, 0.0, l];
    let s = router_stats(RouterLogits::new(&z, 4, 2), &[0, 1, 0, 1], 1, None, &cfg()).unwrap();
    assert_eq!(s.max_violation, 0.0);
    let h = -(0.75f64 * 0.75f64.ln() + 0.25 * 0.25f64.ln());
    assert_close(&[s.mean_entropy as f64], &[h], 1e-6, 0.0, "entropy");
    assert_close(
        &[s.mean_lse as f64, s.max_lse as f64],
        &[4f64.ln(), 4f64.ln()],
        1e-6,
        0.0,
        "lse",
    );
    // Everything on expert 0 of 2: max / mean - 1 = 4 / 2 - 1 = 1 (= E - 1).
    let s = router_stats(RouterLogits::new(&z, 4, 2), &[0, 0, 0, 0], 1, None, &cfg()).unwrap();
    assert_eq!(s.max_violation, 1.0);
    // Nothing routed: violation 0.
    let s = router_stats(
        RouterLogits::new(&z, 4, 2),
        &[-1, -1, -1, -1],
        1,
        None,
        &cfg(),
    )
    .unwrap();
    assert_eq!(s.max_violation, 0.0);
    assert_eq!(s.selected_counts, vec![0, 0]);
}

#[test]
fn large_logits_are_stable() {
    // |z| far beyond exp's range: lse = 1000 + ln 2, H = ln 2.
    let z = [1000.0f32, 1000.0, -1000.0, -1000.0];
    let s = router_stats(RouterLogits::new(&z, 2, 2), &[0, 1], 1, None, &cfg()).unwrap();
    assert_close(
        &[s.max_lse as f64],
        &[1000.0 + 2f64.ln()],
        1e-6,
        0.0,
        "max_lse",
    );
    assert_close(&[s.mean_lse as f64], &[2f64.ln()], 0.0, 1e-4, "mean_lse");
    assert_close(&[s.mean_entropy as f64], &[2f64.ln()], 1e-6, 0.0, "entropy");
    // A near-one-hot row: entropy tiny but positive, not lost to rounding of p.
    let z = [0.0f32, -30.0];
    let s = router_stats(RouterLogits::new(&z, 1, 2), &[0], 1, None, &cfg()).unwrap();
    let p = (-30f64).exp() / (1.0 + (-30f64).exp());
    let h = -(p * p.ln() + (1.0 - p) * (1.0 - p).ln());
    assert_close(
        &[s.mean_entropy as f64],
        &[h],
        1e-4,
        0.0,
        "near one-hot entropy",
    );
}

#[test]
fn empty_batch_gives_zeros() {
    let s = router_stats::<f32>(
        RouterLogits::new(&[], 0, 4).padding_mask(Some(&[])),
        &[],
        2,
        Some(&[]),
        &cfg(),
    )
    .unwrap();
    assert_eq!(
        s,
        RouterStats {
            num_tokens: 0,
            selected_counts: vec![0; 4],
            kept_counts: Some(vec![0; 4]),
            dropped: 0,
            max_violation: 0.0,
            mean_entropy: 0.0,
            mean_lse: 0.0,
            max_lse: 0.0,
            nonfinite_logits: 0,
        }
    );
    // All padding: the same.
    let s = router_stats(
        RouterLogits::new(&[1.0f32, 2.0], 1, 2).padding_mask(Some(&[true])),
        &[1],
        1,
        None,
        &cfg(),
    )
    .unwrap();
    assert_eq!(
        (s.num_tokens, s.mean_lse, s.max_lse, s.selected_counts),
        (0, 0.0, 0.0, vec![0, 0])
    );
}

#[test]
fn padding_mask_excludes_tokens() {
    let mut rng = Rng::new(5);
    let (t, e_n, k) = (40, 6, 2);
    let (z, idx, slots, pad) = random_case(&mut rng, t, e_n, k);
    let s = router_stats(
        RouterLogits::new(&z, t, e_n).padding_mask(Some(&pad)),
        &idx,
        k,
        Some(&slots),
        &cfg(),
    )
    .unwrap();
    // Same as the stats of the valid tokens alone.
    let keep: Vec<usize> = (0..t).filter(|&i| !pad[i]).collect();
    let z2: Vec<f32> = keep
        .iter()
        .flat_map(|&i| z[i * e_n..(i + 1) * e_n].to_vec())
        .collect();
    let i2: Vec<i32> = keep
        .iter()
        .flat_map(|&i| idx[i * k..(i + 1) * k].to_vec())
        .collect();
    let s2: Vec<i32> = keep
        .iter()
        .flat_map(|&i| slots[i * k..(i + 1) * k].to_vec())
        .collect();
    let only = router_stats(
        RouterLogits::new(&z2, keep.len(), e_n),
        &i2,
        k,
        Some(&s2),
        &cfg(),
    )
    .unwrap();
    assert_eq!(s, only);
    assert!(s.num_tokens < t);
}

// ---------------------------------------------------------------- non-finite logits

#[test]
fn nonfinite_logits_counted_and_strict() {
    let z = [f32::NAN, 0.0, f32::INFINITY, 0.0, 1.0, 2.0];
    let s = router_stats(RouterLogits::new(&z, 3, 2), &[0, 1, 0], 1, None, &cfg()).unwrap();
    assert_eq!(s.nonfinite_logits, 2);
    assert!(
        s.mean_entropy.is_nan() && s.mean_lse.is_nan() && s.max_lse.is_nan(),
        "{s:?}"
    );
    // Counts do not depend on the logits.
    assert_eq!(s.selected_counts, vec![2, 1]);
    let err = router_stats(
        RouterLogits::new(&z, 3, 2),
        &[0, 1, 0],
        1,
        None,
        &cfg().strict(true),
    )
    .unwrap_err();
    assert_eq!(
        err,
        Error::NonFinite {
            op: "router_stats",
            arg: "logits",
            count: 2
        }
    );
    assert!(
        err.to_string().contains("logits") && err.to_string().contains('2'),
        "{err}"
    );
    // Padding hides them from the count and from strict mode.
    let pad = [true, true, false];
    let s = router_stats(
        RouterLogits::new(&z, 3, 2).padding_mask(Some(&pad)),
        &[0, 1, 0],
        1,
        None,
        &cfg().strict(true),
    )
    .unwrap();
    assert_eq!(s.nonfinite_logits, 0);
    assert!(s.mean_lse.is_finite());
}

#[test]
fn plus_inf_logit_gives_inf_lse() {
    // logsumexp of a row whose max is +inf is +inf (as torch.logsumexp), not NaN; its
    // entropy has no value (NaN). Two +inf in a row, or +inf next to -inf: the same.
    let inf = f32::INFINITY;
    for row in [[inf, 0.0], [inf, inf], [f32::NEG_INFINITY, inf]] {
        let z = [row[0], row[1], 1.0, 1.0];
        let s = router_stats(RouterLogits::new(&z, 2, 2), &[0, 1], 1, None, &cfg()).unwrap();
        assert_eq!(s.mean_lse, f32::INFINITY, "{row:?}: {s:?}");
        assert_eq!(s.max_lse, f32::INFINITY, "{row:?}: {s:?}");
        assert!(s.mean_entropy.is_nan(), "{row:?}: {s:?}");
        // Padding the +inf row leaves the finite row: lse = 1 + ln 2.
        let s = router_stats(
            RouterLogits::new(&z, 2, 2).padding_mask(Some(&[true, false])),
            &[0, 1],
            1,
            None,
            &cfg(),
        )
        .unwrap();
        assert_close(&[s.mean_lse as f64], &[1.0 + 2f64.ln()], 1e-6, 0.0, "lse");
    }
    // A NaN row still makes both NaN, whatever the other rows hold.
    let s = router_stats(
        RouterLogits::new(&[inf, 0.0, f32::NAN, 0.0], 2, 2),
        &[0, 1],
        1,
        None,
        &cfg(),
    )
    .unwrap();
    assert!(s.mean_lse.is_nan() && s.max_lse.is_nan(), "{s:?}");
}

#[test]
fn masked_minus_inf_logits_keep_stats_finite() {
    // A -inf next to finite logits (a masked expert) is counted but contributes
    // 0·log 0 = 0: the row is a uniform over the other two experts.
    let z = [f32::NEG_INFINITY, 1.0, 1.0];
    let s = router_stats(RouterLogits::new(&z, 1, 3), &[1], 1, None, &cfg()).unwrap();
    assert_eq!(s.nonfinite_logits, 1);
    assert_close(&[s.mean_entropy as f64], &[2f64.ln()], 1e-6, 0.0, "entropy");
    assert_close(&[s.max_lse as f64], &[1.0 + 2f64.ln()], 1e-6, 0.0, "lse");
    assert!(router_stats(
        RouterLogits::new(&z, 1, 3),
        &[1],
        1,
        None,
        &cfg().strict(true)
    )
    .is_err());
    // A row of only -inf has no distribution: NaN, as documented.
    let s = router_stats(
        RouterLogits::new(&[f32::NEG_INFINITY; 2], 1, 2),
        &[0],
        1,
        None,
        &cfg(),
    )
    .unwrap();
    assert_eq!(s.nonfinite_logits, 2);
    assert!(s.mean_lse.is_nan() && s.mean_entropy.is_nan());
    let s = router_stats(
        RouterLogits::new(&[f32::NEG_INFINITY], 1, 1),
        &[0],
        1,
        None,
        &cfg(),
    )
    .unwrap();
    assert!(s.mean_lse.is_nan() && s.mean_entropy.is_nan());
}

// ---------------------------------------------------------------- reference, dtypes, threads

fn run_ref_check<T: RouterFloat>(
    seed: u64,
    t: usize,
    e_n: usize,
    k: usize,
    use_slots: bool,
    use_pad: bool,
) {
    let mut rng = Rng::new(seed);
    let (z, idx, slots, pad) = random_case(&mut rng, t, e_n, k);
    let zt: Vec<T> = z.iter().map(|&v| T::from_f32(v)).collect();
    let z64: Vec<f64> = zt.iter().map(|v| v.to_f32() as f64).collect();
    let sl = use_slots.then_some(slots.as_slice());
    let pd = use_pad.then_some(pad.as_slice());
    let got = router_stats(
        RouterLogits::new(&zt, t, e_n).padding_mask(pd),
        &idx,
        k,
        sl,
        &cfg(),
    )
    .unwrap();
    let want = reference(&z64, t, e_n, &idx, k, sl, pd);
    check_against(&got, &want, use_slots, T::DTYPE.as_str());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    #[test]
    fn matches_f64_reference(
        seed in any::<u64>(), t in 0usize..600, e_n in 1usize..24, kf in 0.0f64..1.0,
        use_slots in any::<bool>(), use_pad in any::<bool>(),
    ) {
        let k = 1 + ((e_n - 1) as f64 * kf) as usize;
        run_ref_check::<f32>(seed, t, e_n, k, use_slots, use_pad);
        run_ref_check::<f16>(seed, t, e_n, k, use_slots, use_pad);
        run_ref_check::<bf16>(seed, t, e_n, k, use_slots, use_pad);
    }
}

#[test]
fn thread_count_independent_bitwise() {
    let mut rng = Rng::new(9);
    let (t, e_n, k) = (3000, 16, 2);
    let (z, idx, slots, pad) = random_case(&mut rng, t, e_n, k);
    let run = || {
        let s = router_stats(
            RouterLogits::new(&z, t, e_n).padding_mask(Some(&pad)),
            &idx,
            k,
            Some(&slots),
            &cfg(),
        )
        .unwrap();
        let bits = [s.max_violation, s.mean_entropy, s.mean_lse, s.max_lse].map(f32::to_bits);
        (s, bits)
    };
    let a = with_threads(1, run);
    let b = with_threads(3, run);
    assert_eq!(a, b);
}

#[test]
fn view_form_matches_slices() {
    let mut rng = Rng::new(10);
    let (t, e_n, k) = (300, 7, 3);
    let (z, idx, slots, pad) = random_case(&mut rng, t, e_n, k);
    let flat = router_stats(
        RouterLogits::new(&z, t, e_n).padding_mask(Some(&pad)),
        &idx,
        k,
        Some(&slots),
        &cfg(),
    )
    .unwrap();
    let za = Array2::from_shape_vec((t, e_n), z).unwrap();
    let ia = Array2::from_shape_vec((t, k), idx).unwrap();
    let sa = Array2::from_shape_vec((t, k), slots).unwrap();
    let pa = Array1::from_vec(pad);
    let v = router_stats_view(
        za.view(),
        ia.view(),
        Some(sa.view()),
        Some(pa.view()),
        &cfg(),
    )
    .unwrap();
    assert_eq!(v, flat);
}

// ---------------------------------------------------------------- bad inputs

fn stats_err(
    z: &[f32],
    t: usize,
    e_n: usize,
    idx: &[i32],
    k: usize,
    slots: Option<&[i32]>,
    pad: Option<&[bool]>,
) -> Error {
    router_stats(
        RouterLogits::new(z, t, e_n).padding_mask(pad),
        idx,
        k,
        slots,
        &cfg(),
    )
    .unwrap_err()
}

fn assert_invalid(err: Error, arg: &str) {
    assert!(
        matches!(&err, Error::InvalidArgument { arg: a, .. } if *a == arg),
        "{arg}: {err}"
    );
    assert!(err.to_string().contains(arg), "{err}");
}

fn assert_shape(err: Error, arg: &str) {
    assert!(
        matches!(&err, Error::Shape { arg: a, .. } if *a == arg),
        "{arg}: {err}"
    );
    assert!(err.to_string().contains(arg), "{err}");
}

#[test]
fn bad_sizes() {
    let z = [0.0f32; 8];
    assert_invalid(stats_err(&[], 2, 0, &[], 1, None, None), "num_experts");
    assert_invalid(stats_err(&z, 2, 4, &[], 0, None, None), "topk");
    assert_invalid(stats_err(&z, 2, 4, &[0; 10], 5, None, None), "topk");
    assert_shape(stats_err(&z[..7], 2, 4, &[0, 1], 1, None, None), "logits");
    assert_shape(stats_err(&z, 2, 4, &[0, 1, 2], 1, None, None), "indices");
    assert_shape(stats_err(&z, 2, 4, &[0, 1], 1, Some(&[0]), None), "slots");
    assert_shape(
        stats_err(&z, 2, 4, &[0, 1], 1, None, Some(&[false; 3])),
        "padding_mask",
    );
    let err = stats_err(&z, 1 << 30, 4, &[0, 1], 1, None, None);
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
}

#[test]
fn bad_indices_and_slots() {
    let z = [0.0f32; 8];
    for (idx, needle) in [([0, 4], "4"), ([-2, 1], "-2"), ([2, 2], "repeated")] {
        let err = stats_err(&z[..4], 1, 4, &idx, 2, None, None);
        assert_invalid(err.clone(), "indices");
        assert!(err.to_string().contains(needle), "{err}");
    }
    // -1 (unrouted) is fine, twice too.
    router_stats(
        RouterLogits::new(&z, 2, 4),
        &[-1, -1],
        1,
        Some(&[-1, -1]),
        &cfg(),
    )
    .unwrap();
    let err = stats_err(&z, 2, 4, &[0, 1], 1, Some(&[0, -2]), None);
    assert_invalid(err.clone(), "slots");
    assert!(err.to_string().contains("-2"), "{err}");
    // A slot for an unrouted assignment.
    assert_invalid(
        stats_err(&z, 2, 4, &[0, -1], 1, Some(&[0, 3]), None),
        "slots",
    );
}

#[test]
fn view_bad_shapes_and_layout() {
    let z = Array2::<f32>::zeros((3, 4));
    let err = router_stats_view(
        z.view(),
        Array2::<i32>::zeros((2, 1)).view(),
        None,
        None,
        &cfg(),
    )
    .unwrap_err();
    assert_shape(err, "indices");
    let idx = Array2::<i32>::zeros((3, 1));
    let err = router_stats_view(
        z.view(),
        idx.view(),
        Some(Array2::<i32>::zeros((3, 2)).view()),
        None,
        &cfg(),
    )
    .unwrap_err();
    assert_shape(err, "slots");
    let err = router_stats_view(
        z.view(),
        idx.view(),
        None,
        Some(Array1::from_elem(2, false).view()),
        &cfg(),
    )
    .unwrap_err();
    assert_shape(err, "padding_mask");
    let zf = Array2::<f32>::zeros((3, 4).f());
    let err = router_stats_view(zf.view(), idx.view(), None, None, &cfg()).unwrap_err();
    assert!(matches!(err, Error::Layout { arg: "logits", .. }), "{err}");
    // A strided (non-contiguous) padding mask.
    let pm = Array1::from_elem(6, false);
    let err = router_stats_view(
        z.view(),
        idx.view(),
        None,
        Some(pm.slice(ndarray::s![..;2])),
        &cfg(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Layout {
                arg: "padding_mask",
                ..
            }
        ),
        "{err}"
    );
}
