"""CUDA variants. The CUDA kernels are a separate issue and not built into this wheel:
until they land, every op given CUDA tensors must raise a clear RuntimeError (never copy
to the CPU silently). These tests need a CUDA device and are skipped loudly without one
(`pytest -rs` shows "SKIPPED: no CUDA device")."""

from __future__ import annotations

import pytest
import torch

import moe_router as mr
from conftest import requires_cuda

pytestmark = requires_cuda

T, E, K, H = 8, 8, 2, 16
MSG = "CUDA kernels are not built"


def _cuda_calls():
    dev = "cuda"
    z = torch.randn(T, E, device=dev)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)]).to(dev)
    w = torch.rand(T, K, device=dev)
    row = torch.arange(T * K, device=dev).reshape(T, K)
    r2t = torch.arange(T, device=dev).repeat_interleave(K)
    return {
        "topk_gating": lambda: mr.topk_gating(z, K),
        "topk_gating_replay": lambda: mr.topk_gating_replay(z, idx),
        "dispatch": lambda: mr.dispatch(idx, w, E, capacity=4),
        "expert_choice": lambda: mr.expert_choice(z, 2),
        "permute": lambda: mr.permute(torch.randn(T, H, device=dev), r2t, row),
        "unpermute": lambda: mr.unpermute(torch.randn(T * K, H, device=dev), row, w),
        "aux_loss": lambda: mr.aux_loss(z, K),
        "seq_aux_loss": lambda: mr.seq_aux_loss(z, K, 4),
        "z_loss": lambda: mr.z_loss(z),
        "expert_mask": lambda: mr.expert_mask(T, E, K, 0.5, device=dev),
        "assignment_dropout": lambda: mr.assignment_dropout(idx, w, 0.5, num_experts=E),
        "update_expert_bias": lambda: mr.update_expert_bias(torch.zeros(E, device=dev), torch.ones(E, device=dev,
                                                                                                dtype=torch.int64), 0.1),
        "router_stats": lambda: mr.router_stats(z, idx),
    }


NAMES = ["topk_gating", "topk_gating_replay", "dispatch", "expert_choice", "permute", "unpermute", "aux_loss",
         "seq_aux_loss", "z_loss", "expert_mask", "assignment_dropout", "update_expert_bias", "router_stats"]


@pytest.mark.parametrize("name", NAMES)
def test_cuda_tensors_raise_a_clear_error_until_the_kernels_land(name):
    call = _cuda_calls()[name]
    with pytest.raises(RuntimeError, match=MSG):
        call()


def test_cuda_inputs_are_not_moved_silently():
    z = torch.randn(T, E, device="cuda")
    with pytest.raises(RuntimeError, match=MSG):
        mr.topk_gating(z, K)
    assert z.device.type == "cuda"
