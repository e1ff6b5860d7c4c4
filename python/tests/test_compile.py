"""torch.compile(fullgraph=True) of routing steps on CPU: no graph break (fullgraph raises
on one), one graph, and the same loss and gradients as eager mode."""

from __future__ import annotations

import torch
import torch._dynamo

import moe_router as mr
import reference as ref


class _CountingBackend:
    """aot_eager (AOTAutograd through the fake kernels and autograd formulas, no codegen)
    that counts the graphs Dynamo hands it."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _inputs(t, h=16, e=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    router = (torch.randn(h, e, generator=g) * 0.5).requires_grad_()
    expert = (torch.randn(h, h, generator=g) / h**0.5).requires_grad_()
    return x.requires_grad_(), router, expert


def _run(fn, x, router, expert):
    x, router, expert = (a.detach().clone().requires_grad_() for a in (x, router, expert))
    loss = fn(x, router, expert)
    loss.backward()
    return loss.detach(), x.grad, router.grad, expert.grad


def _check_same(eager, compiled):
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def gating_and_losses(x, router, expert):
    logits = x @ router
    w, idx = mr.topk_gating(logits, 2, score_function="sigmoid", normalize=True, num_groups=4, group_topk=2)
    replay = mr.topk_gating_replay(logits, idx, score_function="sigmoid", normalize=True)
    mixed = (x @ expert) * (w.sum(-1, keepdim=True) + replay[:, :1])
    return (
        mixed.pow(2).mean()
        + mr.aux_loss(logits, 2, score_function="sigmoid", coeff=0.01)
        + mr.seq_aux_loss(logits, 2, 8, coeff=0.01)
        + mr.z_loss(logits, coeff=1e-3)
    )


def test_compile_gating_and_losses_fullgraph():
    torch._dynamo.reset()
    backend = _CountingBackend()
    compiled = torch.compile(gating_and_losses, backend=backend, fullgraph=True)
    args = _inputs(32)
    _check_same(_run(gating_and_losses, *args), _run(compiled, *args))
    assert backend.graphs == 1


def moe_step(x, router, expert, capacity=6):
    """Router + capacity dispatch + permute + one shared 'expert' + unpermute + losses."""
    logits = x @ router
    w, idx = mr.topk_gating(logits, 2, pre_softmax=True)
    d = mr.dispatch(idx, w, router.shape[1], capacity=capacity, drop_policy="probs", layout="compact")
    buf = mr.permute(x, d.row_to_token, d.row)
    y = torch.tanh(buf @ expert)
    out = mr.unpermute(y, d.row, d.kept_weights) + x
    return out.pow(2).mean() + mr.aux_loss(logits, 2, coeff=0.01) + mr.z_loss(logits, coeff=1e-3)


def test_compile_full_moe_step_fullgraph():
    torch._dynamo.reset()
    backend = _CountingBackend()
    compiled = torch.compile(moe_step, backend=backend, fullgraph=True)
    args = _inputs(40)
    _check_same(_run(moe_step, *args), _run(compiled, *args))
    assert backend.graphs == 1


def test_compile_full_moe_step_dynamic_shapes_inductor():
    """The default (inductor) backend with dynamic shapes: the fake kernels work with
    symbolic token counts, and a second batch size reuses the graph."""
    torch._dynamo.reset()
    compiled = torch.compile(moe_step, fullgraph=True, dynamic=True)
    for t in (24, 40):
        args = _inputs(t, seed=t)
        _check_same(_run(moe_step, *args), _run(compiled, *args))


def test_compile_gating_dynamic_shapes_backward():
    """Symbolic token counts through the fake kernels: two batch sizes, one graph."""
    torch._dynamo.reset()
    backend = _CountingBackend()

    def f(z):
        w, idx = mr.topk_gating(z, 2, pre_softmax=True, normalize=True)
        return (w * w).sum(), idx

    compiled = torch.compile(f, backend=backend, fullgraph=True, dynamic=True)
    graphs_after_first = None
    for t in (16, 23):
        z = ref.tie_free_logits(t, 8, seed=t)
        ze, zc = z.clone().requires_grad_(), z.clone().requires_grad_()
        le, ie = f(ze)
        lc, ic = compiled(zc)
        le.backward()
        lc.backward()
        assert torch.equal(ie, ic)
        torch.testing.assert_close(lc, le)
        torch.testing.assert_close(zc.grad, ze.grad)
        graphs_after_first = graphs_after_first or backend.graphs
    assert backend.graphs == graphs_after_first, "a second batch size must not recompile"
