"""moe_router.topk_gating / topk_gating_replay against the float64 reference in
reference.py (forward, gradients, f16/bf16), plus ties, NaN, noise, masking, replay."""

from __future__ import annotations

import math

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import FLOAT_DTYPES, assert_close_f32

# (name, topk_gating kwargs, E, k)
MODES = [
    ("softmax_post", dict(score_function="softmax"), 16, 2),
    ("softmax_pre", dict(score_function="softmax", pre_softmax=True), 16, 2),
    (
        "softmax_pre_norm_scaled",
        dict(score_function="softmax", pre_softmax=True, normalize=True, scaling_factor=2.5),
        32,
        4,
    ),
    ("sigmoid", dict(score_function="sigmoid"), 16, 1),
    ("sigmoid_norm_scaled", dict(score_function="sigmoid", normalize=True, scaling_factor=2.5), 32, 8),
    ("softmax_groups", dict(score_function="softmax", pre_softmax=True, num_groups=4, group_topk=2), 32, 4),
    ("sigmoid_groups", dict(score_function="sigmoid", normalize=True, num_groups=8, group_topk=4), 64, 8),
    ("topk_all", dict(score_function="softmax"), 8, 8),
]
IDS = [m[0] for m in MODES]


def _ref_kwargs(kw):
    return {k: v for k, v in kw.items() if k in ("score_function", "pre_softmax", "normalize", "num_groups",
                                                 "group_topk", "scaling_factor")}  # fmt: skip


def _weight_kwargs(kw):
    return {k: v for k, v in kw.items() if k in ("score_function", "pre_softmax", "normalize", "scaling_factor")}


@pytest.mark.parametrize("name,kw,e,k", MODES, ids=IDS)
@pytest.mark.parametrize("t", [0, 1, 37])
def test_forward_matches_f64_reference(name, kw, e, k, t):
    z = ref.tie_free_logits(t, e, seed=t * 31 + e)
    w, idx = mr.topk_gating(z, k, **kw)
    rw, ridx = ref.topk_gating(z, k, **_ref_kwargs(kw))
    assert w.dtype == torch.float32 and idx.dtype == torch.int64
    assert w.shape == (t, k) and idx.shape == (t, k)
    assert torch.equal(idx, ridx)
    assert_close_f32(w, rw)


@pytest.mark.parametrize("name,kw,e,k", MODES, ids=IDS)
def test_backward_matches_autograd_of_f64_reference(name, kw, e, k):
    t = 23
    z = ref.tie_free_logits(t, e, seed=7 + e).requires_grad_()
    g = ref.randn((t, k), seed=3)
    w, idx = mr.topk_gating(z, k, **kw)
    (w * g).sum().backward()
    z64 = z.detach().double().requires_grad_()
    (ref.gating_weights(z64, idx, **_weight_kwargs(kw)) * g.double()).sum().backward()
    assert_close_f32(z.grad, z64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name,kw,e,k", [MODES[1], MODES[4]], ids=[IDS[1], IDS[4]])
def test_half_precision_inputs(name, kw, e, k, dtype):
    """Weights (f32 outputs) are computed in f32 from the exact f16/bf16 inputs: f32
    tolerance against the f64 reference of the same (rounded) inputs. Gradients are
    rounded to the input dtype: their error must be within 2x that of PyTorch's own
    computation in that dtype (the flash-attention rule), measured against float64."""
    t = 29
    z = ref.tie_free_logits(t, e, seed=11, dtype=dtype).requires_grad_()
    w, idx = mr.topk_gating(z, k, **kw)
    rw, ridx = ref.topk_gating(z.detach(), k, **_ref_kwargs(kw))
    assert torch.equal(idx, ridx)
    assert_close_f32(w, rw)
    g = ref.randn((t, k), seed=5)
    (w * g).sum().backward()
    assert z.grad.dtype == dtype
    z64 = z.detach().double().requires_grad_()
    (ref.gating_weights(z64, idx, **_weight_kwargs(kw)) * g.double()).sum().backward()
    zt = z.detach().clone().requires_grad_()
    (ref.gating_weights(zt, idx, **_weight_kwargs(kw)).float() * g).sum().backward()
    err_op = (z.grad.double() - z64.grad).abs().max().item()
    err_torch = (zt.grad.double() - z64.grad).abs().max().item()
    assert err_op <= 2 * err_torch + 1e-6, (err_op, err_torch)


def test_gradcheck_through_float64_wrapper():
    """torch.autograd.gradcheck needs float64 inputs, which the op rejects (its math is
    f32). So gradcheck a wrapper that casts float64 -> float32 -> op -> float64: with the
    selection frozen (replay) and an f32-sized step (eps 1e-3), the numerical Jacobian
    of the wrapper is accurate to ~1e-4, which the tolerances reflect."""
    t, e, k = 5, 8, 3
    z = ref.tie_free_logits(t, e, seed=2).double().requires_grad_()
    _, idx = mr.topk_gating(z.detach().float(), k, pre_softmax=True)
    for kw in (dict(pre_softmax=True, normalize=True), dict(), dict(score_function="sigmoid", scaling_factor=2.0)):

        def f(x):
            return mr.topk_gating_replay(x.float(), idx, **kw).double()

        assert torch.autograd.gradcheck(f, (z,), eps=1e-3, atol=2e-4, rtol=1e-3)


@pytest.mark.parametrize("name,kw,e,k", MODES, ids=IDS)
def test_replay_reproduces_gating_weights_bitwise(name, kw, e, k):
    z = ref.tie_free_logits(19, e, seed=4)
    w, idx = mr.topk_gating(z, k, **kw)
    rw = mr.topk_gating_replay(z, idx, **_weight_kwargs(kw))
    assert torch.equal(w, rw)
    rw32 = mr.topk_gating_replay(z, idx.int(), **_weight_kwargs(kw))
    assert torch.equal(w, rw32)


def test_replay_of_arbitrary_indices_and_its_gradient():
    t, e = 6, 10
    z = ref.randn((t, e), seed=9).requires_grad_()
    idx = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(i))[:3] for i in range(t)])
    w = mr.topk_gating_replay(z, idx, pre_softmax=True, normalize=True)
    z64 = z.detach().double().requires_grad_()
    rw = ref.gating_weights(z64, idx, pre_softmax=True, normalize=True)
    assert_close_f32(w, rw)
    g = ref.randn((t, 3), seed=1)
    (w * g).sum().backward()
    (rw * g.double()).sum().backward()
    assert_close_f32(z.grad, z64.grad, rtol=1e-5, atol=1e-6)


def test_ties_rank_lower_expert_index_first():
    z = torch.zeros(3, 6)
    z[1, [1, 4]] = 2.0  # tie between experts 1 and 4 at the top
    w, idx = mr.topk_gating(z, 3, pre_softmax=True)
    assert idx[0].tolist() == [0, 1, 2]
    assert idx[1].tolist() == [1, 4, 0]
    assert torch.allclose(w[0], torch.full((3,), 1 / 6))


def test_nan_logit_ranks_below_every_score():
    z = torch.tensor([[math.nan, 0.0, -math.inf, 1.0], [math.nan, math.nan, math.nan, math.nan]])
    _, idx = mr.topk_gating(z, 3)
    assert idx[0].tolist() == [3, 1, 2]  # NaN below -inf
    assert sorted(idx[1].tolist()) == [0, 1, 2] and idx[1].tolist() == [0, 1, 2]  # all NaN: lower index first


def test_expert_bias_changes_selection_not_weights():
    t, e, k = 12, 8, 2
    z = ref.tie_free_logits(t, e, seed=5, spread=0.05).requires_grad_()
    bias = torch.zeros(e)
    bias[7] = 10.0  # expert 7 always selected first
    w, idx = mr.topk_gating(z, k, score_function="sigmoid", expert_bias=bias)
    assert (idx[:, 0] == 7).all()
    rw, ridx = ref.topk_gating(z.detach(), k, score_function="sigmoid", bias=bias)
    assert torch.equal(idx, ridx)
    assert_close_f32(w, rw)
    assert torch.equal(w, mr.topk_gating_replay(z, idx, score_function="sigmoid"))
    bias_p = torch.nn.Parameter(bias.clone())
    w2, _ = mr.topk_gating(z, k, score_function="sigmoid", expert_bias=bias_p)
    w2.sum().backward()
    assert bias_p.grad is None  # the bias never gets a gradient


def test_selection_noise_is_deterministic_and_leaves_weights_noise_free():
    t, e, k = 64, 16, 2
    z = ref.tie_free_logits(t, e, seed=8, spread=0.01)
    w0, i0 = mr.topk_gating(z, k, pre_softmax=True)
    w1, i1 = mr.topk_gating(z, k, pre_softmax=True, noise_std=1.0, seed=3, offset=1)
    w2, i2 = mr.topk_gating(z, k, pre_softmax=True, noise_std=1.0, seed=3, offset=1)
    w3, i3 = mr.topk_gating(z, k, pre_softmax=True, noise_std=1.0, seed=3, offset=2)
    assert torch.equal(i1, i2) and torch.equal(w1, w2)
    assert not torch.equal(i1, i0), "noise of std 1 on scores 0.01 apart must change the selection"
    assert not torch.equal(i1, i3), "another offset gives another draw"
    assert torch.equal(w1, mr.topk_gating_replay(z, i1, pre_softmax=True))
    wz, iz = mr.topk_gating(z, k, pre_softmax=True, noise_std=0.0, seed=3, offset=1)
    assert torch.equal(iz, i0) and torch.equal(wz, w0)


def test_expert_masking_matches_expert_mask_and_philox_reference():
    t, e, k, rate, seed, offset = 40, 12, 3, 0.5, 2**63 + 5, 17
    z = ref.tie_free_logits(t, e, seed=1)
    w, idx = mr.topk_gating(z, k, pre_softmax=True, expert_mask_rate=rate, seed=seed, offset=offset)
    masked = mr.expert_mask(t, e, k, rate, seed=seed, offset=offset)
    assert torch.equal(masked, ref.expert_mask(t, e, k, rate, seed, offset))
    assert not masked.gather(1, idx).any(), "a masked candidate was selected"
    rw, ridx = ref.topk_gating(z, k, pre_softmax=True, masked=masked)
    assert torch.equal(idx, ridx)
    assert_close_f32(w, rw)  # weights over all E (pre_softmax), masking only changes selection


def test_zero_tokens_and_gradient_shapes():
    z = torch.zeros(0, 8, requires_grad=True)
    w, idx = mr.topk_gating(z, 2)
    assert w.shape == (0, 2) and idx.shape == (0, 2)
    w.sum().backward()
    assert z.grad.shape == (0, 8)


def test_no_grad_saves_nothing_and_works():
    z = ref.randn((4, 8), seed=0)
    with torch.no_grad():
        w, _ = mr.topk_gating(z.requires_grad_(), 2)
    assert not w.requires_grad


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gradient_dtype_follows_logits(dtype):
    z = ref.randn((5, 8), seed=1, dtype=dtype).requires_grad_()
    w, _ = mr.topk_gating(z, 2, normalize=True)
    w.sum().backward()
    assert z.grad.dtype == dtype and z.grad.shape == z.shape
