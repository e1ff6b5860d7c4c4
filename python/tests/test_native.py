"""The native module's own checks, called directly with raw (data_ptr, numel) pairs: a
wrong call is a Python exception (ValueError / TypeError), never undefined behaviour;
and the packaging promises (no torch import, abi3, stubs, py.typed)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest
import torch

import moe_router
from moe_router import _native, ops

PKG = os.path.dirname(moe_router.__file__)


def buf(t):
    return (t.data_ptr(), t.numel())


def _gating(logits, t, e, weights, indices, dtype="f32", k=2, bias=None):
    return _native.topk_gating(dtype, logits, t, e, bias, k, "softmax", False, False, None, None, 1.0, 0.0, 0.0, 0, 0,
                               weights, indices)  # fmt: skip


def test_native_call_with_valid_buffers_works():
    z, w, i = torch.randn(4, 8), torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    _gating(buf(z), 4, 8, buf(w), buf(i))
    assert torch.equal(i.long(), torch.sort(z, dim=-1, descending=True, stable=True).indices[:, :2])


@pytest.mark.parametrize("what", ["logits", "weights", "indices"])
def test_numel_must_match_the_sizes(what):
    z, w, i = torch.randn(4, 8), torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    args = {"logits": buf(z), "weights": buf(w), "indices": buf(i)}
    args[what] = (args[what][0], args[what][1] + 1)  # claims one element more than the sizes say
    with pytest.raises(ValueError, match=what):
        _gating(args["logits"], 4, 8, args["weights"], args["indices"])


def test_unknown_dtype_is_a_type_error():
    z, w, i = torch.randn(4, 8), torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    with pytest.raises(TypeError, match="f64"):
        _gating(buf(z), 4, 8, buf(w), buf(i), dtype="f64")


def test_null_and_misaligned_pointers_are_rejected():
    z, w, i = torch.randn(4, 8), torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="null"):
        _gating((0, 32), 4, 8, buf(w), buf(i))
    with pytest.raises(ValueError, match="aligned"):
        _gating((z.data_ptr() + 2, 32), 4, 8, buf(w), buf(i))


def test_overlapping_output_is_rejected():
    z = torch.randn(4, 8)
    i = torch.empty(4, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="overlaps"):
        _gating(buf(z), 4, 8, (z.data_ptr(), 8), buf(i))  # weights written over the logits
    w = torch.empty(4, 2)
    with pytest.raises(ValueError, match="overlaps"):
        _gating(buf(z), 4, 8, buf(w), (w.data_ptr() + 4, 8))  # two outputs sharing memory


def test_size_overflow_is_rejected():
    with pytest.raises(ValueError):
        _gating((64, 2**62), 2**31, 2**31, (64, 4), (64, 4))


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
    stubbed = {n.name for n in stub.body if isinstance(n, ast.FunctionDef)}
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
