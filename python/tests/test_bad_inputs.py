"""The bad-input matrix: every public function rejects a wrong type / dtype / layout
(TypeError) and a wrong shape, device mix or option (ValueError) with a message naming the
argument, before any memory is read; non-contiguous tensors are accepted (made
contiguous inside the op, as PyTorch ops do); value errors found by the native
code (indices out of range, negative counts, ...) are ValueErrors naming the argument too."""

from __future__ import annotations

import math

import pytest
import torch

import moe_router as mr

T, E, K = 6, 8, 2
Z = torch.randn(T, E)
IDX = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7], [1, 0], [3, 2]])
W = torch.rand(T, K)
X = torch.randn(T, 4)
ROW = torch.arange(T * K).reshape(T, K)
R2T = torch.arange(T).repeat_interleave(K)
META = torch.device("meta")

# (id, thunk, exception, substring of the message)
CASES = [
    # topk_gating
    ("gating/logits-list", lambda: mr.topk_gating([[1.0, 2.0]], 1), TypeError, "logits"),
    ("gating/logits-f64", lambda: mr.topk_gating(Z.double(), K), TypeError, "logits.float()"),
    ("gating/logits-int", lambda: mr.topk_gating(Z.int(), K), TypeError, "logits"),
    ("gating/logits-1d", lambda: mr.topk_gating(Z[0], K), ValueError, "logits"),
    ("gating/logits-3d", lambda: mr.topk_gating(Z[None], K), ValueError, "logits"),
    ("gating/zero-experts", lambda: mr.topk_gating(torch.zeros(T, 0), 1), ValueError, "num_experts"),
    ("gating/topk-0", lambda: mr.topk_gating(Z, 0), ValueError, "topk"),
    ("gating/topk>E", lambda: mr.topk_gating(Z, E + 1), ValueError, "topk"),
    ("gating/topk-float", lambda: mr.topk_gating(Z, 2.0), TypeError, "topk"),
    ("gating/topk-bool", lambda: mr.topk_gating(Z, True), TypeError, "topk"),
    ("gating/score-fn", lambda: mr.topk_gating(Z, K, score_function="relu"), ValueError, "score_function"),
    ("gating/pre-softmax-type", lambda: mr.topk_gating(Z, K, pre_softmax=1), TypeError, "pre_softmax"),
    (
        "gating/pre-softmax-sigmoid",
        lambda: mr.topk_gating(Z, K, score_function="sigmoid", pre_softmax=True),
        ValueError,
        "pre_softmax",
    ),
    ("gating/normalize-type", lambda: mr.topk_gating(Z, K, normalize="yes"), TypeError, "normalize"),
    ("gating/groups-half", lambda: mr.topk_gating(Z, K, num_groups=2), ValueError, "group_topk"),
    ("gating/groups-divide", lambda: mr.topk_gating(Z, K, num_groups=3, group_topk=1), ValueError, "num_groups"),
    ("gating/group-topk>groups", lambda: mr.topk_gating(Z, K, num_groups=2, group_topk=3), ValueError, "group_topk"),
    ("gating/group-topk>topk", lambda: mr.topk_gating(Z, 1, num_groups=4, group_topk=2), ValueError, "group_topk"),
    ("gating/topk-unreachable", lambda: mr.topk_gating(Z, 5, num_groups=4, group_topk=2), ValueError, "topk"),
    ("gating/bias-len", lambda: mr.topk_gating(Z, K, expert_bias=torch.zeros(E - 1)), ValueError, "expert_bias"),
    ("gating/bias-dtype", lambda: mr.topk_gating(Z, K, expert_bias=torch.zeros(E).half()), TypeError, "expert_bias"),
    ("gating/bias-2d", lambda: mr.topk_gating(Z, K, expert_bias=torch.zeros(1, E)), ValueError, "expert_bias"),
    (
        "gating/bias-device",
        lambda: mr.topk_gating(Z, K, expert_bias=torch.zeros(E, device=META)),
        ValueError,
        "expert_bias",
    ),
    (
        "gating/bias-nan",
        lambda: mr.topk_gating(Z, K, expert_bias=torch.full((E,), math.nan)),
        ValueError,
        "expert_bias",
    ),
    ("gating/scaling-inf", lambda: mr.topk_gating(Z, K, scaling_factor=math.inf), ValueError, "scaling_factor"),
    ("gating/scaling-nan", lambda: mr.topk_gating(Z, K, scaling_factor=math.nan), ValueError, "scaling_factor"),
    ("gating/noise-neg", lambda: mr.topk_gating(Z, K, noise_std=-1.0), ValueError, "noise_std"),
    ("gating/mask-rate-1", lambda: mr.topk_gating(Z, K, expert_mask_rate=1.0), ValueError, "expert_mask_rate"),
    ("gating/seed-neg", lambda: mr.topk_gating(Z, K, seed=-1), ValueError, "seed"),
    ("gating/seed-2^64", lambda: mr.topk_gating(Z, K, seed=2**64), ValueError, "seed"),
    ("gating/offset-float", lambda: mr.topk_gating(Z, K, offset=1.5), TypeError, "offset"),
    # topk_gating_replay
    ("replay/indices-float", lambda: mr.topk_gating_replay(Z, IDX.float()), TypeError, "indices"),
    ("replay/indices-rows", lambda: mr.topk_gating_replay(Z, IDX[:-1]), ValueError, "indices"),
    ("replay/indices-1d", lambda: mr.topk_gating_replay(Z, IDX[:, 0]), ValueError, "indices"),
    ("replay/indices-k0", lambda: mr.topk_gating_replay(Z, IDX[:, :0]), ValueError, "topk"),
    ("replay/indices-range", lambda: mr.topk_gating_replay(Z, IDX + 1), ValueError, "indices"),
    ("replay/indices-neg", lambda: mr.topk_gating_replay(Z, IDX - 1), ValueError, "indices"),
    ("replay/indices-repeat", lambda: mr.topk_gating_replay(Z, IDX[:, :1].repeat(1, 2)), ValueError, "indices"),
    ("replay/indices-int64-overflow", lambda: mr.topk_gating_replay(Z, IDX + 2**32), ValueError, "indices"),
    (
        "replay/pre-softmax-sigmoid",
        lambda: mr.topk_gating_replay(Z, IDX, score_function="sigmoid", pre_softmax=True),
        ValueError,
        "pre_softmax",
    ),
    ("replay/indices-device", lambda: mr.topk_gating_replay(Z, IDX.to(META)), ValueError, "indices"),
    # capacity
    ("capacity/factor-0", lambda: mr.capacity(8, 4, 2, 0.0), ValueError, "capacity_factor"),
    ("capacity/factor-neg", lambda: mr.capacity(8, 4, 2, -1.0), ValueError, "capacity_factor"),
    ("capacity/factor-nan", lambda: mr.capacity(8, 4, 2, math.nan), ValueError, "capacity_factor"),
    ("capacity/factor-inf", lambda: mr.capacity(8, 4, 2, math.inf), ValueError, "capacity_factor"),
    ("capacity/experts-0", lambda: mr.capacity(8, 0, 1, 1.0), ValueError, "num_experts"),
    ("capacity/topk-0", lambda: mr.capacity(8, 4, 0, 1.0), ValueError, "topk"),
    ("capacity/overflow", lambda: mr.capacity(2**31, 1, 1, 1.0), ValueError, "overflow"),
    ("capacity/multiple-0", lambda: mr.capacity(8, 4, 2, 1.0, capacity_multiple=0), ValueError, "capacity_multiple"),
    ("capacity/min-neg", lambda: mr.capacity(8, 4, 2, 1.0, min_capacity=-1), ValueError, "min_capacity"),
    ("capacity/tokens-float", lambda: mr.capacity(8.0, 4, 2, 1.0), TypeError, "num_tokens"),
    # dispatch
    ("dispatch/indices-float", lambda: mr.dispatch(IDX.float(), W, E), TypeError, "indices"),
    ("dispatch/weights-f16", lambda: mr.dispatch(IDX, W.half(), E), TypeError, "weights"),
    ("dispatch/weights-shape", lambda: mr.dispatch(IDX, W[:, :1].contiguous(), E), ValueError, "weights"),
    ("dispatch/weights-device", lambda: mr.dispatch(IDX, W.to(META), E), ValueError, "weights"),
    ("dispatch/experts-0", lambda: mr.dispatch(IDX, W, 0), ValueError, "num_experts"),
    ("dispatch/capacity-neg", lambda: mr.dispatch(IDX, W, E, capacity=-1), ValueError, "capacity"),
    ("dispatch/policy", lambda: mr.dispatch(IDX, W, E, capacity=2, drop_policy="lifo"), ValueError, "drop_policy"),
    ("dispatch/layout", lambda: mr.dispatch(IDX, W, E, layout="sparse"), ValueError, "layout"),
    ("dispatch/pad-no-capacity", lambda: mr.dispatch(IDX, W, E, layout="pad_to_capacity"), ValueError, "capacity"),
    (
        "dispatch/dropless-capacity",
        lambda: mr.dispatch(IDX, W, E, capacity=2, layout="dropless"),
        ValueError,
        "capacity",
    ),
    ("dispatch/align-0", lambda: mr.dispatch(IDX, W, E, layout="dropless", align=0), ValueError, "align"),
    ("dispatch/align-compact", lambda: mr.dispatch(IDX, W, E, capacity=2, align=4), ValueError, "align"),
    ("dispatch/ep-size", lambda: mr.dispatch(IDX, W, E, capacity=2, ep_size=3), ValueError, "ep_size"),
    (
        "dispatch/renormalize-type",
        lambda: mr.dispatch(IDX, W, E, capacity=2, renormalize=None),
        TypeError,
        "renormalize",
    ),
    ("dispatch/indices-range", lambda: mr.dispatch(IDX, W, 4, capacity=2), ValueError, "indices"),
    ("dispatch/indices-repeat", lambda: mr.dispatch(IDX[:, :1].repeat(1, 2), W, E, capacity=2), ValueError, "indices"),
    # expert_choice
    ("expert_choice/logits-f64", lambda: mr.expert_choice(Z.double(), 2), TypeError, "logits"),
    ("expert_choice/capacity-neg", lambda: mr.expert_choice(Z, -1), ValueError, "capacity"),
    ("expert_choice/capacity-float", lambda: mr.expert_choice(Z, 1.5), TypeError, "capacity"),
    # permute / unpermute
    ("permute/x-f64", lambda: mr.permute(X.double(), R2T, ROW), TypeError, "x"),
    ("permute/row_to_token-2d", lambda: mr.permute(X, R2T[None], ROW), ValueError, "row_to_token"),
    ("permute/row_to_token-float", lambda: mr.permute(X, R2T.float(), ROW), TypeError, "row_to_token"),
    ("permute/row-rows", lambda: mr.permute(X, R2T, ROW[:-1]), ValueError, "row"),
    ("permute/row-device", lambda: mr.permute(X, R2T, ROW.to(META)), ValueError, "row"),
    ("permute/token-range", lambda: mr.permute(X, R2T + T, ROW), ValueError, "row_to_token"),
    ("unpermute/y-int", lambda: mr.unpermute(X.int(), ROW, W), TypeError, "y"),
    ("unpermute/weights-bf16", lambda: mr.unpermute(torch.randn(T * K, 4), ROW, W.bfloat16()), TypeError, "weights"),
    (
        "unpermute/weights-shape",
        lambda: mr.unpermute(torch.randn(T * K, 4), ROW, W[:, :1].contiguous()),
        ValueError,
        "weights",
    ),
    (
        "unpermute/row-1d",
        lambda: mr.unpermute(torch.randn(T * K, 4), ROW[:, 0].contiguous(), W[:, 0].contiguous()),
        ValueError,
        "row",
    ),
    ("unpermute/row-range", lambda: mr.unpermute(torch.randn(T * K, 4), ROW + 1, W), ValueError, "row"),
    # losses
    ("aux/topk-0", lambda: mr.aux_loss(Z, 0), ValueError, "topk"),
    ("aux/score-fn", lambda: mr.aux_loss(Z, K, score_function="tanh"), ValueError, "score_function"),
    ("aux/coeff-nan", lambda: mr.aux_loss(Z, K, coeff=math.nan), ValueError, "coeff"),
    ("aux/logits-f64", lambda: mr.aux_loss(Z.double(), K), TypeError, "logits"),
    (
        "aux/mask-int",
        lambda: mr.aux_loss(Z, K, padding_mask=torch.zeros(T, dtype=torch.int64)),
        TypeError,
        "padding_mask",
    ),
    (
        "aux/mask-len",
        lambda: mr.aux_loss(Z, K, padding_mask=torch.zeros(T + 1, dtype=torch.bool)),
        ValueError,
        "padding_mask",
    ),
    (
        "aux/mask-device",
        lambda: mr.aux_loss(Z, K, padding_mask=torch.zeros(T, dtype=torch.bool, device=META)),
        ValueError,
        "padding_mask",
    ),
    ("aux/counts-float", lambda: mr.aux_loss(Z, K, counts=torch.ones(E)), TypeError, "counts"),
    ("aux/counts-len", lambda: mr.aux_loss(Z, K, counts=torch.ones(E - 1, dtype=torch.int64)), ValueError, "counts"),
    ("aux/counts-neg", lambda: mr.aux_loss(Z, K, counts=-torch.ones(E, dtype=torch.int64)), ValueError, "count"),
    ("aux/total-neg", lambda: mr.aux_loss(Z, K, total_tokens=-1), ValueError, "total_tokens"),
    ("aux/total-0", lambda: mr.aux_loss(Z, K, total_tokens=0), ValueError, "total_tokens"),
    ("aux/total-float-tensor", lambda: mr.aux_loss(Z, K, total_tokens=torch.tensor(3.0)), TypeError, "total_tokens"),
    ("seq_aux/seq-len-0", lambda: mr.seq_aux_loss(Z, K, 0), ValueError, "seq_len"),
    ("seq_aux/seq-len-divide", lambda: mr.seq_aux_loss(Z, K, 4), ValueError, "seq_len"),
    ("z/coeff-inf", lambda: mr.z_loss(Z, coeff=math.inf), ValueError, "coeff"),
    ("z/logits-1d", lambda: mr.z_loss(Z[0]), ValueError, "logits"),
    ("z/mask-2d", lambda: mr.z_loss(Z, padding_mask=torch.zeros(T, 1, dtype=torch.bool)), ValueError, "padding_mask"),
    # dropout
    ("expert_mask/rate-1", lambda: mr.expert_mask(T, E, K, 1.0), ValueError, "rate"),
    ("expert_mask/rate-neg", lambda: mr.expert_mask(T, E, K, -0.5), ValueError, "rate"),
    ("expert_mask/topk>E", lambda: mr.expert_mask(T, E, E + 1, 0.5), ValueError, "topk"),
    ("dropout/rate-neg", lambda: mr.assignment_dropout(IDX, W, -0.1, num_experts=E), ValueError, "rate"),
    ("dropout/weights-shape", lambda: mr.assignment_dropout(IDX, W[:1], 0.1, num_experts=E), ValueError, "weights"),
    ("dropout/weights-f16", lambda: mr.assignment_dropout(IDX, W.half(), 0.1, num_experts=E), TypeError, "weights"),
    ("dropout/indices-range", lambda: mr.assignment_dropout(IDX, W, 0.1, num_experts=4), ValueError, "indices"),
    # bias
    (
        "bias/bias-f16",
        lambda: mr.update_expert_bias(torch.zeros(E).half(), torch.ones(E, dtype=torch.int64), 0.1),
        TypeError,
        "bias",
    ),
    (
        "bias/counts-len",
        lambda: mr.update_expert_bias(torch.zeros(E), torch.ones(E + 1, dtype=torch.int64), 0.1),
        ValueError,
        "counts",
    ),
    ("bias/counts-float", lambda: mr.update_expert_bias(torch.zeros(E), torch.ones(E), 0.1), TypeError, "counts"),
    (
        "bias/rate-nan",
        lambda: mr.update_expert_bias(torch.zeros(E), torch.ones(E, dtype=torch.int64), math.nan),
        ValueError,
        "rate",
    ),
    # stats
    ("stats/indices-rows", lambda: mr.router_stats(Z, IDX[:-1]), ValueError, "indices"),
    ("stats/slot-shape", lambda: mr.router_stats(Z, IDX, slot=IDX[:, :1]), ValueError, "slot"),
    ("stats/slot-float", lambda: mr.router_stats(Z, IDX, slot=IDX.float()), TypeError, "slot"),
    ("stats/strict-type", lambda: mr.router_stats(Z, IDX, strict=1), TypeError, "strict"),
    ("stats/indices-range", lambda: mr.router_stats(Z, IDX + 1), ValueError, "indices"),
]


@pytest.mark.parametrize("thunk,exc,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(thunk, exc, needle):
    with pytest.raises(exc) as info:
        thunk()
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    msg = str(info.value)
    assert needle in msg, msg


STRIDED = [
    ("gating/logits-strided", lambda f: mr.topk_gating(f(torch.randn(T, 2 * E, generator=_g())[:, ::2]), K)),
    ("gating/logits-transposed", lambda f: mr.topk_gating(f(torch.randn(E, T, generator=_g()).t()), K)),
    ("dispatch/indices-strided", lambda f: mr.dispatch(f(IDX.t().contiguous().t()), W, E, capacity=2)),
    ("permute/x-strided", lambda f: mr.permute(f(X.t().contiguous().t()), R2T, ROW)),
    ("bias/bias-strided",
     lambda f: mr.update_expert_bias(
         f(torch.arange(2 * E, dtype=torch.float32)[::2]), torch.ones(E, dtype=torch.int64), 0.1)),
    ("z_loss/logits-transposed", lambda f: mr.z_loss(f(torch.randn(E, T, generator=_g()).t()))),
]  # fmt: skip


def _g():
    return torch.Generator().manual_seed(0)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else []


@pytest.mark.parametrize("thunk", [c[1] for c in STRIDED], ids=[c[0] for c in STRIDED])
def test_non_contiguous_inputs_give_the_contiguous_result(thunk):
    got = _flat(thunk(lambda t: t))
    want = _flat(thunk(lambda t: t.contiguous()))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "thunk, needle",
    [
        (lambda: mr.dispatch(IDX, W, E, capacity=2**64), "`capacity` = 18446744073709551616"),
        (lambda: mr.dispatch(IDX, W, E, layout="dropless", align=2**63), "`align`"),
        (lambda: mr.dispatch(IDX, W, 2**64), "`num_experts`"),
    ],
)
def test_huge_ints_name_the_argument(thunk, needle):
    with pytest.raises(ValueError, match=needle):
        thunk()


@pytest.mark.parametrize(
    "thunk",
    [
        lambda: mr.topk_gating(Z.to_sparse(), K),
        lambda: mr.topk_gating(Z.to_sparse_csr(), K),
        lambda: mr.topk_gating(torch.nested.nested_tensor([Z, Z]), K),
    ],
)
def test_sparse_and_nested_tensors_are_type_errors(thunk):
    with pytest.raises(TypeError, match="logits"):
        thunk()


@pytest.mark.parametrize(
    "thunk, needle",
    [
        (
            lambda: mr.expert_mask(2**31, 2, 1, 0.5),
            r"num_tokens \* num_experts = 4294967296 overflows",
        ),  # was a 4 GB zero-fill first
        (
            lambda: mr.expert_choice(torch.randn(4, 8), 2**28),
            r"num_experts \* capacity = 2147483648 overflows",
        ),  # was a 16 GB allocation
    ],
)
def test_sizes_are_checked_before_any_allocation(thunk, needle):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=needle):
        thunk()
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 256 * 1024, f"peak memory grew by {grown_kib} KiB before the error"
