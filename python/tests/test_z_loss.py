"""z_loss (ST-MoE router z-loss) against the float64 reference in reference.py: values,
gradients, stability at large logits, +inf logits; f16/bf16 and empty inputs are in
test_aux_loss.py's shared loss checks."""

from __future__ import annotations

import math

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import assert_close_f32
from test_aux_loss import _grads


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_z_loss_value_gradient_and_stability(scale):
    t, e = 33, 16
    z = ref.randn((t, e), seed=8, scale=scale)
    mask = torch.arange(t) % 4 == 0
    for m in (None, mask):
        lo, lr, go, gr = _grads(
            lambda x: mr.z_loss(x, coeff=1e-3, padding_mask=m), lambda x: ref.z_loss(x, coeff=1e-3, padding_mask=m), z
        )
        assert torch.isfinite(lo)
        assert_close_f32(lo, lr, rtol=2e-6)
        assert_close_f32(go, gr, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_z_loss_of_a_plus_inf_logit_is_inf_like_torch_logsumexp(dtype):
    """logsumexp of a row whose max is +inf is +inf (torch.logsumexp), so the z-loss is
    +inf, not NaN (the max shift computed inf - inf)."""
    z = ref.randn((5, 4), seed=1)
    z[2, 1] = math.inf
    z[4] = torch.tensor([math.inf, math.inf, -math.inf, 0.0])
    x = z.to(dtype)
    want = torch.logsumexp(x.double(), dim=-1).pow(2).mean() * 0.5
    assert want.item() == math.inf
    assert mr.z_loss(x, coeff=0.5).item() == math.inf
    # The +inf rows padded: the finite loss of the others.
    m = torch.tensor([False, False, True, False, True])
    lo = mr.z_loss(x, coeff=0.5, padding_mask=m)
    assert_close_f32(lo, ref.z_loss(x.double(), coeff=0.5, padding_mask=m), rtol=2e-6)
    # NaN still wins.
    z[0, 0] = math.nan
    assert math.isnan(mr.z_loss(z.to(dtype)).item())
