//! Panic hunt: every public op, fed arbitrary sizes, lengths that may not match,
//! arbitrary options and arbitrary values (NaN, ±Inf, out-of-range indices), must
//! return `Ok` or `Err` — never panic. proptest reports any panic as a failure.
//! Whenever a call succeeds, its index outputs must be in range.

mod common;

use common::Rng;
use moe_router::*;
use proptest::prelude::*;

/// A length that is usually right and sometimes off by a little.
fn len(rng: &mut Rng, n: usize) -> usize {
    match rng.below(8) {
        0 => n + 1,
        1 => n.saturating_sub(1),
        _ => n,
    }
}

fn floats(rng: &mut Rng, n: usize) -> Vec<f32> {
    let pool = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        0.5,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        100.0,
        1e-30,
    ];
    (0..n)
        .map(|_| {
            if rng.below(3) == 0 {
                pool[rng.below(pool.len())]
            } else {
                rng.range(-4.0, 4.0) as f32
            }
        })
        .collect()
}

fn ints(rng: &mut Rng, n: usize, hi: usize) -> Vec<i32> {
    (0..n)
        .map(|_| match rng.below(10) {
            0 => -1,
            1 => hi as i32,
            2 => i32::MIN,
            _ => rng.below(hi.max(1)) as i32,
        })
        .collect()
}

/// `floats` of a usually-right length.
fn fl(rng: &mut Rng, n: usize) -> Vec<f32> {
    let m = len(rng, n);
    floats(rng, m)
}

/// `ints` of a usually-right length.
fn il(rng: &mut Rng, n: usize, hi: usize) -> Vec<i32> {
    let m = len(rng, n);
    ints(rng, m, hi)
}

fn small(rng: &mut Rng, hi: usize) -> usize {
    rng.below(hi + 1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn gating_never_panics(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let (t, e, k) = (small(&mut r, 20), small(&mut r, 40), small(&mut r, 12));
        let z = fl(&mut r, t * e);
        let mut cfg = TopkGatingConfig::new(k)
            .score_function(if r.below(2) == 0 { ScoreFunction::Softmax } else { ScoreFunction::Sigmoid })
            .pre_softmax(r.below(2) == 0)
            .normalize(r.below(2) == 0)
            .scaling_factor(floats(&mut r, 1)[0]);
        if r.below(2) == 0 { cfg = cfg.group_limit(small(&mut r, 8), small(&mut r, 8)); }
        if r.below(3) == 0 { cfg = cfg.noise(floats(&mut r, 1)[0], seed, 1); }
        if r.below(3) == 0 { cfg = cfg.expert_masking(r.range(-0.2, 1.2) as f32, seed, 2); }
        let bias = (r.below(2) == 0).then(|| fl(&mut r, e));
        let mut w = vec![0f32; len(&mut r, t * k)];
        let mut i = vec![0i32; len(&mut r, t * k)];
        if topk_gating_into(&z, t, e, bias.as_deref(), &cfg, &mut w, &mut i).is_ok() {
            prop_assert!(i.iter().all(|&x| x >= 0 && (x as usize) < e));
        }
        let idx = il(&mut r, t * k, e);
        let _ = topk_gating_replay_into(&z, t, e, &idx, &cfg, &mut w);
        let gw = fl(&mut r, t * k);
        let mut gz = vec![0f32; len(&mut r, t * e)];
        let _ = topk_gating_backward_into(&z, t, e, &idx, &gw, &cfg, &mut gz);
    }

    #[test]
    fn losses_and_stats_never_panic(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let (t, e, k) = (small(&mut r, 24), small(&mut r, 20), small(&mut r, 8));
        let z = fl(&mut r, t * e);
        let mask: Option<Vec<bool>> = (r.below(2) == 0).then(|| (0..len(&mut r, t)).map(|_| r.below(3) == 0).collect());
        let counts: Option<Vec<i64>> = (r.below(3) == 0).then(|| (0..len(&mut r, e)).map(|_| r.below(50) as i64 - 2).collect());
        let cfg = AuxLossConfig::new(k).coeff(floats(&mut r, 1)[0])
            .score_function(if r.below(2) == 0 { ScoreFunction::Softmax } else { ScoreFunction::Sigmoid });
        let total = (r.below(3) == 0).then(|| small(&mut r, 40));
        let mut gz = vec![0f32; len(&mut r, t * e)];
        if let Ok(a) = aux_loss(&z, t, e, mask.as_deref(), counts.as_deref(), total, &cfg) {
            let _ = aux_loss_backward_into(RouterLogits::new(&z, t, e).padding_mask(mask.as_deref()), &a.counts, a.total_tokens, &cfg, 1.0, &mut gz);
        }
        let _ = aux_loss_backward_into(RouterLogits::new(&z, t, e).padding_mask(mask.as_deref()), counts.as_deref().unwrap_or(&[]), small(&mut r, 5), &cfg, 1.0, &mut gz);
        let s = small(&mut r, 6);
        if let Ok(a) = seq_aux_loss(&z, t, e, s, mask.as_deref(), None, &cfg) {
            let _ = seq_aux_loss_backward_into(RouterLogits::new(&z, t, e).padding_mask(mask.as_deref()), s, &a.counts, &cfg, 1.0, &mut gz);
        }
        let coeff = floats(&mut r, 1)[0];
        let _ = z_loss(&z, t, e, mask.as_deref(), coeff);
        let _ = z_loss_backward_into(RouterLogits::new(&z, t, e).padding_mask(mask.as_deref()), coeff, 1.0, &mut gz);
        let idx = il(&mut r, t * k, e);
        let slots = (r.below(2) == 0).then(|| il(&mut r, t * k, 5));
        let _ = router_stats(RouterLogits::new(&z, t, e).padding_mask(mask.as_deref()), &idx, k, slots.as_deref(), &RouterStatsConfig::new().strict(r.below(2) == 0));
        let mut bias = fl(&mut r, e);
        let c: Vec<i64> = (0..len(&mut r, e)).map(|_| r.below(100) as i64 - 3).collect();
        let _ = update_expert_bias(&mut bias, &c, floats(&mut r, 1)[0]);
    }

    #[test]
    fn dropout_never_panics(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let (t, e, k) = (small(&mut r, 24), small(&mut r, 20), small(&mut r, 8));
        let cfg = DropoutConfig::new(floats(&mut r, 1)[0].clamp(-0.5, 1.5), seed, 3);
        let mut m = vec![false; len(&mut r, t * e)];
        let _ = expert_mask_into(t, e, k, &cfg, &mut m);
        let idx = il(&mut r, t * k, e);
        let w = fl(&mut r, t * k);
        let (mut oi, mut ow, mut keep) = (vec![0i32; len(&mut r, t * k)], vec![0f32; len(&mut r, t * k)], vec![false; len(&mut r, t * k)]);
        let renorm = r.below(2) == 0;
        let out = AssignmentDropoutBuffers { indices: &mut oi, weights: &mut ow, keep: &mut keep };
        let _ = assignment_dropout_into(Assignments::new(&idx, &w, t, k), e, &cfg, renorm, out);
        let g = fl(&mut r, t * k);
        let mut gw = vec![0f32; len(&mut r, t * k)];
        let _ = assignment_dropout_backward_into(Assignments::new(&idx, &w, t, k), &keep, renorm, &g, &mut gw);
    }

    #[test]
    fn permute_never_panics(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let (t, h, k, rows) = (small(&mut r, 16), small(&mut r, 9), small(&mut r, 4), small(&mut r, 40));
        let x = fl(&mut r, t * h);
        let r2t = ints(&mut r, rows, t);
        let mut buf = vec![0f32; len(&mut r, rows * h)];
        let _ = permute_into(&x, t, h, &r2t, &mut buf);
        let row = il(&mut r, t * k, rows);
        let w = fl(&mut r, t * k);
        let y = fl(&mut r, rows * h);
        let mut gx = vec![0f32; len(&mut r, t * h)];
        let _ = permute_backward_into(PermuteSizes { num_tokens: t, num_rows: rows, hidden: h, k }, &y, &row, &mut gx);
        let mut out = vec![0f32; len(&mut r, t * h)];
        let _ = unpermute_into(PermuteSizes { num_tokens: t, num_rows: rows, hidden: h, k }, &y, &row, &w, &mut out);
        let go = fl(&mut r, t * h);
        let mut gy = vec![0f32; len(&mut r, rows * h)];
        let mut gwt = vec![0f32; len(&mut r, t * k)];
        let _ = unpermute_backward_into(PermuteSizes { num_tokens: t, num_rows: rows, hidden: h, k }, &go, &y, &row, &w, UnpermuteBackwardBuffers { grad_y: &mut gy, grad_weights: &mut gwt });
    }

    #[test]
    fn capacity_dispatch_expert_choice_never_panic(seed in any::<u64>()) {
        let mut r = Rng::new(seed);
        let (t, e, k) = (small(&mut r, 30), small(&mut r, 16), small(&mut r, 6));
        let cf = [0.0, -1.0, f64::NAN, f64::INFINITY, 0.5, 1.0, 1.25, 4.0, 1e300][r.below(9)];
        let mut ccfg = CapacityConfig::new(cf).min_capacity(small(&mut r, 4));
        if r.below(2) == 0 { ccfg = ccfg.capacity_multiple(small(&mut r, 8)); }
        let cap = capacity(t, e, k, &ccfg).ok();
        let policy = match r.below(5) {
            0 => DropPolicy::Position,
            1 => DropPolicy::ChoiceThenPosition,
            2 => DropPolicy::Probs,
            3 => DropPolicy::BatchPrioritized,
            _ => DropPolicy::Random { seed, offset: 1 },
        };
        let layout = match r.below(3) {
            0 => DispatchLayout::PadToCapacity,
            1 => DispatchLayout::Compact,
            _ => DispatchLayout::Dropless { align: small(&mut r, 5) },
        };
        let mut cfg = DispatchConfig::new(e).layout(layout).renormalize(r.below(2) == 0).ep_size(small(&mut r, 4));
        if r.below(4) != 0 { cfg = cfg.capacity(cap.unwrap_or_else(|| small(&mut r, 9))); }
        // A policy without a capacity is an error; try that sometimes too.
        if cfg.capacity.is_some() || r.below(8) == 0 { cfg = cfg.drop_policy(policy); }
        let idx = il(&mut r, t * k, e);
        let w = fl(&mut r, t * k);
        let rows = dispatch_max_rows(t, k, &cfg).unwrap_or_else(|_| small(&mut r, 50)).min(10_000);
        let (mut slot, mut row, mut kw) = (vec![0i32; len(&mut r, t * k)], vec![0i32; len(&mut r, t * k)], vec![0f32; len(&mut r, t * k)]);
        let (mut tpe, mut r2t, mut off, mut rpr) = (vec![0i32; len(&mut r, e)], vec![0i32; len(&mut r, rows)], vec![0i32; len(&mut r, e + 1)], vec![0i32; cfg.ep_size]);
        let out = DispatchBuffers { slot: &mut slot, row: &mut row, kept_weights: &mut kw, tokens_per_expert: &mut tpe, row_to_token: &mut r2t, expert_offsets: &mut off, rows_per_rank: &mut rpr };
        if let Ok(c) = dispatch_into(&idx, &w, t, k, &cfg, out) {
            prop_assert!(row.iter().all(|&x| x >= -1 && (x as i64) < c.num_rows as i64));
            prop_assert!(r2t.iter().all(|&x| x >= -1 && (x as i64) < t as i64));
        }
        let z = fl(&mut r, t * e);
        let c = small(&mut r, 12);
        let (mut ew, mut er, mut ert, mut erw) = (vec![0f32; len(&mut r, t * e)], vec![0i32; len(&mut r, t * e)], vec![0i32; len(&mut r, e * c)], vec![0f32; len(&mut r, e * c)]);
        let (mut etpe, mut eoff) = (vec![0i32; len(&mut r, e)], vec![0i32; len(&mut r, e + 1)]);
        let out = ExpertChoiceBuffers { weights: &mut ew, row: &mut er, row_to_token: &mut ert, row_weights: &mut erw, tokens_per_expert: &mut etpe, expert_offsets: &mut eoff };
        let _ = expert_choice_into(&z, t, e, c, out);
        let gw = fl(&mut r, t * e);
        let mut gz = vec![0f32; len(&mut r, t * e)];
        let bad_rows = il(&mut r, t * e, e * c + 1);
        let _ = expert_choice_backward_into(&z, t, e, &bad_rows, &gw, &mut gz);
    }
}

/// What stays public under `moe_router::cpu` is total: adversarial arguments (sizes
/// that overflow `t * E`, a buffer shorter than `E`, `topk > E`, rates outside
/// `[0, 1)`, lengths that disagree) give some result, never a panic. (The CPU kernels
/// that index by their arguments are crate-private: see the `compile_fail` example
/// in `src/cpu/mod.rs`.)
#[test]
fn public_cpu_functions_never_panic() {
    use moe_router::cpu::dropout::expert_mask_row;
    use moe_router::cpu::{sigmoid, softmax_row};
    let rates = [
        0.0f32,
        0.5,
        0.999_999_9,
        1.0,
        2.0,
        -1.0,
        f32::NAN,
        f32::INFINITY,
    ];
    let sizes = [
        (0usize, 0usize, 0usize, 0usize),
        (usize::MAX, 3, 2, 3),              // t * E overflows
        (usize::MAX / 2, usize::MAX, 1, 4), // E beyond the buffer
        (7, 5, 9, 5),                       // topk > E
        (7, 5, usize::MAX, 5),
        (1, 64, 64, 10), // buffer shorter than E
        (1, 3, 1, 10),   // buffer longer than E
    ];
    for &rate in &rates {
        let cfg = DropoutConfig::new(rate, 1, 2);
        for &(t, e, k, len) in &sizes {
            let mut m = vec![true; len];
            expert_mask_row(t, e, k, &cfg, &mut m);
            let n = e.min(len);
            if rate.is_nan() || rate <= 0.0 {
                assert!(m[..n].iter().all(|&x| !x), "rate {rate}: nothing masked");
            }
            // Entries past E are not touched.
            assert!(m[n..].iter().all(|&x| x));
        }
    }
    for (z, out_len) in [
        (vec![], 0usize),
        (vec![1.0f32, 2.0], 5),
        (vec![1.0, f32::NAN, f32::INFINITY], 1),
        (vec![f32::NEG_INFINITY; 4], 4),
    ] {
        let mut out = vec![0.0f32; out_len];
        let _ = softmax_row(z.iter().copied(), &mut out);
    }
    for x in [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -100.0,
        100.0,
    ] {
        let _ = sigmoid(x);
    }
    // The permute kernels: sizes that overflow `hidden * k`, a `k` or `hidden` far
    // beyond the slices (no allocation may be sized by them), rows out of range.
    use moe_router::cpu::permute as p;
    let big = [1usize << 40, usize::MAX / 3, usize::MAX];
    let x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let rows = [0i32, 1, -1, 7, i32::MAX, i32::MIN];
    let w = [0.5f32; 6];
    for &hidden in [0usize, 1, 2, 5].iter().chain(&big) {
        for &k in [0usize, 1, 2, 4].iter().chain(&big) {
            let mut out = [9.0f32; 6];
            p::permute(&x, hidden, &rows, &mut out);
            p::permute_backward(&x, hidden, &rows, k, &mut out);
            p::unpermute(&x, hidden, &rows, &w, k, &mut out);
            let (mut gy, mut gw) = ([0.0f32; 5], [0.0f32; 4]);
            p::unpermute_backward(
                &x,
                &x,
                hidden,
                &rows,
                &w,
                k,
                moe_router::UnpermuteBackwardBuffers {
                    grad_y: &mut gy,
                    grad_weights: &mut gw,
                },
            );
            let xh: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
            let mut oh = vec![half::f16::ZERO; 7];
            p::unpermute(&xh, hidden, &rows, &w, k, &mut oh);
            let mut gyh = vec![half::f16::ZERO; 3];
            p::unpermute_backward(
                &xh,
                &xh,
                hidden,
                &rows,
                &w,
                k,
                moe_router::UnpermuteBackwardBuffers {
                    grad_y: &mut gyh,
                    grad_weights: &mut gw,
                },
            );
        }
    }
    for v in [f32::NAN, f32::INFINITY, -0.0, 1e-40, 65520.0] {
        let _ = p::f16_bits_to_f32(p::f32_to_f16_bits(v));
        let _ = p::bf16_bits_to_f32(p::f32_to_bf16_bits(v));
    }
    let _ = p::dot_f32(&x, &w[..3]);
}
