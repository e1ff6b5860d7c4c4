//! Router z-loss: hand-computed cases, an independent f64 reference, finite-difference
//! gradients, half-precision inputs, large logits, thread independence, bad input.

mod common;

use common::{assert_close, finite_diff, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{z_loss, z_loss_backward, z_loss_backward_into, Error, RouterFloat, RouterLogits};
use ndarray::Array2;
use proptest::prelude::*;

/// `coeff · mean over valid tokens of logsumexp(z_t)²` in f64.
fn ref_z_loss(z: &[f64], t_n: usize, e_n: usize, mask: Option<&[bool]>, coeff: f64) -> f64 {
    let mut sum = 0.0;
    let mut n = 0;
    for t in 0..t_n {
        if mask.is_some_and(|m| m[t]) {
            continue;
        }
        let row = &z[t * e_n..(t + 1) * e_n];
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        sum += lse * lse;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        coeff * sum / n as f64
    }
}

fn to64<T: RouterFloat>(z: &[T]) -> Vec<f64> {
    z.iter().map(|v| v.to_f32() as f64).collect()
}

fn random_mask(rng: &mut Rng, t_n: usize, rate: f64) -> Vec<bool> {
    (0..t_n).map(|_| rng.uniform() < rate).collect()
}

/// Token 0: `z = [0, 0, 0, ln 5]`, `Σ exp = 8`, `lse = 3 ln 2`; token 1: `z = [0; 4]`,
/// `lse = 2 ln 2`. `L = coeff · ((3 ln 2)² + (2 ln 2)²) / 2 = coeff · 6.5 (ln 2)²`.
#[test]
fn hand_computed() {
    let l2 = std::f64::consts::LN_2;
    let z = [0.0f32, 0.0, 0.0, 5f32.ln(), 0.0, 0.0, 0.0, 0.0];
    let out = z_loss(&z, 2, 4, None, 0.1).unwrap();
    assert_eq!(out.valid_tokens, 2);
    let want = 0.1 * 6.5 * l2 * l2;
    assert!(
        ((out.loss as f64) - want).abs() < 1e-6 * want,
        "{} vs {want}",
        out.loss
    );

    // token 0 padded: L = coeff · (2 ln 2)²
    let out = z_loss(&z, 2, 4, Some(&[true, false]), 0.1).unwrap();
    assert_eq!(out.valid_tokens, 1);
    let want = 0.1 * 4.0 * l2 * l2;
    assert!(
        ((out.loss as f64) - want).abs() < 1e-6 * want,
        "{} vs {want}",
        out.loss
    );

    // gradient: coeff · 2 · lse_t · softmax(z_t) / T_valid; token 0 has
    // softmax = [1, 1, 1, 5] / 8, token 1 uniform [1/4; 4]
    let mut g = vec![0.0f32; 8];
    z_loss_backward_into(RouterLogits::new(&z, 2, 4), 0.1, 1.0, &mut g).unwrap();
    let a = 0.1 * 2.0 * 3.0 * l2 / 2.0;
    let b = 0.1 * 2.0 * 2.0 * l2 / 2.0;
    let want = [
        a / 8.0,
        a / 8.0,
        a / 8.0,
        5.0 * a / 8.0,
        b / 4.0,
        b / 4.0,
        b / 4.0,
        b / 4.0,
    ];
    let got: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 1e-6, 1e-8, "hand grad");

    // with token 0 padded: its gradient is 0, token 1's doubles (T_valid = 1), times grad_loss
    z_loss_backward_into(
        RouterLogits::new(&z, 2, 4).padding_mask(Some(&[true, false])),
        0.1,
        3.0,
        &mut g,
    )
    .unwrap();
    let want = [
        0.0,
        0.0,
        0.0,
        0.0,
        6.0 * b / 4.0,
        6.0 * b / 4.0,
        6.0 * b / 4.0,
        6.0 * b / 4.0,
    ];
    let got: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 1e-6, 1e-8, "hand grad masked");
}

/// `|z| = 1000`: `exp` overflows f32 without the max shift.
/// `[1000, 1000, -1000]`: `lse = 1000 + ln 2`, softmax `[1/2, 1/2, 0]`;
/// `[-1000, -1000, -1000]`: `lse = -1000 + ln 3`, softmax uniform.
#[test]
fn large_logits_are_stable() {
    let z = [1000.0f32, 1000.0, -1000.0, -1000.0, -1000.0, -1000.0];
    let l1 = 1000.0 + std::f64::consts::LN_2;
    let l2 = -1000.0 + 3f64.ln();
    let coeff = 1e-3;
    let want = coeff * (l1 * l1 + l2 * l2) / 2.0;
    let out = z_loss(&z, 2, 3, None, coeff as f32).unwrap();
    assert!(out.loss.is_finite());
    assert!(
        ((out.loss as f64) - want).abs() < 1e-6 * want,
        "{} vs {want}",
        out.loss
    );
    let mut g = vec![0.0f32; 6];
    z_loss_backward_into(RouterLogits::new(&z, 2, 3), coeff as f32, 1.0, &mut g).unwrap();
    let a = coeff * 2.0 * l1 / 2.0;
    let b = coeff * 2.0 * l2 / 2.0;
    let want = [a / 2.0, a / 2.0, 0.0, b / 3.0, b / 3.0, b / 3.0];
    let got: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    assert_close(&got, &want, 1e-6, 1e-8, "large-logit grad");
    // the same in f16 and bf16 (1000 is exact in both)
    let zh: Vec<f16> = z.iter().map(|&v| f16::from_f32(v)).collect();
    let out = z_loss(&zh, 2, 3, None, coeff as f32).unwrap();
    assert!(((out.loss as f64) - coeff * (l1 * l1 + l2 * l2) / 2.0).abs() < 1e-3);
    let zb: Vec<bf16> = z.iter().map(|&v| bf16::from_f32(v)).collect();
    let mut gb = vec![bf16::from_f32(0.0); 6];
    z_loss_backward_into(RouterLogits::new(&zb, 2, 3), coeff as f32, 1.0, &mut gb).unwrap();
    assert_close(&to64(&gb), &want, 4e-3, 1e-8, "bf16 large-logit grad");
}

/// A `+inf` logit: `logsumexp = +inf` (as `torch.logsumexp`), so the z-loss is `+inf`,
/// not NaN (`m + ln Σ exp(z − m)` with `m = +inf` is `inf + ln NaN`). The other rows
/// stay what they were; padding the `+inf` row gives back the finite loss; a NaN
/// logit still gives NaN.
#[test]
fn plus_inf_logit_gives_inf_loss() {
    let inf = f32::INFINITY;
    for row in [
        [inf, 0.0, -1.0],
        [0.0, inf, inf],
        [inf, f32::NEG_INFINITY, 2.0],
    ] {
        let z = [row[0], row[1], row[2], 0.0, 0.0, 0.0];
        let out = z_loss(&z, 2, 3, None, 1e-3).unwrap();
        assert_eq!(out.loss, f32::INFINITY, "{row:?}");
        let zh: Vec<bf16> = z.iter().map(|&v| bf16::from_f32(v)).collect();
        assert_eq!(z_loss(&zh, 2, 3, None, 1e-3).unwrap().loss, f32::INFINITY);
        let zh: Vec<f16> = z.iter().map(|&v| f16::from_f32(v)).collect();
        assert_eq!(z_loss(&zh, 2, 3, None, 1e-3).unwrap().loss, f32::INFINITY);
        // Padding the +inf row: only the zero row, lse = ln 3.
        let out = z_loss(&z, 2, 3, Some(&[true, false]), 1.0).unwrap();
        let l3 = 3f64.ln();
        assert_close(&[out.loss as f64], &[l3 * l3], 1e-6, 0.0, "padded +inf row");
        // The gradient of the padded row is 0; the other row's is finite.
        let mut g = vec![f32::NAN; 6];
        z_loss_backward_into(
            RouterLogits::new(&z, 2, 3).padding_mask(Some(&[true, false])),
            1.0,
            1.0,
            &mut g,
        )
        .unwrap();
        assert_eq!(&g[..3], &[0.0; 3]);
        assert!(g[3..].iter().all(|v| v.is_finite()), "{g:?}");
    }
    // Large finite logits are unchanged by the rule (lse² = 1e38 < f32::MAX); NaN still
    // wins.
    assert!(z_loss(&[1e19f32, 0.0], 1, 2, None, 1.0)
        .unwrap()
        .loss
        .is_finite());
    assert!(z_loss(&[f32::NAN, inf], 1, 2, None, 1.0)
        .unwrap()
        .loss
        .is_nan());
    assert!(z_loss(&[inf, f32::NAN], 1, 2, None, 1.0)
        .unwrap()
        .loss
        .is_nan());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_matches_f64_reference(
        t_n in 0usize..80,
        e_n in 1usize..12,
        masked in any::<bool>(),
        scale in 0.1f64..50.0,
        seed in any::<u64>(),
    ) {
        let mut rng = Rng::new(seed);
        let z = rng.normal_vec(t_n * e_n, scale);
        let mask = random_mask(&mut rng, t_n, 0.3);
        let m = masked.then_some(&mask[..]);
        let out = z_loss(&z, t_n, e_n, m, 0.01).unwrap();
        let want = ref_z_loss(&to64(&z), t_n, e_n, m, 0.01);
        assert_close(&[out.loss as f64], &[want], 1e-5, 1e-8, "z_loss");
        let valid = m.map_or(t_n, |m| m.iter().filter(|&&p| !p).count());
        prop_assert_eq!(out.valid_tokens, valid);
        prop_assert!(out.loss >= 0.0);
    }
}

#[test]
fn gradient_finite_differences() {
    let mut rng = Rng::new(5);
    let (t_n, e_n) = (17, 7);
    let z = rng.normal_vec(t_n * e_n, 3.0);
    let z64 = to64(&z);
    let mask = random_mask(&mut rng, t_n, 0.3);
    for masked in [false, true] {
        let m = masked.then_some(&mask[..]);
        let (coeff, grad_loss) = (0.2f32, -1.3f32);
        let mut g = vec![0.0f32; t_n * e_n];
        z_loss_backward_into(
            RouterLogits::new(&z, t_n, e_n).padding_mask(m),
            coeff,
            grad_loss,
            &mut g,
        )
        .unwrap();
        let fd = finite_diff(&z64, 1e-5, |x| {
            grad_loss as f64 * ref_z_loss(x, t_n, e_n, m, coeff as f64)
        });
        assert_close(&to64(&g), &fd, 1e-3, 1e-5, &format!("grad masked={masked}"));
        if masked {
            for t in (0..t_n).filter(|&t| mask[t]) {
                assert!(
                    g[t * e_n..(t + 1) * e_n].iter().all(|&v| v == 0.0),
                    "padding token {t}"
                );
            }
        }
        let arr = Array2::from_shape_vec((t_n, e_n), z.clone()).unwrap();
        let g2 = z_loss_backward(arr.view(), m, coeff, grad_loss).unwrap();
        assert_eq!(g2.as_slice().unwrap(), &g[..]);
    }
}

fn check_half<T: RouterFloat>(rtol_grad: f64) {
    let mut rng = Rng::new(6);
    let (t_n, e_n) = (30, 9);
    let z: Vec<T> = rng
        .normal_vec(t_n * e_n, 4.0)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let z64 = to64(&z);
    let mask = random_mask(&mut rng, t_n, 0.2);
    let out = z_loss(&z, t_n, e_n, Some(&mask), 0.5).unwrap();
    let want = ref_z_loss(&z64, t_n, e_n, Some(&mask), 0.5);
    assert_close(&[out.loss as f64], &[want], 1e-5, 1e-8, "half z_loss");
    let mut g = vec![T::from_f32(0.0); t_n * e_n];
    z_loss_backward_into(
        RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
        0.5,
        1.0,
        &mut g,
    )
    .unwrap();
    let fd = finite_diff(&z64, 1e-5, |x| ref_z_loss(x, t_n, e_n, Some(&mask), 0.5));
    assert_close(
        &to64(&g),
        &fd,
        rtol_grad,
        1e-6,
        &format!("{:?} grad", T::DTYPE),
    );
}

#[test]
fn f16_inputs_vs_f64_reference() {
    check_half::<f16>(1e-3);
}

#[test]
fn bf16_inputs_vs_f64_reference() {
    check_half::<bf16>(4e-3);
}

#[test]
fn thread_count_independent_bitwise() {
    let mut rng = Rng::new(7);
    let (t_n, e_n) = (3000, 16);
    let z = rng.normal_vec(t_n * e_n, 5.0);
    let mask = random_mask(&mut rng, t_n, 0.1);
    let run = || {
        let out = z_loss(&z, t_n, e_n, Some(&mask), 1e-3).unwrap();
        let mut g = vec![0.0f32; t_n * e_n];
        z_loss_backward_into(
            RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
            1e-3,
            1.0,
            &mut g,
        )
        .unwrap();
        (
            out.loss.to_bits(),
            out.valid_tokens,
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        )
    };
    let one = with_threads(1, run);
    let three = with_threads(3, run);
    assert!(one == three, "results differ between 1 and 3 threads");
}

#[test]
fn empty_and_all_padding() {
    let out = z_loss::<f32>(&[], 0, 5, None, 1.0).unwrap();
    assert_eq!((out.loss, out.valid_tokens), (0.0, 0));
    z_loss_backward_into::<f32>(RouterLogits::new(&[], 0, 5), 1.0, 1.0, &mut []).unwrap();
    let z = [1.0f32, 2.0, 3.0, 4.0];
    let out = z_loss(&z, 2, 2, Some(&[true, true]), 1.0).unwrap();
    assert_eq!((out.loss, out.valid_tokens), (0.0, 0));
    let mut g = vec![9.0f32; 4];
    z_loss_backward_into(
        RouterLogits::new(&z, 2, 2).padding_mask(Some(&[true, true])),
        1.0,
        1.0,
        &mut g,
    )
    .unwrap();
    assert_eq!(g, vec![0.0; 4]);
}

fn invalid(err: Error, arg: &str) {
    assert!(
        matches!(&err, Error::InvalidArgument { arg: a, .. } if *a == arg),
        "{err:?}"
    );
    assert!(err.to_string().contains(arg), "{err}");
}

fn shape(err: Error, arg: &str) {
    assert!(
        matches!(&err, Error::Shape { arg: a, .. } if *a == arg),
        "{err:?}"
    );
    assert!(err.to_string().contains(arg), "{err}");
}

#[test]
fn bad_inputs() {
    let z = vec![0.5f32; 6];
    let mut g = vec![0.0f32; 6];
    invalid(
        z_loss::<f32>(&[], 3, 0, None, 1.0).unwrap_err(),
        "num_experts",
    );
    invalid(z_loss(&z, 3, 2, None, f32::NAN).unwrap_err(), "coeff");
    invalid(
        z_loss(&z, 3, 2, None, f32::NEG_INFINITY).unwrap_err(),
        "coeff",
    );
    shape(z_loss(&z, 4, 2, None, 1.0).unwrap_err(), "logits");
    shape(z_loss(&z, usize::MAX, 2, None, 1.0).unwrap_err(), "logits");
    shape(
        z_loss(&z, 3, 2, Some(&[false; 2]), 1.0).unwrap_err(),
        "padding_mask",
    );
    shape(
        z_loss_backward_into(RouterLogits::new(&z, 3, 2), 1.0, 1.0, &mut g[..5]).unwrap_err(),
        "grad_logits",
    );
    shape(
        z_loss_backward_into(
            RouterLogits::new(&z, 3, 2).padding_mask(Some(&[false; 4])),
            1.0,
            1.0,
            &mut g,
        )
        .unwrap_err(),
        "padding_mask",
    );
    invalid(
        z_loss_backward_into(RouterLogits::new(&z, 3, 2), f32::NAN, 1.0, &mut g).unwrap_err(),
        "coeff",
    );
    invalid(
        z_loss_backward_into::<f32>(RouterLogits::new(&[], 3, 0), 1.0, 1.0, &mut []).unwrap_err(),
        "num_experts",
    );
    let arr = Array2::from_shape_vec((2, 3), z.clone()).unwrap();
    let err = z_loss_backward(arr.t(), None, 1.0, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::Layout { arg: "logits", .. }),
        "{err:?}"
    );
}
