"""update_expert_bias against its formula: in place, on a Parameter, int32 counts,
negative counts rejected with the bias unchanged."""

from __future__ import annotations


import pytest
import torch

import moe_router as mr
import reference as ref


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
