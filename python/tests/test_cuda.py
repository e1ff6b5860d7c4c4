"""CUDA variants: every op with a CUDA kernel, run on CUDA tensors, against the same op on
CPU (indices, masks and counts exactly equal; values within the tolerance of docs/semantics.md §1.7), through
autograd, opcheck, torch.compile(fullgraph=True) and on a non-default stream.

The GPU tests need a CUDA device and are skipped LOUDLY without one (`pytest -rs` shows
"SKIPPED: no CUDA device"). The tests at the top run everywhere.
"""

from __future__ import annotations

import pytest
import torch

import moe_router as mr
import reference as ref
from conftest import requires_cuda
from moe_router import _native, ops

T, E, K, H = 37, 12, 3, 24

# --------------------------------------------------------------------------------------
# Everywhere: the CUDA plumbing never crashes without a device. (The argument checks are
# the same code for both devices: test_native.py covers them; the CUDA branch itself runs
# on the CPU emulator in test_cuda_emu.py.)


def test_device_count_never_raises():
    assert isinstance(_native.cuda_device_count(), int)  # 0 without a driver


@pytest.mark.skipif(_native.cuda_device_count() > 0, reason="needs a machine WITHOUT a CUDA device")
def test_emulator_mode_is_refused_without_the_emulator():
    # Emulator mode hands host addresses to the CUDA branch: it must be refused unless
    # device 0 is the CPU emulator (here: no device at all), with an error, not a crash.
    with pytest.raises(RuntimeError, match="CUDA device 0"):
        _native._emulate_cuda_on_cpu(True)
    z, w, i = torch.randn(4, 8), torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    _native.topk_gating(z, None, w, i, topk=2)  # still the CPU path


def test_mixed_devices_are_rejected_by_the_ops():
    # The ops' device check (the functional layer checks first, with the same rule).
    with pytest.raises(ValueError, match="one device"):
        ops._device("topk_gating", logits=torch.randn(4, 4), expert_bias=torch.zeros(4, device="meta"))
    assert ops._device("x", a=None, b=torch.zeros(1)) == torch.device("cpu")


# --------------------------------------------------------------------------------------
# GPU: CUDA vs CPU

TOL = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}


def _close(cuda_val, cpu_val, dtype=None, msg=""):
    assert cuda_val.device.type == "cuda", msg
    a = cuda_val.cpu()
    assert a.shape == cpu_val.shape and a.dtype == cpu_val.dtype, msg
    if not a.is_floating_point():
        assert torch.equal(a, cpu_val), msg
        return
    rtol, atol = TOL[dtype or a.dtype]
    torch.testing.assert_close(a.double(), cpu_val.double(), rtol=rtol, atol=atol, equal_nan=True, msg=msg)


def _idx(t, k, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"score_function": "sigmoid", "normalize": True, "scaling_factor": 2.5},
        {"num_groups": 4, "group_topk": 2},
        {"pre_softmax": True},
        {"noise_std": 0.3, "expert_mask_rate": 0.25, "seed": 7, "offset": 3},
    ],
    ids=["softmax", "sigmoid", "groups", "pre-softmax", "noise-mask"],
)
@pytest.mark.parametrize("t", [1, 33, 257])
def test_topk_gating_cuda_matches_cpu(dtype, kw, t):
    z = ref.tie_free_logits(t, E, seed=t, dtype=dtype)
    bias = torch.linspace(-0.1, 0.1, E)
    kw = dict(kw)
    if "noise_std" not in kw:
        kw["expert_bias"] = bias
    cpu_w, cpu_i = mr.topk_gating(z, K, **kw)
    if "expert_bias" in kw:
        kw["expert_bias"] = bias.cuda()
    w, i = mr.topk_gating(z.cuda(), K, **kw)
    _close(i, cpu_i)
    _close(w, cpu_w, torch.float32)
    r = mr.topk_gating_replay(
        z.cuda(),
        i,
        **{k: v for k, v in kw.items() if k in ("score_function", "normalize", "scaling_factor", "pre_softmax")},
    )
    r_cpu = mr.topk_gating_replay(
        z,
        cpu_i,
        **{k: v for k, v in kw.items() if k in ("score_function", "normalize", "scaling_factor", "pre_softmax")},
    )
    _close(r, r_cpu)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_gating_gradients_cuda_match_cpu(dtype):
    z = ref.tie_free_logits(T, E, seed=1, dtype=dtype)
    g = torch.randn(T, K)
    grads = []
    for dev in ("cpu", "cuda"):
        x = z.to(dev).requires_grad_()
        w, _ = mr.topk_gating(x, K, normalize=True)
        (w * g.to(dev)).sum().backward()
        grads.append(x.grad)
    _close(grads[1], grads[0], dtype)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_permute_unpermute_cuda_match_cpu_with_gradients(dtype):
    x = torch.randn(T, H).to(dtype)
    idx = _idx(T, K, E)
    w = torch.rand(T, K)
    d = mr.dispatch(idx, w, E, capacity=6)  # the CPU plan for both devices
    outs = []
    for dev in ("cpu", "cuda"):
        xx = x.to(dev).requires_grad_()
        ww = w.to(dev).requires_grad_()
        buf = mr.permute(xx, d.row_to_token.to(dev), d.row.to(dev))
        y = buf.float().mul(1.5).to(dtype)
        out = mr.unpermute(y, d.row.to(dev), ww)
        out.float().square().sum().backward()
        outs.append((buf, out, xx.grad, ww.grad))
    for a, b, name in zip(outs[1], outs[0], ["buf", "out", "grad_x", "grad_w"]):
        _close(a, b, dtype if name != "grad_w" else torch.float32, msg=name)


@requires_cuda
def test_out_of_range_indices_are_ignored_on_cuda_not_raised():
    x = torch.randn(4, 8, device="cuda")
    r2t = torch.tensor([0, 99, -1, 3, 2**40], device="cuda")  # int64 beyond int32 too
    row = torch.tensor([[0], [-1], [4], [3]], device="cuda")
    buf = mr.permute(x, r2t, row)
    torch.cuda.synchronize()
    assert torch.equal(buf[1], torch.zeros(8, device="cuda")) and torch.equal(buf[4], torch.zeros(8, device="cuda"))
    assert torch.equal(buf[0], x[0]) and torch.equal(buf[3], x[3])


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_losses_cuda_match_cpu_with_gradients(dtype, masked):
    z = ref.tie_free_logits(48, E, seed=5, dtype=dtype)
    mask = (torch.arange(48) % 7 == 3) if masked else None
    counts = torch.arange(E) + 2
    cases = {
        "aux": lambda x, m: mr.aux_loss(x, K, coeff=0.1, padding_mask=m),
        "aux-sigmoid": lambda x, m: mr.aux_loss(x, K, score_function="sigmoid", padding_mask=m),
        "aux-counts": lambda x, m: mr.aux_loss(x, K, padding_mask=m, counts=counts.to(x.device), total_tokens=200),
        "seq": lambda x, m: mr.seq_aux_loss(x, K, 12, coeff=0.5, padding_mask=m),
        "z": lambda x, m: mr.z_loss(x, coeff=1e-2, padding_mask=m),
    }
    for name, f in cases.items():
        res = []
        for dev in ("cpu", "cuda"):
            x = z.to(dev).requires_grad_()
            loss = f(x, None if mask is None else mask.to(dev))
            (loss * 3.0).backward()
            res.append((loss.detach(), x.grad))
        _close(res[1][0], res[0][0], torch.float32, msg=f"{name} loss")
        _close(res[1][1], res[0][1], dtype, msg=f"{name} grad")


@requires_cuda
def test_dropout_bias_stats_cuda_match_cpu():
    m_cpu = mr.expert_mask(T, E, K, 0.4, seed=3, offset=9)
    m = mr.expert_mask(T, E, K, 0.4, seed=3, offset=9, device="cuda")
    _close(m, m_cpu)
    idx = _idx(T, K, E)
    w = torch.rand(T, K)
    for renorm in (False, True):
        res = []
        for dev in ("cpu", "cuda"):
            ww = w.to(dev).requires_grad_()
            out = mr.assignment_dropout(idx.to(dev), ww, 0.3, num_experts=E, seed=1, offset=2, renormalize=renorm)
            out.weights.square().sum().backward()
            res.append((out.weights.detach(), out.indices, ww.grad))
        for a, b in zip(res[1], res[0]):
            _close(a, b)
    counts = torch.tensor([5, 0, 3, 9, 1, 1, 4, 2, 7, 0, 6, 2])
    b_cpu = torch.linspace(-1, 1, E)
    b = b_cpu.cuda()
    mr.update_expert_bias(b_cpu, counts, 0.01)
    mr.update_expert_bias(b, counts.cuda(), 0.01)
    _close(b, b_cpu)
    z = ref.tie_free_logits(T, E, seed=2)
    z[3, 4] = float("nan")
    slot = torch.where(torch.rand(T, K) > 0.2, 0, -1)
    mask = torch.arange(T) % 9 == 0
    s_cpu = mr.router_stats(z, idx, slot=slot, padding_mask=mask)
    s = mr.router_stats(z.cuda(), idx.cuda(), slot=slot.cuda(), padding_mask=mask.cuda())
    for f in ("selected_counts", "kept_counts", "dropped", "nonfinite_logits", "num_tokens"):
        _close(getattr(s, f), getattr(s_cpu, f), msg=f)
    for f in ("max_violation", "mean_entropy", "mean_lse", "max_lse"):
        _close(getattr(s, f), getattr(s_cpu, f), torch.float32, msg=f)
    with pytest.raises(ValueError, match="non-finite"):
        mr.router_stats(z.cuda(), idx.cuda(), strict=True)


@requires_cuda
def test_empty_inputs_on_cuda():
    z = torch.empty(0, E, device="cuda")
    w, i = mr.topk_gating(z, K)
    assert w.shape == (0, K) and i.shape == (0, K)
    assert float(mr.z_loss(z)) == 0.0
    assert float(mr.aux_loss(z, K)) == 0.0


def _routing(t, k, e, seed):
    """Distinct indices per token with a skewed expert load (low experts over capacity),
    -1 entries and tie-heavy weights (few distinct values)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.linspace(4.0, 1.0, e).expand(max(t, 1), e)
    idx = torch.multinomial(probs, k, replacement=False, generator=g)[:t]
    idx[torch.rand(t, k, generator=g) < 0.1] = -1
    w = (torch.randint(0, 4, (t, k), generator=g).float() + 1) / 8
    return idx, w


DISPATCH_LAYOUTS = [("compact", 5, 1), ("compact", None, 1), ("pad_to_capacity", 4, 1), ("dropless", None, 1),
                    ("dropless", None, 4)]  # fmt: skip


@requires_cuda
@pytest.mark.parametrize("policy", ["position", "choice_then_position", "probs", "batch_prioritized", "random"])
@pytest.mark.parametrize("layout,capacity,align", DISPATCH_LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("ep_size", [1, 4])
@pytest.mark.parametrize("t", [0, 37, 300])
def test_dispatch_cuda_matches_cpu(policy, layout, capacity, align, renormalize, ep_size, t):
    idx, w = _routing(t, K, E, seed=t + 1)
    policy = None if capacity is None else policy  # a drop policy needs a capacity
    opts = (E, capacity, policy, layout, align, renormalize, ep_size, 11, 5)
    cpu = torch.ops.moe_router.dispatch(idx, w, *opts)
    got = torch.ops.moe_router.dispatch(idx.cuda(), w.cuda(), *opts)
    names = ["kept_weights", "slot", "row", "tokens_per_expert", "row_to_token", "expert_offsets", "rows_per_rank",
             "counts"]  # fmt: skip
    for a, b, name in zip(got, cpu, names):
        assert a.device.type == "cuda", name
        # Every output, the kept weights too, is the CPU's bit for bit (same f32 ops).
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b), name
    # The functional layer: num_rows / dropped are 0-d int64 device views of counts.
    d_cpu = mr.dispatch(idx, w, E, capacity=capacity, drop_policy=policy, layout=layout, align=align,
                        renormalize=renormalize, ep_size=ep_size, seed=11, offset=5)  # fmt: skip
    d = mr.dispatch(idx.cuda(), w.cuda(), E, capacity=capacity, drop_policy=policy, layout=layout, align=align,
                    renormalize=renormalize, ep_size=ep_size, seed=11, offset=5)  # fmt: skip
    for f in d._fields:
        _close(getattr(d, f), getattr(d_cpu, f), torch.float32, msg=f)
    assert d.num_rows.shape == () and d.dropped.shape == () and d.num_rows.dtype == torch.int64


@requires_cuda
def test_dispatch_and_expert_choice_on_cuda_do_not_sync():
    idx, w = _routing(257, K, E, seed=3)
    idx, w = idx.cuda(), w.cuda()
    z = torch.randn(257, E, device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        d = mr.dispatch(idx, w, E, capacity=20, drop_policy="probs", renormalize=True, ep_size=2)
        c = mr.expert_choice(z, 30)
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert d.num_rows.device.type == "cuda" and d.dropped.device.type == "cuda"
    assert c.row.device.type == "cuda"


@requires_cuda
def test_dispatch_out_of_range_indices_count_as_not_routed_on_cuda():
    idx, w = _routing(64, K, E, seed=9)
    bad = idx.clone()
    bad[3, 0], bad[10, 1], bad[20, 2] = E, 2**40, -5  # CPU would raise
    got = mr.dispatch(bad.cuda(), w.cuda(), E, capacity=6, drop_policy="probs")
    fixed = torch.where((bad >= 0) & (bad < E), bad, -1)
    want = mr.dispatch(fixed, w, E, capacity=6, drop_policy="probs")
    for f in ("slot", "row", "tokens_per_expert", "row_to_token", "expert_offsets", "rows_per_rank", "num_rows",
              "dropped"):  # fmt: skip
        _close(getattr(got, f), getattr(want, f), msg=f)


def _cpu_p(z):
    """The CPU reference's p = softmax(z) exactly (every expert takes every token)."""
    return torch.ops.moe_router.expert_choice(z, z.shape[0])[0]


def _check_expert_choice(got, cpu, p, cap, what):
    """Compare like tests/gpu_vs_cpu.rs: counts / offsets exact; each expert's chosen set
    equal, or different only between tokens whose CPU p are within a few ulps of that
    expert's selection threshold (the GPU's p may differ by an ulp). Returns the number
    of experts whose set differed so."""
    g = [x.cpu() for x in got]
    weights, row, r2t, row_w, tpe, offsets = g
    c_weights, c_row, c_r2t, c_row_w, c_tpe, c_offsets = cpu
    assert torch.equal(tpe, c_tpe) and torch.equal(offsets, c_offsets), what
    t, e = weights.shape
    taken = min(cap, t)
    near = 0
    for x in range(e):
        seg = slice(x * cap, x * cap + cap)
        gs, cs = r2t[seg], c_r2t[seg]
        assert (gs[taken:] == -1).all() and (row_w[seg][taken:] == 0).all(), f"{what}: expert {x} unused rows"
        toks = gs[:taken]
        assert ((toks >= 0) & (toks < t)).all() and (toks[1:] > toks[:-1]).all(), f"{what}: expert {x} order"
        if taken:
            rows = torch.arange(x * cap, x * cap + taken, dtype=torch.int32)
            assert torch.equal(row[toks.long(), x], rows), f"{what}: expert {x} row"
            assert torch.equal(weights[toks.long(), x], row_w[x * cap : x * cap + taken]), f"{what}: weights"
            _close(row_w[x * cap : x * cap + taken].cuda(), p[toks.long(), x], torch.float32, msg=f"{what}: p")
        if not torch.equal(toks, cs[:taken]):
            thr = p[cs[:taken].long(), x].min()
            diff = set(toks.tolist()) ^ set(cs[:taken].tolist())
            for tok in diff:
                v = p[tok, x]
                assert abs(v - thr) <= 4e-7 * abs(thr) + 1e-37, f"{what}: expert {x}: token {tok} p {v} thr {thr}"
            near += 1
        else:
            _close(row_w[seg].cuda(), c_row_w[seg], torch.float32, msg=f"{what}: row_weights")
    unchosen = row < 0
    assert (row[unchosen] == -1).all() and (weights[unchosen] == 0).all(), what
    if near == 0:
        assert torch.equal(row, c_row), f"{what}: row"
    return near


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,e", [(1, 8), (33, E), (257, 60), (1000, 8)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_expert_choice_cuda_matches_cpu(dtype, t, e, kind):
    if kind == "randn":
        z = ref.randn((t, e), seed=t * e, dtype=dtype, scale=2.0)
    else:  # few distinct logits: many exact ties in p (lower token first on both devices)
        g = torch.Generator().manual_seed(t + e)
        z = (torch.randint(-3, 3, (t, e), generator=g).float() * 0.5).to(dtype)
    p = _cpu_p(z)
    near, experts = 0, 0
    for cap in sorted({0, 1, -(-2 * t // e), t // 2, t, t + 3}):
        what = f"{dtype} T={t} E={e} {kind} cap={cap}"
        cpu = torch.ops.moe_router.expert_choice(z, cap)
        got = torch.ops.moe_router.expert_choice(z.cuda(), cap)
        for a in got:
            assert a.device.type == "cuda", what
        for a, b in zip(got, cpu):
            assert a.dtype == b.dtype and a.shape == b.shape, what
        near += _check_expert_choice(got, cpu, p, cap, what)
        experts += e
        # Backward on the CPU's selection (the same row for both devices).
        gw = torch.randn(t, e)
        g_cpu = torch.ops.moe_router.expert_choice_backward(z, cpu[1], gw)
        g = torch.ops.moe_router.expert_choice_backward(z.cuda(), cpu[1].cuda(), gw.cuda())
        rtol = {torch.float32: 1.3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(g.cpu().double(), g_cpu.double(), rtol=rtol, atol=1e-5, msg=f"{what}: grad")
    # Near-ties need CPU p within an ulp of each other: rare for random logits, more
    # common (but still a minority) with few distinct logits.
    bound = 10 if kind == "randn" else 4
    assert near * bound <= experts, f"near-ties are not rare: {near} of {experts}"


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_choice_gradients_cuda_match_cpu(dtype):
    z = ref.tie_free_logits(48, E, seed=4, dtype=dtype)
    res = []
    for dev in ("cpu", "cuda"):
        x = z.to(dev).requires_grad_()
        c = mr.expert_choice(x, 9)
        (c.weights.square().sum() + 2.0 * c.row_weights.sum()).backward()
        res.append((c.row, c.row_to_token, x.grad))
    if not torch.equal(res[1][0].cpu(), res[0][0]):
        pytest.fail("tie-free logits must give the same selection on both devices")
    _close(res[1][1], res[0][1])
    _close(res[1][2], res[0][2], dtype)


# --------------------------------------------------------------------------------------
# GPU: streams, opcheck, torch.compile


@requires_cuda
def test_ops_on_a_non_default_stream_give_the_same_results():
    z = ref.tie_free_logits(257, E, seed=11).cuda()
    x = torch.randn(257, H, device="cuda")

    def step():
        w, i = mr.topk_gating(z, K)
        d_row = torch.arange(257 * K, device="cuda").reshape(257, K)
        r2t = torch.arange(257, device="cuda").repeat_interleave(K)
        out = mr.unpermute(mr.permute(x, r2t, d_row), d_row, w)
        d = mr.dispatch(i, w, E, capacity=40, drop_policy="probs", renormalize=True)
        c = mr.expert_choice(z, 30)
        return (w, i, out, mr.aux_loss(z, K), mr.z_loss(z), d.row, d.row_to_token, d.kept_weights, d.num_rows,
                d.dropped, c.row, c.weights)  # fmt: skip

    ref_out = step()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # several queued launches with no sync in between
            got = step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for a, b in zip(got, ref_out):
        assert torch.equal(a, b)  # same device, same kernels: bitwise


def _to_cuda(v):
    if isinstance(v, torch.Tensor):
        c = v.detach().cuda()
        return c.requires_grad_(v.requires_grad)
    if isinstance(v, torch.device):
        return torch.device("cuda")
    return v


@requires_cuda
@pytest.mark.parametrize("name", ops.CUSTOM_OPS)
def test_opcheck_on_cuda(name):
    from test_opcheck import SAMPLES

    op = getattr(torch.ops.moe_router, name).default
    for args in SAMPLES[name]:
        torch.library.opcheck(op, tuple(_to_cuda(a) for a in args))


@requires_cuda
def test_compile_fullgraph_on_cuda():
    torch._dynamo.reset()
    x = torch.randn(64, H, device="cuda")
    router = (torch.randn(H, E, device="cuda") * 0.5).requires_grad_()

    def f(x, router):
        z = x @ router
        w, i = mr.topk_gating(z, K, normalize=True)
        r = torch.arange(64 * K, device=x.device).reshape(64, K)
        r2t = torch.arange(64, device=x.device).repeat_interleave(K)
        out = mr.unpermute(mr.permute(x, r2t, r), r, w)
        return out.square().mean() + mr.aux_loss(z, K, coeff=0.01) + mr.z_loss(z, coeff=1e-3)

    eager = f(x, router)
    (ge,) = torch.autograd.grad(eager, router)
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, router)
    (gc,) = torch.autograd.grad(got, router)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)


@requires_cuda
def test_compile_fullgraph_dispatch_and_expert_choice_on_cuda():
    torch._dynamo.reset()
    x = torch.randn(64, H, device="cuda")
    router = (torch.randn(H, E, device="cuda") * 0.5).requires_grad_()

    def f(x, router):
        z = x @ router
        w, i = mr.topk_gating(z, K)
        d = mr.dispatch(i, w, E, capacity=12, drop_policy="probs", renormalize=True)
        out = mr.unpermute(mr.permute(x, d.row_to_token, d.row), d.row, d.kept_weights)
        c = mr.expert_choice(z, 10)
        out2 = mr.unpermute(mr.permute(x, c.row_to_token, c.row), c.row, c.weights)
        return out.square().mean() + out2.square().mean() + d.dropped.float() * 0.0

    eager = f(x, router)
    (ge,) = torch.autograd.grad(eager, router)
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(x, router)
    (gc,) = torch.autograd.grad(got, router)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gc, ge, rtol=1e-4, atol=1e-5)
