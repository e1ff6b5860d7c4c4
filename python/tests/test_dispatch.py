"""capacity, dispatch (five drop policies, three layouts, expert parallelism) and
expert_choice against brute-force references written here from docs/semantics.md."""

from __future__ import annotations

import math
from itertools import product

import numpy as np
import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32
from moe_router import _native, ops

POLICIES = ["position", "choice_then_position", "probs", "batch_prioritized", "random"]


# --------------------------------------------------------------------------------------
# capacity


def test_capacity_hand_computed():
    assert mr.capacity(4096, 8, 2, 1.25) == 1280
    assert mr.capacity(10, 3, 1, 1.0, min_capacity=6, capacity_multiple=4) == 8
    assert mr.capacity(0, 4, 2, 1.0) == 0
    assert mr.capacity(0, 4, 2, 1.0, min_capacity=3) == 3
    # evaluated as ((T * k) / E) * factor in float64, as Megatron's get_capacity:
    assert mr.capacity(50, 11, 1, 1.1) == 6  # (50 / 11) * 1.1 = 5.000000000000001 -> 6
    assert mr.capacity(25, 5, 1, 2.2) == 11  # (25 / 5) * 2.2 = 11.0 exactly (25 * 2.2 / 5 would give 12)
    assert mr.capacity(20, 4, 1, 1.1) == 6  # 5.0 * 1.1 = 5.5 -> 6


def test_python_capacity_equals_the_core_on_a_grid():
    rng = np.random.default_rng(0)
    cases = list(product([0, 1, 7, 50, 1000, 4096, 2**40 + 3], [1, 3, 8, 11, 64], [1, 2, 6],
                         [0.5, 1.0, 1.1, 1.25, 2.2, 3.7]))  # fmt: skip
    cases += [(int(rng.integers(0, 10**6)), int(rng.integers(1, 300)), int(rng.integers(1, 9)),
               float(rng.uniform(0.01, 4.0))) for _ in range(500)]  # fmt: skip
    for t, e, k, cf in cases:
        for mn, mult in ((0, None), (5, None), (0, 8), (13, 16)):
            try:
                want = _native.capacity(t, e, k, cf, mn, mult)
            except ValueError:
                with pytest.raises(ValueError):
                    mr.capacity(t, e, k, cf, min_capacity=mn, capacity_multiple=mult)
                continue
            assert mr.capacity(t, e, k, cf, min_capacity=mn, capacity_multiple=mult) == want, (t, e, k, cf, mn, mult)


# --------------------------------------------------------------------------------------
# dispatch reference


def ref_dispatch(idx, w, e, *, capacity=None, policy="position", layout="compact", align=1, renormalize=False,
                 ep_size=1, seed=0, offset=0):  # fmt: skip
    t, k = idx.shape
    idx_l, w_l = idx.tolist(), w.tolist()
    u = ref.philox_uniform(seed, offset, ref.DOMAIN_RANDOM_DROP, np.arange(t)) if policy == "random" else None
    per_expert = [[] for _ in range(e)]
    for tok in range(t):
        routed_w = [w_l[tok][j] for j in range(k) if idx_l[tok][j] >= 0]
        best = max(routed_w) if routed_w else -math.inf
        for j in range(k):
            ex = idx_l[tok][j]
            if ex < 0:
                continue
            key = {
                "position": (tok,),
                "choice_then_position": (j, tok),
                "probs": (-w_l[tok][j], tok),
                "batch_prioritized": (-best, tok),
                "random": (float(u[tok]) if u is not None else 0.0, tok),
            }[policy]
            per_expert[ex].append((key, tok, j))
    slot = torch.full((t, k), -1, dtype=torch.long)
    tpe = torch.zeros(e, dtype=torch.long)
    kept_mask = torch.zeros((t, k), dtype=torch.bool)
    for ex in range(e):
        chosen = sorted(per_expert[ex])
        if capacity is not None:
            chosen = chosen[:capacity]
        for s, (_, tok, j) in enumerate(sorted(chosen, key=lambda c: c[1])):  # token order within the expert
            slot[tok, j] = s
            kept_mask[tok, j] = True
        tpe[ex] = len(chosen)
    if layout == "pad_to_capacity":
        seg = [capacity] * e
    elif layout == "compact":
        seg = tpe.tolist()
    else:
        seg = [-(-c // align) * align for c in tpe.tolist()]
    offsets = torch.tensor([0] + list(np.cumsum(seg)), dtype=torch.long)
    num_rows = int(offsets[-1])
    row = torch.full((t, k), -1, dtype=torch.long)
    max_rows = ops.dispatch_max_rows(t, k, e, capacity, layout, align)
    r2t = torch.full((max_rows,), -1, dtype=torch.long)
    for tok in range(t):
        for j in range(k):
            if kept_mask[tok, j]:
                r = int(offsets[idx_l[tok][j]]) + int(slot[tok, j])
                row[tok, j] = r
                r2t[r] = tok
    per = e // ep_size
    rows_per_rank = torch.tensor([int(offsets[(r + 1) * per] - offsets[r * per]) for r in range(ep_size)])
    routed = idx >= 0
    dropped = int((routed & ~kept_mask).sum())
    w64 = w.double()
    kept_w = torch.where(kept_mask, w64, torch.zeros_like(w64))
    if renormalize:
        s = torch.where(routed, w64, torch.zeros_like(w64)).sum(-1, keepdim=True)
        kept_w = kept_w * (s / (kept_w.sum(-1, keepdim=True) + 1e-20))
    return dict(slot=slot, row=row, kept_weights=kept_w, tokens_per_expert=tpe, dropped=dropped, row_to_token=r2t,
                expert_offsets=offsets, rows_per_rank=rows_per_rank, num_rows=num_rows)  # fmt: skip


def routing(t, k, e, *, seed, unrouted=0):
    g = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        if t
        else torch.zeros(0, k, dtype=torch.long)
    )
    # weights on a coarse grid so that "probs" and "batch_prioritized" keys tie sometimes
    w = (torch.randint(1, 6, (t, k), generator=g).float() / 8.0) if t else torch.zeros(0, k)
    for n in range(unrouted):
        idx[(7 * n + 2) % t, n % k] = -1
    return idx, w


def _check(d, r, idx):
    for name in ("slot", "row", "tokens_per_expert", "row_to_token", "expert_offsets", "rows_per_rank"):
        got = getattr(d, name)
        assert got.dtype == torch.int64, name
        assert torch.equal(got, r[name]), name
    assert int(d.dropped) == r["dropped"] and int(d.num_rows) == r["num_rows"]
    assert d.dropped.shape == () and d.num_rows.shape == ()
    assert_close_f32(d.kept_weights, r["kept_weights"])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout", ["compact", "pad_to_capacity"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_dispatch_with_capacity_matches_reference(policy, layout, renormalize):
    t, k, e = 57, 2, 8
    idx, w = routing(t, k, e, seed=1, unrouted=5)
    cap = mr.capacity(t, e, k, 1.0)  # tight: some experts overflow
    kw = dict(capacity=cap, layout=layout, renormalize=renormalize, ep_size=2, seed=11, offset=3)
    d = mr.dispatch(idx, w, e, drop_policy=policy, **kw)
    r = ref_dispatch(idx, w, e, policy=policy, **kw)
    assert r["dropped"] > 0, "the case must drop something"
    _check(d, r, idx)


@pytest.mark.parametrize("align", [1, 4, 16])
@pytest.mark.parametrize("ep_size", [1, 4])
def test_dropless_layout_matches_reference(align, ep_size):
    t, k, e = 45, 3, 8
    idx, w = routing(t, k, e, seed=2, unrouted=3)
    d = mr.dispatch(idx, w, e, layout="dropless", align=align, ep_size=ep_size)
    r = ref_dispatch(idx, w, e, layout="dropless", align=align, ep_size=ep_size)
    assert r["dropped"] == 0
    _check(d, r, idx)
    assert d.row_to_token.shape[0] == t * k + e * (align - 1)


def test_dispatch_without_capacity_keeps_everything_and_int32_indices_work():
    t, k, e = 20, 2, 4
    idx, w = routing(t, k, e, seed=3)
    d = mr.dispatch(idx.int(), w, e)
    r = ref_dispatch(idx, w, e)
    _check(d, r, idx)
    assert int(d.num_rows) == t * k and int(d.dropped) == 0


def test_random_policy_depends_on_seed_and_offset_only():
    t, k, e = 64, 2, 4
    idx, w = routing(t, k, e, seed=4)
    a = mr.dispatch(idx, w, e, capacity=8, drop_policy="random", seed=5, offset=6)
    b = mr.dispatch(idx, w * 0.5, e, capacity=8, drop_policy="random", seed=5, offset=6)
    c = mr.dispatch(idx, w, e, capacity=8, drop_policy="random", seed=5, offset=7)
    assert torch.equal(a.slot, b.slot)
    assert not torch.equal(a.slot, c.slot)


def test_kept_weights_gradient_and_agreement_with_the_op():
    t, k, e = 40, 2, 8
    idx, w = routing(t, k, e, seed=5, unrouted=2)
    for renormalize in (False, True):
        wr = w.clone().requires_grad_()
        d = mr.dispatch(idx, wr, e, capacity=6, renormalize=renormalize)
        op_kept = torch.ops.moe_router.dispatch(idx, w, e, 6, "position", "compact", 1, renormalize, 1, 0, 0)[0]
        torch.testing.assert_close(d.kept_weights.detach(), op_kept, rtol=2e-7, atol=0)
        g = ref.randn((t, k), seed=6)
        (d.kept_weights * g).sum().backward()
        w64 = w.double().requires_grad_()
        kept = d.slot >= 0
        routed = idx >= 0
        kw = torch.where(kept, w64, torch.zeros_like(w64))
        if renormalize:
            s = torch.where(routed, w64, torch.zeros_like(w64)).sum(-1, keepdim=True)
            kw = kw * (s / (kw.sum(-1, keepdim=True) + 1e-20))
        (kw * g.double()).sum().backward()
        assert_close_f32(wr.grad, w64.grad, rtol=1e-5, atol=1e-6)


def test_python_max_rows_equals_the_core():
    for t, k, e, cap, layout, align in product([0, 1, 17, 300], [1, 2, 4], [4, 8], [None, 0, 3, 1000],
                                               ["compact", "pad_to_capacity", "dropless"], [1, 8]):  # fmt: skip
        if k > e or (layout == "pad_to_capacity" and cap is None) or (layout == "dropless" and cap is not None):
            continue
        if layout != "dropless" and align != 1:
            continue
        want = _native.dispatch_max_rows(t, k, num_experts=e, capacity=cap, layout=layout, align=align)
        assert mr.dispatch_max_rows(t, k, e, capacity=cap, layout=layout, align=align) == want


def test_zero_tokens():
    d = mr.dispatch(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, capacity=3, layout="pad_to_capacity")
    assert d.slot.shape == (0, 2) and d.row_to_token.shape == (12,)
    assert (d.row_to_token == -1).all() and int(d.num_rows) == 12 and int(d.dropped) == 0


# --------------------------------------------------------------------------------------
# expert choice


def ref_expert_choice(z, cap):
    t, e = z.shape
    p = torch.softmax(z.double(), -1)
    weights = torch.zeros((t, e), dtype=torch.float64)
    row = torch.full((t, e), -1, dtype=torch.long)
    r2t = torch.full((e * cap,), -1, dtype=torch.long)
    row_w = torch.zeros(e * cap, dtype=torch.float64)
    for ex in range(e):
        order = sorted(range(t), key=lambda tok: (-float(p[tok, ex]), tok))[:cap]
        for s, tok in enumerate(sorted(order)):
            r = ex * cap + s
            row[tok, ex] = r
            r2t[r] = tok
            weights[tok, ex] = p[tok, ex]
            row_w[r] = p[tok, ex]
    tpe = torch.full((e,), min(cap, t), dtype=torch.long)
    return weights, row, r2t, tpe, torch.arange(e + 1) * cap, row_w


@pytest.mark.parametrize("t,e,cap", [(0, 4, 2), (30, 8, 5), (12, 4, 20), (16, 4, 0)])
def test_expert_choice_matches_reference(t, e, cap):
    z = ref.randn((t, e), seed=t + e, scale=2.0).requires_grad_()
    ec = mr.expert_choice(z, cap)
    rw, rrow, rr2t, rtpe, roff, rroww = ref_expert_choice(z.detach(), cap)
    assert torch.equal(ec.row, rrow) and torch.equal(ec.row_to_token, rr2t)
    assert torch.equal(ec.tokens_per_expert, rtpe) and torch.equal(ec.expert_offsets, roff)
    assert_close_f32(ec.weights, rw)
    assert_close_f32(ec.row_weights, rroww)
    if t == 0:
        return
    g, gr = ref.randn((t, e), seed=1), ref.randn((e * cap,), seed=2)
    ((ec.weights * g).sum() + (ec.row_weights * gr).sum()).backward()
    z64 = z.detach().double().requires_grad_()
    p = torch.softmax(z64, -1)
    chosen = rrow >= 0
    w64 = torch.where(chosen, p, torch.zeros_like(p))
    rw64 = torch.zeros(e * cap, dtype=torch.float64).index_put((rrow[chosen],), p[chosen])
    ((w64 * g.double()).sum() + (rw64 * gr.double()).sum()).backward()
    assert_close_f32(z.grad, z64.grad, rtol=1e-5, atol=1e-6)


def test_expert_choice_rows_feed_permute_and_unpermute():
    t, e, cap, h = 20, 4, 6, 8
    z = ref.randn((t, e), seed=3)
    x = ref.randn((t, h), seed=4)
    ec = mr.expert_choice(z, cap)
    buf = mr.permute(x, ec.row_to_token, ec.row)
    out = mr.unpermute(buf, ec.row, ec.weights)
    assert_close_f32(out, x * ec.weights.sum(-1, keepdim=True))


# --------------------------------------------------------------------------------------
# kept_weights: the core's values (no torch recomputation) and their gradient


def _renorm_reference(indices, weights, slot):
    """kept = m * w * S / (K + 1e-20) in torch (differentiable), 0 where nothing kept."""
    zero = torch.zeros((), dtype=weights.dtype)
    m = slot >= 0
    kept = torch.where(m, weights, zero)
    s = torch.where(indices >= 0, weights, zero).sum(-1, keepdim=True)
    out = kept * s / (kept.sum(-1, keepdim=True) + 1e-20)
    return torch.where(m.any(-1, keepdim=True), out, zero)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("seed", range(5))
def test_kept_weights_are_the_core_values_and_differentiable(renormalize, seed):
    g = torch.Generator().manual_seed(seed)
    t, k, e = 40, 3, 6
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    idx[::7, 1] = -1  # some unrouted assignments
    w = torch.rand(t, k, generator=g).requires_grad_()
    d = mr.dispatch(idx, w, e, capacity=12, drop_policy="probs", renormalize=renormalize)
    core = ops.dispatch(idx, w.detach(), e, 12, "probs", "compact", 1, renormalize, 1, 0, 0)[0]
    assert torch.equal(d.kept_weights.detach(), core)  # bit for bit, no torch recomputation
    gout = torch.randn(t, k, generator=g)
    (grad,) = torch.autograd.grad(d.kept_weights, w, gout)
    w64 = w.detach().double().requires_grad_()
    want = _renorm_reference(idx, w64, d.slot) if renormalize else torch.where(d.slot >= 0, w64, 0.0)
    (grad_want,) = torch.autograd.grad(want, w64, gout.double())
    torch.testing.assert_close(grad.double(), grad_want, rtol=1e-5, atol=1e-6)


def test_renormalize_with_non_finite_weights_keeps_dropped_slots_at_zero():
    # A token whose weights hold NaN / inf: its dropped slots are 0 (the core's rule),
    # not NaN as a torch recomputation (0 * nan) would give.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1]])
    w = torch.tensor([[float("nan"), 0.5], [float("inf"), 0.25], [0.3, 0.7]])
    d = mr.dispatch(idx, w, 2, capacity=1, drop_policy="position", renormalize=True)
    dropped = d.slot < 0
    assert dropped.any()
    assert torch.equal(d.kept_weights[dropped], torch.zeros(int(dropped.sum())))


@pytest.mark.parametrize(
    "args, kw, exc, needle",
    [
        ((-4, 2, 8), {}, ValueError, "`num_tokens` = -4"),
        ((4, 2, 8), {"layout": "nope"}, ValueError, "layout"),
        ((4, 2, 8), {"layout": "pad_to_capacity"}, ValueError, "capacity"),
        ((4, 9, 8), {}, ValueError, "topk"),
        ((4, 2, 8), {"capacity": 2**64}, ValueError, "`capacity`"),
        ((4.5, 2, 8), {}, TypeError, "`num_tokens` must be an int"),
        ((4, 2, 8), {"layout": "dropless", "align": 0}, ValueError, "align"),
    ],
)
def test_dispatch_max_rows_validates_like_dispatch(args, kw, exc, needle):
    with pytest.raises(exc, match=needle):
        mr.dispatch_max_rows(*args, **kw)


@pytest.mark.parametrize(
    "args, kw, needle",
    [
        ((16, 8, 9, 1.0), {}, "topk"),
        ((10**6, 1, 1, 1e308), {}, "overflows"),
        ((10, 2, 1, float("inf")), {}, "capacity_factor"),
    ],
)
def test_capacity_refuses_nonsense(args, kw, needle):
    with pytest.raises(ValueError, match=needle):
        mr.capacity(*args, **kw)


def test_drop_policy_without_capacity_is_an_error():
    with pytest.raises(ValueError, match="drop_policy"):
        mr.dispatch(torch.tensor([[0, 1]]), torch.ones(1, 2), 2, drop_policy="probs")
    mr.dispatch(torch.tensor([[0, 1]]), torch.ones(1, 2), 2)  # no policy, no capacity: fine
