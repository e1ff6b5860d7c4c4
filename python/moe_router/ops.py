"""torch.library custom ops of moe_router (namespace ``moe_router::``).

Every op here is one call into ``moe_router._native`` (the Rust core: the CPU reference
for CPU tensors, the CUDA kernels for CUDA tensors) registered with
:func:`torch.library.custom_op`, a shapes-only fake kernel
(:func:`torch.library.register_fake`, so ``torch.compile(fullgraph=True)`` traces
through without a graph break) and, where it has a gradient, an autograd formula
(:func:`torch.library.register_autograd`) whose backward calls this package's own
``*_backward`` custom ops.

These are the building blocks of :mod:`moe_router.functional`, which validates every
argument first; call that, not these. Conventions of the ops themselves:

- index tensors (indices, slots, rows) are ``int32`` on output; index inputs may be
  ``int32`` or ``int64`` (int64 is narrowed after a range check);
- routing weights are ``float32``; logits / hidden states ``float32``, ``float16`` or
  ``bfloat16``; per-expert counts ``int32`` (dispatch) or ``int64`` (losses, stats);
- every output shape depends only on input shapes and options, never on values:
  ``dispatch`` returns ``row_to_token`` with :func:`dispatch_max_rows` entries
  (unused tail ``-1``) and the actual row count as a 0-d tensor;
- a seed or offset is a ``uint64`` carried in a signed ``int`` (two's complement);
- every tensor of a call must be on one device (``ValueError`` otherwise; nothing is ever
  copied between devices). CPU tensors run the Rust reference; CUDA tensors run the CUDA
  kernels on ``torch.cuda.current_stream(device)`` with outputs and workspaces allocated
  by torch on that device and no host synchronisation: results (losses, counts, the
  router statistics) are written into tensors on the inputs' device by both backends,
  with the same shapes and dtypes. Checks that
  would need to read device values (index ranges, negative counts, a ``total_tokens``
  below 1) are skipped on CUDA: the kernels bounds-check every index instead, and ignore
  out-of-range ones (a device ``total_tokens`` <= 0 gives loss 0). The one exception,
  documented where it applies: ``strict=True`` in ``router_stats`` reads one value on
  the host.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import _native

__all__ = ["dispatch_max_rows", "NATIVE_OPS", "native_has"]

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1
_U64 = 2**64

#: Names of the native functions this build of ``moe_router._native`` provides.
NATIVE_OPS = frozenset(n for n in dir(_native) if not n.startswith("_") and callable(getattr(_native, n)))


def native_has(name: str) -> bool:
    """Whether this build's native module provides ``name``."""
    return name in NATIVE_OPS


# --------------------------------------------------------------------------------------
# Argument helpers. The op implementations run on concrete tensors only (never fake
# ones); the native call checks every tensor's dtype, shape and device itself.


def _device(op: str, **tensors: Optional[Tensor]) -> torch.device:
    """The one device of every tensor given (``ValueError`` if they are on several)."""
    dev, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if dev is None:
            dev, first = t.device, name
        elif t.device != dev:
            raise ValueError(
                f"moe_router.{op}: `{name}` is on {t.device} but `{first}` is on {dev}; put all tensors on one "
                f"device (`{name}.to({first}.device)`); tensors are never copied between devices silently"
            )
    return torch.device("cpu") if dev is None else dev


def _on_cuda(dev: torch.device) -> bool:
    if dev.type == "cpu":
        return False
    if dev.type != "cuda":
        raise RuntimeError(
            f"moe_router: tensors on {dev} are not supported (CPU and CUDA only); tensors are never copied "
            "between devices silently"
        )
    return True


def _i32(op: str, name: str, t: Tensor) -> Tensor:
    """An int32 contiguous copy/view of an int32 or int64 index tensor: range-checked on
    CPU; on CUDA (no host read) clamped to the int32 range, which keeps an out-of-range
    index out of range for the kernels' bounds checks."""
    if t.dtype == torch.int32:
        return t.contiguous()
    if t.dtype != torch.int64:
        raise TypeError(f"moe_router.{op}: `{name}` has dtype {t.dtype}, expected int32 or int64")
    if _on_cuda(t.device):
        return t.clamp(_I32_MIN, _I32_MAX).to(torch.int32).contiguous()
    if t.numel() > 0:
        lo, hi = int(t.min()), int(t.max())
        if lo < _I32_MIN or hi > _I32_MAX:
            raise ValueError(
                f"moe_router.{op}: `{name}` holds {lo if lo < _I32_MIN else hi}, outside the int32 range of "
                "expert / row indices"
            )
    return t.to(torch.int32).contiguous()


def _i64(op: str, name: str, t: Tensor) -> Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"moe_router.{op}: `{name}` has dtype {t.dtype}, expected int32 or int64")
    return t.to(torch.int64).contiguous()


def _mask(op: str, name: str, t: Optional[Tensor]) -> Optional[Tensor]:
    """A bool mask made contiguous (its dtype is the native call's check)."""
    return None if t is None else t.contiguous()


def _u64(v: int) -> int:
    """A uint64 carried in a signed int64 (schema `int`) back to its unsigned value."""
    return v % _U64


# --------------------------------------------------------------------------------------
# Shapes that the fake kernels and the functional layer share.


def dispatch_max_rows(num_tokens, topk: int, num_experts: int, capacity: Optional[int], layout: str, align: int):
    """Rows of the dispatch buffer (length of ``row_to_token``), a function of sizes and
    options only, so it is known without looking at the routing:

    - ``pad_to_capacity``: ``num_experts * capacity``;
    - ``compact``: ``min(num_tokens * topk, num_experts * capacity)`` (``num_tokens * topk``
      without a capacity);
    - ``dropless``: ``num_tokens * topk`` plus up to ``align - 1`` padding rows per
      expert: ``num_tokens * topk + num_experts * (align - 1)``.

    Works on ints and on ``torch.SymInt`` (used by the fake kernels). Matches the core
    crate's ``dispatch_max_rows`` (checked by the tests).
    """
    assignments = num_tokens * topk
    if layout == "pad_to_capacity":
        return num_experts * capacity
    if layout == "compact":
        return assignments if capacity is None else torch.sym_min(assignments, num_experts * capacity)
    if layout == "dropless":
        return assignments + num_experts * (align - 1)
    raise ValueError(f"moe_router.dispatch: invalid `layout` = {layout!r}")


# --------------------------------------------------------------------------------------
# Top-k gating


@torch.library.custom_op("moe_router::topk_gating", mutates_args=())
def topk_gating(
    logits: Tensor,
    expert_bias: Optional[Tensor],
    topk: int,
    score_function: str,
    pre_softmax: bool,
    normalize: bool,
    num_groups: Optional[int],
    group_topk: Optional[int],
    scaling_factor: float,
    noise_std: float,
    expert_mask_rate: float,
    seed: int,
    offset: int,
) -> Tuple[Tensor, Tensor]:
    """weights [T, k] f32, indices [T, k] i32."""
    _device("topk_gating", logits=logits, expert_bias=expert_bias)
    logits = logits.contiguous()
    t = logits.shape[0]
    weights = logits.new_empty((t, topk), dtype=torch.float32)
    indices = logits.new_empty((t, topk), dtype=torch.int32)
    _native.topk_gating(
        logits, None if expert_bias is None else expert_bias.contiguous(), weights, indices, topk=topk,
        score_function=score_function, pre_softmax=pre_softmax, normalize=normalize, num_groups=num_groups,
        group_topk=group_topk, scaling_factor=scaling_factor, noise_std=noise_std,
        expert_mask_rate=expert_mask_rate, seed=_u64(seed), offset=_u64(offset),
    )  # fmt: skip
    return weights, indices


@topk_gating.register_fake
def _(logits, expert_bias, topk, score_function, pre_softmax, normalize, num_groups, group_topk,
      scaling_factor, noise_std, expert_mask_rate, seed, offset):  # fmt: skip
    t = logits.shape[0]
    return (
        logits.new_empty((t, topk), dtype=torch.float32),
        logits.new_empty((t, topk), dtype=torch.int32),
    )


@torch.library.custom_op("moe_router::topk_gating_replay", mutates_args=())
def topk_gating_replay(
    logits: Tensor,
    indices: Tensor,
    score_function: str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: float,
) -> Tensor:
    """weights [T, k] f32 of the given indices [T, k]."""
    op = "topk_gating_replay"
    _device(op, logits=logits, indices=indices)
    idx = _i32(op, "indices", indices)
    weights = logits.new_empty(idx.shape, dtype=torch.float32)
    _native.topk_gating_replay(
        logits.contiguous(), idx, weights, score_function=score_function, pre_softmax=pre_softmax,
        normalize=normalize, scaling_factor=scaling_factor,
    )  # fmt: skip
    return weights


@topk_gating_replay.register_fake
def _(logits, indices, score_function, pre_softmax, normalize, scaling_factor):
    return logits.new_empty(indices.shape, dtype=torch.float32)


@torch.library.custom_op("moe_router::topk_gating_backward", mutates_args=())
def topk_gating_backward(
    logits: Tensor,
    indices: Tensor,
    grad_weights: Tensor,
    score_function: str,
    pre_softmax: bool,
    normalize: bool,
    scaling_factor: float,
) -> Tensor:
    """grad_logits [T, E] (dtype of logits) from grad_weights [T, k] f32."""
    op = "topk_gating_backward"
    _device(op, logits=logits, indices=indices, grad_weights=grad_weights)
    logits = logits.contiguous()
    grad_logits = torch.empty_like(logits)
    _native.topk_gating_backward(
        logits, _i32(op, "indices", indices), grad_weights.to(torch.float32).contiguous(), grad_logits,
        score_function=score_function, pre_softmax=pre_softmax, normalize=normalize, scaling_factor=scaling_factor,
    )  # fmt: skip
    return grad_logits


@topk_gating_backward.register_fake
def _(logits, indices, grad_weights, score_function, pre_softmax, normalize, scaling_factor):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _topk_gating_setup(ctx, inputs, output):
    logits = inputs[0]
    ctx.opts = (inputs[3], inputs[4], inputs[5], inputs[8])  # score_function, pre_softmax, normalize, scaling
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, output[1])


def _topk_gating_bwd(ctx, grad_weights, grad_indices):
    grad_logits = None
    if ctx.needs_input_grad[0]:
        logits, indices = ctx.saved_tensors
        grad_logits = torch.ops.moe_router.topk_gating_backward(logits, indices, grad_weights, *ctx.opts)
    return (grad_logits,) + (None,) * 12


topk_gating.register_autograd(_topk_gating_bwd, setup_context=_topk_gating_setup)


def _replay_setup(ctx, inputs, output):
    ctx.opts = tuple(inputs[2:6])
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(inputs[0], inputs[1])


def _replay_bwd(ctx, grad_weights):
    grad_logits = None
    if ctx.needs_input_grad[0]:
        logits, indices = ctx.saved_tensors
        grad_logits = torch.ops.moe_router.topk_gating_backward(logits, indices, grad_weights, *ctx.opts)
    return (grad_logits,) + (None,) * 5


topk_gating_replay.register_autograd(_replay_bwd, setup_context=_replay_setup)


# --------------------------------------------------------------------------------------
# Dispatch (differentiable w.r.t. `weights` through `kept_weights`, whose forward value
# is the core's)


@torch.library.custom_op("moe_router::dispatch", mutates_args=())
def dispatch(
    indices: Tensor,
    weights: Tensor,
    num_experts: int,
    capacity: Optional[int],
    drop_policy: Optional[str],
    layout: str,
    align: int,
    renormalize: bool,
    ep_size: int,
    seed: int,
    offset: int,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """kept_weights [T, k] f32; slot, row [T, k] i32; tokens_per_expert [E] i32;
    row_to_token [max_rows] i32 (tail -1); expert_offsets [E+1] i32; rows_per_rank
    [ep_size] i32; counts [2] i64 = (num_rows, dropped)."""
    op = "dispatch"
    dev = _device(op, indices=indices, weights=weights)
    idx = _i32(op, "indices", indices)
    t, k = idx.shape
    options = dict(
        num_experts=num_experts, capacity=capacity, drop_policy=drop_policy, layout=layout, align=align,
        renormalize=renormalize, ep_size=ep_size, seed=_u64(seed), offset=_u64(offset),
    )  # fmt: skip
    max_rows = _native.dispatch_max_rows(t, k, **options)
    i32 = dict(dtype=torch.int32, device=dev)
    slot = torch.empty((t, k), **i32)
    row = torch.empty((t, k), **i32)
    kept = torch.empty((t, k), dtype=torch.float32, device=dev)
    tpe = torch.empty((num_experts,), **i32)
    r2t = torch.empty((max_rows,), **i32)
    offsets = torch.empty((num_experts + 1,), **i32)
    per_rank = torch.empty((ep_size,), **i32)
    counts = torch.empty((2,), dtype=torch.int64, device=dev)  # (num_rows, dropped)
    _native.dispatch(idx, weights.contiguous(), slot, row, kept, tpe, r2t, offsets, per_rank, counts, **options)
    return kept, slot, row, tpe, r2t, offsets, per_rank, counts


@dispatch.register_fake
def _(indices, weights, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset):
    t, k = indices.shape
    max_rows = dispatch_max_rows(t, k, num_experts, capacity, layout, align)
    i32 = dict(dtype=torch.int32)
    return (
        weights.new_empty((t, k), dtype=torch.float32),
        indices.new_empty((t, k), **i32),
        indices.new_empty((t, k), **i32),
        indices.new_empty((num_experts,), **i32),
        indices.new_empty((max_rows,), **i32),
        indices.new_empty((num_experts + 1,), **i32),
        indices.new_empty((ep_size,), **i32),
        indices.new_empty((2,), dtype=torch.int64),
    )


def _dispatch_setup(ctx, inputs, output):
    ctx.renormalize = inputs[7]
    if ctx.needs_input_grad[1]:
        ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _dispatch_bwd(ctx, g_kept, *_unused):
    """Gradient of ``kept_weights`` w.r.t. ``weights``: ``kept = m * w`` (``m``: slot >= 0),
    or with ``renormalize`` ``kept = m * w * S / D`` per token (``S`` the routed sum,
    ``D = K + 1e-20``, ``K`` the kept sum; all 0 if nothing was kept)."""
    if not ctx.needs_input_grad[1]:
        return (None,) * 11
    indices, weights, slot = ctx.saved_tensors
    kept = slot >= 0
    zero = torch.zeros((), dtype=torch.float32, device=weights.device)
    g = torch.where(kept, g_kept.to(torch.float32), zero)
    if ctx.renormalize:
        w = weights.to(torch.float32)
        routed = indices >= 0
        s = torch.where(routed, w, zero).sum(-1, keepdim=True)
        d = torch.where(kept, w, zero).sum(-1, keepdim=True) + 1e-20
        p = (g * w).sum(-1, keepdim=True)
        any_kept = kept.any(-1, keepdim=True)
        g = g * s / d + torch.where(routed, p / d, zero) - torch.where(kept, s * p / (d * d), zero)
        g = torch.where(any_kept, g, zero)
    return (None, g.to(weights.dtype)) + (None,) * 9


dispatch.register_autograd(_dispatch_bwd, setup_context=_dispatch_setup)


# --------------------------------------------------------------------------------------
# Expert choice


@torch.library.custom_op("moe_router::expert_choice", mutates_args=())
def expert_choice(logits: Tensor, capacity: int) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """weights [T, E] f32, row [T, E] i32, row_to_token [E*cap] i32, row_weights [E*cap]
    f32, tokens_per_expert [E] i32, expert_offsets [E+1] i32."""
    logits = logits.contiguous()
    t, e = logits.shape
    rows = _native.expert_choice_num_rows(t, e, capacity)  # validates before allocating
    i32 = dict(dtype=torch.int32)
    weights = logits.new_empty((t, e), dtype=torch.float32)
    row = logits.new_empty((t, e), **i32)
    r2t = logits.new_empty((rows,), **i32)
    row_weights = logits.new_empty((rows,), dtype=torch.float32)
    tpe = logits.new_empty((e,), **i32)
    offsets = logits.new_empty((e + 1,), **i32)
    _native.expert_choice(logits, weights, row, r2t, row_weights, tpe, offsets)
    return weights, row, r2t, row_weights, tpe, offsets


@expert_choice.register_fake
def _(logits, capacity):
    t, e = logits.shape
    return (
        logits.new_empty((t, e), dtype=torch.float32),
        logits.new_empty((t, e), dtype=torch.int32),
        logits.new_empty((e * capacity,), dtype=torch.int32),
        logits.new_empty((e * capacity,), dtype=torch.float32),
        logits.new_empty((e,), dtype=torch.int32),
        logits.new_empty((e + 1,), dtype=torch.int32),
    )


@torch.library.custom_op("moe_router::expert_choice_backward", mutates_args=())
def expert_choice_backward(logits: Tensor, row: Tensor, grad_weights: Tensor) -> Tensor:
    """grad_logits [T, E] from grad_weights [T, E] f32 (through the softmax)."""
    op = "expert_choice_backward"
    _device(op, logits=logits, row=row, grad_weights=grad_weights)
    logits = logits.contiguous()
    grad_logits = torch.empty_like(logits)
    _native.expert_choice_backward(
        logits, _i32(op, "row", row), grad_weights.to(torch.float32).contiguous(), grad_logits
    )
    return grad_logits


@expert_choice_backward.register_fake
def _(logits, row, grad_weights):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ec_setup(ctx, inputs, output):
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(inputs[0], output[1])


def _ec_bwd(ctx, g_weights, g_row, g_r2t, g_row_weights, g_tpe, g_offsets):
    if not ctx.needs_input_grad[0]:
        return None, None
    logits, row = ctx.saved_tensors
    # row_weights[row[t, e]] == weights[t, e] for every chosen (t, e): fold its gradient
    # in. Unchosen (t, e) read an appended zero (also right when there are no rows).
    n = g_row_weights.shape[0]
    padded = torch.cat([g_row_weights, g_row_weights.new_zeros(1)])
    g = g_weights + padded[torch.where(row >= 0, row, n).long()]
    return torch.ops.moe_router.expert_choice_backward(logits, row, g), None


expert_choice.register_autograd(_ec_bwd, setup_context=_ec_setup)


# --------------------------------------------------------------------------------------
# Permute / unpermute


@torch.library.custom_op("moe_router::permute", mutates_args=())
def permute(x: Tensor, row_to_token: Tensor, row: Tensor) -> Tensor:
    """buf [rows, H] = x[row_to_token] (0 where row_to_token is -1). `row` [T, k] is what
    backward reads: on CPU the native call checks that both maps agree."""
    op = "permute"
    _device(op, x=x, row_to_token=row_to_token, row=row)
    x = x.contiguous()
    r2t = _i32(op, "row_to_token", row_to_token)
    out = x.new_empty((r2t.shape[0], x.shape[-1]))
    _native.permute(x, r2t, out, _i32(op, "row", row))
    return out


@permute.register_fake
def _(x, row_to_token, row):
    return x.new_empty((row_to_token.shape[0], x.shape[1]))


@torch.library.custom_op("moe_router::permute_backward", mutates_args=())
def permute_backward(grad_buf: Tensor, row: Tensor, num_tokens: int) -> Tensor:
    """grad_x [T, H]: grad_x[t] = sum_j grad_buf[row[t, j]] over row[t, j] >= 0."""
    op = "permute_backward"
    gb = grad_buf.contiguous()
    row32 = _i32(op, "row", row)
    grad_x = gb.new_empty((num_tokens, gb.shape[-1]))
    _native.permute_backward(gb, row32, grad_x)
    return grad_x


@permute_backward.register_fake
def _(grad_buf, row, num_tokens):
    return grad_buf.new_empty((num_tokens, grad_buf.shape[1]))


def _permute_setup(ctx, inputs, output):
    x, _, row = inputs
    ctx.num_tokens = x.shape[0]
    ctx.x_dtype = x.dtype
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(row)


def _permute_bwd(ctx, grad_buf):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    (row,) = ctx.saved_tensors
    grad_x = torch.ops.moe_router.permute_backward(grad_buf.to(ctx.x_dtype), row, ctx.num_tokens)
    return grad_x, None, None


permute.register_autograd(_permute_bwd, setup_context=_permute_setup)


@torch.library.custom_op("moe_router::unpermute", mutates_args=())
def unpermute(y: Tensor, row: Tensor, weights: Tensor) -> Tensor:
    """out [T, H] (dtype of y) = sum_j weights[t, j] * y[row[t, j]] over row[t, j] >= 0,
    accumulated in f32."""
    op = "unpermute"
    _device(op, y=y, row=row, weights=weights)
    y = y.contiguous()
    row32 = _i32(op, "row", row)
    out = y.new_empty((row32.shape[0], y.shape[-1]))
    _native.unpermute(y, row32, weights.contiguous(), out)
    return out


@unpermute.register_fake
def _(y, row, weights):
    return y.new_empty((row.shape[0], y.shape[1]))


@torch.library.custom_op("moe_router::unpermute_backward", mutates_args=())
def unpermute_backward(grad_out: Tensor, y: Tensor, row: Tensor, weights: Tensor) -> Tuple[Tensor, Tensor]:
    """grad_y [rows, H] (dtype of y), grad_weights [T, k] f32."""
    op = "unpermute_backward"
    _device(op, grad_out=grad_out, y=y, row=row, weights=weights)
    y = y.contiguous()
    row32 = _i32(op, "row", row)
    grad_y = torch.empty_like(y)
    grad_w = y.new_empty(row32.shape, dtype=torch.float32)
    _native.unpermute_backward(grad_out.to(y.dtype).contiguous(), y, row32, weights.contiguous(), grad_y, grad_w)
    return grad_y, grad_w


@unpermute_backward.register_fake
def _(grad_out, y, row, weights):
    return (
        torch.empty_like(y, memory_format=torch.contiguous_format),
        weights.new_empty(row.shape, dtype=torch.float32),
    )


def _unpermute_setup(ctx, inputs, output):
    y, row, weights = inputs
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
        ctx.save_for_backward(y, row, weights)


def _unpermute_bwd(ctx, grad_out):
    if not (ctx.needs_input_grad[0] or ctx.needs_input_grad[2]):
        return None, None, None
    y, row, weights = ctx.saved_tensors
    grad_y, grad_w = torch.ops.moe_router.unpermute_backward(grad_out, y, row, weights)
    return (
        grad_y if ctx.needs_input_grad[0] else None,
        None,
        grad_w if ctx.needs_input_grad[2] else None,
    )


unpermute.register_autograd(_unpermute_bwd, setup_context=_unpermute_setup)


# --------------------------------------------------------------------------------------
# Losses. The scalar loss is a 0-d float32 tensor; the natives write it (and token
# totals) into 0-d tensors on the logits' device, and the backwards read grad_loss and
# the totals there: on CUDA nothing is read on the host.


def _valid_tokens(mask: Optional[Tensor], t: int, dev: torch.device, seq_len: Optional[int] = None) -> Tensor:
    """int64 non-padding tokens, computed with torch on ``dev`` (no host read): a 0-d
    count over all ``t`` tokens, or ``[t // seq_len]`` counts per sequence. What the
    z-loss / sequence-level forwards write as ``valid_tokens`` and their backwards read
    (the custom ops do not return it, to keep their schemas); an empty tensor for a
    ``seq_len`` that does not divide ``t`` or a mask of another shape (the native call
    then raises)."""
    if seq_len is None:
        if mask is None:
            return torch.full((), t, dtype=torch.int64, device=dev)
        return (~mask).sum(dtype=torch.int64)
    if seq_len <= 0 or t % seq_len != 0 or (mask is not None and mask.shape != (t,)):
        return torch.zeros((0,), dtype=torch.int64, device=dev)
    if mask is None:
        return torch.full((t // seq_len,), seq_len, dtype=torch.int64, device=dev)
    return (~mask).reshape(t // seq_len, seq_len).sum(dim=1, dtype=torch.int64)


def _grad_loss(grad_loss: Tensor) -> Tensor:
    """The 0-d float32 gradient of a scalar loss, left where it is (no host read)."""
    return grad_loss.to(torch.float32).reshape(()).contiguous()


def _total_tokens(op: str, total_tokens: Tensor, dev: torch.device) -> Tensor:
    """The caller's ``T_total`` as an int64 tensor on ``dev`` (the native call checks
    that it is 0-d). A tensor on the logits' device is passed as it is (the CUDA kernels
    read it there: no host read); a 0-d CPU value with CUDA logits (a host scalar
    carried as a tensor, e.g. an int given to ``functional.aux_loss``) is checked on the
    host, as the CPU does (the kernels cannot reject a device value below 1), then filled
    in on the device (no copy, no sync)."""
    total = _i64(op, "total_tokens", total_tokens)
    if total.device != dev and total.device.type == "cpu" and total.dim() == 0:
        v = int(total)
        if v < 1:
            raise ValueError(
                f"moe_router.{op}: invalid `total_tokens` = {v}: total_tokens must be >= 1 (the number of tokens "
                "the counts cover)"
            )
        return torch.full((), v, dtype=torch.int64, device=dev)
    return total.to(dev)


@torch.library.custom_op("moe_router::aux_loss", mutates_args=())
def aux_loss(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Optional[Tensor],
    total_tokens: Optional[Tensor],
    topk: int,
    score_function: str,
    coeff: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """loss [] f32, counts used [E] i64, total_tokens used [] i64. ``total_tokens``
    (only with ``counts``) may be a CPU scalar with CUDA logits."""
    op = "aux_loss"
    dev = _device(op, logits=logits, padding_mask=padding_mask, counts=counts)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    c = None if counts is None else _i64(op, "counts", counts)
    total = None if total_tokens is None else _total_tokens(op, total_tokens, dev)
    e = logits.shape[1] if logits.dim() == 2 else 0  # other shapes: the native call raises
    loss = torch.empty((), dtype=torch.float32, device=dev)
    counts_out = torch.empty((e,), dtype=torch.int64, device=dev)
    total_out = torch.empty((), dtype=torch.int64, device=dev)
    _native.aux_loss(
        logits, mask, c, total, loss, counts_out, total_out, topk=topk, score_function=score_function, coeff=coeff
    )
    return loss, counts_out, total_out


@aux_loss.register_fake
def _(logits, padding_mask, counts, total_tokens, topk, score_function, coeff):
    e = logits.shape[1]
    return (
        logits.new_empty((), dtype=torch.float32),
        logits.new_empty((e,), dtype=torch.int64),
        logits.new_empty((), dtype=torch.int64),
    )


@torch.library.custom_op("moe_router::aux_loss_backward", mutates_args=())
def aux_loss_backward(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Tensor,
    total_tokens: Tensor,
    topk: int,
    score_function: str,
    coeff: float,
    grad_loss: Tensor,
) -> Tensor:
    """grad_logits [T, E] (dtype of logits)."""
    op = "aux_loss_backward"
    dev = _device(op, logits=logits, padding_mask=padding_mask, counts=counts, grad_loss=grad_loss)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    c = _i64(op, "counts", counts)
    total = _total_tokens(op, total_tokens, dev)
    grad_logits = torch.empty_like(logits)
    _native.aux_loss_backward(
        logits, mask, c, total, _grad_loss(grad_loss), grad_logits, topk=topk, score_function=score_function,
        coeff=coeff,
    )  # fmt: skip
    return grad_logits


@aux_loss_backward.register_fake
def _(logits, padding_mask, counts, total_tokens, topk, score_function, coeff, grad_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _aux_setup(ctx, inputs, output):
    logits, mask, _, _, topk, sf, coeff = inputs
    ctx.opts = (topk, sf, coeff)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, mask, output[1], output[2])


def _aux_bwd(ctx, grad_loss, grad_counts, grad_total):
    if not ctx.needs_input_grad[0]:
        return (None,) * 7
    logits, mask, counts, total = ctx.saved_tensors
    g = torch.ops.moe_router.aux_loss_backward(logits, mask, counts, total, *ctx.opts, grad_loss)
    return (g,) + (None,) * 6


aux_loss.register_autograd(_aux_bwd, setup_context=_aux_setup)


@torch.library.custom_op("moe_router::seq_aux_loss", mutates_args=())
def seq_aux_loss(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    seq_len: int,
    topk: int,
    score_function: str,
    coeff: float,
) -> Tuple[Tensor, Tensor]:
    """loss [] f32, per-sequence counts [T // seq_len, E] i64."""
    op = "seq_aux_loss"
    dev = _device(op, logits=logits, padding_mask=padding_mask)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    t, e = logits.shape if logits.dim() == 2 else (0, 0)  # other shapes: the native call raises
    b = t // seq_len if seq_len > 0 else 0
    loss = torch.empty((), dtype=torch.float32, device=dev)
    counts_out = torch.empty((b, e), dtype=torch.int64, device=dev)
    valid = torch.empty((b,), dtype=torch.int64, device=dev)  # recomputed by the backward
    _native.seq_aux_loss(
        logits, mask, loss, counts_out, valid, seq_len=seq_len, topk=topk, score_function=score_function, coeff=coeff
    )
    return loss, counts_out


@seq_aux_loss.register_fake
def _(logits, padding_mask, seq_len, topk, score_function, coeff):
    t, e = logits.shape
    return logits.new_empty((), dtype=torch.float32), logits.new_empty((t // seq_len, e), dtype=torch.int64)


@torch.library.custom_op("moe_router::seq_aux_loss_backward", mutates_args=())
def seq_aux_loss_backward(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Tensor,
    seq_len: int,
    topk: int,
    score_function: str,
    coeff: float,
    grad_loss: Tensor,
) -> Tensor:
    """grad_logits [T, E] (dtype of logits)."""
    op = "seq_aux_loss_backward"
    dev = _device(op, logits=logits, padding_mask=padding_mask, counts=counts, grad_loss=grad_loss)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    c = _i64(op, "counts", counts)
    valid = _valid_tokens(mask, logits.shape[0] if logits.dim() else 0, dev, seq_len)
    grad_logits = torch.empty_like(logits)
    _native.seq_aux_loss_backward(
        logits, mask, c, valid, _grad_loss(grad_loss), grad_logits, seq_len=seq_len, topk=topk,
        score_function=score_function, coeff=coeff,
    )  # fmt: skip
    return grad_logits


@seq_aux_loss_backward.register_fake
def _(logits, padding_mask, counts, seq_len, topk, score_function, coeff, grad_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _seq_setup(ctx, inputs, output):
    logits, mask, seq_len, topk, sf, coeff = inputs
    ctx.opts = (seq_len, topk, sf, coeff)
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, mask, output[1])


def _seq_bwd(ctx, grad_loss, grad_counts):
    if not ctx.needs_input_grad[0]:
        return (None,) * 6
    logits, mask, counts = ctx.saved_tensors
    g = torch.ops.moe_router.seq_aux_loss_backward(logits, mask, counts, *ctx.opts, grad_loss)
    return (g,) + (None,) * 5


seq_aux_loss.register_autograd(_seq_bwd, setup_context=_seq_setup)


@torch.library.custom_op("moe_router::z_loss", mutates_args=())
def z_loss(logits: Tensor, padding_mask: Optional[Tensor], coeff: float) -> Tensor:
    """loss [] f32."""
    op = "z_loss"
    dev = _device(op, logits=logits, padding_mask=padding_mask)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    loss = torch.empty((), dtype=torch.float32, device=dev)
    valid = torch.empty((), dtype=torch.int64, device=dev)  # recomputed by the backward
    _native.z_loss(logits, mask, loss, valid, coeff=coeff)
    return loss


@z_loss.register_fake
def _(logits, padding_mask, coeff):
    return logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("moe_router::z_loss_backward", mutates_args=())
def z_loss_backward(logits: Tensor, padding_mask: Optional[Tensor], coeff: float, grad_loss: Tensor) -> Tensor:
    """grad_logits [T, E] (dtype of logits)."""
    op = "z_loss_backward"
    dev = _device(op, logits=logits, padding_mask=padding_mask, grad_loss=grad_loss)
    logits = logits.contiguous()
    mask = _mask(op, "padding_mask", padding_mask)
    valid = _valid_tokens(mask, logits.shape[0] if logits.dim() else 0, dev)
    grad_logits = torch.empty_like(logits)
    _native.z_loss_backward(logits, mask, valid, _grad_loss(grad_loss), grad_logits, coeff=coeff)
    return grad_logits


@z_loss_backward.register_fake
def _(logits, padding_mask, coeff, grad_loss):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _z_setup(ctx, inputs, output):
    logits, mask, coeff = inputs
    ctx.coeff = coeff
    if ctx.needs_input_grad[0]:
        ctx.save_for_backward(logits, mask)


def _z_bwd(ctx, grad_loss):
    if not ctx.needs_input_grad[0]:
        return None, None, None
    logits, mask = ctx.saved_tensors
    return torch.ops.moe_router.z_loss_backward(logits, mask, ctx.coeff, grad_loss), None, None


z_loss.register_autograd(_z_bwd, setup_context=_z_setup)


# --------------------------------------------------------------------------------------
# Expert dropout


@torch.library.custom_op("moe_router::expert_mask", mutates_args=())
def expert_mask(
    num_tokens: int, num_experts: int, topk: int, rate: float, seed: int, offset: int, device: torch.device
) -> Tensor:
    """masked [T, E] bool (True = masked), at least topk candidates left per token."""
    dev = torch.device(device)
    if dev.type == "meta":
        # No tensor input carries the device, so the dispatcher does not pick the fake
        # kernel for a meta device on its own: shapes only, as every other op.
        return _expert_mask_fake(num_tokens, num_experts, dev)
    opts = dict(topk=topk, rate=rate, seed=_u64(seed), offset=_u64(offset))
    _native.expert_mask_len(num_tokens, num_experts, **opts)  # validates before allocating
    masked = torch.empty((num_tokens, num_experts), dtype=torch.bool, device=dev)
    _native.expert_mask(masked, **opts)
    return masked


def _expert_mask_fake(num_tokens, num_experts, device):
    return torch.empty((num_tokens, num_experts), dtype=torch.bool, device=device)


@expert_mask.register_fake
def _(num_tokens, num_experts, topk, rate, seed, offset, device):
    return _expert_mask_fake(num_tokens, num_experts, device)


@torch.library.custom_op("moe_router::assignment_dropout", mutates_args=())
def assignment_dropout(
    indices: Tensor, weights: Tensor, num_experts: int, rate: float, seed: int, offset: int, renormalize: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """weights [T, k] f32, indices [T, k] i32 (-1 where dropped), keep [T, k] bool.
    (Float output first: autograd test harnesses sum the outputs in order.)"""
    op = "assignment_dropout"
    _device(op, indices=indices, weights=weights)
    idx = _i32(op, "indices", indices)
    w = weights.contiguous()
    out_idx = torch.empty_like(idx)
    out_w = w.new_empty(idx.shape, dtype=torch.float32)
    keep = w.new_empty(idx.shape, dtype=torch.bool)
    dropped = w.new_empty((), dtype=torch.int64)  # routed assignments dropped (not an output of the op)
    _native.assignment_dropout(
        idx, w, out_idx, out_w, keep, dropped,
        num_experts=num_experts, rate=rate, seed=_u64(seed), offset=_u64(offset), renormalize=renormalize,
    )  # fmt: skip
    return out_w, out_idx, keep


@assignment_dropout.register_fake
def _(indices, weights, num_experts, rate, seed, offset, renormalize):
    return (
        weights.new_empty(indices.shape, dtype=torch.float32),
        indices.new_empty(indices.shape, dtype=torch.int32),
        indices.new_empty(indices.shape, dtype=torch.bool),
    )


@torch.library.custom_op("moe_router::assignment_dropout_backward", mutates_args=())
def assignment_dropout_backward(
    indices: Tensor, weights: Tensor, keep: Tensor, renormalize: bool, grad_out: Tensor
) -> Tensor:
    """grad_weights [T, k] f32 from the forward's input indices / weights, its keep mask
    and grad_out [T, k]."""
    op = "assignment_dropout_backward"
    _device(op, indices=indices, weights=weights, keep=keep, grad_out=grad_out)
    idx = _i32(op, "indices", indices)
    w = weights.contiguous()
    grad_w = w.new_empty(idx.shape, dtype=torch.float32)
    _native.assignment_dropout_backward(
        idx, w, keep.contiguous(), grad_out.to(torch.float32).contiguous(), grad_w, renormalize=renormalize
    )
    return grad_w


@assignment_dropout_backward.register_fake
def _(indices, weights, keep, renormalize, grad_out):
    return weights.new_empty(weights.shape, dtype=torch.float32)


def _ad_setup(ctx, inputs, output):
    ctx.renormalize = inputs[6]
    if ctx.needs_input_grad[1]:
        ctx.save_for_backward(inputs[0], inputs[1], output[2])


def _ad_bwd(ctx, g_weights, g_idx, g_keep):
    if not ctx.needs_input_grad[1]:
        return (None,) * 7
    indices, weights, keep = ctx.saved_tensors
    g = torch.ops.moe_router.assignment_dropout_backward(indices, weights, keep, ctx.renormalize, g_weights)
    return (None, g) + (None,) * 5


assignment_dropout.register_autograd(_ad_bwd, setup_context=_ad_setup)


# --------------------------------------------------------------------------------------
# Aux-loss-free bias update (in place) and router statistics


@torch.library.custom_op("moe_router::update_expert_bias", mutates_args={"bias"})
def update_expert_bias(bias: Tensor, counts: Tensor, rate: float) -> None:
    """bias [E] f32 += rate * sign(mean(counts) - counts), in place (a non-contiguous
    `bias` is updated through a contiguous copy written back)."""
    op = "update_expert_bias"
    _device(op, bias=bias, counts=counts)
    dense = bias if bias.is_contiguous() else bias.contiguous()
    _native.update_expert_bias(dense, _i64(op, "counts", counts), rate=rate)
    if dense is not bias:
        bias.copy_(dense)


@update_expert_bias.register_fake
def _(bias, counts, rate):
    return None


@torch.library.custom_op("moe_router::router_stats", mutates_args=())
def router_stats(
    logits: Tensor,
    indices: Tensor,
    slot: Optional[Tensor],
    padding_mask: Optional[Tensor],
    strict: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """selected_counts [E] i64; kept_counts [E] i64 (zeros without slot); ints [3] i64 =
    (num_tokens, dropped, nonfinite_logits); floats [4] f32 = (max_violation,
    mean_entropy, mean_lse, max_lse). Statistics: no output is differentiable. With
    `strict`, a CUDA call reads the non-finite count on the host (one sync)."""
    op = "router_stats"
    _device(op, logits=logits, indices=indices, slot=slot, padding_mask=padding_mask)
    logits = logits.contiguous()
    idx = _i32(op, "indices", indices)
    sl = None if slot is None else _i32(op, "slot", slot)
    mask = None if padding_mask is None else padding_mask.contiguous()
    e = logits.shape[-1]
    selected = logits.new_empty((e,), dtype=torch.int64)
    kept = logits.new_empty((e,), dtype=torch.int64)
    scalars = logits.new_empty((4,), dtype=torch.int64)
    floats = logits.new_empty((4,), dtype=torch.float32)
    _native.router_stats(logits, idx, selected, kept, scalars, floats, slot=sl, padding_mask=mask, strict=strict)
    # scalars = (valid tokens, dropped, non-finite, sum selected): the op returns the first 3.
    return selected, kept, scalars[:3].clone(), floats


@router_stats.register_fake
def _(logits, indices, slot, padding_mask, strict):
    e = logits.shape[1]
    return (
        logits.new_empty((e,), dtype=torch.int64),
        logits.new_empty((e,), dtype=torch.int64),
        logits.new_empty((3,), dtype=torch.int64),
        logits.new_empty((4,), dtype=torch.float32),
    )


def _stats_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output)


def _stats_bwd(ctx, *grads):
    return (None,) * 5


# Statistics are not differentiable: the outputs are marked so (no graph to the logits),
# and torch.compile traces the op without a backward through it.
router_stats.register_autograd(_stats_bwd, setup_context=_stats_setup)


#: Every custom op of the package (the tests run ``torch.library.opcheck`` on each).
CUSTOM_OPS: List[str] = [
    "topk_gating",
    "topk_gating_replay",
    "topk_gating_backward",
    "dispatch",
    "expert_choice",
    "expert_choice_backward",
    "permute",
    "permute_backward",
    "unpermute",
    "unpermute_backward",
    "aux_loss",
    "aux_loss_backward",
    "seq_aux_loss",
    "seq_aux_loss_backward",
    "z_loss",
    "z_loss_backward",
    "expert_mask",
    "assignment_dropout",
    "assignment_dropout_backward",
    "update_expert_bias",
    "router_stats",
]
