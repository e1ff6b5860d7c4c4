"""router_stats against the reference in reference.py (with slots, padding, bf16),
non-finite counting and strict mode (one message on every device); the statistics are
not differentiable and compile with fullgraph."""

from __future__ import annotations

import math

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32, requires_cuda
from test_dropout import _routing


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
