//! Top-k gating: hand cases, properties against an independent f64 reference,
//! finite-difference gradients, replay, dtypes, determinism and every bad input.

mod common;

use common::{assert_close, finite_diff, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{
    topk_gating, topk_gating_backward, topk_gating_backward_into, topk_gating_into,
    topk_gating_replay, topk_gating_replay_into, Error, RouterFloat, ScoreFunction,
    TopkGatingConfig,
};
use ndarray::{array, Array1, Array2};
use proptest::prelude::*;

// ---------- independent f64 reference ----------

fn softmax64(z: &[f64]) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn sig64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Base scores of the mode (`docs/semantics.md` §2.1): softmax (pre), z (post), sigmoid.
fn base64(z: &[f64], cfg: &TopkGatingConfig) -> Vec<f64> {
    match cfg.score_function {
        ScoreFunction::Softmax if cfg.pre_softmax => softmax64(z),
        ScoreFunction::Softmax => z.to_vec(),
        ScoreFunction::Sigmoid => z.iter().map(|&v| sig64(v)).collect(),
    }
}

/// Sort experts by (score desc, index asc): a full stable sort, the obvious way.
fn ranked(q: &[f64], candidates: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut v: Vec<usize> = candidates.collect();
    v.sort_by(|&a, &b| q[b].partial_cmp(&q[a]).unwrap().then(a.cmp(&b)));
    v
}

/// The f64 selection key of every expert: its score plus its bias.
fn selection_keys64(z: &[f64], bias: Option<&[f32]>, cfg: &TopkGatingConfig) -> Vec<f64> {
    let p = base64(z, cfg);
    (0..z.len())
        .map(|i| p[i] + bias.map_or(0.0, |b| b[i] as f64))
        .collect()
}

fn select64(z: &[f64], bias: Option<&[f32]>, cfg: &TopkGatingConfig) -> Vec<usize> {
    let e = z.len();
    let q = selection_keys64(z, bias, cfg);
    match cfg.group_limit {
        None => ranked(&q, 0..e)[..cfg.topk].to_vec(),
        Some(g) => {
            let per = e / g.num_groups;
            let m = cfg.topk / g.group_topk;
            let gs: Vec<f64> = (0..g.num_groups)
                .map(|gi| {
                    ranked(&q, gi * per..(gi + 1) * per)[..m]
                        .iter()
                        .map(|&i| q[i])
                        .sum()
                })
                .collect();
            let groups = ranked(&gs, 0..g.num_groups);
            let eligible = groups[..g.group_topk]
                .iter()
                .flat_map(|&gi| gi * per..(gi + 1) * per);
            ranked(&q, eligible)[..cfg.topk].to_vec()
        }
    }
}

fn weights64(z: &[f64], idx: &[usize], cfg: &TopkGatingConfig) -> Vec<f64> {
    let mut w: Vec<f64> = match cfg.score_function {
        ScoreFunction::Softmax if !cfg.pre_softmax => {
            softmax64(&idx.iter().map(|&i| z[i]).collect::<Vec<_>>())
        }
        _ => {
            let p = base64(z, cfg);
            idx.iter().map(|&i| p[i]).collect()
        }
    };
    if cfg.normalize {
        let s: f64 = w.iter().sum::<f64>() + 1e-20;
        w.iter_mut().for_each(|v| *v /= s);
    }
    w.iter_mut().for_each(|v| *v *= cfg.scaling_factor as f64);
    w
}

/// Tie-free logits: a random permutation of well-separated values plus jitter.
fn separated_logits(rng: &mut Rng, t: usize, e: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(t * e);
    for _ in 0..t {
        let mut perm: Vec<usize> = (0..e).collect();
        for i in (1..e).rev() {
            perm.swap(i, rng.below(i + 1));
        }
        let scale = 6.0 / e.max(1) as f64;
        out.extend(
            perm.iter().map(|&r| {
                ((r as f64 - e as f64 / 2.0) * scale + rng.range(0.0, 0.2 * scale)) as f32
            }),
        );
    }
    out
}

fn all_modes(k: usize) -> Vec<TopkGatingConfig> {
    vec![
        TopkGatingConfig::new(k),
        TopkGatingConfig::new(k).pre_softmax(true),
        TopkGatingConfig::new(k).pre_softmax(true).normalize(true),
        TopkGatingConfig::new(k).score_function(ScoreFunction::Sigmoid),
        TopkGatingConfig::new(k)
            .score_function(ScoreFunction::Sigmoid)
            .normalize(true)
            .scaling_factor(2.5),
        TopkGatingConfig::new(k).normalize(true).scaling_factor(0.5),
    ]
}

fn run<T: RouterFloat>(
    z: &[T],
    t: usize,
    e: usize,
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
) -> (Vec<f32>, Vec<i32>) {
    let mut w = vec![f32::NAN; t * cfg.topk];
    let mut i = vec![-7; t * cfg.topk];
    topk_gating_into(z, t, e, bias, cfg, &mut w, &mut i).unwrap();
    (w, i)
}

// ---------- hand-computed cases ----------

#[test]
fn softmax_pre_hand_case() {
    // z = [ln 1, ln 2, ln 3, ln 4]: softmax = [0.1, 0.2, 0.3, 0.4]
    let z = [1f32.ln(), 2f32.ln(), 3f32.ln(), 4f32.ln()];
    let cfg = TopkGatingConfig::new(2).pre_softmax(true);
    let (w, i) = run(&z, 1, 4, None, &cfg);
    assert_eq!(i, vec![3, 2]);
    assert_close(
        &[w[0] as f64, w[1] as f64],
        &[0.4, 0.3],
        1e-6,
        1e-7,
        "weights",
    );
    let (w, _) = run(&z, 1, 4, None, &cfg.clone().normalize(true));
    assert_close(
        &[w[0] as f64, w[1] as f64],
        &[4.0 / 7.0, 3.0 / 7.0],
        1e-6,
        1e-7,
        "normalised",
    );
}

#[test]
fn softmax_post_hand_case() {
    // selected logits ln 3, ln 1 -> softmax over the two = [0.75, 0.25]
    let z = [1f32.ln(), 0.0 - 5.0, 3f32.ln(), -2.0];
    let cfg = TopkGatingConfig::new(2).scaling_factor(2.0);
    let (w, i) = run(&z, 1, 4, None, &cfg);
    assert_eq!(i, vec![2, 0]);
    assert_close(
        &[w[0] as f64, w[1] as f64],
        &[1.5, 0.5],
        1e-6,
        1e-7,
        "weights",
    );
}

#[test]
fn sigmoid_hand_case() {
    let z = [0.0f32, 2.0, -1.0];
    let cfg = TopkGatingConfig::new(2).score_function(ScoreFunction::Sigmoid);
    let (w, i) = run(&z, 1, 3, None, &cfg);
    assert_eq!(i, vec![1, 0]);
    let s2 = 1.0 / (1.0 + (-2.0f64).exp());
    assert_close(
        &[w[0] as f64, w[1] as f64],
        &[s2, 0.5],
        1e-6,
        1e-7,
        "weights",
    );
    let (w, _) = run(&z, 1, 3, None, &cfg.clone().normalize(true));
    assert_close(
        &[w[0] as f64, w[1] as f64],
        &[s2 / (s2 + 0.5), 0.5 / (s2 + 0.5)],
        1e-6,
        1e-7,
        "normalised",
    );
}

#[test]
fn bias_changes_selection_not_weights() {
    let z = [1.0f32, 0.9, 0.0];
    let bias = [0.0f32, 0.5, 0.0];
    let cfg = TopkGatingConfig::new(1).score_function(ScoreFunction::Sigmoid);
    let (w, i) = run(&z, 1, 3, Some(&bias), &cfg);
    assert_eq!(i, vec![1]);
    assert_close(
        &[w[0] as f64],
        &[sig64(0.9)],
        1e-6,
        1e-7,
        "weight is σ(z), bias-free",
    );
}

#[test]
fn group_limited_hand_case() {
    // 3 groups of 2 experts, k = 2, group_topk = 2: group score = its best (k/group_topk = 1) score.
    // groups: {0,1} best 0.9; {2,3} best 1.0; {4,5} best 0.95 -> keep groups 1 and 2.
    let z = [0.9f32, 0.85, 1.0, -1.0, 0.95, 0.94];
    let cfg = TopkGatingConfig::new(2).group_limit(3, 2);
    let (_, i) = run(&z, 1, 6, None, &cfg);
    assert_eq!(i, vec![2, 4]);
    // without groups expert 0 (0.9) would beat 4's neighbour 5 (0.94)? check plain top-3
    let (_, i) = run(&z, 1, 6, None, &TopkGatingConfig::new(3));
    assert_eq!(i, vec![2, 4, 5]);
    // group_topk = 1, k = 2: group score = sum of top 2: {0,1}=1.75 {2,3}=0.0 {4,5}=1.89 -> group 2
    let cfg = TopkGatingConfig::new(2).group_limit(3, 1);
    let (_, i) = run(&z, 1, 6, None, &cfg);
    assert_eq!(i, vec![4, 5]);
}

#[test]
fn ties_pick_lower_index_and_order_descending() {
    let z = [1.0f32, 2.0, 2.0, 1.0, 2.0];
    let (_, i) = run(&z, 1, 5, None, &TopkGatingConfig::new(4));
    assert_eq!(i, vec![1, 2, 4, 0]);
    // group ties: equal group scores -> lower group index
    let z = [1.0f32, 0.0, 0.0, 1.0, 1.0, 0.0];
    let (_, i) = run(&z, 1, 6, None, &TopkGatingConfig::new(1).group_limit(3, 1));
    assert_eq!(i, vec![0]);
    // -0.0 and +0.0 are equal scores
    let z = [-0.0f32, 0.0];
    let (_, i) = run(&z, 1, 2, None, &TopkGatingConfig::new(1));
    assert_eq!(i, vec![0]);
}

#[test]
fn nan_and_inf_rank_last_and_indices_stay_valid() {
    let z = [f32::NAN, f32::NEG_INFINITY, 0.5, f32::NAN, f32::INFINITY];
    let cfg = TopkGatingConfig::new(5);
    let (_, i) = run(&z, 1, 5, None, &cfg);
    assert_eq!(i, vec![4, 2, 1, 0, 3]);
    for mode in all_modes(3) {
        let (_, i) = run(&z, 1, 5, None, &mode);
        let mut s = i.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 3, "{mode:?}");
        assert!(i.iter().all(|&x| (0..5).contains(&x)));
    }
    let all_nan = [f32::NAN; 4];
    let (_, i) = run(
        &all_nan,
        1,
        4,
        None,
        &TopkGatingConfig::new(2).group_limit(2, 1),
    );
    assert_eq!(i, vec![0, 1]);
}

#[test]
fn empty_batch_is_valid() {
    let z: [f32; 0] = [];
    let (w, i) = run(&z, 0, 8, None, &TopkGatingConfig::new(2));
    assert!(w.is_empty() && i.is_empty());
    let g = topk_gating_backward(
        Array2::<f32>::zeros((0, 8)).view(),
        Array2::<i32>::zeros((0, 2)).view(),
        Array2::<f32>::zeros((0, 2)).view(),
        &TopkGatingConfig::new(2),
    )
    .unwrap();
    assert_eq!(g.dim(), (0, 8));
}

#[test]
fn noise_changes_selection_only_and_is_deterministic() {
    let mut rng = Rng::new(3);
    let (t, e) = (200, 16);
    let z = separated_logits(&mut rng, t, e);
    let plain = TopkGatingConfig::new(2).pre_softmax(true);
    let noisy = plain.clone().noise(1.0, 11, 4);
    let (w0, i0) = run(&z, t, e, None, &plain);
    let (w1, i1) = run(&z, t, e, None, &noisy);
    assert_eq!(
        (w1.clone(), i1.clone()),
        run(&z, t, e, None, &noisy),
        "same seed/offset, same result"
    );
    assert_ne!(i0, i1, "noise of std 1 must change some selections");
    // weights are the noise-free weights of the noisy selection
    let replayed = topk_gating_replay(
        Array2::from_shape_vec((t, e), z.clone()).unwrap().view(),
        Array2::from_shape_vec((t, 2), i1.clone()).unwrap().view(),
        &plain,
    )
    .unwrap();
    assert_eq!(replayed.as_slice().unwrap(), &w1[..]);
    let (_, i2) = run(&z, t, e, None, &plain.clone().noise(1.0, 11, 5));
    assert_ne!(i1, i2, "another offset, other noise");
    let _ = w0;
    // std 0 is the identity
    assert_eq!(run(&z, t, e, None, &plain.clone().noise(0.0, 11, 4)).1, i0);
}

#[test]
fn expert_masking_excludes_masked_candidates() {
    let mut rng = Rng::new(5);
    let (t, e, k) = (300, 12, 3);
    let z = separated_logits(&mut rng, t, e);
    let cfg = TopkGatingConfig::new(k)
        .pre_softmax(true)
        .expert_masking(0.5, 9, 1);
    let (_, idx) = run(&z, t, e, None, &cfg);
    let mcfg = moe_router::DropoutConfig::new(0.5, 9, 1);
    let mut m = Array2::from_elem((t, e), false);
    for (tok, mut row) in m.rows_mut().into_iter().enumerate() {
        moe_router::cpu::dropout::expert_mask_row(tok, e, k, &mcfg, row.as_slice_mut().unwrap());
    }
    let mut masked_total = 0;
    for tok in 0..t {
        let row: Vec<f64> = z[tok * e..(tok + 1) * e]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let p = softmax64(&row);
        let q: Vec<f64> = (0..e)
            .map(|x| if m[[tok, x]] { f64::NEG_INFINITY } else { p[x] })
            .collect();
        let expect: Vec<i32> = ranked(&q, 0..e)[..k].iter().map(|&x| x as i32).collect();
        assert_eq!(&idx[tok * k..(tok + 1) * k], &expect[..], "token {tok}");
        masked_total += (0..e).filter(|&x| m[[tok, x]]).count();
    }
    assert!(
        masked_total > t * e / 3,
        "about half the candidates are masked: {masked_total}"
    );
    // rate 0: identity
    let plain = TopkGatingConfig::new(k).pre_softmax(true);
    assert_eq!(
        run(&z, t, e, None, &plain.clone().expert_masking(0.0, 9, 1)),
        run(&z, t, e, None, &plain)
    );
}

#[test]
fn expert_masking_near_rate_one_is_not_quadratic() {
    // Regression: with rate 0.9999999 nearly every candidate is masked and the
    // top-up to `topk` unmasked one candidate per scan of the row: O(E * k) draws per
    // token ([4, 4096] with k = 4096 was 350x slower than without masking; E = k = 1e5
    // did not finish). Now one selection per token, so it finishes in milliseconds.
    let run_within = |t: usize, e: usize, k: usize| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let z: Vec<f32> = (0..t * e).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
            let masked = TopkGatingConfig::new(k).expert_masking(0.999_999_9, 21, 8);
            let _ = tx.send((run(&z, t, e, None, &masked), z));
        });
        rx.recv_timeout(std::time::Duration::from_secs(60))
            .unwrap_or_else(|_| {
                panic!("topk_gating [{t}, {e}] k={k} with expert masking: not finished after 60 s")
            })
    };
    // k = E: masking cannot remove anything, the result is plain top-k.
    for &(t, e) in &[(4usize, 4096usize), (1, 100_000)] {
        let ((w, idx), z) = run_within(t, e, e);
        assert_eq!(
            (w, idx),
            run(&z, t, e, None, &TopkGatingConfig::new(e)),
            "[{t}, {e}]"
        );
    }
    // k < E: exactly the k candidates the mask leaves are selected.
    let (t, e, k) = (2usize, 50_000usize, 40_000usize);
    let ((_, idx), _) = run_within(t, e, k);
    let m = moe_router::expert_mask(t, e, k, &moe_router::DropoutConfig::new(0.999_999_9, 21, 8))
        .unwrap();
    for tok in 0..t {
        let mut got: Vec<usize> = idx[tok * k..(tok + 1) * k]
            .iter()
            .map(|&x| x as usize)
            .collect();
        got.sort_unstable();
        let want: Vec<usize> = (0..e).filter(|&x| !m[[tok, x]]).collect();
        assert_eq!(got, want, "token {tok}");
    }
}

// ---------- properties ----------

fn gating_case() -> impl Strategy<Value = (usize, usize, usize, Option<(usize, usize)>, u64)> {
    (
        0usize..300,
        1usize..300,
        1usize..33,
        any::<u64>(),
        0usize..4,
    )
        .prop_map(|(t, e, k, seed, g)| {
            let k = k.min(e);
            // pick a group layout when one fits
            let groups = if g == 0 {
                None
            } else {
                let divisors: Vec<usize> = (1..=e).filter(|d| e % d == 0 && *d <= 16).collect();
                let ng = divisors[seed as usize % divisors.len()];
                let per = e / ng;
                (1..=ng.min(k)).find(|&gt| gt * per >= k).map(|gt| (ng, gt))
            };
            (t, e, k, groups, seed)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn matches_f64_reference((t, e, k, groups, seed) in gating_case(), mode in 0usize..6, with_bias in any::<bool>()) {
        let mut rng = Rng::new(seed);
        let z = separated_logits(&mut rng, t, e);
        let bias: Option<Vec<f32>> = with_bias.then(|| (0..e).map(|_| (rng.range(-0.05, 0.05)) as f32).collect());
        let mut cfg = all_modes(k)[mode].clone();
        if let Some((ng, gt)) = groups { cfg = cfg.group_limit(ng, gt); }
        let (w, idx) = run(&z, t, e, bias.as_deref(), &cfg);
        for tok in 0..t {
            let row: Vec<f64> = z[tok * e..(tok + 1) * e].iter().map(|&v| v as f64).collect();
            let sel = select64(&row, bias.as_deref(), &cfg);
            let got: Vec<usize> = idx[tok * k..(tok + 1) * k].iter().map(|&x| x as usize).collect();
            if got != sel {
                // The logits are separated, but a random bias added to the scores can
                // bring two selection keys within f32 rounding of each other; then the
                // f32 kernel and this f64 reference may rank them either way. Any other
                // difference is a failure.
                let q = selection_keys64(&row, bias.as_deref(), &cfg);
                for j in 0..k {
                    let (a, b) = (q[got[j]], q[sel[j]]);
                    prop_assert!(
                        got[j] == sel[j] || (a - b).abs() <= 1e-6 * (1.0 + a.abs().max(b.abs())),
                        "token {} position {}: {:?} vs f64 {:?} (keys {} vs {}), cfg {:?}",
                        tok, j, got, sel, a, b, cfg
                    );
                }
            }
            let w64 = weights64(&row, &got, &cfg);
            for j in 0..k {
                let (a, b) = (w[tok * k + j] as f64, w64[j]);
                prop_assert!((a - b).abs() <= 1e-5 + 1.3e-6 * b.abs() * 10.0, "weight {} {}: {} vs {}", tok, j, a, b);
            }
            if cfg.normalize {
                let s: f64 = w[tok * k..(tok + 1) * k].iter().map(|&v| v as f64).sum();
                prop_assert!((s - cfg.scaling_factor as f64).abs() < 1e-5, "normalised sum {}", s);
            }
        }
    }

    #[test]
    fn indices_distinct_in_range_on_any_input(t in 0usize..40, e in 1usize..70, k in 1usize..33, seed in any::<u64>(), mode in 0usize..6) {
        let k = k.min(e);
        let mut rng = Rng::new(seed);
        // adversarial values: ties, infinities, NaN, huge
        let pool = [0.0f32, -0.0, 1.0, 1.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30, 88.0, -88.0];
        let z: Vec<f32> = (0..t * e).map(|_| pool[rng.below(pool.len())]).collect();
        let cfg = all_modes(k)[mode].clone();
        let (_, idx) = run(&z, t, e, None, &cfg);
        for tok in 0..t {
            let mut row = idx[tok * k..(tok + 1) * k].to_vec();
            prop_assert!(row.iter().all(|&x| x >= 0 && (x as usize) < e));
            row.sort();
            row.dedup();
            prop_assert_eq!(row.len(), k);
        }
    }
}

// ---------- gradients ----------

#[test]
fn backward_matches_finite_differences_every_mode() {
    let mut rng = Rng::new(17);
    let (t, e, k) = (5, 9, 3);
    let z = separated_logits(&mut rng, t, e);
    let gw: Vec<f32> = (0..t * k).map(|_| rng.range(-1.0, 1.0) as f32).collect();
    let mut modes = all_modes(k);
    modes.push(TopkGatingConfig::new(1).normalize(true)); // post-softmax k=1 normalised
    modes.push(
        TopkGatingConfig::new(k)
            .pre_softmax(true)
            .group_limit(3, 1)
            .normalize(true)
            .scaling_factor(1.7),
    );
    for cfg in modes {
        let (_, idx) = run(&z, t, e, None, &cfg);
        let kk = cfg.topk;
        let gw = &gw[..t * kk];
        let mut g = vec![0f32; t * e];
        topk_gating_backward_into(&z, t, e, &idx, gw, &cfg, &mut g).unwrap();
        for tok in 0..t {
            let sel: Vec<usize> = idx[tok * kk..(tok + 1) * kk]
                .iter()
                .map(|&x| x as usize)
                .collect();
            let row: Vec<f64> = z[tok * e..(tok + 1) * e]
                .iter()
                .map(|&v| v as f64)
                .collect();
            let fd = finite_diff(&row, 1e-6, |x| {
                weights64(x, &sel, &cfg)
                    .iter()
                    .zip(&gw[tok * kk..(tok + 1) * kk])
                    .map(|(w, g)| w * *g as f64)
                    .sum()
            });
            let got: Vec<f64> = g[tok * e..(tok + 1) * e]
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert_close(&got, &fd, 1e-3, 2e-6, &format!("grad token {tok} {cfg:?}"));
        }
    }
}

#[test]
fn replay_reproduces_forward_weights() {
    let mut rng = Rng::new(23);
    let (t, e) = (64, 40);
    let z = separated_logits(&mut rng, t, e);
    for cfg in all_modes(4) {
        let (w, idx) = run(&z, t, e, None, &cfg);
        let mut w2 = vec![0f32; t * 4];
        topk_gating_replay_into(&z, t, e, &idx, &cfg, &mut w2).unwrap();
        assert_eq!(w, w2, "{cfg:?}");
    }
    // replay of indices that were not the top-k: weights follow the formula
    let idx: Vec<i32> = (0..t).flat_map(|_| [5, 0, 39, 7]).collect();
    let cfg = TopkGatingConfig::new(4).normalize(true);
    let mut w = vec![0f32; t * 4];
    topk_gating_replay_into(&z, t, e, &idx, &cfg, &mut w).unwrap();
    let row: Vec<f64> = z[..e].iter().map(|&v| v as f64).collect();
    let expect = weights64(&row, &[5, 0, 39, 7], &cfg);
    assert_close(
        &w[..4].iter().map(|&v| v as f64).collect::<Vec<_>>(),
        &expect,
        1e-5,
        1e-6,
        "replay weights",
    );
}

// ---------- dtypes ----------

fn half_case<T: RouterFloat>(eps: f64) {
    let mut rng = Rng::new(31);
    let (t, e, k) = (50, 24, 4);
    let z32 = separated_logits(&mut rng, t, e);
    let z: Vec<T> = z32.iter().map(|&v| T::from_f32(v)).collect();
    for cfg in all_modes(k) {
        let (w, idx) = run(&z, t, e, None, &cfg);
        let mut g = vec![T::default(); t * e];
        let gw = vec![1.0f32; t * k];
        topk_gating_backward_into(&z, t, e, &idx, &gw, &cfg, &mut g).unwrap();
        for tok in 0..t {
            // the reference sees the same rounded inputs
            let row: Vec<f64> = z[tok * e..(tok + 1) * e]
                .iter()
                .map(|v| v.to_f32() as f64)
                .collect();
            let sel = select64(&row, None, &cfg);
            let got: Vec<usize> = idx[tok * k..(tok + 1) * k]
                .iter()
                .map(|&x| x as usize)
                .collect();
            if got != sel {
                // rounding to half precision may create exact ties; then the tie rule decides
                let p = base64(&row, &cfg);
                let gs: Vec<f64> = got.iter().map(|&i| p[i]).collect();
                let ss: Vec<f64> = sel.iter().map(|&i| p[i]).collect();
                assert_eq!(gs, ss, "only tie-equivalent selections may differ");
            }
            let w64 = weights64(&row, &got, &cfg);
            for j in 0..k {
                assert!(
                    (w[tok * k + j] as f64 - w64[j]).abs()
                        < 1e-5 * cfg.scaling_factor.abs() as f64 + 1e-6
                );
            }
            // gradient stored in T: within T's rounding of the f64 value
            let fd = finite_diff(&row, 1e-6, |x| weights64(x, &got, &cfg).iter().sum());
            for x in 0..e {
                let gv = g[tok * e + x].to_f32() as f64;
                assert!(
                    (gv - fd[x]).abs() <= 2.0 * eps * fd[x].abs() + 1e-4,
                    "grad {gv} vs {}",
                    fd[x]
                );
            }
        }
    }
}

#[test]
fn f16_and_bf16_inputs() {
    half_case::<f16>(f16::EPSILON.to_f64());
    half_case::<bf16>(bf16::EPSILON.to_f64());
}

// ---------- determinism ----------

#[test]
fn bitwise_independent_of_thread_count() {
    let mut rng = Rng::new(41);
    let (t, e, k) = (3000, 72, 6);
    let z = rng.normal_vec(t * e, 2.0);
    let bias: Vec<f32> = (0..e).map(|_| rng.range(-0.1, 0.1) as f32).collect();
    let cfg = TopkGatingConfig::new(k)
        .score_function(ScoreFunction::Sigmoid)
        .normalize(true)
        .group_limit(8, 3)
        .noise(0.1, 1, 2)
        .expert_masking(0.2, 3, 4);
    let a = with_threads(1, || run(&z, t, e, Some(&bias), &cfg));
    let b = with_threads(3, || run(&z, t, e, Some(&bias), &cfg));
    assert_eq!(
        a.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        b.0.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(a.1, b.1);
    let gw = rng.normal_vec(t * k, 1.0);
    let cfg2 = TopkGatingConfig::new(k).pre_softmax(true).normalize(true);
    let (_, idx) = run(&z, t, e, None, &cfg2);
    let g = |n| {
        with_threads(n, || {
            let mut g = vec![0f32; t * e];
            topk_gating_backward_into(&z, t, e, &idx, &gw, &cfg2, &mut g).unwrap();
            g.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        })
    };
    assert_eq!(g(1), g(3));
}

// ---------- bad inputs (`docs/semantics.md` §1.8 "Errors", §2.7) ----------

fn err_of(r: moe_router::Result<()>) -> Error {
    r.expect_err("must be rejected")
}

fn gate(
    z: &[f32],
    t: usize,
    e: usize,
    bias: Option<&[f32]>,
    cfg: &TopkGatingConfig,
) -> moe_router::Result<()> {
    let mut w = vec![0f32; t * cfg.topk];
    let mut i = vec![0i32; t * cfg.topk];
    topk_gating_into(z, t, e, bias, cfg, &mut w, &mut i)
}

fn assert_invalid(err: Error, arg: &str) {
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with("topk_gating"), "{msg}");
    assert!(msg.contains(arg), "message must name `{arg}`: {msg}");
}

#[test]
fn rejects_k_zero_and_k_above_e() {
    let z = [0f32; 8];
    assert_invalid(
        err_of(gate(&z, 2, 4, None, &TopkGatingConfig::new(0))),
        "topk",
    );
    assert_invalid(
        err_of(gate(&z, 2, 4, None, &TopkGatingConfig::new(5))),
        "topk",
    );
}

#[test]
fn rejects_zero_experts() {
    assert_invalid(
        err_of(gate(&[], 3, 0, None, &TopkGatingConfig::new(1))),
        "num_experts",
    );
}

#[test]
fn rejects_bad_groups() {
    let z = [0f32; 12];
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(2).group_limit(4, 1),
        )),
        "num_groups",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(2).group_limit(0, 1),
        )),
        "num_groups",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(2).group_limit(3, 4),
        )),
        "group_topk",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(2).group_limit(3, 0),
        )),
        "group_topk",
    );
    // k not reachable: 1 group of 2 experts cannot supply 3
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(3).group_limit(3, 1),
        )),
        "topk",
    );
    // group_topk > topk: a group's score would sum zero experts
    assert_invalid(
        err_of(gate(
            &z,
            2,
            6,
            None,
            &TopkGatingConfig::new(1).group_limit(3, 2),
        )),
        "group_topk",
    );
}

#[test]
fn rejects_bad_options() {
    let z = [0f32; 8];
    let sig = TopkGatingConfig::new(1)
        .score_function(ScoreFunction::Sigmoid)
        .pre_softmax(true);
    assert_invalid(err_of(gate(&z, 2, 4, None, &sig)), "pre_softmax");
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            None,
            &TopkGatingConfig::new(1).scaling_factor(f32::NAN),
        )),
        "scaling_factor",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            None,
            &TopkGatingConfig::new(1).noise(-1.0, 0, 0),
        )),
        "noise",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            None,
            &TopkGatingConfig::new(1).noise(f32::INFINITY, 0, 0),
        )),
        "noise",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            None,
            &TopkGatingConfig::new(1).expert_masking(1.0, 0, 0),
        )),
        "expert_masking",
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            None,
            &TopkGatingConfig::new(1).expert_masking(-0.1, 0, 0),
        )),
        "expert_masking",
    );
}

#[test]
fn rejects_bias_of_wrong_length_or_non_finite() {
    let z = [0f32; 8];
    let err = err_of(gate(&z, 2, 4, Some(&[0.0; 3]), &TopkGatingConfig::new(1)));
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "expert_bias",
                ..
            }
        ),
        "{err:?}"
    );
    assert_invalid(
        err_of(gate(
            &z,
            2,
            4,
            Some(&[0.0, f32::NAN, 0.0, 0.0]),
            &TopkGatingConfig::new(1),
        )),
        "expert_bias",
    );
}

#[test]
fn rejects_wrong_buffer_shapes() {
    let cfg = TopkGatingConfig::new(2);
    let err = err_of(gate(&[0f32; 7], 2, 4, None, &cfg));
    assert!(matches!(err, Error::Shape { arg: "logits", .. }), "{err:?}");
    let mut w = vec![0f32; 3];
    let mut i = vec![0i32; 4];
    let err = topk_gating_into(&[0f32; 8], 2, 4, None, &cfg, &mut w, &mut i).unwrap_err();
    assert!(
        matches!(err, Error::Shape { arg: "weights", .. }),
        "{err:?}"
    );
    let mut w = vec![0f32; 4];
    let mut i = vec![0i32; 5];
    let err = topk_gating_into(&[0f32; 8], 2, 4, None, &cfg, &mut w, &mut i).unwrap_err();
    assert!(
        matches!(err, Error::Shape { arg: "indices", .. }),
        "{err:?}"
    );
    let mut g = vec![0f32; 7];
    let err = topk_gating_backward_into(&[0f32; 8], 2, 4, &[0, 1, 0, 1], &[0.0; 4], &cfg, &mut g)
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "grad_logits",
                ..
            }
        ),
        "{err:?}"
    );
    let err = topk_gating_backward_into(
        &[0f32; 8],
        2,
        4,
        &[0, 1, 0, 1],
        &[0.0; 3],
        &cfg,
        &mut [0f32; 8],
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
        "{err:?}"
    );
}

#[test]
fn rejects_bad_replay_indices() {
    let cfg = TopkGatingConfig::new(2);
    let z = [0f32; 8];
    let mut w = [0f32; 4];
    let err = topk_gating_replay_into(&z, 2, 4, &[0, 4, 1, 2], &cfg, &mut w).unwrap_err();
    assert!(
        err.to_string().contains("indices") && err.to_string().contains("[0, 4)"),
        "{err}"
    );
    let err = topk_gating_replay_into(&z, 2, 4, &[0, -1, 1, 2], &cfg, &mut w).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { arg: "indices", .. }),
        "{err:?}"
    );
    let err = topk_gating_replay_into(&z, 2, 4, &[1, 2, 3, 3], &cfg, &mut w).unwrap_err();
    assert!(err.to_string().contains("repeated"), "{err}");
    let err = topk_gating_backward_into(&z, 2, 4, &[1, 1, 3, 2], &[0.0; 4], &cfg, &mut [0f32; 8])
        .unwrap_err();
    assert!(err.to_string().contains("repeated"), "{err}");
}

#[test]
fn rejects_non_contiguous_views() {
    let z = Array2::<f32>::zeros((4, 6));
    let v = z.slice(ndarray::s![.., ..3]);
    let err = topk_gating(v, None, &TopkGatingConfig::new(1)).unwrap_err();
    assert!(
        matches!(err, Error::Layout { arg: "logits", .. }),
        "{err:?}"
    );
    let bias = Array1::<f32>::zeros(12);
    let err = topk_gating(
        z.view(),
        Some(bias.slice(ndarray::s![..;2])),
        &TopkGatingConfig::new(1),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Layout {
                arg: "expert_bias",
                ..
            }
        ),
        "{err:?}"
    );
    let _ = array![[1.0f32]];
}
