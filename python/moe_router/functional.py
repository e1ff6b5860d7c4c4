"""The functional API of moe_router: Mixture-of-Experts routing ops on torch tensors.

Shapes use ``T`` tokens, ``E`` experts, ``k`` (``topk``) choices per token, ``H`` hidden
size, ``R`` rows of the expert-major dispatch buffer.

Precision notes
---------------
- Logits and hidden states may be ``float32``, ``float16`` or ``bfloat16``; ``float64`` is
  rejected (the kernels are single precision). All router math (scores, normalisation,
  losses, reductions) runs in ``float32``; results are cast only on the final store.
  Routing weights are always ``float32``. Gradients have the dtype of their input.
- Index outputs (expert indices, slots, rows, ``row_to_token``, offsets, counts) are
  returned as ``int64`` (widened from the kernels' ``int32``: PyTorch indexing wants
  ``int64``); index inputs may be ``int32`` or ``int64``.
- Ties rank the lower expert index first; a NaN score ranks below every other score.
  Reductions use a fixed order: the same input gives bitwise the same output.

Validation
----------
Every function checks its arguments before any data reaches the native code: a wrong
type, dtype or layout (sparse, nested) raises ``TypeError``, a wrong shape, device mix or
option value raises ``ValueError``; each message starts with ``moe_router.<op>:`` and
names the argument, the value and the fix. Non-contiguous tensors (transposed, sliced)
are accepted and made contiguous inside the op, as PyTorch's own ops do. Errors that
depend on tensor *values* (an expert index out of range or repeated within a token,
strict-mode non-finite logits, ...) come from the native code, also as ``ValueError``.

CUDA
----
CUDA tensors run the CUDA kernels on ``torch.cuda.current_stream(device)`` without a host
synchronisation; results (losses, counts, statistics) stay on the device. The argument
checks are the same on both devices, but value checks that would need a sync are skipped:
on CUDA, out-of-range indices are ignored by the kernels instead of raising (and negative
counts are not rejected). ``expert_choice`` on CUDA computes ``softmax`` to rounding of
the CPU's, so its selection can differ from the CPU's between near-tied tokens. Nothing is
copied between devices silently.

torch.compile
-------------
Every op is a ``torch.library`` custom op with a fake (meta) kernel, so
``torch.compile(fullgraph=True)`` traces a whole routing step without a graph break.
Output shapes depend only on input shapes and options: ops whose true output size
depends on the routing (the compact / dropless dispatch buffer) return a buffer of the
largest possible size (:func:`dispatch_max_rows`) with the row count as a 0-d tensor
and the unused tail of ``row_to_token`` set to ``-1`` (such rows are zeros after
:func:`permute`, and ignored by :func:`unpermute`).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _native

__all__ = [
    "topk_gating",
    "topk_gating_replay",
    "capacity",
    "dispatch_max_rows",
    "warmup",
    "dispatch",
    "Dispatch",
    "expert_choice",
    "ExpertChoice",
    "permute",
    "unpermute",
    "aux_loss",
    "global_aux_loss",
    "seq_aux_loss",
    "z_loss",
    "expert_mask",
    "assignment_dropout",
    "update_expert_bias",
    "router_stats",
    "RouterStats",
    "SCORE_FUNCTIONS",
    "DROP_POLICIES",
    "LAYOUTS",
]

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)
# The option vocabularies are the native module's (one list, next to the parser).
SCORE_FUNCTIONS = tuple(_native.SCORE_FUNCTIONS)
DROP_POLICIES = tuple(_native.DROP_POLICIES)
LAYOUTS = tuple(_native.LAYOUTS)
_U64 = 2**64
_I32_MAX = 2**31 - 1
_I64_MAX = 2**63 - 1
# The smallest magnitude that rounds to +-inf in float32 (f32::MAX plus half an ulp):
# options the core takes as f32 must stay below it.
_F32_OVERFLOW = 2.0**128 - 2.0**103

_moe = torch.ops.moe_router


# --------------------------------------------------------------------------------------
# Argument checks (TransformerEngine style: name the argument, the value and the fix)


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


# Expert indices are int32: at most 2**31 - 1 experts (checked before any [E] output is
# allocated).
_E_VALID = "in [1, 2**31 - 1] (expert indices are int32)"


def _tensor(
    op: str,
    name: str,
    t,
    dtypes: Sequence[torch.dtype],
    ndim: int,
    dims: str,
    fix: str = "",
) -> Tensor:
    """Check type, dtype, rank and contiguity of a tensor argument."""
    if not isinstance(t, Tensor):
        raise TypeError(f"moe_router.{op}: `{name}` must be a torch.Tensor {dims}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        hint = f" ({fix})" if fix else ""
        raise TypeError(
            f"moe_router.{op}: `{name}` has dtype {str(t.dtype).replace('torch.', '')}; "
            f"valid dtypes are {_dtype_names(dtypes)}{hint}"
        )
    if t.layout != torch.strided:
        raise TypeError(f"moe_router.{op}: `{name}` has layout {t.layout}; pass a dense tensor (`{name}.to_dense()`)")
    if t.is_nested:
        raise TypeError(f"moe_router.{op}: `{name}` is a nested tensor; pass a dense {ndim}-D tensor {dims}")
    if t.dim() != ndim:
        raise ValueError(f"moe_router.{op}: `{name}` must be {ndim}-D {dims}, got shape {tuple(t.shape)}")
    # Non-contiguous tensors (transposed, sliced) are fine: the ops make them contiguous,
    # as PyTorch's own ops do.
    return t


def _logits(op: str, t, name: str = "logits") -> Tensor:
    return _tensor(
        op, name, t, _FLOATS, 2, "[num_tokens, num_experts]",
        f"the router computes in float32 internally; pass `{name}.float()` or `{name}.bfloat16()`",
    )  # fmt: skip


def _index(op: str, name: str, t, ndim: int, dims: str) -> Tensor:
    return _tensor(op, name, t, _INTS, ndim, dims, f"pass `{name}.long()`")


def _dim(op: str, name: str, t: Tensor, axis: int, expected, what: str) -> None:
    if t.shape[axis] != expected:
        raise ValueError(
            f"moe_router.{op}: `{name}` has shape {tuple(t.shape)}, but dimension {axis} must be {what} = {expected}"
        )


def _same_device(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    for name, t in others.items():
        if t is not None and t.device != ref.device:
            raise ValueError(
                f"moe_router.{op}: `{name}` is on {t.device} but `{ref_name}` is on {ref.device}; "
                f"put all tensors on one device (`{name}.to({ref_name}.device)`)"
            )


def _is_int(v) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _int(op: str, name: str, v, lo: Optional[int] = None, hi=None, valid: str = "") -> int:
    if not _is_int(v):
        raise TypeError(f"moe_router.{op}: `{name}` must be an int, got {type(v).__name__} {v!r}")
    if hi is None and isinstance(v, int) and v > _I64_MAX:
        # the ops' schema carries int64: say so here instead of a message from torch
        raise ValueError(f"moe_router.{op}: invalid `{name}` = {v}: it must be <= 2**63 - 1")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        if not valid:
            valid = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"moe_router.{op}: invalid `{name}` = {v}: it must be {valid}")
    return v


def _opt_int(op: str, name: str, v, lo: int) -> Optional[int]:
    return None if v is None else _int(op, name, v, lo)


def _float(op: str, name: str, v, lo: Optional[float] = None, hi: Optional[float] = None, *, lo_open=False,
           hi_open=False, valid: str = "", f32: bool = False) -> float:  # fmt: skip
    if isinstance(v, bool) or not isinstance(v, (int, float, torch.SymFloat, torch.SymInt)):
        raise TypeError(f"moe_router.{op}: `{name}` must be a float, got {type(v).__name__} {v!r}")
    v = float(v) if isinstance(v, (int, float)) else v
    # Comparisons rather than math.isfinite: under torch.compile(dynamic=True) `v` may be
    # a SymFloat, whose comparisons become guards while math.isfinite breaks the graph.
    bad = not (v == v and -math.inf < v < math.inf)
    if f32:  # the core takes it as f32: a value that rounds to inf there is not finite
        bad = bad or v >= _F32_OVERFLOW or v <= -_F32_OVERFLOW
        valid = valid and f"{valid} (and representable in float32: |x| < 3.4e38)"
    if lo is not None:
        bad = bad or (v <= lo if lo_open else v < lo)
    if hi is not None:
        bad = bad or (v >= hi if hi_open else v > hi)
    if bad:
        if not valid:
            lb = "(" if lo_open else "["
            rb = ")" if hi_open else "]"
            valid = f"finite and in {lb}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{rb}"
        raise ValueError(f"moe_router.{op}: invalid `{name}` = {v}: it must be {valid}")
    return v


def _bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"moe_router.{op}: `{name}` must be a bool, got {type(v).__name__} {v!r}")
    return v


def _choice(op: str, name: str, v, choices: Sequence[str]) -> str:
    if not isinstance(v, str) or v not in choices:
        raise ValueError(
            f"moe_router.{op}: invalid `{name}` = {v!r}: valid values are {', '.join(repr(c) for c in choices)}"
        )
    return v


def _seed(op: str, name: str, v) -> int:
    """A uint64 seed / offset, carried to the op as a signed int64 (two's complement)."""
    if not _is_int(v):
        raise TypeError(f"moe_router.{op}: `{name}` must be an int in [0, 2**64), got {type(v).__name__} {v!r}")
    if isinstance(v, int):
        if not 0 <= v < _U64:
            raise ValueError(f"moe_router.{op}: invalid `{name}` = {v}: it must be in [0, 2**64)")
        return v - _U64 if v >= 2**63 else v
    return v


def _padding_mask(op: str, t, num_tokens, ref: Tensor) -> Optional[Tensor]:
    if t is None:
        return None
    _tensor(op, "padding_mask", t, (torch.bool,), 1, "[num_tokens] (True = padding)",
            "pass `padding_mask.bool()`; True marks a padding token")  # fmt: skip
    _dim(op, "padding_mask", t, 0, num_tokens, "num_tokens (rows of `logits`)")
    _same_device(op, "logits", ref, padding_mask=t)
    return t


# --------------------------------------------------------------------------------------
# Top-k gating


def topk_gating(
    logits: Tensor,
    topk: int,
    *,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    normalize: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    expert_bias: Optional[Tensor] = None,
    scaling_factor: float = 1.0,
    noise_std: float = 0.0,
    expert_mask_rate: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> Tuple[Tensor, Tensor]:
    """Select ``topk`` experts per token and compute their routing weights.

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16 router logits ``z``.
        topk: experts per token, ``1 <= topk <= E``.
        score_function: ``"softmax"`` or ``"sigmoid"``.
        pre_softmax: softmax only. ``True``: ``p = softmax(z)`` over all ``E``, select on
            ``p + b``, ``w = p[i]`` (Switch, DeepSeek-V2, Qwen-MoE). ``False``: select on
            ``z + b``, ``w = softmax(z[i])`` over the ``k`` selected (Mixtral, Megatron's
            default).
            With ``"sigmoid"`` (DeepSeek-V3): ``p = sigmoid(z)``, select on ``p + b``,
            ``w = p[i]``.
        normalize: divide the ``k`` weights by their sum (``+ 1e-20``).
        num_groups, group_topk: group-limited routing (DeepSeek-V2/V3): the ``E``
            experts form ``num_groups`` contiguous groups; only the ``group_topk`` groups
            with the best sum of their top ``topk // group_topk`` scores stay eligible.
            Give both or neither.
        expert_bias: optional ``[E]`` float32 bias ``b`` (aux-loss-free balancing); it
            changes which experts are selected, never the weights, and gets no gradient.
        scaling_factor: multiplies the final weights.
        noise_std: std of Gaussian noise added to the selection score only (the weights
            stay noise-free); ``0`` disables it.
        expert_mask_rate: probability of masking each (token, expert) candidate before
            selection (never leaving fewer than ``topk``); ``0`` disables it. Training only.
        seed, offset: the Philox stream ``(seed, offset)`` of the noise and the masking,
            each in ``[0, 2**64)``; advance ``offset`` every step.

    Returns:
        ``(weights, indices)``: ``weights`` ``[T, topk]`` float32 (differentiable w.r.t.
        ``logits``), ``indices`` ``[T, topk]`` int64, ordered by descending selection score.
    """
    op = "topk_gating"
    _logits(op, logits)
    e = logits.shape[1]
    _int(op, "num_experts (logits.shape[1])", e, 1, _I32_MAX, valid=_E_VALID)
    _int(op, "topk", topk, 1, e, valid=f"in [1, num_experts] = [1, {e}]")
    _choice(op, "score_function", score_function, SCORE_FUNCTIONS)
    _bool(op, "pre_softmax", pre_softmax)
    if pre_softmax and score_function == "sigmoid":
        raise ValueError(
            f"moe_router.{op}: invalid `pre_softmax` = True: it applies to score_function 'softmax' only; "
            "set it to False for 'sigmoid'"
        )
    _bool(op, "normalize", normalize)
    if (num_groups is None) != (group_topk is None):
        raise ValueError(
            f"moe_router.{op}: invalid `num_groups` = {num_groups}, `group_topk` = {group_topk}: "
            "give both (group-limited routing) or neither"
        )
    if num_groups is not None:
        _int(op, "num_groups", num_groups, 1, e, valid=f"in [1, num_experts] = [1, {e}] and divide num_experts")
        if e % num_groups != 0:
            raise ValueError(f"moe_router.{op}: invalid `num_groups` = {num_groups}: it must divide num_experts = {e}")
        _int(op, "group_topk", group_topk, 1, num_groups, valid=f"in [1, num_groups] = [1, {num_groups}]")
        if group_topk > topk:
            raise ValueError(
                f"moe_router.{op}: invalid `group_topk` = {group_topk}: a group's score sums its top "
                f"topk // group_topk experts, so group_topk must be <= topk = {topk}"
            )
        if group_topk * (e // num_groups) < topk:
            raise ValueError(
                f"moe_router.{op}: invalid `topk` = {topk}: not reachable within group_topk = {group_topk} groups "
                f"of {e // num_groups} experts; need group_topk * num_experts / num_groups >= topk"
            )
    if expert_bias is not None:
        _tensor(op, "expert_bias", expert_bias, (torch.float32,), 1, "[num_experts]", "pass `expert_bias.float()`")
        _dim(op, "expert_bias", expert_bias, 0, e, "num_experts (columns of `logits`)")
        _same_device(op, "logits", logits, expert_bias=expert_bias)
    scaling_factor = _float(op, "scaling_factor", scaling_factor, valid="finite", f32=True)
    noise_std = _float(op, "noise_std", noise_std, 0.0, valid="finite and >= 0 (0 disables the noise)", f32=True)
    expert_mask_rate = _float(op, "expert_mask_rate", expert_mask_rate, 0.0, 1.0, hi_open=True)
    seed = _seed(op, "seed", seed)
    offset = _seed(op, "offset", offset)
    bias = None if expert_bias is None else expert_bias.detach()
    weights, indices = _moe.topk_gating(
        logits, bias, topk, score_function, pre_softmax, normalize, num_groups, group_topk, scaling_factor,
        noise_std, expert_mask_rate, seed, offset,
    )  # fmt: skip
    return weights, indices.long()


def topk_gating_replay(
    logits: Tensor,
    indices: Tensor,
    *,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    normalize: bool = False,
    scaling_factor: float = 1.0,
) -> Tensor:
    """Routing replay: the weights of given expert ``indices``, computed exactly as
    :func:`topk_gating` would have had it selected them (RL rollout replay, frozen
    routing).

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16.
        indices: ``[T, k]`` int32 / int64, distinct experts in ``[0, E)`` per token.
        score_function, pre_softmax, normalize, scaling_factor: as in :func:`topk_gating`.

    On CUDA, out-of-range or repeated indices are not checked (no sync): the kernels
    ignore out-of-range ones (NaN weight, no gradient) instead of raising.

    Returns:
        ``weights`` ``[T, k]`` float32, differentiable w.r.t. ``logits``.
    """
    op = "topk_gating_replay"
    _logits(op, logits)
    t, e = logits.shape
    _int(op, "num_experts (logits.shape[1])", e, 1, _I32_MAX, valid=_E_VALID)
    _index(op, "indices", indices, 2, "[num_tokens, topk]")
    _dim(op, "indices", indices, 0, t, "num_tokens (rows of `logits`)")
    _int(op, "topk (indices.shape[1])", indices.shape[1], 1, e, valid=f"in [1, num_experts] = [1, {e}]")
    _same_device(op, "logits", logits, indices=indices)
    _choice(op, "score_function", score_function, SCORE_FUNCTIONS)
    _bool(op, "pre_softmax", pre_softmax)
    if pre_softmax and score_function == "sigmoid":
        raise ValueError(
            f"moe_router.{op}: invalid `pre_softmax` = True: it applies to score_function 'softmax' only; "
            "set it to False for 'sigmoid'"
        )
    _bool(op, "normalize", normalize)
    scaling_factor = _float(op, "scaling_factor", scaling_factor, valid="finite", f32=True)
    return _moe.topk_gating_replay(logits, indices, score_function, pre_softmax, normalize, scaling_factor)


# --------------------------------------------------------------------------------------
# Capacity and dispatch


def capacity(
    num_tokens: int,
    num_experts: int,
    topk: int,
    capacity_factor: float,
    *,
    min_capacity: int = 0,
    capacity_multiple: Optional[int] = None,
) -> int:
    """Expert capacity: ``ceil((num_tokens * topk / num_experts) * capacity_factor)``
    computed in float64 exactly as written (Megatron's ``get_capacity``), then
    ``max(.., min_capacity)``, then rounded up to a multiple of ``capacity_multiple`` if
    given. Pure Python (same arithmetic as the core crate's ``capacity``, which the tests
    check it against), so it also runs inside ``torch.compile``.

    Raises:
        ValueError: ``num_experts < 1``, ``topk`` outside ``[1, num_experts]``, a capacity factor that is not
        finite and > 0, ``capacity_multiple < 1``, a capacity above ``2**31 - 1``.
    """
    op = "capacity"
    _int(op, "num_tokens", num_tokens, 0)
    _int(op, "num_experts", num_experts, 1)
    _int(
        op,
        "topk",
        topk,
        1,
        num_experts,
        valid=f"in [1, num_experts] = [1, {num_experts}]: a token cannot pick an expert twice",
    )
    capacity_factor = _float(op, "capacity_factor", capacity_factor, 0.0, lo_open=True, valid="finite and > 0")
    _int(op, "min_capacity", min_capacity, 0)
    _opt_int(op, "capacity_multiple", capacity_multiple, 1)
    # float(T * k) / float(E): both operands rounded to f64 first, as the core does
    # (Python's int / int would round the exact quotient once instead).
    raw = (float(num_tokens * topk) / float(num_experts)) * capacity_factor
    # Comparisons, not math.isfinite: under torch.compile(dynamic=True) `raw` is a
    # SymFloat, and math.isfinite on it is a graph break (raw >= 0; NaN fails raw == raw).
    if not (raw == raw and raw <= _I32_MAX):
        raise ValueError(
            f"moe_router.{op}: capacity = ceil({num_tokens} * {topk} / {num_experts} * {capacity_factor}) overflows "
            f"the i32 slot index (max {_I32_MAX}); lower `capacity_factor` or split the batch"
        )
    cap = math.ceil(raw)
    cap = max(cap, min_capacity)
    if capacity_multiple is not None:
        cap = -(-cap // capacity_multiple) * capacity_multiple
    if cap > _I32_MAX:
        raise ValueError(
            f"moe_router.{op}: capacity = {cap} (after `min_capacity` = {min_capacity} and `capacity_multiple` = "
            f"{capacity_multiple}) overflows the i32 slot index (max {_I32_MAX}); lower them or split the batch"
        )
    return cap


def dispatch_max_rows(
    num_tokens: int,
    topk: int,
    num_experts: int,
    *,
    capacity: Optional[int] = None,
    layout: str = "compact",
    align: int = 1,
) -> int:
    """Rows of the dispatch buffer (``len(row_to_token)``) for these sizes and options,
    known before routing: ``num_experts * capacity`` for ``"pad_to_capacity"``;
    ``min(num_tokens * topk, num_experts * capacity)`` for ``"compact"``
    (``num_tokens * topk`` without capacity); ``num_tokens * topk + num_experts *
    (align - 1)`` for ``"dropless"``.

    Raises:
        TypeError / ValueError: as :func:`dispatch` for the same sizes and options.
    """
    op = "dispatch_max_rows"
    _int(op, "num_tokens", num_tokens, 0)
    _int(op, "topk", topk, 1)
    _int(op, "num_experts", num_experts, 1)
    _opt_int(op, "capacity", capacity, 0)
    _choice(op, "layout", layout, LAYOUTS)
    _int(op, "align", align, 1)
    return _native.dispatch_max_rows(
        num_tokens, topk, num_experts=num_experts, capacity=capacity, layout=layout, align=align
    )


class Dispatch(NamedTuple):
    """Result of :func:`dispatch` (index tensors int64).

    Attributes:
        slot: ``[T, k]`` position of each assignment inside its expert's buffer, ``-1``
            if dropped (or not routed).
        row: ``[T, k]`` row of each assignment in the expert-major buffer, ``-1`` if
            dropped. Pass it to :func:`permute` and :func:`unpermute`.
        kept_weights: ``[T, k]`` float32, the weights with dropped assignments set to 0
            (and rescaled to the token's routed sum if asked), the core's values;
            differentiable w.r.t. ``weights``.
        tokens_per_expert: ``[E]`` assignments kept per expert.
        dropped: 0-d int64 tensor, assignments dropped for capacity (``int(d.dropped)``).
        row_to_token: ``[max_rows]`` token of each buffer row, ``-1`` for padding rows and
            for the unused tail (``max_rows`` is :func:`dispatch_max_rows`).
        expert_offsets: ``[E + 1]`` first row of each expert's segment (and the end).
        rows_per_rank: ``[ep_size]`` rows owned by each expert-parallel rank (the
            ``E / ep_size`` consecutive experts of a rank are contiguous in the buffer):
            split sizes for ``all_to_all_single``.
        num_rows: 0-d int64 tensor, rows in use (``expert_offsets[-1]``); rows from
            ``num_rows`` to ``max_rows`` are the unused tail.
    """

    slot: Tensor
    row: Tensor
    kept_weights: Tensor
    tokens_per_expert: Tensor
    dropped: Tensor
    row_to_token: Tensor
    expert_offsets: Tensor
    rows_per_rank: Tensor
    num_rows: Tensor


def dispatch(
    indices: Tensor,
    weights: Tensor,
    num_experts: int,
    *,
    capacity: Optional[int] = None,
    drop_policy: Optional[str] = None,
    layout: str = "compact",
    align: int = 1,
    renormalize: bool = False,
    ep_size: int = 1,
    seed: int = 0,
    offset: int = 0,
) -> Dispatch:
    """Capacity-factor dispatch: each expert keeps at most ``capacity`` of the
    assignments routed to it, chosen by ``drop_policy``, and every kept assignment gets a
    row in an expert-major buffer.

    Args:
        indices: ``[T, k]`` int32 / int64 expert of each assignment, ``-1`` = not routed.
        weights: ``[T, k]`` float32 routing weights.
        num_experts: ``E >= 1``.
        capacity: assignments an expert keeps (see :func:`capacity`); ``None`` keeps all.
            Required by ``layout="pad_to_capacity"``; not allowed with ``"dropless"``.
        drop_policy: which assignments an over-full expert keeps (a lower key is kept
            first; needs a ``capacity``; ``None`` means ``"position"`` with one):
            ``"position"`` key ``t``; ``"choice_then_position"`` key ``(j, t)``;
            ``"probs"`` key ``(-w, t)``; ``"batch_prioritized"`` key ``(-max_j w[t, j], t)``;
            ``"random"`` key ``(u(seed, offset, t), t)``.
        layout: ``"compact"`` (``sum(kept)`` rows, ``row = expert_offsets[e] + slot``),
            ``"pad_to_capacity"`` (``E * capacity`` rows, ``row = e * capacity + slot``) or
            ``"dropless"`` (no capacity; each expert's segment padded to a multiple of
            ``align`` rows).
        align: segment alignment of ``"dropless"`` (``1`` elsewhere).
        renormalize: rescale each token's kept weights to the sum ``S`` of its routed
            weights, ``w * S / (S_kept + 1e-20)`` (all 0 if nothing was kept), so that
            dropping does not shrink the token's output.
        ep_size: expert-parallel ranks, dividing ``E``.
        seed, offset: the Philox stream of ``drop_policy="random"``, each in ``[0, 2**64)``.

    On CUDA every output equals the CPU's bit for bit; ``num_rows`` and ``dropped`` stay on
    the device (no sync). ``indices`` values are not checked there (that would need a sync):
    an index outside ``[0, num_experts)`` counts as not routed instead of raising, and a
    repeated one is not rejected.

    Returns:
        :class:`Dispatch`. Its buffer has :func:`dispatch_max_rows` rows whatever the
        routing (a static shape for ``torch.compile``); ``num_rows`` says how many are
        used. Differentiable w.r.t. ``weights`` through ``kept_weights`` only.
    """
    op = "dispatch"
    _index(op, "indices", indices, 2, "[num_tokens, topk]")
    t, k = indices.shape
    _tensor(op, "weights", weights, (torch.float32,), 2, "[num_tokens, topk]", "pass `weights.float()`")
    if weights.shape != indices.shape:
        raise ValueError(
            f"moe_router.{op}: `weights` has shape {tuple(weights.shape)}, expected the shape of `indices` "
            f"{tuple(indices.shape)}"
        )
    _same_device(op, "indices", indices, weights=weights)
    _int(op, "num_experts", num_experts, 1)
    _int(op, "topk (indices.shape[1])", k, 1, num_experts, valid=f"in [1, num_experts] = [1, {num_experts}]")
    _opt_int(op, "capacity", capacity, 0)
    if drop_policy is not None:  # a policy without a capacity is the core's error
        _choice(op, "drop_policy", drop_policy, DROP_POLICIES)
    _choice(op, "layout", layout, LAYOUTS)
    _int(op, "align", align, 1)
    if layout == "pad_to_capacity" and capacity is None:
        raise ValueError(
            f"moe_router.{op}: invalid `capacity` = None: layout 'pad_to_capacity' needs a capacity "
            "(see moe_router.capacity)"
        )
    if layout == "dropless" and capacity is not None:
        raise ValueError(
            f"moe_router.{op}: invalid `capacity` = {capacity}: layout 'dropless' keeps every assignment; "
            "pass capacity=None, or use layout 'compact' / 'pad_to_capacity'"
        )
    if layout != "dropless" and align != 1:
        raise ValueError(f"moe_router.{op}: invalid `align` = {align}: alignment applies to layout 'dropless' only")
    _bool(op, "renormalize", renormalize)
    _int(op, "ep_size", ep_size, 1)
    if num_experts % ep_size != 0:
        raise ValueError(f"moe_router.{op}: invalid `ep_size` = {ep_size}: it must divide num_experts = {num_experts}")
    seed = _seed(op, "seed", seed)
    offset = _seed(op, "offset", offset)
    kept_weights, slot, row, tpe, r2t, offsets, per_rank, counts = _moe.dispatch(
        indices, weights, num_experts, capacity, drop_policy, layout, align, renormalize, ep_size, seed, offset
    )
    return Dispatch(
        slot=slot.long(),
        row=row.long(),
        kept_weights=kept_weights,
        tokens_per_expert=tpe.long(),
        dropped=counts[1],
        row_to_token=r2t.long(),
        expert_offsets=offsets.long(),
        rows_per_rank=per_rank.long(),
        num_rows=counts[0],
    )


# --------------------------------------------------------------------------------------
# Expert choice


class ExpertChoice(NamedTuple):
    """Result of :func:`expert_choice` (index tensors int64).

    Attributes:
        weights: ``[T, E]`` float32, ``softmax(logits)[t, e]`` where expert ``e`` chose
            token ``t``, else 0; differentiable w.r.t. ``logits``.
        row: ``[T, E]`` buffer row of each chosen (token, expert), ``-1`` where not chosen.
            Pass it to :func:`permute` / :func:`unpermute` as the ``[T, k]`` row with ``k = E``.
        row_to_token: ``[E * capacity]`` token of each row (``-1`` for padding).
        tokens_per_expert: ``[E]`` tokens each expert took (``min(capacity, T)``).
        expert_offsets: ``[E + 1]`` first row of each expert's segment.
        row_weights: ``[E * capacity]`` float32, weight of each row (0 for padding);
            differentiable w.r.t. ``logits``.
    """

    weights: Tensor
    row: Tensor
    row_to_token: Tensor
    tokens_per_expert: Tensor
    expert_offsets: Tensor
    row_weights: Tensor


def expert_choice(logits: Tensor, capacity: int) -> ExpertChoice:
    """Expert-choice routing: each expert takes its ``capacity`` best tokens by
    ``p = softmax(logits)[:, e]`` (ties: lower token index); a token may get 0..E experts.

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16.
        capacity: tokens per expert, ``>= 0``.

    On CUDA ``p`` matches the CPU's to rounding (an ulp), so the choice between two tokens
    whose ``p`` are that close can differ from the CPU's; given the same ``p`` the outputs
    are the same. A ``row`` given to the backward is not checked for entries below ``-1``.

    Returns:
        :class:`ExpertChoice`, with ``E * capacity`` buffer rows.
    """
    op = "expert_choice"
    _logits(op, logits)
    _int(op, "num_experts (logits.shape[1])", logits.shape[1], 1, _I32_MAX, valid=_E_VALID)
    _int(op, "capacity", capacity, 0)
    weights, row, r2t, row_weights, tpe, offsets = _moe.expert_choice(logits, capacity)
    return ExpertChoice(weights, row.long(), r2t.long(), tpe.long(), offsets.long(), row_weights)


# --------------------------------------------------------------------------------------
# Permute / unpermute


def permute(x: Tensor, row_to_token: Tensor, row: Tensor) -> Tensor:
    """Gather token hidden states into the expert-major buffer:
    ``buf[r] = x[row_to_token[r]]``, zeros where ``row_to_token[r] == -1``.

    Args:
        x: ``[T, H]`` float32 / float16 / bfloat16 hidden states.
        row_to_token: ``[R]`` int32 / int64 (from :func:`dispatch` / :func:`expert_choice`).
        row: ``[T, k]`` int32 / int64 row of each assignment (``-1`` = none); used by the
            backward, ``grad_x[t] = sum_j grad_buf[row[t, j]]``.

    On CUDA, out-of-range indices are ignored by the kernels instead of raising (a token
    index out of range gives a zero row, a row out of range a dropped assignment).

    Returns:
        ``buf`` ``[R, H]`` of ``x``'s dtype, differentiable w.r.t. ``x``.
    """
    op = "permute"
    _tensor(op, "x", x, _FLOATS, 2, "[num_tokens, hidden]", "pass `x.float()` or `x.bfloat16()`")
    _index(op, "row_to_token", row_to_token, 1, "[num_rows]")
    _index(op, "row", row, 2, "[num_tokens, topk]")
    _dim(op, "row", row, 0, x.shape[0], "num_tokens (rows of `x`)")
    _same_device(op, "x", x, row_to_token=row_to_token, row=row)
    return _moe.permute(x, row_to_token, row)


def unpermute(y: Tensor, row: Tensor, weights: Tensor) -> Tensor:
    """Combine expert outputs back per token:
    ``out[t] = sum_j weights[t, j] * y[row[t, j]]`` over ``row[t, j] >= 0``, accumulated
    in float32. A token with no kept assignment gets 0 (add the residual yourself).

    Args:
        y: ``[R, H]`` float32 / float16 / bfloat16 expert outputs (buffer rows).
        row: ``[T, k]`` int32 / int64 row of each assignment, ``-1`` = dropped.
        weights: ``[T, k]`` float32 combine weights (e.g. ``Dispatch.kept_weights``).

    On CUDA, out-of-range indices are ignored by the kernels instead of raising (a row out of
    range counts as a dropped assignment).

    Returns:
        ``out`` ``[T, H]`` of ``y``'s dtype, differentiable w.r.t. ``y`` and ``weights``.
    """
    op = "unpermute"
    _tensor(op, "y", y, _FLOATS, 2, "[num_rows, hidden]", "pass `y.float()` or `y.bfloat16()`")
    _index(op, "row", row, 2, "[num_tokens, topk]")
    _tensor(op, "weights", weights, (torch.float32,), 2, "[num_tokens, topk]", "pass `weights.float()`")
    if weights.shape != row.shape:
        raise ValueError(
            f"moe_router.{op}: `weights` has shape {tuple(weights.shape)}, expected the shape of `row` "
            f"{tuple(row.shape)}"
        )
    _same_device(op, "y", y, row=row, weights=weights)
    return _moe.unpermute(y, row, weights)


# --------------------------------------------------------------------------------------
# Losses


def _loss_common(op: str, logits, topk, score_function, coeff) -> float:
    _logits(op, logits)
    e = logits.shape[1]
    _int(op, "num_experts (logits.shape[1])", e, 1, _I32_MAX, valid=_E_VALID)
    _int(op, "topk", topk, 1, e, valid=f"in [1, num_experts] = [1, {e}]")
    _choice(op, "score_function", score_function, SCORE_FUNCTIONS)
    return _float(op, "coeff", coeff, valid="finite", f32=True)


def aux_loss(
    logits: Tensor,
    topk: int,
    *,
    score_function: str = "softmax",
    coeff: float = 1.0,
    padding_mask: Optional[Tensor] = None,
    counts: Optional[Tensor] = None,
    total_tokens: Optional[Union[int, Tensor]] = None,
) -> Tensor:
    """Switch/GShard load-balance loss (Megatron ``switch_load_balancing_loss_func``):
    ``L = coeff * E / (k * T_total**2) * sum_e c_e * sum_t P[t, e]``.

    ``P`` is ``softmax(z)`` for softmax routers and ``sigmoid(z) / (sum_e sigmoid(z) +
    1e-20)`` for sigmoid routers; ``c_e`` counts the assignments to ``e`` in the plain
    top-k of ``P`` (no bias, no groups) unless ``counts`` is given. HF Mixtral's
    ``load_balancing_loss_func`` equals this with ``coeff = topk``.

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16.
        topk: ``k``, in ``[1, E]``.
        score_function: ``"softmax"`` or ``"sigmoid"``.
        coeff: loss coefficient.
        padding_mask: optional ``[T]`` bool, ``True`` = padding (excluded from counts,
            scores and ``T``).
        counts: optional ``[E]`` int32 / int64 counts covering a larger batch (global-batch
            balancing); the gradient never flows through counts.
        total_tokens: ``T_total`` those counts cover (int or 0-d integer tensor; a tensor
            on the logits' CUDA device is read there, without a host sync); only with
            ``counts`` (``ValueError`` otherwise: without counts the loss uses the counts
            and valid tokens here). Default: the valid tokens here.

    Returns:
        0-d float32 loss, differentiable w.r.t. ``logits``.
    """
    op = "aux_loss"
    coeff = _loss_common(op, logits, topk, score_function, coeff)
    t, e = logits.shape
    mask = _padding_mask(op, padding_mask, t, logits)
    if counts is not None:
        _index(op, "counts", counts, 1, "[num_experts]")
        _dim(op, "counts", counts, 0, e, "num_experts (columns of `logits`)")
        _same_device(op, "logits", logits, counts=counts)
    total = None
    if total_tokens is not None:
        if isinstance(total_tokens, Tensor):
            dense = total_tokens.layout == torch.strided and not total_tokens.is_nested
            if not dense or total_tokens.dim() != 0 or total_tokens.dtype not in _INTS:
                raise TypeError(
                    f"moe_router.{op}: `total_tokens` must be an int or a dense 0-d int32 / int64 tensor, got a "
                    f"{total_tokens.dtype} tensor of shape {tuple(total_tokens.shape)} and layout {total_tokens.layout}"
                )
            if total_tokens.device != logits.device and total_tokens.device.type != "cpu":
                # (a CPU value with CUDA logits is a host scalar, read on the host)
                raise ValueError(
                    f"moe_router.{op}: `total_tokens` is on {total_tokens.device} but `logits` is on "
                    f"{logits.device}; pass it on the logits' device, as a CPU tensor or as an int"
                )
            total = total_tokens.to(torch.int64)
        else:
            _int(op, "total_tokens", total_tokens, 0)
            total = torch.tensor(total_tokens, dtype=torch.int64)
    loss, _, _ = _moe.aux_loss(logits, mask, counts, total, topk, score_function, coeff)
    return loss


def global_aux_loss(
    logits: Tensor,
    topk: int,
    *,
    score_function: str = "softmax",
    coeff: float = 1.0,
    padding_mask: Optional[Tensor] = None,
    group=None,
) -> Tensor:
    """Global-batch load-balance loss (Qwen): :func:`aux_loss` with the counts and token
    count summed over the ranks of ``group`` by ``torch.distributed.all_reduce`` (scores
    stay local). Summed over ranks, the losses equal :func:`aux_loss` of the whole batch.
    Without an initialised process group it is :func:`aux_loss`.

    Args: as :func:`aux_loss`; ``group`` is the process group (default: the world).

    Returns:
        0-d float32 loss, differentiable w.r.t. ``logits``.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return aux_loss(logits, topk, score_function=score_function, coeff=coeff, padding_mask=padding_mask)
    op = "global_aux_loss"
    coeff = _loss_common(op, logits, topk, score_function, coeff)
    mask = _padding_mask(op, padding_mask, logits.shape[0], logits)
    _, counts, total = _moe.aux_loss(logits.detach(), mask, None, None, topk, score_function, coeff)
    packed = torch.cat([counts, total.reshape(1)])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    # No valid token anywhere: every count is 0 and so is the loss; T_total = 1 avoids 0 / 0.
    # The summed total stays a device tensor that the kernels read: no host sync on CUDA.
    loss, _, _ = _moe.aux_loss(logits, mask, packed[:-1], packed[-1].clamp(min=1), topk, score_function, coeff)
    return loss


def seq_aux_loss(
    logits: Tensor,
    topk: int,
    seq_len: int,
    *,
    score_function: str = "softmax",
    coeff: float = 1.0,
    padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Sequence-level load-balance loss (DeepSeek-V2/V3): :func:`aux_loss` computed for
    each sequence of the ``[B, S]`` batch from that sequence's own counts and scores,
    averaged over the sequences that have at least one valid (non-padding) token (all
    ``B`` without a padding mask; 0 if every token is padding).

    Args:
        logits: ``[B * S, E]`` float32 / float16 / bfloat16, sequences contiguous.
        topk: ``k``, in ``[1, E]``.
        seq_len: ``S >= 1``, dividing the number of tokens.
        score_function, coeff, padding_mask: as in :func:`aux_loss`.

    Returns:
        0-d float32 loss, differentiable w.r.t. ``logits``.
    """
    op = "seq_aux_loss"
    coeff = _loss_common(op, logits, topk, score_function, coeff)
    t = logits.shape[0]
    _int(op, "seq_len", seq_len, 1)
    if t % seq_len != 0:
        raise ValueError(
            f"moe_router.{op}: invalid `seq_len` = {seq_len}: it must divide num_tokens = {t} "
            "(logits are [batch * seq_len, num_experts])"
        )
    mask = _padding_mask(op, padding_mask, t, logits)
    loss, _ = _moe.seq_aux_loss(logits, mask, seq_len, topk, score_function, coeff)
    return loss


def z_loss(logits: Tensor, *, coeff: float = 1.0, padding_mask: Optional[Tensor] = None) -> Tensor:
    """Router z-loss (ST-MoE): ``L = coeff * mean_t logsumexp(z[t])**2`` over valid
    tokens (stable for ``|z| >> 80``; 0 for no valid token).

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16.
        coeff: loss coefficient.
        padding_mask: optional ``[T]`` bool, ``True`` = padding (excluded).

    Returns:
        0-d float32 loss, differentiable w.r.t. ``logits``.
    """
    op = "z_loss"
    _logits(op, logits)
    _int(op, "num_experts (logits.shape[1])", logits.shape[1], 1, _I32_MAX, valid=_E_VALID)
    coeff = _float(op, "coeff", coeff, valid="finite", f32=True)
    mask = _padding_mask(op, padding_mask, logits.shape[0], logits)
    return _moe.z_loss(logits, mask, coeff)


# --------------------------------------------------------------------------------------
# Expert dropout


def expert_mask(
    num_tokens: int,
    num_experts: int,
    topk: int,
    rate: float,
    *,
    seed: int = 0,
    offset: int = 0,
    device: Union[str, torch.device] = "cpu",
) -> Tensor:
    """The expert-masking mask (``True`` = candidate masked): each (token, expert) is
    masked with probability ``rate``, deterministically from ``(seed, offset)``, never
    leaving fewer than ``topk`` candidates per token. This is the mask
    :func:`topk_gating` applies with ``expert_mask_rate``.

    Returns:
        ``[num_tokens, num_experts]`` bool on ``device`` (CPU or CUDA: the same bits).
    """
    op = "expert_mask"
    _int(op, "num_tokens", num_tokens, 0)
    _int(op, "num_experts", num_experts, 1, _I32_MAX, valid=_E_VALID)
    _int(op, "topk", topk, 1, num_experts, valid=f"in [1, num_experts] = [1, {num_experts}]")
    rate = _float(op, "rate", rate, 0.0, 1.0, hi_open=True)
    return _moe.expert_mask(
        num_tokens, num_experts, topk, rate, _seed(op, "seed", seed), _seed(op, "offset", offset),
        _device_arg(op, device),
    )  # fmt: skip


def _device_arg(op: str, device) -> torch.device:
    """A CPU, CUDA (available) or meta device, or a clear error naming `device`."""
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise TypeError(
            f"moe_router.{op}: `device` must be a str, int or torch.device, got {type(device).__name__} {device!r}"
        )
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"moe_router.{op}: invalid `device` = {device!r}: pass 'cpu', 'cuda', 'cuda:<i>' or 'meta'")
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(
            f"moe_router.{op}: invalid `device` = {device!r}: no such CUDA device "
            f"({torch.cuda.device_count()} available)"
        )
    return dev


def assignment_dropout(
    indices: Tensor,
    weights: Tensor,
    rate: float,
    *,
    num_experts: int,
    seed: int = 0,
    offset: int = 0,
    renormalize: bool = False,
) -> Tuple[Tensor, Tensor]:
    """Assignment dropout (NLLB's expert output masking): each assignment is dropped
    with probability ``rate`` (its index becomes ``-1``, its weight 0, it takes no
    capacity), deterministically from ``(seed, offset)`` (Philox, element ``t * k + j``).
    With ``renormalize``, each token that lost an assignment has its kept weights scaled
    so that its weight sum is preserved: ``w' = keep * w * S / (S_keep + 1e-20)``.
    Identity at ``rate = 0`` (up to zeroing the weights of unrouted entries). Training
    only.

    Args:
        indices: ``[T, k]`` int32 / int64 experts (``-1`` = not routed).
        weights: ``[T, k]`` float32.
        rate: drop probability in ``[0, 1)``.
        num_experts: ``E`` (indices must be in ``[0, E)``).

    On CUDA, out-of-range indices are ignored by the kernels instead of raising (a
    non-negative index counts as routed).

    Returns:
        ``(indices, weights)``: ``[T, k]`` int64 and ``[T, k]`` float32, the weights
        differentiable w.r.t. ``weights``.
    """
    op = "assignment_dropout"
    _index(op, "indices", indices, 2, "[num_tokens, topk]")
    _tensor(op, "weights", weights, (torch.float32,), 2, "[num_tokens, topk]", "pass `weights.float()`")
    if weights.shape != indices.shape:
        raise ValueError(
            f"moe_router.{op}: `weights` has shape {tuple(weights.shape)}, expected the shape of `indices` "
            f"{tuple(indices.shape)}"
        )
    _same_device(op, "indices", indices, weights=weights)
    rate = _float(op, "rate", rate, 0.0, 1.0, hi_open=True)
    _int(op, "num_experts", num_experts, 1)
    _bool(op, "renormalize", renormalize)
    out_w, out_idx, _keep = _moe.assignment_dropout(
        indices, weights, num_experts, rate, _seed(op, "seed", seed), _seed(op, "offset", offset), renormalize
    )
    return out_idx.long(), out_w


# --------------------------------------------------------------------------------------
# Aux-loss-free balancing and statistics


def update_expert_bias(bias: Tensor, counts: Tensor, rate: float, *, group=None) -> Tensor:
    """Aux-loss-free balancing (DeepSeek-V3): ``bias[e] += rate * sign(mean(c) - c[e])``,
    in place, from this step's per-expert counts ``c``. With an initialised
    ``torch.distributed`` process group the counts are first summed over ``group``.

    Args:
        bias: ``[E]`` float32; updated in place (under ``torch.no_grad``).
        counts: ``[E]`` int32 / int64 assignments per expert (e.g. ``tokens_per_expert``).
        rate: update rate, finite and ``>= 0``.

    On CUDA, negative counts are not rejected (that would need a sync); the kernel applies
    the same formula to them.

    Returns:
        ``bias`` (the same tensor).
    """
    op = "update_expert_bias"
    _tensor(op, "bias", bias, (torch.float32,), 1, "[num_experts]", "keep the bias in float32")
    if bias.is_neg() or any(st == 0 and n > 1 for st, n in zip(bias.stride(), bias.shape)):
        raise ValueError(
            f"moe_router.{op}: `bias` cannot be updated in place: it is "
            f"{'a negative-bit view' if bias.is_neg() else 'an expanded tensor whose elements share memory (stride 0)'}"
            "; pass a tensor that owns its elements (`bias.clone()`, and use the result)"
        )
    _index(op, "counts", counts, 1, "[num_experts]")
    _dim(op, "counts", counts, 0, bias.shape[0], "num_experts (length of `bias`)")
    _same_device(op, "bias", bias, counts=counts)
    rate = _float(op, "rate", rate, 0.0, valid="finite and >= 0", f32=True)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        counts = counts.to(torch.int64).clone()
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    with torch.no_grad():
        _moe.update_expert_bias(bias, counts, rate)
    return bias


class RouterStats(NamedTuple):
    """Result of :func:`router_stats` (0-d tensors for scalars). Statistics, not
    differentiable: no field carries the logits' autograd graph.

    Attributes:
        selected_counts: ``[E]`` int64 assignments selected per expert.
        kept_counts: ``[E]`` int64 kept after capacity (``None`` without ``slot``).
        dropped: int64, assignments dropped (``slot == -1`` while routed).
        max_violation: float32, ``max_e c_e / mean_e c_e - 1``.
        mean_entropy: float32, mean router entropy ``-sum p log p``.
        mean_lse: float32, mean ``logsumexp`` of the logits.
        max_lse: float32, max ``logsumexp``.
        nonfinite_logits: int64, count of NaN / inf logits.
        num_tokens: int64, tokens counted (padding excluded).
    """

    selected_counts: Tensor
    kept_counts: Optional[Tensor]
    dropped: Tensor
    max_violation: Tensor
    mean_entropy: Tensor
    mean_lse: Tensor
    max_lse: Tensor
    nonfinite_logits: Tensor
    num_tokens: Tensor


def router_stats(
    logits: Tensor,
    indices: Tensor,
    *,
    slot: Optional[Tensor] = None,
    padding_mask: Optional[Tensor] = None,
    strict: bool = False,
) -> RouterStats:
    """Router statistics in one pass over the logits and the routing.

    Args:
        logits: ``[T, E]`` float32 / float16 / bfloat16.
        indices: ``[T, k]`` int32 / int64 selected experts.
        slot: optional ``[T, k]`` int32 / int64 slots from :func:`dispatch` (``-1`` =
            dropped) for the kept counts and the dropped count.
        padding_mask: optional ``[T]`` bool, ``True`` = padding (excluded).
        strict: raise ``ValueError`` if any logit is NaN or infinite.

    On CUDA, out-of-range indices are ignored by the kernels instead of raising, and the
    results stay on the device; ``strict=True`` reads the non-finite count on the host
    (one sync).

    Returns:
        :class:`RouterStats`.
    """
    op = "router_stats"
    _logits(op, logits)
    t, e = logits.shape
    _int(op, "num_experts (logits.shape[1])", e, 1, _I32_MAX, valid=_E_VALID)
    _index(op, "indices", indices, 2, "[num_tokens, topk]")
    _dim(op, "indices", indices, 0, t, "num_tokens (rows of `logits`)")
    if slot is not None:
        _index(op, "slot", slot, 2, "[num_tokens, topk]")
        if slot.shape != indices.shape:
            raise ValueError(
                f"moe_router.{op}: `slot` has shape {tuple(slot.shape)}, expected the shape of `indices` "
                f"{tuple(indices.shape)}"
            )
    mask = _padding_mask(op, padding_mask, t, logits)
    _same_device(op, "logits", logits, indices=indices, slot=slot)
    _bool(op, "strict", strict)
    selected, kept, ints, floats = _moe.router_stats(logits, indices, slot, mask, strict)
    return RouterStats(
        selected_counts=selected,
        kept_counts=None if slot is None else kept,
        dropped=ints[1],
        max_violation=floats[0],
        mean_entropy=floats[1],
        mean_lse=floats[2],
        max_lse=floats[3],
        nonfinite_logits=ints[2],
        num_tokens=ints[0],
    )


# --------------------------------------------------------------------------------------
# CUDA warm-up


def warmup(device=None) -> int:
    """Compile (NVRTC, or the on-disk PTX cache) and load every CUDA kernel module for
    ``device`` now, instead of at the first op that needs it. Call it once before
    capturing a CUDA graph (loading a module inside a capture would invalidate it) and
    before timing. ``device``: a CUDA device, index or ``None`` (the current device).
    Returns the number of kernel modules loaded.

    Raises:
        ValueError: ``device`` is not a CUDA device.
        RuntimeError: no usable CUDA device or NVRTC.
    """
    op = "warmup"
    dev = (
        torch.device("cuda")
        if device is None
        else torch.device(device)
        if not isinstance(device, int)
        else (torch.device("cuda", device))
    )
    if dev.type != "cuda":
        raise ValueError(f"moe_router.{op}: invalid `device` = {device!r}: warmup is for CUDA devices")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    return _native.cuda_warmup(index)
