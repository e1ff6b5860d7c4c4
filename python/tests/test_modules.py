"""Tests of the nn.Modules (TopKRouter, ExpertMLPs, MoELayer) against naive references
written here (float64, loops over tokens), independent of the modules' code paths."""

import copy
import math
import shutil

import pytest
import torch

import moe_router
from moe_router.modules import (
    ExpertMLPs,
    MoELayer,
    RouterOutput,
    TopKRouter,
    attach_aux_loss,
    grouped_mlp,
    update_router_biases,
)

H, E, K = 16, 8, 2

# The modules need these core ops; every one must be in the native build (a missing one
# is a failure, not a skip).
_NEEDED_OPS = (
    "topk_gating", "topk_gating_replay", "aux_loss", "seq_aux_loss", "z_loss", "assignment_dropout",
    "update_expert_bias", "router_stats", "dispatch_max_rows", "dispatch", "permute", "unpermute",
)  # fmt: skip


def needs_ops(fn):
    """Marks the tests that run the modules on the native ops (kept for readability)."""
    return fn


def test_native_build_has_every_op_the_modules_need():
    missing = [n for n in _NEEDED_OPS if not moe_router.ops.native_has(n)]
    assert not missing, f"moe_router._native lacks {missing}; rebuild the extension (scripts/setup_python.sh)"


def _x(*shape, seed=0, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)
    return x.requires_grad_(requires_grad)


def _spread_gate(router, seed=1, std=1.0):
    """Give the gate a larger init so routing is far from ties (float64-stable order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.gate.weight.copy_(torch.randn(router.gate.weight.shape, generator=g) * std)
    return router


# ---------------------------------------------------------------------------------------
# Naive references (float64)
# ---------------------------------------------------------------------------------------


def ref_weights(logits64, idx, score_function, pre_softmax, normalize, scaling):
    """Weights of the given selected experts, per token, from the formulas of docs/semantics.md §2."""
    T, k = idx.shape
    w = torch.zeros(T, k, dtype=torch.float64)
    for t in range(T):
        z = logits64[t]
        sel = [int(e) for e in idx[t]]
        if score_function == "softmax" and pre_softmax:
            p = torch.exp(z - z.max())
            p = p / p.sum()
            row = torch.stack([p[e] for e in sel])
        elif score_function == "softmax":
            zs = torch.stack([z[e] for e in sel])
            row = torch.exp(zs - zs.max())
            row = row / row.sum()
        else:
            row = torch.stack([1.0 / (1.0 + torch.exp(-z[e])) for e in sel])
        if normalize:
            row = row / (row.sum() + 1e-20)
        w[t] = row * scaling
    return w


def ref_selection(logits64, k, score_function, pre_softmax, bias=None):
    """Top-k by the selection score (no groups, no noise)."""
    if score_function == "sigmoid":
        q = torch.sigmoid(logits64)
    elif pre_softmax:
        q = torch.softmax(logits64, -1)
    else:
        q = logits64.clone()
    if bias is not None:
        q = q + bias.double()
    return torch.sort(q, dim=-1, descending=True, stable=True).indices[:, :k]


def ref_kept(indices, weights, capacity, policy):
    """keep[t][j] for each assignment, from the drop policy (lower key kept first)."""
    T, k = indices.shape
    keep = [[False] * k for _ in range(T)]
    per = {}
    for t in range(T):
        for j in range(k):
            e = int(indices[t, j])
            if e < 0:
                continue
            if policy == "position":
                key = (t,)
            elif policy == "probs":
                key = (-float(weights[t, j]), t)
            elif policy == "choice_then_position":
                key = (j, t)
            else:
                raise AssertionError(policy)
            per.setdefault(e, []).append((key, t, j))
    for lst in per.values():
        lst.sort()
        for _, t, j in lst if capacity is None else lst[:capacity]:
            keep[t][j] = True
    return keep


def ref_mlp(xt, w1, w2, activation):
    h = xt @ w1
    if activation == "swiglu":
        a, b = h.chunk(2, -1)
        h = a * torch.sigmoid(a) * b
    else:
        h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return h @ w2


def ref_moe(x64, gate64, w1, w2, indices, keep, router, activation):
    """out[t] = Σ_{kept j} w[t,j] · mlp_{i[t,j]}(x[t]) with weights recomputed in float64."""
    logits = x64 @ gate64.T
    idx = indices.clamp(min=0)
    w = ref_weights(
        logits, idx, router.score_function, router.pre_softmax, router.normalize, router.topk_scaling_factor
    )
    rows = []
    for t in range(x64.shape[0]):
        acc = torch.zeros(x64.shape[1], dtype=torch.float64)
        for j in range(indices.shape[1]):
            if keep[t][j]:
                e = int(indices[t, j])
                acc = acc + w[t, j] * ref_mlp(x64[t], w1[e], w2[e], activation)
        rows.append(acc)
    return torch.stack(rows)


# ---------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "score_function,pre_softmax,topk,scaling",
    [("softmax", False, 2, 1.0), ("softmax", True, 2, 2.5), ("sigmoid", False, 2, 1.0), ("sigmoid", False, 1, 1.0)],
)
@needs_ops
def test_router_weights_and_indices_match_reference(score_function, pre_softmax, topk, scaling):
    r = _spread_gate(
        TopKRouter(H, E, topk, score_function=score_function, pre_softmax=pre_softmax, topk_scaling_factor=scaling)
    )
    x = _x(3, 5, H)
    out = r(x)
    assert isinstance(out, RouterOutput)
    T = 15
    assert out.weights.shape == (T, topk) and out.weights.dtype == torch.float32
    assert out.indices.shape == (T, topk) and out.indices.dtype == torch.int64
    assert out.logits.shape == (T, E) and out.logits.dtype == torch.float32
    logits64 = x.reshape(T, H).double() @ r.gate.weight.double().T
    torch.testing.assert_close(out.logits.double(), logits64, rtol=1e-5, atol=1e-5)
    want_idx = ref_selection(logits64, topk, score_function, pre_softmax)
    assert torch.equal(out.indices, want_idx)
    # Megatron's default: sigmoid with k > 1 renormalises, nothing else does.
    assert r.normalize == (score_function == "sigmoid" and topk > 1)
    want_w = ref_weights(logits64, want_idx, score_function, pre_softmax, r.normalize, scaling)
    torch.testing.assert_close(out.weights.double(), want_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(out.tokens_per_expert, torch.bincount(want_idx.reshape(-1), minlength=E))


@needs_ops
def test_router_forward_backward_shapes_and_fp32_gate():
    r = TopKRouter(H, E, K, aux_loss_coeff=1e-2, z_loss_coeff=1e-3).to(torch.bfloat16)
    assert r.gate.weight.dtype == torch.float32, "the gate must stay float32 after .to(bfloat16)"
    x = _x(2, 7, H, dtype=torch.bfloat16, requires_grad=True)
    out = r(x)
    assert out.logits.dtype == torch.float32 and out.weights.dtype == torch.float32
    assert out.aux_loss.shape == () and out.z_loss.shape == ()
    assert out.aux_loss.item() > 0 and out.z_loss.item() > 0
    assert out.stats is not None and out.stats.selected_counts.shape == (E,)
    (out.weights * torch.arange(K, dtype=torch.float32)).sum().backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.dtype == torch.float32
    assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == torch.bfloat16


@needs_ops
def test_router_losses_match_formulas():
    r = _spread_gate(TopKRouter(H, E, K, aux_loss_coeff=0.3, z_loss_coeff=0.02, loss_mode="return"), std=0.3)
    x = _x(40, H, seed=3)
    out = r(x)
    z = x.double() @ r.gate.weight.double().T
    T = z.shape[0]
    p = torch.softmax(z, -1)
    counts = torch.bincount(p.topk(K, -1).indices.reshape(-1), minlength=E).double()
    aux = 0.3 * E / (K * T * T) * (counts * p.sum(0)).sum()
    zl = 0.02 * (torch.logsumexp(z, -1) ** 2).mean()
    torch.testing.assert_close(out.aux_loss.double(), aux, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out.z_loss.double(), zl, rtol=1e-5, atol=1e-7)
    assert out.aux_loss.requires_grad and out.z_loss.requires_grad


@needs_ops
def test_seq_aux_loss_batch_first_equals_sequence_first():
    kw = dict(load_balancing_type="seq_aux_loss", aux_loss_coeff=1.0, loss_mode="return")
    a = _spread_gate(TopKRouter(H, E, K, **kw))
    b = copy.deepcopy(a)
    b.sequence_first = True
    x = _x(3, 10, H, seed=4)  # [B, S, H]
    la = a(x).aux_loss
    lb = b(x.transpose(0, 1).contiguous()).aux_loss  # [S, B, H]
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=1e-7)
    # ...and it is the mean of per-sequence Switch losses.
    z = x.double() @ a.gate.weight.double().T
    per = []
    for s in range(3):
        p = torch.softmax(z[s], -1)
        c = torch.bincount(p.topk(K, -1).indices.reshape(-1), minlength=E).double()
        per.append(E / (K * 10 * 10) * (c * p.sum(0)).sum())
    torch.testing.assert_close(la.double(), torch.stack(per).mean(), rtol=1e-5, atol=1e-7)


@needs_ops
def test_frozen_router_gets_no_gradient():
    layer = MoELayer(H, 32, E, K, aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
    layer.router.freeze()
    x = _x(12, H, requires_grad=True)
    out, r = layer(x)
    out.square().sum().backward()
    assert layer.router.gate.weight.grad is None
    assert not layer.router.gate.weight.requires_grad
    assert not r.logits.requires_grad and not r.aux_loss.requires_grad
    assert layer.experts.w1.grad is not None and x.grad is not None
    # same routing as unfrozen
    layer.router.unfreeze()
    out2, r2 = layer(x)
    assert torch.equal(r2.indices, r.indices)
    torch.testing.assert_close(out2, out)
    frozen = TopKRouter(H, E, K, frozen=True)
    assert frozen.frozen and not frozen.gate.weight.requires_grad


@needs_ops
def test_replay_reproduces_outputs_and_gradients():
    torch.manual_seed(0)
    layer = MoELayer(H, 32, E, K, noise_std=2.0, aux_loss_coeff=1e-2, record=True)
    x = _x(4, 6, H, seed=5, requires_grad=True)
    out1, r1 = layer(x)
    out1.square().sum().backward()
    g_gate1, g_x1 = layer.router.gate.weight.grad.clone(), x.grad.clone()
    rec = layer.router.pop_recorded()
    assert len(rec) == 1 and rec[0].shape == (4, 6, K) and layer.router.recorded_indices == []

    layer.zero_grad()
    x.grad = None
    out_new, _ = layer(x, record=False)  # a fresh step draws different noise
    assert not torch.equal(out_new, out1), "noise should change the routing (test precondition)"
    layer.zero_grad()
    x.grad = None
    out2, r2 = layer(x, replay_indices=rec[0], record=False)
    assert torch.equal(r2.indices, r1.indices)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    out2.square().sum().backward()
    torch.testing.assert_close(layer.router.gate.weight.grad, g_gate1, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x.grad, g_x1, rtol=1e-6, atol=1e-7)
    # int32 replay indices work too
    out3, _ = layer(x, replay_indices=rec[0].to(torch.int32))
    torch.testing.assert_close(out3, out1, rtol=0, atol=0)


@pytest.mark.parametrize("load_balancing_type", ["aux_loss", "seq_aux_loss", "global_aux_loss"])
@needs_ops
def test_attach_mode_gradient_equals_adding_the_loss(load_balancing_type):
    kw = dict(aux_loss_coeff=0.5, z_loss_coeff=0.1, load_balancing_type=load_balancing_type)
    attach = MoELayer(H, 24, E, K, loss_mode="attach", **kw)
    _spread_gate(attach.router, std=0.3)
    ret = MoELayer(H, 24, E, K, loss_mode="return", **kw)
    ret.load_state_dict(attach.state_dict())
    xa = _x(2, 9, H, seed=6, requires_grad=True)
    xr = xa.detach().clone().requires_grad_(True)

    oa, ra = attach(xa)
    or_, rr = ret(xr)
    torch.testing.assert_close(oa, or_, rtol=0, atol=0)  # forward values unchanged
    assert not ra.aux_loss.requires_grad and not ra.z_loss.requires_grad
    torch.testing.assert_close(ra.aux_loss, rr.aux_loss.detach())
    oa.square().mean().backward()
    (or_.square().mean() + rr.aux_loss + rr.z_loss).backward()
    torch.testing.assert_close(attach.router.gate.weight.grad, ret.router.gate.weight.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(xa.grad, xr.grad, rtol=1e-5, atol=1e-8)
    # the loss gradient is really in there
    assert not torch.allclose(
        attach.router.gate.weight.grad, _grad_without_loss(ret, xr.detach()), rtol=1e-3, atol=1e-8
    )


def _grad_without_loss(layer, x):
    layer = copy.deepcopy(layer)
    layer.zero_grad()
    out, _ = layer(x)
    out.square().mean().backward()
    return layer.router.gate.weight.grad


def test_attach_aux_loss_scale():
    w = torch.ones(3, requires_grad=True)
    loss_src = torch.tensor(2.0, requires_grad=True)
    out = attach_aux_loss(w, loss_src * 3.0, scale=0.25)
    assert torch.equal(out, w)
    out.sum().backward()
    assert loss_src.grad.item() == pytest.approx(0.75)
    assert torch.equal(w.grad, torch.ones(3))


@needs_ops
def test_bias_update_moves_toward_balance():
    r = TopKRouter(H, E, K, enable_expert_bias=True, bias_update_rate=0.05, compute_stats=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a constant input feature favours experts 0 and 1
        r.gate.weight.copy_(torch.randn(E, H, generator=g) * 0.3)
        r.gate.weight[0, 0] = 1.0
        r.gate.weight[1, 0] = 0.8
    x = _x(256, H, seed=7)
    x[:, 0] = 3.0
    r.train()
    first = r(x)
    counts0 = first.tokens_per_expert.clone()
    assert counts0[0] > 128 and counts0[1] > 128, "test precondition: experts 0 and 1 overloaded"
    assert torch.equal(r.local_tokens_per_expert, counts0)
    r.update_bias()
    assert torch.equal(r.local_tokens_per_expert, torch.zeros(E, dtype=torch.int64))
    mean = counts0.double().mean()
    want = 0.05 * torch.sign(mean - counts0.double())
    torch.testing.assert_close(r.expert_bias.double(), want, rtol=0, atol=1e-7)
    assert r.expert_bias[0] < 0 and r.expert_bias[1] < 0
    maxvio0 = first.stats.max_violation
    for _ in range(100):
        r(x)
        r.update_bias()
    last = r(x)
    assert float(maxvio0) > 1.0
    assert float(last.stats.max_violation) < 0.25, (maxvio0, last.stats.max_violation)
    # the bias changes the selection only, never the weights
    r.eval()
    logits = last.logits.detach().double()
    want_w = ref_weights(logits, last.indices, "softmax", False, False, 1.0)
    torch.testing.assert_close(last.weights.double(), want_w, rtol=1e-5, atol=1e-6)
    assert torch.equal(last.indices, ref_selection(logits, K, "softmax", False, r.expert_bias))
    # eval forwards do not count
    r.local_tokens_per_expert.zero_()
    r(x)
    assert r.local_tokens_per_expert.sum() == 0
    assert update_router_biases(torch.nn.Sequential(r, TopKRouter(H, E, K))) == 1


@needs_ops
def test_padding_tokens_are_not_routed():
    layer = MoELayer(H, 16, E, K, aux_loss_coeff=1.0, z_loss_coeff=1.0, loss_mode="return")
    x = _x(2, 5, H, seed=8)
    pad = torch.zeros(2, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[1, 4] = True
    out, r = layer(x, padding_mask=pad)
    assert torch.all(out[pad] == 0)
    assert torch.all(r.indices[pad.reshape(-1)] == -1)
    assert r.tokens_per_expert.sum() == K * int((~pad).sum())
    # losses only see the valid tokens
    _, r_valid = layer(x[~pad])
    torch.testing.assert_close(r.aux_loss, r_valid.aux_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(r.z_loss, r_valid.z_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[~pad], layer(x[~pad])[0], rtol=1e-5, atol=1e-6)


@needs_ops
def test_eval_mode_is_deterministic_and_training_randomness_is_seeded():
    kw = dict(noise_std=1.0, expert_mask_rate=0.2, expert_dropout=0.2, input_jitter_eps=0.1, seed=11)
    a = MoELayer(H, 16, E, K, capacity_factor=1.0, token_drop_policy="random", **kw)
    b = copy.deepcopy(a)
    x = _x(32, H, seed=9)
    a.eval()
    e1, r1 = a(x)
    e2, r2 = a(x)
    assert torch.equal(e1, e2) and torch.equal(r1.indices, r2.indices)
    assert a.router.rng_step == 0
    assert torch.all(r1.indices >= 0), "no dropout in eval"
    a.train()
    b.train()
    t1 = [a(x)[0] for _ in range(3)]
    t2 = [b(x)[0] for _ in range(3)]
    assert a.router.rng_step == 3
    for u, v in zip(t1, t2):  # same seed, same step -> same bits
        assert torch.equal(u, v)
    assert not torch.equal(t1[0], t1[1]), "training randomness must change from step to step"
    assert not torch.equal(t1[0], e1)


@needs_ops
def test_constructor_errors_name_the_argument():
    cases = [
        (dict(topk=0), "topk"),
        (dict(topk=E + 1), "topk"),
        (dict(score_function="relu"), "score_function"),
        (dict(score_function="sigmoid", pre_softmax=True), "pre_softmax"),
        (dict(num_groups=3, group_topk=1), "num_groups"),
        (dict(num_groups=4, group_topk=5), "group_topk"),
        (dict(num_groups=4), "group_topk"),
        (dict(num_groups=8, group_topk=1), "group_topk"),  # 1 expert per group cannot reach k=2
        (dict(capacity_factor=0.0), "capacity_factor"),
        (dict(capacity_factor=float("nan")), "capacity_factor"),
        (dict(token_drop_policy="lifo"), "token_drop_policy"),
        (dict(load_balancing_type="sinkhorn"), "load_balancing_type"),
        (dict(pad_expert_input_to_capacity=True), "pad_expert_input_to_capacity"),
        (dict(expert_dropout=1.0), "expert_dropout"),
        (dict(expert_mask_rate=-0.1), "expert_mask_rate"),
        (dict(noise_std=-1.0), "noise_std"),
        (dict(loss_mode="add"), "loss_mode"),
        (dict(dropless_align=0), "dropless_align"),
        (dict(dropless_align=4, capacity_factor=1.0), "dropless_align"),
    ]
    for kw, arg in cases:
        kw = dict(kw)
        topk = kw.pop("topk", K)
        with pytest.raises(ValueError, match=rf"^moe_router\.TopKRouter: invalid `{arg}` = "):
            TopKRouter(H, E, topk, **kw)
    r = TopKRouter(H, E, K)
    with pytest.raises(ValueError, match=r"^moe_router\.TopKRouter: `hidden_states` .* hidden_size"):
        r(torch.randn(3, H + 1))
    with pytest.raises(TypeError, match=r"^moe_router\.TopKRouter: `hidden_states` has dtype torch.float64"):
        r(torch.randn(3, H, dtype=torch.float64))
    layer = MoELayer(H, 8, E, K)
    with pytest.raises(ValueError, match=r"^moe_router\.MoELayer: `hidden_states` .* hidden_size"):
        layer(torch.randn(3, H + 1))
    with pytest.raises(TypeError, match=r"^moe_router\.MoELayer: `hidden_states` has dtype torch.float64"):
        layer(torch.randn(3, H, dtype=torch.float64))
    with pytest.raises(ValueError, match="replay_indices"):
        r(torch.randn(3, H), replay_indices=torch.zeros(3, K + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="padding_mask"):
        r(torch.randn(3, H), padding_mask=torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="activation"):
        ExpertMLPs(E, H, 8, activation="relu")


# ---------------------------------------------------------------------------------------
# Experts and MoE layer
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_mlp_gradcheck(activation):
    g = torch.Generator().manual_seed(0)
    h, f, e = 3, 4, 3
    f1 = 2 * f if activation == "swiglu" else f
    buf = torch.randn(9, h, generator=g, dtype=torch.float64, requires_grad=True)
    w1 = torch.randn(e, h, f1, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(e, f, h, generator=g, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([0, 3, 3, 7])  # expert 1 empty, rows 7..8 are a tail (output 0)
    y = grouped_mlp(buf, offs, w1, w2, activation)
    assert torch.all(y[7:] == 0)
    for ex, (a, b) in enumerate([(0, 3), (3, 3), (3, 7)]):
        torch.testing.assert_close(y[a:b], ref_mlp(buf[a:b], w1[ex], w2[ex], activation))
    assert torch.autograd.gradcheck(lambda b_, w1_, w2_: grouped_mlp(b_, offs, w1_, w2_, activation), (buf, w1, w2))
    # the custom op's schema, fake kernel and autograd registration are consistent
    torch.library.opcheck(torch.ops.moe_router_nn.grouped_mlp.default, (buf, offs, w1, w2, activation))
    torch.library.opcheck(
        torch.ops.moe_router_nn.grouped_mlp.default,
        (buf.detach().float(), offs.to(torch.int32), w1.detach().float(), w2.detach().float(), activation),
    )


LAYOUTS = [
    # (router kwargs, drop policy used by the reference)
    (dict(), None),  # dropless, compact rows
    (dict(dropless_align=4), None),  # dropless, segments padded to 4 rows
    (dict(capacity_factor=0.5, token_drop_policy="position"), "position"),  # compact with drops
    (dict(capacity_factor=0.75, token_drop_policy="probs"), "probs"),
    (dict(capacity_factor=0.5, token_drop_policy="choice_then_position"), "choice_then_position"),
    (dict(capacity_factor=0.6, token_drop_policy="probs", pad_expert_input_to_capacity=True), "probs"),  # bmm
    (dict(capacity_factor=4.0, pad_expert_input_to_capacity=True), "probs"),  # padding rows, no drops
]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("layout", range(len(LAYOUTS)), ids=lambda i: str(LAYOUTS[i][0]) or "dropless")
@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@needs_ops
def test_moe_layer_matches_dense_per_token_reference(layout, activation, score_function):
    kw, policy = LAYOUTS[layout]
    torch.manual_seed(layout)
    layer = MoELayer(H, 12, E, K, activation=activation, score_function=score_function, **kw)
    _spread_gate(layer.router, seed=layout)
    x = _x(3, 8, H, seed=10 + layout, requires_grad=True)
    out, r = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    T = 24
    cap = r.capacity
    if kw.get("capacity_factor") is not None:
        assert cap == math.ceil(T * K / E * kw["capacity_factor"])
    keep = ref_kept(r.indices, r.weights.detach(), cap, policy or "position")
    if cap is not None and cap < T * K // E:
        assert any(not kj for row in keep for kj in row), "test precondition: some assignments dropped"
    x64 = x.detach().double().reshape(T, H).requires_grad_(True)
    gate64 = layer.router.gate.weight.detach().double().requires_grad_(True)
    w1 = layer.experts.w1.detach().double().requires_grad_(True)
    w2 = layer.experts.w2.detach().double().requires_grad_(True)
    want = ref_moe(x64, gate64, w1, w2, r.indices, keep, layer.router, activation)
    torch.testing.assert_close(out.reshape(T, H).double(), want, rtol=1e-4, atol=1e-5)
    # kept counts and dropped count agree with the reference
    kept_counts = torch.zeros(E, dtype=torch.int64)
    for t in range(T):
        for j in range(K):
            if keep[t][j]:
                kept_counts[int(r.indices[t, j])] += 1
    assert torch.equal(r.dispatch.tokens_per_expert.to(torch.int64), kept_counts)
    assert int(r.dispatch.dropped) == T * K - int(kept_counts.sum())
    assert torch.equal(r.stats.kept_counts.to(torch.int64), kept_counts)
    # gradients w.r.t. input, gate and experts
    gy = _x(T, H, seed=99)
    (out.reshape(T, H) * gy).sum().backward()
    (want * gy.double()).sum().backward()
    torch.testing.assert_close(x.grad.reshape(T, H).double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.router.gate.weight.grad.double(), gate64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.w1.grad.double(), w1.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.experts.w2.grad.double(), w2.grad, rtol=1e-4, atol=1e-5)


@needs_ops
def test_moe_layer_bf16_input():
    layer = MoELayer(H, 16, E, K, aux_loss_coeff=1e-2).to(torch.bfloat16)
    assert layer.router.gate.weight.dtype == torch.float32
    assert layer.experts.w1.dtype == torch.bfloat16
    x = _x(10, H, dtype=torch.bfloat16, requires_grad=True)
    out, r = layer(x)
    assert out.dtype == torch.bfloat16 and r.weights.dtype == torch.float32
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.experts.w1.grad.dtype == torch.bfloat16
    assert layer.router.gate.weight.grad.dtype == torch.float32


@pytest.mark.parametrize(
    "kw", [dict(), dict(capacity_factor=1.0), dict(capacity_factor=1.0, pad_expert_input_to_capacity=True)]
)
@needs_ops
def test_empty_batch(kw):
    layer = MoELayer(H, 8, E, K, aux_loss_coeff=1e-2, z_loss_coeff=1e-3, **kw)
    x = torch.zeros(0, H, requires_grad=True)
    out, r = layer(x)
    assert out.shape == (0, H) and r.indices.shape == (0, K)
    assert r.aux_loss.item() == 0.0 and r.z_loss.item() == 0.0
    out.sum().backward()
    assert x.grad.shape == (0, H)


@needs_ops
def test_group_limited_routing_stays_in_groups():
    r = _spread_gate(TopKRouter(H, E, 4, num_groups=4, group_topk=2, score_function="sigmoid"))
    out = r(_x(20, H, seed=12))
    groups = out.indices // (E // 4)
    for t in range(20):
        assert len(set(groups[t].tolist())) <= 2


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------


def _compile_available():
    try:
        import torch._dynamo  # noqa: F401
    except Exception as exc:  # pragma: no cover
        return False, f"torch._dynamo unavailable: {exc}"
    return True, ""


@pytest.mark.parametrize(
    "kw",
    [
        dict(capacity_factor=1.0, pad_expert_input_to_capacity=True),
        dict(),
        dict(capacity_factor=0.75, token_drop_policy="position"),
    ],
    ids=["pad_to_capacity", "dropless", "compact"],
)
@needs_ops
def test_compile_fullgraph_training_step(kw):
    ok, why = _compile_available()
    if not ok:
        pytest.skip(f"SKIPPED LOUDLY: torch.compile is not available here ({why})")
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = MoELayer(
        H, 16, E, K, aux_loss_coeff=1e-2, z_loss_coeff=1e-3, enable_expert_bias=True, compute_stats=True, **kw
    )
    comp = copy.deepcopy(eager)

    def step(layer, x):
        out, r = layer(x)
        return out.square().mean(), r.aux_loss, r.z_loss, r.tokens_per_expert

    # aot_eager needs no C++ toolchain and still proves the whole step is one graph;
    # inductor is used when a compiler is present.
    backend = "inductor" if shutil.which("cc") or shutil.which("gcc") or shutil.which("g++") else "aot_eager"
    cstep = torch.compile(step, fullgraph=True, backend=backend)
    for i in range(2):
        x = _x(4, 6, H, seed=20 + i)
        le, ae, ze, ce = step(eager, x)
        # the second step must reuse the first step's graph (no recompilation)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            lc, ac, zc, cc = cstep(comp, x)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ac, ae, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(zc, ze, rtol=1e-5, atol=1e-7)
        assert torch.equal(cc, ce)
        le.backward()
        lc.backward()
        for (n, pe), (_, pc) in zip(eager.named_parameters(), comp.named_parameters()):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        assert torch.equal(comp.router.local_tokens_per_expert, eager.router.local_tokens_per_expert)
        eager.router.update_bias()
        comp.router.update_bias()
        eager.zero_grad()
        comp.zero_grad()


@needs_ops
def test_compile_training_randomness_without_recompiling():
    ok, why = _compile_available()
    if not ok:
        pytest.skip(f"SKIPPED LOUDLY: torch.compile is not available here ({why})")
    torch._dynamo.reset()
    torch.manual_seed(0)
    kw = dict(noise_std=1.0, expert_mask_rate=0.1, expert_dropout=0.1, input_jitter_eps=0.05, seed=5)
    eager = MoELayer(H, 16, E, K, aux_loss_coeff=1e-2, **kw)
    comp = copy.deepcopy(eager)
    x = _x(12, H, seed=30)
    with torch._dynamo.config.patch(allow_unspec_int_on_nn_module=True):
        cmod = torch.compile(comp, fullgraph=True, backend="aot_eager")
        for step in range(4):
            # rng_step 0 and 1 may compile twice (specialised, then dynamic); never again
            with torch._dynamo.config.patch(error_on_recompile=step >= 2):
                oc, rc = cmod(x)
            oe, re_ = eager(x)
            assert torch.equal(rc.indices, re_.indices), f"step {step}"
            torch.testing.assert_close(oc, oe, rtol=1e-5, atol=1e-6)
    assert comp.router.rng_step == eager.router.rng_step == 4


def test_compile_attach_aux_loss_fullgraph():
    def f(w, loss):
        return attach_aux_loss(w * 2.0, loss * 3.0, 0.5).sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    w = torch.ones(4, requires_grad=True)
    loss = torch.tensor(1.5, requires_grad=True)
    y = cf(w, loss)
    y.backward()
    assert y.item() == 8.0
    assert loss.grad.item() == pytest.approx(1.5)
    assert torch.equal(w.grad, torch.full((4,), 2.0))


def test_package_exports_modules():
    assert moe_router.modules.TopKRouter is TopKRouter
    assert moe_router.MoELayer is MoELayer
    assert not hasattr(moe_router.modules, "TopkRouter")  # one exported name


@needs_ops
def test_demo_smoke(tmp_path):
    pytest.importorskip("matplotlib")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "demo.py"
    spec = importlib.util.spec_from_file_location("moe_router_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    threads = torch.get_num_threads()
    try:
        rc = demo.main(["--steps", "6", "--batch", "64", "--log-every", "3", "--out", str(tmp_path), "--quiet",
                        "--device", "cpu", "--threads", "0"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert rc == 0
    assert (tmp_path / "expert_load.png").stat().st_size > 10_000
    assert (tmp_path / "metrics.json").exists()


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, True, None])
def test_topk_router_validates_seed_at_construction(seed):
    with pytest.raises(ValueError, match="seed"):
        TopKRouter(8, 4, 2, seed=seed)


def test_topk_router_takes_every_uint64_seed():
    import numpy as np

    for seed in (0, 2**63, 2**64 - 1, np.uint64(2**64 - 1)):
        r = TopKRouter(8, 4, 2, seed=seed, expert_dropout=0.5)
        assert r.seed == int(seed) and type(r.seed) is int
