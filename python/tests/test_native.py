"""The native module's own checks, called directly: it takes tensors (read through
DLPack: shape, strides, dtype, device) and keyword options, so no call, whatever its
arguments, can make it read or write memory its tensors do not own. A wrong call is a
Python exception (TypeError / ValueError) naming the argument, never undefined
behaviour. Also the packaging promises (no torch import at load, abi3, stubs, py.typed)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch
from test_dropout import _routing

import moe_router
from moe_router import _native, ops

PKG = os.path.dirname(moe_router.__file__)


def _gating(z, w, i, bias=None, **kw):
    kw.setdefault("topk", 2)
    return _native.topk_gating(z, bias, w, i, **kw)


def _bufs(t=4, e=8, k=2):
    return torch.randn(t, e), torch.empty(t, k), torch.empty(t, k, dtype=torch.int32)


def test_native_call_with_valid_tensors_works():
    z, w, i = _bufs()
    _gating(z, w, i)
    assert torch.equal(i.long(), torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :2])


def test_addresses_are_not_accepted():
    # The old interface's (data_ptr, numel) pairs: a wrong count or a stale address used
    # to be a segfault. Now they are not tensors.
    with pytest.raises(TypeError, match="moe_router.permute: `x` must be a torch.Tensor"):
        _native.permute((0x1000, 8), (0x2000, 2), (0x3000, 8))
    with pytest.raises(TypeError, match="`row_to_token` must be a torch.Tensor"):
        _native.permute(torch.zeros(2, 4), 17, torch.zeros(2, 4))


@pytest.mark.parametrize("what", ["logits", "weights", "indices"])
def test_shapes_must_agree(what):
    z, w, i = _bufs()
    args = {"logits": z, "weights": w, "indices": i}
    args[what] = torch.cat([args[what], args[what][:1]])  # one row more than the others
    with pytest.raises(ValueError, match="has shape"):
        _gating(args["logits"], args["weights"], args["indices"])


def test_smaller_output_than_the_op_writes_is_refused():
    x, r2t = torch.randn(4, 8), torch.tensor([3, -1, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"`out` has shape \[3, 8\], expected \[4, 8\]"):
        _native.permute(x, r2t, torch.empty(3, 8))


def test_wrong_dtypes_are_type_errors():
    z, w, i = _bufs()
    with pytest.raises(TypeError, match="`logits` has dtype torch.float64"):
        _gating(z.double(), w, i)
    with pytest.raises(TypeError, match="`indices` has dtype torch.int64, expected torch.int32"):
        _gating(z, w, i.long())
    with pytest.raises(TypeError, match="`weights` has dtype torch.float16"):
        _gating(z, w.half(), i)


def test_non_contiguous_tensors_are_refused_not_misread():
    z, w, i = _bufs(8, 4)
    with pytest.raises(ValueError, match="`logits` is not contiguous"):
        _gating(z.t().contiguous().t(), w, i)
    wide = torch.empty(8, 4)
    with pytest.raises(ValueError, match="`weights` is not contiguous"):
        _gating(z, wide[:, :2], i)
    # a view that is contiguous (a row slice) is fine
    _gating(torch.randn(16, 4)[4:12], w, i)


def test_overlapping_outputs_are_rejected():
    base = torch.randn(40)
    z, i = base[:32].view(4, 8), torch.empty(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="output `weights` overlaps `logits`"):
        _gating(z, base[24:32].view(4, 2), i)  # weights written over the last logits
    raw = torch.empty(12, dtype=torch.int32)
    with pytest.raises(ValueError, match="overlaps"):
        _gating(torch.randn(4, 8), raw[4:12].view(torch.float32).view(4, 2), raw[:8].view(4, 2))


def test_tensors_without_dense_storage_are_refused():
    z, w, i = _bufs()
    with pytest.raises(ValueError, match="`weights` cannot be read as a dense strided tensor"):
        _gating(z, torch.empty(4, 2, device="meta"), i)
    with pytest.raises(ValueError, match="`logits` cannot be read"):
        _gating(z.to_sparse(), w, i)


@pytest.mark.parametrize(
    "kw, exc, needle",
    [
        ({"topk": -1}, ValueError, "`topk` = -1 is out of range"),
        ({"topk": 2**64}, ValueError, "out of range"),
        ({"topk": "2"}, TypeError, "`topk` must be an int"),
        ({"topk": 2, "seed": -1}, ValueError, "`seed` = -1 is out of range"),
        ({"topk": 2, "bogus": 1}, TypeError, "unexpected option `bogus`"),
        ({"topk": 2, "score_function": "tanh"}, ValueError, "score_function"),
        ({"topk": 2, "num_groups": 2}, ValueError, "give both"),
        ({}, TypeError, "missing option `topk`"),
    ],
)
def test_options_are_checked(kw, exc, needle):
    z, w, i = _bufs()
    with pytest.raises(exc, match=needle):
        _native.topk_gating(z, None, w, i, **kw)


def test_core_errors_map_to_value_error_with_the_package_prefix():
    z, w, i = _bufs()
    with pytest.raises(ValueError, match=r"^moe_router\.topk_gating: .*`topk`"):
        _native.topk_gating(z, None, torch.empty(4, 9), torch.empty(4, 9, dtype=torch.int32), topk=9)


def test_empty_tensors_work():
    z, w, i = _bufs(0)
    _gating(z, w, i)
    x = torch.empty(0, 8)
    _native.permute(x, torch.empty(0, dtype=torch.int32), torch.empty(0, 8))


def test_storage_offset_views_are_read_at_their_offset():
    big = torch.randn(10, 8)
    z = big[3:7]  # contiguous, non-zero storage offset
    w, i = torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    _gating(z, w, i)
    assert torch.equal(i.long(), torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :2])


def test_core_errors_map_to_value_error():
    z = torch.randn(4, 8)
    counts = torch.full((8,), -1, dtype=torch.int64)
    loss, out, total = torch.empty(()), torch.empty(8, dtype=torch.int64), torch.empty((), dtype=torch.int64)
    with pytest.raises(ValueError, match="count"):
        _native.aux_loss(z, None, counts, None, loss, out, total, topk=2)


def test_native_module_does_not_import_torch():
    # Load the extension by file, without the package __init__ (which imports torch).
    code = (
        "import sys, importlib.machinery as m, importlib.util as u\n"
        f"loader = m.ExtensionFileLoader('moe_router._native', {_native.__file__!r})\n"
        "spec = u.spec_from_file_location('moe_router._native', loader.path, loader=loader)\n"
        "n = u.module_from_spec(spec); spec.loader.exec_module(n)\n"
        "print(n.__version__); assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == moe_router.__version__


def test_native_module_is_an_abi3_extension():
    assert os.path.basename(_native.__file__).endswith((".abi3.so", ".pyd"))


def test_py_typed_and_stub_match_the_native_module():
    assert os.path.exists(os.path.join(PKG, "py.typed"))
    stub = ast.parse(open(os.path.join(PKG, "_native.pyi")).read())
    stubbed = {n.name for n in stub.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
    assert ops.NATIVE_OPS <= stubbed, f"functions without a stub: {sorted(ops.NATIVE_OPS - stubbed)}"
    # ... and this build provides every one of them (no op of the API is missing).
    assert stubbed <= ops.NATIVE_OPS, f"not built: {sorted(stubbed - ops.NATIVE_OPS)}"


def test_custom_ops_are_registered_under_the_namespace():
    for name in ops.CUSTOM_OPS:
        assert hasattr(torch.ops.moe_router, name), name


def test_public_api_is_exported():
    for name in moe_router.__all__:
        if name in moe_router._MODULE_EXPORTS and not os.path.exists(os.path.join(PKG, "modules.py")):
            continue
        assert getattr(moe_router, name) is not None


def test_meta_tensors_go_through_the_fake_kernels():
    z = torch.empty(10, 8, device="meta")
    w, idx = moe_router.topk_gating(z, 2)
    assert w.device.type == "meta" and w.shape == (10, 2) and idx.dtype == torch.int64
    assert moe_router.z_loss(z).shape == ()


def test_warmup_is_for_cuda_devices():
    with pytest.raises(ValueError, match="moe_router.warmup: invalid `device`"):
        moe_router.warmup("cpu")


# Bad direct calls of the dropout, bias-update and statistics bindings.


def _native_calls():
    from moe_router import _native as n

    t, k, e = 6, 2, 8
    idx, w = _routing(t, k, e, seed=9, unrouted=False)
    idx = idx.int()
    z = torch.randn(t, e)

    def drop(**kw):
        a = dict(indices=idx, weights=w, out_indices=torch.empty(t, k, dtype=torch.int32),
                 out_weights=torch.empty(t, k), keep=torch.empty(t, k, dtype=torch.bool),
                 dropped=torch.empty((), dtype=torch.int64))  # fmt: skip
        opts = dict(num_experts=e, rate=0.5, seed=1, offset=2, renormalize=True)
        opts.update({o: kw.pop(o) for o in list(kw) if o not in a})  # `...`: leave the option out
        a.update(kw)
        return lambda: n.assignment_dropout(*a.values(), **{o: v for o, v in opts.items() if v is not ...})

    def stats(**kw):
        a = dict(logits=z, indices=idx, selected_counts=torch.empty(e, dtype=torch.int64),
                 kept_counts=torch.empty(e, dtype=torch.int64), scalars=torch.empty(4, dtype=torch.int64),
                 floats=torch.empty(4))  # fmt: skip
        opts = dict(slot=None, padding_mask=None, strict=False)
        opts.update({o: kw.pop(o) for o in list(kw) if o not in a})
        a.update(kw)
        return lambda: n.router_stats(*a.values(), **opts)

    bias = torch.zeros(e)
    shared = torch.zeros(e, dtype=torch.int64)  # bias (its first half, as float32) over counts
    return [
        (
            "mask/dtype",
            lambda: n.expert_mask(torch.empty(t, e, dtype=torch.uint8), topk=k, rate=0.5, seed=0, offset=0),
            TypeError,
            "masked",
        ),
        (
            "mask/1d",
            lambda: n.expert_mask(torch.empty(e, dtype=torch.bool), topk=k, rate=0.5, seed=0, offset=0),
            ValueError,
            "masked",
        ),
        (
            "mask/rate",
            lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=1.0, seed=0, offset=0),
            ValueError,
            "rate",
        ),
        (
            "mask/seed-neg",
            lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=-1, offset=0),
            ValueError,
            "seed",
        ),
        (
            "mask/missing-opt",
            lambda: n.expert_mask(torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=0),
            TypeError,
            "offset",
        ),
        (
            "mask/unknown-opt",
            lambda: n.expert_mask(
                torch.empty(t, e, dtype=torch.bool), topk=k, rate=0.5, seed=0, offset=0, device="cpu"
            ),
            TypeError,
            "device",
        ),
        (
            "mask/not-a-tensor",
            lambda: n.expert_mask([[False]], topk=1, rate=0.5, seed=0, offset=0),
            TypeError,
            "masked",
        ),
        ("drop/indices-i64", drop(indices=idx.long()), TypeError, "indices"),
        ("drop/weights-shape", drop(weights=w[:1]), ValueError, "weights"),
        ("drop/keep-dtype", drop(keep=torch.empty(t, k, dtype=torch.uint8)), TypeError, "keep"),
        ("drop/dropped-shape", drop(dropped=torch.empty(1, dtype=torch.int64)), ValueError, "dropped"),
        ("drop/out-over-input", drop(out_weights=w), ValueError, "overlaps"),
        ("drop/strided", drop(weights=torch.rand(t, 2 * k)[:, ::2]), ValueError, "contiguous"),
        ("drop/renormalize-str", drop(renormalize="yes"), TypeError, "renormalize"),
        ("drop/no-experts-opt", drop(num_experts=...), TypeError, "num_experts"),
        (
            "drop-bwd/grad-shape",
            lambda: n.assignment_dropout_backward(
                idx, w, torch.ones(t, k, dtype=torch.bool), w[:, :1], torch.empty(t, k), renormalize=False
            ),
            ValueError,
            "grad_out",
        ),
        (
            "bias/counts-i32",
            lambda: n.update_expert_bias(bias, torch.ones(e, dtype=torch.int32), rate=0.1),
            TypeError,
            "counts",
        ),
        (
            "bias/counts-len",
            lambda: n.update_expert_bias(bias, torch.ones(e + 1, dtype=torch.int64), rate=0.1),
            ValueError,
            "counts",
        ),
        (
            "bias/strided",
            lambda: n.update_expert_bias(torch.zeros(2 * e)[::2], torch.ones(e, dtype=torch.int64), rate=0.1),
            ValueError,
            "contiguous",
        ),
        (
            "bias/overlaps-counts",
            lambda: n.update_expert_bias(shared.view(torch.float32)[:e], shared[:e], rate=0.1),
            ValueError,
            "overlaps",
        ),
        ("stats/logits-f64", stats(logits=z.double()), TypeError, "logits"),
        ("stats/indices-rows", stats(indices=idx[:-1]), ValueError, "indices"),
        ("stats/slot-shape", stats(slot=idx[:, :1]), ValueError, "slot"),
        ("stats/mask-dtype", stats(padding_mask=torch.zeros(t, dtype=torch.uint8)), TypeError, "padding_mask"),
        ("stats/scalars-3", stats(scalars=torch.empty(3, dtype=torch.int64)), ValueError, "scalars"),
        ("stats/floats-f64", stats(floats=torch.empty(4, dtype=torch.float64)), TypeError, "floats"),
        ("stats/device-mix", stats(logits=z.to("meta")), ValueError, "logits"),
        ("stats/slot-list", stats(slot=[[0]]), TypeError, "slot"),
        (
            "stats/strict-missing",
            lambda: n.router_stats(
                z, idx, *[torch.empty(e, dtype=torch.int64)] * 2, torch.empty(4, dtype=torch.int64), torch.empty(4)
            ),
            TypeError,
            "strict",
        ),
    ]


NATIVE_CASES = _native_calls()


@pytest.mark.parametrize("thunk,exc,needle", [c[1:] for c in NATIVE_CASES], ids=[c[0] for c in NATIVE_CASES])
def test_native_binding_rejects_a_bad_call(thunk, exc, needle):
    with pytest.raises(exc) as info:
        thunk()
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {info.value}"
    assert needle in str(info.value) and str(info.value).startswith("moe_router."), str(info.value)
