"""Adversarial suite (docs/hardening.md): hundreds of generated cases over every public
function of ``moe_router`` (``moe_router.__all__``), the ``TopKRouter`` / ``MoELayer``
modules (construction, forward, backward) and the ``moe_router._native`` functions
called directly.

Every case is a call with one adversarial ingredient: a wrong Python type (None, str,
list, NumPy array, Python scalar), every torch dtype, the meta device, a layout
(non-contiguous, transposed, zero-stride expanded, storage offset, negative-bit view,
sparse COO / CSR, nested), sizes at and past every limit (0, 1, 2**31 - 1, 2**31,
2**63, 2**64, negative, huge k / E / capacity), NaN / +-inf / huge / subnormal values,
out-of-range and repeated indices, aliasing (an output passed as an input of ``_native``,
the same tensor twice), several Python threads calling the ops at once, torch.compile
(dynamic=True) over several sizes, and autograd paths. Each case is classified as

- **result**: the call returned and the result agrees with docs/semantics.md (shapes,
  dtypes, devices, finiteness where the input is finite, index ranges, counts that add
  up, and, where it is cheap, values against ``reference.py``'s float64 torch
  reimplementation); a layout variant must give exactly what its contiguous equivalent
  gives (the same result, or the same error);
- **clear error**: a ``TypeError`` / ``ValueError`` whose message starts with
  ``moe_router.`` and names the argument;

and anything else fails: another exception type, a message that does not name the
argument, a crash, a result that breaks the contract, a case slower than
``CASE_SECONDS`` or growing the peak RSS by more than ``CASE_RSS_MIB``. Cases whose
expected outcome is fixed (a wrong dtype must be an error, a valid call must be a
result) are checked against it as well.

The riskiest cases (direct ``_native`` calls with hostile tensors, sizes at the limits)
run in one subprocess per batch (``python test_adversarial.py --child``) with an
address-space limit, reporting one JSON line per case: a segfault or an abort fails the
case it happened in, by name, and the batch resumes after it.

Known findings that are not fixed yet are strict ``xfail``s naming the finding
(docs/hardening.md): they fail the run as soon as they are fixed, so that the marker is
removed. The last test prints ``adversarial: tried N, results R, clear errors E, ...``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `reference`, also in the child

import moe_router as mr  # noqa: E402
import reference as ref  # noqa: E402
from moe_router import _native  # noqa: E402
from moe_router import ops as _ops  # noqa: E402

# torch's own notices about the prototype layouts the cases build on purpose
pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta:UserWarning"),
    pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype:UserWarning"),
]

CASE_SECONDS = 10.0
CASE_RSS_MIB = 512
#: Wall-clock budget of the whole file (2-core CI machine); the summary test checks it.
BUDGET_SECONDS = float(os.environ.get("MOE_ROUTER_ADV_BUDGET_S", "150"))
#: Address-space headroom of the subprocess batches over what torch needs after import.
CHILD_HEADROOM_BYTES = 3 << 30

T, E, K, H = 6, 8, 2, 4
META = torch.device("meta")
OMIT = object()  # an argument left out of the call

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint16,
    torch.uint32,
    torch.uint64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
INDEX = (torch.int32, torch.int64)
ACCEPTED = {"float": FLOATS, "f32": (torch.float32,), "index": INDEX, "bool": (torch.bool,), "count": INDEX}


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


# --------------------------------------------------------------------------------------
# Cases and their judge


@dataclasses.dataclass
class Case:
    id: str
    thunk: Callable[[], Any]
    expect: str = "either"  # "result", "error" or "either"
    names: Tuple[str, ...] = ()  # an error message must name one of these
    check: Optional[Callable[[Any], None]] = None  # validates a result
    same_as: Optional[Callable[[], Any]] = None  # must behave exactly as this equivalent call
    isolate: bool = False  # run in a subprocess batch
    known: Optional[str] = None  # a known finding (docs/hardening.md): strict xfail


class Verdict(Exception):
    """A case that is neither a conforming result nor a clear error."""


def _maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _names_argument(msg: str, names: Sequence[str]) -> bool:
    return any(re.search(r"(?<![\w.])" + re.escape(n) + r"(?!\w)", msg) for n in names)


def _flat(out) -> List[Any]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _flat(o)]
    if dataclasses.is_dataclass(out):
        return _flat([getattr(out, f.name) for f in dataclasses.fields(out)])
    return [out]


def _same_outputs(a, b) -> Optional[str]:
    fa, fb = _flat(a), _flat(b)
    if len(fa) != len(fb):
        return f"{len(fa)} outputs vs {len(fb)}"
    for i, (x, y) in enumerate(zip(fa, fb)):
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device:
                return f"output {i}: {x.dtype}{tuple(x.shape)}@{x.device} vs {y.dtype}{tuple(y.shape)}@{y.device}"
            if x.device.type == "meta":
                continue
            xs, ys = x.detach(), y.detach()
            if not torch.equal(
                torch.isnan(xs) if xs.is_floating_point() else xs, torch.isnan(ys) if ys.is_floating_point() else ys
            ):
                return f"output {i} differs"
            if xs.is_floating_point() and not torch.equal(torch.nan_to_num(xs, 0.0), torch.nan_to_num(ys, 0.0)):
                return f"output {i} differs: max |diff| {float((xs - ys).abs().nan_to_num(0).max())}"
        elif isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor) or x != y:
            return f"output {i}: {x!r} vs {y!r}"
    return None


def _run(thunk) -> Tuple[Any, Optional[BaseException], float, int]:
    rss0, t0 = _maxrss_kib(), time.perf_counter()
    try:
        out, err = thunk(), None
    except Exception as e:  # noqa: BLE001 -- classified below
        out, err = None, e
    return out, err, time.perf_counter() - t0, _maxrss_kib() - rss0


def judge(case: Case) -> Tuple[str, str]:
    """Run the case; return ("result", "") or ("error", its message), or raise Verdict."""
    out, err, dt, grown_kib = _run(case.thunk)
    if dt > CASE_SECONDS:
        raise Verdict(f"took {dt:.1f} s > {CASE_SECONDS} s")
    if grown_kib > CASE_RSS_MIB * 1024:
        raise Verdict(f"peak RSS grew by {grown_kib // 1024} MiB > {CASE_RSS_MIB} MiB")
    try:
        return _judge(case, out, err)
    except Verdict:
        raise
    except Exception as e:  # noqa: BLE001 -- the judge itself must never be the failure
        raise Verdict(f"could not judge the outcome: {type(e).__name__}: {e}") from None


def _judge(case: Case, out, err) -> Tuple[str, str]:
    if case.same_as is not None:
        out2, err2, _, _ = _run(case.same_as)
        if (err is None) != (err2 is None):
            raise Verdict(
                f"differs from its contiguous equivalent: {type(err).__name__ if err else 'result'}"
                f" ({err}) vs {type(err2).__name__ if err2 else 'result'} ({err2})"
            )
        if err is None:
            diff = _same_outputs(out, out2)
            if diff:
                raise Verdict(f"result differs from its contiguous equivalent: {diff}")
        elif type(err) is not type(err2) or str(err) != str(err2):
            raise Verdict(f"error differs from its equivalent's: {err!r} vs {err2!r}")
    if err is not None:
        msg = str(err)
        if type(err) not in (TypeError, ValueError):
            raise Verdict(f"{type(err).__name__}: {msg[:400]}")
        if not msg.startswith("moe_router."):
            raise Verdict(f"{type(err).__name__} without the moe_router. prefix: {msg[:400]}")
        if case.names and not _names_argument(msg, case.names):
            raise Verdict(f"error does not name any of {case.names}: {msg[:400]}")
        if case.expect == "result":
            raise Verdict(f"a valid call raised {type(err).__name__}: {msg[:400]}")
        return "error", f"{type(err).__name__}: {msg}"
    if case.expect == "error":
        raise Verdict(f"expected a clear error naming {case.names}, got a result")
    if case.check is not None:
        try:
            case.check(out)
        except AssertionError as e:
            raise Verdict(f"result breaks the contract: {e}") from None
        except Exception as e:  # noqa: BLE001 -- a result the checker cannot even read
            raise Verdict(f"result cannot be checked: {type(e).__name__}: {e}") from None
    return "result", ""


# --------------------------------------------------------------------------------------
# Inputs


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _logits(t=T, e=E, seed=0) -> torch.Tensor:
    return ref.tie_free_logits(t, e, seed=seed)


def _topk_idx(z: torch.Tensor, k: int) -> torch.Tensor:
    return ref.stable_topk(z.float(), k) if z.numel() else torch.zeros((z.shape[0], k), dtype=torch.int64)


def _weights(t=T, k=K, seed=1) -> torch.Tensor:
    return torch.rand(t, k, generator=_g(seed)) + 0.05


def _plan(t=T, e=E, k=K, capacity=None, layout="compact"):
    z = _logits(t, e)
    return mr.dispatch(_topk_idx(z, k), _weights(t, k), e, capacity=capacity, layout=layout)


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t.float()).all()) if t.numel() else True


def _is_meta(*ts) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in ts)


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _close(got: torch.Tensor, want: torch.Tensor, rtol=1e-4, atol=1e-5, what=""):
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=atol, equal_nan=True, msg=what or None)


# --------------------------------------------------------------------------------------
# Result checks (docs/semantics.md), one per public function. `a` is the call's
# arguments by name (after the mutation), `out` what the call returned.


def _arg(a, name, default=None):
    """The argument's value; its default if omitted or None (None means the default
    for every option here that has one)."""
    v = a.get(name, default)
    return default if v is OMIT or v is None else v


def chk_topk_gating(a, out):
    w, idx = out
    z, k = a["logits"], a["topk"]
    t, e = z.shape
    assert w.shape == (t, k) and idx.shape == (t, k), f"shapes {tuple(w.shape)}, {tuple(idx.shape)}"
    assert w.dtype == torch.float32 and idx.dtype == torch.int64, f"dtypes {w.dtype}, {idx.dtype}"
    assert w.device == z.device == idx.device
    if _is_meta(z):
        return
    assert bool(((idx >= 0) & (idx < e)).all()), "index out of range"
    if k > 1:
        assert bool((idx.sort(-1).values.diff(dim=-1) != 0).all()), "repeated index within a token"
    rows = torch.isfinite(z.float()).all(-1)
    assert _finite(w[rows]), "non-finite weight for finite logits"
    bias = _arg(a, "expert_bias")
    plain = _num(_arg(a, "noise_std", 0.0)) == 0.0 and _num(_arg(a, "expert_mask_rate", 0.0)) == 0.0
    scale = _num(_arg(a, "scaling_factor", 1.0))
    if plain and bool(rows.all()) and scale is not None and abs(scale) < 1e30:
        kw = dict(
            score_function=_arg(a, "score_function", "softmax"),
            pre_softmax=_arg(a, "pre_softmax", False),
            normalize=_arg(a, "normalize", False),
            bias=bias,
            num_groups=_arg(a, "num_groups"),
            group_topk=_arg(a, "group_topk"),
            scaling_factor=scale,
        )
        w_ref, i_ref = ref.topk_gating(z, k, **kw)
        assert torch.equal(idx, i_ref), f"indices {idx.tolist()} vs reference {i_ref.tolist()}"
        _close(w, w_ref, what="weights vs reference")


def chk_replay(a, w):
    z, idx = a["logits"], a["indices"]
    assert w.shape == idx.shape and w.dtype == torch.float32 and w.device == z.device
    if _is_meta(z):
        return
    rows = torch.isfinite(z.float()).all(-1)
    assert _finite(w[rows]), "non-finite weight for finite logits"
    scale = _num(_arg(a, "scaling_factor", 1.0))
    if bool(rows.all()) and scale is not None and abs(scale) < 1e30:
        w_ref = ref.gating_weights(
            z.double(),
            idx,
            score_function=_arg(a, "score_function", "softmax"),
            pre_softmax=_arg(a, "pre_softmax", False),
            normalize=_arg(a, "normalize", False),
            scaling_factor=scale,
        )
        _close(w, w_ref, what="replay weights vs reference")


def chk_capacity(a, c):
    assert isinstance(c, int) and 0 <= c <= 2**31 - 1, f"capacity {c!r}"
    # the Rust core's capacity, through the native module, must agree
    want = _native.capacity(
        a["num_tokens"],
        a["num_experts"],
        a["topk"],
        a["capacity_factor"],
        _arg(a, "min_capacity", 0),
        _arg(a, "capacity_multiple"),
    )
    assert c == want, f"capacity {c}, core {want}"


def chk_dispatch_max_rows(a, n):
    import operator

    cap = _arg(a, "capacity")
    want = _ops.dispatch_max_rows(
        operator.index(a["num_tokens"]),
        operator.index(a["topk"]),
        operator.index(a["num_experts"]),
        None if cap is None else operator.index(cap),
        _arg(a, "layout") or "compact",
        operator.index(_arg(a, "align") or 1),
    )
    assert n == want, f"max rows {n}, formula {want}"


def chk_dispatch(a, d):
    idx, w, e = a["indices"], a["weights"], a["num_experts"]
    import operator

    cap, layout = _arg(a, "capacity"), _arg(a, "layout") or "compact"
    cap = None if cap is None else operator.index(cap)
    e = operator.index(e)
    t, k = idx.shape
    rows = _ops.dispatch_max_rows(t, k, e, cap, layout, _arg(a, "align") or 1)
    assert isinstance(d, mr.Dispatch)
    for name, shape in (
        ("slot", (t, k)),
        ("row", (t, k)),
        ("kept_weights", (t, k)),
        ("tokens_per_expert", (e,)),
        ("row_to_token", (rows,)),
        ("expert_offsets", (e + 1,)),
        ("rows_per_rank", (_arg(a, "ep_size") or 1,)),
        ("dropped", ()),
        ("num_rows", ()),
    ):
        v = getattr(d, name)
        assert tuple(v.shape) == shape, f"{name} has shape {tuple(v.shape)}, expected {shape}"
        assert v.dtype == (torch.float32 if name == "kept_weights" else torch.int64), f"{name} dtype {v.dtype}"
    if _is_meta(idx):
        return
    idx = idx.long()
    routed, kept = idx >= 0, d.slot >= 0
    assert bool((kept <= routed).all()), "a kept assignment that was not routed"
    assert bool((d.row[~kept] == -1).all()) and bool((d.kept_weights[~kept] == 0).all()), "dropped with a row / weight"
    n = int(d.num_rows)
    off = d.expert_offsets
    assert int(off[0]) == 0 and int(off[-1]) == n and bool((off.diff() >= 0).all()), f"expert_offsets {off.tolist()}"
    assert int(d.dropped) == int(routed.sum() - kept.sum()), "dropped count"
    assert torch.equal(d.tokens_per_expert, torch.bincount(idx[kept], minlength=e)[:e]), "tokens_per_expert"
    tok = torch.arange(t)[:, None].expand(t, k)
    assert torch.equal(d.row_to_token[d.row[kept]], tok[kept]), "row_to_token[row] != token"
    assert bool((d.row_to_token[n:] == -1).all()), "tail of row_to_token not -1"
    assert int((d.row_to_token[:n] >= 0).sum()) == int(kept.sum()), "used rows != kept assignments"
    assert int(d.rows_per_rank.sum()) == n, "rows_per_rank"
    if cap is not None:
        assert bool((d.slot < cap).all()) and bool((d.tokens_per_expert <= cap).all()), "capacity exceeded"
    if not _arg(a, "renormalize", False):
        assert torch.equal(d.kept_weights[kept].nan_to_num(7.5), w.float()[kept].nan_to_num(7.5)), "kept weights"


def chk_expert_choice(a, o):
    z, c = a["logits"], a["capacity"]
    t, e = z.shape
    assert isinstance(o, mr.ExpertChoice)
    for name, shape in (
        ("weights", (t, e)),
        ("row", (t, e)),
        ("row_to_token", (e * c,)),
        ("tokens_per_expert", (e,)),
        ("expert_offsets", (e + 1,)),
        ("row_weights", (e * c,)),
    ):
        assert tuple(getattr(o, name).shape) == shape, f"{name} shape {tuple(getattr(o, name).shape)}"
    if _is_meta(z):
        return
    chosen = o.row >= 0
    assert bool((o.tokens_per_expert == min(c, t)).all()), "tokens_per_expert"
    assert torch.equal(chosen.sum(0), torch.full((e,), min(c, t))), "tokens chosen per expert"
    assert bool((o.weights[~chosen] == 0).all()), "weight of an unchosen pair"
    tok = torch.arange(t)[:, None].expand(t, e)
    assert torch.equal(o.row_to_token[o.row[chosen]], tok[chosen]), "row_to_token[row] != token"
    assert torch.equal(o.row_weights[o.row[chosen]].nan_to_num(7.5), o.weights[chosen].nan_to_num(7.5)), "row_weights"
    rows = torch.isfinite(z.float()).all(-1)
    assert _finite(o.weights[rows]), "non-finite weight for finite logits"
    if bool(rows.all()) and c > 0:
        p = torch.softmax(z.double(), -1)
        _close(o.weights[chosen], p[chosen], what="weights vs softmax")


def chk_permute(a, buf):
    x, r2t = a["x"], a["row_to_token"]
    assert buf.shape == (r2t.shape[0], x.shape[1]) and buf.dtype == x.dtype
    if _is_meta(x):
        return
    r = r2t.long()
    want = torch.where((r >= 0)[:, None], x[r.clamp(min=0)], torch.zeros((), dtype=x.dtype))
    assert torch.equal(
        buf.view(torch.int16 if x.element_size() == 2 else torch.int32),
        want.contiguous().view(torch.int16 if x.element_size() == 2 else torch.int32),
    ), "not a bitwise gather"


def chk_unpermute(a, out):
    y, row, w = a["y"], a["row"], a["weights"]
    t = row.shape[0]
    assert out.shape == (t, y.shape[1]) and out.dtype == y.dtype
    if _is_meta(y):
        return
    r = row.long()
    m = (r >= 0).double()
    want = (y.double()[r.clamp(min=0)] * (w.double() * m)[..., None]).sum(1)
    if _finite(y) and _finite(w) and bool((want.abs() < 1e37).all()):
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[y.dtype]
        _close(out, want, rtol=tol, atol=tol, what="unpermute vs reference")


def _loss_check(ref_fn):
    def chk(a, loss):
        z = a["logits"]
        assert loss.shape == () and loss.dtype == torch.float32 and loss.device == z.device
        if _is_meta(z):
            return
        coeff = _num(_arg(a, "coeff", 1.0))
        moderate = _finite(z) and (z.numel() == 0 or float(z.detach().float().abs().max()) <= 1e4)
        if moderate and coeff is not None and abs(coeff) <= 1e6:
            assert math.isfinite(float(loss.detach())), f"non-finite loss {float(loss.detach())} for finite logits"
            want = ref_fn(a, z.double(), coeff)
            if want is not None:
                _close(loss, want, rtol=1e-4, atol=1e-6, what="loss vs reference")

    return chk


def _ref_aux(a, z, coeff):
    counts = _arg(a, "counts")
    total = _arg(a, "total_tokens")
    total = int(total) if total is not None else None
    return ref.aux_loss(
        z,
        a["topk"],
        score_function=_arg(a, "score_function", "softmax"),
        coeff=coeff,
        padding_mask=_arg(a, "padding_mask"),
        counts=counts,
        total_tokens=total,
    )


def _ref_seq(a, z, coeff):
    return ref.seq_aux_loss(
        z,
        a["topk"],
        a["seq_len"],
        score_function=_arg(a, "score_function", "softmax"),
        coeff=coeff,
        padding_mask=_arg(a, "padding_mask"),
    )


def _ref_z(a, z, coeff):
    return ref.z_loss(z, coeff=coeff, padding_mask=_arg(a, "padding_mask"))


def chk_expert_mask(a, m):
    t, e, k = a["num_tokens"], a["num_experts"], a["topk"]
    dev = torch.device(_arg(a, "device", "cpu"))
    assert m.shape == (t, e) and m.dtype == torch.bool and m.device.type == dev.type, f"{m.dtype}{tuple(m.shape)}"
    if dev.type == "meta":
        return
    assert bool(((~m).sum(-1) >= k).all()), "fewer than topk candidates left"
    want = ref.expert_mask(t, e, k, float(a["rate"]), _arg(a, "seed", 0), _arg(a, "offset", 0))
    assert torch.equal(m, want), "mask differs from the Philox reference"


def chk_assignment_dropout(a, out):
    oi, ow = out
    idx, w = a["indices"], a["weights"]
    assert oi.shape == idx.shape == ow.shape and oi.dtype == torch.int64 and ow.dtype == torch.float32
    if _is_meta(idx):
        return
    keep = ref.assignment_keep(idx.long(), float(a["rate"]), _arg(a, "seed", 0), _arg(a, "offset", 0))
    routed = idx.long() >= 0
    assert torch.equal(oi, torch.where(keep & routed, idx.long(), -1)), "dropped set differs from the reference"
    assert bool((ow[oi < 0] == 0).all()), "weight of a dropped assignment"
    want = ref.assignment_dropout_weights(w.double(), idx.long(), keep, _arg(a, "renormalize", False))
    if _finite(w):
        _close(ow, want, rtol=1e-5, atol=1e-6, what="weights vs reference")


def _bias_ref(b0: torch.Tensor, counts: torch.Tensor, rate) -> torch.Tensor:
    """b + rate * sign(mean(c) - c_e) in float32, the sign compared in integers
    (c_e * E against sum(c); Python ints, so huge counts cannot overflow)."""
    c = [int(x) for x in counts.tolist()]
    total, n = sum(c), len(c)
    sign = torch.tensor([float((total > x * n) - (total < x * n)) for x in c], dtype=torch.float32)
    return b0.float() + torch.tensor(float(rate), dtype=torch.float32) * sign


def chk_update_expert_bias(a, out):
    assert out is a["bias"], "update_expert_bias must return the bias tensor it updated"
    if _is_meta(out):
        return
    _close(out, _bias_ref(a["_bias0"], a["counts"], a["rate"]), rtol=0, atol=0, what="bias vs reference")


def chk_router_stats(a, st):
    z, idx = a["logits"], a["indices"]
    t, e = z.shape
    assert isinstance(st, mr.RouterStats)
    assert st.selected_counts.shape == (e,) and st.selected_counts.dtype == torch.int64
    assert (st.kept_counts is None) == (_arg(a, "slot") is None)
    if _is_meta(z):
        return
    slot, mask = _arg(a, "slot"), _arg(a, "padding_mask")
    want = ref.router_stats(z.detach(), idx, e, slot=slot, padding_mask=mask)
    assert int(st.num_tokens) == want["num_tokens"], "num_tokens"
    assert torch.equal(st.selected_counts, want["selected_counts"]), "selected_counts"
    if slot is not None:
        assert torch.equal(st.kept_counts, want["kept_counts"]), "kept_counts"
        assert int(st.dropped) == want["dropped"], "dropped"
    assert int(st.nonfinite_logits) == want["nonfinite_logits"], "nonfinite_logits"
    if _finite(z):
        for f in ("max_violation", "mean_entropy", "mean_lse", "max_lse"):
            _close(getattr(st, f), torch.tensor(want[f]), rtol=1e-4, atol=1e-4, what=f)


# --------------------------------------------------------------------------------------
# Specs of the public functions: a valid call, the kinds of its arguments, its check


@dataclasses.dataclass
class Spec:
    name: str
    fn: Callable
    pos: Tuple[str, ...]  # positional parameters, in order
    build: Callable[..., Dict[str, Any]]  # a valid call's arguments (fresh tensors)
    tensors: Dict[str, str]  # tensor argument -> kind (float, f32, index, bool, count)
    options: Dict[str, str]  # option -> kind (int, size, float, bool, str:<choices>, seed, device, group)
    check: Callable[[Dict[str, Any], Any], None]
    optional: Tuple[str, ...] = ()  # tensor arguments that may be None
    present: Dict[str, Callable[[Dict[str, Any]], Any]] = dataclasses.field(default_factory=dict)
    related: Dict[str, Tuple[str, ...]] = dataclasses.field(default_factory=dict)
    sizes: Tuple[Dict[str, int], ...] = ()
    inplace: Tuple[str, ...] = ()  # tensor arguments written in place
    prepare: Optional[Callable[[Dict[str, Any]], None]] = None  # runs after the mutation, before the call

    def call(self, a: Dict[str, Any]):
        if self.prepare is not None:
            self.prepare(a)
        args = [a[n] for n in self.pos]
        kw = {n: v for n, v in a.items() if n not in self.pos and v is not OMIT and not n.startswith("_")}
        return self.fn(*args, **kw)

    def names_for(self, arg: str) -> Tuple[str, ...]:
        return (arg,) + self.related.get(arg, ())


def _b_gating(t=T, e=E, k=K):
    return dict(
        logits=_logits(t, e),
        topk=k,
        score_function="softmax",
        pre_softmax=False,
        normalize=False,
        num_groups=None,
        group_topk=None,
        expert_bias=torch.zeros(e),
        scaling_factor=1.0,
        noise_std=0.0,
        expert_mask_rate=0.0,
        seed=0,
        offset=0,
    )


def _b_replay(t=T, e=E, k=K):
    z = _logits(t, e)
    return dict(
        logits=z,
        indices=_topk_idx(z, k),
        score_function="softmax",
        pre_softmax=False,
        normalize=False,
        scaling_factor=1.0,
    )


def _b_dispatch(t=T, e=E, k=K):
    z = _logits(t, e)
    return dict(
        indices=_topk_idx(z, k),
        weights=_weights(t, k),
        num_experts=e,
        capacity=2,
        drop_policy="probs",
        layout="compact",
        align=1,
        renormalize=False,
        ep_size=1,
        seed=0,
        offset=0,
    )


def _b_permute(t=T, e=E, k=K, h=H):
    d = _plan(t, e, k, capacity=2)
    return dict(x=torch.randn(t, h, generator=_g(2)), row_to_token=d.row_to_token, row=d.row)


def _b_unpermute(t=T, e=E, k=K, h=H):
    d = _plan(t, e, k, capacity=2)
    return dict(y=torch.randn(d.row_to_token.shape[0], h, generator=_g(3)), row=d.row, weights=d.kept_weights)


def _b_aux(t=T, e=E, k=K):
    mask = torch.zeros(t, dtype=torch.bool)
    if t > 1:
        mask[-1] = True
    return dict(
        logits=_logits(t, e),
        topk=k,
        score_function="softmax",
        coeff=0.01,
        padding_mask=mask,
        counts=None,
        total_tokens=None,
    )


def _b_global(t=T, e=E, k=K):
    a = _b_aux(t, e, k)
    del a["counts"], a["total_tokens"]
    a["group"] = None
    return a


def _b_seq(t=T, e=E, k=K):
    a = _b_aux(t, e, k)
    del a["counts"], a["total_tokens"]
    a["seq_len"] = 3 if t % 3 == 0 and t else max(t, 1)
    return a


def _b_z(t=T, e=E):
    return dict(logits=_logits(t, e), coeff=1e-3, padding_mask=torch.zeros(t, dtype=torch.bool))


def _b_dropout(t=T, e=E, k=K):
    z = _logits(t, e)
    return dict(
        indices=_topk_idx(z, k), weights=_weights(t, k), rate=0.3, num_experts=e, seed=5, offset=1, renormalize=False
    )


def _b_bias(e=E):
    return dict(bias=torch.linspace(-1, 1, e), counts=torch.arange(e, dtype=torch.int64) % 3, rate=1e-3, group=None)


def _bias_before(a):
    b = a.get("bias")
    ok = isinstance(b, torch.Tensor) and b.layout == torch.strided and not b.is_nested and b.device.type != "meta"
    a["_bias0"] = b.detach().clone() if ok else None


def _b_stats(t=T, e=E, k=K):
    z = _logits(t, e)
    idx = _topk_idx(z, k)
    d = mr.dispatch(idx, _weights(t, k), e, capacity=1, drop_policy="probs")
    mask = torch.zeros(t, dtype=torch.bool)
    if t > 1:
        mask[0] = True
    return dict(logits=z, indices=idx, slot=d.slot, padding_mask=mask, strict=False)


_GATING_REL = {
    "topk": ("num_experts", "group_topk"),
    "num_groups": ("group_topk",),
    "group_topk": ("num_groups", "topk"),
    "logits": ("num_experts",),
    "pre_softmax": ("score_function",),
    "score_function": ("pre_softmax",),
}
_DISPATCH_REL = {
    "capacity": ("layout", "drop_policy", "num_experts"),
    "layout": ("capacity", "align"),
    "align": ("layout",),
    "drop_policy": ("capacity",),
    "num_experts": ("indices", "topk", "ep_size"),
    "ep_size": ("num_experts",),
    "indices": ("topk",),
    "weights": ("indices",),
}
_LOSS_REL = {
    "logits": ("num_experts", "topk", "seq_len", "padding_mask"),
    "topk": ("num_experts",),
    "padding_mask": ("num_tokens",),
    "counts": ("num_experts", "total_tokens"),
    "total_tokens": ("counts",),
    "seq_len": ("num_tokens",),
}

SPECS: List[Spec] = [
    Spec(
        "topk_gating",
        mr.topk_gating,
        ("logits", "topk"),
        _b_gating,
        {"logits": "float", "expert_bias": "f32"},
        {
            "topk": "int",
            "score_function": "str:softmax,sigmoid",
            "pre_softmax": "bool",
            "normalize": "bool",
            "num_groups": "int",
            "group_topk": "int",
            "scaling_factor": "float",
            "noise_std": "float",
            "expert_mask_rate": "float",
            "seed": "seed",
            "offset": "seed",
        },
        chk_topk_gating,
        optional=("expert_bias",),
        related=_GATING_REL,
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"k": E}, {"t": 512, "e": 64, "k": 8}, {"e": 0, "k": 1}),
    ),
    Spec(
        "topk_gating_replay",
        mr.topk_gating_replay,
        ("logits", "indices"),
        _b_replay,
        {"logits": "float", "indices": "index"},
        {
            "score_function": "str:softmax,sigmoid",
            "pre_softmax": "bool",
            "normalize": "bool",
            "scaling_factor": "float",
        },
        chk_replay,
        related={
            "indices": ("topk", "num_tokens", "logits"),
            "logits": ("num_experts", "indices"),
            "pre_softmax": ("score_function",),
            "score_function": ("pre_softmax",),
        },
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"k": E}, {"t": 512, "e": 64, "k": 8}),
    ),
    Spec(
        "capacity",
        mr.capacity,
        ("num_tokens", "num_experts", "topk", "capacity_factor"),
        lambda: dict(num_tokens=T, num_experts=E, topk=K, capacity_factor=1.25, min_capacity=0, capacity_multiple=None),
        {},
        {
            "num_tokens": "int",
            "num_experts": "int",
            "topk": "int",
            "capacity_factor": "float",
            "min_capacity": "int",
            "capacity_multiple": "int",
        },
        chk_capacity,
        related={
            "num_tokens": ("capacity_factor",),
            "topk": ("num_experts", "capacity_factor"),
            "num_experts": ("capacity_factor",),
        },
    ),
    Spec(
        "dispatch_max_rows",
        mr.dispatch_max_rows,
        ("num_tokens", "topk", "num_experts"),
        lambda: dict(num_tokens=T, topk=K, num_experts=E, capacity=2, layout="compact", align=1),
        {},
        {
            "num_tokens": "int",
            "topk": "int",
            "num_experts": "int",
            "capacity": "int",
            "layout": "str:compact,pad_to_capacity,dropless",
            "align": "int",
        },
        chk_dispatch_max_rows,
        related={**_DISPATCH_REL, "num_tokens": ("topk",), "topk": ("num_experts", "num_tokens")},
    ),
    Spec(
        "dispatch",
        mr.dispatch,
        ("indices", "weights", "num_experts"),
        _b_dispatch,
        {"indices": "index", "weights": "f32"},
        {
            "num_experts": "size",
            "capacity": "int",
            "drop_policy": "str:position,choice_then_position,probs,batch_prioritized,random",
            "layout": "str:compact,pad_to_capacity,dropless",
            "align": "int",
            "renormalize": "bool",
            "ep_size": "int",
            "seed": "seed",
            "offset": "seed",
        },
        chk_dispatch,
        related=_DISPATCH_REL,
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"k": E}, {"t": 512, "e": 64, "k": 8}),
    ),
    Spec(
        "expert_choice",
        mr.expert_choice,
        ("logits", "capacity"),
        lambda t=T, e=E: dict(logits=_logits(t, e), capacity=2),
        {"logits": "float"},
        {"capacity": "int"},
        chk_expert_choice,
        related={"logits": ("num_experts",), "capacity": ("num_experts",)},
        sizes=({"t": 0}, {"t": 1}, {"e": 1}, {"t": 512, "e": 64}, {"e": 0}),
    ),
    Spec(
        "permute",
        mr.permute,
        ("x", "row_to_token", "row"),
        _b_permute,
        {"x": "float", "row_to_token": "index", "row": "index"},
        {},
        chk_permute,
        related={"row": ("num_tokens", "row_to_token"), "row_to_token": ("row",), "x": ("row",)},
        sizes=({"t": 0}, {"t": 1}, {"h": 0}, {"h": 1}, {"t": 512, "e": 64, "k": 8, "h": 16}),
    ),
    Spec(
        "unpermute",
        mr.unpermute,
        ("y", "row", "weights"),
        _b_unpermute,
        {"y": "float", "row": "index", "weights": "f32"},
        {},
        chk_unpermute,
        related={"row": ("weights", "y"), "weights": ("row",), "y": ("row",)},
        sizes=({"t": 0}, {"t": 1}, {"h": 0}, {"h": 1}, {"t": 512, "e": 64, "k": 8, "h": 16}),
    ),
    Spec(
        "aux_loss",
        mr.aux_loss,
        ("logits", "topk"),
        _b_aux,
        {"logits": "float", "padding_mask": "bool", "counts": "count"},
        {"topk": "int", "score_function": "str:softmax,sigmoid", "coeff": "float", "total_tokens": "int"},
        _loss_check(_ref_aux),
        optional=("padding_mask", "counts"),
        related=_LOSS_REL,
        present={"counts": lambda a: torch.arange(a["logits"].shape[1], dtype=torch.int64)},
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"k": E}, {"t": 512, "e": 64, "k": 8}, {"e": 0, "k": 1}),
    ),
    Spec(
        "global_aux_loss",
        mr.global_aux_loss,
        ("logits", "topk"),
        _b_global,
        {"logits": "float", "padding_mask": "bool"},
        {"topk": "int", "score_function": "str:softmax,sigmoid", "coeff": "float", "group": "group"},
        _loss_check(_ref_aux),
        optional=("padding_mask",),
        related=_LOSS_REL,
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"t": 512, "e": 64, "k": 8}),
    ),
    Spec(
        "seq_aux_loss",
        mr.seq_aux_loss,
        ("logits", "topk", "seq_len"),
        _b_seq,
        {"logits": "float", "padding_mask": "bool"},
        {"topk": "int", "seq_len": "int", "score_function": "str:softmax,sigmoid", "coeff": "float"},
        _loss_check(_ref_seq),
        optional=("padding_mask",),
        related=_LOSS_REL,
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"t": 513, "e": 64, "k": 8}),
    ),
    Spec(
        "z_loss",
        mr.z_loss,
        ("logits",),
        _b_z,
        {"logits": "float", "padding_mask": "bool"},
        {"coeff": "float"},
        _loss_check(_ref_z),
        optional=("padding_mask",),
        related=_LOSS_REL,
        sizes=({"t": 0}, {"t": 1}, {"e": 1}, {"t": 512, "e": 64}, {"e": 0}),
    ),
    Spec(
        "expert_mask",
        mr.expert_mask,
        ("num_tokens", "num_experts", "topk", "rate"),
        lambda: dict(num_tokens=T, num_experts=E, topk=K, rate=0.5, seed=3, offset=4, device="cpu"),
        {},
        {
            "num_tokens": "int",
            "num_experts": "int",
            "topk": "int",
            "rate": "float",
            "seed": "seed",
            "offset": "seed",
            "device": "device",
        },
        chk_expert_mask,
        related={"num_tokens": ("num_experts",), "num_experts": ("num_tokens", "topk"), "topk": ("num_experts",)},
    ),
    Spec(
        "assignment_dropout",
        mr.assignment_dropout,
        ("indices", "weights", "rate"),
        _b_dropout,
        {"indices": "index", "weights": "f32"},
        {"rate": "float", "num_experts": "int", "seed": "seed", "offset": "seed", "renormalize": "bool"},
        chk_assignment_dropout,
        related={"indices": ("num_experts", "weights"), "weights": ("indices",), "num_experts": ("indices",)},
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"t": 512, "e": 64, "k": 8}),
    ),
    Spec(
        "update_expert_bias",
        mr.update_expert_bias,
        ("bias", "counts", "rate"),
        _b_bias,
        {"bias": "f32", "counts": "count"},
        {"rate": "float", "group": "group"},
        chk_update_expert_bias,
        related={"counts": ("num_experts", "bias"), "bias": ("num_experts", "counts")},
        sizes=({"e": 1}, {"e": 512}, {"e": 0}),
        inplace=("bias",),
        prepare=_bias_before,
    ),
    Spec(
        "router_stats",
        mr.router_stats,
        ("logits", "indices"),
        _b_stats,
        {"logits": "float", "indices": "index", "slot": "index", "padding_mask": "bool"},
        {"strict": "bool"},
        chk_router_stats,
        optional=("slot", "padding_mask"),
        related={
            "logits": ("num_experts", "indices", "topk", "strict"),
            "indices": ("num_tokens", "topk", "slot"),
            "slot": ("indices",),
            "padding_mask": ("num_tokens",),
        },
        sizes=({"t": 0}, {"t": 1}, {"e": 1, "k": 1}, {"t": 512, "e": 64, "k": 8}, {"e": 0, "k": 1}),
    ),
]


# --------------------------------------------------------------------------------------
# Generated cases over the public functions


def _filtered_build(spec: Spec, size: Dict[str, int]):
    import inspect

    params = inspect.signature(spec.build).parameters
    return lambda: spec.build(**{k: v for k, v in size.items() if k in params})


def _case(
    spec: Spec,
    cid: str,
    mutate: Callable[[Dict[str, Any]], Dict[str, Any]],
    expect="either",
    names=(),
    same_as_mutate=None,
    build=None,
    isolate=False,
    known=None,
) -> Case:
    build = build or spec.build
    holder: Dict[str, Any] = {}

    def thunk():
        a = mutate(build())
        holder["a"] = a
        return spec.call(a)

    same_as = None
    if same_as_mutate is not None:

        def same_as():
            return spec.call(same_as_mutate(build()))

    return Case(
        f"{spec.name}/{cid}",
        thunk,
        expect,
        tuple(names),
        lambda out: spec.check(holder["a"], out),
        same_as,
        isolate,
        known,
    )


def _set(name, f):
    """A mutation replacing argument `name` by `f(current value, all arguments)`."""

    def mutate(a):
        a = dict(a)
        a[name] = f(a[name], a)
        return a

    return mutate


def _strided(t: torch.Tensor) -> torch.Tensor:
    return torch.stack([t, t], dim=-1).select(-1, 0)


def _offset(t: torch.Tensor) -> torch.Tensor:
    flat = t.reshape(-1)
    return torch.cat([flat[:1], flat])[1:].view(t.shape)


def _fill(v):
    return lambda t, a: torch.full_like(t, v)


def _mixed(t, a):
    t = t.clone()
    flat = t.view(-1)
    flat[0::4] = math.nan
    flat[1::4] = math.inf
    flat[2::4] = -math.inf
    return t


def _bool_bytes(t, a):
    b = (torch.arange(t.numel()) % 4).to(torch.uint8) * 85  # 0, 85, 170, 255
    return b.view(torch.bool).reshape(t.shape)


def _bool_norm(t, a):
    return _bool_bytes(t, a).view(torch.uint8) != 0


INT_VALUES = [
    ("0", 0),
    ("1", 1),
    ("2", 2),
    ("-1", -1),
    ("i32max", 2**31 - 1),
    ("2^31", 2**31),
    ("i64max", 2**63 - 1),
    ("2^63", 2**63),
    ("2^64", 2**64),
    ("i64min", -(2**63)),
    ("True", True),
    ("2.0", 2.0),
    ("str", "2"),
    ("None", None),
    ("np.int64", np.int64(2)),
    ("tensor", torch.tensor(2)),
]
FLOAT_VALUES = [
    ("0", 0.0),
    ("-0", -0.0),
    ("1", 1.0),
    ("-1", -1.0),
    ("0.5", 0.5),
    ("nan", math.nan),
    ("inf", math.inf),
    ("-inf", -math.inf),
    ("1e300", 1e300),
    ("3.5e38", 3.5e38),
    ("1e-300", 1e-300),
    ("5e-324", 5e-324),
    ("True", True),
    ("str", "0.5"),
    ("None", None),
    ("np.float32", np.float32(0.5)),
    ("int1", 1),
    ("tensor", torch.tensor(0.5)),
]
BOOL_VALUES = [
    ("True", True),
    ("False", False),
    ("1", 1),
    ("0", 0),
    ("str", "yes"),
    ("None", None),
    ("np.bool_", np.bool_(True)),
]
SEED_VALUES = [
    ("0", 0),
    ("1", 1),
    ("i64max", 2**63 - 1),
    ("2^63", 2**63),
    ("u64max", 2**64 - 1),
    ("2^64", 2**64),
    ("-1", -1),
    ("1.5", 1.5),
    ("None", None),
    ("True", True),
    ("np.uint64", np.uint64(3)),
    ("str", "1"),
]
DEVICE_VALUES = [
    ("cpu", "cpu"),
    ("meta", "meta"),
    ("torch.device", torch.device("cpu")),
    ("cpu:0", "cpu:0"),
    ("cuda", "cuda"),
    ("bogus", "bogus"),
    ("None", None),
    ("int0", 0),
    ("float", 1.5),
]
GROUP_VALUES = [("None", None), ("str", "x"), ("int", 0), ("object", object())]


def _option_values(kind: str):
    if kind == "int":
        return INT_VALUES
    if kind == "size":  # a valid 2**31 - 1 would mean outputs of that many elements
        return [(t, v) for t, v in INT_VALUES if t != "i32max"]
    if kind == "float":
        return FLOAT_VALUES
    if kind == "bool":
        return BOOL_VALUES
    if kind == "seed":
        return SEED_VALUES
    if kind == "device":
        return DEVICE_VALUES
    if kind == "group":
        return GROUP_VALUES
    assert kind.startswith("str:")
    valid = kind[4:].split(",")
    return [(v, v) for v in valid] + [
        ("empty", ""),
        ("upper", valid[0].upper()),
        ("None", None),
        ("int", 1),
        ("bytes", valid[0].encode()),
        ("space", f" {valid[0]}"),
    ]


def _scalar_for(kind):
    return {"float": 1.0, "f32": 1.0, "index": 1, "count": 1, "bool": True}[kind]


def _function_cases(spec: Spec) -> List[Case]:
    cases: List[Case] = []
    base = spec.build()
    tensors_present = [n for n in spec.tensors if isinstance(base.get(n), torch.Tensor)]
    for name, kind in spec.tensors.items():
        names = spec.names_for(name)
        get = (lambda n: (lambda v, a: v if v is not None else spec.present[n](a)))(name)
        present = _set(name, get)

        def on(f, _present=present, _name=name):
            """Mutate the (present) value of the argument with f(t, a)."""

            def mutate(a):
                a = _present(a)
                a[_name] = f(a[_name], a)
                return a

            return mutate

        # wrong Python types
        optional = name in spec.optional
        cases.append(
            _case(spec, f"{name}/type-None", _set(name, lambda v, a: None), "either" if optional else "error", names)
        )
        for tag, f in (
            ("str", lambda t, a: "tensor"),
            ("list", lambda t, a: t.tolist()),
            ("numpy", lambda t, a: t.numpy()),
            ("scalar", lambda t, a, _k=kind: _scalar_for(_k)),
        ):
            cases.append(_case(spec, f"{name}/type-{tag}", on(f), "error", names))
        # every dtype
        for dt in ALL_DTYPES:
            ok = dt in ACCEPTED[kind]
            cases.append(
                _case(
                    spec,
                    f"{name}/dtype-{_dtype_name(dt)}",
                    on(lambda t, a, _dt=dt: t.to(_dt)),
                    "result" if ok else "error",
                    names,
                )
            )
        # the meta device: alone (a device mix), and every tensor at once (shapes only)
        alone = [n for n in tensors_present if n != name]
        cases.append(
            _case(
                spec,
                f"{name}/device-meta",
                on(lambda t, a: t.to(META)),
                "error" if alone else "result",
                names + tuple(alone),
            )
        )
        # layouts: must behave exactly as the contiguous equivalent
        for tag, f in (
            ("strided", lambda t, a: _strided(t)),
            ("offset", lambda t, a: _offset(t)),
            ("transposed", lambda t, a: t.t().contiguous().t() if t.dim() == 2 else _strided(t)),
        ):
            cases.append(_case(spec, f"{name}/layout-{tag}", on(f), "either", names, same_as_mutate=present))
        if name in spec.inplace:  # a zero-stride tensor cannot be written in place
            cases.append(_case(spec, f"{name}/layout-expanded", on(lambda t, a: t[:1].expand_as(t)), "error", names))
        else:
            cases.append(
                _case(
                    spec,
                    f"{name}/layout-expanded",
                    on(lambda t, a: t[:1].expand_as(t)),
                    "either",
                    names,
                    same_as_mutate=on(lambda t, a: t[:1].expand_as(t).contiguous()),
                )
            )
        if kind in ("float", "f32") and name in spec.inplace:  # a negative-bit view is not written in place
            cases.append(
                _case(spec, f"{name}/layout-neg-view", on(lambda t, a: torch._neg_view(t.neg())), "error", names)
            )
        elif kind in ("float", "f32"):
            cases.append(
                _case(
                    spec,
                    f"{name}/layout-neg-view",
                    on(lambda t, a: torch._neg_view(t.neg())),
                    "either",
                    names,
                    same_as_mutate=present,
                )
            )
            cases.append(
                _case(
                    spec,
                    f"{name}/requires-grad",
                    on(lambda t, a: t.clone().requires_grad_()),
                    "either",
                    names,
                    same_as_mutate=present,
                )
            )
        cases.append(_case(spec, f"{name}/layout-sparse-coo", on(lambda t, a: t.to_sparse()), "error", names))
        if base_dim(spec, name) == 2:
            cases.append(_case(spec, f"{name}/layout-sparse-csr", on(lambda t, a: t.to_sparse_csr()), "error", names))
        cases.append(
            _case(
                spec,
                f"{name}/layout-nested",
                on(lambda t, a: torch.nested.nested_tensor(list(t) if t.dim() > 1 else [t])),
                "error",
                names,
            )
        )
        if base_dim(spec, name) == 2 and kind != "bool":
            cases.append(
                _case(
                    spec,
                    f"{name}/layout-nested-jagged",
                    on(lambda t, a: torch.nested.nested_tensor(list(t), layout=torch.jagged)),
                    "error",
                    names,
                )
            )
        # values
        if kind in ("float", "f32"):
            for tag, f in (
                ("nan", _fill(math.nan)),
                ("inf", _fill(math.inf)),
                ("-inf", _fill(-math.inf)),
                ("mixed", _mixed),
                ("huge", _fill(3e38)),
                ("subnormal", _fill(1e-45)),
                ("-0", _fill(-0.0)),
                ("1e30", _fill(1e30)),
            ):
                cases.append(_case(spec, f"{name}/value-{tag}", on(f), "either", names))
        elif kind in ("index", "count"):
            for tag, v in (
                ("-1", -1),
                ("-2", -2),
                ("E", E),
                ("i32max", 2**31 - 1),
                ("i32min", -(2**31)),
                ("2^31", 2**31),
                ("2^40", 2**40),
                ("2^62", 2**62),
                ("0", 0),
            ):
                cases.append(
                    _case(
                        spec,
                        f"{name}/value-{tag}",
                        on(
                            lambda t, a, _v=v: torch.full_like(t, _v)
                            if t.dtype == torch.int64 or abs(_v) < 2**31
                            else torch.full_like(t.long(), _v)
                        ),
                        "either",
                        names,
                    )
                )
            cases.append(_case(spec, f"{name}/value-reversed", on(lambda t, a: t.flip(-1)), "either", names))
        elif kind == "bool":
            for tag, v in (("all-true", True), ("all-false", False)):
                cases.append(_case(spec, f"{name}/value-{tag}", on(_fill(v)), "either", names))
            cases.append(
                _case(spec, f"{name}/value-bytes", on(_bool_bytes), "either", names, same_as_mutate=on(_bool_norm))
            )
    # every tensor on the meta device: shapes only, through the fake kernels
    if tensors_present:

        def all_meta(a):
            return {
                n: (v.to(META) if isinstance(v, torch.Tensor) and not n.startswith("_") else v) for n, v in a.items()
            }

        cases.append(_case(spec, "all-meta", all_meta, "result"))
    # options
    for name, kind in spec.options.items():
        for tag, v in _option_values(kind):
            expect = "result" if kind.startswith("str:") and tag == v and name not in ("layout",) else "either"
            if kind == "bool":
                expect = "result" if isinstance(v, bool) else "error"
            huge = isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**31 - 1
            cases.append(
                _case(
                    spec, f"{name}={tag}", _set(name, lambda _, a, _v=v: _v), expect, spec.names_for(name), isolate=huge
                )
            )
        if name not in spec.pos and _has_default(spec.fn, name):
            cases.append(_case(spec, f"{name}/omitted", _set(name, lambda _, a: OMIT), "either", spec.names_for(name)))
    # sizes
    for size in spec.sizes:
        tag = ",".join(f"{k}={v}" for k, v in size.items())
        cases.append(
            _case(
                spec,
                f"size/{tag}",
                lambda a: a,
                "error" if size.get("e") == 0 else "result",
                ("num_experts", "topk", "logits", "bias"),
                build=_filtered_build(spec, size),
            )
        )
    return cases


def _has_default(fn, name: str) -> bool:
    import inspect

    p = inspect.signature(fn).parameters.get(name)
    return p is not None and p.default is not inspect.Parameter.empty


def base_dim(spec: Spec, name: str) -> int:
    a = spec.build()
    v = a.get(name)
    if v is None:
        v = spec.present[name](a)
    return v.dim()


def _limit_cases() -> List[Case]:
    """Sizes at and past the limits (2**31 - 1, 2**31, 2**40, 2**63) without the memory
    they would take: zero-element tensors with one huge dimension, and the meta device
    (shapes only). All run isolated (an allocation attempt fails the case, it cannot
    take the machine down)."""
    cases = []
    empty = lambda e: torch.empty(0, e)  # noqa: E731 -- zero elements whatever e
    for e in (2**31, 2**40):  # past the i32 index limit (a valid 2**31 - 1 has [E] outputs: 8 GiB)
        tag = f"E={e}"
        for fn, call, names in (
            ("topk_gating", lambda z: mr.topk_gating(z, 1), ("num_experts", "topk")),
            (
                "topk_gating_replay",
                lambda z: mr.topk_gating_replay(z, torch.zeros(0, 1, dtype=torch.long)),
                ("num_experts",),
            ),
            ("expert_choice", lambda z: mr.expert_choice(z, 0), ("num_experts", "capacity")),
            ("aux_loss", lambda z: mr.aux_loss(z, 1), ("num_experts", "topk")),
            ("seq_aux_loss", lambda z: mr.seq_aux_loss(z, 1, 1), ("num_experts", "topk")),
            ("z_loss", lambda z: mr.z_loss(z), ("num_experts",)),
            ("router_stats", lambda z: mr.router_stats(z, torch.zeros(0, 1, dtype=torch.long)), ("num_experts",)),
        ):
            cases.append(
                Case(
                    f"{fn}/limit-empty-logits-{tag}",
                    (lambda _c=call, _e=e: _c(empty(_e))),
                    "either",
                    names,
                    isolate=True,
                )
            )
        cases.append(
            Case(
                f"dispatch/limit-num_experts-{tag}",
                (lambda _e=e: mr.dispatch(torch.zeros(0, 1, dtype=torch.long), torch.zeros(0, 1), _e)),
                "either",
                ("num_experts",),
                isolate=True,
            )
        )
        cases.append(
            Case(
                f"update_expert_bias/limit-{tag}",
                (
                    lambda _e=e: mr.update_expert_bias(
                        torch.zeros(1).expand(_e), torch.zeros(1, dtype=torch.long).expand(_e), 0.1
                    )
                ),
                "either",
                ("bias", "counts"),
                isolate=True,
            )
        )
        cases.append(
            Case(
                f"permute/limit-empty-hidden-{tag}",
                (
                    lambda _e=e: mr.permute(
                        torch.empty(0, _e), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.long)
                    )
                ),
                "either",
                ("x", "hidden"),
                isolate=True,
            )
        )
    # one assignment whose row index is near 2**31 in an empty [2**31 - 1, 0] buffer
    cases.append(
        Case(
            "unpermute/limit-row-index-near-i32max",
            lambda: mr.unpermute(torch.empty(2**31 - 1, 0), torch.tensor([[2**31 - 2]]), torch.ones(1, 1)),
            "result",
            (),
            lambda out: None if out.shape == (1, 0) else (_ for _ in ()).throw(AssertionError(out.shape)),
            isolate=True,
        )
    )
    # a valid 2**31 - 1 experts with no tokens: nothing of size E is returned
    e = 2**31 - 1
    for fn, call in (
        ("topk_gating", lambda z: mr.topk_gating(z, 1)),
        ("z_loss", lambda z: mr.z_loss(z)),
        ("topk_gating_replay", lambda z: mr.topk_gating_replay(z, torch.zeros(0, 1, dtype=torch.long))),
        ("seq_aux_loss", lambda z: mr.seq_aux_loss(z, 1, 1)),
        ("aux_loss", lambda z: mr.aux_loss(z, 1)),
    ):
        cases.append(
            Case(
                f"{fn}/limit-empty-logits-E={e}",
                (lambda _c=call: _c(empty(2**31 - 1))),
                "result",
                ("num_experts",),
                lambda out: None,
                isolate=True,
            )
        )
    for t in (2**31 - 1, 2**31, 2**40):
        tag = f"T={t}"
        meta = torch.empty(t, E, device=META)
        cases += [
            Case(
                f"topk_gating/limit-meta-{tag}",
                (lambda _z=meta: mr.topk_gating(_z, K)),
                "either",
                ("num_tokens",),
                isolate=True,
            ),
            Case(
                f"aux_loss/limit-meta-{tag}",
                (lambda _z=meta: mr.aux_loss(_z, K)),
                "either",
                ("num_tokens",),
                isolate=True,
            ),
            Case(f"z_loss/limit-meta-{tag}", (lambda _z=meta: mr.z_loss(_z)), "either", ("num_tokens",), isolate=True),
            Case(
                f"expert_mask/limit-meta-{tag}",
                (lambda _t=t: mr.expert_mask(_t, 1, 1, 0.5, device="meta")),
                "either",
                ("num_tokens",),
                isolate=True,
            ),
            Case(
                f"dispatch/limit-meta-{tag}",
                (
                    lambda _t=t: mr.dispatch(
                        torch.empty(_t, 1, dtype=torch.long, device=META),
                        torch.empty(_t, 1, device=META),
                        4,
                        capacity=2**31 - 1,
                        layout="pad_to_capacity",
                    )
                ),
                "either",
                ("capacity", "num_tokens"),
                isolate=True,
            ),
            Case(
                f"expert_choice/limit-meta-{tag}",
                (lambda _z=meta: mr.expert_choice(_z, 2**31 - 1)),
                "either",
                ("capacity", "num_experts"),
                isolate=True,
            ),
        ]
    # no tokens and a number of experts whose multiple by the CPU chunk (256) overflows
    # (finding R3 of the core: a panic in the native module before the bound of 2**31 - 1)
    for e in (2**56, 2**63 - 1):
        cases.append(
            Case(
                f"expert_mask/limit-no-tokens-E={e}",
                (lambda _e=e: mr.expert_mask(0, _e, 1, 0.5)),
                "error",
                ("num_experts",),
                isolate=True,
            )
        )
        cases.append(
            Case(
                f"_native.expert_mask/limit-no-tokens-E={e}",
                (
                    lambda _e=e: _native.expert_mask(
                        torch.empty(0, _e, dtype=torch.bool), topk=1, rate=0.5, seed=0, offset=0
                    )
                ),
                "either",
                ("masked", "num_experts"),
                isolate=True,
            )
        )
    # integers past the int64 schema of the custom ops
    for v in (2**63, 2**64, -(2**63) - 1):
        cases += [
            Case(f"capacity/limit-num_tokens={v}", (lambda _v=v: mr.capacity(_v, E, K, 1.0)), "error", ("num_tokens",)),
            Case(
                f"dispatch_max_rows/limit-num_tokens={v}",
                (lambda _v=v: mr.dispatch_max_rows(_v, K, E)),
                "error",
                ("num_tokens",),
            ),
            Case(
                f"expert_mask/limit-num_experts={v}",
                (lambda _v=v: mr.expert_mask(T, _v, K, 0.5)),
                "error",
                ("num_experts",),
            ),
        ]
    return cases


def _extra_function_cases() -> List[Case]:
    """Hand-written cases the tables above do not generate."""
    z = _logits()
    idx = _topk_idx(z, K)
    counts = torch.ones(E, dtype=torch.long)
    cases = [
        # total_tokens is an int or a 0-d integer tensor on the logits' device (or a host scalar)
        Case(
            "aux_loss/total_tokens-tensor-meta",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=torch.tensor(5, device=META)),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/total_tokens-tensor-sparse",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=torch.tensor(5).to_sparse()),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/total_tokens-tensor-i32",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=torch.tensor(5, dtype=torch.int32)),
            "result",
            (),
            lambda loss: _close(loss, ref.aux_loss(z.double(), K, counts=counts, total_tokens=5)),
        ),
        Case(
            "aux_loss/total_tokens-tensor-0",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=torch.tensor(0)),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/total_tokens-tensor-1d",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=torch.tensor([5])),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/total_tokens-without-counts",
            lambda: mr.aux_loss(z, K, total_tokens=5),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/total_tokens-float",
            lambda: mr.aux_loss(z, K, counts=counts, total_tokens=5.0),
            "error",
            ("total_tokens",),
        ),
        Case(
            "aux_loss/counts-huge",
            lambda: mr.aux_loss(z, K, counts=torch.full((E,), 2**62), total_tokens=2**40),
            "result",
            (),
            lambda loss: _close(loss, ref.aux_loss(z.double(), K, counts=torch.full((E,), 2**62), total_tokens=2**40)),
        ),
        # same tensor twice: logits as its own padding-mask source is a dtype error; the
        # same index tensor as indices and slot is valid
        Case(
            "router_stats/same-tensor-indices-and-slot",
            lambda: mr.router_stats(z, idx, slot=idx),
            "result",
            (),
            lambda st: chk_router_stats(dict(logits=z, indices=idx, slot=idx), st),
        ),
        Case(
            "permute/same-tensor-twice",
            lambda: mr.permute(torch.randn(4, 4), torch.arange(4), torch.arange(4)[:, None]),
            "either",
            ("row", "row_to_token"),
        ),
        Case(
            "unpermute/weights-is-y",
            lambda: (lambda y: mr.unpermute(y, torch.tensor([[0, 1], [-1, -1]]), y[:2]))(torch.rand(4, 2)),
            "result",
        ),
        # strict mode over padding: non-finite logits of padding tokens are not counted
        Case(
            "router_stats/strict-nan-in-padding",
            lambda: mr.router_stats(
                torch.cat([z[:1] * math.nan, z[1:]]), idx, padding_mask=torch.arange(T) == 0, strict=True
            ),
            "result",
        ),
        Case("router_stats/strict-nan", lambda: mr.router_stats(z * math.nan, idx, strict=True), "error", ("logits",)),
        # update_expert_bias writes in place: an expanded (zero-stride) bias cannot be written
        Case(
            "update_expert_bias/bias-expanded-written",
            lambda: mr.update_expert_bias(torch.zeros(1).expand(E), counts, 0.1),
            "error",
            ("bias",),
        ),
        Case(
            "update_expert_bias/bias-strided-written",
            lambda: (lambda b: (mr.update_expert_bias(b, torch.arange(E), 0.1), b)[1])(torch.zeros(2 * E)[::2]),
            "result",
            (),
            lambda b: _close(b, ref.update_expert_bias(torch.zeros(E), torch.arange(E), 0.1)),
        ),
        # NamedTuple results and the option vocabularies
        Case(
            "DROP_POLICIES/each-accepted",
            lambda: [mr.dispatch(idx, _weights(), E, capacity=1, drop_policy=p) for p in mr.DROP_POLICIES],
            "result",
            (),
            lambda ds: [chk_dispatch(dict(indices=idx, weights=_weights(), num_experts=E, capacity=1), d) for d in ds],
        ),
        Case(
            "LAYOUTS/each-accepted",
            lambda: [
                mr.dispatch(idx, _weights(), E, capacity=None if lay == "dropless" else 2, layout=lay)
                for lay in mr.LAYOUTS
            ],
            "result",
            (),
            lambda ds: [
                chk_dispatch(
                    dict(
                        indices=idx,
                        weights=_weights(),
                        num_experts=E,
                        capacity=None if lay == "dropless" else 2,
                        layout=lay,
                    ),
                    d,
                )
                for lay, d in zip(mr.LAYOUTS, ds)
            ],
        ),
        Case(
            "SCORE_FUNCTIONS/each-accepted",
            lambda: [mr.topk_gating(z, K, score_function=s) for s in mr.SCORE_FUNCTIONS],
            "result",
            (),
            lambda outs: [
                chk_topk_gating(dict(logits=z, topk=K, score_function=s), o) for s, o in zip(mr.SCORE_FUNCTIONS, outs)
            ],
        ),
        Case("update_router_biases/str", lambda: mr.update_router_biases("model"), "error", ("model",)),
        Case("update_router_biases/None", lambda: mr.update_router_biases(None), "error", ("model",)),
        Case(
            "update_router_biases/module-without-routers",
            lambda: mr.update_router_biases(torch.nn.Linear(2, 2)),
            "result",
            (),
            lambda n: None if n == 0 else (_ for _ in ()).throw(AssertionError(n)),
        ),
    ]
    return cases


# ======================================================================================
# The driver (keep at the end of the file: the case tables above are complete here)

_N1 = (
    "N1: _native ignores the negative bit of a contiguous tensor (torch._neg_view): it reads and writes the "
    "stored values, so the result is silently wrong"
)
_N2 = (
    "N2: _native.capacity / _emulate_cuda_on_cpu take typed PyO3 arguments: OverflowError or a TypeError "
    "without the moe_router. prefix"
)
_P4 = "P4: the core's capacity overflow message names the computed capacity, not the argument that made it overflow"
KNOWN_NATIVE: Dict[str, str] = {}  # N1, N2, P4 fixed (docs/hardening.md)

#: Cases that hit a finding not fixed yet (docs/hardening.md, "Findings"): strict xfails.
KNOWN_FINDINGS: Dict[str, str] = {
    **KNOWN_NATIVE,
    "aux_loss/limit-empty-logits-E=2147483647": "R1: aux_loss with empty logits allocates [num_experts] counts "
    "(16 GiB here, and the core twice that) for a 0-d loss",
}


def _all_cases() -> List[Case]:
    cases: List[Case] = []
    # Building the tables draws a few tensors and modules: from a fixed seed, and without
    # changing the global RNG state that the other test files see.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1234)
        for spec in SPECS:
            cases += _function_cases(spec)
        cases += _limit_cases()
        cases += _extra_function_cases()
        for builder in _MORE_CASES:
            cases += builder()
    ids = [c.id for c in cases]
    dup = {i for i in ids if ids.count(i) > 1}
    assert not dup, f"duplicate case ids: {sorted(dup)[:5]}"
    for c in cases:
        if c.known is None:
            c.known = KNOWN_FINDINGS.get(c.id)
    return cases


#: Builders of the other case families (modules, _native, threads, compile, autograd).
_MORE_CASES: List[Callable[[], List[Case]]] = []


# --------------------------------------------------------------------------------------
# The modules: TopKRouter and MoELayer (construction, forward, backward)

_MH, _ME, _MK, _MF = 8, 4, 2, 6


def _mx(shape=(2, 3, _MH), seed=7):
    return torch.randn(*shape, generator=_g(seed))


def _check_router_output(x: torch.Tensor, out, router) -> None:
    t = x.numel() // x.shape[-1] if x.dim() else 0
    k = router.topk
    assert out.weights.shape == (t, k) and out.weights.dtype == torch.float32, f"weights {out.weights.shape}"
    assert out.indices.shape == (t, k) and out.indices.dtype == torch.int64, "indices"
    assert out.logits.shape == (t, router.num_experts) and out.logits.dtype == torch.float32, "logits"
    assert out.aux_loss.shape == () and out.z_loss.shape == (), "losses"
    if _is_meta(x):
        return
    assert bool(((out.indices >= -1) & (out.indices < router.num_experts)).all()), "index out of range"
    if _finite(x) and float(x.detach().float().abs().max() if x.numel() else 0) < 1e3:
        assert _finite(out.weights) and _finite(out.aux_loss) and _finite(out.z_loss), "non-finite output"
    if out.dispatch is not None:
        d = out.dispatch
        n = int(d.num_rows)
        assert int(d.expert_offsets[-1]) == n and bool((d.row_to_token[n:] == -1).all()), "dispatch plan"


_DEFAULT_X = object()


def _router_run(
    kwargs: Dict[str, Any], x=_DEFAULT_X, fw: Optional[Dict[str, Any]] = None, train=True, backward=True, layer=False
):
    """Build a TopKRouter (or a MoELayer), run a forward (and a backward) on `x`."""
    kwargs = dict(kwargs)
    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
        torch.manual_seed(0)
        if layer:
            args = [
                kwargs.pop(n, d)
                for n, d in (("hidden_size", _MH), ("ffn_hidden_size", _MF), ("num_experts", _ME), ("topk", _MK))
            ]
            m = mr.MoELayer(*args, **kwargs)
        else:
            args = [kwargs.pop(n, d) for n, d in (("hidden_size", _MH), ("num_experts", _ME), ("topk", _MK))]
            m = mr.TopKRouter(*args, **kwargs)
    m.train(train)
    x = _mx() if x is _DEFAULT_X else x
    if (
        isinstance(x, torch.Tensor)
        and x.is_floating_point()
        and x.layout == torch.strided
        and not x.is_nested
        and x.device.type != "meta"
    ):
        x = x.detach().requires_grad_()
    out = m(x, **(fw or {}))
    if backward:
        y, r = out if layer else (None, out)
        loss = (y.float().sum() if layer else r.weights.sum()) + r.loss.float()
        if loss.requires_grad and not _is_meta(loss):
            loss.backward()
    return m, x, out


def _check_run(res, layer=False) -> None:
    m, x, out = res
    router = m.router if layer else m
    if layer:
        y, r = out
        assert y.shape == x.shape and y.dtype == x.dtype, f"output {y.dtype}{tuple(y.shape)}"
        if not _is_meta(x) and _finite(x) and float(x.detach().float().abs().max() if x.numel() else 0) < 1e3:
            assert _finite(y), "non-finite MoE output for finite input"
    else:
        r = out
    _check_router_output(x, r, router)
    moderate = not _is_meta(x) and _finite(x) and float(x.detach().float().abs().max() if x.numel() else 0) < 1e3
    for name, p in m.named_parameters():
        if p.grad is not None and not _is_meta(p) and moderate:
            assert _finite(p.grad), f"non-finite gradient of {name}"


_ROUTER_OPTIONS = {
    "hidden_size": "dim",
    "num_experts": "dim",
    "topk": "int",
    "score_function": "str:softmax,sigmoid",
    "pre_softmax": "bool",
    "normalize": "bool",
    "num_groups": "int",
    "group_topk": "int",
    "topk_scaling_factor": "float",
    "enable_expert_bias": "bool",
    "bias_update_rate": "float",
    "load_balancing_type": "str:aux_loss,seq_aux_loss,global_aux_loss,none",
    "aux_loss_coeff": "float",
    "z_loss_coeff": "float",
    "input_jitter_eps": "float",
    "capacity_factor": "float",
    "token_drop_policy": "str:position,choice_then_position,probs,batch_prioritized,random",
    "pad_expert_input_to_capacity": "bool",
    "min_capacity": "int",
    "capacity_multiple": "int",
    "dropless_align": "int",
    "renormalize_after_drop": "bool",
    "expert_dropout": "float",
    "expert_mask_rate": "float",
    "noise_std": "float",
    "loss_mode": "str:attach,return",
    "loss_scale": "float",
    "frozen": "bool",
    "record": "bool",
    "sequence_first": "bool",
    "compute_stats": "bool",
    "dispatch": "bool",
    "seed": "seed",
    "process_group": "group",
    "gate_init_std": "float",
    "device": "device",
}
_ROUTER_RELATED = {
    "topk": ("num_experts", "group_topk"),
    "num_groups": ("group_topk",),
    "group_topk": ("num_groups", "topk"),
    "pre_softmax": ("score_function",),
    "score_function": ("pre_softmax",),
    "pad_expert_input_to_capacity": ("capacity_factor",),
    "capacity_factor": ("capacity", "capacity_factor", "dropless_align"),
    "min_capacity": ("capacity",),
    "capacity_multiple": ("capacity",),
    "num_experts": ("topk",),
    "dispatch": ("router",),
    "dropless_align": ("align",),
    "load_balancing_type": ("seq_len",),
    "z_loss_coeff": ("coeff",),
    "aux_loss_coeff": ("coeff",),
    "topk_scaling_factor": ("scaling_factor",),
    "noise_std": ("noise_std",),
}
_ROUTER_BASE = dict(aux_loss_coeff=0.01, z_loss_coeff=1e-3, capacity_factor=1.5)
# A dimension: huge valid values would allocate the gate (tried on the meta device below).
_DIM_VALUES = [(t, v) for t, v in INT_VALUES if not (isinstance(v, int) and not isinstance(v, bool) and v >= 2**31 - 1)]
# past the int32 expert index: an error before any allocation
_EXPERTS_VALUES = _DIM_VALUES + [("2^31", 2**31), ("2^40", 2**40), ("2^63", 2**63)]


def _module_cases() -> List[Case]:
    cases: List[Case] = []
    for layer in (False, True):
        owner = "MoELayer" if layer else "TopKRouter"
        chk = lambda res, _l=layer: _check_run(res, _l)  # noqa: E731
        # every constructor option
        options = dict(_ROUTER_OPTIONS)
        if layer:
            options.update({"ffn_hidden_size": "dim", "activation": "str:swiglu,gelu"})
        for name, kind in options.items():
            values = (
                (_EXPERTS_VALUES if name == "num_experts" else _DIM_VALUES) if kind == "dim" else _option_values(kind)
            )
            for tag, v in values:
                if name == "num_experts" and isinstance(v, int) and not isinstance(v, bool) and v >= 2**31:
                    isolate = True
                else:
                    isolate = isinstance(v, int) and not isinstance(v, bool) and abs(v) >= 2**31 - 1
                kw = {**_ROUTER_BASE, name: v}
                if name in ("pad_expert_input_to_capacity", "dropless_align") and v not in (None, False, 1):
                    kw.pop("capacity_factor") if name == "dropless_align" else None
                if name == "capacity_factor":
                    kw[name] = v
                expect = "either"
                if kind == "bool" and not isinstance(v, bool) and not (name == "normalize" and v is None):
                    expect = "error"
                elif kind.startswith("str:") and tag == v and name != "load_balancing_type":
                    expect = "result"
                cases.append(
                    Case(
                        f"{owner}/{name}={tag}",
                        (lambda _kw=kw, _l=layer: _router_run(_kw, layer=_l)),
                        expect,
                        (name,) + _ROUTER_RELATED.get(name, ()),
                        chk,
                        isolate=isolate,
                    )
                )
        # huge sizes on the meta device: shapes only, no memory
        for name, v in (("hidden_size", 2**31), ("hidden_size", 2**31 - 1), ("num_experts", 2**31 - 1)):
            if layer:
                continue
            kw = {**_ROUTER_BASE, name: v, "device": "meta", "compute_stats": False}
            x = torch.empty(3, v if name == "hidden_size" else _MH, device=META)
            cases.append(
                Case(
                    f"{owner}/meta-{name}={v}",
                    (lambda _kw=kw, _x=x: _router_run(_kw, _x, backward=False)),
                    "either",
                    (name,),
                    chk,
                    isolate=True,
                )
            )
        # forward: hidden_states
        base_x = _mx()
        for tag, f in (
            ("None", lambda t: None),
            ("str", lambda t: "x"),
            ("list", lambda t: t.tolist()),
            ("numpy", lambda t: t.numpy()),
            ("scalar", lambda t: 1.0),
        ):
            cases.append(
                Case(
                    f"{owner}/hidden_states/type-{tag}",
                    (lambda _f=f, _l=layer: _router_run(_ROUTER_BASE, _f(_mx()), layer=_l)),
                    "error",
                    ("hidden_states",),
                )
            )
        for dt in ALL_DTYPES:
            ok = dt in FLOATS
            cases.append(
                Case(
                    f"{owner}/hidden_states/dtype-{_dtype_name(dt)}",
                    (lambda _dt=dt, _l=layer: _router_run(_ROUTER_BASE, _mx().to(_dt), layer=_l)),
                    "result" if ok else "error",
                    ("hidden_states",),
                    chk,
                )
            )
        layouts = {
            "strided": _strided,
            "transposed": lambda t: t.transpose(0, 1).contiguous().transpose(0, 1),
            "offset": _offset,
            "expanded": lambda t: t[:1].expand_as(t),
            "neg-view": lambda t: torch._neg_view(t.neg()),
        }
        for tag, f in layouts.items():
            ref_f = (lambda t: t[:1].expand_as(t).contiguous()) if tag == "expanded" else (lambda t: t)
            cases.append(
                Case(
                    f"{owner}/hidden_states/layout-{tag}",
                    (lambda _f=f, _l=layer: _router_run(_ROUTER_BASE, _f(_mx()), train=False, layer=_l)[2]),
                    "result",
                    ("hidden_states",),
                    same_as=(lambda _f=ref_f, _l=layer: _router_run(_ROUTER_BASE, _f(_mx()), train=False, layer=_l)[2]),
                )
            )
        for tag, f in (
            ("sparse-coo", lambda t: t.to_sparse()),
            ("nested", lambda t: torch.nested.nested_tensor(list(t))),
            (
                "nested-jagged",
                lambda t: torch.nested.nested_tensor(list(t.reshape(-1, _MH)[None]), layout=torch.jagged),
            ),
        ):
            cases.append(
                Case(
                    f"{owner}/hidden_states/layout-{tag}",
                    (lambda _f=f, _l=layer: _router_run(_ROUTER_BASE, _f(_mx()), layer=_l)),
                    "error",
                    ("hidden_states",),
                )
            )
        for tag, x in (
            ("T=0", torch.empty(0, _MH)),
            ("T=1", torch.randn(1, _MH)),
            ("1-D", torch.randn(_MH)),
            ("4-D", torch.randn(2, 1, 3, _MH)),
            ("T=512", torch.randn(512, _MH)),
            ("meta", base_x.to(META)),
            ("meta-module", base_x.to(META)),
            ("0-d", torch.tensor(1.0)),
            ("wrong-H", torch.randn(3, _MH + 1)),
            ("nan", torch.full((3, _MH), math.nan)),
            ("inf", torch.full((3, _MH), math.inf)),
            ("huge", torch.full((3, _MH), 3e38)),
            ("bf16", base_x.bfloat16()),
            ("f16", base_x.half()),
        ):
            expect = "error" if tag in ("0-d", "wrong-H", "meta") else "result"  # meta input, CPU module: a mix
            kw = {**_ROUTER_BASE, "device": "meta"} if tag == "meta-module" else _ROUTER_BASE
            cases.append(
                Case(
                    f"{owner}/hidden_states/{tag}",
                    (
                        lambda _x=x, _l=layer, _kw=kw: _router_run(
                            _kw, _x.clone(), layer=_l, backward=_kw is _ROUTER_BASE
                        )
                    ),
                    expect,
                    ("hidden_states",),
                    chk,
                )
            )
        # forward options: padding_mask, replay_indices, record, seq_len
        t = base_x.shape[0] * base_x.shape[1]
        pm = torch.zeros(base_x.shape[:-1], dtype=torch.bool)
        pm[0, 0] = True
        fw_cases = {
            "padding_mask/None": ({"padding_mask": None}, "result"),
            "padding_mask/bool": ({"padding_mask": pm}, "result"),
            "padding_mask/all": ({"padding_mask": torch.ones_like(pm)}, "result"),
            "padding_mask/flat": ({"padding_mask": pm.reshape(-1)}, "result"),
            "padding_mask/str": ({"padding_mask": "x"}, "error"),
            "padding_mask/list": ({"padding_mask": pm.tolist()}, "error"),
            "padding_mask/numpy": ({"padding_mask": pm.numpy()}, "error"),
            "padding_mask/wrong-shape": ({"padding_mask": pm[:, :1]}, "error"),
            "padding_mask/meta": ({"padding_mask": pm.to(META)}, "error"),
            "padding_mask/sparse": ({"padding_mask": pm.to_sparse()}, "error"),
            "padding_mask/bytes": ({"padding_mask": _bool_bytes(pm, None)}, "result"),
            "replay_indices/valid": (
                {"replay_indices": torch.tensor([[0, 1], [2, 3], [1, 0]] * 2).reshape(2, 3, 2)},
                "result",
            ),
            "replay_indices/int32": ({"replay_indices": torch.tensor([[0, 1]] * t, dtype=torch.int32)}, "result"),
            "replay_indices/float": ({"replay_indices": torch.zeros(t, _MK)}, "error"),
            "replay_indices/list": ({"replay_indices": [[0, 1]] * t}, "error"),
            "replay_indices/numpy": ({"replay_indices": np.zeros((t, _MK), np.int64)}, "error"),
            "replay_indices/out-of-range": ({"replay_indices": torch.full((t, _MK), _ME)}, "error"),
            "replay_indices/repeated": ({"replay_indices": torch.zeros(t, _MK, dtype=torch.long)}, "error"),
            "replay_indices/-1": ({"replay_indices": torch.full((t, _MK), -1)}, "error"),
            "replay_indices/wrong-k": ({"replay_indices": torch.zeros(t, _MK + 1, dtype=torch.long)}, "error"),
            "replay_indices/meta": ({"replay_indices": torch.zeros(t, _MK, dtype=torch.long, device=META)}, "error"),
            "record/True": ({"record": True}, "result"),
            "record/str": ({"record": "yes"}, "error"),
            "seq_len/3": ({"seq_len": 3}, "result"),
            "seq_len/str": ({"seq_len": "3"}, "error"),
            "seq_len/2.5": ({"seq_len": 2.5}, "error"),
            "seq_len/0": ({"seq_len": 0}, "error"),
            "seq_len/4": ({"seq_len": 4}, "error"),
            "seq_len/2^64": ({"seq_len": 2**64}, "error"),
        }
        names = {
            "padding_mask": ("padding_mask",),
            "replay_indices": ("replay_indices", "indices"),
            "record": ("record",),
            "seq_len": ("seq_len",),
        }
        for tag, (fw, expect) in fw_cases.items():
            kw = {**_ROUTER_BASE, "load_balancing_type": "seq_aux_loss"} if tag.startswith("seq_len") else _ROUTER_BASE
            cases.append(
                Case(
                    f"{owner}/forward/{tag}",
                    (lambda _kw=kw, _fw=fw, _l=layer: _router_run(_kw, fw=_fw, layer=_l)),
                    expect,
                    names[tag.split("/")[0]],
                    chk,
                )
            )
        # modes
        for tag, kw, train in (
            ("eval", _ROUTER_BASE, False),
            ("frozen", {**_ROUTER_BASE, "frozen": True}, True),
            (
                "randomness",
                {
                    **_ROUTER_BASE,
                    "noise_std": 0.5,
                    "expert_mask_rate": 0.3,
                    "expert_dropout": 0.2,
                    "input_jitter_eps": 0.1,
                    "token_drop_policy": "random",
                },
                True,
            ),
            ("bias-update", {**_ROUTER_BASE, "enable_expert_bias": True}, True),
            ("pad-to-capacity", {**_ROUTER_BASE, "pad_expert_input_to_capacity": True}, True),
            ("dropless-align", {"dropless_align": 4}, True),
            ("return-losses", {**_ROUTER_BASE, "loss_mode": "return"}, True),
        ):
            cases.append(
                Case(
                    f"{owner}/mode-{tag}",
                    (lambda _kw=kw, _t=train, _l=layer: _router_run(_kw, train=_t, layer=_l)),
                    "result",
                    (),
                    chk,
                )
            )
        cases.append(Case(f"{owner}/no-grad", (lambda _l=layer: _no_grad_run(_l)), "result", (), chk))
        cases.append(
            Case(
                f"{owner}/to-bfloat16",
                (lambda _l=layer: _router_run(_ROUTER_BASE, _mx().bfloat16(), layer=_l)),
                "result",
                (),
                chk,
            )
        )
    # MoELayer-only arguments
    for tag, kw in (
        ("dtype-f64", {"dtype": torch.float64}),
        ("dtype-int32", {"dtype": torch.int32}),
        ("dtype-str", {"dtype": "float32"}),
        ("router-str", {"router": "x"}),
        ("router-mismatch", {"router": mr.TopKRouter(_MH + 1, _ME, _MK)}),
        ("router-without-dispatch", {"router": mr.TopKRouter(_MH, _ME, _MK, dispatch=False)}),
        ("router-and-kwargs", {"router": mr.TopKRouter(_MH, _ME, _MK), "z_loss_coeff": 1.0}),
        ("router", {"router": mr.TopKRouter(_MH, _ME, _MK)}),
    ):
        cases.append(
            Case(
                f"MoELayer/{tag}",
                (lambda _kw=kw: _router_run(_kw, layer=True)),
                "either",
                ("dtype", "router", "router_kwargs", "hidden_size"),
                (lambda res: _check_run(res, True)),
            )
        )
    # update_router_biases over a model with routers
    cases.append(
        Case(
            "update_router_biases/model",
            _update_biases_run,
            "result",
            (),
            lambda n: None if n == 2 else (_ for _ in ()).throw(AssertionError(f"updated {n} routers")),
        )
    )
    return cases


def _no_grad_run(layer):
    with torch.no_grad():
        return _router_run(_ROUTER_BASE, layer=layer, backward=False)


def _update_biases_run():
    model = torch.nn.ModuleList(
        [mr.TopKRouter(_MH, _ME, _MK, enable_expert_bias=True) for _ in range(2)] + [mr.TopKRouter(_MH, _ME, _MK)]
    )
    for r in model:
        r(_mx())
    return mr.update_router_biases(model)


_MORE_CASES.append(_module_cases)


# --------------------------------------------------------------------------------------
# moe_router._native called directly (all isolated: run in subprocess batches)

_NR = 8  # rows of the permute buffers
_NC = 2  # expert-choice capacity


def _i32(t):
    return t.to(torch.int32)


@dataclasses.dataclass
class NSpec:
    name: str
    build: Callable[[], Tuple[Dict[str, Any], Dict[str, Any]]]  # tensors by name (call order), options
    pos: Tuple[str, ...]  # positional parameters in order
    outputs: Tuple[str, ...]
    options: Dict[str, str]
    check: Callable[[Dict[str, Any]], None]  # the call's arguments and options after it returned
    optional: Tuple[str, ...] = ()
    floats: Tuple[str, ...] = ()  # float inputs that also take float16 / bfloat16

    def call(self, t: Dict[str, Any], kw: Dict[str, Any]):
        fn = getattr(_native, self.name)
        fn(
            *[t[n] for n in self.pos],
            **{n: v for n, v in list(t.items()) + list(kw.items()) if n not in self.pos and v is not OMIT},
        )
        return {n: t[n] for n in self.outputs}


def _nb_gating():
    return dict(
        logits=_logits(),
        expert_bias=torch.zeros(E),
        weights=torch.empty(T, K),
        indices=torch.empty(T, K, dtype=torch.int32),
    ), dict(topk=K)


def _nb_replay():
    z = _logits()
    return dict(logits=z, indices=_i32(_topk_idx(z, K)), weights=torch.empty(T, K)), {}


def _nb_gating_bwd():
    z = _logits()
    return dict(
        logits=z,
        indices=_i32(_topk_idx(z, K)),
        grad_weights=torch.randn(T, K, generator=_g(4)),
        grad_logits=torch.empty(T, E),
    ), {}


def _nb_dispatch():
    z = _logits()
    rows = _native.dispatch_max_rows(T, K, num_experts=E, capacity=2)
    i32 = dict(dtype=torch.int32)
    return dict(
        indices=_i32(_topk_idx(z, K)),
        weights=_weights(),
        slot=torch.empty(T, K, **i32),
        row=torch.empty(T, K, **i32),
        kept_weights=torch.empty(T, K),
        tokens_per_expert=torch.empty(E, **i32),
        row_to_token=torch.empty(rows, **i32),
        expert_offsets=torch.empty(E + 1, **i32),
        rows_per_rank=torch.empty(1, **i32),
        counts=torch.empty(2, dtype=torch.int64),
    ), dict(num_experts=E, capacity=2, drop_policy="probs")


def _nb_expert_choice():
    i32 = dict(dtype=torch.int32)
    return dict(
        logits=_logits(),
        weights=torch.empty(T, E),
        row=torch.empty(T, E, **i32),
        row_to_token=torch.empty(E * _NC, **i32),
        row_weights=torch.empty(E * _NC),
        tokens_per_expert=torch.empty(E, **i32),
        expert_offsets=torch.empty(E + 1, **i32),
    ), {}


def _nb_expert_choice_bwd():
    o = mr.expert_choice(_logits(), _NC)
    return dict(
        logits=_logits(),
        row=_i32(o.row),
        grad_weights=torch.randn(T, E, generator=_g(5)),
        grad_logits=torch.empty(T, E),
    ), {}


def _nb_permute():
    d = _plan(T, E, K, capacity=2)
    r = d.row_to_token.shape[0]
    return dict(
        x=torch.randn(T, H, generator=_g(2)), row_to_token=_i32(d.row_to_token), out=torch.empty(r, H), row=_i32(d.row)
    ), {}


def _nb_permute_bwd():
    d = _plan(T, E, K, capacity=2)
    r = d.row_to_token.shape[0]
    return dict(grad_buf=torch.randn(r, H, generator=_g(6)), row=_i32(d.row), grad_x=torch.empty(T, H)), {}


def _nb_unpermute():
    d = _plan(T, E, K, capacity=2)
    r = d.row_to_token.shape[0]
    return dict(
        y=torch.randn(r, H, generator=_g(3)), row=_i32(d.row), weights=d.kept_weights, out=torch.empty(T, H)
    ), {}


def _nb_unpermute_bwd():
    d = _plan(T, E, K, capacity=2)
    r = d.row_to_token.shape[0]
    return dict(
        grad_out=torch.randn(T, H, generator=_g(8)),
        y=torch.randn(r, H, generator=_g(3)),
        row=_i32(d.row),
        weights=d.kept_weights,
        grad_y=torch.empty(r, H),
        grad_weights=torch.empty(T, K),
    ), {}


def _mask():
    m = torch.zeros(T, dtype=torch.bool)
    m[-1] = True
    return m


def _nb_aux():
    return dict(
        logits=_logits(),
        padding_mask=_mask(),
        counts=None,
        total_tokens=None,
        loss=torch.empty(()),
        counts_out=torch.empty(E, dtype=torch.int64),
        total_out=torch.empty((), dtype=torch.int64),
    ), dict(topk=K, coeff=0.01)


def _nb_aux_bwd():
    return dict(
        logits=_logits(),
        padding_mask=_mask(),
        counts=torch.arange(E, dtype=torch.int64),
        total_tokens=torch.tensor(T - 1),
        grad_loss=torch.tensor(1.0),
        grad_logits=torch.empty(T, E),
    ), dict(topk=K, coeff=0.01)


def _nb_seq():
    return dict(
        logits=_logits(),
        padding_mask=_mask(),
        loss=torch.empty(()),
        counts_out=torch.empty(2, E, dtype=torch.int64),
        valid_tokens=torch.empty(2, dtype=torch.int64),
    ), dict(seq_len=3, topk=K, coeff=0.01)


def _nb_seq_bwd():
    return dict(
        logits=_logits(),
        padding_mask=_mask(),
        counts=torch.ones(2, E, dtype=torch.int64),
        valid_tokens=torch.tensor([3, 2]),
        grad_loss=torch.tensor(1.0),
        grad_logits=torch.empty(T, E),
    ), dict(seq_len=3, topk=K, coeff=0.01)


def _nb_z():
    return dict(
        logits=_logits(), padding_mask=_mask(), loss=torch.empty(()), valid_tokens=torch.empty((), dtype=torch.int64)
    ), dict(coeff=1e-3)


def _nb_z_bwd():
    return dict(
        logits=_logits(),
        padding_mask=_mask(),
        valid_tokens=torch.tensor(T - 1),
        grad_loss=torch.tensor(1.0),
        grad_logits=torch.empty(T, E),
    ), dict(coeff=1e-3)


def _nb_expert_mask():
    return dict(masked=torch.empty(T, E, dtype=torch.bool)), dict(topk=K, rate=0.5, seed=3, offset=4)


def _nb_dropout():
    z = _logits()
    return dict(
        indices=_i32(_topk_idx(z, K)),
        weights=_weights(),
        out_indices=torch.empty(T, K, dtype=torch.int32),
        out_weights=torch.empty(T, K),
        keep=torch.empty(T, K, dtype=torch.bool),
        dropped=torch.empty((), dtype=torch.int64),
    ), dict(num_experts=E, rate=0.3, seed=5, offset=1, renormalize=False)


def _nb_dropout_bwd():
    z = _logits()
    idx = _i32(_topk_idx(z, K))
    keep = ref.assignment_keep(idx.long(), 0.3, 5, 1)
    return dict(
        indices=idx,
        weights=_weights(),
        keep=keep,
        grad_out=torch.randn(T, K, generator=_g(9)),
        grad_weights=torch.empty(T, K),
    ), dict(renormalize=False)


def _nb_bias():
    return dict(bias=torch.linspace(-1, 1, E), counts=torch.arange(E, dtype=torch.int64) % 3), dict(rate=1e-3)


def _nb_stats():
    z = _logits()
    idx = _topk_idx(z, K)
    d = mr.dispatch(idx, _weights(), E, capacity=1, drop_policy="probs")
    return dict(
        logits=z,
        indices=_i32(idx),
        selected_counts=torch.empty(E, dtype=torch.int64),
        kept_counts=torch.empty(E, dtype=torch.int64),
        scalars=torch.empty(4, dtype=torch.int64),
        floats=torch.empty(4),
        slot=_i32(d.slot),
        padding_mask=_mask(),
    ), dict(strict=False)


def _nc_finite(*names):
    def chk(a):
        x = _in_inputs(a)
        for n in names:
            if _finite(x) and (x.numel() == 0 or float(x.abs().max()) <= 1e4):
                assert _finite(a[n]), f"non-finite {n} for finite inputs"

    return chk


def _in_inputs(a):
    fl = [
        v.float().reshape(-1)
        for n, v in a.items()
        if isinstance(v, torch.Tensor)
        and v.is_floating_point()
        and not n.startswith("grad_")
        or n in ("grad_weights", "grad_out", "grad_buf", "grad_loss")
    ]
    return torch.cat(fl) if fl else torch.zeros(0)


def _nc_gating(a):
    chk_topk_gating(a, (a["weights"], a["indices"].long()))


def _nc_replay(a):
    chk_replay(a, a["weights"])


def _nc_dispatch(a):
    d = mr.Dispatch(
        slot=a["slot"].long(),
        row=a["row"].long(),
        kept_weights=a["kept_weights"],
        tokens_per_expert=a["tokens_per_expert"].long(),
        dropped=a["counts"][1],
        row_to_token=a["row_to_token"].long(),
        expert_offsets=a["expert_offsets"].long(),
        rows_per_rank=a["rows_per_rank"].long(),
        num_rows=a["counts"][0],
    )
    chk_dispatch(a, d)


def _nc_expert_choice(a):
    e = a["logits"].shape[1]
    o = mr.ExpertChoice(
        a["weights"],
        a["row"].long(),
        a["row_to_token"].long(),
        a["tokens_per_expert"].long(),
        a["expert_offsets"].long(),
        a["row_weights"],
    )
    chk_expert_choice(dict(logits=a["logits"], capacity=a["row_to_token"].shape[0] // max(e, 1)), o)


def _nc_permute(a):
    chk_permute(a, a["out"])


def _nc_permute_bwd(a):
    r = a["row"].long()
    g = a["grad_buf"].double()
    want = torch.where((r >= 0)[..., None], g[r.clamp(min=0)], 0.0).sum(1)
    if _finite(a["grad_buf"]) and bool((want.abs() < 1e37).all()):
        _close(a["grad_x"], want, rtol=2e-3, atol=1e-5, what="grad_x vs reference")


def _nc_unpermute(a):
    chk_unpermute(a, a["out"])


def _nc_aux(a):
    total = a.get("total_tokens")
    b = dict(a, total_tokens=None if total is None else int(total))
    _loss_check(_ref_aux)(b, a["loss"])


def _nc_seq(a):
    _loss_check(_ref_seq)(a, a["loss"])


def _nc_z(a):
    _loss_check(_ref_z)(a, a["loss"])


def _nc_mask(a):
    m = a["masked"]
    chk_expert_mask(
        dict(num_tokens=m.shape[0], num_experts=m.shape[1], **{k: a[k] for k in ("topk", "rate", "seed", "offset")}), m
    )


def _nc_dropout(a):
    chk_assignment_dropout(a, (a["out_indices"].long(), a["out_weights"]))


def _nc_bias(a):
    pass  # the value check runs in the same-as-functional cases; here: no crash, no overlap


def _nc_stats(a):
    s, f = a["scalars"], a["floats"]
    st = mr.RouterStats(
        a["selected_counts"],
        a["kept_counts"] if a.get("slot") is not None else None,
        s[1],
        f[0],
        f[1],
        f[2],
        f[3],
        s[2],
        s[0],
    )
    chk_router_stats(dict(a, slot=a.get("slot")), st)


_SF = "str:softmax,sigmoid"
_GATING_OPTS = {"score_function": _SF, "pre_softmax": "bool", "normalize": "bool", "scaling_factor": "float"}
NSPECS: List[NSpec] = [
    NSpec(
        "topk_gating",
        _nb_gating,
        ("logits", "expert_bias", "weights", "indices"),
        ("weights", "indices"),
        {
            "topk": "int",
            **_GATING_OPTS,
            "num_groups": "int",
            "group_topk": "int",
            "noise_std": "float",
            "expert_mask_rate": "float",
            "seed": "seed",
            "offset": "seed",
        },
        _nc_gating,
        ("expert_bias",),
        ("logits",),
    ),
    NSpec(
        "topk_gating_replay",
        _nb_replay,
        ("logits", "indices", "weights"),
        ("weights",),
        _GATING_OPTS,
        _nc_replay,
        floats=("logits",),
    ),
    NSpec(
        "topk_gating_backward",
        _nb_gating_bwd,
        ("logits", "indices", "grad_weights", "grad_logits"),
        ("grad_logits",),
        _GATING_OPTS,
        _nc_finite("grad_logits"),
        floats=("logits",),
    ),
    NSpec(
        "dispatch",
        _nb_dispatch,
        (
            "indices",
            "weights",
            "slot",
            "row",
            "kept_weights",
            "tokens_per_expert",
            "row_to_token",
            "expert_offsets",
            "rows_per_rank",
            "counts",
        ),
        (
            "slot",
            "row",
            "kept_weights",
            "tokens_per_expert",
            "row_to_token",
            "expert_offsets",
            "rows_per_rank",
            "counts",
        ),
        {
            "num_experts": "size",
            "capacity": "int",
            "drop_policy": "str:position,choice_then_position,probs,batch_prioritized,random",
            "layout": "str:compact,pad_to_capacity,dropless",
            "align": "int",
            "renormalize": "bool",
            "ep_size": "int",
            "seed": "seed",
            "offset": "seed",
        },
        _nc_dispatch,
    ),
    NSpec(
        "expert_choice",
        _nb_expert_choice,
        ("logits", "weights", "row", "row_to_token", "row_weights", "tokens_per_expert", "expert_offsets"),
        ("weights", "row", "row_to_token", "row_weights", "tokens_per_expert", "expert_offsets"),
        {},
        _nc_expert_choice,
        floats=("logits",),
    ),
    NSpec(
        "expert_choice_backward",
        _nb_expert_choice_bwd,
        ("logits", "row", "grad_weights", "grad_logits"),
        ("grad_logits",),
        {},
        _nc_finite("grad_logits"),
        floats=("logits",),
    ),
    NSpec("permute", _nb_permute, ("x", "row_to_token", "out", "row"), ("out",), {}, _nc_permute, ("row",), ("x",)),
    NSpec(
        "permute_backward",
        _nb_permute_bwd,
        ("grad_buf", "row", "grad_x"),
        ("grad_x",),
        {},
        _nc_permute_bwd,
        floats=("grad_buf",),
    ),
    NSpec("unpermute", _nb_unpermute, ("y", "row", "weights", "out"), ("out",), {}, _nc_unpermute, floats=("y",)),
    NSpec(
        "unpermute_backward",
        _nb_unpermute_bwd,
        ("grad_out", "y", "row", "weights", "grad_y", "grad_weights"),
        ("grad_y", "grad_weights"),
        {},
        _nc_finite("grad_y", "grad_weights"),
        floats=("grad_out", "y"),
    ),
    NSpec(
        "aux_loss",
        _nb_aux,
        ("logits", "padding_mask", "counts", "total_tokens", "loss", "counts_out", "total_out"),
        ("loss", "counts_out", "total_out"),
        {"topk": "int", "score_function": _SF, "coeff": "float"},
        _nc_aux,
        ("padding_mask", "counts", "total_tokens"),
        ("logits",),
    ),
    NSpec(
        "aux_loss_backward",
        _nb_aux_bwd,
        ("logits", "padding_mask", "counts", "total_tokens", "grad_loss", "grad_logits"),
        ("grad_logits",),
        {"topk": "int", "score_function": _SF, "coeff": "float"},
        _nc_finite("grad_logits"),
        ("padding_mask",),
        ("logits",),
    ),
    NSpec(
        "seq_aux_loss",
        _nb_seq,
        ("logits", "padding_mask", "loss", "counts_out", "valid_tokens"),
        ("loss", "counts_out", "valid_tokens"),
        {"seq_len": "int", "topk": "int", "score_function": _SF, "coeff": "float"},
        _nc_seq,
        ("padding_mask",),
        ("logits",),
    ),
    NSpec(
        "seq_aux_loss_backward",
        _nb_seq_bwd,
        ("logits", "padding_mask", "counts", "valid_tokens", "grad_loss", "grad_logits"),
        ("grad_logits",),
        {"seq_len": "int", "topk": "int", "score_function": _SF, "coeff": "float"},
        _nc_finite("grad_logits"),
        ("padding_mask",),
        ("logits",),
    ),
    NSpec(
        "z_loss",
        _nb_z,
        ("logits", "padding_mask", "loss", "valid_tokens"),
        ("loss", "valid_tokens"),
        {"coeff": "float"},
        _nc_z,
        ("padding_mask",),
        ("logits",),
    ),
    NSpec(
        "z_loss_backward",
        _nb_z_bwd,
        ("logits", "padding_mask", "valid_tokens", "grad_loss", "grad_logits"),
        ("grad_logits",),
        {"coeff": "float"},
        _nc_finite("grad_logits"),
        ("padding_mask",),
        ("logits",),
    ),
    NSpec(
        "expert_mask",
        _nb_expert_mask,
        ("masked",),
        ("masked",),
        {"topk": "int", "rate": "float", "seed": "seed", "offset": "seed"},
        _nc_mask,
    ),
    NSpec(
        "assignment_dropout",
        _nb_dropout,
        ("indices", "weights", "out_indices", "out_weights", "keep", "dropped"),
        ("out_indices", "out_weights", "keep", "dropped"),
        {"num_experts": "int", "rate": "float", "seed": "seed", "offset": "seed", "renormalize": "bool"},
        _nc_dropout,
    ),
    NSpec(
        "assignment_dropout_backward",
        _nb_dropout_bwd,
        ("indices", "weights", "keep", "grad_out", "grad_weights"),
        ("grad_weights",),
        {"renormalize": "bool"},
        _nc_finite("grad_weights"),
    ),
    NSpec("update_expert_bias", _nb_bias, ("bias", "counts"), ("bias",), {"rate": "float"}, _nc_bias),
    NSpec(
        "router_stats",
        _nb_stats,
        ("logits", "indices", "selected_counts", "kept_counts", "scalars", "floats"),
        ("selected_counts", "kept_counts", "scalars", "floats"),
        {"strict": "bool"},
        _nc_stats,
        ("slot", "padding_mask"),
        ("logits",),
    ),
]


def _ncase(spec: NSpec, cid: str, mutate, expect="either", names=(), same_as_mutate=None, known=None) -> Case:
    holder: Dict[str, Any] = {}

    def thunk():
        t, kw = spec.build()
        t, kw = mutate(t, kw)
        holder["a"] = (t, kw)
        return spec.call(t, kw)

    def check(out):
        t, kw = holder["a"]
        spec.check({**t, **kw})

    same_as = None
    if same_as_mutate is not None:

        def same_as():
            t, kw = spec.build()
            return spec.call(*same_as_mutate(t, kw))

    return Case(f"_native.{spec.name}/{cid}", thunk, expect, tuple(names), check, same_as, True, known)


def _nset(name, f):
    def mutate(t, kw):
        t = dict(t)
        t[name] = f(t[name], t)
        return t, kw

    return mutate


def _nopt(name, v):
    def mutate(t, kw):
        kw = dict(kw)
        kw[name] = v
        return t, kw

    return mutate


def _present_native(spec: NSpec, name: str, t: Dict[str, Any]):
    if t[name] is not None:
        return t[name]
    return {
        "counts": torch.arange(E, dtype=torch.int64),
        "total_tokens": torch.tensor(T - 1),
        "expert_bias": torch.zeros(E),
        "padding_mask": _mask(),
    }[name]


#: The core's names for some options of _native (docs/hardening.md, finding P3).
_NATIVE_OPTION_NAMES = {"noise_std": ("noise.std",), "expert_mask_rate": ("expert_masking",)}


def _native_cases() -> List[Case]:
    cases: List[Case] = []
    for spec in NSPECS:
        t0, kw0 = spec.build()
        allnames = tuple(t0) + tuple(kw0)
        # the valid call
        cases.append(_ncase(spec, "valid", lambda t, kw: (t, kw), "result"))
        for name in t0:
            is_out = name in spec.outputs
            get = (lambda n: (lambda v, t: _present_native(spec, n, t)))(name)

            def on(f, _n=name, _get=get):
                return _nset(_n, lambda v, t: f(_get(v, t), t))

            base = _present_native(spec, name, t0)
            names = (name,)
            cases.append(
                _ncase(
                    spec,
                    f"{name}/type-None",
                    _nset(name, lambda v, t: None),
                    "either" if name in spec.optional else "error",
                    allnames,
                )
            )
            for tag, f in (
                ("str", lambda v, t: "tensor"),
                ("list", lambda v, t: v.tolist()),
                ("numpy", lambda v, t: v.numpy()),
                ("int", lambda v, t: 7),
                ("address", lambda v, t: v.data_ptr()),
            ):
                cases.append(_ncase(spec, f"{name}/type-{tag}", on(f), "error", names))
            ok_dtypes = {base.dtype} | (set(FLOATS) if name in spec.floats else set())
            for dt in ALL_DTYPES:
                if dt == base.dtype:
                    continue
                cases.append(
                    _ncase(
                        spec,
                        f"{name}/dtype-{_dtype_name(dt)}",
                        on(lambda v, t, _dt=dt: v.to(_dt)),
                        "either" if dt in ok_dtypes else "error",
                        allnames,
                    )
                )
            # shapes
            shape_muts = [("extra-dim", lambda v, t: v[None])]
            if base.dim() >= 1:
                shape_muts += [
                    ("one-more", lambda v, t: torch.cat([v, v[:1]])),
                    ("one-less", lambda v, t: v[1:].clone()),
                    ("0-d", lambda v, t: v.reshape(-1)[0].clone() if v.numel() else v.sum()),
                ]
            else:
                shape_muts += [("1-d", lambda v, t: v.reshape(1))]
            for tag, f in shape_muts:
                cases.append(_ncase(spec, f"{name}/shape-{tag}", on(f), "either", allnames))
            # layouts and devices
            lay = [
                ("strided", lambda v, t: _strided(v)),
                ("offset", lambda v, t: _offset(v)),
                ("meta", lambda v, t: v.to(META)),
                ("sparse-coo", lambda v, t: v.to_sparse()),
                ("nested", lambda v, t: torch.nested.nested_tensor(list(v) if v.dim() > 1 else [v])),
            ]
            if base.numel() > 1:
                lay += [("expanded", lambda v, t: v.reshape(-1)[:1].expand(v.shape))]
            if base.dim() == 2 and min(base.shape) > 1:
                lay += [("transposed", lambda v, t: v.t().contiguous().t())]
            for tag, f in lay:
                ok = tag == "offset" or (tag == "strided" and base.numel() <= 1)
                cases.append(_ncase(spec, f"{name}/layout-{tag}", on(f), "either" if ok else "error", names))
            if base.is_floating_point():
                cases.append(
                    _ncase(spec, f"{name}/requires-grad", on(lambda v, t: v.clone().requires_grad_()), "either", names)
                )
                # DLPack has no negation bit: the native module refuses a negated view
                # (the ops above it resolve their inputs), rather than misread it.
                cases.append(
                    _ncase(spec, f"{name}/neg-view", on(lambda v, t: torch._neg_view(v.neg())), "error", names)
                )
            # aliasing: an output passed as (or overlapping) another tensor of the call
            if is_out:
                for other in t0:
                    if other == name or t0[other] is None:
                        continue
                    cases.append(
                        _ncase(
                            spec, f"{name}/alias-{other}", _nset(name, lambda v, t, _o=other: t[_o]), "error", allnames
                        )
                    )
                    ov = t0[other]
                    if ov.dtype == base.dtype and ov.numel() > base.numel() >= 1:
                        cases.append(
                            _ncase(
                                spec,
                                f"{name}/overlaps-{other}",
                                _nset(name, lambda v, t, _o=other: t[_o].reshape(-1)[1 : 1 + v.numel()].view(v.shape)),
                                "error",
                                (name, other),
                            )
                        )
            else:
                for other in t0:
                    ov = t0[other]
                    if (
                        other != name
                        and other not in spec.outputs
                        and ov is not None
                        and ov.dtype == base.dtype
                        and ov.shape == base.shape
                    ):
                        cases.append(
                            _ncase(
                                spec,
                                f"{name}/same-tensor-as-{other}",
                                _nset(name, lambda v, t, _o=other: t[_o]),
                                "either",
                                (name, other),
                            )
                        )
                # hostile values
                if base.dtype == torch.int32:
                    for tag, v in (("-1", -1), ("-2", -2), ("E", E), ("i32max", 2**31 - 1), ("i32min", -(2**31))):
                        cases.append(
                            _ncase(
                                spec,
                                f"{name}/value-{tag}",
                                on(lambda b, t, _v=v: torch.full_like(b, _v)),
                                "either",
                                allnames,
                            )
                        )
                elif base.dtype == torch.bool:
                    cases.append(
                        _ncase(
                            spec,
                            f"{name}/value-bytes",
                            on(_bool_bytes),
                            "either",
                            allnames,
                            same_as_mutate=on(_bool_norm),
                        )
                    )
                elif base.is_floating_point():
                    for tag, f in (("nan", _fill(math.nan)), ("mixed", _mixed), ("huge", _fill(3e38))):
                        cases.append(_ncase(spec, f"{name}/value-{tag}", on(f), "either", allnames))
                elif base.dtype == torch.int64:
                    for tag, v in (("-1", -1), ("i64max", 2**63 - 1), ("2^40", 2**40)):
                        cases.append(
                            _ncase(
                                spec,
                                f"{name}/value-{tag}",
                                on(lambda b, t, _v=v: torch.full_like(b, _v)),
                                "either",
                                allnames,
                            )
                        )
        # options
        for name, kind in spec.options.items():
            # an option changes what the outputs must be: the error may name an output
            names = (name,) + _NATIVE_OPTION_NAMES.get(name, ()) + allnames + tuple(spec.options)
            for tag, v in _option_values(kind):
                cases.append(_ncase(spec, f"{name}={tag}", _nopt(name, v), "either", names))
            cases.append(_ncase(spec, f"{name}/omitted", _nopt(name, OMIT), "either", (name,)))
        if spec.options:  # (the others take no keyword at all: a Python signature error)
            cases.append(_ncase(spec, "unknown-option", _nopt("bogus", 1), "error", ("bogus",)))
    cases += _native_int_cases()
    return cases


def _native_int_cases() -> List[Case]:
    """The size functions of _native (no tensors): every argument past its limits."""
    cases = []
    fns = {
        "capacity": (
            _native.capacity,
            [T, E, K, 1.25, 0, None],
            ("num_tokens", "num_experts", "topk", "capacity_factor", "min_capacity", "capacity_multiple"),
            {},
        ),
        "expert_choice_num_rows": (
            _native.expert_choice_num_rows,
            [T, E, _NC],
            ("num_tokens", "num_experts", "capacity"),
            {},
        ),
        "expert_mask_len": (
            _native.expert_mask_len,
            [T, E],
            ("num_tokens", "num_experts"),
            dict(topk=K, rate=0.5, seed=0, offset=0),
        ),
        "dispatch_max_rows": (
            _native.dispatch_max_rows,
            [T, K],
            ("num_tokens", "topk"),
            dict(num_experts=E, capacity=2),
        ),
    }
    for fname, (fn, args, names, kw) in fns.items():
        cases.append(
            Case(
                f"_native.{fname}/valid",
                (lambda _f=fn, _a=args, _k=kw: _f(*_a, **_k)),
                "result",
                check=lambda n: None
                if isinstance(n, int) and 0 <= n <= 2**31 - 1
                else (_ for _ in ()).throw(AssertionError(n)),
            )
        )
        for i, name in enumerate(names):
            kind = "float" if name == "capacity_factor" else "int"
            for tag, v in _option_values(kind):
                a = list(args)
                a[i] = v
                cases.append(
                    Case(
                        f"_native.{fname}/{name}={tag}",
                        (lambda _f=fn, _a=a, _k=kw: _f(*_a, **_k)),
                        "either",
                        names + tuple(kw),
                        isolate=True,
                    )
                )
    cases += [
        Case(
            "_native.cuda_device_count/call",
            _native.cuda_device_count,
            "result",
            check=lambda n: None if isinstance(n, int) and n >= 0 else (_ for _ in ()).throw(AssertionError(n)),
        ),
        Case(
            "_native._cuda_calls/call",
            _native._cuda_calls,
            "result",
            check=lambda d: None if isinstance(d, dict) else (_ for _ in ()).throw(AssertionError(d)),
        ),
        Case(
            "_native._emulate_cuda_on_cpu/str",
            lambda: _native._emulate_cuda_on_cpu("yes"),
            "error",
            ("on",),
            isolate=True,
        ),
        Case(
            "_native._emulate_cuda_on_cpu/False",
            lambda: _native._emulate_cuda_on_cpu(False),
            "either",
            ("on",),
            isolate=True,
        ),
    ]
    return cases


_MORE_CASES.append(_native_cases)


# --------------------------------------------------------------------------------------
# Threads: several Python threads calling the ops at once (the native code releases the
# GIL) give exactly the single-threaded results


def _threaded(fn: Callable[[Any], Any], inputs: List[Any], threads=4, reps=3):
    """(single-threaded results, results of `threads` threads each running every input
    `reps` times, in a rotated order)."""
    want = [fn(x) for x in inputs]
    got: List[List[Tuple[int, Any]]] = [[] for _ in range(threads)]
    errors: List[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(i):
        try:
            barrier.wait()
            for _ in range(reps):
                for j in range(len(inputs)):
                    k = (j + i) % len(inputs)
                    got[i].append((k, fn(inputs[k])))
        except BaseException as e:  # noqa: BLE001 -- re-raised in the calling thread
            errors.append(e)

    ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if errors:
        raise errors[0]
    return want, got


def _check_threaded(res):
    want, got = res
    for per_thread in got:
        for k, out in per_thread:
            diff = _same_outputs(out, want[k])
            assert diff is None, f"a threaded result differs from the single-threaded one: {diff}"


def _thread_inputs(n=4, t=256, e=16):
    return [ref.tie_free_logits(t, e, seed=100 + i) for i in range(n)]


def _thread_cases() -> List[Case]:
    def gating(z):
        return mr.topk_gating(
            z,
            4,
            score_function="sigmoid",
            normalize=True,
            num_groups=4,
            group_topk=2,
            noise_std=0.1,
            expert_mask_rate=0.2,
            seed=1,
            offset=2,
        )

    def dispatch(z):
        w, i = mr.topk_gating(z, 2)
        return mr.dispatch(i, w, z.shape[1], capacity=20, drop_policy="random", renormalize=True, seed=3)

    def perm(z):
        w, i = mr.topk_gating(z, 2)
        d = mr.dispatch(i, w, z.shape[1], layout="dropless", align=4)
        buf = mr.permute(z, d.row_to_token, d.row)
        return buf, mr.unpermute(buf * 2, d.row, d.kept_weights)

    def losses_backward(z):
        z = z.clone().requires_grad_()
        loss = mr.aux_loss(z, 2, coeff=0.1) + mr.seq_aux_loss(z, 2, 16, coeff=0.1) + mr.z_loss(z, coeff=1e-3)
        w, _ = mr.topk_gating(z, 2, pre_softmax=True)
        (loss + w.sum()).backward()
        return loss.detach(), z.grad

    def stats(z):
        w, i = mr.topk_gating(z, 2)
        return mr.router_stats(z, i, slot=mr.dispatch(i, w, z.shape[1], capacity=8).slot)

    def expert_choice(z):
        z = z.clone().requires_grad_()
        o = mr.expert_choice(z, 24)
        (o.weights.sum() + o.row_weights.square().sum()).backward()
        return o, z.grad

    def dropout(z):
        w, i = mr.topk_gating(z, 3)
        return mr.assignment_dropout(i, w, 0.4, num_experts=z.shape[1], seed=7, renormalize=True), mr.expert_mask(
            z.shape[0], z.shape[1], 3, 0.5, seed=int(z[0, 0].abs() * 1000)
        )

    router = mr.TopKRouter(16, 16, 2, capacity_factor=1.25, aux_loss_coeff=0.01).eval()

    def module(z):
        with torch.no_grad():
            return router(z[:, :16]).weights

    def native(z):
        t, e = z.shape
        w, i = torch.empty(t, 2), torch.empty(t, 2, dtype=torch.int32)
        _native.topk_gating(z, None, w, i, topk=2, score_function="softmax", pre_softmax=True)
        return w, i

    fns = {
        "topk_gating": gating,
        "dispatch": dispatch,
        "permute-unpermute": perm,
        "losses-backward": losses_backward,
        "router_stats": stats,
        "expert_choice-backward": expert_choice,
        "dropout": dropout,
        "TopKRouter-eval": module,
        "_native.topk_gating": native,
    }
    return [
        Case(f"threads/{name}", (lambda _f=fn: _threaded(_f, _thread_inputs())), "result", (), _check_threaded)
        for name, fn in fns.items()
    ]


_MORE_CASES.append(_thread_cases)


# --------------------------------------------------------------------------------------
# torch.compile(dynamic=True) over several sizes (aot_eager: the fake kernels, dynamic
# shapes and the autograd formulas, without code generation), against eager mode


class _CountingBackend:
    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _compile_step(x, gate):
    logits = x @ gate
    w, idx = mr.topk_gating(logits, 2, score_function="sigmoid", normalize=True)
    d = mr.dispatch(idx, w, gate.shape[1], layout="dropless", align=2)
    buf = mr.permute(x, d.row_to_token, d.row)
    out = mr.unpermute(buf * 2, d.row, d.kept_weights)
    o = mr.expert_choice(logits, 3)
    return (
        out.square().mean()
        + mr.aux_loss(logits, 2, coeff=0.01)
        + mr.z_loss(logits, coeff=1e-3)
        + o.weights.sum() * 1e-3
        + mr.router_stats(logits.detach(), idx).max_violation * 0
    )


_COMPILED: Dict[str, Any] = {}


def _compiled(name, fn):
    """One compiled function per name for the whole run (the size cases share it)."""
    if name not in _COMPILED:
        backend = _CountingBackend()
        compiled = torch.compile(fn, backend=backend, dynamic=True, fullgraph=True)

        def first_call_counts(*a):
            out = compiled(*a)
            _COMPILED.setdefault(name + "/graphs-after-first-call", backend.graphs)
            return out

        _COMPILED[name] = (first_call_counts, backend)
    return _COMPILED[name]


def _no_recompile(name, run_sizes):
    """Graphs compiled after the first size (dynamo may trace the first call twice) must
    serve every other size."""
    run_sizes()
    first = _COMPILED.get(name + "/graphs-after-first-call")
    now = _COMPILED[name][1].graphs
    assert first is not None and now == first, f"recompiled: {first} graphs after the first size, {now} after all"
    return now


def _run_step(fn, t, seed=0):
    g = _g(seed)
    x = torch.randn(t, 16, generator=g).requires_grad_()
    gate = (torch.randn(16, 8, generator=g) * 0.5).requires_grad_()
    loss = fn(x, gate)
    loss.backward()
    return loss.detach(), x.grad, gate.grad


def _compare_eager(res):
    (compiled, eager) = res
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _module_step(layer, x):
    y, r = layer(x)
    return y.square().mean() + r.loss


def _compile_cases() -> List[Case]:
    cases = []
    for t in (3, 17, 64, 5):
        cases.append(
            Case(
                f"compile/step-dynamic-T={t}",
                (lambda _t=t: (_run_step(_compiled("step", _compile_step)[0], _t), _run_step(_compile_step, _t))),
                "result",
                (),
                _compare_eager,
            )
        )
    cases.append(
        Case(
            "compile/step-no-recompile-over-sizes",
            lambda: _no_recompile(
                "step", lambda: [_run_step(_compiled("step", _compile_step)[0], t) for t in (3, 17, 64, 5)]
            ),
            "result",
        )
    )
    for t in (4, 9, 33):
        cases.append(
            Case(
                f"compile/MoELayer-dynamic-T={t}",
                (lambda _t=t: _moe_compiled_vs_eager(_moe_layer(), _t)),
                "result",
                (),
                _compare_eager,
            )
        )
    cases.append(
        Case(
            "compile/MoELayer-no-recompile-over-sizes",
            lambda: _no_recompile("moe", lambda: [_moe_compiled_vs_eager(_moe_layer(), t) for t in (4, 9, 33)]),
            "result",
        )
    )
    return cases


def _moe_layer():
    """The MoELayer of the compile cases (built on first use, seeded without touching the
    global RNG: collection must not change the state other tests see)."""
    if "layer" not in _COMPILED:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            _COMPILED["layer"] = mr.MoELayer(
                16, 8, 8, 2, capacity_factor=1.5, pad_expert_input_to_capacity=True, aux_loss_coeff=0.01
            )
    return _COMPILED["layer"]


def _moe_compiled_vs_eager(layer, t):
    fn, _ = _compiled("moe", lambda x: _module_step(layer, x))
    x = torch.randn(t, 16, generator=_g(t))
    out = []
    for f in (fn, lambda x: _module_step(layer, x)):
        layer.zero_grad()
        loss = f(x)
        loss.backward()
        out.append((loss.detach(), layer.router.gate.weight.grad.clone(), layer.experts.w1.grad.clone()))
    return out


_MORE_CASES.append(_compile_cases)


# --------------------------------------------------------------------------------------
# Autograd paths: gradients against float64 torch references (reference.py), upstream
# gradients that are NaN, zero-stride (from .sum()) or empty, repeated backward


def _grad(f, *xs, g=None):
    xs = [x.detach().clone().requires_grad_() for x in xs]
    out = f(*xs)
    out.backward(g if g is not None else torch.ones_like(out))
    return [x.grad for x in xs]


def _vs(got, want, rtol=1e-4, atol=1e-5):
    def chk(_):
        for a, b in zip(got(), want()):
            _close(a, b, rtol=rtol, atol=atol)

    return chk


def _autograd_cases() -> List[Case]:
    cases = []
    z = _logits(12, 8)
    idx = _topk_idx(z, 3)
    w = _weights(12, 3)
    for dt in FLOATS:
        tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}[dt]
        for mode, kw in (
            ("post", {}),
            ("pre", {"pre_softmax": True}),
            ("sigmoid-norm", {"score_function": "sigmoid", "normalize": True}),
            ("scaled", {"normalize": True, "scaling_factor": 2.5}),
        ):
            zz = z.to(dt)
            got = lambda _z=zz, _kw=kw: _grad(lambda a: mr.topk_gating(a, 3, **_kw)[0].sum(), _z)  # noqa: E731
            want = lambda _z=zz, _kw=kw: _grad(lambda a: ref.gating_weights(a.double(), idx, **_kw).sum(), _z)  # noqa: E731
            cases.append(
                Case(f"autograd/topk_gating-{mode}-{_dtype_name(dt)}", got, "result", (), _vs(got, want, tol, tol))
            )
            got_r = lambda _z=zz, _kw=kw: _grad(lambda a: (mr.topk_gating_replay(a, idx, **_kw) * w).sum(), _z)  # noqa: E731
            want_r = lambda _z=zz, _kw=kw: _grad(lambda a: (ref.gating_weights(a.double(), idx, **_kw) * w).sum(), _z)  # noqa: E731
            cases.append(
                Case(f"autograd/replay-{mode}-{_dtype_name(dt)}", got_r, "result", (), _vs(got_r, want_r, tol, tol))
            )
    for renorm in (False, True):
        got = lambda _r=renorm: _grad(  # noqa: E731
            lambda a: (mr.dispatch(idx, a, 8, capacity=3, drop_policy="probs", renormalize=_r).kept_weights ** 2).sum(),
            w,
        )
        want = lambda _r=renorm: _grad(lambda a: (_ref_kept(idx, a.double(), 8, 3, _r) ** 2).sum(), w)  # noqa: E731
        cases.append(Case(f"autograd/dispatch-kept_weights-renormalize={renorm}", got, "result", (), _vs(got, want)))
        got = lambda _r=renorm: _grad(  # noqa: E731
            lambda a: (mr.assignment_dropout(idx, a, 0.4, num_experts=8, seed=3, renormalize=_r)[1] ** 2).sum(), w
        )
        want = lambda _r=renorm: _grad(  # noqa: E731
            lambda a: (
                ref.assignment_dropout_weights(a.double(), idx, ref.assignment_keep(idx, 0.4, 3, 0), _r) ** 2
            ).sum(),
            w,
        )
        cases.append(Case(f"autograd/assignment_dropout-renormalize={renorm}", got, "result", (), _vs(got, want)))
    got = lambda: _grad(  # noqa: E731
        lambda a: (mr.expert_choice(a, 4).weights ** 2).sum() + mr.expert_choice(a, 4).row_weights.sum(), z
    )
    want = lambda: _grad(lambda a: _ref_expert_choice_loss(a.double(), 4), z)  # noqa: E731
    cases.append(Case("autograd/expert_choice", got, "result", (), _vs(got, want)))
    d = mr.dispatch(idx, w, 8, capacity=3)
    x = torch.randn(12, 5, generator=_g(11))
    y = torch.randn(d.row_to_token.shape[0], 5, generator=_g(12))
    got = lambda: _grad(lambda a: (mr.permute(a, d.row_to_token, d.row) ** 2).sum(), x)  # noqa: E731
    want = lambda: _grad(lambda a: (_ref_permute(a.double(), d.row_to_token) ** 2).sum(), x)  # noqa: E731
    cases.append(Case("autograd/permute", got, "result", (), _vs(got, want)))
    got = lambda: _grad(lambda a, b: (mr.unpermute(a, d.row, b) ** 2).sum(), y, d.kept_weights)  # noqa: E731
    want = lambda: _grad(lambda a, b: (_ref_unpermute(a.double(), d.row, b.double()) ** 2).sum(), y, d.kept_weights)  # noqa: E731
    cases.append(Case("autograd/unpermute", got, "result", (), _vs(got, want)))
    mask = torch.arange(12) % 5 == 0
    for name, f, fr in (
        (
            "aux_loss",
            lambda a: mr.aux_loss(a, 3, coeff=0.1, padding_mask=mask),
            lambda a: ref.aux_loss(a, 3, coeff=0.1, padding_mask=mask),
        ),
        (
            "aux_loss-sigmoid",
            lambda a: mr.aux_loss(a, 3, score_function="sigmoid"),
            lambda a: ref.aux_loss(a, 3, score_function="sigmoid"),
        ),
        ("global_aux_loss", lambda a: mr.global_aux_loss(a, 3), lambda a: ref.aux_loss(a, 3)),
        (
            "seq_aux_loss",
            lambda a: mr.seq_aux_loss(a, 3, 4, padding_mask=mask),
            lambda a: ref.seq_aux_loss(a, 3, 4, padding_mask=mask),
        ),
        (
            "z_loss",
            lambda a: mr.z_loss(a, coeff=0.5, padding_mask=mask),
            lambda a: ref.z_loss(a, coeff=0.5, padding_mask=mask),
        ),
    ):
        got = lambda _f=f: _grad(_f, z)  # noqa: E731
        want = lambda _f=fr: _grad(lambda a: _f(a.double()), z)  # noqa: E731
        cases.append(Case(f"autograd/{name}", got, "result", (), _vs(got, want)))
    # hostile upstream gradients and shapes
    cases += [
        Case(
            "autograd/nan-upstream-gradient",
            lambda: _grad(lambda a: mr.topk_gating(a, 3, normalize=True)[0], z, g=torch.full((12, 3), math.nan)),
            "result",
        ),
        Case(
            "autograd/empty-batch",
            lambda: _grad(
                lambda a: mr.topk_gating(a, 3)[0].sum() + mr.aux_loss(a, 3) + mr.z_loss(a), torch.empty(0, 8)
            ),
            "result",
            check=lambda gs: None if gs[0].shape == (0, 8) else (_ for _ in ()).throw(AssertionError(gs[0].shape)),
        ),
        Case(
            "autograd/non-contiguous-upstream",
            lambda: _grad(lambda a: mr.topk_gating(a, 3)[0].t(), z, g=torch.randn(12, 3).t().contiguous().t().t()),
            "result",
        ),
        Case("autograd/backward-twice", _backward_twice, "result"),
        Case(
            "autograd/router_stats-not-differentiable",
            lambda: mr.router_stats(z.clone().requires_grad_(), idx),
            "result",
            check=lambda st: None
            if not any(t.requires_grad for t in st if isinstance(t, torch.Tensor))
            else (_ for _ in ()).throw(AssertionError("a statistic requires grad")),
        ),
        Case("autograd/bias-gets-no-gradient", _bias_no_grad, "result"),
    ]
    return cases


def _backward_twice():
    z = _logits(12, 8).requires_grad_()
    loss = mr.topk_gating(z, 3, pre_softmax=True)[0].square().sum() + mr.aux_loss(z, 3)
    loss.backward(retain_graph=True)
    g1 = z.grad.clone()
    loss.backward()
    torch.testing.assert_close(z.grad, 2 * g1)
    return z.grad


def _bias_no_grad():
    b = torch.zeros(8, requires_grad=True)
    w, _ = mr.topk_gating(_logits(12, 8).requires_grad_(), 3, expert_bias=b)
    w.sum().backward()
    assert b.grad is None, "expert_bias got a gradient"
    return w


def _ref_kept(idx, w, e, cap, renorm):
    d = mr.dispatch(idx, w.detach().float(), e, capacity=cap, drop_policy="probs")
    kept = d.slot >= 0
    k = torch.where(kept, w, torch.zeros((), dtype=w.dtype))
    if renorm:
        s = torch.where(idx >= 0, w, torch.zeros((), dtype=w.dtype)).sum(-1, keepdim=True)
        k = torch.where(
            kept.any(-1, keepdim=True), k * (s / (k.sum(-1, keepdim=True) + 1e-20)), torch.zeros((), dtype=w.dtype)
        )
    return k


def _ref_expert_choice_loss(z, cap):
    p = torch.softmax(z, -1)
    o = mr.expert_choice(z.detach().float(), cap)
    chosen = o.row >= 0
    pw = torch.where(chosen, p, torch.zeros((), dtype=p.dtype))
    return (pw**2).sum() + pw.sum()


def _ref_permute(x, r2t):
    r = r2t.long()
    return torch.where((r >= 0)[:, None], x[r.clamp(min=0)], torch.zeros((), dtype=x.dtype))


def _ref_unpermute(y, row, w):
    r = row.long()
    m = (r >= 0).to(y.dtype)
    return (y[r.clamp(min=0)] * (w * m)[..., None]).sum(1)


_MORE_CASES.append(_autograd_cases)


# ======================================================================================
# Running the cases: in process, or in subprocess batches for the isolated ones

CASES = _all_cases()
_BY_ID = {c.id: c for c in CASES}
COUNTS = {"tried": 0, "result": 0, "error": 0, "failed": 0, "known": 0}
_T0: List[float] = []  # when the first case ran
_THIS = os.path.abspath(__file__)


def _child_limit_memory() -> None:
    """Cap the child's address space at what it uses now plus a headroom: a runaway
    allocation then fails (and fails its case) instead of taking the machine down."""
    try:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = vm + CHILD_HEADROOM_BYTES
    if hard == resource.RLIM_INFINITY or want <= hard:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _child_main(ids_path: str) -> None:
    with open(ids_path) as f:
        ids = json.load(f)
    _child_limit_memory()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    for cid in ids:
        print(f"START {cid}", flush=True)
        try:
            verdict, detail = judge(_BY_ID[cid])
        except Verdict as v:
            verdict, detail = "fail", str(v)
        except BaseException as e:  # noqa: BLE001 -- reported, then the batch goes on
            verdict, detail = "fail", f"{type(e).__name__}: {e}"
        print("DONE " + json.dumps({"id": cid, "verdict": verdict, "detail": detail}), flush=True)


def _run_isolated(ids: List[str]) -> Dict[str, Tuple[str, str]]:
    """Run the cases `ids` in subprocess batches; a crash fails the case it happened in
    and the batch resumes after it."""
    import tempfile

    results: Dict[str, Tuple[str, str]] = {}
    todo = list(ids)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    while todo:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(todo, f)
        try:
            p = subprocess.run(
                [sys.executable, _THIS, "--child", f.name],
                capture_output=True,
                text=True,
                env=env,
                timeout=CASE_SECONDS * len(todo) + 60,
            )
            out, err, rc = p.stdout, p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            err, rc = "timed out", "timeout"
        finally:
            os.unlink(f.name)
        running = None
        for line in out.splitlines():
            if line.startswith("START "):
                running = line[6:]
            elif line.startswith("DONE "):
                r = json.loads(line[5:])
                results[r["id"]] = (r["verdict"], r["detail"])
                running = None
        if running is not None:
            results[running] = ("fail", f"the child process died in this case (exit {rc}): {err[-2000:]}")
        elif rc != 0 and not any(i not in results for i in todo):
            pass
        elif rc != 0:
            missing = next(i for i in todo if i not in results)
            results[missing] = ("fail", f"the child process failed before this case (exit {rc}): {err[-2000:]}")
        todo = [i for i in todo if i not in results]
    return results


@pytest.fixture(scope="module")
def isolated(request):
    """Verdicts of every isolated case selected in this session (one batch run)."""
    selected = [
        item.callspec.params["case_id"]
        for item in request.session.items
        if getattr(item, "callspec", None) is not None
        and "case_id" in item.callspec.params
        and item.module is request.module
    ]
    return _run_isolated([i for i in selected if _BY_ID[i].isolate])


def _param(c: Case):
    if c.known:
        return pytest.param(
            c.id, marks=pytest.mark.xfail(strict=True, raises=Verdict, reason=f"known finding: {c.known}")
        )
    return c.id


#: `MOE_ROUTER_ADV_VERDICTS=<file>` appends one line per case: id, verdict, detail.
_VERDICTS = os.environ.get("MOE_ROUTER_ADV_VERDICTS")


def _record(case_id: str, verdict: str, detail: str = "") -> None:
    if _VERDICTS:
        with open(_VERDICTS, "a") as f:
            f.write(f"{case_id}\t{verdict}\t{detail[:300]}\n".replace("\n\t", " ").replace("\r", " "))


@pytest.mark.parametrize("case_id", [_param(c) for c in CASES])
def test_case(case_id, request):
    case = _BY_ID[case_id]
    if not _T0:
        _T0.append(time.monotonic())
    COUNTS["tried"] += 1
    try:
        if case.isolate:
            verdict, detail = request.getfixturevalue("isolated")[case_id]
            if verdict == "fail":
                raise Verdict(detail)
        else:
            verdict, detail = judge(case)
    except Verdict as v:
        COUNTS["known" if case.known else "failed"] += 1
        _record(case_id, "known" if case.known else "FAILED", str(v))
        raise
    COUNTS[verdict] += 1
    _record(case_id, verdict, detail)


def test_summary(request, capsys):
    """Prints the counts; checks that every selected case ran and the time budget."""
    elapsed = time.monotonic() - (_T0[0] if _T0 else time.monotonic())
    line = (
        f"adversarial: tried {COUNTS['tried']}, results {COUNTS['result']}, clear errors {COUNTS['error']}, "
        f"known findings (xfail) {COUNTS['known']}, failed {COUNTS['failed']} of {len(CASES)} cases "
        f"({sum(c.isolate for c in CASES)} isolated in subprocesses) in {elapsed:.1f} s"
    )
    with capsys.disabled():
        print("\n" + line)
    selected = sum(
        1
        for item in request.session.items
        if getattr(item, "callspec", None) is not None
        and "case_id" in item.callspec.params
        and item.module is request.module
    )
    assert COUNTS["tried"] == selected, f"{selected - COUNTS['tried']} selected cases did not run"
    if selected == len(CASES):
        assert elapsed < BUDGET_SECONDS, f"the adversarial suite took {elapsed:.0f} s > {BUDGET_SECONDS:.0f} s"


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--child":
    _child_main(sys.argv[2])
