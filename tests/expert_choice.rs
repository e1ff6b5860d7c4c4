//! `expert_choice`: hand cases, ties, brute-force selection property, backward vs
//! float64 finite differences, f16/bf16, thread independence, bad inputs.
mod common;

use common::{assert_close, finite_diff, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{
    expert_choice, expert_choice_backward, expert_choice_backward_into, expert_choice_into, Error,
    ExpertChoiceBuffers, ExpertChoiceOutput, RouterFloat,
};
use ndarray::{array, Array2};
use proptest::prelude::*;

/// Softmax of one row in f64 (the test's own reference).
fn softmax64(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// Check the structural invariants of an output and return, per expert, its chosen
/// tokens (from `row`).
fn check_structure(
    out: &ExpertChoiceOutput,
    t_n: usize,
    e_n: usize,
    cap: usize,
) -> Vec<Vec<usize>> {
    let taken = cap.min(t_n);
    assert_eq!(out.weights.dim(), (t_n, e_n));
    assert_eq!(out.row.dim(), (t_n, e_n));
    assert_eq!(out.row_to_token.len(), e_n * cap);
    assert_eq!(out.row_weights.len(), e_n * cap);
    assert_eq!(out.tokens_per_expert.to_vec(), vec![taken as i32; e_n]);
    assert_eq!(
        out.expert_offsets.to_vec(),
        (0..=e_n).map(|e| (e * cap) as i32).collect::<Vec<_>>()
    );
    let mut chosen = vec![Vec::new(); e_n];
    for (e, chosen_e) in chosen.iter_mut().enumerate() {
        for t in 0..t_n {
            let r = out.row[[t, e]];
            if r >= 0 {
                let r = r as usize;
                assert!(r >= e * cap && r < e * cap + taken, "row {r} of ({t}, {e})");
                assert_eq!(out.row_to_token[r], t as i32);
                assert_eq!(out.row_weights[r].to_bits(), out.weights[[t, e]].to_bits());
                chosen_e.push(t);
            } else {
                assert_eq!(r, -1);
                assert_eq!(out.weights[[t, e]], 0.0);
            }
        }
        assert_eq!(chosen_e.len(), taken, "expert {e}");
        // rows in token order, unused rows marked
        let seg = &out.row_to_token.as_slice().unwrap()[e * cap..(e + 1) * cap];
        for (s, &tok) in seg.iter().enumerate() {
            if s < taken {
                assert_eq!(tok as usize, chosen_e[s]);
                assert_eq!(out.row[[tok as usize, e]] as usize, e * cap + s);
            } else {
                assert_eq!(tok, -1);
                assert_eq!(out.row_weights[e * cap + s], 0.0);
            }
        }
    }
    chosen
}

#[test]
fn hand_case() {
    let logits = array![[2.0f32, 0.0], [0.0, 1.0], [0.0, 3.0]];
    // p(t0) = [0.881, 0.119], p(t1) = [0.269, 0.731], p(t2) = [0.047, 0.953]
    let out = expert_choice(logits.view(), 1).unwrap();
    assert_eq!(check_structure(&out, 3, 2, 1), vec![vec![0], vec![2]]);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 2]);
    let p0 = softmax64(&[2.0, 0.0]);
    let p2 = softmax64(&[0.0, 3.0]);
    assert!((out.weights[[0, 0]] as f64 - p0[0]).abs() < 1e-6);
    assert!((out.weights[[2, 1]] as f64 - p2[1]).abs() < 1e-6);

    // capacity 2: expert 0 takes t0 (0.881), t1 (0.269); expert 1 takes t1, t2.
    let out = expert_choice(logits.view(), 2).unwrap();
    assert_eq!(check_structure(&out, 3, 2, 2), vec![vec![0, 1], vec![1, 2]]);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, 1, 2]);
    assert_eq!(out.row, array![[0, -1], [1, 2], [-1, 3]]);
}

#[test]
fn ties_pick_lower_tokens() {
    let logits = Array2::<f32>::zeros((5, 3));
    let out = expert_choice(logits.view(), 2).unwrap();
    assert_eq!(check_structure(&out, 5, 3, 2), vec![vec![0, 1]; 3]);
    assert_eq!(out.row.row(0).to_vec(), vec![0, 2, 4]);
    assert_eq!(out.row.row(1).to_vec(), vec![1, 3, 5]);
    assert!(out
        .row
        .rows()
        .into_iter()
        .skip(2)
        .all(|r| r.iter().all(|&x| x == -1)));
    assert!((out.weights[[0, 0]] - 1.0 / 3.0).abs() < 1e-7);

    // equal p on a later token only: token 3 ties token 1 for expert 0, token 1 wins
    let logits = array![[5.0f32, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0]];
    let out = expert_choice(logits.view(), 2).unwrap();
    assert_eq!(check_structure(&out, 4, 2, 2), vec![vec![0, 1], vec![1, 2]]);
}

#[test]
fn capacity_zero_and_larger_than_tokens() {
    let logits = array![[1.0f32, 2.0], [0.5, -1.0]];
    let out = expert_choice(logits.view(), 0).unwrap();
    check_structure(&out, 2, 2, 0);
    assert!(out.row.iter().all(|&r| r == -1) && out.weights.iter().all(|&w| w == 0.0));

    let out = expert_choice(logits.view(), 3).unwrap();
    check_structure(&out, 2, 2, 3);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, -1, 0, 1, -1]);
    let p = [softmax64(&[1.0, 2.0]), softmax64(&[0.5, -1.0])];
    for (r, (t, e)) in [(0, (0, 0)), (1, (1, 0)), (3, (0, 1)), (4, (1, 1))] {
        assert!((out.row_weights[r] as f64 - p[t][e]).abs() < 1e-6);
    }
    assert_eq!(out.row_weights[2], 0.0);

    let empty = Array2::<f32>::zeros((0, 3));
    let out = expert_choice(empty.view(), 4).unwrap();
    check_structure(&out, 0, 3, 4);
    assert_eq!(out.row_to_token.to_vec(), vec![-1; 12]);
}

fn random_logits(t_n: usize, e_n: usize, rng: &mut Rng) -> Vec<f32> {
    let mut z = Vec::with_capacity(t_n * e_n);
    for t in 0..t_n {
        if t > 0 && rng.below(8) == 0 {
            // duplicate an earlier row: exact ties in p
            let src = rng.below(t);
            let row: Vec<f32> = z[src * e_n..(src + 1) * e_n].to_vec();
            z.extend(row);
            continue;
        }
        for _ in 0..e_n {
            z.push(if rng.below(4) == 0 {
                (rng.below(3) as f32) - 1.0
            } else {
                (rng.normal() * 2.0) as f32
            });
        }
    }
    z
}

fn check_selection(z: &[f32], t_n: usize, e_n: usize, cap: usize) -> Result<(), TestCaseError> {
    let logits = Array2::from_shape_vec((t_n, e_n), z.to_vec()).unwrap();
    let out = expert_choice(logits.view(), cap).unwrap();
    let chosen = check_structure(&out, t_n, e_n, cap);
    // p as `docs/semantics.md` §5 defines it: the shared f32 softmax of each row
    let mut p = vec![0.0f32; t_n * e_n];
    for t in 0..t_n {
        moe_router::cpu::softmax_row(
            z[t * e_n..(t + 1) * e_n].iter().copied(),
            &mut p[t * e_n..(t + 1) * e_n],
        );
        let p64 = softmax64(
            &z[t * e_n..(t + 1) * e_n]
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
        );
        for e in 0..e_n {
            prop_assert!((p[t * e_n + e] as f64 - p64[e]).abs() <= 1e-5 + 1.3e-6 * p64[e]);
        }
    }
    for e in 0..e_n {
        // brute force: sort tokens by (-p, t), take cap, in token order
        let mut ts: Vec<usize> = (0..t_n).collect();
        ts.sort_by(|&a, &b| {
            p[b * e_n + e]
                .partial_cmp(&p[a * e_n + e])
                .unwrap()
                .then(a.cmp(&b))
        });
        let mut want: Vec<usize> = ts.into_iter().take(cap).collect();
        want.sort_unstable();
        prop_assert_eq!(&chosen[e], &want, "expert {}", e);
        for &t in &want {
            prop_assert_eq!(out.weights[[t, e]].to_bits(), p[t * e_n + e].to_bits());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn chosen_set_is_brute_force_top_capacity(t in 0usize..150, e in 1usize..40, c in 0usize..160, seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let z = random_logits(t, e, &mut rng);
        let cap = c % (t + 4);
        check_selection(&z, t, e, cap)?;
    }
}

#[test]
fn sorted_and_constant_columns() {
    // Increasing, decreasing, constant and random columns; capacities that take the
    // few-winners path (cap * 8 <= T), the selection path and all tokens.
    let (t_n, e_n) = (200, 4);
    let mut rng = Rng::new(3);
    let mut z = Vec::new();
    for t in 0..t_n {
        z.extend([
            t as f32 * 0.01,
            -(t as f32) * 0.01,
            0.5,
            rng.normal() as f32,
        ]);
    }
    for cap in [1, 5, 25, 26, 100, 199, 200, 250] {
        check_selection(&z, t_n, e_n, cap).unwrap();
    }
    // all logits equal: every p ties, the lowest tokens win
    let out = expert_choice(Array2::<f32>::zeros((40, 3)).view(), 3).unwrap();
    assert_eq!(check_structure(&out, 40, 3, 3), vec![vec![0, 1, 2]; 3]);
}

#[test]
fn larger_batch_selection() {
    let mut rng = Rng::new(5);
    let z = random_logits(1000, 23, &mut rng);
    check_selection(&z, 1000, 23, 97).unwrap();
    check_selection(&z, 1000, 23, 900).unwrap();
}

/// `L(z) = Σ_{chosen (t, e)} g[t, e] · softmax(z_t)[e]` in f64.
fn loss64(z: &[f64], chosen: &[bool], g: &[f64], e_n: usize) -> f64 {
    let mut l = 0.0;
    for (t, zt) in z.chunks(e_n).enumerate() {
        let p = softmax64(zt);
        for e in 0..e_n {
            if chosen[t * e_n + e] {
                l += g[t * e_n + e] * p[e];
            }
        }
    }
    l
}

fn backward_case<T: RouterFloat>(
    t_n: usize,
    e_n: usize,
    cap: usize,
    seed: u64,
    rtol: f64,
    atol: f64,
) {
    let mut rng = Rng::new(seed);
    let z: Vec<T> = rng
        .normal_vec(t_n * e_n, 1.5)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let g: Vec<f32> = rng.normal_vec(t_n * e_n, 1.0);
    let logits = Array2::from_shape_vec((t_n, e_n), z.clone()).unwrap();
    let out = expert_choice(logits.view(), cap).unwrap();
    let chosen: Vec<bool> = out.row.iter().map(|&r| r >= 0).collect();
    let z64: Vec<f64> = z.iter().map(|v| v.to_f32() as f64).collect();
    // forward vs f64
    for t in 0..t_n {
        let p = softmax64(&z64[t * e_n..(t + 1) * e_n]);
        for e in 0..e_n {
            let want = if chosen[t * e_n + e] { p[e] } else { 0.0 };
            assert!(
                (out.weights[[t, e]] as f64 - want).abs() <= 1e-5 + 1.3e-6 * want,
                "weights[{t}, {e}]"
            );
        }
    }
    let g64: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    let fd = finite_diff(&z64, 1e-5, |x| loss64(x, &chosen, &g64, e_n));
    let gw = Array2::from_shape_vec((t_n, e_n), g).unwrap();
    let grad = expert_choice_backward(logits.view(), out.row.view(), gw.view()).unwrap();
    let got: Vec<f64> = grad.iter().map(|v| v.to_f32() as f64).collect();
    assert_close(&got, &fd, rtol, atol, "grad_logits");
}

#[test]
fn backward_matches_finite_differences() {
    backward_case::<f32>(7, 5, 3, 1, 1e-3, 1e-5);
    backward_case::<f32>(4, 9, 6, 2, 1e-3, 1e-5); // capacity > T
    backward_case::<f32>(12, 3, 1, 3, 1e-3, 1e-5);
}

#[test]
fn half_inputs() {
    // math in f32 on the exactly widened inputs; only the gradient store rounds
    backward_case::<f16>(7, 5, 3, 4, 2.0 * 9.8e-4, 1e-4);
    backward_case::<bf16>(7, 5, 3, 5, 2.0 * 7.9e-3, 1e-3);
}

#[test]
fn backward_ignores_unchosen_gradients() {
    let logits = array![[0.3f32, -0.2, 1.0], [2.0, 0.1, 0.0]];
    let out = expert_choice(logits.view(), 1).unwrap();
    let mut g = Array2::<f32>::ones((2, 3));
    let a = expert_choice_backward(logits.view(), out.row.view(), g.view()).unwrap();
    for (gv, &r) in g.iter_mut().zip(out.row.iter()) {
        if r < 0 {
            *gv = 1e6;
        }
    }
    let b = expert_choice_backward(logits.view(), out.row.view(), g.view()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn thread_count_independent() {
    let mut rng = Rng::new(9);
    let (t_n, e_n, cap) = (3000, 37, 150);
    let z = random_logits(t_n, e_n, &mut rng);
    let logits = Array2::from_shape_vec((t_n, e_n), z).unwrap();
    let g = Array2::from_shape_vec((t_n, e_n), rng.normal_vec(t_n * e_n, 1.0)).unwrap();
    let run = || {
        let out = expert_choice(logits.view(), cap).unwrap();
        let grad = expert_choice_backward(logits.view(), out.row.view(), g.view()).unwrap();
        (out, grad)
    };
    let (a, ga) = with_threads(1, run);
    let (b, gb) = with_threads(3, run);
    assert_eq!(a.row, b.row);
    assert_eq!(a.row_to_token, b.row_to_token);
    let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(a.weights.as_slice().unwrap()),
        bits(b.weights.as_slice().unwrap())
    );
    assert_eq!(
        bits(a.row_weights.as_slice().unwrap()),
        bits(b.row_weights.as_slice().unwrap())
    );
    assert_eq!(bits(ga.as_slice().unwrap()), bits(gb.as_slice().unwrap()));
}

// ---------------------------------------------------------------- errors

#[test]
fn bad_num_experts() {
    let z = Array2::<f32>::zeros((3, 0));
    let err = expert_choice(z.view(), 1).unwrap_err();
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
    let err = expert_choice_backward(
        z.view(),
        Array2::<i32>::zeros((3, 0)).view(),
        Array2::<f32>::zeros((3, 0)).view(),
    )
    .unwrap_err();
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
}

#[test]
fn overflow() {
    let z = Array2::<f32>::zeros((2, 4));
    let err = expert_choice(z.view(), i32::MAX as usize / 4 + 1).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    assert!(err.to_string().contains("num_experts * capacity"), "{err}");
    // i32::MAX rows exactly is allowed by validation (not allocated here)
    let err = expert_choice_into::<f32>(
        &[],
        0,
        1,
        i32::MAX as usize + 1,
        ExpertChoiceBuffers {
            weights: &mut [],
            row: &mut [],
            row_to_token: &mut [],
            row_weights: &mut [],
            tokens_per_expert: &mut [0],
            expert_offsets: &mut [0, 0],
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
}

#[test]
fn bad_lengths() {
    let z = vec![0.0f32; 6];
    let (t_n, e_n, cap) = (3, 2, 2);
    let sizes = [6, 6, 4, 4, 2, 3];
    let names = [
        "weights",
        "row",
        "row_to_token",
        "row_weights",
        "tokens_per_expert",
        "expert_offsets",
    ];
    let call = |s: [usize; 6], zl: usize| {
        let (mut w, mut r, mut rt, mut rw, mut tpe, mut off) = (
            vec![0.0; 8],
            vec![0; 8],
            vec![0; 8],
            vec![0.0; 8],
            vec![0; 8],
            vec![0; 8],
        );
        expert_choice_into(
            &z[..zl],
            t_n,
            e_n,
            cap,
            ExpertChoiceBuffers {
                weights: &mut w[..s[0]],
                row: &mut r[..s[1]],
                row_to_token: &mut rt[..s[2]],
                row_weights: &mut rw[..s[3]],
                tokens_per_expert: &mut tpe[..s[4]],
                expert_offsets: &mut off[..s[5]],
            },
        )
    };
    assert!(call(sizes, 6).is_ok());
    let err = call(sizes, 5).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "logits", .. }), "{err}");
    for (i, name) in names.iter().enumerate() {
        let mut s = sizes;
        s[i] += 1;
        let err = call(s, 6).unwrap_err();
        assert!(
            matches!(err, Error::Shape { arg, .. } if arg == *name),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name));
    }
    // backward
    let row = vec![-1i32; 6];
    let g = vec![0.0f32; 6];
    let mut gz = vec![0.0f32; 6];
    assert!(expert_choice_backward_into(&z, 3, 2, &row, &g, &mut gz).is_ok());
    let err = expert_choice_backward_into(&z, 3, 2, &row[..5], &g, &mut gz).unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "row", .. }), "{err}");
    let err = expert_choice_backward_into(&z, 3, 2, &row, &g[..4], &mut gz).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "grad_weights",
                ..
            }
        ),
        "{err}"
    );
    let err = expert_choice_backward_into(&z, 3, 2, &row, &g, &mut gz[..5]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "grad_logits",
                ..
            }
        ),
        "{err}"
    );
    let zz = Array2::<f32>::zeros((3, 2));
    let err = expert_choice_backward(
        zz.view(),
        Array2::<i32>::zeros((2, 3)).view(),
        Array2::<f32>::zeros((3, 2)).view(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "row", .. }), "{err}");
    let err = expert_choice_backward(
        zz.view(),
        Array2::<i32>::zeros((3, 2)).view(),
        Array2::<f32>::zeros((3, 3)).view(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "grad_weights",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_row_and_layout() {
    let z = vec![0.0f32; 4];
    let row = vec![0, -1, -2, 1];
    let err = expert_choice_backward_into(&z, 2, 2, &row, &[0.0; 4], &mut [0.0; 4]).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "row", .. }),
        "{err}"
    );
    assert!(err.to_string().contains("-2"), "{err}");
    let zz = array![[1.0f32, 2.0, 3.0], [4.0, 5.0, 6.0]];
    let err = expert_choice(zz.t(), 1).unwrap_err();
    assert!(matches!(err, Error::Layout { arg: "logits", .. }), "{err}");
}
