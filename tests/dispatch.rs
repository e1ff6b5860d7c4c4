//! `dispatch`: hand cases per drop policy and layout, a brute-force property test,
//! thread independence, and every bad input.
mod common;

use common::{with_threads, Rng};
use moe_router::philox::{uniform, Domain};
use moe_router::{
    dispatch, dispatch_into, dispatch_max_rows, DispatchBuffers, DispatchConfig, DispatchLayout,
    DispatchOutput, DropPolicy, Error,
};
use ndarray::{array, Array2};
use proptest::prelude::*;
use std::cmp::Ordering;

fn run(indices: &Array2<i32>, weights: &Array2<f32>, cfg: &DispatchConfig) -> DispatchOutput {
    dispatch(indices.view(), weights.view(), cfg).unwrap()
}

fn col(a: &Array2<i32>) -> Vec<Vec<i32>> {
    a.rows().into_iter().map(|r| r.to_vec()).collect()
}

// The running example: 4 tokens, top-2 of 3 experts, capacity 2.
//   expert 0 <- (0,0) (1,0) (2,0)         3 routed
//   expert 1 <- (0,1) (2,1) (3,0)         3 routed
//   expert 2 <- (1,1) (3,1)               2 routed
fn example() -> (Array2<i32>, Array2<f32>) {
    let indices = array![[0, 1], [0, 2], [0, 1], [1, 2]];
    let weights = array![[0.5f32, 0.3], [0.6, 0.2], [0.7, 0.1], [0.4, 0.35]];
    (indices, weights)
}

fn pad_cfg(policy: DropPolicy) -> DispatchConfig {
    DispatchConfig::new(3)
        .capacity(2)
        .drop_policy(policy)
        .layout(DispatchLayout::PadToCapacity)
}

#[test]
fn position_policy_pad_layout() {
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::Position));
    // expert 0 keeps t0, t1 (drops t2); expert 1 keeps t0, t2 (drops t3); expert 2 both.
    assert_eq!(
        col(&out.slot),
        vec![vec![0, 0], vec![1, 0], vec![-1, 1], vec![-1, 1]]
    );
    // row = e * 2 + slot
    assert_eq!(
        col(&out.row),
        vec![vec![0, 2], vec![1, 4], vec![-1, 3], vec![-1, 5]]
    );
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, 0, 2, 1, 3]);
    assert_eq!(out.tokens_per_expert.to_vec(), vec![2, 2, 2]);
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 2, 4, 6]);
    assert_eq!(out.rows_per_rank.to_vec(), vec![6]);
    assert_eq!((out.dropped, out.num_rows), (2, 6));
    assert_eq!(
        out.kept_weights,
        array![[0.5f32, 0.3], [0.6, 0.2], [0.0, 0.1], [0.0, 0.35]]
    );
}

#[test]
fn choice_then_position_policy() {
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::ChoiceThenPosition));
    // expert 1: (3,0) is a first choice and outranks (0,1), (2,1); then t0 beats t2.
    // kept on expert 1: t0 and t3, stored in token order -> slots 0, 1.
    assert_eq!(
        col(&out.slot),
        vec![vec![0, 0], vec![1, 0], vec![-1, -1], vec![1, 1]]
    );
    assert_eq!(
        col(&out.row),
        vec![vec![0, 2], vec![1, 4], vec![-1, -1], vec![3, 5]]
    );
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, 0, 3, 1, 3]);
    assert_eq!(out.dropped, 2);
}

#[test]
fn probs_policy() {
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::Probs));
    // expert 0: 0.5 (t0), 0.6 (t1), 0.7 (t2) -> keep t1, t2.
    // expert 1: 0.3 (t0), 0.1 (t2), 0.4 (t3) -> keep t0, t3.
    assert_eq!(
        col(&out.slot),
        vec![vec![-1, 0], vec![0, 0], vec![1, -1], vec![1, 1]]
    );
    assert_eq!(out.row_to_token.to_vec(), vec![1, 2, 0, 3, 1, 3]);
    assert_eq!(
        out.kept_weights,
        array![[0.0f32, 0.3], [0.6, 0.2], [0.7, 0.0], [0.4, 0.35]]
    );
}

#[test]
fn batch_prioritized_policy() {
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::BatchPrioritized));
    // token priority = max weight: t0 0.5, t1 0.6, t2 0.7, t3 0.4.
    // expert 0: keep t1, t2; expert 1: t0 (0.5), t2 (0.7), t3 (0.4) -> keep t0, t2.
    assert_eq!(
        col(&out.slot),
        vec![vec![-1, 0], vec![0, 0], vec![1, 1], vec![-1, 1]]
    );
    assert_eq!(out.row_to_token.to_vec(), vec![1, 2, 0, 2, 1, 3]);
    assert_eq!(out.dropped, 2);
}

#[test]
fn random_policy() {
    let (seed, offset) = (1234u64, 56u64);
    let u: Vec<f32> = (0..4)
        .map(|t| uniform(seed, offset, Domain::RandomDrop, t))
        .collect();
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::Random { seed, offset }));
    // Each over-full expert drops its token with the largest u.
    let drop0 = (0..3)
        .max_by(|&a, &b| u[a].total_cmp(&u[b]).then(b.cmp(&a)))
        .unwrap();
    let drop1 = [0usize, 2, 3]
        .into_iter()
        .max_by(|&a, &b| u[a].total_cmp(&u[b]).then(b.cmp(&a)))
        .unwrap();
    for t in 0..3 {
        assert_eq!(
            out.slot[[t, 0]] < 0,
            t == drop0,
            "expert 0, token {t}, u = {u:?}"
        );
    }
    assert_eq!(out.slot[[0, 1]] < 0, drop1 == 0);
    assert_eq!(out.slot[[2, 1]] < 0, drop1 == 2);
    assert_eq!(out.slot[[3, 0]] < 0, drop1 == 3);
    assert_eq!(out.dropped, 2);
    // A different offset is a different (deterministic) draw; same offset, same result.
    let again = run(&i, &w, &pad_cfg(DropPolicy::Random { seed, offset }));
    assert_eq!(again, out);
}

#[test]
fn probs_nan_ranks_last_and_ties_go_to_lower_token() {
    // one expert, 4 tokens, capacity 2
    let indices = array![[0], [0], [0], [0]];
    let weights = array![[f32::NAN], [f32::NEG_INFINITY], [0.25], [-1.0]];
    let cfg = DispatchConfig::new(1)
        .capacity(2)
        .drop_policy(DropPolicy::Probs);
    let out = run(&indices, &weights, &cfg);
    // keep 0.25 (t2) and -1.0 (t3); -inf beats NaN but is third.
    assert_eq!(out.slot.column(0).to_vec(), vec![-1, -1, 0, 1]);

    let weights = array![[0.5f32], [0.5], [-0.0], [0.0]];
    let out = run(&indices, &weights, &cfg);
    assert_eq!(out.slot.column(0).to_vec(), vec![0, 1, -1, -1]);
    let cfg1 = cfg.clone().capacity(3);
    let out = run(&indices, &weights, &cfg1);
    // -0.0 == +0.0: the lower token (t2) wins
    assert_eq!(out.slot.column(0).to_vec(), vec![0, 1, 2, -1]);
}

#[test]
fn unrouted_takes_no_capacity_and_is_not_dropped() {
    // expert 0 gets t1, t3 only (t0, t2 unrouted there); capacity 2 -> nothing dropped.
    let indices = array![[-1, 1], [0, -1], [-1, -1], [1, 0]];
    let weights = array![[0.9f32, 0.1], [0.8, 0.2], [0.5, 0.5], [0.3, 0.7]];
    let cfg = DispatchConfig::new(2)
        .capacity(1)
        .layout(DispatchLayout::PadToCapacity);
    let out = run(&indices, &weights, &cfg);
    // expert 0: t1, t3 -> keep t1 (position); expert 1: t0, t3 -> keep t0.
    assert_eq!(
        col(&out.slot),
        vec![vec![-1, 0], vec![0, -1], vec![-1, -1], vec![-1, -1]]
    );
    assert_eq!(
        col(&out.row),
        vec![vec![-1, 1], vec![0, -1], vec![-1, -1], vec![-1, -1]]
    );
    assert_eq!(
        out.kept_weights,
        array![[0.0f32, 0.1], [0.8, 0.0], [0.0, 0.0], [0.0, 0.0]]
    );
    assert_eq!(out.dropped, 2);
    let all = DispatchConfig::new(2).capacity(2);
    assert_eq!(run(&indices, &weights, &all).dropped, 0);
}

#[test]
fn renormalize() {
    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::Position).renormalize(true));
    let r = |w: f32, s: f32, kept: f32| w * s / (kept + 1e-20);
    // t0, t1 keep both: w * S / S (rounding only)
    assert_eq!(out.kept_weights[[0, 0]], r(0.5, 0.5 + 0.3, 0.5 + 0.3));
    assert_eq!(out.kept_weights[[1, 1]], r(0.2, 0.6 + 0.2, 0.6 + 0.2));
    assert!((out.kept_weights[[0, 0]] - 0.5).abs() < 1e-7);
    // t2 keeps only 0.1 of 0.8: 0.1 * 0.8 / 0.1 = 0.8
    assert_eq!(out.kept_weights[[2, 0]], 0.0);
    assert_eq!(out.kept_weights[[2, 1]], r(0.1, 0.7 + 0.1, 0.1));
    assert!((out.kept_weights[[2, 1]] - 0.8).abs() < 1e-6);
    assert_eq!(out.kept_weights[[3, 1]], r(0.35, 0.4 + 0.35, 0.35));

    // a token with nothing kept gets zeros
    let indices = array![[0], [0]];
    let weights = array![[0.5f32], [0.5]];
    let cfg = DispatchConfig::new(1).capacity(1).renormalize(true);
    let out = run(&indices, &weights, &cfg);
    assert_eq!(
        out.kept_weights.column(0).to_vec(),
        vec![0.5 * 0.5 / (0.5 + 1e-20), 0.0]
    );
}

#[test]
fn compact_layout() {
    let (i, w) = example();
    let cfg = DispatchConfig::new(3)
        .capacity(2)
        .drop_policy(DropPolicy::Position);
    // capacity 2: every expert keeps 2 -> same rows as pad here; use capacity 1 instead.
    let out = run(&i, &w, &cfg.clone().capacity(1));
    // expert 0 keeps t0, expert 1 keeps t0, expert 2 keeps t1.
    assert_eq!(
        col(&out.row),
        vec![vec![0, 1], vec![-1, 2], vec![-1, -1], vec![-1, -1]]
    );
    assert_eq!(out.row_to_token.to_vec(), vec![0, 0, 1]);
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 1, 2, 3]);
    assert_eq!((out.num_rows, out.dropped), (3, 5));

    // capacity 3 on a skewed routing: counts 3, 3, 2 -> offsets 0, 3, 6, 8
    let out = run(&i, &w, &cfg.clone().capacity(3));
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 3, 6, 8]);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, 2, 0, 2, 3, 1, 3]);
    assert_eq!(
        col(&out.row),
        vec![vec![0, 3], vec![1, 6], vec![2, 4], vec![5, 7]]
    );
    assert_eq!(out.dropped, 0);

    // no capacity keeps everything
    let none = run(&i, &w, &DispatchConfig::new(3));
    assert_eq!(none.row, out.row);
    assert_eq!(none.row_to_token, out.row_to_token);
}

#[test]
fn compact_into_marks_unused_rows() {
    // max_rows = min(T*k, E*cap) = min(8, 6) = 6, but only 3 rows are used.
    let (i, w) = example();
    let cfg = DispatchConfig::new(3).capacity(1);
    let cfg2 = DispatchConfig::new(3).capacity(2);
    assert_eq!(dispatch_max_rows(4, 2, &cfg2).unwrap(), 6);
    assert_eq!(dispatch_max_rows(4, 2, &cfg).unwrap(), 3);
    assert_eq!(dispatch_max_rows(4, 2, &DispatchConfig::new(3)).unwrap(), 8);
    let n = 8;
    let (mut slot, mut row, mut kw) = (vec![7; n], vec![7; n], vec![7.0; n]);
    let (mut tpe, mut rtt, mut off, mut rpr) = (vec![7; 3], vec![7; 8], vec![7; 4], vec![7; 1]);
    let counts = dispatch_into(
        i.as_slice().unwrap(),
        w.as_slice().unwrap(),
        4,
        2,
        &DispatchConfig::new(3)
            .capacity(1)
            .layout(DispatchLayout::Compact),
        DispatchBuffers {
            slot: &mut slot,
            row: &mut row,
            kept_weights: &mut kw,
            tokens_per_expert: &mut tpe,
            row_to_token: &mut rtt[..3],
            expert_offsets: &mut off,
            rows_per_rank: &mut rpr,
        },
    )
    .unwrap();
    assert_eq!((counts.num_rows, counts.dropped), (3, 5));
    // capacity 2 on a routing that keeps fewer rows than max_rows: the tail is -1.
    let indices = array![[0, 1], [0, 1], [0, 1], [0, 1]];
    let cfg = DispatchConfig::new(3).capacity(2);
    assert_eq!(dispatch_max_rows(4, 2, &cfg).unwrap(), 6);
    let counts = dispatch_into(
        indices.as_slice().unwrap(),
        w.as_slice().unwrap(),
        4,
        2,
        &cfg,
        DispatchBuffers {
            slot: &mut slot,
            row: &mut row,
            kept_weights: &mut kw,
            tokens_per_expert: &mut tpe,
            row_to_token: &mut rtt[..6],
            expert_offsets: &mut off,
            rows_per_rank: &mut rpr,
        },
    )
    .unwrap();
    assert_eq!((counts.num_rows, counts.dropped), (4, 4));
    assert_eq!(&rtt[..6], &[0, 1, 0, 1, -1, -1]);
    assert_eq!(off, vec![0, 2, 4, 4]);
    assert_eq!(tpe, vec![2, 2, 0]);
}

#[test]
fn dropless_layout_aligns_segments() {
    let (i, w) = example();
    // counts 3, 3, 2; align 4 -> segments 4, 4, 4
    let cfg = DispatchConfig::new(3).layout(DispatchLayout::Dropless { align: 4 });
    assert_eq!(dispatch_max_rows(4, 2, &cfg).unwrap(), 8 + 3 * 3);
    let out = run(&i, &w, &cfg);
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 4, 8, 12]);
    assert_eq!(
        out.row_to_token.to_vec(),
        vec![0, 1, 2, -1, 0, 2, 3, -1, 1, 3, -1, -1]
    );
    assert_eq!(
        col(&out.row),
        vec![vec![0, 4], vec![1, 8], vec![2, 5], vec![6, 9]]
    );
    assert_eq!(out.tokens_per_expert.to_vec(), vec![3, 3, 2]);
    assert_eq!((out.dropped, out.num_rows), (0, 12));
    assert_eq!(out.kept_weights, w);

    // align 1 == compact without capacity; an expert with no tokens has no rows
    let indices = array![[0, 2], [2, 0]];
    let weights = array![[0.5f32, 0.5], [0.5, 0.5]];
    let out = run(
        &indices,
        &weights,
        &DispatchConfig::new(3).layout(DispatchLayout::Dropless { align: 1 }),
    );
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 2, 2, 4]);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, 0, 1]);
    let out = run(
        &indices,
        &weights,
        &DispatchConfig::new(3).layout(DispatchLayout::Dropless { align: 3 }),
    );
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 3, 3, 6]);
    assert_eq!(out.row_to_token.to_vec(), vec![0, 1, -1, 0, 1, -1]);
}

#[test]
fn expert_parallel_rank_sizes() {
    // 4 experts on 2 ranks; kept counts 2, 1, 0, 3 (compact) -> ranks 3, 3
    let indices = array![[0, 3], [0, 1], [3, 2], [3, 0]];
    let weights = Array2::<f32>::ones((4, 2));
    let cfg = DispatchConfig::new(4).capacity(3).ep_size(2);
    let out = run(&indices, &weights, &cfg);
    // expert 0: t0, t1, t3 (3), expert 1: t1, expert 2: t2, expert 3: t0, t2, t3
    assert_eq!(out.tokens_per_expert.to_vec(), vec![3, 1, 1, 3]);
    assert_eq!(out.rows_per_rank.to_vec(), vec![4, 4]);
    let out = run(&indices, &weights, &cfg.clone().capacity(2));
    assert_eq!(out.tokens_per_expert.to_vec(), vec![2, 1, 1, 2]);
    assert_eq!(out.rows_per_rank.to_vec(), vec![3, 3]);
    let out = run(
        &indices,
        &weights,
        &cfg.clone().ep_size(4).layout(DispatchLayout::PadToCapacity),
    );
    assert_eq!(out.rows_per_rank.to_vec(), vec![3, 3, 3, 3]);
    let out = run(
        &indices,
        &weights,
        &DispatchConfig::new(4)
            .ep_size(4)
            .layout(DispatchLayout::Dropless { align: 2 }),
    );
    assert_eq!(out.rows_per_rank.to_vec(), vec![4, 2, 2, 4]);
}

#[test]
fn zero_tokens_and_zero_capacity() {
    let indices = Array2::<i32>::zeros((0, 2));
    let weights = Array2::<f32>::zeros((0, 2));
    let out = run(
        &indices,
        &weights,
        &DispatchConfig::new(4)
            .capacity(3)
            .layout(DispatchLayout::PadToCapacity),
    );
    assert_eq!(out.num_rows, 12);
    assert_eq!(out.row_to_token.to_vec(), vec![-1; 12]);
    assert_eq!(out.expert_offsets.to_vec(), vec![0, 3, 6, 9, 12]);
    let out = run(&indices, &weights, &DispatchConfig::new(4));
    assert_eq!((out.num_rows, out.dropped), (0, 0));

    let (i, w) = example();
    let out = run(&i, &w, &pad_cfg(DropPolicy::Probs).capacity(0));
    assert_eq!((out.num_rows, out.dropped), (0, 8));
    assert!(out.slot.iter().all(|&s| s == -1) && out.row.iter().all(|&s| s == -1));
    assert!(out.kept_weights.iter().all(|&x| x == 0.0));
}

// ---------------------------------------------------------------- properties

/// Independent brute force: per expert, sort its assignments by the policy's key
/// (lower first) and keep the first `cap`.
fn brute_force_kept(
    indices: &[i32],
    weights: &[f32],
    t_n: usize,
    k: usize,
    e_n: usize,
    cap: usize,
    policy: DropPolicy,
) -> Vec<bool> {
    let desc_nan_last = |a: f32, b: f32| match (a.is_nan(), b.is_nan()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
        _ => b.partial_cmp(&a).unwrap(),
    };
    let token_max = |t: usize| -> f32 {
        let mut best = f32::NAN;
        for j in 0..k {
            let w = weights[t * k + j];
            if indices[t * k + j] >= 0 && !w.is_nan() && (best.is_nan() || w > best) {
                best = w;
            }
        }
        best
    };
    let mut kept = vec![false; t_n * k];
    for e in 0..e_n {
        let mut list: Vec<(usize, usize)> = (0..t_n * k)
            .filter(|&a| indices[a] == e as i32)
            .map(|a| (a / k, a % k))
            .collect();
        list.sort_by(|&(t1, j1), &(t2, j2)| {
            let primary = match policy {
                DropPolicy::Position => Ordering::Equal,
                DropPolicy::ChoiceThenPosition => j1.cmp(&j2),
                DropPolicy::Probs => desc_nan_last(weights[t1 * k + j1], weights[t2 * k + j2]),
                DropPolicy::BatchPrioritized => desc_nan_last(token_max(t1), token_max(t2)),
                DropPolicy::Random { seed, offset } => {
                    let u1 = uniform(seed, offset, Domain::RandomDrop, t1 as u64);
                    let u2 = uniform(seed, offset, Domain::RandomDrop, t2 as u64);
                    u1.partial_cmp(&u2).unwrap()
                }
            };
            primary.then(t1.cmp(&t2))
        });
        for &(t, j) in list.iter().take(cap) {
            kept[t * k + j] = true;
        }
    }
    kept
}

struct Case {
    t: usize,
    e: usize,
    k: usize,
    indices: Vec<i32>,
    weights: Vec<f32>,
}

fn make_case(t: usize, e: usize, k: usize, rng: &mut Rng) -> Case {
    let mut indices = Vec::with_capacity(t * k);
    let mut weights = Vec::with_capacity(t * k);
    let mut perm: Vec<i32> = (0..e as i32).collect();
    // skew the routing so some experts overflow: draw from the first `hot` experts often
    let hot = 1 + rng.below(e);
    let unrouted_rate = if rng.below(3) == 0 { 0.2 } else { 0.0 };
    for _ in 0..t {
        // partial Fisher-Yates over a biased prefix
        for j in 0..k {
            let lo = j;
            let span = if rng.below(2) == 0 {
                hot.max(k).min(e)
            } else {
                e
            };
            let pick = lo + rng.below(span.max(lo + 1) - lo);
            perm.swap(j, pick);
        }
        for &pj in &perm[..k] {
            let unrouted = rng.uniform() < unrouted_rate;
            indices.push(if unrouted { -1 } else { pj });
            let w = match rng.below(20) {
                0 => f32::NAN,
                1 => -0.0,
                2 => 0.0,
                3..=6 => (rng.below(4) as f32) * 0.25, // ties
                _ => rng.uniform() as f32,
            };
            weights.push(w);
        }
    }
    Case {
        t,
        e,
        k,
        indices,
        weights,
    }
}

fn policy_from(n: usize, rng: &mut Rng) -> DropPolicy {
    match n % 5 {
        0 => DropPolicy::Position,
        1 => DropPolicy::ChoiceThenPosition,
        2 => DropPolicy::Probs,
        3 => DropPolicy::BatchPrioritized,
        _ => DropPolicy::Random {
            seed: rng.next_u64(),
            offset: rng.next_u64(),
        },
    }
}

fn check_case(c: &Case, cfg: &DispatchConfig) -> Result<(), TestCaseError> {
    let (t_n, k, e_n) = (c.t, c.k, c.e);
    let idx = Array2::from_shape_vec((t_n, k), c.indices.clone()).unwrap();
    let w = Array2::from_shape_vec((t_n, k), c.weights.clone()).unwrap();
    let out = dispatch(idx.view(), w.view(), cfg).unwrap();
    let cap = match cfg.layout {
        DispatchLayout::Dropless { .. } => usize::MAX,
        _ => cfg.capacity.unwrap_or(usize::MAX),
    };
    let expected_kept = brute_force_kept(
        &c.indices,
        &c.weights,
        t_n,
        k,
        e_n,
        cap,
        cfg.effective_drop_policy(),
    );
    let slot = out.slot.as_slice().unwrap();
    let row = out.row.as_slice().unwrap();
    let kw = out.kept_weights.as_slice().unwrap();
    let mut routed = 0;
    let mut kept_total = 0;
    let mut per_expert: Vec<Vec<(usize, i32)>> = vec![Vec::new(); e_n];
    for a in 0..t_n * k {
        let e = c.indices[a];
        let kept = slot[a] >= 0;
        if e < 0 {
            prop_assert!(slot[a] == -1 && row[a] == -1 && kw[a] == 0.0);
            continue;
        }
        routed += 1;
        prop_assert_eq!(
            kept,
            expected_kept[a],
            "assignment {} (t {}, expert {})",
            a,
            a / k,
            e
        );
        prop_assert_eq!(kept, row[a] >= 0);
        if kept {
            kept_total += 1;
            prop_assert!((slot[a] as usize) < cap);
            per_expert[e as usize].push((a / k, slot[a]));
            prop_assert_eq!(row[a], out.expert_offsets[e as usize] + slot[a]);
            prop_assert_eq!(out.row_to_token[row[a] as usize], (a / k) as i32);
        } else {
            prop_assert!(kw[a] == 0.0 && slot[a] == -1);
        }
    }
    prop_assert_eq!(out.dropped + kept_total, routed);
    // slots are 0..n in token order within each expert
    for (e, list) in per_expert.iter().enumerate() {
        prop_assert_eq!(out.tokens_per_expert[e] as usize, list.len());
        prop_assert!(list.len() <= cap);
        for (s, &(_, slot)) in list.iter().enumerate() {
            prop_assert_eq!(slot, s as i32, "expert {}", e);
        }
        prop_assert!(list.windows(2).all(|p| p[0].0 < p[1].0));
    }
    // offsets per layout
    let offs = out.expert_offsets.to_vec();
    prop_assert_eq!(offs[0], 0);
    prop_assert_eq!(offs[e_n] as usize, out.num_rows);
    prop_assert_eq!(out.row_to_token.len(), out.num_rows);
    for e in 0..e_n {
        let size = (offs[e + 1] - offs[e]) as usize;
        let kept = per_expert[e].len();
        let want = match cfg.layout {
            DispatchLayout::PadToCapacity => cfg.capacity.unwrap(),
            DispatchLayout::Compact => kept,
            DispatchLayout::Dropless { align } => kept.div_ceil(align) * align,
        };
        prop_assert_eq!(size, want);
        // padding rows are -1, the others hold the expert's tokens in order
        let seg = &out.row_to_token.as_slice().unwrap()[offs[e] as usize..offs[e + 1] as usize];
        for (r, &tok) in seg.iter().enumerate() {
            if r < kept {
                prop_assert_eq!(tok as usize, per_expert[e][r].0);
            } else {
                prop_assert_eq!(tok, -1);
            }
        }
    }
    prop_assert!(out.num_rows <= dispatch_max_rows(t_n, k, cfg).unwrap());
    // ranks
    let per = e_n / cfg.ep_size;
    let rpr = out.rows_per_rank.to_vec();
    prop_assert_eq!(rpr.len(), cfg.ep_size);
    for (r, &n) in rpr.iter().enumerate() {
        prop_assert_eq!(n, offs[(r + 1) * per] - offs[r * per]);
    }
    prop_assert_eq!(rpr.iter().map(|&x| x as usize).sum::<usize>(), out.num_rows);
    // kept weights
    for t in 0..t_n {
        let r = t * k..(t + 1) * k;
        let (mut s_all, mut s_kept, mut any) = (0.0f32, 0.0f32, false);
        for a in r.clone() {
            if c.indices[a] >= 0 {
                s_all += c.weights[a];
                if slot[a] >= 0 {
                    s_kept += c.weights[a];
                    any = true;
                }
            }
        }
        for a in r {
            if slot[a] >= 0 {
                let want = if cfg.renormalize && any {
                    c.weights[a] * s_all / (s_kept + 1e-20)
                } else {
                    c.weights[a]
                };
                prop_assert!(
                    want.to_bits() == kw[a].to_bits() || (want.is_nan() && kw[a].is_nan()),
                    "{} vs {}",
                    kw[a],
                    want
                );
            }
        }
    }
    Ok(())
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n % d == 0).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn kept_set_is_the_policys_best(t in 0usize..300, e in 1usize..300, kk in 1usize..=32,
                                    pol in 0usize..5, lay in 0usize..3, seed in any::<u64>()) {
        let k = 1 + (kk - 1) % e.min(32);
        let mut rng = Rng::new(seed);
        let c = make_case(t, e, k, &mut rng);
        let policy = policy_from(pol, &mut rng);
        let balanced = (t * k).div_ceil(e);
        let capacity = rng.below(2 * balanced + 2);
        let ep = { let d = divisors(e); d[rng.below(d.len())] };
        let mut cfg = DispatchConfig::new(e).renormalize(rng.below(2) == 0).ep_size(ep);
        // A drop policy goes with a capacity (without one it is an error).
        cfg = match lay {
            0 => cfg.layout(DispatchLayout::PadToCapacity).capacity(capacity).drop_policy(policy),
            1 if rng.below(4) == 0 => cfg.layout(DispatchLayout::Compact),
            1 => cfg.layout(DispatchLayout::Compact).capacity(capacity).drop_policy(policy),
            _ => cfg.layout(DispatchLayout::Dropless { align: 1 + rng.below(8) }),
        };
        check_case(&c, &cfg)?;
    }
}

#[test]
fn all_policies_on_a_large_skewed_batch() {
    let mut rng = Rng::new(7);
    let c = make_case(700, 37, 5, &mut rng);
    for pol in 0..5 {
        let policy = policy_from(pol, &mut rng);
        let cfg = DispatchConfig::new(37)
            .capacity(60)
            .drop_policy(policy)
            .layout(DispatchLayout::PadToCapacity);
        check_case(&c, &cfg).unwrap();
        let cfg = cfg.layout(DispatchLayout::Compact).renormalize(true);
        check_case(&c, &cfg).unwrap();
    }
}

#[test]
fn thread_count_independent() {
    let mut rng = Rng::new(11);
    let c = make_case(3000, 64, 6, &mut rng);
    let idx = Array2::from_shape_vec((c.t, c.k), c.indices.clone()).unwrap();
    let w = Array2::from_shape_vec((c.t, c.k), c.weights.clone()).unwrap();
    for pol in 0..5 {
        let policy = policy_from(pol, &mut rng);
        let cfg = DispatchConfig::new(64)
            .capacity(200)
            .drop_policy(policy)
            .renormalize(true)
            .layout(DispatchLayout::PadToCapacity)
            .ep_size(8);
        let a = with_threads(1, || dispatch(idx.view(), w.view(), &cfg).unwrap());
        let b = with_threads(3, || dispatch(idx.view(), w.view(), &cfg).unwrap());
        assert_eq!(a.slot, b.slot);
        assert_eq!(a.row, b.row);
        assert_eq!(a.row_to_token, b.row_to_token);
        assert_eq!(a.rows_per_rank, b.rows_per_rank);
        let bits = |x: &Array2<f32>| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.kept_weights), bits(&b.kept_weights));
        assert!(a.dropped > 0);
    }
}

// ---------------------------------------------------------------- errors

fn err_of(indices: &Array2<i32>, weights: &Array2<f32>, cfg: &DispatchConfig) -> Error {
    dispatch(indices.view(), weights.view(), cfg).unwrap_err()
}

fn assert_invalid(err: Error, arg: &str) {
    match &err {
        Error::InvalidArgument { arg: a, .. } => assert_eq!(*a, arg, "{err}"),
        _ => panic!("expected InvalidArgument for {arg}, got {err}"),
    }
    assert!(err.to_string().contains(arg), "{err}");
}

#[test]
fn bad_num_experts_and_topk() {
    let (i, w) = example();
    assert_invalid(err_of(&i, &w, &DispatchConfig::new(0)), "num_experts");
    let i0 = Array2::<i32>::zeros((4, 0));
    let w0 = Array2::<f32>::zeros((4, 0));
    assert_invalid(err_of(&i0, &w0, &DispatchConfig::new(3)), "topk");
    let i4 = array![[0, 1, 2, -1]];
    let w4 = array![[0.1f32, 0.2, 0.3, 0.4]];
    assert_invalid(err_of(&i4, &w4, &DispatchConfig::new(3)), "topk");
    assert!(dispatch_max_rows(4, 0, &DispatchConfig::new(3)).is_err());
}

#[test]
fn bad_indices() {
    let (_, w) = example();
    let err = err_of(
        &array![[0, 1], [0, 3], [0, 1], [1, 2]],
        &w,
        &DispatchConfig::new(3),
    );
    assert!(err.to_string().contains('3'));
    assert_invalid(err, "indices");
    assert_invalid(
        err_of(
            &array![[0, 1], [0, -2], [0, 1], [1, 2]],
            &w,
            &DispatchConfig::new(3),
        ),
        "indices",
    );
    let err = err_of(
        &array![[0, 1], [2, 2], [0, 1], [1, 2]],
        &w,
        &DispatchConfig::new(3),
    );
    assert!(err.to_string().contains("repeated"), "{err}");
    assert_invalid(err, "indices");
    // -1 twice is fine (both unrouted)
    assert!(dispatch(
        array![[-1, -1]].view(),
        array![[0.5f32, 0.5]].view(),
        &DispatchConfig::new(3)
    )
    .is_ok());
}

#[test]
fn bad_lengths() {
    let (i, _) = example();
    let w = Array2::<f32>::zeros((4, 3));
    let err = err_of(&i, &w, &DispatchConfig::new(3));
    assert!(matches!(err, Error::Shape { arg: "weights", .. }), "{err}");
    // non-contiguous input
    let it = array![[0, 0, 0, 1], [1, 2, 1, 2]];
    let wt = array![[0.5f32, 0.6, 0.7, 0.4], [0.3, 0.2, 0.1, 0.35]];
    let err = dispatch(it.t(), wt.t(), &DispatchConfig::new(3)).unwrap_err();
    assert!(matches!(err, Error::Layout { arg: "indices", .. }), "{err}");

    let (i, w) = example();
    let (idx, wt) = (i.as_slice().unwrap(), w.as_slice().unwrap());
    let cfg = DispatchConfig::new(3)
        .capacity(2)
        .layout(DispatchLayout::PadToCapacity);
    let mut bufs = (
        vec![0; 8],
        vec![0; 8],
        vec![0.0; 8],
        vec![0; 3],
        vec![0; 6],
        vec![0; 4],
        vec![0; 1],
    );
    let mut call = |sizes: [usize; 7], t: usize| {
        let b = &mut bufs;
        dispatch_into(
            &idx[..t * 2],
            &wt[..sizes[0].min(8)],
            t,
            2,
            &cfg,
            DispatchBuffers {
                slot: &mut b.0[..sizes[1]],
                row: &mut b.1[..sizes[2]],
                kept_weights: &mut b.2[..sizes[3]],
                tokens_per_expert: &mut b.3[..sizes[4]],
                row_to_token: &mut b.4[..sizes[5]],
                expert_offsets: &mut b.5[..sizes[6]],
                rows_per_rank: &mut [0],
            },
        )
    };
    assert!(call([8, 8, 8, 8, 3, 6, 4], 4).is_ok());
    let names = [
        "weights",
        "slot",
        "row",
        "kept_weights",
        "tokens_per_expert",
        "row_to_token",
        "expert_offsets",
    ];
    for (p, name) in names.iter().enumerate() {
        let mut sizes = [8, 8, 8, 8, 3, 6, 4];
        sizes[p] -= 1;
        let err = call(sizes, 4).unwrap_err();
        assert!(
            matches!(err, Error::Shape { arg, .. } if arg == *name),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(name));
    }
    // indices of the wrong length for num_tokens
    let err = dispatch_into(
        &idx[..5],
        &wt[..6],
        3,
        2,
        &DispatchConfig::new(3),
        DispatchBuffers {
            slot: &mut [0; 6],
            row: &mut [0; 6],
            kept_weights: &mut [0.0; 6],
            tokens_per_expert: &mut [0; 3],
            row_to_token: &mut [0; 6],
            expert_offsets: &mut [0; 4],
            rows_per_rank: &mut [0],
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "indices", .. }), "{err}");
    // rows_per_rank
    let err = dispatch_into(
        idx,
        wt,
        4,
        2,
        &DispatchConfig::new(3),
        DispatchBuffers {
            slot: &mut [0; 8],
            row: &mut [0; 8],
            kept_weights: &mut [0.0; 8],
            tokens_per_expert: &mut [0; 3],
            row_to_token: &mut [0; 8],
            expert_offsets: &mut [0; 4],
            rows_per_rank: &mut [0; 2],
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Shape {
                arg: "rows_per_rank",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_layout_capacity_combinations() {
    let (i, w) = example();
    let err = err_of(
        &i,
        &w,
        &DispatchConfig::new(3).layout(DispatchLayout::PadToCapacity),
    );
    assert_invalid(err, "capacity");
    let err = err_of(
        &i,
        &w,
        &DispatchConfig::new(3)
            .capacity(4)
            .layout(DispatchLayout::Dropless { align: 1 }),
    );
    assert_invalid(err, "capacity");
    let err = err_of(
        &i,
        &w,
        &DispatchConfig::new(3).layout(DispatchLayout::Dropless { align: 0 }),
    );
    assert_invalid(err, "align");
}

#[test]
fn drop_policy_without_capacity_is_an_error() {
    // Regression: a drop policy given without a capacity was silently ignored (every
    // assignment kept), so a caller who forgot the capacity got no dropping and no
    // error. Now the policy is an Option, and a given one needs a capacity.
    let (i, w) = example();
    for policy in [
        DropPolicy::Position,
        DropPolicy::Probs,
        DropPolicy::Random { seed: 1, offset: 2 },
    ] {
        for layout in [
            DispatchLayout::Compact,
            DispatchLayout::Dropless { align: 1 },
        ] {
            let cfg = DispatchConfig::new(3).drop_policy(policy).layout(layout);
            let err = err_of(&i, &w, &cfg);
            let msg = err.to_string();
            assert!(msg.starts_with("dispatch: invalid `drop_policy`"), "{msg}");
            assert!(msg.contains("a drop policy needs a capacity"), "{msg}");
            assert_invalid(err, "drop_policy");
            assert!(dispatch_max_rows(4, 2, &cfg).is_err());
            let (mut a, mut b, mut c) = ([0i32; 8], [0i32; 8], [0f32; 8]);
            let (mut d, mut r, mut o, mut p) = ([0i32; 3], [0i32; 8], [0i32; 4], [0i32; 1]);
            let err = dispatch_into(
                i.as_slice().unwrap(),
                w.as_slice().unwrap(),
                4,
                2,
                &cfg,
                DispatchBuffers {
                    slot: &mut a,
                    row: &mut b,
                    kept_weights: &mut c,
                    tokens_per_expert: &mut d,
                    row_to_token: &mut r,
                    expert_offsets: &mut o,
                    rows_per_rank: &mut p,
                },
            )
            .unwrap_err();
            assert_invalid(err, "drop_policy");
        }
    }
    // The default config (no capacity, no policy) stays valid, a capacity alone means
    // Position, and a policy with a capacity is fine.
    assert_eq!(DispatchConfig::new(3).drop_policy, None);
    assert_eq!(
        DispatchConfig::new(3).effective_drop_policy(),
        DropPolicy::Position
    );
    let all = run(&i, &w, &DispatchConfig::new(3));
    assert_eq!(all.dropped, 0);
    let pos = run(&i, &w, &DispatchConfig::new(3).capacity(1));
    assert_eq!(
        pos,
        run(
            &i,
            &w,
            &DispatchConfig::new(3)
                .capacity(1)
                .drop_policy(DropPolicy::Position)
        )
    );
    assert!(dispatch(
        i.view(),
        w.view(),
        &DispatchConfig::new(3)
            .capacity(1)
            .drop_policy(DropPolicy::Probs)
    )
    .is_ok());
}

#[test]
fn index_out_of_range_is_an_error_not_a_panic() {
    // Regression (finding: `cpu::dispatch::dispatch(&[5], &[1.0], 1, 1,
    // &DispatchConfig::new(2), ..)` indexed out of bounds). The CPU kernel is now
    // crate-private; the public entry points reject the index.
    let err = err_of(&array![[5]], &array![[1.0f32]], &DispatchConfig::new(2));
    assert!(
        err.to_string().starts_with("dispatch: invalid `indices`"),
        "{err}"
    );
    assert!(err.to_string().contains("5 at token 0"), "{err}");
    assert_invalid(err, "indices");
    let (mut a, mut b, mut c, mut d) = ([0i32; 1], [0i32; 1], [0f32; 1], [0i32; 2]);
    let (mut r, mut o, mut p) = ([0i32; 1], [0i32; 3], [0i32; 1]);
    let err = dispatch_into(
        &[5],
        &[1.0],
        1,
        1,
        &DispatchConfig::new(2),
        DispatchBuffers {
            slot: &mut a,
            row: &mut b,
            kept_weights: &mut c,
            tokens_per_expert: &mut d,
            row_to_token: &mut r,
            expert_offsets: &mut o,
            rows_per_rank: &mut p,
        },
    )
    .unwrap_err();
    assert_invalid(err, "indices");
}

#[test]
fn bad_ep_size() {
    let (i, w) = example();
    assert_invalid(
        err_of(&i, &w, &DispatchConfig::new(3).ep_size(2)),
        "ep_size",
    );
    assert_invalid(
        err_of(&i, &w, &DispatchConfig::new(3).ep_size(0)),
        "ep_size",
    );
    assert_invalid(
        err_of(&i, &w, &DispatchConfig::new(3).ep_size(6)),
        "ep_size",
    );
    assert!(dispatch(i.view(), w.view(), &DispatchConfig::new(3).ep_size(3)).is_ok());
}

#[test]
fn overflow() {
    let max = i32::MAX as usize;
    let pad = DispatchConfig::new(4)
        .capacity(max / 4 + 1)
        .layout(DispatchLayout::PadToCapacity);
    let err = dispatch_max_rows(1, 1, &pad).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    assert!(err.to_string().contains("capacity"), "{err}");
    let err = dispatch_max_rows(max / 2 + 1, 2, &DispatchConfig::new(4)).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    assert!(err.to_string().contains("num_tokens * topk"), "{err}");
    let err = dispatch_max_rows(
        max / 2,
        2,
        &DispatchConfig::new(4).layout(DispatchLayout::Dropless { align: 4 }),
    )
    .unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    let err = dispatch_max_rows(4, 2, &DispatchConfig::new(4).capacity(max + 1)).unwrap_err();
    assert!(matches!(err, Error::Overflow { .. }), "{err}");
    // compact with a huge capacity is bounded by T*k
    assert_eq!(
        dispatch_max_rows(4, 2, &DispatchConfig::new(4).capacity(max)).unwrap(),
        8
    );
}
