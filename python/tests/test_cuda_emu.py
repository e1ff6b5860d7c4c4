"""The Python CUDA path end to end on the CPU emulator (emu/README.md).

No GPU here, so `test_cuda.py`'s GPU cases never run. This file runs the same CUDA
branches of `moe_router.ops` instead on the emulator's `libcuda.so`: under the emulator a
device pointer is a host address, so a CPU tensor's `data_ptr()` is a valid "device
pointer", and launches are synchronous. The `emu()` context below makes the ops take their
CUDA branch for CPU tensors:

- `ops._on_cuda(dev)` is True for CPU tensors (so `_i32` also takes its CUDA branch: no host
  range check, a clamp to the int32 range instead);
- `_native._emulate_cuda_on_cpu(True)` makes every native binding send CPU tensors down its
  CUDA branch on device 0 and stream 0 (the legacy default stream, a null `CUstream`,
  which emu/driver.cpp accepts); the binding refuses to turn this on unless device 0 is
  the emulator.

Nothing else on that path touches `torch.cuda` (the functional layer and the modules only go
through the ops; `router_stats(strict=True)` reads its one value in the native binding,
which works on CPU tensors). Every result of the patched ("CUDA on the
emulator") run is compared with the unpatched CPU run: indices, masks, counts and slots
exactly; float values within `test_cuda.py`'s tolerances.

Gating: runs only with MOE_ROUTER_EMU_TESTS=1 (skipped loudly otherwise); with it set, a
missing device, a native module without the CUDA bindings, or a libcuda that is not the
emulator FAILS every test (a misconfigured CI must not pass). `scripts/test.sh` runs it as

    MOE_ROUTER_EMU_TESTS=1 LD_LIBRARY_PATH=$PWD/target/emu:$NVLIB python -m pytest python/tests/test_cuda_emu.py

Do not call `torch.cuda.*` here: torch's own CUDA runtime probes the emulator and fails
(harmlessly: `torch.cuda.is_available()` is False).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import os

import pytest
import torch

import moe_router as mr
import reference as ref
from moe_router import _native, ops
from moe_router.functional import Dispatch
from moe_router.modules import MoELayer, TopKRouter

ENABLED = os.environ.get("MOE_ROUTER_EMU_TESTS") == "1"
HOWTO = "set MOE_ROUTER_EMU_TESTS=1 and put target/emu (scripts/build_emu.sh) first on LD_LIBRARY_PATH"
EMU_NAME = "moe-router CPU emulator"

if not ENABLED:
    pytestmark = pytest.mark.skip(reason=f"SKIPPED: CUDA-on-emulator tests off: {HOWTO}")

T, E, K, H = 37, 12, 3, 24
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-5), torch.bfloat16: (1.6e-2, 1e-5)}

# --------------------------------------------------------------------------------------
# Setup: the device must be the emulator.


def _loaded_libcuda() -> str:
    """Path of the libcuda this process has mapped (cudarc loaded it for
    `cuda_device_count`), or '' if none."""
    with open("/proc/self/maps") as f:
        for line in f:
            path = line.split()[-1] if len(line.split()) >= 6 else ""
            if os.path.basename(path).startswith("libcuda.so"):
                return path
    return ""


def _device_name(path: str) -> str:
    """cuDeviceGetName of device 0 through the libcuda at `path`. (The native module does
    not expose a device name, so ask the driver directly: dlopen of the same path returns
    the library cudarc already loaded.)"""
    lib = ctypes.CDLL(path)
    dev = ctypes.c_int()
    buf = ctypes.create_string_buffer(256)
    if lib.cuInit(0) != 0 or lib.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        return ""
    if lib.cuDeviceGetName(buf, 256, dev) != 0:
        return ""
    return buf.value.decode()


@pytest.fixture(scope="module", autouse=True)
def emulator_device():
    # Only reached with MOE_ROUTER_EMU_TESTS=1 (the module is skipped otherwise): from here
    # on every problem is a failure, never a skip.
    if not hasattr(_native, "_emulate_cuda_on_cpu"):
        pytest.fail(
            "MOE_ROUTER_EMU_TESTS=1 but this moe_router._native is a stale install: rebuild it (`pip install ./python`)"
        )
    n = _native.cuda_device_count()
    if n <= 0:
        pytest.fail(f"MOE_ROUTER_EMU_TESTS=1 but no CUDA device is visible: {HOWTO}")
    path = _loaded_libcuda()
    name = _device_name(path) if path else ""
    if name != EMU_NAME:
        pytest.fail(
            f"MOE_ROUTER_EMU_TESTS=1 but the CUDA device is {name!r} (libcuda: {path or 'not loaded'}), not the "
            f"{EMU_NAME!r}: {HOWTO}"
        )
    return path


# --------------------------------------------------------------------------------------
# The patch and the comparison


_orig_on_cuda = getattr(ops, "_on_cuda", None)  # None: a stale install (the fixture fails first)


def _emu_on_cuda(dev: torch.device) -> bool:
    return dev.type == "cpu" or _orig_on_cuda(dev)


def _calls() -> int:
    return sum(_native._cuda_calls().values())


@contextlib.contextmanager
def emu():
    """The ops' CUDA branches, for CPU tensors, on the emulator: the native module sends
    CPU tensors to the kernels (`_emulate_cuda_on_cpu`, refused unless device 0 is the
    emulator) and `ops._on_cuda` says True for them (so the Python layer takes its CUDA
    branches too: no host range checks, results left in tensors)."""
    saved = ops._on_cuda
    ops._on_cuda = _emu_on_cuda
    _native._emulate_cuda_on_cpu(True)
    try:
        yield
    finally:
        _native._emulate_cuda_on_cpu(False)
        ops._on_cuda = saved


def both(f):
    """(emulated CUDA result, CPU result) of `f()`; `f` builds its own inputs (leaf
    tensors with requires_grad, backward calls, ...) so the two runs share nothing."""
    before = _calls()
    with emu():
        got = f()
    assert _calls() > before, "the CUDA branch was not taken"
    return got, f()


def close(a, b, dtype=None, msg=""):
    """Ints / bools exactly, floats within TOL[dtype or a.dtype] (NaN == NaN)."""
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), msg
    assert a.shape == b.shape and a.dtype == b.dtype, f"{msg}: {a.shape} {a.dtype} vs {b.shape} {b.dtype}"
    if not a.is_floating_point():
        assert torch.equal(a, b), f"{msg}: {a} vs {b}"
        return
    rtol, atol = TOL[dtype or a.dtype]
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, equal_nan=True, msg=msg)


def close_all(got, want, names, dtype=None, what=""):
    assert len(got) == len(want) == len(names), what
    for a, b, n in zip(got, want, names):
        if a is None or b is None:
            assert a is None and b is None, f"{what}: {n}"
            continue
        close(a, b, dtype, msg=f"{what}: {n}")


def _idx(t, k, e, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)]) if t else torch.empty(0, k).long()


# --------------------------------------------------------------------------------------
# Top-k gating, replay, backward

GATING_KW = {
    "softmax": {},
    "sigmoid": {"score_function": "sigmoid", "normalize": True, "scaling_factor": 2.5},
    "softmax-normalize": {"normalize": True, "scaling_factor": 0.5},
    "groups": {"num_groups": 4, "group_topk": 2},
    "sigmoid-groups": {"score_function": "sigmoid", "num_groups": 3, "group_topk": 2, "normalize": True},
    "pre-softmax": {"pre_softmax": True},
    "pre-softmax-normalize": {"pre_softmax": True, "normalize": True},
    "noise-mask": {"noise_std": 0.3, "expert_mask_rate": 0.25, "seed": 7, "offset": 3},
    "mask-only": {"expert_mask_rate": 0.5, "seed": 2**64 - 1, "offset": 2**63},
    "noise-groups": {"noise_std": 1.0, "num_groups": 4, "group_topk": 1, "seed": 3},
}
REPLAY_KEYS = ("score_function", "normalize", "scaling_factor", "pre_softmax")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(GATING_KW))
@pytest.mark.parametrize("t", [0, 1, 33, 257])
def test_topk_gating_replay_and_backward(dtype, case, t):
    z0 = ref.tie_free_logits(t, E, seed=t, dtype=dtype)
    g0 = torch.randn(t, K, generator=torch.Generator().manual_seed(t))
    kw = dict(GATING_KW[case])
    if "noise_std" not in kw:
        kw["expert_bias"] = torch.linspace(-0.1, 0.1, E)
    rkw = {k: v for k, v in kw.items() if k in REPLAY_KEYS}

    def run():
        z = z0.clone().requires_grad_()
        w, i = mr.topk_gating(z, K, **kw)
        (w * g0).sum().backward()
        zr = z0.clone().requires_grad_()
        r = mr.topk_gating_replay(zr, i, **rkw)
        (r * g0).square().sum().backward()
        return w.detach(), i, z.grad, r.detach(), zr.grad

    got, cpu = both(run)
    # weights f32 (f32 tolerance), gradients in the logits' dtype (that dtype's tolerance)
    close_all(got, cpu, ["weights", "indices", "grad", "replay", "replay grad"], what=f"{case} {dtype} T={t}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_topk_gating_ties_pick_the_lower_index(dtype):
    # Few distinct logits: exact ties everywhere (also after the bias: the bias is 0).
    g = torch.Generator().manual_seed(5)
    z0 = (torch.randint(-2, 2, (64, E), generator=g).float() * 0.5).to(dtype)
    for kw in ({}, {"pre_softmax": True}, {"score_function": "sigmoid"}, {"num_groups": 4, "group_topk": 2}):
        got, cpu = both(lambda: mr.topk_gating(z0, 4, **kw))
        close_all(got, cpu, ["weights", "indices"], torch.float32, what=f"ties {kw}")


@pytest.mark.parametrize("case", ["softmax", "sigmoid", "pre-softmax"])
def test_topk_gating_nonfinite_logits(case):
    z0 = ref.tie_free_logits(16, E, seed=9)
    z0[1, 3] = float("inf")
    z0[2, :] = float("-inf")
    z0[2, 5] = 0.0
    z0[4, 7] = float("-inf")
    kw = GATING_KW[case]
    try:
        cpu = mr.topk_gating(z0, K, **kw)
    except (ValueError, RuntimeError) as e:  # CPU rejects it: the CUDA path must not crash
        with emu():
            try:
                mr.topk_gating(z0, K, **kw)
            except (ValueError, RuntimeError):
                pass
        pytest.skip(f"the CPU reference rejects non-finite logits ({e})")
    with emu():
        got = mr.topk_gating(z0, K, **kw)
    close_all(got, cpu, ["weights", "indices"], torch.float32, what=f"non-finite {case}")


def test_replay_with_unrouted_indices():
    # The CPU rejects -1 in replay indices; the CUDA kernels must not crash on them and must
    # give every other token the CPU's weights.
    z0 = ref.tie_free_logits(T, E, seed=3)
    idx = _idx(T, K, E, seed=3)
    bad = idx.clone()
    bad[::5, 1] = -1
    bad[1, 2] = E + 4
    with emu():
        got = mr.topk_gating_replay(z0, bad, normalize=True)
    want = mr.topk_gating_replay(z0, idx, normalize=True)
    ok = (bad == idx).all(dim=1)
    close(got[ok], want[ok], torch.float32, msg="replay rows without a bad index")


# --------------------------------------------------------------------------------------
# Dispatch


def _routing(t, k, e, seed):
    """Distinct indices per token, skewed load, -1 entries, tie-heavy weights (as
    test_cuda.py)."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.linspace(4.0, 1.0, e).expand(max(t, 1), e)
    idx = torch.multinomial(probs, k, replacement=False, generator=g)[:t]
    idx[torch.rand(t, k, generator=g) < 0.1] = -1
    w = (torch.randint(0, 4, (t, k), generator=g).float() + 1) / 8
    return idx, w


POLICIES = ["position", "choice_then_position", "probs", "batch_prioritized", "random"]
DISPATCH_LAYOUTS = [("compact", 5, 1), ("compact", None, 1), ("pad_to_capacity", 4, 1), ("dropless", None, 1),
                    ("dropless", None, 4)]  # fmt: skip
DISPATCH_OUT = ["kept_weights", "slot", "row", "tokens_per_expert", "row_to_token", "expert_offsets",
                "rows_per_rank", "counts"]  # fmt: skip


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("layout,capacity,align", DISPATCH_LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("ep_size", [1, 4])
@pytest.mark.parametrize("t", [0, 37, 300])
def test_dispatch(policy, layout, capacity, align, ep_size, t):
    idx, w = _routing(t, K, E, seed=t + 1)
    for renormalize in (False, True):
        what = f"{policy} {layout} cap={capacity} align={align} renorm={renormalize} ep={ep_size} T={t}"
        policy = None if capacity is None else policy  # a drop policy needs a capacity
        opts = (E, capacity, policy, layout, align, renormalize, ep_size, 11, 5)
        got, cpu = both(lambda: torch.ops.moe_router.dispatch(idx, w, *opts))
        # every output, the kept weights too, bit for bit
        for a, b, name in zip(got, cpu, DISPATCH_OUT):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f"{what}: {name}"

        # the functional layer (int64 views, differentiable kept weights) with a gradient
        def fn():
            ww = w.clone().requires_grad_()
            d = mr.dispatch(idx.int() if t % 2 else idx, ww, E, capacity=capacity, drop_policy=policy, layout=layout,
                            align=align, renormalize=renormalize, ep_size=ep_size, seed=11, offset=5)  # fmt: skip
            d.kept_weights.square().sum().backward()
            return [getattr(d, f).detach() for f in d._fields] + [ww.grad]

        got, cpu = both(fn)
        close_all(got, cpu, list(Dispatch._fields) + ["grad"], torch.float32, what=what)


def test_dispatch_seeds_and_int64_indices():
    idx, w = _routing(200, 4, 16, seed=3)
    for seed, offset in ((0, 0), (-1, 2**63 - 1), (12345, -7)):
        for policy in ("random", "probs"):
            opts = (16, 30, policy, "compact", 1, True, 2, seed, offset)
            got, cpu = both(lambda: torch.ops.moe_router.dispatch(idx.long(), w, *opts))
            for a, b, name in zip(got, cpu, DISPATCH_OUT):
                assert torch.equal(a, b), f"{policy} seed={seed} offset={offset}: {name}"


def test_dispatch_out_of_range_indices_count_as_not_routed():
    idx, w = _routing(64, K, E, seed=9)
    bad = idx.clone()
    bad[3, 0], bad[10, 1], bad[20, 2], bad[30, 0] = E, 2**40, -5, -(2**40)  # the CPU would raise
    with emu():
        got = mr.dispatch(bad, w, E, capacity=6, drop_policy="probs")
    fixed = torch.where((bad >= 0) & (bad < E), bad, -1)
    want = mr.dispatch(fixed, w, E, capacity=6, drop_policy="probs")
    for f in ("slot", "row", "tokens_per_expert", "row_to_token", "expert_offsets", "rows_per_rank", "num_rows",
              "dropped", "kept_weights"):  # fmt: skip
        close(getattr(got, f), getattr(want, f), msg=f)


# --------------------------------------------------------------------------------------
# Expert choice


def _cpu_p(z):
    return torch.ops.moe_router.expert_choice(z, z.shape[0])[0]


def _check_expert_choice(got, cpu, p, cap, what):
    """As test_cuda.py: counts / offsets exact; each expert's chosen set equal, or
    different only between tokens whose CPU p are within a few ulps of the threshold.
    Returns the number of experts whose set differed so."""
    weights, row, r2t, row_w, tpe, offsets = got
    c_weights, c_row, c_r2t, c_row_w, c_tpe, c_offsets = cpu
    for a, b in zip(got, cpu):
        assert a.dtype == b.dtype and a.shape == b.shape, what
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
            close(row_w[x * cap : x * cap + taken], p[toks.long(), x], torch.float32, msg=f"{what}: p")
        if not torch.equal(toks, cs[:taken]):
            thr = p[cs[:taken].long(), x].min()
            for tok in set(toks.tolist()) ^ set(cs[:taken].tolist()):
                v = p[tok, x]
                assert abs(v - thr) <= 4e-7 * abs(thr) + 1e-37, f"{what}: expert {x}: token {tok} p {v} thr {thr}"
            near += 1
        else:
            close(row_w[seg], c_row_w[seg], torch.float32, msg=f"{what}: row_weights")
    unchosen = row < 0
    assert (row[unchosen] == -1).all() and (weights[unchosen] == 0).all(), what
    if near == 0:
        assert torch.equal(row, c_row), f"{what}: row"
    return near


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t,e", [(0, 8), (1, 8), (33, E), (257, 60), (1000, 8)])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_expert_choice_and_backward(dtype, t, e, kind):
    if kind == "randn":
        z = ref.randn((t, e), seed=t * e, dtype=dtype, scale=2.0)
    else:
        g = torch.Generator().manual_seed(t + e)
        z = (torch.randint(-3, 3, (t, e), generator=g).float() * 0.5).to(dtype)
    p = _cpu_p(z)
    near, experts = 0, 0
    for cap in sorted({0, 1, -(-2 * t // e), t // 2, t, t + 3}):
        what = f"{dtype} T={t} E={e} {kind} cap={cap}"
        got, cpu = both(lambda: torch.ops.moe_router.expert_choice(z, cap))
        near += _check_expert_choice(got, cpu, p, cap, what)
        experts += e
        gw = torch.randn(t, e, generator=torch.Generator().manual_seed(cap))
        g, g_cpu = both(lambda: torch.ops.moe_router.expert_choice_backward(z, cpu[1], gw))
        rtol = {torch.float32: 1.3e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
        assert g.dtype == g_cpu.dtype == dtype
        torch.testing.assert_close(g.double(), g_cpu.double(), rtol=rtol, atol=1e-5, msg=f"{what}: grad")
    bound = 10 if kind == "randn" else 4
    assert near * bound <= experts, f"near-ties are not rare: {near} of {experts}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expert_choice_gradients_through_autograd(dtype):
    z0 = ref.tie_free_logits(48, E, seed=4, dtype=dtype)

    def run():
        x = z0.clone().requires_grad_()
        c = mr.expert_choice(x, 9)
        (c.weights.square().sum() + 2.0 * c.row_weights.sum()).backward()
        return c.row, c.row_to_token, c.tokens_per_expert, c.expert_offsets, c.weights.detach(), x.grad

    got, cpu = both(run)
    close_all(got[:5], cpu[:5], ["row", "row_to_token", "tpe", "offsets", "weights"], torch.float32)
    close(got[5], cpu[5], dtype, msg="grad")


# --------------------------------------------------------------------------------------
# Permute / unpermute


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", ["capacity", "pad", "dropless-align", "expert-choice"])
def test_permute_unpermute_with_gradients(dtype, plan):
    x0 = torch.randn(T, H, generator=torch.Generator().manual_seed(1)).to(dtype)
    idx, w0 = _idx(T, K, E), torch.rand(T, K, generator=torch.Generator().manual_seed(2))
    idx[::7, 2] = -1
    if plan == "capacity":
        d = mr.dispatch(idx, w0, E, capacity=6)
        r2t, row = d.row_to_token, d.row
    elif plan == "pad":
        d = mr.dispatch(idx, w0, E, capacity=4, layout="pad_to_capacity", drop_policy="probs")
        r2t, row = d.row_to_token, d.row
    elif plan == "dropless-align":
        d = mr.dispatch(idx, w0, E, layout="dropless", align=8)
        r2t, row = d.row_to_token.int(), d.row.int()
    else:
        c = mr.expert_choice(ref.tie_free_logits(T, E, seed=6), 5)
        r2t, row, w0 = c.row_to_token, c.row, c.weights.detach()

    def run():
        xx = x0.clone().requires_grad_()
        ww = w0.clone().requires_grad_()
        buf = mr.permute(xx, r2t, row)
        y = buf.float().mul(1.5).to(dtype)
        out = mr.unpermute(y, row, ww)
        out.float().square().sum().backward()
        return buf.detach(), out.detach(), xx.grad, ww.grad

    got, cpu = both(run)
    for a, b, name in zip(got, cpu, ["buf", "out", "grad_x", "grad_w"]):
        close(a, b, dtype if name != "grad_w" else torch.float32, msg=f"{plan} {dtype}: {name}")


def test_permute_unpermute_ops_directly():
    # permute_backward and unpermute_backward as ops, with -1 rows and an empty batch.
    for t in (0, 19):
        g = torch.Generator().manual_seed(t)
        rows = 2 * t + 3
        perm = torch.randperm(rows, generator=g)[: t * 2].reshape(t, 2).int()
        perm[::3, 1] = -1
        gb = torch.randn(rows, 8, generator=g)
        got, cpu = both(lambda: torch.ops.moe_router.permute_backward(gb, perm, t))
        close(got, cpu, msg=f"permute_backward T={t}")
        go, y, w = torch.randn(t, 8, generator=g), torch.randn(rows, 8, generator=g), torch.rand(t, 2, generator=g)
        got, cpu = both(lambda: torch.ops.moe_router.unpermute_backward(go, y, perm, w))
        close_all(got, cpu, ["grad_y", "grad_w"], what=f"unpermute_backward T={t}")


def test_permute_out_of_range_indices_are_ignored():
    x = torch.randn(4, 8)
    r2t = torch.tensor([0, 99, -1, 3, 2**40])  # int64 beyond int32 too: the CUDA branch clamps
    row = torch.tensor([[0], [-1], [4], [3]])
    with emu():
        buf = mr.permute(x, r2t, row)
    assert torch.equal(buf[1], torch.zeros(8)) and torch.equal(buf[2], torch.zeros(8))
    assert torch.equal(buf[4], torch.zeros(8))
    assert torch.equal(buf[0], x[0]) and torch.equal(buf[3], x[3])


# --------------------------------------------------------------------------------------
# Losses


LOSS_CASES = {
    "aux": lambda x, m: mr.aux_loss(x, K, coeff=0.1, padding_mask=m),
    "aux-sigmoid": lambda x, m: mr.aux_loss(x, K, score_function="sigmoid", padding_mask=m),
    "aux-counts": lambda x, m: mr.aux_loss(x, K, padding_mask=m, counts=torch.arange(E) + 2, total_tokens=200),
    "aux-counts-i32-tensor-total": lambda x, m: mr.aux_loss(
        x, 2, padding_mask=m, counts=(torch.arange(E) * 3).int(), total_tokens=torch.tensor(77, dtype=torch.int32)
    ),
    "global-aux": lambda x, m: mr.global_aux_loss(x, K, coeff=0.3, padding_mask=m),
    "seq": lambda x, m: mr.seq_aux_loss(x, K, 12, coeff=0.5, padding_mask=m),
    "seq-sigmoid-one-seq": lambda x, m: mr.seq_aux_loss(x, 1, 48, score_function="sigmoid", padding_mask=m),
    "seq-len-1": lambda x, m: mr.seq_aux_loss(x, K, 1, padding_mask=m),
    "z": lambda x, m: mr.z_loss(x, coeff=1e-2, padding_mask=m),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_losses_with_gradients(dtype, masked):
    z0 = ref.tie_free_logits(48, E, seed=5, dtype=dtype)
    mask = (torch.arange(48) % 7 == 3) if masked else None
    for name, f in LOSS_CASES.items():

        def run():
            x = z0.clone().requires_grad_()
            loss = f(x, mask)
            (loss * 3.0).backward()
            return loss.detach(), x.grad

        got, cpu = both(run)
        close(got[0], cpu[0], torch.float32, msg=f"{name} {dtype} loss")
        close(got[1], cpu[1], dtype, msg=f"{name} {dtype} grad")


def test_loss_ops_outputs():
    # The ops' extra outputs (counts used, T_total used, per-sequence counts) too.
    z = ref.tie_free_logits(60, E, seed=8)
    m = torch.arange(60) % 4 == 0
    for args in ((None, None, None), (m, None, None), (m, torch.arange(E) + 1, torch.tensor(500))):
        got, cpu = both(lambda: torch.ops.moe_router.aux_loss(z, *args, K, "softmax", 0.5))
        close_all(got, cpu, ["loss", "counts", "total"], torch.float32, what=f"aux_loss op {args[0] is not None}")
    for mm in (None, m):
        got, cpu = both(lambda: torch.ops.moe_router.seq_aux_loss(z, mm, 15, K, "sigmoid", 0.5))
        close_all(got, cpu, ["loss", "counts"], torch.float32, what="seq_aux_loss op")


def test_losses_all_padding_and_long_sequences():
    # Every token padded (0 valid: loss 0, grad 0), and sequences spanning many chunks.
    z0 = ref.randn((2048, 8), seed=1, scale=3.0)
    for m in (torch.ones(2048, dtype=torch.bool), torch.arange(2048) % 3 == 0, None):
        for name, f in (
            ("aux", lambda x: mr.aux_loss(x, 2, padding_mask=m)),
            ("seq", lambda x: mr.seq_aux_loss(x, 2, 1024, padding_mask=m)),
            ("z", lambda x: mr.z_loss(x, padding_mask=m)),
        ):

            def run():
                x = z0.clone().requires_grad_()
                loss = f(x)
                loss.backward()
                return loss.detach(), x.grad

            got, cpu = both(run)
            close_all(got, cpu, ["loss", "grad"], torch.float32, what=f"{name} mask={m is not None}")


def test_losses_nonfinite_logits():
    z0 = ref.tie_free_logits(24, E, seed=2)
    z0[3, 1] = float("inf")
    z0[5, 2] = float("nan")
    m = torch.zeros(24, dtype=torch.bool)
    m[3] = m[5] = True  # the non-finite rows are padding: excluded on both devices
    for name, f in (("aux", lambda x: mr.aux_loss(x, K, padding_mask=m)), ("z", lambda x: mr.z_loss(x, padding_mask=m)),
                    ("seq", lambda x: mr.seq_aux_loss(x, K, 6, padding_mask=m))):  # fmt: skip

        def run():
            x = z0.clone().requires_grad_()
            loss = f(x)
            loss.backward()
            return loss.detach(), x.grad

        got, cpu = both(run)
        close_all(got, cpu, ["loss", "grad"], torch.float32, what=name)


def test_z_loss_of_a_plus_inf_logit_is_inf_on_both():
    # logsumexp of a row whose max is +inf is +inf (torch.logsumexp): the kernels and
    # the CPU reference alike, not NaN.
    for e in (E, 300):  # the warp and the block kernels
        z0 = ref.tie_free_logits(24, e, seed=3)
        z0[7, 4] = float("inf")
        got, cpu = both(lambda: mr.z_loss(z0, coeff=0.1))
        assert got.item() == cpu.item() == float("inf"), (got, cpu)


def test_aux_loss_total_tokens_on_the_cuda_branch():
    z = ref.tie_free_logits(30, E, seed=6)
    counts = torch.arange(E) * 2
    # Without counts: rejected by the core's checks on the CUDA branch too.
    before = _calls()
    with emu(), pytest.raises(ValueError, match=r"total_tokens.*requires `counts`"):
        torch.ops.moe_router.aux_loss(z, None, None, torch.tensor(7), K, "softmax", 1.0)
    assert _calls() > before, "the CUDA branch was not taken"
    # A device total the host cannot check: <= 0 gives loss 0 and total 0 on CUDA (the
    # CPU rejects it).
    for bad in (0, -4):
        with emu():
            loss, used, total = torch.ops.moe_router.aux_loss(z, None, counts, torch.tensor(bad), K, "softmax", 1.0)
        assert loss.item() == 0.0 and total.item() == 0 and torch.equal(used, counts)
        with pytest.raises(ValueError, match="total_tokens"):
            torch.ops.moe_router.aux_loss(z, None, counts, torch.tensor(bad), K, "softmax", 1.0)


# --------------------------------------------------------------------------------------
# Expert mask, assignment dropout, bias update, router statistics


@pytest.mark.parametrize("t,e,k,rate", [(0, 8, 2, 0.5), (37, 12, 3, 0.4), (100, 64, 8, 0.9), (33, 5, 5, 0.7)])
def test_expert_mask(t, e, k, rate):
    for seed, offset in ((3, 9), (2**64 - 1, 2**63)):
        got, cpu = both(lambda: mr.expert_mask(t, e, k, rate, seed=seed, offset=offset))
        close(got, cpu, msg=f"expert_mask {t} {e} {k} {rate} {seed}")


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("t", [0, 37, 300])
def test_assignment_dropout_with_gradients(renorm, t):
    idx = _idx(t, K, E, seed=t)
    if t:
        idx[::4, 1] = -1
    w0 = torch.rand(t, K, generator=torch.Generator().manual_seed(t))
    for rate, seed, offset in ((0.3, 1, 2), (0.0, 0, 0), (0.9, 2**64 - 5, 2**62)):

        def run():
            ww = w0.clone().requires_grad_()
            out_i, out_w = mr.assignment_dropout(idx, ww, rate, num_experts=E, seed=seed, offset=offset,
                                                 renormalize=renorm)  # fmt: skip
            (out_w.square() * 1.7).sum().backward()
            signed = [v - 2**64 if v >= 2**63 else v for v in (seed, offset)]  # the op's int64 schema
            keep = torch.ops.moe_router.assignment_dropout(idx, w0, E, rate, *signed, renorm)[2]
            return out_w.detach(), out_i, keep, ww.grad

        got, cpu = both(run)
        close_all(got, cpu, ["weights", "indices", "keep", "grad"], torch.float32, what=f"rate={rate} renorm={renorm}")


def test_assignment_dropout_out_of_range_indices_count_as_routed():
    # Documented CUDA behaviour: out-of-range indices are not rejected; a non-negative one
    # counts as routed. The CPU rejects them, so compare with an in-range stand-in.
    idx = _idx(40, K, E, seed=4)
    w = torch.rand(40, K)
    bad = idx.clone()
    bad[2, 0], bad[9, 1] = E + 3, 2**40
    bad[11, 2] = -7
    with emu():
        got_w, got_i, got_keep = torch.ops.moe_router.assignment_dropout(bad, w, E, 0.4, 3, 4, True)
    stand_in = torch.where(bad >= E, 0, torch.where(bad < 0, -1, bad))
    want_w, want_i, want_keep = torch.ops.moe_router.assignment_dropout(stand_in, w, E, 0.4, 3, 4, True)
    close(got_keep, want_keep, msg="keep")
    close(got_w, want_w, torch.float32, msg="weights")
    routed = stand_in >= 0
    assert torch.equal(got_i[~routed | ~want_keep], want_i[~routed | ~want_keep])


def test_update_expert_bias():
    skewed = torch.tensor([5, 0, 3, 9, 1, 1, 4, 2, 7, 0, 6, 2])
    for counts in (skewed, torch.full((E,), 4).int(), torch.zeros(E).long()):
        for rate in (0.01, 0.0, 3.5):

            def run():
                b = torch.linspace(-1, 1, E)
                out = mr.update_expert_bias(b, counts, rate)
                assert out is b
                return b

            got, cpu = both(run)
            close(got, cpu, msg=f"bias rate={rate}")


STATS_INT = ("selected_counts", "kept_counts", "dropped", "nonfinite_logits", "num_tokens")
STATS_FLOAT = ("max_violation", "mean_entropy", "mean_lse", "max_lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("t", [0, 1, 37, 300])
def test_router_stats(dtype, t):
    z = ref.tie_free_logits(t, E, seed=2, dtype=dtype)
    if t > 5:
        z[3, 4] = float("nan")
        z[5, 1] = float("-inf")
    idx = _idx(t, K, E, seed=t)
    if t:
        idx[::6, 0] = -1
    g = torch.Generator().manual_seed(t)
    slot = torch.where((torch.rand(t, K, generator=g) > 0.2) & (idx >= 0), 0, -1)  # -1 where unrouted
    mask = torch.arange(t) % 9 == 0
    for kw in ({}, {"slot": slot}, {"padding_mask": mask}, {"slot": slot.int(), "padding_mask": mask}):
        s, s_cpu = both(lambda: mr.router_stats(z, idx, **kw))
        for f in STATS_INT:
            a, b = getattr(s, f), getattr(s_cpu, f)
            if a is None or b is None:
                assert a is None and b is None, f
            else:
                close(a, b, msg=f"{f} {kw.keys()}")
        for f in STATS_FLOAT:
            close(getattr(s, f), getattr(s_cpu, f), torch.float32, msg=f"{f} {list(kw)}")
        # the op's raw outputs too (kept zeros without a slot)
        sl, pm = kw.get("slot"), kw.get("padding_mask")
        got, cpu = both(lambda: torch.ops.moe_router.router_stats(z, idx, sl, pm, False))
        close_all(got, cpu, ["selected", "kept", "ints", "floats"], torch.float32, what=f"router_stats op {list(kw)}")


def test_router_stats_strict():
    z = ref.tie_free_logits(37, E, seed=2)
    idx = _idx(37, K, E)
    # finite logits: strict passes on both
    s, s_cpu = both(lambda: mr.router_stats(z, idx, strict=True))
    close(s.nonfinite_logits, s_cpu.nonfinite_logits)
    z[3, 4] = float("nan")
    msgs = []
    for on_emu in (True, False):
        before = _calls()
        with emu() if on_emu else contextlib.nullcontext():
            with pytest.raises(ValueError, match="non-finite") as info:
                mr.router_stats(z, idx, strict=True)
        assert (_calls() > before) == on_emu
        msgs.append(str(info.value))
    assert msgs[0] == msgs[1], "strict mode raises another message on the CUDA branch"
    # a non-finite logit on a padding token is not counted: strict passes
    mask = torch.zeros(37, dtype=torch.bool)
    mask[3] = True
    s, s_cpu = both(lambda: mr.router_stats(z, idx, padding_mask=mask, strict=True))
    close(s.nonfinite_logits, s_cpu.nonfinite_logits)


def test_router_stats_out_of_range_indices_are_ignored():
    z = ref.tie_free_logits(30, E, seed=1)
    idx = _idx(30, K, E, seed=1)
    bad = idx.clone()
    bad[1, 0], bad[2, 2] = E, -3
    fixed = torch.where((bad >= 0) & (bad < E), bad, -1)
    slot = torch.where(fixed >= 0, 0, -1)
    with emu():
        s = mr.router_stats(z, bad, slot=slot)
    want = mr.router_stats(z, fixed, slot=slot)
    close(s.selected_counts, want.selected_counts, msg="selected")
    close(s.kept_counts, want.kept_counts, msg="kept")


# --------------------------------------------------------------------------------------
# Empty inputs (T = 0) through every op


def test_empty_inputs():
    z0 = torch.empty(0, E)
    x0 = torch.empty(0, H)

    def run():
        z = z0.clone().requires_grad_()
        w, i = mr.topk_gating(z, K)
        losses = mr.aux_loss(z, K) + mr.z_loss(z) + mr.seq_aux_loss(z, K, 4)
        (w.sum() + losses).backward()
        d = mr.dispatch(i, w.detach(), E, capacity=3)
        dl = mr.dispatch(i, w.detach(), E, layout="dropless", align=4, ep_size=2)
        c = mr.expert_choice(z0, 2)
        buf = mr.permute(x0, d.row_to_token, d.row)
        out = mr.unpermute(buf, d.row, d.kept_weights)
        s = mr.router_stats(z0, i, slot=d.slot)
        m = mr.expert_mask(0, E, K, 0.5)
        ai, aw = mr.assignment_dropout(i, w.detach(), 0.5, num_experts=E)
        return (w.detach(), i, losses.detach(), z.grad, d.row_to_token, d.num_rows, d.dropped, dl.row_to_token,
                dl.expert_offsets, dl.rows_per_rank, c.row_to_token, c.row_weights, buf, out, s.selected_counts,
                s.num_tokens, s.mean_lse, m, ai, aw)  # fmt: skip

    got, cpu = both(run)
    for n, (a, b) in enumerate(zip(got, cpu)):
        close(a, b, torch.float32, msg=f"output {n}")
    assert float(got[2]) == 0.0


# --------------------------------------------------------------------------------------
# Modules: TopKRouter / MoELayer have no CUDA-specific code; they run every op above.

ROUTER_CONFIGS = {
    "aux-z": dict(aux_loss_coeff=1e-2, z_loss_coeff=1e-3),
    "sigmoid-groups-bias-seq": dict(score_function="sigmoid", num_groups=4, group_topk=2, enable_expert_bias=True,
                                    load_balancing_type="seq_aux_loss", aux_loss_coeff=1e-2),
    "capacity-dropout-noise": dict(capacity_factor=1.0, token_drop_policy="probs", renormalize_after_drop=True,
                                   expert_dropout=0.2, noise_std=0.1, expert_mask_rate=0.2, input_jitter_eps=0.01,
                                   seed=5),
    "global-aux-pad": dict(load_balancing_type="global_aux_loss", aux_loss_coeff=1e-2, capacity_factor=1.5,
                           pad_expert_input_to_capacity=True, token_drop_policy="random"),
    "dropless-align-pre-softmax": dict(dropless_align=4, pre_softmax=True, z_loss_coeff=1e-2, loss_mode="return"),
}  # fmt: skip


def _router_out(r):
    d = r.dispatch
    st = r.stats
    return [r.weights.detach(), r.indices, r.aux_loss.detach(), r.z_loss.detach(), r.tokens_per_expert,
            r.selected_indices] + ([getattr(d, f).detach() for f in d._fields] if d is not None else []) + \
        [getattr(st, f) for f in STATS_INT + STATS_FLOAT if getattr(st, f) is not None]  # fmt: skip


@pytest.mark.parametrize("config", list(ROUTER_CONFIGS))
def test_topk_router(config):
    kw = ROUTER_CONFIGS[config]
    x0 = torch.randn(4, 16, H, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(4, 16, dtype=torch.bool)
    pad[1, 10:] = True

    def run():
        torch.manual_seed(0)
        r = TopKRouter(H, E, K, gate_init_std=0.5, **kw)
        r.train()
        outs = []
        for step in range(2):  # two steps: the rng offset and the bias update move on
            o = r(x0, padding_mask=pad if step else None)
            loss = (o.weights * torch.arange(1, K + 1)).square().sum()
            if r.loss_mode == "return":
                loss = loss + o.aux_loss + o.z_loss
            loss.backward()
            outs += _router_out(o) + [r.gate.weight.grad.clone()]
            if r.enable_expert_bias:
                r.update_bias()
                outs.append(r.expert_bias.clone())
        replay = r(x0, replay_indices=outs[5].reshape(4, 16, K))  # selected_indices
        outs += _router_out(replay)
        return outs

    got, cpu = both(run)
    assert len(got) == len(cpu)
    for n, (a, b) in enumerate(zip(got, cpu)):
        close(a, b, torch.float32, msg=f"{config}: output {n}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", ["aux-z", "capacity-dropout-noise", "global-aux-pad"])
def test_moe_layer(dtype, config):
    x0 = torch.randn(2, 24, H, generator=torch.Generator().manual_seed(1)).to(dtype)

    def run():
        torch.manual_seed(1)
        layer = MoELayer(H, 32, E, K, dtype=dtype, gate_init_std=0.5, **ROUTER_CONFIGS[config])
        layer.train()
        x = x0.clone().requires_grad_()
        out, r = layer(x)
        (out.float().square().mean() + r.aux_loss + r.z_loss).backward()
        return [out.detach(), x.grad] + [p.grad for p in layer.parameters()] + _router_out(r)

    got, cpu = both(run)
    assert len(got) == len(cpu)
    for n, (a, b) in enumerate(zip(got, cpu)):
        close(a, b, dtype if a.dtype == dtype else torch.float32, msg=f"{config} {dtype}: output {n}")


# --------------------------------------------------------------------------------------
# opcheck of every op on its CUDA branch (schema, fake vs real kernel, autograd)


@pytest.mark.parametrize("name", ops.CUSTOM_OPS)
def test_opcheck_on_the_cuda_branch(name):
    from test_opcheck import SAMPLES

    op = getattr(torch.ops.moe_router, name).default
    with emu():
        for args in SAMPLES[name]:
            args = tuple(copy.deepcopy(a) if isinstance(a, torch.Tensor) else a for a in args)
            torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# --------------------------------------------------------------------------------------
# Last: every CUDA binding ran (only meaningful when the whole module ran).

EVERY_OP = set(ops.NATIVE_OPS) - {
    "capacity",
    "dispatch_max_rows",
    "expert_mask_len",
    "expert_choice_num_rows",
    "cuda_device_count",
    "cuda_warmup",  # test_warmup_loads_every_kernel_module
}  # size and device functions: no op's CUDA branch


def test_every_cuda_binding_was_exercised(request):
    if request.config.getoption("keyword") or request.config.getoption("markexpr"):
        pytest.skip("a -k / -m selection ran only part of the module")
    called = _native._cuda_calls()
    missing = sorted(EVERY_OP - set(called))
    assert not missing, f"ops whose CUDA branch never ran under the emulator: {missing} (called: {called})"


def test_the_callers_cuda_context_is_restored(emulator_device):
    # The backend binds its device's primary context to the thread; the binding must put
    # back whatever was current before (here: no context), or PyTorch's next runtime call
    # on this thread would run on the wrong device.
    lib = ctypes.CDLL(emulator_device)
    cur = ctypes.c_void_p()

    def current():
        assert lib.cuCtxGetCurrent(ctypes.byref(cur)) == 0
        return cur.value

    before = current()
    with emu():
        mr.topk_gating(torch.randn(8, 6), 2)
    assert current() == before


def test_warmup_loads_every_kernel_module(emulator_device):
    # NVRTC compiles (or the PTX cache provides) every module and the driver loads it:
    # no later op compiles or loads anything (what a CUDA-graph capture needs).
    from moe_router import _native as n

    assert n.cuda_warmup(0) == 8  # one module per cuda/*.cu file
