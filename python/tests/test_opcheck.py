"""torch.library.opcheck on every moe_router custom op: schema (no undeclared mutation
or aliasing), autograd registration, fake kernel vs real kernel (shapes, dtypes,
strides), and AOT dispatch with dynamic shapes."""

from __future__ import annotations

import pytest
import torch

import moe_router  # noqa: F401  (registers the ops)
import reference as ref
from moe_router import ops


def _z(t, e, dtype=torch.float32, rg=True, seed=0):
    return ref.tie_free_logits(t, e, seed=seed, dtype=dtype).requires_grad_(rg)


def _idx(t, k, e, seed=0, dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]).to(dtype)


def _samples():
    t, e, k = 12, 8, 2
    idx = _idx(t, k, e)
    w = torch.rand(t, k, generator=torch.Generator().manual_seed(1))
    mask = torch.arange(t) % 5 == 2
    s = {}
    s["topk_gating"] = [
        (_z(t, e), None, k, "softmax", False, False, None, None, 1.0, 0.0, 0.0, 0, 0),
        (_z(t, e, torch.bfloat16), torch.randn(e), 4, "sigmoid", False, True, 4, 2, 2.5, 0.0, 0.0, 0, 0),
        (_z(t, e, torch.float16), None, k, "softmax", True, False, None, None, 1.0, 0.5, 0.25, 7, -3),
    ]
    s["topk_gating_replay"] = [
        (_z(t, e), idx, "softmax", True, True, 1.0),
        (_z(t, e, torch.bfloat16), idx.long(), "sigmoid", False, False, 2.0),
    ]
    s["topk_gating_backward"] = [(_z(t, e, rg=False), idx, torch.randn(t, k), "softmax", False, True, 1.5)]
    s["dispatch"] = [
        (idx, w, e, 3, "position", "compact", 1, False, 1, 0, 0),
        (idx.long(), w, e, 2, "probs", "pad_to_capacity", 1, True, 2, 0, 0),
        (idx, w, e, None, None, "dropless", 4, False, 4, 0, 0),
        (idx, w, e, 1, "random", "compact", 1, False, 1, 5, 9),
    ]
    s["expert_choice"] = [(_z(t, e), 3), (_z(t, e, torch.bfloat16), 20)]
    s["expert_choice_backward"] = [(_z(t, e, rg=False), torch.full((t, e), -1, dtype=torch.int32), torch.randn(t, e))]
    rows = 10
    r2t = torch.tensor([0, 3, 5, -1, 7, 11, 2, -1, -1, 4], dtype=torch.int32)
    row = torch.full((t, 1), -1, dtype=torch.int32)
    for r, tok in enumerate(r2t.tolist()):
        if tok >= 0:
            row[tok, 0] = r
    x = torch.randn(t, 16, requires_grad=True)
    s["permute"] = [(x, r2t, row), (x.detach().bfloat16().requires_grad_(), r2t.long(), row.long())]
    s["permute_backward"] = [(torch.randn(rows, 16), row, t)]
    y = torch.randn(rows, 16, requires_grad=True)
    s["unpermute"] = [(y, row, torch.rand(t, 1, requires_grad=True)), (y.detach().half(), row, torch.rand(t, 1))]
    s["unpermute_backward"] = [(torch.randn(t, 16), torch.randn(rows, 16), row, torch.rand(t, 1))]
    counts = torch.tensor([3, 1, 0, 7, 2, 2, 4, 5])
    s["aux_loss"] = [
        (_z(t, e), None, None, None, k, "softmax", 0.1),
        (_z(t, e, torch.bfloat16), mask, counts, torch.tensor(40), k, "sigmoid", 1.0),
    ]
    s["aux_loss_backward"] = [
        (_z(t, e, rg=False), mask, counts, torch.tensor(40), k, "softmax", 0.1, torch.tensor(1.5))
    ]
    s["seq_aux_loss"] = [(_z(t, e), None, 4, k, "softmax", 0.1), (_z(t, e, torch.float16), mask, 6, k, "sigmoid", 1.0)]
    s["seq_aux_loss_backward"] = [
        (_z(t, e, rg=False), None, torch.full((3, e), 1, dtype=torch.int64), 4, k, "softmax", 0.1, torch.tensor(2.0))
    ]
    s["z_loss"] = [(_z(t, e), None, 1e-3), (_z(t, e, torch.bfloat16), mask, 1.0)]
    s["z_loss_backward"] = [(_z(t, e, rg=False), mask, 0.5, torch.tensor(3.0))]
    s["expert_mask"] = [(t, e, k, 0.4, 3, 4, torch.device("cpu"))]
    s["assignment_dropout"] = [
        (idx, w.clone().requires_grad_(), e, 0.5, 1, 2, True),
        (idx.long(), w, e, 0.0, 0, 0, False),
    ]
    s["assignment_dropout_backward"] = [(idx, w, torch.rand(t, k) > 0.5, True, torch.randn(t, k))]
    s["update_expert_bias"] = [(torch.zeros(e), counts, 0.01)]
    s["router_stats"] = [
        (_z(t, e, rg=False), idx, None, None, False),
        (_z(t, e), idx, None, None, False),  # statistics of logits that require grad: not differentiable
        (_z(t, e, torch.bfloat16, rg=False), idx.long(), torch.zeros(t, k, dtype=torch.int32), mask, True),
    ]
    return s


SAMPLES = _samples()


def test_every_custom_op_has_samples():
    assert sorted(SAMPLES) == sorted(ops.CUSTOM_OPS)


@pytest.mark.parametrize("name", ops.CUSTOM_OPS)
def test_opcheck(name):
    op = getattr(torch.ops.moe_router, name).default
    for args in SAMPLES[name]:
        torch.library.opcheck(op, args)
