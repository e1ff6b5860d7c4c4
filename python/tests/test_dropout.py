"""expert_mask and assignment_dropout (with its gradient) against the independent references in
reference.py (incl. a NumPy Philox-4x32-10 checked on Random123's known answers);
expert_mask on the meta device."""

from __future__ import annotations


import numpy as np
import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32


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


def test_expert_mask_on_the_meta_device_gives_meta_tensors():
    m = mr.expert_mask(6, 8, 2, 0.5, seed=3, device="meta")
    assert m.device.type == "meta" and m.shape == (6, 8) and m.dtype == torch.bool
    m = torch.ops.moe_router.expert_mask(5, 4, 1, 0.0, 0, 0, torch.device("meta"))
    assert m.device.type == "meta" and m.shape == (5, 4) and m.dtype == torch.bool
