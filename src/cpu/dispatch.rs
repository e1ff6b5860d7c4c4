//! CPU reference for capacity-factor dispatch.
//!
//! 1. Counting sort of the routed assignments by expert, in `(t, j)` order, so each
//!    expert's assignments are contiguous and in token order (parallel: per-chunk
//!    histograms, then each chunk scatters into its own positions).
//! 2. Per expert (rayon): if at most `capacity` were routed all are kept; otherwise
//!    the `capacity` best drop-policy keys are kept: the first `capacity` in token
//!    order for `position`, a histogram over the choice index for
//!    `choice_then_position`, a selection (`select_nth_unstable`) of packed keys for
//!    the others. Slots are ranks among the kept in token order.
//! 3. Expert offsets and per-rank row counts (serial, `O(E)`), then `row_to_token`
//!    per expert segment (rayon) and `slot` / `row` / `kept_weights` per token chunk
//!    (rayon).
//!
//! Every priority is a packed `u64`, larger = kept first:
//! `(hi << 32) | (u32::MAX - t)`, where `hi` is the policy's primary key mapped so that
//! "better" is larger (see [`drop_key`]). A token routes to an expert at most once,
//! so keys never tie within an expert, and the result does not depend on the
//! selection algorithm, the chunking or the thread count.

use crate::cpu::CHUNK;
use crate::ops::{DispatchBuffers, DispatchConfig, DispatchCounts, DispatchLayout, DropPolicy};
use crate::philox::{uniform, Domain};
use crate::select::score_key;
use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// `(hi << 32) | (u32::MAX - t)`: larger `hi` first, then lower token first.
#[inline(always)]
fn pack(hi: u32, t: usize) -> u64 {
    ((hi as u64) << 32) | (u32::MAX - t as u32) as u64
}

/// Token priority of [`DropPolicy::BatchPrioritized`]: the largest
/// [`score_key`] of the token's routed weights (NaN lowest), 0 if none is routed.
#[inline]
pub fn batch_priority(indices_row: &[i32], weights_row: &[f32]) -> u32 {
    indices_row
        .iter()
        .zip(weights_row)
        .filter(|(&e, _)| e >= 0)
        .map(|(_, &w)| score_key(w))
        .max()
        .unwrap_or(0)
}

/// Token priority of [`DropPolicy::Random`]: `!score_key(u)` with
/// `u = uniform(seed, offset, RandomDrop, t)`, so a lower `u` ranks first.
#[inline]
pub fn random_priority(seed: u64, offset: u64, t: usize) -> u32 {
    !score_key(uniform(seed, offset, Domain::RandomDrop, t as u64))
}

/// The packed keep-priority of assignment `(t, j)` with weight `w` (larger = kept
/// first). `token_hi` is [`batch_priority`] or [`random_priority`] of token `t` for
/// those two policies and ignored otherwise.
#[inline]
pub fn drop_key(policy: &DropPolicy, t: usize, j: usize, w: f32, token_hi: u32) -> u64 {
    let hi = match policy {
        DropPolicy::Position => 0,
        DropPolicy::ChoiceThenPosition => u32::MAX - j as u32,
        DropPolicy::Probs => score_key(w),
        DropPolicy::BatchPrioritized | DropPolicy::Random { .. } => token_hi,
    };
    pack(hi, t)
}

/// Split `s` into the consecutive segments `bounds[i] .. bounds[i + 1]`
/// (`bounds` non-decreasing, starting at 0, ending at most at `s.len()`).
fn split_segments<'a, X>(mut s: &'a mut [X], bounds: &[usize]) -> Vec<&'a mut [X]> {
    let mut v = Vec::with_capacity(bounds.len().saturating_sub(1));
    for w in bounds.windows(2) {
        let (head, tail) = std::mem::take(&mut s).split_at_mut(w[1] - w[0]);
        v.push(head);
        s = tail;
    }
    v
}

/// Assignments sorted by expert: `starts[e] .. starts[e + 1]` are the positions of
/// expert `e`'s assignments, in increasing `(t, j)` order; `token[p]` is the token of
/// position `p`, `keys[p]` its packed [`drop_key`] (only when `keys_needed`, else
/// empty); `pos_of[a]` is the position of assignment `a = t * k + j` (unspecified for
/// unrouted `a`).
struct ByExpert {
    starts: Vec<usize>,
    token: Vec<u32>,
    keys: Vec<u64>,
    pos_of: Vec<u32>,
}

/// Parallel counting sort of the routed assignments by expert, computing each
/// assignment's drop key on the way when some expert is over `cap` (and the policy
/// is not `position`). Chunks are fixed by `num_tokens` alone and each chunk writes
/// the positions its histogram prefix reserved, so the result is the same for every
/// thread count.
fn sort_by_expert(
    indices: &[i32],
    weights: &[f32],
    num_tokens: usize,
    topk: usize,
    num_experts: usize,
    cap: usize,
    policy: DropPolicy,
) -> ByExpert {
    let chunk_tokens = CHUNK.max(num_tokens.div_ceil(64));
    let alen = chunk_tokens * topk;
    let mut cursors: Vec<Vec<u32>> = indices
        .par_chunks(alen)
        .map(|c| {
            let mut h = vec![0u32; num_experts];
            for &e in c {
                if e >= 0 {
                    h[e as usize] += 1;
                }
            }
            h
        })
        .collect();
    // starts[e], and in `cursors[c][e]` the first position of chunk c's part of e.
    let mut starts = vec![0usize; num_experts + 1];
    for e in 0..num_experts {
        let mut run = starts[e];
        for h in cursors.iter_mut() {
            let c = h[e] as usize;
            h[e] = run as u32;
            run += c;
        }
        starts[e + 1] = run;
    }
    let routed = starts[num_experts];
    let over = starts.windows(2).any(|w| w[1] - w[0] > cap);
    let keys_needed = over && policy != DropPolicy::Position;
    // Positions are disjoint across chunks but interleaved, hence atomics; Relaxed
    // loads and stores compile to plain ones.
    let token: Vec<AtomicU32> = (0..routed)
        .into_par_iter()
        .map(|_| AtomicU32::new(0))
        .collect();
    let keys: Vec<AtomicU64> = if keys_needed {
        (0..routed)
            .into_par_iter()
            .map(|_| AtomicU64::new(0))
            .collect()
    } else {
        Vec::new()
    };
    let mut pos_of = vec![0u32; indices.len()];
    pos_of
        .par_chunks_mut(alen)
        .zip(indices.par_chunks(alen))
        .zip(weights.par_chunks(alen))
        .zip(cursors.par_iter_mut())
        .enumerate()
        .for_each(|(c, (((pos, idx), w), cursor))| {
            for (i, ((pos, idx), w)) in pos
                .chunks_mut(topk)
                .zip(idx.chunks(topk))
                .zip(w.chunks(topk))
                .enumerate()
            {
                let t = c * chunk_tokens + i;
                let token_hi = match policy {
                    _ if !keys_needed => 0,
                    DropPolicy::BatchPrioritized => batch_priority(idx, w),
                    DropPolicy::Random { seed, offset } => random_priority(seed, offset, t),
                    _ => 0,
                };
                for (j, ((&e, &wj), p)) in idx.iter().zip(w).zip(pos.iter_mut()).enumerate() {
                    if e >= 0 {
                        let q = &mut cursor[e as usize];
                        token[*q as usize].store(t as u32, Relaxed);
                        if keys_needed {
                            keys[*q as usize].store(drop_key(&policy, t, j, wj, token_hi), Relaxed);
                        }
                        *p = *q;
                        *q += 1;
                    }
                }
            }
        });
    ByExpert {
        starts,
        token: token.into_iter().map(AtomicU32::into_inner).collect(),
        keys: keys.into_iter().map(AtomicU64::into_inner).collect(),
        pos_of,
    }
}

/// Dispatch (see [`crate::ops::dispatch`]). Assumes validated arguments: `indices`
/// checked by `check_indices` (allowing `-1`), every length as documented on
/// [`DispatchBuffers`], row counts within `i32`.
pub fn dispatch(
    indices: &[i32],
    weights: &[f32],
    num_tokens: usize,
    topk: usize,
    cfg: &DispatchConfig,
    out: DispatchBuffers<'_>,
) -> DispatchCounts {
    let ne = cfg.num_experts;
    let policy = cfg.effective_drop_policy();
    let cap = match cfg.layout {
        DispatchLayout::Dropless { .. } => usize::MAX,
        _ => cfg.capacity.unwrap_or(usize::MAX),
    };

    // 1. Counting sort by expert (with the drop keys where they are needed).
    let ByExpert {
        starts,
        token,
        keys,
        pos_of,
    } = sort_by_expert(indices, weights, num_tokens, topk, ne, cap, policy);
    let routed = starts[ne];

    // 2. Keep the best `cap` per expert; `seg_slot[p]` = slot of position p, or -1.
    let mut seg_slot = vec![-1i32; routed];
    let kept: Vec<usize> = split_segments(&mut seg_slot, &starts)
        .into_par_iter()
        .enumerate()
        .map_init(
            || (Vec::<u64>::new(), Vec::<usize>::new()),
            |(scratch, per_choice), (e, slots)| {
                let r = starts[e]..starts[e + 1];
                if r.len() <= cap {
                    for (s, x) in slots.iter_mut().enumerate() {
                        *x = s as i32;
                    }
                    return r.len();
                }
                let seg_keys = keys.get(r).unwrap_or_default();
                match policy {
                    // Keys increase along the segment: the first `cap` win.
                    DropPolicy::Position => {
                        for (s, x) in slots.iter_mut().take(cap).enumerate() {
                            *x = s as i32;
                        }
                    }
                    // Every choice below `cut` is kept, then the first `quota` of
                    // choice `cut` in token order.
                    DropPolicy::ChoiceThenPosition => {
                        let choice = |key: u64| (u32::MAX - (key >> 32) as u32) as usize;
                        per_choice.clear();
                        per_choice.resize(topk, 0);
                        for &key in seg_keys {
                            per_choice[choice(key)] += 1;
                        }
                        let (mut cut, mut quota) = (topk, cap);
                        for (j, &n) in per_choice.iter().enumerate() {
                            if n >= quota {
                                cut = j;
                                break;
                            }
                            quota -= n;
                        }
                        let mut s = 0i32;
                        for (x, &key) in slots.iter_mut().zip(seg_keys) {
                            let j = choice(key);
                            if j < cut || (j == cut && quota > 0) {
                                quota -= usize::from(j == cut);
                                *x = s;
                                s += 1;
                            }
                        }
                    }
                    _ if cap == 0 => {}
                    _ => {
                        scratch.clear();
                        scratch.extend_from_slice(seg_keys);
                        scratch.select_nth_unstable_by(cap - 1, |x, y| y.cmp(x));
                        let threshold = scratch[cap - 1];
                        let mut s = 0i32;
                        for (x, &key) in slots.iter_mut().zip(seg_keys) {
                            if key >= threshold {
                                *x = s;
                                s += 1;
                            }
                        }
                    }
                }
                cap
            },
        )
        .collect();

    // 3. Offsets, counts, ranks.
    let mut row_bounds = vec![0usize; ne + 1];
    for e in 0..ne {
        let k = kept[e];
        let rows = match cfg.layout {
            DispatchLayout::PadToCapacity => cfg.capacity.unwrap_or(0),
            DispatchLayout::Compact => k,
            DispatchLayout::Dropless { align } => k.div_ceil(align.max(1)) * align.max(1),
        };
        row_bounds[e + 1] = row_bounds[e] + rows;
        out.tokens_per_expert[e] = k as i32;
    }
    for (o, &b) in out.expert_offsets.iter_mut().zip(&row_bounds) {
        *o = b as i32;
    }
    let num_rows = row_bounds[ne];
    let per_rank = ne / cfg.ep_size.max(1);
    for (r, x) in out.rows_per_rank.iter_mut().enumerate() {
        *x = (row_bounds[(r + 1) * per_rank] - row_bounds[r * per_rank]) as i32;
    }

    // row_to_token, one expert segment at a time.
    let (used, rest) = out.row_to_token.split_at_mut(num_rows);
    rest.fill(-1);
    let seg_slot = &seg_slot;
    split_segments(used, &row_bounds)
        .into_par_iter()
        .enumerate()
        .for_each(|(e, rows)| {
            rows.fill(-1);
            let r = starts[e]..starts[e + 1];
            for (&t, &s) in token[r.clone()].iter().zip(&seg_slot[r]) {
                if s >= 0 {
                    rows[s as usize] = t as i32;
                }
            }
        });

    // slot / row / kept_weights, one token chunk at a time.
    let renormalize = cfg.renormalize;
    let len = CHUNK * topk;
    out.slot
        .par_chunks_mut(len)
        .zip(out.row.par_chunks_mut(len))
        .zip(out.kept_weights.par_chunks_mut(len))
        .enumerate()
        .for_each(|(c, ((sl, rw), kw))| {
            let a0 = c * len;
            for (i, ((sl, rw), kw)) in sl
                .chunks_mut(topk)
                .zip(rw.chunks_mut(topk))
                .zip(kw.chunks_mut(topk))
                .enumerate()
            {
                let base = a0 + i * topk;
                let (mut sum_all, mut sum_kept, mut any_kept) = (0.0f32, 0.0f32, false);
                for j in 0..topk {
                    let a = base + j;
                    let (e, w) = (indices[a], weights[a]);
                    let s = if e >= 0 {
                        sum_all += w;
                        seg_slot[pos_of[a] as usize]
                    } else {
                        -1
                    };
                    if s >= 0 {
                        sl[j] = s;
                        rw[j] = (row_bounds[e as usize] + s as usize) as i32;
                        kw[j] = w;
                        sum_kept += w;
                        any_kept = true;
                    } else {
                        sl[j] = -1;
                        rw[j] = -1;
                        kw[j] = 0.0;
                    }
                }
                if renormalize && any_kept {
                    let denom = sum_kept + 1e-20;
                    for (x, &s) in kw.iter_mut().zip(sl.iter()) {
                        if s >= 0 {
                            *x = *x * sum_all / denom;
                        }
                    }
                }
            }
        });

    DispatchCounts {
        num_rows,
        dropped: routed - kept.iter().sum::<usize>(),
    }
}
