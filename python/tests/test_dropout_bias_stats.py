"""expert_mask, assignment_dropout (with its gradient), update_expert_bias and
router_stats against the independent references in reference.py (incl. a NumPy
Philox-4x32-10 checked on Random123's known answers); regressions (statistics not
differentiable and compiling with fullgraph, expert_mask on the meta device, one strict-mode
message on every device, TopKRouter's seed checked at construction); and the native
bindings' own checks of tensors and options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32, requires_cuda


def test_reference_philox_matches_random123_known_answers():
    kat = [
        ([0, 0, 0, 0], (0, 0), [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, (0xFFFFFFFF, 0xFFFFFFFF), [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], (0xA4093822, 0x299F31D0),
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]  # fmt: skip
    for counter, key, expected in kat:
        got = ref.philox4x32_10(np.array([counter], dtype=np.uint64), key)[0]
        assert [int(x) for x in got] == expected


@pytest.mark.parametrize("t,e,k,rate", [(50, 16, 2, 0.3), (20, 8, 6, 0.9), (7, 4, 4, 0.5), (0, 4, 1, 0.5)])
@pytest.mark.parametrize("seed,offset", [(0, 0), (12345, 2**40 + 3), (2**64 - 1, 2**63)])
def test_expert_mask_matches_philox_reference(t, e, k, rate, seed, offset):
    m = mr.expert_mask(t, e, k, rate, seed=seed, offset=offset)
    assert m.dtype == torch.bool and m.shape == (t, e)
    assert torch.equal(m, ref.expert_mask(t, e, k, rate, seed, offset))
    assert ((~m).sum(1) >= k).all()


def test_expert_mask_rate_zero_masks_nothing():
    assert not mr.expert_mask(30, 8, 2, 0.0, seed=5).any()


def _routing(t, k, e, seed, unrouted=True):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if unrouted and t > 2:
        idx[2, -1] = -1
    w = torch.rand((t, k), generator=g) + 0.1
    w[idx < 0] = 0.0
    return idx, w


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7])
def test_assignment_dropout_forward_and_gradient(renormalize, rate):
    t, k, e, seed, offset = 40, 3, 8, 77, 5
    idx, w = _routing(t, k, e, seed=1)
    wr = w.clone().requires_grad_()
    out_idx, out_w = mr.assignment_dropout(idx, wr, rate, num_experts=e, seed=seed, offset=offset,
                                           renormalize=renormalize)  # fmt: skip
    keep = ref.assignment_keep(idx, rate, seed, offset)
    assert out_idx.dtype == torch.int64
    assert torch.equal(out_idx, torch.where(keep, idx, torch.full_like(idx, -1)))
    w64 = w.double().requires_grad_()
    rw = ref.assignment_dropout_weights(w64, idx, keep, renormalize)
    assert_close_f32(out_w, rw)
    g = ref.randn((t, k), seed=2)
    (out_w * g).sum().backward()
    (rw * g.double()).sum().backward()
    assert_close_f32(wr.grad, w64.grad, rtol=1e-5, atol=1e-6)
    if rate == 0.0:
        assert torch.equal(out_idx, idx)


def test_assignment_dropout_is_deterministic_in_seed_and_offset():
    idx, w = _routing(64, 2, 8, seed=3, unrouted=False)
    a = mr.assignment_dropout(idx, w, 0.5, num_experts=8, seed=1, offset=2)
    b = mr.assignment_dropout(idx.int(), w, 0.5, num_experts=8, seed=1, offset=2)
    c = mr.assignment_dropout(idx, w, 0.5, num_experts=8, seed=1, offset=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_update_expert_bias_in_place_matches_formula():
    bias = torch.tensor([0.0, 0.0, 0.0, 0.5, -0.25])
    counts = torch.tensor([1, 2, 3, 2, 2])  # mean 2
    expected = ref.update_expert_bias(bias, counts, 0.001)
    out = mr.update_expert_bias(bias, counts, 0.001)
    assert out is bias
    assert torch.equal(bias, expected)
    assert bias[1].item() == 0.0  # exactly at the mean: unchanged


def test_update_expert_bias_on_a_parameter_and_int32_counts():
    p = torch.nn.Parameter(torch.zeros(4))
    mr.update_expert_bias(p, torch.tensor([4, 0, 2, 2], dtype=torch.int32), 0.5)
    assert p.tolist() == [-0.5, 0.5, 0.0, 0.0]
    assert p.requires_grad and p.grad is None


def test_update_expert_bias_rejects_negative_counts_and_leaves_bias_unchanged():
    bias = torch.zeros(3)
    with pytest.raises(ValueError, match="counts"):
        mr.update_expert_bias(bias, torch.tensor([1, -1, 0]), 0.1)
    assert (bias == 0).all()


@pytest.mark.parametrize("with_slot", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_router_stats_match_reference(with_slot, with_mask, dtype):
    t, e, k = 45, 8, 2
    z = ref.randn((t, e), seed=4, scale=2.0, dtype=dtype)
    idx, _ = _routing(t, k, e, seed=5)
    slot = None
    if with_slot:
        slot = torch.where(torch.rand((t, k), generator=torch.Generator().manual_seed(6)) < 0.2, -1, 0)
        slot[idx < 0] = -1
    mask = (torch.arange(t) % 6 == 1) if with_mask else None
    s = mr.router_stats(z, idx, slot=slot, padding_mask=mask)
    r = ref.router_stats(z, idx, e, slot=slot, padding_mask=mask)
    assert torch.equal(s.selected_counts, r["selected_counts"])
    if with_slot:
        assert torch.equal(s.kept_counts, r["kept_counts"])
    else:
        assert s.kept_counts is None
    assert int(s.dropped) == r["dropped"]
    assert int(s.num_tokens) == r["num_tokens"]
    assert int(s.nonfinite_logits) == 0
    for name in ("max_violation", "mean_entropy", "mean_lse", "max_lse"):
        assert_close_f32(getattr(s, name), torch.tensor(r[name]), rtol=2e-6, msg=name)


def test_router_stats_count_nonfinite_and_strict_mode_raises():
    z = torch.zeros(4, 4)
    z[1, 2] = math.nan
    z[3, 0] = -math.inf
    idx = torch.tensor([[0], [1], [2], [3]])
    s = mr.router_stats(z, idx)
    assert int(s.nonfinite_logits) == 2
    with pytest.raises(ValueError, match="logits"):
        mr.router_stats(z, idx, strict=True)
    # padding tokens are excluded, also from the strict check
    ok = mr.router_stats(z, idx, padding_mask=torch.tensor([False, True, False, True]), strict=True)
    assert int(ok.nonfinite_logits) == 0 and int(ok.num_tokens) == 2


# --------------------------------------------------------------------------------------
# Regressions


def _stats_inputs(t=16, e=8, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, 4, generator=g)
    w = torch.randn(e, 4, generator=g, requires_grad=True)
    return x, w, k


def test_router_stats_outputs_are_not_differentiable():
    # The statistics used to carry the logits' autograd graph (through an op without an
    # autograd formula): a loss that logged one of them could not be backpropagated.
    x, w, k = _stats_inputs()
    z = x @ w.t()
    s = mr.router_stats(z, torch.topk(z.detach(), k).indices)
    for name, v in s._asdict().items():
        if v is not None:
            assert not v.requires_grad and v.grad_fn is None, name
    raw = torch.ops.moe_router.router_stats(z, torch.topk(z.detach(), k).indices, None, None, False)
    assert not any(o.requires_grad for o in raw)
    (z.square().sum() + s.max_violation + s.mean_entropy).backward()
    want = torch.autograd.grad((x @ w.t()).square().sum(), w)[0]
    assert torch.equal(w.grad, want)  # the statistics are constants of the loss


def test_router_stats_compile_fullgraph_returning_max_violation():
    x, w, k = _stats_inputs(seed=1)

    def stats(x, w):
        z = x @ w.t()
        return mr.router_stats(z, torch.topk(z, k).indices).max_violation

    def loss(x, w):
        z = x @ w.t()
        return z.square().mean() + mr.router_stats(z, torch.topk(z, k).indices).max_violation

    torch._dynamo.reset()
    got = torch.compile(stats, fullgraph=True)(x, w)
    assert torch.equal(got, stats(x, w)) and not got.requires_grad
    got = torch.compile(loss, fullgraph=True)(x, w)
    assert_close_f32(got, loss(x, w))
    got.backward()
    want = torch.autograd.grad((x @ w.t()).square().mean(), w)[0]
    assert_close_f32(w.grad, want)


def test_expert_mask_on_the_meta_device_gives_meta_tensors():
    m = mr.expert_mask(6, 8, 2, 0.5, seed=3, device="meta")
    assert m.device.type == "meta" and m.shape == (6, 8) and m.dtype == torch.bool
    m = torch.ops.moe_router.expert_mask(5, 4, 1, 0.0, 0, 0, torch.device("meta"))
    assert m.device.type == "meta" and m.shape == (5, 4) and m.dtype == torch.bool


def _nonfinite_logits():
    z = torch.zeros(4, 4)
    z[1, 2] = math.nan
    return z, torch.tensor([[0], [1], [2], [3]])


def test_router_stats_strict_error_message():
    z, idx = _nonfinite_logits()
    with pytest.raises(ValueError) as info:
        mr.router_stats(z, idx, strict=True)
    assert str(info.value) == (
        "moe_router.router_stats: argument `logits` holds 1 non-finite value(s) (NaN or ±Inf) and strict mode is on; "
        "fix the producer of `logits` or turn strict mode off"
    )


@requires_cuda
def test_router_stats_strict_error_is_the_same_on_cuda():
    # (test_cuda_emu.py checks the same on the emulator.)
    z, idx = _nonfinite_logits()
    msgs = []
    for dev in ("cpu", "cuda"):
        with pytest.raises(ValueError) as info:
            mr.router_stats(z.to(dev), idx.to(dev), strict=True)
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1]


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, None])
def test_topk_router_validates_seed_at_construction(seed):
    with pytest.raises(ValueError, match="seed"):
        mr.TopKRouter(8, 4, 2, seed=seed)


def test_topk_router_takes_every_uint64_seed():
    for seed in (0, 2**63, 2**64 - 1, np.uint64(2**64 - 1)):
        r = mr.TopKRouter(8, 4, 2, seed=seed, expert_dropout=0.5)
        assert r.seed == int(seed) and type(r.seed) is int


# --------------------------------------------------------------------------------------
# The native bindings check every tensor and option before touching memory


def _native_calls():
    from moe_router import _native as n

    t, k, e = 6, 2, 8
    idx, w = _routing(t, k, e, seed=9, unrouted=False)
    idx = idx.int()
    z = torch.randn(t, e)

    def drop(**kw):
        a = dict(indices=idx, weights=w, out_indices=torch.empty(t, k, dtype=torch.int32),
                 out_weights=torch.empty(t, k), keep=torch.empty(t, k, dtype=torch.bool),
                 dropped=torch.empty((), dtype=torch.int64))  # fmt: skip
        opts = dict(num_experts=e, rate=0.5, seed=1, offset=2, renormalize=True)
        opts.update({o: kw.pop(o) for o in list(kw) if o not in a})  # `...`: leave the option out
        a.update(kw)
        return lambda: n.assignment_dropout(*a.values(), **{o: v for o, v in opts.items() if v is not ...})

    def stats(**kw):
        a = dict(logits=z, indices=idx, selected_counts=torch.empty(e, dtype=torch.int64),
                 kept_counts=torch.empty(e, dtype=torch.int64), scalars=torch.empty(4, dtype=torch.int64),
                 floats=torch.empty(4))  # fmt: skip
        opts = dict(slots=None, padding_mask=None, strict=False)
        opts.update({o: kw.pop(o) for o in list(kw) if o not in a})
        a.update(kw)
        return lambda: n.router_stats(*a.values(), **opts)

    bias = torch.zeros(e)
    shared = torch.zeros(e, dtype=torch.int64)  # bias (its first half, as float32) over counts
    return [
        ("mask/dtype", lambda: n.expert_mask(torch.empty(t, e, dtype=torch.uint8), topk=k, rate=0.5, seed=0, offset=0),
         TypeError, "masked"),
        ("mask/1d", lambda: n.expert_mask(torch.empty(e, dtype=torch.bool), topk=k, rate=0.5, seed=0, offset=0),
         ValueError, "masked"),
        ("mask/rate", lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=1.0, seed=0, offset=0),
         ValueError, "rate"),
        ("mask/seed-neg", lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=-1,
                                                offset=0), ValueError, "seed"),
        ("mask/missing-opt", lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=0),
         TypeError, "offset"),
        ("mask/unknown-opt", lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=0,
                                                   offset=0, device="cpu"), TypeError, "device"),
        ("mask/not-a-tensor", lambda: n.expert_mask([[False]], topk=1, rate=0.5, seed=0, offset=0), TypeError,
         "masked"),
        ("drop/indices-i64", drop(indices=idx.long()), TypeError, "indices"),
        ("drop/weights-shape", drop(weights=w[:1]), ValueError, "weights"),
        ("drop/keep-dtype", drop(keep=torch.empty(t, k, dtype=torch.uint8)), TypeError, "keep"),
        ("drop/dropped-shape", drop(dropped=torch.empty(1, dtype=torch.int64)), ValueError, "dropped"),
        ("drop/out-over-input", drop(out_weights=w), ValueError, "overlaps"),
        ("drop/strided", drop(weights=torch.rand(t, 2 * k)[:, ::2]), ValueError, "contiguous"),
        ("drop/renormalize-str", drop(renormalize="yes"), TypeError, "renormalize"),
        ("drop/no-experts-opt", drop(num_experts=...), TypeError, "num_experts"),
        ("drop-bwd/grad-shape", lambda: n.assignment_dropout_backward(idx, w, torch.ones(t, k, dtype=torch.bool),
                                                                      w[:, :1], torch.empty(t, k), renormalize=False),
         ValueError, "grad_out"),
        ("bias/counts-i32", lambda: n.update_expert_bias(bias, torch.ones(e, dtype=torch.int32), rate=0.1), TypeError,
         "counts"),
        ("bias/counts-len", lambda: n.update_expert_bias(bias, torch.ones(e + 1, dtype=torch.int64), rate=0.1),
         ValueError, "counts"),
        ("bias/strided", lambda: n.update_expert_bias(torch.zeros(2 * e)[::2], torch.ones(e, dtype=torch.int64),
                                                      rate=0.1), ValueError, "contiguous"),
        ("bias/overlaps-counts", lambda: n.update_expert_bias(shared.view(torch.float32)[:e], shared[:e], rate=0.1),
         ValueError, "overlaps"),
        ("stats/logits-f64", stats(logits=z.double()), TypeError, "logits"),
        ("stats/indices-rows", stats(indices=idx[:-1]), ValueError, "indices"),
        ("stats/slots-shape", stats(slots=idx[:, :1]), ValueError, "slots"),
        ("stats/mask-dtype", stats(padding_mask=torch.zeros(t, dtype=torch.uint8)), TypeError, "padding_mask"),
        ("stats/scalars-3", stats(scalars=torch.empty(3, dtype=torch.int64)), ValueError, "scalars"),
        ("stats/floats-f64", stats(floats=torch.empty(4, dtype=torch.float64)), TypeError, "floats"),
        ("stats/device-mix", stats(logits=z.to("meta")), ValueError, "logits"),
        ("stats/slots-list", stats(slots=[[0]]), TypeError, "slots"),
        ("stats/strict-missing", lambda: n.router_stats(z, idx, *[torch.empty(e, dtype=torch.int64)] * 2,
                                                        torch.empty(4, dtype=torch.int64), torch.empty(4)),
         TypeError, "strict"),
    ]


NATIVE_CASES = _native_calls()


@pytest.mark.parametrize("thunk,exc,needle", [c[1:] for c in NATIVE_CASES], ids=[c[0] for c in NATIVE_CASES])
def test_native_binding_rejects_a_bad_call(thunk, exc, needle):
    with pytest.raises(exc) as info:
        thunk()
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    assert needle in str(info.value) and str(info.value).startswith("moe_router."), str(info.value)
