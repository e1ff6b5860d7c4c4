//! Auxiliary load-balance loss (Switch/GShard and sequence-level): hand-computed
//! cases, independent f64 references (ours, HF Mixtral's and DeepSeek's formulas),
//! finite-difference gradients, half-precision inputs, thread independence and every
//! bad input.

mod common;

use common::{assert_close, finite_diff, with_threads, Rng};
use half::{bf16, f16};
use moe_router::{
    aux_loss, aux_loss_backward, aux_loss_backward_into, seq_aux_loss, seq_aux_loss_backward,
    seq_aux_loss_backward_into, AuxLossConfig, Error, RouterFloat, RouterLogits, ScoreFunction,
};
use ndarray::Array2;
use proptest::prelude::*;

// ---------------------------------------------------------------- f64 reference

/// Aux scores of one token in f64.
fn ref_scores(z: &[f64], sf: ScoreFunction) -> Vec<f64> {
    match sf {
        ScoreFunction::Softmax => {
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|v| (v - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        }
        ScoreFunction::Sigmoid => {
            let s: Vec<f64> = z.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let d: f64 = s.iter().sum::<f64>() + 1e-20;
            s.iter().map(|v| v / d).collect()
        }
    }
}

/// Indices of the k largest entries (lower index first on ties).
fn ref_topk(p: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..p.len()).collect();
    idx.sort_by(|&a, &b| p[b].partial_cmp(&p[a]).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

fn is_pad(mask: Option<&[bool]>, t: usize) -> bool {
    mask.is_some_and(|m| m[t])
}

/// Per-segment (scores sum, counts, valid) in f64.
fn ref_stats(
    z: &[f64],
    t_n: usize,
    e_n: usize,
    seq_len: usize,
    mask: Option<&[bool]>,
    k: usize,
    sf: ScoreFunction,
) -> (Vec<f64>, Vec<i64>, Vec<usize>) {
    let b_n = if t_n == 0 { 0 } else { t_n / seq_len };
    let mut sums = vec![0.0; b_n * e_n];
    let mut counts = vec![0i64; b_n * e_n];
    let mut valid = vec![0usize; b_n];
    for t in 0..t_n {
        if is_pad(mask, t) {
            continue;
        }
        let b = t / seq_len;
        let p = ref_scores(&z[t * e_n..(t + 1) * e_n], sf);
        valid[b] += 1;
        for e in 0..e_n {
            sums[b * e_n + e] += p[e];
        }
        for e in ref_topk(&p, k) {
            counts[b * e_n + e] += 1;
        }
    }
    (sums, counts, valid)
}

/// Switch loss in f64 with the given counts and T_total.
fn ref_switch(
    z: &[f64],
    t_n: usize,
    e_n: usize,
    mask: Option<&[bool]>,
    counts: &[i64],
    total: usize,
    cfg: &AuxLossConfig,
) -> f64 {
    if total == 0 {
        return 0.0;
    }
    let (sums, _, _) = ref_stats(z, t_n, e_n, t_n.max(1), mask, cfg.topk, cfg.score_function);
    let sums = if sums.is_empty() {
        vec![0.0; e_n]
    } else {
        sums
    };
    let dot: f64 = (0..e_n).map(|e| counts[e] as f64 * sums[e]).sum();
    cfg.coeff as f64 * e_n as f64 / (cfg.topk as f64 * (total * total) as f64) * dot
}

/// Sequence-level loss in f64 with the given per-sequence counts.
fn ref_seq(
    z: &[f64],
    t_n: usize,
    e_n: usize,
    seq_len: usize,
    mask: Option<&[bool]>,
    counts: &[i64],
    cfg: &AuxLossConfig,
) -> f64 {
    let (sums, _, valid) = ref_stats(z, t_n, e_n, seq_len, mask, cfg.topk, cfg.score_function);
    let mut total = 0.0;
    let mut n = 0;
    for (b, &v) in valid.iter().enumerate() {
        if v == 0 {
            continue;
        }
        let dot: f64 = (0..e_n)
            .map(|e| counts[b * e_n + e] as f64 * sums[b * e_n + e])
            .sum();
        total += cfg.coeff as f64 * e_n as f64 / (cfg.topk as f64 * (v * v) as f64) * dot;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        total / n as f64
    }
}

fn to64<T: RouterFloat>(z: &[T]) -> Vec<f64> {
    z.iter().map(|v| v.to_f32() as f64).collect()
}

fn grads64<T: RouterFloat>(g: &[T]) -> Vec<f64> {
    to64(g)
}

fn random_mask(rng: &mut Rng, t_n: usize, rate: f64) -> Vec<bool> {
    (0..t_n).map(|_| rng.uniform() < rate).collect()
}

const MODES: [ScoreFunction; 2] = [ScoreFunction::Softmax, ScoreFunction::Sigmoid];

// ---------------------------------------------------------------- hand-computed

/// Two tokens, two experts, k = 1: `P = [1/2, 1/2]`, `[3/4, 1/4]`; both tokens pick
/// expert 0 (tie at token 0 goes to the lower index), `c = [2, 0]`,
/// `Σ_t P = [5/4, 3/4]`, `L = 2 / (1 · 2²) · 2 · 5/4 = 5/4`.
#[test]
fn hand_softmax_switch() {
    let z = [0.0f32, 0.0, 3f32.ln(), 0.0];
    let out = aux_loss(&z, 2, 2, None, None, None, &AuxLossConfig::new(1)).unwrap();
    assert_eq!(out.counts, vec![2, 0]);
    assert_eq!(out.total_tokens, 2);
    assert_close(
        &[out.scores_sum[0] as f64, out.scores_sum[1] as f64],
        &[1.25, 0.75],
        1e-6,
        1e-7,
        "scores_sum",
    );
    assert!((out.loss - 1.25).abs() < 1e-6, "{}", out.loss);
    // coeff scales linearly
    let out = aux_loss(
        &z,
        2,
        2,
        None,
        None,
        None,
        &AuxLossConfig::new(1).coeff(0.01),
    )
    .unwrap();
    assert!((out.loss - 0.0125).abs() < 1e-8, "{}", out.loss);
}

/// Same logits, token 1 is padding: `T = 1`, `c = [1, 0]`, `Σ P = [1/2, 1/2]`,
/// `L = 2 / 1 · 1 · 1/2 = 1`.
#[test]
fn hand_padding_mask() {
    let z = [0.0f32, 0.0, 3f32.ln(), 0.0];
    let out = aux_loss(
        &z,
        2,
        2,
        Some(&[false, true]),
        None,
        None,
        &AuxLossConfig::new(1),
    )
    .unwrap();
    assert_eq!(out.counts, vec![1, 0]);
    assert_eq!(out.total_tokens, 1);
    assert_eq!(out.scores_sum, vec![0.5, 0.5]);
    assert!((out.loss - 1.0).abs() < 1e-6, "{}", out.loss);
}

/// Sigmoid router, one token, three experts at 0: `σ = 1/2`, `P = 1/3` each; k = 2
/// picks experts 0 and 1 (ties), `L = coeff · 3 / (2 · 1) · (1/3 + 1/3) = coeff`.
#[test]
fn hand_sigmoid() {
    let z = [0.0f32; 3];
    let cfg = AuxLossConfig::new(2)
        .score_function(ScoreFunction::Sigmoid)
        .coeff(0.01);
    let out = aux_loss(&z, 1, 3, None, None, None, &cfg).unwrap();
    assert_eq!(out.counts, vec![1, 1, 0]);
    assert!((out.loss - 0.01).abs() < 1e-8, "{}", out.loss);
    // sigmoid scores are normalised over experts, not softmax: z = [ln 3, 0] gives
    // σ = [3/4, 1/2], P = [3/5, 2/5] (softmax would give [3/4, 1/4])
    let z = [3f32.ln(), 0.0];
    let cfg = AuxLossConfig::new(1).score_function(ScoreFunction::Sigmoid);
    let out = aux_loss(&z, 1, 2, None, None, None, &cfg).unwrap();
    assert_close(
        &[out.scores_sum[0] as f64, out.scores_sum[1] as f64],
        &[0.6, 0.4],
        1e-6,
        1e-7,
        "P",
    );
    // L = 2 / 1 · 1 · 3/5
    assert!((out.loss - 1.2).abs() < 1e-6, "{}", out.loss);
}

/// Caller counts covering 8 tokens: `L = 2 / (1 · 64) · (3 · 5/4 + 5 · 3/4) = 15/64`.
#[test]
fn hand_caller_counts_and_total() {
    let z = [0.0f32, 0.0, 3f32.ln(), 0.0];
    let out = aux_loss(
        &z,
        2,
        2,
        None,
        Some(&[3, 5]),
        Some(8),
        &AuxLossConfig::new(1),
    )
    .unwrap();
    assert_eq!(out.counts, vec![3, 5]);
    assert_eq!(out.total_tokens, 8);
    assert!((out.loss - 15.0 / 64.0).abs() < 1e-7, "{}", out.loss);
    // counts without total: T_total = valid tokens = 2: L = 2/4 · 7.5
    let out = aux_loss(&z, 2, 2, None, Some(&[3, 5]), None, &AuxLossConfig::new(1)).unwrap();
    assert_eq!(out.total_tokens, 2);
    assert!((out.loss - 3.75).abs() < 1e-6, "{}", out.loss);
}

/// `total_tokens` is the number of tokens the caller's counts cover: without counts
/// the loss would use this batch's own counts with another batch's `T_total` (a loss
/// off by `(T / T_total)²`), so it is an error naming `total_tokens` and `counts`.
#[test]
fn total_tokens_without_counts_is_an_error() {
    let z = [0.0f32; 6 * 8];
    for total in [1usize, 6, 1000] {
        let err = aux_loss(&z, 6, 8, None, None, Some(total), &AuxLossConfig::new(2)).unwrap_err();
        assert!(
            matches!(
                &err,
                Error::InvalidArgument {
                    arg: "total_tokens",
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("total_tokens") && msg.contains("requires `counts`"),
            "{msg}"
        );
    }
    // With counts it is what the counts cover; without either, the valid tokens.
    let c = [1i64; 8];
    let cfg = AuxLossConfig::new(2);
    assert_eq!(
        aux_loss(&z, 6, 8, None, Some(&c), Some(1), &cfg)
            .unwrap()
            .total_tokens,
        1
    );
    assert_eq!(
        aux_loss(&z, 6, 8, None, None, None, &cfg)
            .unwrap()
            .total_tokens,
        6
    );
}

/// Uniform scores: `Σ_t P[t, e] = T / E` and `Σ_e c_e = k T`, so `L = coeff` whatever
/// the counts are (the loss's minimum for balanced routing).
#[test]
fn uniform_scores_give_coeff() {
    let (t_n, e_n) = (5, 4);
    let z = vec![0.0f32; t_n * e_n];
    for sf in MODES {
        let cfg = AuxLossConfig::new(2).score_function(sf).coeff(0.3);
        let out = aux_loss(&z, t_n, e_n, None, None, None, &cfg).unwrap();
        assert_eq!(out.counts, vec![5, 5, 0, 0]);
        assert!((out.loss - 0.3).abs() < 1e-6, "{sf:?}: {}", out.loss);
        let out = aux_loss(&z, t_n, e_n, None, Some(&[1, 2, 3, 4]), None, &cfg).unwrap();
        assert!((out.loss - 0.3).abs() < 1e-6, "{sf:?}: {}", out.loss);
    }
}

/// One token, `z = [0, 0]`, k = 1: `P = [1/2, 1/2]`, `c = [1, 0]`,
/// `g = ∂L/∂P = E / (k T²) · c = [2, 0]`, `<g, P> = 1`, `dz = P (g − 1) = [1/2, −1/2]`.
/// Sigmoid: `s = [1/2, 1/2]`, `D = 1`, `<g, s> = 1`, `∂L/∂s = (g − 1) / 1 = [1, −1]`,
/// `dz = ∂L/∂s · 1/4 = [1/4, −1/4]`.
#[test]
fn hand_gradient() {
    let z = [0.0f32, 0.0];
    let mut g = [0.0f32; 2];
    aux_loss_backward_into(
        RouterLogits::new(&z, 1, 2),
        &[1, 0],
        1,
        &AuxLossConfig::new(1),
        1.0,
        &mut g,
    )
    .unwrap();
    assert_close(
        &[g[0] as f64, g[1] as f64],
        &[0.5, -0.5],
        1e-6,
        1e-7,
        "softmax dz",
    );
    let cfg = AuxLossConfig::new(1).score_function(ScoreFunction::Sigmoid);
    aux_loss_backward_into(RouterLogits::new(&z, 1, 2), &[1, 0], 1, &cfg, 2.0, &mut g).unwrap();
    assert_close(
        &[g[0] as f64, g[1] as f64],
        &[0.5, -0.5],
        1e-6,
        1e-7,
        "sigmoid dz (grad_loss 2)",
    );
}

/// Two sequences of two tokens: sequence 0 is the `hand_softmax_switch` case
/// (`L_0 = 5/4`), sequence 1 is uniform (`L_1 = coeff = 1`); mean `9/8`. With sequence
/// 1 all padding only sequence 0 counts; with everything padding the loss is 0.
#[test]
fn hand_seq_aux() {
    let z = [0.0f32, 0.0, 3f32.ln(), 0.0, 0.0, 0.0, 0.0, 0.0];
    let cfg = AuxLossConfig::new(1);
    let out = seq_aux_loss(&z, 4, 2, 2, None, None, &cfg).unwrap();
    assert_eq!(out.counts, vec![2, 0, 2, 0]);
    assert_eq!(out.valid_tokens, vec![2, 2]);
    assert_eq!(out.scores_sum, vec![1.25, 0.75, 1.0, 1.0]);
    assert!((out.loss - 1.125).abs() < 1e-6, "{}", out.loss);

    let mask = [false, false, true, true];
    let out = seq_aux_loss(&z, 4, 2, 2, Some(&mask), None, &cfg).unwrap();
    assert_eq!(out.valid_tokens, vec![2, 0]);
    assert_eq!(out.counts, vec![2, 0, 0, 0]);
    assert!((out.loss - 1.25).abs() < 1e-6, "{}", out.loss);
    let mut g = vec![1.0f32; 8];
    seq_aux_loss_backward_into(
        RouterLogits::new(&z, 4, 2).padding_mask(Some(&mask)),
        2,
        &out.counts,
        &cfg,
        1.0,
        &mut g,
    )
    .unwrap();
    assert_eq!(&g[4..], &[0.0; 4]);

    // token 1 of sequence 0 padded too: sequence 0 is `hand_padding_mask` (L = 1)
    let mask = [false, true, true, true];
    let out = seq_aux_loss(&z, 4, 2, 2, Some(&mask), None, &cfg).unwrap();
    assert!((out.loss - 1.0).abs() < 1e-6, "{}", out.loss);

    let out = seq_aux_loss(&z, 4, 2, 2, Some(&[true; 4]), None, &cfg).unwrap();
    assert_eq!(out.loss, 0.0);
    assert_eq!(out.valid_tokens, vec![0, 0]);
    seq_aux_loss_backward_into(
        RouterLogits::new(&z, 4, 2).padding_mask(Some(&[true; 4])),
        2,
        &out.counts,
        &cfg,
        1.0,
        &mut g,
    )
    .unwrap();
    assert_eq!(g, vec![0.0; 8]);
}

// ---------------------------------------------------------------- other formulations

/// HF Mixtral `load_balancing_loss_func`, written as in transformers:
/// `expert_mask = one_hot(top_k(softmax(z)))  [T, k, E]`,
/// `tokens_per_expert = Σ_t expert_mask · am / Σ_t am  [k, E]`,
/// `router_prob_per_expert = Σ_t P · am / Σ_t am  [E]`,
/// `loss = Σ_{j,e} tokens_per_expert[j, e] · router_prob_per_expert[e] · E`
/// (`am` = attention mask, 1 for real tokens).
fn hf_mixtral(z: &[f64], t_n: usize, e_n: usize, k: usize, attention_mask: Option<&[bool]>) -> f64 {
    let am: Vec<f64> = (0..t_n)
        .map(|t| attention_mask.map_or(1.0, |m| if m[t] { 1.0 } else { 0.0 }))
        .collect();
    let denom: f64 = am.iter().sum();
    let mut tokens_per_expert = vec![vec![0.0; e_n]; k];
    let mut router_prob = vec![0.0; e_n];
    for t in 0..t_n {
        let p = ref_scores(&z[t * e_n..(t + 1) * e_n], ScoreFunction::Softmax);
        let sel = ref_topk(&p, k);
        for (j, &e) in sel.iter().enumerate() {
            tokens_per_expert[j][e] += am[t];
        }
        for e in 0..e_n {
            router_prob[e] += p[e] * am[t];
        }
    }
    let mut loss = 0.0;
    for row in &tokens_per_expert {
        for e in 0..e_n {
            loss += (row[e] / denom) * (router_prob[e] / denom);
        }
    }
    loss * e_n as f64
}

#[test]
fn hf_mixtral_equals_coeff_k() {
    let mut rng = Rng::new(11);
    for &(t_n, e_n, k) in &[(7usize, 8usize, 2usize), (33, 5, 1), (20, 6, 3)] {
        let z = rng.normal_vec(t_n * e_n, 1.3);
        let z64 = to64(&z);
        let cfg = AuxLossConfig::new(k).coeff(k as f32);
        let out = aux_loss(&z, t_n, e_n, None, None, None, &cfg).unwrap();
        let hf = hf_mixtral(&z64, t_n, e_n, k, None);
        assert!(
            ((out.loss as f64) - hf).abs() <= 1e-5 * hf.abs(),
            "T={t_n}: {} vs HF {hf}",
            out.loss
        );
        // with an attention mask (HF: 1 = keep, ours: true = padding)
        let pad = random_mask(&mut rng, t_n, 0.3);
        let keep: Vec<bool> = pad.iter().map(|p| !p).collect();
        let out = aux_loss(&z, t_n, e_n, Some(&pad), None, None, &cfg).unwrap();
        let hf = hf_mixtral(&z64, t_n, e_n, k, Some(&keep));
        assert!(
            ((out.loss as f64) - hf).abs() <= 1e-5 * hf.abs(),
            "T={t_n} masked: {} vs HF {hf}",
            out.loss
        );
    }
}

/// DeepSeek-V2 `MoEGate` sequence auxiliary loss, as written there:
/// `ce[b, e] = Σ_s 1[e ∈ topk(t)] / (S · k / E)`, `aux = mean_b Σ_e ce[b, e] ·
/// mean_s P[b, s, e] · alpha`.
fn deepseek_seq_aux(
    z: &[f64],
    b_n: usize,
    s_n: usize,
    e_n: usize,
    k: usize,
    alpha: f64,
    sf: ScoreFunction,
) -> f64 {
    let mut total = 0.0;
    for b in 0..b_n {
        let mut ce = vec![0.0; e_n];
        let mut mean_p = vec![0.0; e_n];
        for s in 0..s_n {
            let t = b * s_n + s;
            let p = ref_scores(&z[t * e_n..(t + 1) * e_n], sf);
            for e in ref_topk(&p, k) {
                ce[e] += 1.0;
            }
            for e in 0..e_n {
                mean_p[e] += p[e] / s_n as f64;
            }
        }
        for c in ce.iter_mut() {
            *c /= s_n as f64 * k as f64 / e_n as f64;
        }
        total += (0..e_n).map(|e| ce[e] * mean_p[e]).sum::<f64>();
    }
    total / b_n as f64 * alpha
}

#[test]
fn deepseek_seq_aux_matches() {
    let mut rng = Rng::new(12);
    for sf in MODES {
        for &(b_n, s_n, e_n, k) in &[
            (3usize, 5usize, 8usize, 2usize),
            (2, 17, 6, 3),
            (4, 1, 4, 1),
        ] {
            let z = rng.normal_vec(b_n * s_n * e_n, 1.0);
            let cfg = AuxLossConfig::new(k).score_function(sf).coeff(1e-3);
            let out = seq_aux_loss(&z, b_n * s_n, e_n, s_n, None, None, &cfg).unwrap();
            let ds = deepseek_seq_aux(&to64(&z), b_n, s_n, e_n, k, 1e-3, sf);
            assert!(
                ((out.loss as f64) - ds).abs() <= 1e-5 * ds.abs(),
                "{sf:?} B={b_n}: {} vs {ds}",
                out.loss
            );
        }
    }
}

// ---------------------------------------------------------------- forward vs f64

fn check_forward(z: &[f32], t_n: usize, e_n: usize, mask: Option<&[bool]>, cfg: &AuxLossConfig) {
    let z64 = to64(z);
    let (sums, counts, valid) = ref_stats(
        &z64,
        t_n,
        e_n,
        t_n.max(1),
        mask,
        cfg.topk,
        cfg.score_function,
    );
    let v = valid.first().copied().unwrap_or(0);
    let out = aux_loss(z, t_n, e_n, mask, None, None, cfg).unwrap();
    let counts = if counts.is_empty() {
        vec![0; e_n]
    } else {
        counts
    };
    assert_eq!(out.counts, counts, "counts");
    assert_eq!(out.total_tokens, v);
    assert_eq!(out.counts.iter().sum::<i64>(), (cfg.topk * v) as i64);
    let sums = if sums.is_empty() {
        vec![0.0; e_n]
    } else {
        sums
    };
    let got: Vec<f64> = out.scores_sum.iter().map(|&s| s as f64).collect();
    assert_close(&got, &sums, 1e-5, 1e-6, "scores_sum");
    let want = ref_switch(&z64, t_n, e_n, mask, &counts, v, cfg);
    assert_close(&[out.loss as f64], &[want], 1e-5, 1e-7, "loss");
    assert!(out.loss >= 0.0);
    // the same counts and T passed explicitly give the same loss, bitwise
    let out2 = aux_loss(
        z,
        t_n,
        e_n,
        mask,
        Some(&out.counts),
        (v > 0).then_some(v),
        cfg,
    )
    .unwrap();
    assert_eq!(out2.loss.to_bits(), out.loss.to_bits());
    // the sequence-level loss of one sequence is the global loss
    if t_n > 0 {
        let seq = seq_aux_loss(z, t_n, e_n, t_n, mask, None, cfg).unwrap();
        assert_eq!(seq.counts, out.counts);
        assert_eq!(seq.loss.to_bits(), out.loss.to_bits());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn forward_matches_f64_reference(
        t_n in 0usize..70,
        e_n in 1usize..12,
        kf in 0.0f64..1.0,
        sigmoid in any::<bool>(),
        masked in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let k = 1 + ((e_n as f64 * kf) as usize).min(e_n - 1);
        let mut rng = Rng::new(seed);
        let z = rng.normal_vec(t_n * e_n, 2.0);
        let mask = random_mask(&mut rng, t_n, 0.3);
        let sf = if sigmoid { ScoreFunction::Sigmoid } else { ScoreFunction::Softmax };
        let cfg = AuxLossConfig::new(k).score_function(sf).coeff(0.7);
        check_forward(&z, t_n, e_n, masked.then_some(&mask[..]), &cfg);
    }

    #[test]
    fn seq_forward_matches_f64_reference(
        b_n in 0usize..6,
        s_n in 1usize..20,
        e_n in 1usize..10,
        sigmoid in any::<bool>(),
        caller_counts in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let t_n = b_n * s_n;
        let k = 1 + (seed as usize % e_n);
        let mut rng = Rng::new(seed);
        let z = rng.normal_vec(t_n * e_n, 2.0);
        let mask = random_mask(&mut rng, t_n, 0.4);
        let sf = if sigmoid { ScoreFunction::Sigmoid } else { ScoreFunction::Softmax };
        let cfg = AuxLossConfig::new(k).score_function(sf).coeff(0.5);
        let z64 = to64(&z);
        let (sums, counts, valid) = ref_stats(&z64, t_n, e_n, s_n, Some(&mask), k, sf);
        let counts = if caller_counts {
            (0..b_n * e_n).map(|_| rng.below(9) as i64).collect()
        } else {
            counts
        };
        let out = seq_aux_loss(&z, t_n, e_n, s_n, Some(&mask), caller_counts.then_some(&counts[..]), &cfg).unwrap();
        prop_assert_eq!(&out.counts, &counts);
        prop_assert_eq!(&out.valid_tokens, &valid);
        let got: Vec<f64> = out.scores_sum.iter().map(|&s| s as f64).collect();
        assert_close(&got, &sums, 1e-5, 1e-6, "scores_sum");
        let want = ref_seq(&z64, t_n, e_n, s_n, Some(&mask), &counts, &cfg);
        assert_close(&[out.loss as f64], &[want], 1e-5, 1e-7, "seq loss");
    }
}

#[test]
fn forward_caller_counts_and_total_vs_reference() {
    let mut rng = Rng::new(3);
    let (t_n, e_n) = (40, 7);
    let z = rng.normal_vec(t_n * e_n, 1.5);
    let mask = random_mask(&mut rng, t_n, 0.25);
    for sf in MODES {
        let cfg = AuxLossConfig::new(3).score_function(sf).coeff(0.2);
        let counts: Vec<i64> = (0..e_n).map(|_| rng.below(200) as i64).collect();
        let out = aux_loss(&z, t_n, e_n, Some(&mask), Some(&counts), Some(1000), &cfg).unwrap();
        assert_eq!(out.counts, counts);
        assert_eq!(out.total_tokens, 1000);
        let want = ref_switch(&to64(&z), t_n, e_n, Some(&mask), &counts, 1000, &cfg);
        assert_close(&[out.loss as f64], &[want], 1e-5, 1e-9, "loss");
    }
}

// ---------------------------------------------------------------- gradients

const RTOL: f64 = 1e-3;
const ATOL: f64 = 1e-5;

#[test]
fn gradient_global_finite_differences() {
    let mut rng = Rng::new(21);
    let (t_n, e_n) = (13, 6);
    let z = rng.normal_vec(t_n * e_n, 1.5);
    let z64 = to64(&z);
    let mask = random_mask(&mut rng, t_n, 0.3);
    let caller: Vec<i64> = (0..e_n).map(|_| rng.below(50) as i64).collect();
    for sf in MODES {
        for masked in [false, true] {
            for use_caller in [false, true] {
                let m = masked.then_some(&mask[..]);
                let cfg = AuxLossConfig::new(2).score_function(sf).coeff(0.37);
                let (counts, total) = if use_caller {
                    (Some(&caller[..]), Some(60))
                } else {
                    (None, None)
                };
                let out = aux_loss(&z, t_n, e_n, m, counts, total, &cfg).unwrap();
                let grad_loss = 1.7f32;
                let mut g = vec![0.0f32; t_n * e_n];
                aux_loss_backward_into(
                    RouterLogits::new(&z, t_n, e_n).padding_mask(m),
                    &out.counts,
                    out.total_tokens,
                    &cfg,
                    grad_loss,
                    &mut g,
                )
                .unwrap();
                let fd = finite_diff(&z64, 1e-5, |x| {
                    grad_loss as f64
                        * ref_switch(x, t_n, e_n, m, &out.counts, out.total_tokens, &cfg)
                });
                let what = format!("{sf:?} masked={masked} caller={use_caller}");
                assert_close(&grads64(&g), &fd, RTOL, ATOL, &what);
                if masked {
                    for t in (0..t_n).filter(|&t| mask[t]) {
                        assert!(
                            g[t * e_n..(t + 1) * e_n].iter().all(|&v| v == 0.0),
                            "{what}: padding token {t}"
                        );
                    }
                }
                // the ndarray form gives the same bits
                let arr = Array2::from_shape_vec((t_n, e_n), z.clone()).unwrap();
                let g2 = aux_loss_backward(
                    arr.view(),
                    m,
                    &out.counts,
                    out.total_tokens,
                    &cfg,
                    grad_loss,
                )
                .unwrap();
                assert_eq!(g2.as_slice().unwrap(), &g[..]);
            }
        }
    }
}

#[test]
fn gradient_seq_finite_differences() {
    let mut rng = Rng::new(22);
    let (b_n, s_n, e_n) = (4, 5, 5);
    let t_n = b_n * s_n;
    let z = rng.normal_vec(t_n * e_n, 1.5);
    let z64 = to64(&z);
    let mut mask = random_mask(&mut rng, t_n, 0.3);
    mask[s_n..2 * s_n].fill(true); // sequence 1 is all padding
    mask[2 * s_n] = false;
    for sf in MODES {
        for masked in [false, true] {
            let m = masked.then_some(&mask[..]);
            let cfg = AuxLossConfig::new(2).score_function(sf).coeff(0.6);
            let out = seq_aux_loss(&z, t_n, e_n, s_n, m, None, &cfg).unwrap();
            let grad_loss = -0.8f32;
            let mut g = vec![0.0f32; t_n * e_n];
            seq_aux_loss_backward_into(
                RouterLogits::new(&z, t_n, e_n).padding_mask(m),
                s_n,
                &out.counts,
                &cfg,
                grad_loss,
                &mut g,
            )
            .unwrap();
            let fd = finite_diff(&z64, 1e-5, |x| {
                grad_loss as f64 * ref_seq(x, t_n, e_n, s_n, m, &out.counts, &cfg)
            });
            let what = format!("seq {sf:?} masked={masked}");
            assert_close(&grads64(&g), &fd, RTOL, ATOL, &what);
            let arr = Array2::from_shape_vec((t_n, e_n), z.clone()).unwrap();
            let g2 =
                seq_aux_loss_backward(arr.view(), s_n, m, &out.counts, &cfg, grad_loss).unwrap();
            assert_eq!(g2.as_slice().unwrap(), &g[..]);
        }
    }
}

// ---------------------------------------------------------------- half precision

fn check_half<T: RouterFloat>(rtol_grad: f64, seed: u64) {
    let mut rng = Rng::new(seed);
    let (t_n, e_n, s_n) = (24, 8, 6);
    let z: Vec<T> = rng
        .normal_vec(t_n * e_n, 2.0)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let z64 = to64(&z);
    let mask = random_mask(&mut rng, t_n, 0.2);
    for sf in MODES {
        let cfg = AuxLossConfig::new(2).score_function(sf).coeff(0.5);
        let out = aux_loss(&z, t_n, e_n, Some(&mask), None, None, &cfg).unwrap();
        let (_, counts, valid) = ref_stats(&z64, t_n, e_n, t_n, Some(&mask), 2, sf);
        assert_eq!(out.counts, counts);
        let want = ref_switch(&z64, t_n, e_n, Some(&mask), &counts, valid[0], &cfg);
        assert_close(&[out.loss as f64], &[want], 1e-5, 1e-7, "half loss");
        let mut g = vec![T::from_f32(0.0); t_n * e_n];
        aux_loss_backward_into(
            RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
            &out.counts,
            out.total_tokens,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap();
        let fd = finite_diff(&z64, 1e-5, |x| {
            ref_switch(x, t_n, e_n, Some(&mask), &counts, valid[0], &cfg)
        });
        assert_close(
            &grads64(&g),
            &fd,
            rtol_grad,
            1e-6,
            &format!("{:?} {sf:?} grad", T::DTYPE),
        );

        let seq = seq_aux_loss(&z, t_n, e_n, s_n, Some(&mask), None, &cfg).unwrap();
        let want = ref_seq(&z64, t_n, e_n, s_n, Some(&mask), &seq.counts, &cfg);
        assert_close(&[seq.loss as f64], &[want], 1e-5, 1e-7, "half seq loss");
        seq_aux_loss_backward_into(
            RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
            s_n,
            &seq.counts,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap();
        let fd = finite_diff(&z64, 1e-5, |x| {
            ref_seq(x, t_n, e_n, s_n, Some(&mask), &seq.counts, &cfg)
        });
        assert_close(
            &grads64(&g),
            &fd,
            rtol_grad,
            1e-6,
            &format!("{:?} {sf:?} seq grad", T::DTYPE),
        );
    }
}

#[test]
fn f16_inputs_vs_f64_reference() {
    // the gradient is computed in f32 and rounded once to f16 (relative error 2^-11)
    check_half::<f16>(1e-3, 31);
}

#[test]
fn bf16_inputs_vs_f64_reference() {
    // rounded once to bf16 (relative error 2^-9)
    check_half::<bf16>(4e-3, 32);
}

// ---------------------------------------------------------------- determinism, edges

#[test]
fn thread_count_independent_bitwise() {
    let mut rng = Rng::new(41);
    let (t_n, e_n, s_n) = (3000, 16, 120);
    let z = rng.normal_vec(t_n * e_n, 2.0);
    let mask = random_mask(&mut rng, t_n, 0.1);
    for sf in MODES {
        let cfg = AuxLossConfig::new(4).score_function(sf).coeff(0.01);
        let run = || {
            let a = aux_loss(&z, t_n, e_n, Some(&mask), None, None, &cfg).unwrap();
            let mut ga = vec![0.0f32; t_n * e_n];
            aux_loss_backward_into(
                RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
                &a.counts,
                a.total_tokens,
                &cfg,
                1.0,
                &mut ga,
            )
            .unwrap();
            let s = seq_aux_loss(&z, t_n, e_n, s_n, Some(&mask), None, &cfg).unwrap();
            let mut gs = vec![0.0f32; t_n * e_n];
            seq_aux_loss_backward_into(
                RouterLogits::new(&z, t_n, e_n).padding_mask(Some(&mask)),
                s_n,
                &s.counts,
                &cfg,
                1.0,
                &mut gs,
            )
            .unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            (
                a.loss.to_bits(),
                a.counts,
                bits(&a.scores_sum),
                bits(&ga),
                s.loss.to_bits(),
                s.counts,
                bits(&s.scores_sum),
                bits(&gs),
            )
        };
        let one = with_threads(1, run);
        let three = with_threads(3, run);
        assert!(
            one == three,
            "{sf:?}: results differ between 1 and 3 threads"
        );
    }
}

#[test]
fn large_logits_are_stable() {
    // |z| = 1000: exp overflows without the max shift; σ saturates to 0 / 1
    let z = [1000.0f32, 1000.0, -1000.0, -1000.0, 1000.0, 1000.0];
    for sf in MODES {
        let cfg = AuxLossConfig::new(1).score_function(sf);
        let out = aux_loss(&z, 2, 3, None, None, None, &cfg).unwrap();
        // P = [1/2, 1/2, 0] and [0, 1/2, 1/2]; c = [1, 1, 0]; L = 3/4 · (1/2 + 1)
        assert_eq!(out.counts, vec![1, 1, 0]);
        assert_eq!(out.scores_sum, vec![0.5, 1.0, 0.5]);
        assert!((out.loss - 1.125).abs() < 1e-6, "{sf:?}: {}", out.loss);
        let mut g = vec![0.0f32; 6];
        aux_loss_backward_into(
            RouterLogits::new(&z, 2, 3),
            &out.counts,
            2,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap();
        assert!(g.iter().all(|v| v.is_finite()), "{sf:?}: {g:?}");
        if sf == ScoreFunction::Softmax {
            // g = 3/4 · [1, 1, 0]; token 0: <g, P> = 3/4, dz = 0; token 1: <g, P> = 3/8,
            // dz = [0, 1/2 · 3/8, −1/2 · 3/8]
            let want = [0.0, 0.0, 0.0, 0.0, 0.1875, -0.1875];
            assert_close(&grads64(&g), &want, 1e-6, 1e-7, "softmax grad");
        }
    }
}

#[test]
fn empty_and_all_padding() {
    for sf in MODES {
        let cfg = AuxLossConfig::new(2).score_function(sf);
        let out = aux_loss::<f32>(&[], 0, 4, None, None, None, &cfg).unwrap();
        assert_eq!(out.loss, 0.0);
        assert_eq!(out.counts, vec![0; 4]);
        assert_eq!(out.scores_sum, vec![0.0; 4]);
        assert_eq!(out.total_tokens, 0);
        aux_loss_backward_into::<f32>(
            RouterLogits::new(&[], 0, 4),
            &out.counts,
            0,
            &cfg,
            1.0,
            &mut [],
        )
        .unwrap();
        let out = aux_loss::<f32>(&[], 0, 4, None, Some(&[1, 2, 3, 4]), Some(10), &cfg).unwrap();
        assert_eq!(out.loss, 0.0);
        let seq = seq_aux_loss::<f32>(&[], 0, 4, 3, None, None, &cfg).unwrap();
        assert_eq!(seq.loss, 0.0);
        assert!(seq.counts.is_empty() && seq.valid_tokens.is_empty());
        seq_aux_loss_backward_into::<f32>(RouterLogits::new(&[], 0, 4), 3, &[], &cfg, 1.0, &mut [])
            .unwrap();

        // every token padding: loss 0, gradient 0, total_tokens 0 accepted by backward
        let z = [0.3f32, -1.0, 2.0, 0.5, 1.0, 1.0, -2.0, 0.0];
        let out = aux_loss(&z, 2, 4, Some(&[true, true]), None, None, &cfg).unwrap();
        assert_eq!((out.loss, out.total_tokens), (0.0, 0));
        let mut g = vec![7.0f32; 8];
        aux_loss_backward_into(
            RouterLogits::new(&z, 2, 4).padding_mask(Some(&[true, true])),
            &out.counts,
            0,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap();
        assert_eq!(g, vec![0.0; 8]);
    }
}

#[test]
fn nan_logits_do_not_break_counts() {
    // a NaN score ranks lowest: the token still gets k distinct experts
    let z = [f32::NAN, 1.0, 0.0, f32::NAN, f32::NAN, f32::NAN];
    let cfg = AuxLossConfig::new(2).score_function(ScoreFunction::Sigmoid);
    let out = aux_loss(&z, 2, 3, None, None, None, &cfg).unwrap();
    assert_eq!(out.counts.iter().sum::<i64>(), 4);
    assert!(out.counts.iter().all(|&c| (0..=2).contains(&c)));
    let mut g = vec![0.0f32; 6];
    aux_loss_backward_into(
        RouterLogits::new(&z, 2, 3),
        &out.counts,
        2,
        &cfg,
        1.0,
        &mut g,
    )
    .unwrap();
}

// ---------------------------------------------------------------- bad input

fn invalid(err: Error, arg: &str) {
    match &err {
        Error::InvalidArgument { arg: a, .. } => assert_eq!(*a, arg, "{err}"),
        other => panic!("expected InvalidArgument for {arg}, got {other:?}"),
    }
    assert!(err.to_string().contains(arg), "{err}");
}

fn shape(err: Error, arg: &str) {
    match &err {
        Error::Shape { arg: a, .. } => assert_eq!(*a, arg, "{err}"),
        other => panic!("expected Shape for {arg}, got {other:?}"),
    }
    assert!(err.to_string().contains(arg), "{err}");
}

#[test]
fn bad_inputs() {
    let z = vec![0.5f32; 4 * 3];
    let cfg = AuxLossConfig::new(2);
    let mut g = vec![0.0f32; 12];
    // config
    invalid(
        aux_loss(&z, 4, 3, None, None, None, &AuxLossConfig::new(0)).unwrap_err(),
        "topk",
    );
    let err = aux_loss(&z, 4, 3, None, None, None, &AuxLossConfig::new(4)).unwrap_err();
    assert!(err.to_string().contains("1..=3"), "{err}");
    invalid(err, "topk");
    invalid(
        aux_loss::<f32>(&[], 4, 0, None, None, None, &cfg).unwrap_err(),
        "num_experts",
    );
    invalid(
        aux_loss(&z, 4, 3, None, None, None, &cfg.coeff(f32::NAN)).unwrap_err(),
        "coeff",
    );
    invalid(
        aux_loss(&z, 4, 3, None, None, None, &cfg.coeff(f32::INFINITY)).unwrap_err(),
        "coeff",
    );
    // shapes
    shape(
        aux_loss(&z, 5, 3, None, None, None, &cfg).unwrap_err(),
        "logits",
    );
    shape(
        aux_loss(&z, usize::MAX, 3, None, None, None, &cfg).unwrap_err(),
        "logits",
    );
    shape(
        aux_loss(&z, 4, 3, Some(&[false; 3]), None, None, &cfg).unwrap_err(),
        "padding_mask",
    );
    shape(
        aux_loss(&z, 4, 3, None, Some(&[1, 2]), None, &cfg).unwrap_err(),
        "counts",
    );
    invalid(
        aux_loss(&z, 4, 3, None, Some(&[1, -2, 0]), None, &cfg).unwrap_err(),
        "counts",
    );
    invalid(
        aux_loss(&z, 4, 3, None, None, Some(0), &cfg).unwrap_err(),
        "total_tokens",
    );
    // backward
    shape(
        aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3),
            &[1, 1, 1],
            4,
            &cfg,
            1.0,
            &mut g[..11],
        )
        .unwrap_err(),
        "grad_logits",
    );
    shape(
        aux_loss_backward_into(RouterLogits::new(&z, 4, 3), &[1, 1], 4, &cfg, 1.0, &mut g)
            .unwrap_err(),
        "counts",
    );
    invalid(
        aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3),
            &[1, -1, 1],
            4,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap_err(),
        "counts",
    );
    invalid(
        aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3),
            &[1, 1, 1],
            0,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap_err(),
        "total_tokens",
    );
    invalid(
        aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3),
            &[1, 1, 1],
            4,
            &AuxLossConfig::new(0),
            1.0,
            &mut g,
        )
        .unwrap_err(),
        "topk",
    );
    shape(
        aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3).padding_mask(Some(&[false])),
            &[1, 1, 1],
            4,
            &cfg,
            1.0,
            &mut g,
        )
        .unwrap_err(),
        "padding_mask",
    );
    // sequence level
    invalid(
        seq_aux_loss(&z, 4, 3, 0, None, None, &cfg).unwrap_err(),
        "seq_len",
    );
    let err = seq_aux_loss(&z, 4, 3, 3, None, None, &cfg).unwrap_err();
    assert!(err.to_string().contains("divide"), "{err}");
    invalid(err, "seq_len");
    shape(
        seq_aux_loss(&z, 4, 3, 2, None, Some(&[1, 1, 1]), &cfg).unwrap_err(),
        "counts",
    );
    invalid(
        seq_aux_loss(&z, 4, 3, 2, None, Some(&[1, 1, 1, 1, -1, 1]), &cfg).unwrap_err(),
        "counts",
    );
    invalid(
        seq_aux_loss(&z, 4, 3, 2, None, None, &AuxLossConfig::new(9)).unwrap_err(),
        "topk",
    );
    shape(
        seq_aux_loss(&z, 4, 3, 2, Some(&[true]), None, &cfg).unwrap_err(),
        "padding_mask",
    );
    shape(
        seq_aux_loss(&z[..9], 4, 3, 2, None, None, &cfg).unwrap_err(),
        "logits",
    );
    shape(
        seq_aux_loss_backward_into(
            RouterLogits::new(&z, 4, 3),
            2,
            &[1; 6],
            &cfg,
            1.0,
            &mut g[..3],
        )
        .unwrap_err(),
        "grad_logits",
    );
    shape(
        seq_aux_loss_backward_into(RouterLogits::new(&z, 4, 3), 2, &[1; 3], &cfg, 1.0, &mut g)
            .unwrap_err(),
        "counts",
    );
    invalid(
        seq_aux_loss_backward_into(RouterLogits::new(&z, 4, 3), 3, &[1; 6], &cfg, 1.0, &mut g)
            .unwrap_err(),
        "seq_len",
    );
    // non-contiguous view in the ndarray form
    let arr = Array2::from_shape_vec((3, 4), z.clone()).unwrap();
    let err = aux_loss_backward(arr.t(), None, &[1, 1, 1], 4, &cfg, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::Layout { arg: "logits", .. }),
        "{err:?}"
    );
    let err = seq_aux_loss_backward(arr.t(), 2, None, &[1; 6], &cfg, 1.0).unwrap_err();
    assert!(
        matches!(err, Error::Layout { arg: "logits", .. }),
        "{err:?}"
    );
}
