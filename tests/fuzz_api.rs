//! Time-bounded fuzz harness over the public Rust API (docs/hardening.md).
//!
//! `tests/no_panic.rs` runs a fixed number of proptest cases per op family and asserts
//! "no panic" (plus index ranges for two ops). This harness goes further:
//!
//! - **time-bounded**: it runs until `MOE_ROUTER_FUZZ_SECONDS` (default 20) have passed,
//!   round-robin over every op of `src/ops` (the `ndarray` forms, and the `*_into` forms
//!   with at most 7 arguments), so a longer budget simply tries more inputs;
//! - **adversarial sizes**: 0, 1, and sizes at and past the `i32` index limit or that
//!   overflow `usize` products (`i32::MAX`, `2^31`, `2^32 - 1`, `2^40`, `usize::MAX / 2`,
//!   `usize::MAX`) given with small buffers (the op must reject them before it
//!   allocates or indexes), lengths off by one, non-standard `ndarray` layouts
//!   (transposed, stepped, inverted axis), `f32` / `f16` / `bf16` data;
//! - **adversarial values**: NaN, ±Inf, ±0, subnormals, `±f32::MAX`, out-of-range and
//!   repeated indices, options out of range (`topk` 0 or > E, bad groups, rates outside
//!   `[0, 1)`, non-finite coefficients, every drop policy and layout);
//! - **invariants** on every `Ok`: indices in range and distinct, buffer rows consistent
//!   with `row_to_token`, counts that add up, kept weights zero where dropped, weights
//!   and losses finite where the inputs are finite and moderate, permute / unpermute
//!   equal to a scalar reimplementation, capacity equal to its formula, ...;
//! - every call runs under `catch_unwind`: a panic is a failure naming the op, the
//!   inputs and the case seed; so is an invariant violation, an error message that
//!   does not start with `<op>: ` (`docs/semantics.md` §1.8) and a call slower than 5 s.
//!
//! It prints `fuzz_api: N calls in S s, R results, E errors, P panics` (and the counts
//! per op). Reproduce one case with `MOE_ROUTER_FUZZ_CASE=<op>:<seed>` (printed with
//! every failure); `MOE_ROUTER_FUZZ_SEED` changes the base seed (default fixed, so two
//! runs of the same length try the same inputs).
//!
//! `scripts/test.sh` runs it for 60 s in release mode:
//! `MOE_ROUTER_FUZZ_SECONDS=60 cargo test --locked --release --test fuzz_api -- --nocapture`.

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use common::Rng;
use half::{bf16, f16};
use moe_router::ndarray::{s, Array2, ArrayView1, ArrayView2, Axis};
use moe_router::*;

/// What one fuzz call returned: an invariant verdict for an `Ok`, or the op's error.
type Outcome = std::result::Result<std::result::Result<(), String>, Error>;
/// One op of the harness: draws inputs from the generator, writes a description of
/// them into the string (before calling, so that a panic can name them), calls the op
/// and checks the result.
type FuzzFn = fn(&mut Rng, &mut String) -> Outcome;

// --------------------------------------------------------------------------------------
// Input generators

/// Sizes past every limit: the op must reject them (with the small buffers given)
/// before any allocation or index is sized by them.
const HUGE: [usize; 9] = [
    i32::MAX as usize,
    i32::MAX as usize + 1,
    u32::MAX as usize,
    1 << 40,
    1 << 56,
    1 << 57,
    usize::MAX / 2,
    usize::MAX - 1,
    usize::MAX,
];

/// Buffers are never longer than this (a huge size gets a short buffer).
const MAX_BUF: usize = 1 << 14;

thread_local! {
    /// Whether this case is adversarial in its sizes and lengths (half of the cases):
    /// the others get consistent lengths and in-range sizes, so that their results
    /// exercise the invariants.
    static ADVERSARIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

fn adversarial() -> bool {
    ADVERSARIAL.with(|a| a.get())
}

/// A size for a flat-slice (`*_into`) call: usually small, sometimes 0, 1 or huge.
fn dim(r: &mut Rng, typical: usize) -> usize {
    if !adversarial() {
        return r.below(typical + 1);
    }
    match r.below(24) {
        0 | 1 => 0,
        2 | 3 => 1,
        4 => HUGE[r.below(HUGE.len())],
        _ => r.below(typical + 1),
    }
}

/// A size for an `ndarray` call (real arrays: never huge).
fn sdim(r: &mut Rng, typical: usize) -> usize {
    match r.below(12) {
        0 => 0,
        1 => 1,
        _ => r.below(typical + 1),
    }
}

/// The length of a buffer meant to hold `n` elements: usually `n`, sometimes off by
/// one or empty; a short random length if `n` is too large to allocate.
fn blen(r: &mut Rng, n: Option<usize>) -> usize {
    match n {
        Some(n) if n <= MAX_BUF && !adversarial() => n,
        Some(n) if n <= MAX_BUF => match r.below(16) {
            0 => n + 1,
            1 => n.saturating_sub(1),
            2 => 0,
            _ => n,
        },
        _ => r.below(9),
    }
}

fn prod(a: usize, b: usize) -> Option<usize> {
    a.checked_mul(b)
}

const SPECIAL: [f32; 14] = [
    0.0,
    -0.0,
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    f32::MAX,
    -f32::MAX,
    f32::MIN_POSITIVE,
    1e-45,
    1e30,
    -1e30,
    88.7,
    -104.0,
    1.0,
];

/// `n` floats: moderate normals, or (one vector in three) with special values mixed in.
fn floats(r: &mut Rng, n: usize) -> Vec<f32> {
    let special = r.below(3) == 0;
    let scale = [0.1, 1.0, 4.0, 30.0][r.below(4)];
    (0..n)
        .map(|_| {
            if special && r.below(4) == 0 {
                SPECIAL[r.below(SPECIAL.len())]
            } else if r.below(16) == 0 {
                // exact ties
                [0.0f32, 0.5, -1.0][r.below(3)]
            } else {
                (r.normal() * scale) as f32
            }
        })
        .collect()
}

/// A float option: usually a plain value, sometimes a special one.
fn fopt(r: &mut Rng, typical: f32) -> f32 {
    if !adversarial() && r.below(4) != 0 {
        return typical * r.range(0.0, 2.0) as f32;
    }
    match r.below(10) {
        0 => SPECIAL[r.below(SPECIAL.len())],
        1 => -typical,
        2 => 0.0,
        _ => typical * r.range(0.0, 2.0) as f32,
    }
}

/// A rate: usually in `[0, 1)`, sometimes 1, negative, or non-finite.
fn rate(r: &mut Rng) -> f32 {
    if !adversarial() && r.below(4) != 0 {
        return r.range(0.0, 0.9) as f32;
    }
    match r.below(12) {
        0 => 1.0,
        1 => -0.25,
        2 => f32::NAN,
        3 => f32::INFINITY,
        4 => 0.0,
        5 => 0.999_999_9,
        _ => r.range(0.0, 0.9) as f32,
    }
}

/// `[t, k]` expert indices: valid (distinct within a row, in `[0, e)`) most of the
/// time, else with `-1`, out-of-range, repeated or extreme entries.
fn indices(r: &mut Rng, t: usize, k: usize, e: usize, n: usize) -> Vec<i32> {
    let mut out = Vec::with_capacity(n);
    let valid = (r.below(4) != 0 || !adversarial()) && e >= k && e <= 4096;
    let mut perm: Vec<i32> = (0..e.min(4096) as i32).collect();
    let unrouted = r.below(3) == 0;
    while out.len() < n {
        if valid && out.len() % k.max(1) == 0 {
            // a fresh row: a random k-subset of the experts, in random order
            for j in 0..k.min(perm.len()) {
                let p = j + r.below(perm.len() - j);
                perm.swap(j, p);
            }
        }
        let j = out.len() % k.max(1);
        let v = if valid && j < perm.len() {
            if unrouted && r.below(5) == 0 {
                -1
            } else {
                perm[j]
            }
        } else {
            match r.below(10) {
                0 => -1,
                1 => e.min(i32::MAX as usize) as i32,
                2 => i32::MIN,
                3 => i32::MAX,
                4 => -2,
                _ => r.below(e.clamp(1, 1 << 20)) as i32,
            }
        };
        out.push(v);
    }
    let _ = t;
    out
}

/// Row indices into a buffer of `rows` rows: valid and distinct most of the time.
fn rows_map(r: &mut Rng, n: usize, rows: usize) -> Vec<i32> {
    if r.below(3) != 0 && rows <= 1 << 20 {
        // distinct rows (or -1)
        let mut free: Vec<i32> = (0..rows as i32).collect();
        (0..n)
            .map(|_| {
                if free.is_empty() || r.below(4) == 0 {
                    -1
                } else {
                    let p = r.below(free.len());
                    free.swap_remove(p)
                }
            })
            .collect()
    } else {
        indices(r, n, 1, rows, n)
    }
}

fn policy(r: &mut Rng) -> DropPolicy {
    match r.below(5) {
        0 => DropPolicy::Position,
        1 => DropPolicy::ChoiceThenPosition,
        2 => DropPolicy::Probs,
        3 => DropPolicy::BatchPrioritized,
        _ => DropPolicy::Random {
            seed: r.next_u64(),
            offset: r.next_u64(),
        },
    }
}

fn score_fn(r: &mut Rng) -> ScoreFunction {
    if r.below(2) == 0 {
        ScoreFunction::Softmax
    } else {
        ScoreFunction::Sigmoid
    }
}

fn gating_cfg(r: &mut Rng, e: usize, k: usize) -> TopkGatingConfig {
    let sf = score_fn(r);
    let mut cfg = TopkGatingConfig::new(k).score_function(sf);
    if r.below(2) == 0 && (adversarial() || sf == ScoreFunction::Softmax) {
        cfg = cfg.pre_softmax(true);
    }
    if r.below(2) == 0 {
        cfg = cfg.normalize(true);
    }
    if r.below(4) == 0 {
        cfg = cfg.scaling_factor(fopt(r, 2.5));
    }
    if r.below(3) == 0 {
        let g = [1, 2, 4, 8, 3, 0][r.below(6)];
        let gk = [1, 2, 3, 0][r.below(4)];
        cfg = cfg.group_limit(g, gk);
    }
    if r.below(4) == 0 {
        cfg = cfg.noise(fopt(r, 1.0), r.next_u64(), r.next_u64());
    }
    if r.below(4) == 0 {
        cfg = cfg.expert_masking(rate(r), r.next_u64(), r.next_u64());
    }
    let _ = e;
    cfg
}

/// A 2-D array of logical shape `[rows, cols]` holding `data` (row-major), stored in
/// one of four layouts: standard, transposed, stepped columns, inverted first axis.
struct Arr2<T> {
    a: Array2<T>,
    lay: u8,
}

impl<T: Copy + Default> Arr2<T> {
    fn new(r: &mut Rng, data: &[T], rows: usize, cols: usize) -> Self {
        let lay = if r.below(6) == 0 {
            1 + r.below(3) as u8
        } else {
            0
        };
        let at = |i: usize, j: usize| data[i * cols + j];
        let a = match lay {
            0 => Array2::from_shape_fn((rows, cols), |(i, j)| at(i, j)),
            1 => Array2::from_shape_fn((cols, rows), |(j, i)| at(i, j)),
            2 => Array2::from_shape_fn((rows, 2 * cols), |(i, j)| {
                if j % 2 == 0 {
                    at(i, j / 2)
                } else {
                    T::default()
                }
            }),
            _ => Array2::from_shape_fn((rows, cols), |(i, j)| at(rows - 1 - i, j)),
        };
        Arr2 { a, lay }
    }
    fn view(&self) -> ArrayView2<'_, T> {
        match self.lay {
            0 => self.a.view(),
            1 => self.a.t(),
            2 => self.a.slice(s![.., ..;2]),
            _ => {
                let mut v = self.a.view();
                v.invert_axis(Axis(0));
                v
            }
        }
    }
}

fn lay_name(l: u8) -> &'static str {
    ["std", "transposed", "stepped", "inverted"][l as usize]
}

/// A short description of a float vector for failure messages.
fn fdesc(v: &[f32]) -> String {
    let nan = v.iter().filter(|x| x.is_nan()).count();
    let inf = v.iter().filter(|x| x.is_infinite()).count();
    let head: Vec<String> = v.iter().take(6).map(|x| format!("{x:e}")).collect();
    format!(
        "len {} nan {nan} inf {inf} [{}{}]",
        v.len(),
        head.join(", "),
        if v.len() > 6 { ", .." } else { "" }
    )
}

fn idesc(v: &[i32]) -> String {
    let head: Vec<String> = v.iter().take(8).map(|x| x.to_string()).collect();
    format!(
        "len {} [{}{}]",
        v.len(),
        head.join(", "),
        if v.len() > 8 { ", .." } else { "" }
    )
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

/// Finite and of moderate magnitude (so sums and products of a few stay finite).
fn moderate(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite() && x.abs() <= 1e4)
}

fn ensure(ok: bool, what: impl FnOnce() -> String) -> std::result::Result<(), String> {
    if ok {
        Ok(())
    } else {
        Err(what())
    }
}

fn to<T: RouterFloat>(v: &[f32]) -> Vec<T> {
    v.iter().map(|&x| T::from_f32(x)).collect()
}

fn back<T: RouterFloat>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Runs `$body` with `$T` bound to f32, f16 or bf16 (chosen by `$dt`).
macro_rules! with_float {
    ($dt:expr, $T:ident => $body:expr) => {
        match $dt {
            0 => {
                type $T = f32;
                $body
            }
            1 => {
                type $T = f16;
                $body
            }
            _ => {
                type $T = bf16;
                $body
            }
        }
    };
}

fn dt_name(dt: usize) -> &'static str {
    ["f32", "f16", "bf16"][dt]
}

// --------------------------------------------------------------------------------------
// Invariants shared by several ops

/// Top-k indices `[t, k]`: in `[0, e)` and distinct within each row.
fn check_topk_indices(
    idx: &[i32],
    t: usize,
    k: usize,
    e: usize,
) -> std::result::Result<(), String> {
    ensure(idx.len() == t * k, || {
        format!("indices has {} entries, expected {}", idx.len(), t * k)
    })?;
    for (ti, row) in idx.chunks(k.max(1)).enumerate() {
        for (j, &x) in row.iter().enumerate() {
            ensure(x >= 0 && (x as usize) < e, || {
                format!("index {x} out of [0, {e}) at token {ti}")
            })?;
            ensure(!row[..j].contains(&x), || {
                format!("index {x} repeated at token {ti}")
            })?;
        }
    }
    Ok(())
}

/// Top-k weights: finite where the token's logits are finite (any mode; every weight is
/// a softmax or sigmoid value, renormalised and scaled by a finite factor).
fn check_gating_weights(
    w: &[f32],
    z: &[f32],
    t: usize,
    k: usize,
    e: usize,
    cfg: &TopkGatingConfig,
) -> std::result::Result<(), String> {
    for ti in 0..t {
        let zr = &z[ti * e..(ti + 1) * e];
        let wr = &w[ti * k..(ti + 1) * k];
        if finite(zr) {
            ensure(finite(wr), || {
                format!("non-finite weights {wr:?} for finite logits at token {ti}")
            })?;
            let plain = cfg.score_function == ScoreFunction::Softmax
                && !cfg.pre_softmax
                && !cfg.normalize
                && cfg.scaling_factor == 1.0;
            if plain {
                let s: f32 = wr.iter().sum();
                ensure((s - 1.0).abs() <= 1e-4, || {
                    format!("post-softmax weights sum to {s} at token {ti}")
                })?;
            }
        }
    }
    Ok(())
}

/// A dispatch result against its inputs (`docs/semantics.md` §4).
#[allow(clippy::too_many_arguments)]
fn check_dispatch(
    idx: &[i32],
    w: &[f32],
    t: usize,
    k: usize,
    cfg: &DispatchConfig,
    slot: &[i32],
    row: &[i32],
    kept: &[f32],
    tpe: &[i32],
    r2t: &[i32],
    offsets: &[i32],
    per_rank: &[i32],
    num_rows: usize,
    dropped: usize,
) -> std::result::Result<(), String> {
    let e = cfg.num_experts;
    ensure(offsets.len() == e + 1 && offsets[0] == 0, || {
        format!("expert_offsets {offsets:?}")
    })?;
    ensure(offsets[e] as usize == num_rows, || {
        format!(
            "expert_offsets[E] = {} but num_rows = {num_rows}",
            offsets[e]
        )
    })?;
    ensure(offsets.windows(2).all(|p| p[0] <= p[1]), || {
        "expert_offsets not monotone".into()
    })?;
    ensure(
        per_rank.iter().map(|&x| x as i64).sum::<i64>() == num_rows as i64,
        || format!("rows_per_rank {per_rank:?} do not add up to {num_rows}"),
    )?;
    ensure(r2t.len() >= num_rows, || {
        format!(
            "row_to_token has {} < num_rows {num_rows} entries",
            r2t.len()
        )
    })?;
    let mut routed = 0usize;
    let mut kept_n = 0usize;
    let mut kept_per_e = vec![0i64; e];
    for i in 0..t * k {
        let ti = i / k;
        if idx[i] < 0 {
            ensure(slot[i] == -1 && row[i] == -1 && kept[i] == 0.0, || {
                format!(
                    "unrouted assignment {i} has slot {} row {} weight {}",
                    slot[i], row[i], kept[i]
                )
            })?;
            continue;
        }
        routed += 1;
        if slot[i] < 0 {
            ensure(row[i] == -1 && kept[i] == 0.0, || {
                format!(
                    "dropped assignment {i} has row {} weight {}",
                    row[i], kept[i]
                )
            })?;
            continue;
        }
        kept_n += 1;
        let ex = idx[i] as usize;
        kept_per_e[ex] += 1;
        if let Some(c) = cfg.capacity {
            ensure((slot[i] as usize) < c, || {
                format!("slot {} >= capacity {c}", slot[i])
            })?;
        }
        let rr = row[i];
        ensure(rr >= offsets[ex] && rr < offsets[ex + 1], || {
            format!("row {rr} of assignment {i} outside expert {ex}'s segment")
        })?;
        ensure(r2t[rr as usize] == ti as i32, || {
            format!(
                "row_to_token[{rr}] = {} but assignment {i} is token {ti}",
                r2t[rr as usize]
            )
        })?;
        if !cfg.renormalize {
            ensure(kept[i].to_bits() == w[i].to_bits(), || {
                format!("kept weight {} != weight {} at {i}", kept[i], w[i])
            })?;
        }
    }
    ensure(routed == kept_n + dropped, || {
        format!("routed {routed} != kept {kept_n} + dropped {dropped}")
    })?;
    for ex in 0..e {
        ensure(tpe[ex] as i64 == kept_per_e[ex], || {
            format!(
                "tokens_per_expert[{ex}] = {} but {} kept",
                tpe[ex], kept_per_e[ex]
            )
        })?;
    }
    ensure(r2t[num_rows..].iter().all(|&x| x == -1), || {
        "row_to_token tail past num_rows is not -1".into()
    })?;
    ensure(
        r2t.iter().all(|&x| x >= -1 && (x as i64) < t as i64),
        || "row_to_token entry out of [-1, T)".into(),
    )?;
    let used = r2t[..num_rows].iter().filter(|&&x| x >= 0).count();
    ensure(used == kept_n, || {
        format!("{used} buffer rows used, {kept_n} assignments kept")
    })?;
    if matches!(cfg.layout, DispatchLayout::Dropless { .. }) {
        ensure(dropped == 0, || format!("dropless dropped {dropped}"))?;
    }
    Ok(())
}

/// Every error message starts with the op's name (`docs/semantics.md` §1.8).
fn check_error(e: &Error) -> std::result::Result<(), String> {
    let msg = e.to_string();
    let op = msg.split(": ").next().unwrap_or("");
    ensure(
        msg.len() > op.len() + 2
            && !op.is_empty()
            && op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
        || format!("error message does not start with `<op>: `: {msg:?}"),
    )
}

// --------------------------------------------------------------------------------------
// The ops

fn fz_topk_gating(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k, dt) = (sdim(r, 12), sdim(r, 20), sdim(r, 6), r.below(3));
    let z = floats(r, t * e);
    let cfg = gating_cfg(r, e, k);
    let bias = (r.below(3) == 0).then(|| {
        let n = blen(r, Some(e));
        floats(r, n)
    });
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let zf = back(&zt);
        let a = Arr2::new(r, &zt, t, e);
        write!(d, "{} [{t}, {e}] {} logits {}, bias {:?}, {cfg:?}", dt_name(dt), lay_name(a.lay), fdesc(&zf), bias.as_deref().map(fdesc)).unwrap();
        let bv = bias.as_ref().map(|b| ArrayView1::from(b.as_slice()));
        topk_gating(a.view(), bv, &cfg).map(|o| {
            check_topk_indices(o.indices.as_slice().unwrap(), t, k, e)?;
            ensure(o.weights.dim() == (t, k), || format!("weights shape {:?}", o.weights.dim()))?;
            check_gating_weights(o.weights.as_slice().unwrap(), &zf, t, k, e, &cfg)
        })
    })
}

fn fz_topk_gating_into(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (dim(r, 12), dim(r, 20), dim(r, 6));
    let nz = blen(r, prod(t, e));
    let z = floats(r, nz);
    let cfg = gating_cfg(r, e, k);
    let nw = blen(r, prod(t, k));
    let ni = blen(r, prod(t, k));
    let (mut w, mut i) = (vec![f32::NAN; nw], vec![i32::MIN; ni]);
    write!(
        d,
        "T {t} E {e} k {k}, logits {}, weights len {nw}, indices len {ni}, {cfg:?}",
        fdesc(&z)
    )
    .unwrap();
    topk_gating_into(&z, t, e, None, &cfg, &mut w, &mut i).map(|()| {
        check_topk_indices(&i, t, k, e)?;
        check_gating_weights(&w, &z, t, k, e, &cfg)
    })
}

fn fz_topk_gating_replay(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, e, k) = if into {
        (dim(r, 12), dim(r, 20), dim(r, 6))
    } else {
        (sdim(r, 12), sdim(r, 20), sdim(r, 6))
    };
    let nz = blen(r, prod(t, e));
    let z = if into {
        floats(r, nz)
    } else {
        floats(r, t * e)
    };
    let ni = if into { blen(r, prod(t, k)) } else { t * k };
    let idx = indices(r, t, k, e, ni);
    let cfg = gating_cfg(r, e, k);
    write!(
        d,
        "into {into} T {t} E {e} k {k}, logits {}, indices {}, {cfg:?}",
        fdesc(&z),
        idesc(&idx)
    )
    .unwrap();
    let check = |w: &[f32]| -> std::result::Result<(), String> {
        for ti in 0..t {
            if finite(&z[ti * e..(ti + 1) * e]) {
                ensure(finite(&w[ti * k..(ti + 1) * k]), || {
                    format!("non-finite replay weight at token {ti}")
                })?;
            }
        }
        Ok(())
    };
    if into {
        let mut w = vec![f32::NAN; blen(r, prod(t, k))];
        topk_gating_replay_into(&z, t, e, &idx, &cfg, &mut w).map(|()| check(&w))
    } else {
        let za = Arr2::new(r, &z, t, e);
        let ia = Arr2::new(r, &idx, t, k);
        topk_gating_replay(za.view(), ia.view(), &cfg).map(|w| {
            ensure(w.dim() == (t, k), || format!("shape {:?}", w.dim()))?;
            check(&w.iter().copied().collect::<Vec<_>>())
        })
    }
}

fn fz_topk_gating_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, e, k, dt) = if into {
        (dim(r, 12), dim(r, 20), dim(r, 6), r.below(3))
    } else {
        (sdim(r, 12), sdim(r, 20), sdim(r, 6), r.below(3))
    };
    let nz = if into { blen(r, prod(t, e)) } else { t * e };
    let z = floats(r, nz);
    let ni = if into { blen(r, prod(t, k)) } else { t * k };
    let idx = indices(r, t, k, e, ni);
    let ng = if into { blen(r, prod(t, k)) } else { t * k };
    let g = floats(r, ng);
    let cfg = gating_cfg(r, e, k);
    write!(
        d,
        "{} into {into} T {t} E {e} k {k}, logits {}, indices {}, grad {}, {cfg:?}",
        dt_name(dt),
        fdesc(&z),
        idesc(&idx),
        fdesc(&g)
    )
    .unwrap();
    // Finite for finite logits and moderate gradients without renormalisation (with it,
    // 1 / (sum + 1e-20)^2 may overflow for weights that underflow, as the formula says).
    let expect_finite =
        moderate(&g) && finite(&z) && !cfg.normalize && cfg.scaling_factor.abs() <= 1e4;
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let res = if into {
            let mut gz = vec![T::from_f32(f32::NAN); blen(r, prod(t, e))];
            topk_gating_backward_into(&zt, t, e, &idx, &g, &cfg, &mut gz).map(|()| back(&gz))
        } else {
            let za = Arr2::new(r, &zt, t, e);
            let ia = Arr2::new(r, &idx, t, k);
            let ga = Arr2::new(r, &g, t, k);
            topk_gating_backward(za.view(), ia.view(), ga.view(), &cfg).map(|a| back(&a.iter().copied().collect::<Vec<_>>()))
        };
        res.map(|gz| {
            ensure(gz.len() == t * e, || format!("grad_logits has {} entries", gz.len()))?;
            ensure(!expect_finite || finite(&gz) || dt != 0, || format!("non-finite grad_logits {}", fdesc(&gz)))
        })
    })
}

fn fz_capacity(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (dim(r, 5000), dim(r, 64), dim(r, 8));
    let cf = [
        0.0,
        -1.0,
        f64::NAN,
        f64::INFINITY,
        1e-300,
        5e-324,
        0.5,
        1.0,
        1.25,
        2.2,
        4.0,
        1e300,
        1e10,
    ][r.below(13)];
    let mut cfg =
        CapacityConfig::new(cf).min_capacity(if r.below(3) == 0 { dim(r, 40) } else { 0 });
    if r.below(3) == 0 {
        cfg = cfg.capacity_multiple(dim(r, 16));
    }
    write!(d, "T {t} E {e} k {k} {cfg:?}").unwrap();
    capacity(t, e, k, &cfg).map(|c| {
        ensure(c <= i32::MAX as usize, || {
            format!("capacity {c} > i32::MAX")
        })?;
        ensure(c >= cfg.min_capacity, || {
            format!("capacity {c} < min_capacity")
        })?;
        let raw = (((t as u128 * k as u128) as f64) / (e as f64) * cf).ceil();
        let mut want = (raw as u128).max(cfg.min_capacity as u128);
        if let Some(m) = cfg.capacity_multiple {
            want = want.div_ceil(m as u128) * m as u128;
        }
        ensure(want == c as u128, || {
            format!("capacity {c}, formula gives {want}")
        })
    })
}

fn fz_dispatch_max_rows(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, k) = (dim(r, 5000), dim(r, 8));
    let e = dim(r, 64);
    let cfg = dispatch_cfg(r, e, t, k);
    write!(d, "T {t} k {k} {cfg:?}").unwrap();
    dispatch_max_rows(t, k, &cfg).map(|n| {
        ensure(n <= i32::MAX as usize, || {
            format!("max rows {n} > i32::MAX")
        })?;
        let a = t as u128 * k as u128;
        let e = cfg.num_experts as u128;
        let want = match cfg.layout {
            DispatchLayout::PadToCapacity => e * cfg.capacity.unwrap_or(0) as u128,
            DispatchLayout::Compact => cfg.capacity.map_or(a, |c| a.min(e * c as u128)),
            DispatchLayout::Dropless { align } => a + e * (align as u128 - 1),
        };
        ensure(want == n as u128, || {
            format!("max rows {n}, formula gives {want}")
        })
    })
}

fn dispatch_cfg(r: &mut Rng, e: usize, t: usize, k: usize) -> DispatchConfig {
    let layout = match r.below(3) {
        0 => DispatchLayout::PadToCapacity,
        1 => DispatchLayout::Compact,
        _ => DispatchLayout::Dropless {
            align: [0, 1, 2, 4, 8, 16, usize::MAX][r.below(7)],
        },
    };
    let mut cfg = DispatchConfig::new(e)
        .layout(layout)
        .renormalize(r.below(2) == 0);
    cfg = cfg.ep_size([1, 1, 1, 2, 4, 3, 0][r.below(7)]);
    let dropless = matches!(layout, DispatchLayout::Dropless { .. });
    if (!dropless && r.below(5) != 0) || r.below(10) == 0 {
        let fair = t.saturating_mul(k).checked_div(e).map_or(1, |v| v.max(1));
        let c = match r.below(8) {
            0 => 0,
            1 => HUGE[r.below(HUGE.len())],
            _ => r.below(fair.min(64) + 1),
        };
        cfg = cfg.capacity(c);
    }
    if cfg.capacity.is_some() || r.below(8) == 0 {
        cfg = cfg.drop_policy(policy(r));
    }
    cfg
}

fn fz_dispatch(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, k, e) = if into {
        (dim(r, 24), dim(r, 4), dim(r, 12))
    } else {
        (sdim(r, 24), sdim(r, 4), sdim(r, 12))
    };
    let cfg = dispatch_cfg(r, e, t, k);
    let n = if into { blen(r, prod(t, k)) } else { t * k };
    let idx = indices(r, t, k, e, n);
    let nw = if into { blen(r, prod(t, k)) } else { t * k };
    let w = floats(r, nw);
    write!(
        d,
        "into {into} T {t} k {k} {cfg:?}, indices {}, weights {}",
        idesc(&idx),
        fdesc(&w)
    )
    .unwrap();
    if into {
        let rows = dispatch_max_rows(t, k, &cfg).ok().filter(|&n| n <= MAX_BUF);
        let nk = blen(r, prod(t, k));
        let (mut slot, mut row, mut kept) = (
            vec![7; nk],
            vec![7; blen(r, prod(t, k))],
            vec![f32::NAN; blen(r, prod(t, k))],
        );
        let (mut tpe, mut r2t) = (vec![7; blen(r, Some(e))], vec![7; blen(r, rows)]);
        let (mut off, mut rpr) = (
            vec![7; blen(r, e.checked_add(1))],
            vec![7; blen(r, Some(cfg.ep_size))],
        );
        let out = DispatchBuffers {
            slot: &mut slot,
            row: &mut row,
            kept_weights: &mut kept,
            tokens_per_expert: &mut tpe,
            row_to_token: &mut r2t,
            expert_offsets: &mut off,
            rows_per_rank: &mut rpr,
        };
        dispatch_into(&idx, &w, t, k, &cfg, out).map(|c| {
            check_dispatch(
                &idx, &w, t, k, &cfg, &slot, &row, &kept, &tpe, &r2t, &off, &rpr, c.num_rows,
                c.dropped,
            )
        })
    } else {
        if known(
            "BIG",
            dispatch_max_rows(t, k, &cfg).is_ok_and(|n| n > MAX_BUF),
        ) {
            return Ok(Ok(()));
        }
        let ia = Arr2::new(r, &idx, t, k);
        let wa = Arr2::new(r, &w, t, k);
        dispatch(ia.view(), wa.view(), &cfg).map(|o| {
            let v = |a: &Array2<i32>| a.iter().copied().collect::<Vec<_>>();
            check_dispatch(
                &idx,
                &w,
                t,
                k,
                &cfg,
                &v(&o.slot),
                &v(&o.row),
                &o.kept_weights.iter().copied().collect::<Vec<_>>(),
                o.tokens_per_expert.as_slice().unwrap(),
                o.row_to_token.as_slice().unwrap(),
                o.expert_offsets.as_slice().unwrap(),
                o.rows_per_rank.as_slice().unwrap(),
                o.num_rows,
                o.dropped,
            )
        })
    }
}

/// Expert choice (§5): `[T, E]` weights / rows against `E * capacity` rows.
#[allow(clippy::too_many_arguments)]
fn check_expert_choice(
    z: &[f32],
    t: usize,
    e: usize,
    c: usize,
    w: &[f32],
    row: &[i32],
    r2t: &[i32],
    rw: &[f32],
    tpe: &[i32],
    off: &[i32],
) -> std::result::Result<(), String> {
    for ex in 0..e {
        ensure(tpe[ex] as usize == c.min(t), || {
            format!("tokens_per_expert[{ex}] = {}", tpe[ex])
        })?;
        ensure(off[ex] as usize == ex * c, || {
            format!("expert_offsets[{ex}] = {}", off[ex])
        })?;
    }
    let mut chosen = vec![0usize; e];
    for ti in 0..t {
        for ex in 0..e {
            let rr = row[ti * e + ex];
            if rr < 0 {
                ensure(rr == -1 && w[ti * e + ex] == 0.0, || {
                    format!(
                        "unchosen ({ti}, {ex}) has row {rr} weight {}",
                        w[ti * e + ex]
                    )
                })?;
                continue;
            }
            chosen[ex] += 1;
            let rr = rr as usize;
            ensure(rr >= ex * c && rr < (ex + 1) * c, || {
                format!("row {rr} of ({ti}, {ex}) outside the expert's rows")
            })?;
            ensure(r2t[rr] == ti as i32, || {
                format!("row_to_token[{rr}] = {} != {ti}", r2t[rr])
            })?;
            ensure(rw[rr].to_bits() == w[ti * e + ex].to_bits(), || {
                format!("row_weights[{rr}] != weights[{ti}, {ex}]")
            })?;
        }
        if finite(&z[ti * e..(ti + 1) * e]) {
            ensure(finite(&w[ti * e..(ti + 1) * e]), || {
                format!("non-finite weights for finite logits at token {ti}")
            })?;
        }
    }
    for (ex, &n) in chosen.iter().enumerate() {
        ensure(n == c.min(t), || format!("expert {ex} chose {n} tokens"))?;
    }
    Ok(())
}

fn fz_expert_choice(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, e, c, dt) = if into {
        (dim(r, 12), dim(r, 10), dim(r, 14), r.below(3))
    } else {
        (sdim(r, 12), sdim(r, 10), sdim(r, 14), r.below(3))
    };
    let nz = if into { blen(r, prod(t, e)) } else { t * e };
    let z = floats(r, nz);
    write!(
        d,
        "{} into {into} T {t} E {e} capacity {c}, logits {}",
        dt_name(dt),
        fdesc(&z)
    )
    .unwrap();
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let zf = back(&zt);
        if into {
            let rows = expert_choice_num_rows(t, e, c).ok().filter(|&n| n <= MAX_BUF);
            let (mut w, mut row) = (vec![f32::NAN; blen(r, prod(t, e))], vec![7; blen(r, prod(t, e))]);
            let (mut r2t, mut rw) = (vec![7; blen(r, rows)], vec![f32::NAN; blen(r, rows)]);
            let (mut tpe, mut off) = (vec![7; blen(r, Some(e))], vec![7; blen(r, e.checked_add(1))]);
            let out = ExpertChoiceBuffers { weights: &mut w, row: &mut row, row_to_token: &mut r2t, row_weights: &mut rw, tokens_per_expert: &mut tpe, expert_offsets: &mut off };
            expert_choice_into(&zt, t, e, c, out).map(|()| check_expert_choice(&zf, t, e, c, &w, &row, &r2t, &rw, &tpe, &off))
        } else {
            let a = Arr2::new(r, &zt, t, e);
            expert_choice(a.view(), c).map(|o| {
                let w: Vec<f32> = o.weights.iter().copied().collect();
                let row: Vec<i32> = o.row.iter().copied().collect();
                check_expert_choice(&zf, t, e, c, &w, &row, o.row_to_token.as_slice().unwrap(), o.row_weights.as_slice().unwrap(), o.tokens_per_expert.as_slice().unwrap(), o.expert_offsets.as_slice().unwrap())
            })
        }
    })
}

fn fz_expert_choice_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, c, dt) = (sdim(r, 12), sdim(r, 10), sdim(r, 6), r.below(3));
    let z = floats(r, t * e);
    let row = indices(r, t, e, e.saturating_mul(c) + 1, t * e);
    let g = floats(r, t * e);
    write!(
        d,
        "{} T {t} E {e}, logits {}, row {}, grad {}",
        dt_name(dt),
        fdesc(&z),
        idesc(&row),
        fdesc(&g)
    )
    .unwrap();
    let expect_finite = moderate(&z) && moderate(&g);
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let (za, ra, ga) = (Arr2::new(r, &zt, t, e), Arr2::new(r, &row, t, e), Arr2::new(r, &g, t, e));
        expert_choice_backward(za.view(), ra.view(), ga.view()).map(|gz| {
            ensure(gz.dim() == (t, e), || format!("shape {:?}", gz.dim()))?;
            let gz = back(&gz.iter().copied().collect::<Vec<_>>());
            ensure(!expect_finite || finite(&gz), || format!("non-finite grad {}", fdesc(&gz)))
        })
    })
}

fn fz_permute(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, h, rows, dt) = if into {
        (dim(r, 10), dim(r, 8), dim(r, 30), r.below(3))
    } else {
        (sdim(r, 10), sdim(r, 8), sdim(r, 30), r.below(3))
    };
    let nx = if into { blen(r, prod(t, h)) } else { t * h };
    let x = floats(r, nx);
    let nr = if rows <= MAX_BUF { rows } else { r.below(9) };
    let r2t = rows_map(r, nr, t)
        .iter()
        .map(|&v| {
            if r.below(3) == 0 {
                v
            } else {
                r.below(t.clamp(1, 1 << 20)) as i32 - (t == 0) as i32
            }
        })
        .collect::<Vec<_>>();
    write!(
        d,
        "{} into {into} T {t} H {h} rows {rows}, x {}, row_to_token {}",
        dt_name(dt),
        fdesc(&x),
        idesc(&r2t)
    )
    .unwrap();
    with_float!(dt, T => {
        let xt: Vec<T> = to(&x);
        // buf[r] = x[row_to_token[r]] bit for bit, zeros for -1
        let check = |buf: &[T]| -> std::result::Result<(), String> {
            ensure(buf.len() == r2t.len() * h, || format!("buffer has {} entries", buf.len()))?;
            for (ri, &tok) in r2t.iter().enumerate() {
                let got = &buf[ri * h..(ri + 1) * h];
                if tok < 0 {
                    ensure(got.iter().all(|v| v.to_f32() == 0.0), || format!("padding row {ri} not zero"))?;
                } else {
                    let want = &xt[tok as usize * h..(tok as usize + 1) * h];
                    ensure(bytemuck::cast_slice::<T, u8>(got) == bytemuck::cast_slice::<T, u8>(want), || format!("row {ri} is not x[{tok}]"))?;
                }
            }
            Ok(())
        };
        if into {
            let mut out = vec![T::from_f32(f32::NAN); blen(r, prod(nr, h))];
            permute_into(&xt, t, h, &r2t, &mut out).map(|()| check(&out))
        } else {
            let a = Arr2::new(r, &xt, t, h);
            permute(a.view(), ArrayView1::from(r2t.as_slice())).map(|b| check(&b.iter().copied().collect::<Vec<_>>()))
        }
    })
}

fn fz_permute_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, h, k, rows, dt) = if into {
        (dim(r, 10), dim(r, 8), dim(r, 4), dim(r, 30), r.below(3))
    } else {
        (sdim(r, 10), sdim(r, 8), sdim(r, 4), sdim(r, 30), r.below(3))
    };
    let ng = if into {
        blen(r, prod(rows, h))
    } else {
        rows * h
    };
    let g = floats(r, ng);
    let nr = if into { blen(r, prod(t, k)) } else { t * k };
    let row = rows_map(r, nr, rows);
    write!(
        d,
        "{} into {into} T {t} H {h} k {k} rows {rows}, grad_buf {}, row {}",
        dt_name(dt),
        fdesc(&g),
        idesc(&row)
    )
    .unwrap();
    let expect_finite = moderate(&g);
    with_float!(dt, T => {
        let gt: Vec<T> = to(&g);
        let res = if into {
            let mut gx = vec![T::from_f32(f32::NAN); blen(r, prod(t, h))];
            let sizes = PermuteSizes { num_tokens: t, num_rows: rows, hidden: h, k };
            permute_backward_into(sizes, &gt, &row, &mut gx).map(|()| back(&gx))
        } else {
            let (ga, ra) = (Arr2::new(r, &gt, rows, h), Arr2::new(r, &row, t, k));
            permute_backward(ga.view(), ra.view()).map(|a| back(&a.iter().copied().collect::<Vec<_>>()))
        };
        res.map(|gx| {
            ensure(gx.len() == t * h, || format!("grad_x has {} entries", gx.len()))?;
            // grad_x[t] = sum_j grad_buf[row[t, j]] (f32, j order, rounded once); with
            // H = 0 there is nothing to compare (and T may be huge: T * 0 elements)
            for ti in 0..if h == 0 { 0 } else { t } {
                for hi in 0..h {
                    let mut acc = 0f32;
                    for j in 0..k {
                        let rr = row[ti * k + j];
                        if rr >= 0 {
                            acc += gt[rr as usize * h + hi].to_f32();
                        }
                    }
                    let want = T::from_f32(acc).to_f32();
                    let got = gx[ti * h + hi];
                    ensure(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), || format!("grad_x[{ti}, {hi}] = {got}, expected {want}"))?;
                }
            }
            ensure(!expect_finite || finite(&gx) || dt == 1, || "non-finite grad_x".into())
        })
    })
}

fn fz_unpermute(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, h, k, rows, dt) = (sdim(r, 10), sdim(r, 8), sdim(r, 4), sdim(r, 30), r.below(3));
    let y = floats(r, rows * h);
    let row = rows_map(r, t * k, rows);
    let w = floats(r, t * k);
    write!(
        d,
        "{} T {t} H {h} k {k} rows {rows}, y {}, row {}, weights {}",
        dt_name(dt),
        fdesc(&y),
        idesc(&row),
        fdesc(&w)
    )
    .unwrap();
    with_float!(dt, T => {
        let yt: Vec<T> = to(&y);
        let (ya, ra, wa) = (Arr2::new(r, &yt, rows, h), Arr2::new(r, &row, t, k), Arr2::new(r, &w, t, k));
        unpermute(ya.view(), ra.view(), wa.view()).map(|out| {
            ensure(out.dim() == (t, h), || format!("shape {:?}", out.dim()))?;
            // out[t] = sum_j w * y[row] in f32, j order, product then sum rounded, once to T
            for ti in 0..t {
                for hi in 0..h {
                    let mut acc = 0f32;
                    for j in 0..k {
                        let rr = row[ti * k + j];
                        if rr >= 0 {
                            acc += w[ti * k + j] * yt[rr as usize * h + hi].to_f32();
                        }
                    }
                    let want = T::from_f32(acc).to_f32();
                    let got = out[[ti, hi]].to_f32();
                    ensure(got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()), || format!("out[{ti}, {hi}] = {got}, expected {want}"))?;
                }
            }
            Ok(())
        })
    })
}

fn fz_unpermute_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, h, k, rows, dt) = (
        sdim(r, 10),
        sdim(r, 40),
        sdim(r, 4),
        sdim(r, 30),
        r.below(3),
    );
    let go = floats(r, t * h);
    let y = floats(r, rows * h);
    let row = rows_map(r, t * k, rows);
    let w = floats(r, t * k);
    write!(
        d,
        "{} T {t} H {h} k {k} rows {rows}, grad_out {}, y {}, row {}, weights {}",
        dt_name(dt),
        fdesc(&go),
        fdesc(&y),
        idesc(&row),
        fdesc(&w)
    )
    .unwrap();
    let expect_finite = moderate(&go) && moderate(&y) && moderate(&w);
    with_float!(dt, T => {
        let (got, yt): (Vec<T>, Vec<T>) = (to(&go), to(&y));
        let (ga, ya, ra, wa) = (Arr2::new(r, &got, t, h), Arr2::new(r, &yt, rows, h), Arr2::new(r, &row, t, k), Arr2::new(r, &w, t, k));
        unpermute_backward(ga.view(), ya.view(), ra.view(), wa.view()).map(|gr| {
            ensure(gr.grad_y.dim() == (rows, h) && gr.grad_weights.dim() == (t, k), || "gradient shapes".into())?;
            // grad_y[row[t, j]] = w[t, j] * grad_out[t], rounded once
            for ti in 0..t {
                for j in 0..k {
                    let rr = row[ti * k + j];
                    if rr < 0 {
                        ensure(gr.grad_weights[[ti, j]] == 0.0, || format!("grad_weights[{ti}, {j}] of a dropped assignment is not 0"))?;
                        continue;
                    }
                    for hi in 0..h {
                        let want = T::from_f32(w[ti * k + j] * got[ti * h + hi].to_f32()).to_f32();
                        let g = gr.grad_y[[rr as usize, hi]].to_f32();
                        ensure(g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()), || format!("grad_y[{rr}, {hi}] = {g}, expected {want}"))?;
                    }
                }
            }
            ensure(!expect_finite || gr.grad_weights.iter().all(|x| x.is_finite()), || "non-finite grad_weights".into())
        })
    })
}

fn fz_permute_maps(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, k, rows) = (dim(r, 10), dim(r, 4), dim(r, 30));
    let n = blen(r, prod(t, k));
    let row = rows_map(r, n, rows.min(1 << 20));
    let nr = if rows <= MAX_BUF { rows } else { r.below(9) };
    write!(d, "T {t} k {k} rows {rows}, row {}", idesc(&row)).unwrap();
    // (The length validators behind permute / permute_backward are crate-private and
    // reached through those ops' own fuzz targets.)
    match r.below(2) {
        0 => {
            let r2t = rows_map(r, nr, t.min(1 << 20));
            write!(d, ", row_to_token {}", idesc(&r2t)).unwrap();
            check_permute_maps(&r2t, &row, t, k).map(|()| Ok(()))
        }
        _ if known("BIG", rows > MAX_BUF && rows <= i32::MAX as usize) => Ok(Ok(())),
        _ => permute_row_to_token(&row, t, k, rows).map(|r2t| {
            ensure(r2t.len() == rows, || {
                format!("row_to_token has {} entries", r2t.len())
            })?;
            for (i, &rr) in row.iter().enumerate() {
                if rr >= 0 {
                    ensure(r2t[rr as usize] == (i / k.max(1)) as i32, || {
                        format!("row_to_token[{rr}] = {}", r2t[rr as usize])
                    })?;
                }
            }
            ensure(
                r2t.iter().filter(|&&x| x >= 0).count() == row.iter().filter(|&&x| x >= 0).count(),
                || "row_to_token has rows no assignment points to".into(),
            )
        }),
    }
}

fn mask(r: &mut Rng, n: usize) -> Option<Vec<bool>> {
    (r.below(2) == 0).then(|| (0..n).map(|_| r.below(3) == 0).collect())
}

fn counts(r: &mut Rng, n: usize) -> Vec<i64> {
    (0..n)
        .map(|_| match r.below(12) {
            0 => -1,
            1 => i64::MAX,
            2 => 0,
            3 => 1 << 40,
            _ => r.below(50) as i64,
        })
        .collect()
}

fn aux_cfg(r: &mut Rng, k: usize) -> AuxLossConfig {
    AuxLossConfig::new(k)
        .score_function(score_fn(r))
        .coeff(fopt(r, 0.01))
}

fn fz_aux_loss(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (dim(r, 16), dim(r, 12), dim(r, 4));
    let z = {
        let n = blen(r, prod(t, e));
        floats(r, n)
    };
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let c = (r.below(3) == 0).then(|| {
        let n = blen(r, Some(e));
        counts(r, n)
    });
    let total = (r.below(3) == 0).then(|| dim(r, 40));
    let cfg = aux_cfg(r, k);
    write!(
        d,
        "T {t} E {e} k {k}, logits {}, mask {:?}, counts {c:?}, total {total:?}, {cfg:?}",
        fdesc(&z),
        m.as_ref().map(|m| m.len())
    )
    .unwrap();
    if known("R1", prod(t, e) == Some(0) && e > MAX_BUF) {
        return Ok(Ok(()));
    }
    aux_loss(&z, t, e, m.as_deref(), c.as_deref(), total, &cfg).map(|o| {
        let valid = m.as_ref().map_or(t, |m| m.iter().filter(|&&p| !p).count());
        ensure(o.counts.len() == e && o.scores_sum.len() == e, || {
            "counts / scores_sum length".into()
        })?;
        if c.is_none() {
            ensure(o.counts.iter().sum::<i64>() == (valid * k) as i64, || {
                format!(
                    "counts {:?} do not add up to k * valid = {}",
                    o.counts,
                    valid * k
                )
            })?;
            ensure(o.total_tokens == valid, || {
                format!("total_tokens {} != valid {valid}", o.total_tokens)
            })?;
        }
        let small_counts = o.counts.iter().all(|&x| x <= 1 << 20);
        if moderate(&z) && cfg.coeff.abs() <= 1e4 && small_counts {
            ensure(o.loss.is_finite(), || format!("non-finite loss {}", o.loss))?;
            if cfg.coeff >= 0.0 {
                ensure(o.loss >= 0.0, || format!("negative loss {}", o.loss))?;
            }
        }
        Ok(())
    })
}

fn fz_aux_loss_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k, dt) = (sdim(r, 16), sdim(r, 12), sdim(r, 4), r.below(3));
    let z = floats(r, t * e);
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let nc = blen(r, Some(e));
    let c = counts(r, nc);
    let total = dim(r, 40);
    let cfg = aux_cfg(r, k);
    let gl = fopt(r, 1.0);
    write!(d, "{} T {t} E {e} k {k}, logits {}, mask {:?}, counts {c:?}, total {total}, grad {gl}, {cfg:?}", dt_name(dt), fdesc(&z), m.as_ref().map(|m| m.len())).unwrap();
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let a = Arr2::new(r, &zt, t, e);
        aux_loss_backward(a.view(), m.as_deref(), &c, total, &cfg, gl).map(|g| {
            ensure(g.dim() == (t, e), || format!("shape {:?}", g.dim()))?;
            if let Some(m) = &m {
                for (ti, _) in m.iter().enumerate().take(t).filter(|(_, &p)| p) {
                    ensure(g.row(ti).iter().all(|x| x.to_f32() == 0.0), || {
                        format!("padding token {ti} got a gradient")
                    })?;
                }
            }
            Ok(())
        })
    })
}

fn fz_seq_aux_loss(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (dim(r, 16), dim(r, 12), dim(r, 4));
    let sl = [0, 1, 2, 3, 4, 5, 8, t, usize::MAX][r.below(9)];
    let z = {
        let n = blen(r, prod(t, e));
        floats(r, n)
    };
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let cfg = aux_cfg(r, k);
    let c = (r.below(4) == 0).then(|| {
        let n = blen(r, t.checked_div(sl).and_then(|b| prod(b, e)));
        counts(r, n)
    });
    write!(
        d,
        "T {t} E {e} k {k} seq_len {sl}, logits {}, mask {:?}, counts {c:?}, {cfg:?}",
        fdesc(&z),
        m.as_ref().map(|m| m.len())
    )
    .unwrap();
    seq_aux_loss(&z, t, e, sl, m.as_deref(), c.as_deref(), &cfg).map(|o| {
        let Some(b) = t.checked_div(sl) else {
            return Err("accepted seq_len = 0".into());
        };
        ensure(o.counts.len() == b * e && o.valid_tokens.len() == b, || {
            "counts / valid_tokens length".into()
        })?;
        if c.is_none() {
            for bi in 0..b {
                let n: i64 = o.counts[bi * e..(bi + 1) * e].iter().sum();
                ensure(n == (o.valid_tokens[bi] * k) as i64, || {
                    format!(
                        "sequence {bi}: counts add up to {n}, valid {}",
                        o.valid_tokens[bi]
                    )
                })?;
            }
            if moderate(&z) && cfg.coeff.abs() <= 1e4 {
                ensure(o.loss.is_finite(), || format!("non-finite loss {}", o.loss))?;
            }
        }
        Ok(())
    })
}

fn fz_seq_aux_loss_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (sdim(r, 16), sdim(r, 12), sdim(r, 4));
    let sl = [0, 1, 2, 3, 4, t, usize::MAX][r.below(7)];
    let z = floats(r, t * e);
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let nc = blen(r, t.checked_div(sl).and_then(|b| prod(b, e)));
    let c = counts(r, nc);
    let cfg = aux_cfg(r, k);
    let gl = fopt(r, 1.0);
    write!(
        d,
        "T {t} E {e} k {k} seq_len {sl}, logits {}, mask {:?}, counts {c:?}, grad {gl}, {cfg:?}",
        fdesc(&z),
        m.as_ref().map(|m| m.len())
    )
    .unwrap();
    let a = Arr2::new(r, &z, t, e);
    seq_aux_loss_backward(a.view(), sl, m.as_deref(), &c, &cfg, gl)
        .map(|g| ensure(g.dim() == (t, e), || format!("shape {:?}", g.dim())))
}

fn fz_z_loss(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, dt) = (dim(r, 16), dim(r, 12), r.below(3));
    let z = {
        let n = blen(r, prod(t, e));
        floats(r, n)
    };
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let coeff = fopt(r, 1e-3);
    write!(
        d,
        "{} T {t} E {e}, logits {}, mask {:?}, coeff {coeff}",
        dt_name(dt),
        fdesc(&z),
        m.as_ref().map(|m| m.len())
    )
    .unwrap();
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        z_loss(&zt, t, e, m.as_deref(), coeff).map(|o| {
            let valid = m.as_ref().map_or(t, |m| m.iter().filter(|&&p| !p).count());
            ensure(o.valid_tokens == valid, || format!("valid_tokens {} != {valid}", o.valid_tokens))?;
            if moderate(&back(&zt)) && coeff.abs() <= 1e4 {
                ensure(o.loss.is_finite(), || format!("non-finite loss {}", o.loss))?;
            }
            if coeff >= 0.0 && !o.loss.is_nan() {
                ensure(o.loss >= 0.0, || format!("negative loss {}", o.loss))?;
            }
            Ok(())
        })
    })
}

fn fz_z_loss_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let into = r.below(2) == 0;
    let (t, e, dt) = if into {
        (dim(r, 16), dim(r, 12), r.below(3))
    } else {
        (sdim(r, 16), sdim(r, 12), r.below(3))
    };
    let nz = if into { blen(r, prod(t, e)) } else { t * e };
    let z = floats(r, nz);
    let nm = blen(r, Some(t));
    let m = mask(r, nm);
    let (coeff, gl) = (fopt(r, 1e-3), fopt(r, 1.0));
    write!(
        d,
        "{} into {into} T {t} E {e}, logits {}, mask {:?}, coeff {coeff}, grad {gl}",
        dt_name(dt),
        fdesc(&z),
        m.as_ref().map(|m| m.len())
    )
    .unwrap();
    let expect_finite = moderate(&z) && coeff.abs() <= 1e4 && gl.abs() <= 1e4;
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let res = if into {
            let mut gz = vec![T::from_f32(f32::NAN); blen(r, prod(t, e))];
            let x = RouterLogits { logits: &zt, num_tokens: t, num_experts: e, padding_mask: m.as_deref() };
            z_loss_backward_into(x, coeff, gl, &mut gz).map(|()| back(&gz))
        } else {
            let a = Arr2::new(r, &zt, t, e);
            z_loss_backward(a.view(), m.as_deref(), coeff, gl).map(|g| back(&g.iter().copied().collect::<Vec<_>>()))
        };
        res.map(|gz| {
            ensure(gz.len() == t * e, || format!("grad has {} entries", gz.len()))?;
            ensure(!expect_finite || finite(&gz), || format!("non-finite grad {}", fdesc(&gz)))
        })
    })
}

fn check_mask(
    m: &[bool],
    t: usize,
    e: usize,
    k: usize,
    rate: f32,
) -> std::result::Result<(), String> {
    ensure(m.len() == t * e, || format!("mask has {} entries", m.len()))?;
    for ti in 0..t {
        let open = m[ti * e..(ti + 1) * e].iter().filter(|&&x| !x).count();
        ensure(open >= k, || {
            format!("token {ti} keeps {open} < topk {k} candidates")
        })?;
        if rate == 0.0 {
            ensure(open == e, || format!("rate 0 masked token {ti}"))?;
        }
    }
    Ok(())
}

fn fz_expert_mask(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k) = (dim(r, 12), dim(r, 24), dim(r, 6));
    let cfg = DropoutConfig::new(rate(r), r.next_u64(), r.next_u64());
    write!(d, "T {t} E {e} k {k} {cfg:?}").unwrap();
    // finding R3: validation passes (no tokens, any E) and then CHUNK * E overflows
    let r3 = t == 0 && e.checked_mul(256).is_none() && expert_mask_len(t, e, k, &cfg).is_ok();
    match r.below(3) {
        0 => expert_mask_len(t, e, k, &cfg)
            .map(|n| ensure(Some(n) == prod(t, e), || format!("length {n}"))),
        1 => {
            let mut m = vec![true; blen(r, prod(t, e))];
            if known("R3", r3 && m.is_empty()) {
                return Ok(Ok(()));
            }
            expert_mask_into(t, e, k, &cfg, &mut m).map(|()| check_mask(&m, t, e, k, cfg.rate))
        }
        _ => {
            // the allocating form: sizes whose product is small enough to allocate, or
            // past the i32 limit (rejected before allocating)
            if known(
                "BIG",
                prod(t, e).is_some_and(|n| n <= i32::MAX as usize && n > MAX_BUF),
            ) || known("R3", r3)
            {
                return Ok(Ok(()));
            }
            expert_mask(t, e, k, &cfg).map(|m| {
                ensure(m.dim() == (t, e), || format!("shape {:?}", m.dim()))?;
                check_mask(m.as_slice().unwrap(), t, e, k, cfg.rate)
            })
        }
    }
}

fn fz_assignment_dropout(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, k, e) = (sdim(r, 16), sdim(r, 4), dim(r, 12));
    let idx = indices(r, t, k, e, t * k);
    let w = floats(r, t * k);
    let cfg = DropoutConfig::new(rate(r), r.next_u64(), r.next_u64());
    let renorm = r.below(2) == 0;
    write!(
        d,
        "T {t} k {k} E {e} {cfg:?} renormalize {renorm}, indices {}, weights {}",
        idesc(&idx),
        fdesc(&w)
    )
    .unwrap();
    let (ia, wa) = (Arr2::new(r, &idx, t, k), Arr2::new(r, &w, t, k));
    assignment_dropout(ia.view(), wa.view(), e, &cfg, renorm).map(|o| {
        ensure(
            o.indices.dim() == (t, k) && o.weights.dim() == (t, k) && o.keep.dim() == (t, k),
            || "output shapes".into(),
        )?;
        let mut dropped = 0;
        for (i, (&inp, (&out, (&keep, &wo)))) in idx
            .iter()
            .zip(o.indices.iter().zip(o.keep.iter().zip(o.weights.iter())))
            .enumerate()
        {
            ensure(out == inp || out == -1, || {
                format!("index {i}: {inp} became {out}")
            })?;
            if inp >= 0 && !keep {
                dropped += 1;
            }
            if out == -1 {
                ensure(wo == 0.0, || {
                    format!("weight of dropped / unrouted {i} is {wo}")
                })?;
            } else {
                ensure(keep, || {
                    format!("assignment {i} kept without its keep flag")
                })?;
                if !renorm {
                    ensure(wo.to_bits() == w[i].to_bits(), || {
                        format!("kept weight {i} changed without renormalize")
                    })?;
                }
            }
            if cfg.rate == 0.0 && inp >= 0 {
                ensure(out == inp, || format!("rate 0 dropped assignment {i}"))?;
            }
        }
        ensure(dropped == o.dropped, || {
            format!(
                "dropped {} but {dropped} routed assignments lost their keep flag",
                o.dropped
            )
        })
    })
}

fn fz_assignment_dropout_backward(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, k) = (sdim(r, 16), sdim(r, 4));
    let idx = indices(r, t, k, 12, t * k);
    let w = floats(r, t * k);
    let keep: Vec<bool> = idx
        .iter()
        .map(|&i| r.below(3) != 0 && (i >= 0 || r.below(8) == 0))
        .collect();
    let g = floats(r, t * k);
    let renorm = r.below(2) == 0;
    write!(
        d,
        "T {t} k {k} renormalize {renorm}, indices {}, weights {}, grad {}",
        idesc(&idx),
        fdesc(&w),
        fdesc(&g)
    )
    .unwrap();
    let (ia, wa, ka, ga) = (
        Arr2::new(r, &idx, t, k),
        Arr2::new(r, &w, t, k),
        Arr2::new(r, &keep, t, k),
        Arr2::new(r, &g, t, k),
    );
    assignment_dropout_backward(ia.view(), wa.view(), ka.view(), renorm, ga.view()).map(|gw| {
        ensure(gw.dim() == (t, k), || format!("shape {:?}", gw.dim()))?;
        if !renorm {
            for i in 0..t * k {
                let want = if keep[i] && idx[i] >= 0 { g[i] } else { 0.0 };
                let got = gw.as_slice().map_or(f32::NAN, |s| s[i]);
                // keep_m * g_m: a NaN gradient of a dropped entry may stay NaN
                let nan_ok = got.is_nan() && (want.is_nan() || g[i].is_nan());
                ensure(
                    got.to_bits() == want.to_bits() || nan_ok || (got == 0.0 && want == 0.0),
                    || format!("grad_weights[{i}] = {got}, expected {want}"),
                )?;
            }
        }
        Ok(())
    })
}

fn fz_update_expert_bias(r: &mut Rng, d: &mut String) -> Outcome {
    let e = sdim(r, 16);
    let b0 = {
        let n = blen(r, Some(e));
        floats(r, n)
    };
    let c = {
        let n = blen(r, Some(e));
        counts(r, n)
    };
    let rt = fopt(r, 1e-3);
    write!(d, "bias {}, counts {c:?}, rate {rt}", fdesc(&b0)).unwrap();
    let mut b = b0.clone();
    update_expert_bias(&mut b, &c, rt).map(|()| {
        let n = c.len() as i128;
        let sum: i128 = c.iter().map(|&x| x as i128).sum();
        for i in 0..b.len() {
            // b + rate * sign(mean(c) - c_e), the sign compared in integers: c_e * E vs sum
            let s = (sum - c[i] as i128 * n).signum() as f32;
            let want = if s == 0.0 { b0[i] } else { b0[i] + rt * s };
            ensure(b[i] == want || (b[i].is_nan() && want.is_nan()), || {
                format!("bias[{i}] = {}, expected {want}", b[i])
            })?;
        }
        Ok(())
    })
}

fn fz_router_stats(r: &mut Rng, d: &mut String) -> Outcome {
    let (t, e, k, dt) = (sdim(r, 16), sdim(r, 12), sdim(r, 4), r.below(3));
    let z = floats(r, t * e);
    let idx = indices(r, t, k, e, t * k);
    let slots = (r.below(2) == 0).then(|| rows_map(r, t * k, 8));
    let m: Option<Vec<bool>> = mask(r, t);
    let cfg = RouterStatsConfig::new().strict(r.below(4) == 0);
    write!(
        d,
        "{} T {t} E {e} k {k}, logits {}, indices {}, slots {:?}, mask {}, {cfg:?}",
        dt_name(dt),
        fdesc(&z),
        idesc(&idx),
        slots.as_deref().map(idesc),
        m.is_some()
    )
    .unwrap();
    with_float!(dt, T => {
        let zt: Vec<T> = to(&z);
        let zf = back(&zt);
        let (za, ia) = (Arr2::new(r, &zt, t, e), Arr2::new(r, &idx, t, k));
        let sa = slots.as_ref().map(|s| Arr2::new(r, s, t, k));
        let mv = m.as_ref().map(|m| ArrayView1::from(m.as_slice()));
        router_stats_view(za.view(), ia.view(), sa.as_ref().map(|s| s.view()), mv, &cfg).map(|st| {
            let valid: Vec<bool> = (0..t).map(|ti| m.as_ref().map_or(true, |m| !m[ti])).collect();
            ensure(st.num_tokens == valid.iter().filter(|&&v| v).count(), || format!("num_tokens {}", st.num_tokens))?;
            let routed: usize = (0..t * k).filter(|&i| valid[i / k.max(1)] && idx[i] >= 0).count();
            ensure(st.selected_counts.iter().sum::<i64>() == routed as i64, || format!("selected counts {:?} do not add up to {routed}", st.selected_counts))?;
            let nonfinite = (0..t * e).filter(|&i| valid[i / e.max(1)] && !zf[i].is_finite()).count();
            ensure(st.nonfinite_logits == nonfinite as u64, || format!("nonfinite_logits {} != {nonfinite}", st.nonfinite_logits))?;
            ensure(!cfg.strict || nonfinite == 0, || "strict mode accepted non-finite logits".into())?;
            if let (Some(kc), Some(_)) = (&st.kept_counts, &slots) {
                ensure(kc.iter().sum::<i64>() + st.dropped as i64 == routed as i64, || format!("kept {kc:?} + dropped {} != routed {routed}", st.dropped))?;
            }
            Ok(())
        })
    })
}

/// Every op of `src/ops` (ndarray forms and `*_into` forms with at most 7 arguments).
const OPS: &[(&str, FuzzFn)] = &[
    ("topk_gating", fz_topk_gating),
    ("topk_gating_into", fz_topk_gating_into),
    ("topk_gating_replay", fz_topk_gating_replay),
    ("topk_gating_backward", fz_topk_gating_backward),
    ("capacity", fz_capacity),
    ("dispatch_max_rows", fz_dispatch_max_rows),
    ("dispatch", fz_dispatch),
    ("expert_choice", fz_expert_choice),
    ("expert_choice_backward", fz_expert_choice_backward),
    ("permute", fz_permute),
    ("permute_backward", fz_permute_backward),
    ("unpermute", fz_unpermute),
    ("unpermute_backward", fz_unpermute_backward),
    ("permute_maps", fz_permute_maps),
    ("aux_loss", fz_aux_loss),
    ("aux_loss_backward", fz_aux_loss_backward),
    ("seq_aux_loss", fz_seq_aux_loss),
    ("seq_aux_loss_backward", fz_seq_aux_loss_backward),
    ("z_loss", fz_z_loss),
    ("z_loss_backward", fz_z_loss_backward),
    ("expert_mask", fz_expert_mask),
    ("assignment_dropout", fz_assignment_dropout),
    (
        "assignment_dropout_backward",
        fz_assignment_dropout_backward,
    ),
    ("update_expert_bias", fz_update_expert_bias),
    ("router_stats", fz_router_stats),
];

// --------------------------------------------------------------------------------------
// The driver

thread_local! {
    /// Message and location of the last panic on this thread (the hook fills it).
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
    /// Set by [`known`] when a case hits a known finding and was not called.
    static KNOWN_HIT: RefCell<Option<&'static str>> = const { RefCell::new(None) };
}

/// Known findings (docs/hardening.md, "Findings"): inputs that abort the process (an
/// allocation failure is not a panic that `catch_unwind` can catch) or take unbounded
/// memory. The harness does not call the op for them; it counts them per finding and
/// prints the counts. `MOE_ROUTER_FUZZ_KNOWN=1` calls the op anyway (to check a fix;
/// expect an abort while the finding stands).
const KNOWN: &[(&str, &str)] = &[
    ("BIG", "not a finding: valid inputs whose outputs are too large to allocate here (e.g. a pad-to-capacity buffer of 2^31 - 1 rows)"),
    ("R3", "expert_mask / expert_mask_into with no tokens and num_experts > usize::MAX / 256: CHUNK * num_experts overflows in src/cpu/dropout.rs (a panic in debug builds; in release it wraps, to 0 for multiples of 2^56: rayon panics 'chunk_size must not be zero')"),
    ("R1", "aux_loss accepts empty logits with any num_experts (no upper bound) and then allocates num_experts-sized counts and score sums: 8 TiB for 2^40 experts (the allocation failure aborts the process), 32 GiB for i32::MAX"),
];

/// `true` (and the case is recorded as a known finding) if `hit` and known findings
/// are being skipped.
fn known(id: &'static str, hit: bool) -> bool {
    let skip =
        hit && (id == "BIG" || std::env::var("MOE_ROUTER_FUZZ_KNOWN").map_or(true, |v| v != "1"));
    if skip {
        assert!(
            KNOWN.iter().any(|(k, _)| *k == id),
            "unknown finding id {id}"
        );
        KNOWN_HIT.with(|k| *k.borrow_mut() = Some(id));
    }
    skip
}

#[derive(Default)]
struct OpCounts {
    calls: u64,
    results: u64,
    errors: u64,
    known: u64,
}

/// One case: op `name` with the generator seeded by `seed`.
fn run_case(
    name: &str,
    f: FuzzFn,
    seed: u64,
    failures: &mut Vec<String>,
    c: &mut OpCounts,
    slowest: &mut (Duration, String),
    known_hits: &mut BTreeMap<&'static str, u64>,
) {
    let mut r = Rng::new(seed);
    let adv = r.below(2) == 0;
    ADVERSARIAL.with(|a| a.set(adv));
    let mut desc = format!(
        "[{}] ",
        if adv {
            "adversarial sizes"
        } else {
            "consistent sizes"
        }
    );
    let t0 = Instant::now();
    KNOWN_HIT.with(|k| *k.borrow_mut() = None);
    let out = catch_unwind(AssertUnwindSafe(|| f(&mut r, &mut desc)));
    let dt = t0.elapsed();
    if let Some(id) = KNOWN_HIT.with(|k| k.borrow_mut().take()) {
        *known_hits.entry(id).or_default() += 1;
        c.known += 1;
        return;
    }
    c.calls += 1;
    let repro = format!("MOE_ROUTER_FUZZ_CASE={name}:{seed}");
    if dt > slowest.0 {
        *slowest = (dt, format!("{name} ({repro})"));
    }
    if dt > Duration::from_secs(5) {
        failures.push(format!("{name}: call took {dt:?} ({repro}); input: {desc}"));
    }
    match out {
        Err(_) => {
            let msg = LAST_PANIC.with(|p| p.borrow().clone());
            failures.push(format!("PANIC in {name}: {msg} ({repro}); input: {desc}"));
        }
        Ok(Ok(Ok(()))) => c.results += 1,
        Ok(Ok(Err(violation))) => {
            c.results += 1;
            failures.push(format!(
                "invariant violated by {name}: {violation} ({repro}); input: {desc}"
            ));
        }
        Ok(Err(e)) => {
            c.errors += 1;
            if let Err(m) = check_error(&e) {
                failures.push(format!("{name}: {m} ({repro}); input: {desc}"));
            }
        }
    }
}

#[test]
fn fuzz_api() {
    let seconds: f64 = std::env::var("MOE_ROUTER_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20.0);
    let base: u64 = std::env::var("MOE_ROUTER_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6d6f_655f_7275_7465);
    let only: Option<(String, u64)> = std::env::var("MOE_ROUTER_FUZZ_CASE").ok().map(|s| {
        let (op, seed) = s
            .rsplit_once(':')
            .expect("MOE_ROUTER_FUZZ_CASE=<op>:<seed>");
        (op.to_string(), seed.parse().expect("seed"))
    });

    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        let loc = info.location().map(|l| l.to_string()).unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg} at {loc}"));
    }));

    let mut failures = Vec::new();
    let mut per_op: BTreeMap<&str, OpCounts> = BTreeMap::new();
    let mut slowest = (Duration::ZERO, String::new());
    let mut known_hits: BTreeMap<&'static str, u64> = BTreeMap::new();
    let start = Instant::now();
    if let Some((op, seed)) = &only {
        let &(name, f) = OPS
            .iter()
            .find(|(n, _)| n == op)
            .unwrap_or_else(|| panic!("no op {op}"));
        run_case(
            name,
            f,
            *seed,
            &mut failures,
            per_op.entry(name).or_default(),
            &mut slowest,
            &mut known_hits,
        );
    } else {
        let deadline = Duration::from_secs_f64(seconds);
        let mut i: u64 = 0;
        while start.elapsed() < deadline {
            for &(name, f) in OPS {
                let seed = base ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
                i += 1;
                run_case(
                    name,
                    f,
                    seed,
                    &mut failures,
                    per_op.entry(name).or_default(),
                    &mut slowest,
                    &mut known_hits,
                );
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::panic::set_hook(prev);

    let calls: u64 = per_op.values().map(|c| c.calls).sum();
    let results: u64 = per_op.values().map(|c| c.results).sum();
    let errors: u64 = per_op.values().map(|c| c.errors).sum();
    let panics = failures.iter().filter(|f| f.starts_with("PANIC")).count();
    for (name, c) in &per_op {
        println!(
            "  {name:<28} {:>8} calls {:>8} results {:>8} errors {:>6} known",
            c.calls, c.results, c.errors, c.known
        );
    }
    for (id, what) in KNOWN {
        println!(
            "  {id} (not called, {} inputs): {what}",
            known_hits.get(id).copied().unwrap_or(0)
        );
    }
    println!("  slowest call: {:?} ({})", slowest.0, slowest.1);
    println!("fuzz_api: {calls} calls in {elapsed:.1} s, {results} results, {errors} errors, {panics} panics");
    assert!(
        only.is_some() || per_op.len() == OPS.len() && per_op.values().all(|c| c.calls > 0),
        "not every op was called"
    );
    if !failures.is_empty() {
        for f in failures.iter().take(20) {
            eprintln!("{f}");
        }
        panic!(
            "fuzz_api: {} failures ({panics} panics); first: {}",
            failures.len(),
            failures[0]
        );
    }
}
