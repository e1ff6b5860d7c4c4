"""permute / unpermute (and their gradients) against plain-PyTorch float64 references,
on a row layout built independently in the test (expert-major, padding rows, dropped
assignments)."""

from __future__ import annotations

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import FLOAT_DTYPES, assert_close_f32


def layout(t, k, e, *, seed, capacity, pad=True):
    """An expert-major padded layout written here from scratch: assignment (t, j) to
    expert e gets row e * capacity + (its rank among e's tokens) if that rank < capacity,
    else -1 (dropped). Returns row [t, k] int64, row_to_token [e * capacity] int64."""
    g = torch.Generator().manual_seed(seed)
    idx = (
        torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
        if t
        else torch.zeros(0, k, dtype=torch.long)
    )
    row = torch.full((t, k), -1, dtype=torch.long)
    r2t = torch.full((e * capacity,), -1, dtype=torch.long)
    fill = [0] * e
    for tok in range(t):
        for j in range(k):
            ex = int(idx[tok, j])
            if fill[ex] < capacity:
                r = ex * capacity + fill[ex]
                row[tok, j] = r
                r2t[r] = tok
                fill[ex] += 1
    return row, r2t


def ref_permute(x, r2t):
    out = torch.zeros((r2t.shape[0], x.shape[1]), dtype=x.dtype)
    valid = r2t >= 0
    out[valid] = x[r2t[valid]]
    return out


def ref_unpermute(y, row, w):
    """sum_j w[t, j] * y[row[t, j]] over kept j, differentiable in y and w."""
    kept = row >= 0
    gathered = y[row.clamp(min=0)]  # [T, k, H]
    return (gathered * (w * kept)[..., None]).sum(1)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("t,k,e,cap", [(0, 2, 4, 3), (1, 1, 2, 1), (33, 2, 8, 6), (64, 4, 16, 20)])
def test_permute_forward_is_an_exact_gather(dtype, t, k, e, cap):
    x = ref.randn((t, 24), seed=t, dtype=dtype)
    row, r2t = layout(t, k, e, seed=t, capacity=cap)
    buf = mr.permute(x, r2t, row)
    assert buf.dtype == dtype and buf.shape == (e * cap, 24)
    assert torch.equal(buf, ref_permute(x, r2t))
    assert torch.equal(mr.permute(x, r2t.int(), row.int()), buf)


@pytest.mark.parametrize("t,k,e,cap", [(33, 2, 8, 6), (50, 3, 6, 40)])
def test_permute_backward_matches_reference(t, k, e, cap):
    x = ref.randn((t, 16), seed=1).requires_grad_()
    row, r2t = layout(t, k, e, seed=2, capacity=cap)
    g = ref.randn((e * cap, 16), seed=3)
    (mr.permute(x, r2t, row) * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    (ref_permute(x64, r2t) * g.double()).sum().backward()
    assert_close_f32(x.grad, x64.grad)


@pytest.mark.parametrize("t,k,e,cap", [(0, 2, 4, 3), (33, 2, 8, 6), (40, 4, 8, 30)])
def test_unpermute_forward_and_backward_match_reference(t, k, e, cap):
    h = 20
    row, r2t = layout(t, k, e, seed=4, capacity=cap)
    y = ref.randn((e * cap, h), seed=5).requires_grad_()
    w = torch.rand((t, k), generator=torch.Generator().manual_seed(6)).requires_grad_()
    out = mr.unpermute(y, row, w)
    y64 = y.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    rout = ref_unpermute(y64, row, w64)
    assert out.dtype == torch.float32 and out.shape == (t, h)
    assert_close_f32(out, rout)
    g = ref.randn((t, h), seed=7)
    (out * g).sum().backward()
    (rout * g.double()).sum().backward()
    assert_close_f32(y.grad, y64.grad)
    assert_close_f32(w.grad, w64.grad, rtol=1e-5)
    if t:
        unused = torch.ones(e * cap, dtype=torch.bool)
        unused[row[row >= 0]] = False
        assert (y.grad[unused] == 0).all(), "rows no assignment points to get zero gradient"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_within_twice_torch_error(dtype):
    """f32 accumulation, one rounding: error vs f64 at most 2x that of the same
    computation done by PyTorch in the low precision dtype."""
    t, k, e, cap, h = 40, 4, 8, 25, 32
    row, r2t = layout(t, k, e, seed=8, capacity=cap)
    y = ref.randn((e * cap, h), seed=9, dtype=dtype).requires_grad_()
    w = torch.rand((t, k), generator=torch.Generator().manual_seed(10)).requires_grad_()
    out = mr.unpermute(y, row, w)
    assert out.dtype == dtype
    y64, w64 = y.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    rout = ref_unpermute(y64, row, w64)
    yt = y.detach().clone().requires_grad_()
    tout = ref_unpermute(yt, row, w.detach().to(dtype))
    err_op = (out.double() - rout).abs().max().item()
    err_torch = (tout.double() - rout).abs().max().item()
    assert err_op <= 2 * err_torch + 1e-6, (err_op, err_torch)
    g = ref.randn((t, h), seed=11, dtype=dtype)
    (out * g).sum().backward()
    (rout * g.double()).sum().backward()
    (tout * g).sum().backward()
    err_op = (y.grad.double() - y64.grad).abs().max().item()
    err_torch = (yt.grad.double() - y64.grad).abs().max().item()
    assert err_op <= 2 * err_torch + 1e-6, (err_op, err_torch)
    assert w.grad.dtype == torch.float32
    assert_close_f32(w.grad, w64.grad, rtol=1e-5, atol=1e-5 * h)  # dot products of exact bf16 values, f32 sums


def test_gradcheck_through_float64_wrapper():
    """gradcheck of the f64 -> f32 -> op -> f64 wrapper (the ops reject float64):
    unpermute is bilinear, so an f32-sized step gives an accurate numerical Jacobian."""
    t, k, e, cap = 5, 2, 4, 3
    row, r2t = layout(t, k, e, seed=12, capacity=cap)
    y = ref.randn((e * cap, 3), seed=13).double().requires_grad_()
    w = torch.rand((t, k), dtype=torch.float64).requires_grad_()
    x = ref.randn((t, 3), seed=14).double().requires_grad_()

    def f(y, w, x):
        return mr.unpermute(y.float(), row, w.float()).double() + mr.permute(x.float(), r2t, row).double().sum()

    assert torch.autograd.gradcheck(f, (y, w, x), eps=1e-3, atol=1e-3, rtol=1e-3)


def test_round_trip_sums_each_token_over_its_kept_assignments():
    t, k, e, cap = 30, 3, 6, 12
    row, r2t = layout(t, k, e, seed=15, capacity=cap)
    x = ref.randn((t, 8), seed=16)
    back = mr.unpermute(mr.permute(x, r2t, row), row, torch.ones(t, k))
    kept = (row >= 0).sum(1, keepdim=True).float()
    assert_close_f32(back, x * kept)


def test_permute_refuses_row_and_row_to_token_from_different_dispatches():
    # The forward reads row_to_token, the backward row: a pair that disagrees would give a
    # gradient that is not the forward's. CPU calls check them.
    idx = torch.tensor([[0, 1], [1, 0], [0, 1]])
    w = torch.full((3, 2), 0.5)
    d = mr.dispatch(idx, w, 2)
    x = torch.randn(3, 4)
    mr.permute(x, d.row_to_token, d.row)  # consistent: fine
    swapped = d.row[[1, 0, 2]]  # tokens 0 and 1 exchange their rows
    with pytest.raises(ValueError, match="same dispatch"):
        mr.permute(x, d.row_to_token, swapped)
    short = d.row.clone()
    short[0, 0] = -1  # one assignment less than row_to_token holds
    with pytest.raises(ValueError, match="same dispatch"):
        mr.permute(x, d.row_to_token, short)
