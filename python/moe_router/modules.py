"""``torch.nn`` modules built on the functional API: :class:`TopKRouter` and :class:`MoELayer`.

The router computes its gate projection in float32 (Megatron-Core's
``--moe-router-dtype fp32``), selects experts with :func:`moe_router.topk_gating`, computes
the load-balancing and z losses, and builds the dispatch plan (capacity, token dropping,
row layout) with :func:`moe_router.dispatch`. :class:`MoELayer` adds a bank of expert MLPs
and the permute / unpermute around them.

Layout conventions: ``hidden_states`` is ``[..., hidden]``; every leading dimension is
flattened into ``T`` tokens in row-major order. ``seq_aux_loss`` needs sequences: a 3-D
input is read as ``[batch, seq, hidden]`` (batch first; pass ``sequence_first=True`` for
Megatron's ``[seq, batch, hidden]``), or pass ``seq_len=`` explicitly for 2-D input.

Losses have two modes (``loss_mode``):

* ``"attach"`` (default, Megatron's ``MoEAuxLossAutoScaler``): the aux and z losses are
  injected into the backward of the routing weights; forward values are unchanged and
  ``loss.backward()`` on the main loss alone trains the router. The losses returned in
  :class:`RouterOutput` are detached (for logging); do not add them again.
* ``"return"``: nothing is attached; the returned losses are part of the graph and the
  caller adds ``out.aux_loss + out.z_loss`` to its loss.

Randomness (selection noise, expert masking, assignment dropout, random drop priority,
input jitter) is training-only and deterministic: it is keyed by ``(seed, rng_step)``,
and ``rng_step`` advances by one per training forward that uses randomness. In eval
mode the router is a pure function of its input and parameters.

``torch.compile(fullgraph=True)`` traces a whole training step (router, dispatch,
experts, combine, losses, statistics, bias counts) without a graph break, for every
layout. ``rng_step`` is a Python int attribute: a configuration without training
randomness never reads it; with randomness, compile the module itself (``torch.compile
(model)``) and set ``torch._dynamo.config.allow_unspec_int_on_nn_module = True`` so it
is a dynamic int rather than a constant that recompiles every step.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as torch_F
from torch import Tensor, nn

from . import functional as F

__all__ = [
    "RouterOutput",
    "TopKRouter",
    "ExpertMLPs",
    "MoELayer",
    "attach_aux_loss",
    "update_router_biases",
    "grouped_mlp",
]

_SCORE_FUNCTIONS = F.SCORE_FUNCTIONS  # the native module's vocabularies, one list each
_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "none")
_DROP_POLICIES = F.DROP_POLICIES
_LOSS_MODES = ("attach", "return")
_ACTIVATIONS = ("swiglu", "gelu")


# --------------------------------------------------------------------------------------
# Aux-loss injection (Megatron's MoEAuxLossAutoScaler)
# --------------------------------------------------------------------------------------


class _AuxLossAutoScaler(torch.autograd.Function):
    """Identity on ``output``; backward also sends ``scale`` as the gradient of ``loss``.

    Megatron-Core's ``MoEAuxLossAutoScaler``: forward values are untouched, and whenever
    the backward pass reaches ``output`` the loss receives the gradient it would have got
    had ``scale * loss`` been added to the final loss.
    """

    @staticmethod
    def forward(ctx, output: Tensor, loss: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.scale), None


def attach_aux_loss(output: Tensor, loss: Tensor, scale: float = 1.0) -> Tensor:
    """Return ``output`` unchanged, with ``loss`` attached to its backward.

    When the backward pass reaches the returned tensor, ``loss`` receives the gradient
    ``scale`` (as if ``scale * loss`` had been added to the final loss). ``scale`` plays
    the role of Megatron's ``MoEAuxLossAutoScaler.set_loss_scale`` (e.g.
    ``1 / num_microbatches`` under gradient accumulation). Works under
    ``torch.compile(fullgraph=True)``.
    """
    if not loss.requires_grad:
        return output
    return _AuxLossAutoScaler.apply(output, loss, float(scale))


# --------------------------------------------------------------------------------------
# Router output
# --------------------------------------------------------------------------------------


@dataclass
class RouterOutput:
    """What :class:`TopKRouter` returns for ``T`` tokens (leading dims flattened).

    Attributes:
        weights: ``[T, k]`` float32 routing weights (0 where an assignment was removed by
            assignment dropout or padding); in ``loss_mode="attach"`` the losses ride on
            their backward.
        indices: ``[T, k]`` int64 expert of each assignment, ``-1`` where unrouted
            (padding token, assignment dropout). Ordered by descending selection score.
        logits: ``[T, E]`` float32 gate logits.
        aux_loss: scalar float32 load-balancing loss (0 when ``load_balancing_type="none"``).
        z_loss: scalar float32 router z-loss (0 when ``z_loss_coeff`` is 0).
        tokens_per_expert: ``[E]`` int64 assignments per expert as selected by gating (or
            replayed): before assignment dropout and capacity dropping, padding excluded.
            These are the counts the expert-bias update uses.
        dispatch: the :func:`moe_router.dispatch` plan (``slot``, ``row``,
            ``kept_weights``, ``tokens_per_expert`` kept, ``dropped``, ``row_to_token``,
            ``expert_offsets``, ``rows_per_rank``), or ``None`` when the router was built
            with ``dispatch=False``.
        capacity: per-expert capacity used, or ``None`` (dropless).
        layout: dispatch layout, ``"pad_to_capacity"``, ``"compact"`` or ``"dropless"``.
        stats: :func:`moe_router.router_stats` of this batch (per-expert selected and kept
            counts, dropped, MaxVio, entropy, logsumexp, non-finite count) or ``None``
            (``compute_stats=False``).
        selected_indices: ``[T, k]`` int64 experts chosen by gating (or replayed), before
            assignment dropout and padding removal: what ``record=True`` stores.
    """

    weights: Tensor
    indices: Tensor
    logits: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    tokens_per_expert: Tensor
    dispatch: Any = None
    capacity: Optional[int] = None
    layout: str = "dropless"
    stats: Any = None
    selected_indices: Optional[Tensor] = None

    @property
    def kept_weights(self) -> Tensor:
        """``[T, k]`` weights after capacity dropping (dropped assignments are 0)."""
        return self.weights if self.dispatch is None else self.dispatch.kept_weights

    @property
    def loss(self) -> Tensor:
        """``aux_loss + z_loss`` (detached in ``loss_mode="attach"``)."""
        return self.aux_loss + self.z_loss


# --------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------


def _bad(arg: str, value: Any, valid: str, owner: str = "TopKRouter") -> ValueError:
    """The package's error format: ``moe_router.<owner>: invalid `arg` = value: valid``."""
    return ValueError(f"moe_router.{owner}: invalid `{arg}` = {value!r}: it must be {valid}")


# The smallest magnitude that rounds to +-inf in float32 (options used in f32 math stay below).
_F32_OVERFLOW = 2.0**128 - 2.0**103


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _want(owner: str, arg: str, v: Any, kind: str, none_ok: bool = False) -> None:
    """``TypeError`` naming the argument unless ``v`` is of ``kind`` ("int", "float" or
    "bool"; ``None`` too if ``none_ok``). Values are checked by the callers."""
    if v is None and none_ok:
        return
    ok = {
        "int": _is_int(v),
        "float": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
    }[kind]
    if not ok:
        what = {"int": "an int", "float": "a float", "bool": "a bool"}[kind] + (" or None" if none_ok else "")
        raise TypeError(f"moe_router.{owner}: `{arg}` must be {what}, got {type(v).__name__} {v!r}")


def _check_tensor_arg(owner: str, arg: str, t: Any, device: torch.device) -> None:
    """A dense (strided, not nested) tensor on ``device``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"moe_router.{owner}: `{arg}` must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise TypeError(
            f"moe_router.{owner}: `{arg}` has layout {'nested' if t.is_nested else t.layout}; pass a dense tensor"
        )
    if t.device != device:
        raise ValueError(
            f"moe_router.{owner}: `{arg}` is on {t.device} but the module is on {device}; put them on one device"
        )


def _check_hidden(owner: str, x: Any, hidden_size: int, device: Optional[torch.device] = None) -> None:
    """``hidden_states`` is a dense float32 / float16 / bfloat16 tensor ``[..., hidden_size]``
    (on ``device``, the module's, if given)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"moe_router.{owner}: `hidden_states` must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided or x.is_nested:
        raise TypeError(
            f"moe_router.{owner}: `hidden_states` has layout {'nested' if x.is_nested else x.layout}; pass a dense "
            "tensor [..., hidden_size]"
        )
    if device is not None and x.device != device:
        raise ValueError(
            f"moe_router.{owner}: `hidden_states` is on {x.device} but the module is on {device}; put them on one "
            "device (`module.to(hidden_states.device)`)"
        )
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"moe_router.{owner}: `hidden_states` has dtype {x.dtype}; valid dtypes are float32, float16, bfloat16"
        )
    if x.dim() < 1 or x.shape[-1] != hidden_size:
        raise ValueError(
            f"moe_router.{owner}: `hidden_states` has shape {tuple(x.shape)}: its last dimension must be "
            f"hidden_size = {hidden_size}"
        )


def _uint64(v: Any) -> Optional[int]:
    """``v`` as an int if it is an integer (not a bool) in ``[0, 2**64)``, else None."""
    if isinstance(v, bool):
        return None
    try:
        i = operator.index(v)
    except TypeError:
        return None
    return i if 0 <= i < 2**64 else None


def _lowbias32(x: Tensor) -> Tensor:
    """32-bit integer hash (lowbias32) on int64 tensors holding values in ``[0, 2^32)``."""
    m = 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & m
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _key32(*parts: int) -> int:
    """Mix integers into one 32-bit key on the host (same hash as :func:`_lowbias32`)."""
    m = 0xFFFFFFFF
    h = 0x9E3779B9
    for p in parts:
        for word in (p & m, (p >> 32) & m):
            x = (h ^ word) & m
            x ^= x >> 16
            x = (x * 0x7FEB352D) & m
            x ^= x >> 15
            x = (x * 0x846CA68B) & m
            h = x ^ (x >> 16)
    return h


def _hash_uniform(shape: Sequence[int], seed: int, offset: int, salt: int, device) -> Tensor:
    """Counter-based uniform ``[0, 1)`` float32 samples keyed by ``(seed, offset, salt)``.

    A pure-torch integer hash of each element's flat index, so the values do not depend
    on the device, the thread count or the global RNG, and it traces under torch.compile
    (``offset`` may be a dynamic int there: it is mixed in with tensor ops). Used for the
    input jitter only; the ops' randomness is Philox-4x32-10.
    """
    n = 1
    for s in shape:
        n *= int(s)
    base = _key32(seed, salt)
    off = torch.zeros((), dtype=torch.int64, device=device) + offset
    key = _lowbias32(_lowbias32((off & 0xFFFFFFFF) ^ base) ^ ((off >> 32) & 0xFFFFFFFF))
    idx = torch.arange(n, device=device, dtype=torch.int64)
    x = _lowbias32(_lowbias32((idx & 0xFFFFFFFF) ^ key) ^ ((idx >> 32) + 0x68E31DA4))
    return ((x >> 8).to(torch.float32) * (1.0 / (1 << 24))).reshape(tuple(shape))


# --------------------------------------------------------------------------------------
# TopKRouter
# --------------------------------------------------------------------------------------


class TopKRouter(nn.Module):
    """Top-k token-choice MoE router with Megatron-Core's options.

    Example::

        router = TopKRouter(hidden_size=512, num_experts=16, topk=2, capacity_factor=1.25,
                            aux_loss_coeff=1e-2, z_loss_coeff=1e-3)
        r = router(hidden_states)               # [batch, seq, 512] -> RouterOutput
        r.indices, r.weights                    # [T, 2] experts and routing weights
        r.dispatch.row_to_token                 # the expert-major plan for permute
        loss = task_loss + r.loss               # aux + z (loss_mode="return")

    Args (Megatron-Core flag each maps to, where there is one):
        hidden_size: model width ``H`` (``--hidden-size``).
        num_experts: ``E`` (``--num-experts``).
        topk: experts per token ``k`` (``--moe-router-topk``).
        score_function: ``"softmax"`` or ``"sigmoid"`` (``--moe-router-score-function``).
        pre_softmax: softmax over all ``E`` before top-k (Switch, DeepSeek-V2, Qwen-MoE);
            softmax only (``--moe-router-pre-softmax``).
        normalize: renormalise the ``k`` weights to sum 1. ``None`` (default) follows
            Megatron: on for sigmoid with ``k > 1``, off otherwise (softmax without
            ``pre_softmax`` sums to 1 already). HF's ``norm_topk_prob``.
        num_groups, group_topk: group-limited routing (``--moe-router-num-groups``,
            ``--moe-router-group-topk``; DeepSeek-V2 device-, V3 node-limited).
        topk_scaling_factor: multiplies the weights (``--moe-router-topk-scaling-factor``).
        enable_expert_bias: aux-loss-free balancing bias added to the selection scores
            only (``--moe-router-enable-expert-bias``, DeepSeek-V3); update it with
            :meth:`update_bias` after each optimizer step.
        bias_update_rate: step of the bias update (``--moe-router-bias-update-rate``,
            default 1e-3).
        load_balancing_type: ``"aux_loss"`` (Switch/GShard), ``"seq_aux_loss"``
            (DeepSeek per-sequence), ``"global_aux_loss"`` (Qwen global batch: counts
            all-reduced over ``process_group``) or ``"none"``
            (``--moe-router-load-balancing-type``; Megatron's ``sinkhorn`` is not offered).
        aux_loss_coeff: load-balancing loss coefficient (``--moe-aux-loss-coeff``).
            HF Mixtral's ``router_aux_loss_coef * load_balancing_loss_func`` equals
            ``aux_loss`` with ``aux_loss_coeff = k * router_aux_loss_coef``.
        z_loss_coeff: router z-loss coefficient (``--moe-z-loss-coeff``, ST-MoE).
        input_jitter_eps: multiply the input by ``U(1 - eps, 1 + eps)`` in training
            (``--moe-input-jitter-eps``, Switch).
        capacity_factor: per-expert capacity ``ceil(T * k / E * capacity_factor)``;
            ``None`` is dropless (``--moe-expert-capacity-factor``).
        token_drop_policy: which assignments an over-full expert keeps: ``"probs"``,
            ``"position"`` (``--moe-token-drop-policy``), ``"choice_then_position"``
            (GShard), ``"batch_prioritized"`` (Switch BPR) or ``"random"`` (DeepSpeed RTS).
            Default ``"probs"`` as Megatron.
        pad_expert_input_to_capacity: lay every expert out at exactly ``capacity`` rows
            (fixed shapes; ``--moe-pad-expert-input-to-capacity``); needs a capacity.
        min_capacity: lower bound on the capacity (DeepSpeed ``min_capacity``).
        capacity_multiple: round the capacity up to a multiple of this.
        dropless_align: without a capacity, pad each expert segment to a multiple of this
            many rows (grouped-GEMM block size, as vLLM's ``moe_align_block_size``).
        renormalize_after_drop: rescale each token's kept weights to its routed sum.
        expert_dropout: assignment dropout rate after gating (NLLB's expert output masking,
            fairseq ``--moe-eom``); training only.
        expert_mask_rate: per-(token, expert) candidate masking before selection; training
            only; no Megatron flag.
        noise_std: Gaussian noise std on the selection score only (DeepSpeed's RSample
            noisy gate); training only; no Megatron flag.
        loss_mode: ``"attach"`` (Megatron ``MoEAuxLossAutoScaler``) or ``"return"``.
        loss_scale: gradient the attached losses receive (Megatron's
            ``MoEAuxLossAutoScaler.set_loss_scale``; e.g. ``1 / num_microbatches``).
        frozen: the router keeps routing but gets and passes no gradient and attaches no
            loss (SFT / RL with a frozen router); see :meth:`freeze`.
        record: store the indices chosen by each forward in :attr:`recorded_indices`
            (rollout routing replay for RL, Megatron's ``--moe-enable-routing-replay``
            RECORD action); replay them with ``forward(x, replay_indices=...)``.
        sequence_first: 3-D input is ``[seq, batch, hidden]`` (Megatron) instead of
            ``[batch, seq, hidden]``; only matters for ``seq_aux_loss``.
        compute_stats: compute :func:`moe_router.router_stats` each forward (one pass
            over the logits; no host sync, so it also runs inside ``torch.compile``).
        dispatch: build the dispatch plan in forward (needed by :class:`MoELayer`).
        seed: seed of the training randomness, an int in ``[0, 2**64 - 1]``.
        process_group: data-parallel group for ``global_aux_loss`` and the bias update.
        gate_init_std: std of the normal init of the gate weight (Megatron's
            ``--init-method-std``, default 0.02).

    The gate is ``self.gate = nn.Linear(hidden_size, num_experts, bias=False)`` whose
    weight stays float32 even after ``module.to(torch.bfloat16)``; the input is cast to
    float32 for it.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        topk: int = 2,
        *,
        score_function: str = "softmax",
        pre_softmax: bool = False,
        normalize: Optional[bool] = None,
        num_groups: Optional[int] = None,
        group_topk: Optional[int] = None,
        topk_scaling_factor: Optional[float] = None,
        enable_expert_bias: bool = False,
        bias_update_rate: float = 1e-3,
        load_balancing_type: str = "aux_loss",
        aux_loss_coeff: float = 0.0,
        z_loss_coeff: float = 0.0,
        input_jitter_eps: Optional[float] = None,
        capacity_factor: Optional[float] = None,
        token_drop_policy: str = "probs",
        pad_expert_input_to_capacity: bool = False,
        min_capacity: int = 0,
        capacity_multiple: Optional[int] = None,
        dropless_align: int = 1,
        renormalize_after_drop: bool = False,
        expert_dropout: float = 0.0,
        expert_mask_rate: float = 0.0,
        noise_std: float = 0.0,
        loss_mode: str = "attach",
        loss_scale: float = 1.0,
        frozen: bool = False,
        record: bool = False,
        sequence_first: bool = False,
        compute_stats: bool = True,
        dispatch: bool = True,
        seed: int = 0,
        process_group: Any = None,
        gate_init_std: float = 0.02,
        device=None,
    ) -> None:
        super().__init__()
        if not _is_int(hidden_size) or hidden_size < 1:
            raise _bad("hidden_size", hidden_size, "a positive int")
        if not _is_int(num_experts) or num_experts < 1:
            raise _bad("num_experts", num_experts, "a positive int")
        if num_experts > 2**31 - 1:
            raise _bad("num_experts", num_experts, "at most 2**31 - 1 (expert indices are int32)")
        owner = "TopKRouter"
        for name, v, none_ok in (
            ("topk_scaling_factor", topk_scaling_factor, True), ("bias_update_rate", bias_update_rate, False),
            ("aux_loss_coeff", aux_loss_coeff, False), ("z_loss_coeff", z_loss_coeff, False),
            ("input_jitter_eps", input_jitter_eps, True), ("capacity_factor", capacity_factor, True),
            ("expert_dropout", expert_dropout, False), ("expert_mask_rate", expert_mask_rate, False),
            ("noise_std", noise_std, False), ("loss_scale", loss_scale, False), ("gate_init_std", gate_init_std, False),
        ):  # fmt: skip
            _want(owner, name, v, "float", none_ok)
        _want(owner, "min_capacity", min_capacity, "int")
        _want(owner, "capacity_multiple", capacity_multiple, "int", none_ok=True)
        _want(owner, "normalize", normalize, "bool", none_ok=True)
        for name, v in (
            ("pre_softmax", pre_softmax), ("enable_expert_bias", enable_expert_bias),
            ("pad_expert_input_to_capacity", pad_expert_input_to_capacity),
            ("renormalize_after_drop", renormalize_after_drop), ("frozen", frozen), ("record", record),
            ("sequence_first", sequence_first), ("compute_stats", compute_stats), ("dispatch", dispatch),
        ):  # fmt: skip
            _want(owner, name, v, "bool")
        for name, v in (
            ("topk_scaling_factor", topk_scaling_factor), ("bias_update_rate", bias_update_rate),
            ("aux_loss_coeff", aux_loss_coeff), ("z_loss_coeff", z_loss_coeff), ("loss_scale", loss_scale),
        ):  # fmt: skip
            if v is not None and math.isfinite(v) and abs(v) >= _F32_OVERFLOW:
                raise _bad(name, v, "representable in float32 (|x| < 3.4e38)")
        if not (math.isfinite(loss_scale)):
            raise _bad("loss_scale", loss_scale, "a finite float")
        if not (0.0 <= gate_init_std < _F32_OVERFLOW):
            raise _bad("gate_init_std", gate_init_std, "a finite float >= 0 (float32)")
        if device is not None:
            F._device_arg(owner, device)  # a CPU, an available CUDA or the meta device, or a clear error
        if not _is_int(topk) or not 1 <= topk <= num_experts:
            raise _bad("topk", topk, f"an int in [1, num_experts={num_experts}]")
        if score_function not in _SCORE_FUNCTIONS:
            raise _bad("score_function", score_function, f"one of {_SCORE_FUNCTIONS}")
        if pre_softmax and score_function != "softmax":
            raise _bad("pre_softmax", pre_softmax, "pre_softmax=True needs score_function='softmax'")
        if (num_groups is None) != (group_topk is None):
            raise _bad(
                "group_topk" if num_groups is not None else "num_groups",
                group_topk if num_groups is not None else num_groups,
                "num_groups and group_topk are set together",
            )
        if num_groups is not None:
            if not isinstance(num_groups, int) or num_groups < 1 or num_experts % num_groups:
                raise _bad("num_groups", num_groups, f"a positive divisor of num_experts={num_experts}")
            if not isinstance(group_topk, int) or not 1 <= group_topk <= num_groups:
                raise _bad("group_topk", group_topk, f"an int in [1, num_groups={num_groups}]")
            if group_topk * (num_experts // num_groups) < topk:
                raise _bad(
                    "group_topk",
                    group_topk,
                    f"group_topk * experts per group must reach topk={topk} "
                    f"(experts per group = {num_experts // num_groups})",
                )
        if load_balancing_type not in _LOAD_BALANCING:
            raise _bad("load_balancing_type", load_balancing_type, f"one of {_LOAD_BALANCING}")
        if token_drop_policy not in _DROP_POLICIES:
            raise _bad("token_drop_policy", token_drop_policy, f"one of {_DROP_POLICIES}")
        if capacity_factor is not None and not (math.isfinite(capacity_factor) and capacity_factor > 0):
            raise _bad("capacity_factor", capacity_factor, "a finite float > 0, or None for dropless")
        if pad_expert_input_to_capacity and capacity_factor is None:
            raise _bad(
                "pad_expert_input_to_capacity",
                pad_expert_input_to_capacity,
                "padding to capacity needs capacity_factor",
            )
        if not _is_int(dropless_align) or dropless_align < 1:
            raise _bad("dropless_align", dropless_align, "an int >= 1")
        if dropless_align > 1 and capacity_factor is not None:
            raise _bad("dropless_align", dropless_align, "segment alignment applies without capacity_factor only")
        if min_capacity < 0:
            raise _bad("min_capacity", min_capacity, "an int >= 0")
        if capacity_multiple is not None and capacity_multiple < 1:
            raise _bad("capacity_multiple", capacity_multiple, "an int >= 1 or None")
        for name, rate in (("expert_dropout", expert_dropout), ("expert_mask_rate", expert_mask_rate)):
            if not (0.0 <= rate < 1.0):
                raise _bad(name, rate, "a rate in [0, 1)")
        if not (noise_std >= 0.0 and math.isfinite(noise_std)):
            raise _bad("noise_std", noise_std, "a finite float >= 0")
        if input_jitter_eps is not None and not (0.0 <= input_jitter_eps < 1.0):
            raise _bad("input_jitter_eps", input_jitter_eps, "a float in [0, 1) or None")
        if not (bias_update_rate >= 0.0 and math.isfinite(bias_update_rate)):
            raise _bad("bias_update_rate", bias_update_rate, "a finite float >= 0")
        for name, c in (("aux_loss_coeff", aux_loss_coeff), ("z_loss_coeff", z_loss_coeff)):
            if not (c >= 0.0 and math.isfinite(c)):
                raise _bad(name, c, "a finite float >= 0")
        if loss_mode not in _LOSS_MODES:
            raise _bad("loss_mode", loss_mode, f"one of {_LOSS_MODES}")
        if topk_scaling_factor is not None and not math.isfinite(topk_scaling_factor):
            raise _bad("topk_scaling_factor", topk_scaling_factor, "a finite float or None")
        # The ops take a uint64 seed: check it here, not at the first forward.
        seed_int = _uint64(seed)
        if seed_int is None:
            raise _bad("seed", seed, "an int in [0, 2**64 - 1]")

        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.topk = topk
        self.score_function = score_function
        self.pre_softmax = bool(pre_softmax)
        self.normalize = (score_function == "sigmoid" and topk > 1) if normalize is None else bool(normalize)
        self.num_groups = num_groups
        self.group_topk = group_topk
        self.topk_scaling_factor = 1.0 if topk_scaling_factor is None else float(topk_scaling_factor)
        self.enable_expert_bias = bool(enable_expert_bias)
        self.bias_update_rate = float(bias_update_rate)
        self.load_balancing_type = load_balancing_type
        self.aux_loss_coeff = float(aux_loss_coeff)
        self.z_loss_coeff = float(z_loss_coeff)
        self.input_jitter_eps = input_jitter_eps
        self.capacity_factor = capacity_factor
        self.token_drop_policy = token_drop_policy
        self.pad_expert_input_to_capacity = bool(pad_expert_input_to_capacity)
        self.min_capacity = int(min_capacity)
        self.capacity_multiple = capacity_multiple
        self.dropless_align = dropless_align
        self.renormalize_after_drop = bool(renormalize_after_drop)
        self.expert_dropout = float(expert_dropout)
        self.expert_mask_rate = float(expert_mask_rate)
        self.noise_std = float(noise_std)
        self.loss_mode = loss_mode
        self.loss_scale = float(loss_scale)
        self.record = bool(record)
        self.sequence_first = bool(sequence_first)
        self.compute_stats = bool(compute_stats)
        self.build_dispatch = bool(dispatch)
        self.seed = seed_int
        self.rng_step = 0
        self.process_group = process_group
        self.recorded_indices: List[Tensor] = []

        self.gate = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=torch.float32)
        nn.init.normal_(self.gate.weight, mean=0.0, std=gate_init_std)
        if self.enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32, device=device))
            # Assignments routed to each expert since the last update_bias() (Megatron's
            # local_tokens_per_expert), accumulated over micro-batches.
            self.register_buffer("local_tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64, device=device))
        else:
            self.expert_bias = None
            self.local_tokens_per_expert = None
        self.frozen = False
        if frozen:
            self.freeze()

    # ---- dtype: the gate stays float32 -------------------------------------------------

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        # Megatron's --moe-router-dtype fp32: whatever the module is cast to, the gate
        # weight and the bias buffers stay float32 (device moves still apply).
        w = self.gate.weight
        if w.dtype != torch.float32:
            w.data = w.data.float()
            if w.grad is not None:
                w.grad = w.grad.float()
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    # ---- modes -------------------------------------------------------------------------

    def freeze(self) -> "TopKRouter":
        """Keep routing, stop router gradients (SFT / RL with a frozen router).

        The gate weight gets ``requires_grad=False``; the logits are detached, so no
        gradient flows through the routing weights (to the gate or to the input), and no
        loss is attached (losses are still computed, detached, for logging). The expert
        bias is still updated by :meth:`update_bias` if enabled; call
        ``router.enable_expert_bias = False`` to stop that too.
        """
        self.frozen = True
        self.gate.weight.requires_grad_(False)
        return self

    def unfreeze(self) -> "TopKRouter":
        """Undo :meth:`freeze`."""
        self.frozen = False
        self.gate.weight.requires_grad_(True)
        return self

    def pop_recorded(self) -> List[Tensor]:
        """Return and clear the indices recorded by forwards with ``record=True``."""
        out, self.recorded_indices = self.recorded_indices, []
        return out

    # ---- aux-loss-free balancing ---------------------------------------------------------

    @torch.no_grad()
    def update_bias(self) -> Optional[Tensor]:
        """Aux-loss-free balancing step (DeepSeek-V3; Megatron's ``_update_router_expert_bias``).

        ``b_e += bias_update_rate * sign(mean(c) - c_e)`` with ``c`` the routed
        assignments per expert accumulated by the training forwards since the last call
        (all-reduced over ``process_group`` when torch.distributed is initialised), then
        the counts are reset. Call after each optimizer step. Returns the bias (or
        ``None`` without ``enable_expert_bias``).
        """
        if not self.enable_expert_bias:
            return None
        F.update_expert_bias(
            self.expert_bias, self.local_tokens_per_expert, self.bias_update_rate, group=self.process_group
        )
        self.local_tokens_per_expert.zero_()
        return self.expert_bias

    # ---- forward ---------------------------------------------------------------------------

    def _uses_rng(self) -> bool:
        return self.training and (
            self.noise_std > 0.0
            or self.expert_mask_rate > 0.0
            or self.expert_dropout > 0.0
            or bool(self.input_jitter_eps)
            or (self.token_drop_policy == "random" and self.capacity_factor is not None)
        )

    def _seq_len(self, shape: Tuple[int, ...], seq_len: Optional[int]) -> int:
        if seq_len is not None:
            return int(seq_len)
        if len(shape) == 3:
            return int(shape[0] if self.sequence_first else shape[1])
        raise ValueError(
            f"moe_router.TopKRouter: `seq_len` is needed: load_balancing_type='seq_aux_loss' needs sequences, and "
            f"`hidden_states` has shape "
            f"{tuple(shape)}; pass 3-D [batch, seq, hidden] input or seq_len="
        )

    def _to_batch_major(self, t: Tensor, shape: Tuple[int, ...]) -> Tensor:
        """Reorder a ``[T, ...]`` tensor from ``[S, B]`` to ``[B, S]`` token order."""
        if not (self.sequence_first and len(shape) == 3):
            return t
        s, b = shape[0], shape[1]
        return t.reshape(s, b, *t.shape[1:]).transpose(0, 1).reshape(t.shape)

    def forward(
        self,
        hidden_states: Tensor,
        *,
        padding_mask: Optional[Tensor] = None,
        replay_indices: Optional[Tensor] = None,
        record: Optional[bool] = None,
        seq_len: Optional[int] = None,
    ) -> RouterOutput:
        """Route ``hidden_states [..., hidden]``.

        Args:
            hidden_states: ``[..., hidden]`` float32 / float16 / bfloat16.
            padding_mask: bool, ``hidden_states.shape[:-1]``, ``True`` = padding: such
                tokens are not dispatched (index ``-1``, weight 0, output 0) and are
                excluded from the losses, counts and statistics.
            replay_indices: ``[..., k]`` (int32 / int64) experts to use instead of
                selecting (routing replay); weights and gradients are computed for them
                as if selected. Noise, masking and the expert bias play no part.
            record: override the router's ``record`` flag for this call.
            seq_len: sequence length for ``seq_aux_loss`` with 2-D input.
        """
        _check_hidden("TopKRouter", hidden_states, self.hidden_size, self.gate.weight.device)
        _want("TopKRouter", "record", record, "bool", none_ok=True)
        if seq_len is not None:
            _want("TopKRouter", "seq_len", seq_len, "int")
        if padding_mask is not None:
            _check_tensor_arg("TopKRouter", "padding_mask", padding_mask, hidden_states.device)
        if replay_indices is not None:
            _check_tensor_arg("TopKRouter", "replay_indices", replay_indices, hidden_states.device)
        shape = tuple(hidden_states.shape)
        x = hidden_states.reshape(-1, self.hidden_size)
        num_tokens = x.shape[0]
        E, k = self.num_experts, self.topk
        training = self.training
        offset = 0
        if self._uses_rng():
            offset = self.rng_step
            self.rng_step = offset + 1

        # ---- gate logits in float32 ----
        x32 = x.float()
        if training and self.input_jitter_eps:
            eps = float(self.input_jitter_eps)
            u = _hash_uniform(x32.shape, self.seed, offset, 0x4A17, x32.device)
            x32 = x32 * (1.0 - eps + 2.0 * eps * u)
        w = self.gate.weight
        logits = torch_F.linear(x32, w if w.dtype == torch.float32 else w.float())
        if self.frozen:
            logits = logits.detach()

        # ---- selection / replay ----
        if replay_indices is not None:
            if replay_indices.shape[-1] != k or replay_indices.numel() != num_tokens * k:
                raise ValueError(
                    f"moe_router.TopKRouter: `replay_indices` has shape {tuple(replay_indices.shape)}: expected "
                    f"{shape[:-1] + (k,)} (tokens of hidden_states, topk={k})"
                )
            selected = replay_indices.reshape(num_tokens, k)
            weights = F.topk_gating_replay(
                logits,
                selected,
                score_function=self.score_function,
                pre_softmax=self.pre_softmax,
                normalize=self.normalize,
                scaling_factor=self.topk_scaling_factor,
            )
            selected = selected.to(torch.int64)
        else:
            weights, selected = F.topk_gating(
                logits,
                k,
                score_function=self.score_function,
                pre_softmax=self.pre_softmax,
                normalize=self.normalize,
                num_groups=self.num_groups,
                group_topk=self.group_topk,
                expert_bias=self.expert_bias,
                scaling_factor=self.topk_scaling_factor,
                noise_std=self.noise_std if training else 0.0,
                expert_mask_rate=self.expert_mask_rate if training else 0.0,
                seed=self.seed,
                offset=offset,
            )
        if record if record is not None else self.record:
            self.recorded_indices.append(selected.detach().reshape(shape[:-1] + (k,)).clone())

        # ---- padding and assignment dropout ----
        pad = None
        if padding_mask is not None:
            if padding_mask.numel() != num_tokens:
                raise ValueError(
                    f"moe_router.TopKRouter: `padding_mask` has shape {tuple(padding_mask.shape)}: expected "
                    f"{shape[:-1]} (the leading dims of hidden_states)"
                )
            pad = padding_mask.reshape(num_tokens).to(torch.bool)
        indices = selected
        if pad is not None:
            indices = torch.where(pad[:, None], torch.full_like(indices, -1), indices)
            weights = torch.where(pad[:, None], torch.zeros_like(weights), weights)
        if training and self.expert_dropout > 0.0:
            indices, weights = F.assignment_dropout(
                indices,
                weights,
                self.expert_dropout,
                num_experts=E,
                seed=self.seed,
                offset=offset,
                renormalize=self.renormalize_after_drop,
            )
            indices = indices.to(torch.int64)

        # ---- counts (for the bias update and logging) ----
        # As Megatron: only forwards that will be trained on (training mode, grad
        # enabled) count towards the bias update.
        count_for_bias = training and self.enable_expert_bias and torch.is_grad_enabled()
        with torch.no_grad():
            valid = selected >= 0
            if pad is not None:
                valid = valid & ~pad[:, None]
            tokens_per_expert = torch.zeros(E, dtype=torch.int64, device=logits.device)
            tokens_per_expert.index_add_(0, selected.clamp(min=0).reshape(-1), valid.reshape(-1).to(torch.int64))
            if count_for_bias:
                self.local_tokens_per_expert += tokens_per_expert

        # ---- losses ----
        aux_loss, z_loss = self._losses(logits, pad, shape, seq_len)
        if self.loss_mode == "attach" and not self.frozen:
            total = aux_loss + z_loss
            if total.requires_grad:
                weights = attach_aux_loss(weights, total, self.loss_scale)
            aux_loss, z_loss = aux_loss.detach(), z_loss.detach()
        elif self.frozen:
            aux_loss, z_loss = aux_loss.detach(), z_loss.detach()

        # ---- dispatch plan ----
        plan, capacity, layout = None, None, "dropless"
        if self.build_dispatch:
            plan, capacity, layout = self._dispatch(indices, weights, num_tokens, offset)

        stats = None
        if self.compute_stats:
            with torch.no_grad():
                stats = F.router_stats(
                    logits.detach(),
                    indices,
                    slot=None if plan is None else plan.slot,
                    padding_mask=pad,
                )

        return RouterOutput(
            weights=weights,
            indices=indices,
            logits=logits,
            aux_loss=aux_loss,
            z_loss=z_loss,
            tokens_per_expert=tokens_per_expert,
            dispatch=plan,
            capacity=capacity,
            layout=layout,
            stats=stats,
            selected_indices=selected,
        )

    def _losses(
        self, logits: Tensor, pad: Optional[Tensor], shape: Tuple[int, ...], seq_len: Optional[int]
    ) -> Tuple[Tensor, Tensor]:
        zero = logits.new_zeros(())
        aux = zero
        if self.load_balancing_type != "none" and self.aux_loss_coeff > 0.0:
            if self.load_balancing_type == "aux_loss":
                aux = F.aux_loss(
                    logits, self.topk, score_function=self.score_function, coeff=self.aux_loss_coeff, padding_mask=pad
                )
            elif self.load_balancing_type == "global_aux_loss":
                aux = F.global_aux_loss(
                    logits,
                    self.topk,
                    score_function=self.score_function,
                    coeff=self.aux_loss_coeff,
                    padding_mask=pad,
                    group=self.process_group,
                )
            else:  # seq_aux_loss
                s = self._seq_len(shape, seq_len)
                aux = F.seq_aux_loss(
                    self._to_batch_major(logits, shape),
                    self.topk,
                    s,
                    score_function=self.score_function,
                    coeff=self.aux_loss_coeff,
                    padding_mask=None if pad is None else self._to_batch_major(pad, shape),
                )
        z = zero
        if self.z_loss_coeff > 0.0:
            z = F.z_loss(logits, coeff=self.z_loss_coeff, padding_mask=pad)
        return aux, z

    def _dispatch(self, indices: Tensor, weights: Tensor, num_tokens: int, offset: int):
        capacity = None
        if self.capacity_factor is not None:
            capacity = F.capacity(
                num_tokens,
                self.num_experts,
                self.topk,
                self.capacity_factor,
                min_capacity=self.min_capacity,
                capacity_multiple=self.capacity_multiple,
            )
            layout = "pad_to_capacity" if self.pad_expert_input_to_capacity else "compact"
        else:
            layout = "dropless"
        plan = F.dispatch(
            indices,
            weights,
            self.num_experts,
            capacity=capacity,
            drop_policy=None if capacity is None else self.token_drop_policy,
            layout=layout,
            align=self.dropless_align if layout == "dropless" else 1,
            renormalize=self.renormalize_after_drop,
            seed=self.seed,
            offset=offset,
        )
        return plan, capacity, layout

    def extra_repr(self) -> str:
        parts = [
            f"hidden_size={self.hidden_size}",
            f"num_experts={self.num_experts}",
            f"topk={self.topk}",
            f"score_function={self.score_function!r}",
        ]
        if self.pre_softmax:
            parts.append("pre_softmax=True")
        if self.num_groups is not None:
            parts.append(f"num_groups={self.num_groups}, group_topk={self.group_topk}")
        if self.load_balancing_type != "none":
            parts.append(f"load_balancing_type={self.load_balancing_type!r}, aux_loss_coeff={self.aux_loss_coeff}")
        if self.z_loss_coeff:
            parts.append(f"z_loss_coeff={self.z_loss_coeff}")
        if self.enable_expert_bias:
            parts.append(f"enable_expert_bias=True, bias_update_rate={self.bias_update_rate}")
        if self.capacity_factor is not None:
            parts.append(f"capacity_factor={self.capacity_factor}, token_drop_policy={self.token_drop_policy!r}")
        if self.frozen:
            parts.append("frozen=True")
        return ", ".join(parts)


@torch.no_grad()
def update_router_biases(model: nn.Module) -> int:
    """Call :meth:`TopKRouter.update_bias` on every router in ``model``; return how many.

    The analogue of Megatron's ``_update_router_expert_bias`` (run after each optimizer
    step, from ``finalize_model_grads``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"moe_router.update_router_biases: `model` must be a torch.nn.Module, got {type(model).__name__}"
        )
    n = 0
    for m in model.modules():
        if isinstance(m, TopKRouter) and m.enable_expert_bias:
            m.update_bias()
            n += 1
    return n


# --------------------------------------------------------------------------------------
# Experts
# --------------------------------------------------------------------------------------


def _act_forward(h: Tensor, activation: str) -> Tensor:
    if activation == "swiglu":
        a, b = h.chunk(2, dim=-1)
        return torch_F.silu(a) * b
    return torch_F.gelu(h)


def _act_backward(h: Tensor, grad: Tensor, activation: str) -> Tensor:
    """``d act(h) / d h`` applied to ``grad`` (float32 math)."""
    h32, g32 = h.float(), grad.float()
    if activation == "swiglu":
        a, b = h32.chunk(2, dim=-1)
        s = torch.sigmoid(a)
        silu = a * s
        da = g32 * b * (s * (1.0 + a * (1.0 - s)))
        db = g32 * silu
        return torch.cat([da, db], dim=-1).to(h.dtype)
    # exact (erf) GELU: Φ(h) + h φ(h)
    cdf = 0.5 * (1.0 + torch.erf(h32 * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * h32 * h32) * (1.0 / math.sqrt(2.0 * math.pi))
    return (g32 * (cdf + h32 * pdf)).to(h.dtype)


@torch.library.custom_op("moe_router_nn::grouped_mlp", mutates_args=())
def _grouped_mlp_op(buf: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor, activation: str) -> Tensor:
    offs = expert_offsets.tolist()
    out = buf.new_zeros(buf.shape[0], w2.shape[2])
    for e in range(w1.shape[0]):
        a, b = int(offs[e]), int(offs[e + 1])
        if b > a:
            out[a:b] = _act_forward(buf[a:b] @ w1[e], activation) @ w2[e]
    return out


@_grouped_mlp_op.register_fake
def _(buf, expert_offsets, w1, w2, activation):
    return buf.new_empty(buf.shape[0], w2.shape[2])


@torch.library.custom_op("moe_router_nn::grouped_mlp_backward", mutates_args=())
def _grouped_mlp_backward_op(
    grad_out: Tensor, buf: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor, activation: str
) -> Tuple[Tensor, Tensor, Tensor]:
    offs = expert_offsets.tolist()
    grad_buf = torch.zeros_like(buf)
    grad_w1 = torch.zeros_like(w1)
    grad_w2 = torch.zeros_like(w2)
    for e in range(w1.shape[0]):
        a, b = int(offs[e]), int(offs[e + 1])
        if b <= a:
            continue
        xe, ge = buf[a:b], grad_out[a:b]
        h = xe @ w1[e]  # recomputed (activation recompute)
        act = _act_forward(h, activation)
        grad_w2[e] = act.transpose(0, 1) @ ge
        grad_h = _act_backward(h, ge @ w2[e].transpose(0, 1), activation)
        grad_w1[e] = xe.transpose(0, 1) @ grad_h
        grad_buf[a:b] = grad_h @ w1[e].transpose(0, 1)
    return grad_buf, grad_w1, grad_w2


@_grouped_mlp_backward_op.register_fake
def _(grad_out, buf, expert_offsets, w1, w2, activation):
    return torch.empty_like(buf), torch.empty_like(w1), torch.empty_like(w2)


def _grouped_mlp_setup(ctx, inputs, output):
    buf, expert_offsets, w1, w2, activation = inputs
    ctx.save_for_backward(buf, expert_offsets, w1, w2)
    ctx.activation = activation


def _grouped_mlp_bwd(ctx, grad_out):
    buf, expert_offsets, w1, w2 = ctx.saved_tensors
    grad_buf, grad_w1, grad_w2 = _grouped_mlp_backward_op(
        grad_out.contiguous(), buf, expert_offsets, w1, w2, ctx.activation
    )
    return grad_buf, None, grad_w1, grad_w2, None


_grouped_mlp_op.register_autograd(_grouped_mlp_bwd, setup_context=_grouped_mlp_setup)


def grouped_mlp(buf: Tensor, expert_offsets: Tensor, w1: Tensor, w2: Tensor, activation: str = "swiglu") -> Tensor:
    """Run expert ``e``'s MLP on rows ``expert_offsets[e] .. expert_offsets[e+1]`` of ``buf``.

    ``buf [rows, H]`` is the expert-major buffer from :func:`moe_router.permute`;
    ``w1 [E, H, F']`` (``F' = 2F`` for SwiGLU: ``[gate | up]``), ``w2 [E, F, H]``. Rows
    outside every segment (the tail past ``expert_offsets[E]``) give 0. A loop over
    experts inside a ``torch.library`` custom op (``moe_router_nn::grouped_mlp``) with its
    own backward, so it traces under ``torch.compile(fullgraph=True)`` although the
    segment sizes are data-dependent.
    """
    if activation not in _ACTIVATIONS:
        raise _bad("activation", activation, f"one of {_ACTIVATIONS}", "grouped_mlp")
    return _grouped_mlp_op(buf.contiguous(), expert_offsets, w1, w2, activation)


class ExpertMLPs(nn.Module):
    """A bank of ``E`` expert MLPs (Megatron's ``GroupedMLP`` / ``SequentialMLP``).

    ``w1 [E, H, F']`` with ``F' = 2F`` for SwiGLU (``silu(x W_gate) * (x W_up)``,
    Megatron's ``--swiglu``) or ``F`` for GELU; ``w2 [E, F, H]``; no biases. Initialised
    uniform in ``±1/sqrt(fan_in)`` (``nn.Linear``'s bound).
    """

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        activation: str = "swiglu",
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise _bad("activation", activation, f"one of {_ACTIVATIONS}", "ExpertMLPs")
        for name, v in (
            ("num_experts", num_experts),
            ("hidden_size", hidden_size),
            ("ffn_hidden_size", ffn_hidden_size),
        ):
            if not _is_int(v) or v < 1:
                raise _bad(name, v, "a positive int", "ExpertMLPs")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(
                f"moe_router.ExpertMLPs: `dtype` must be a floating-point torch.dtype or None, got {dtype!r}"
            )
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.activation = activation
        f1 = 2 * ffn_hidden_size if activation == "swiglu" else ffn_hidden_size
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_size, f1, device=device, dtype=dtype))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden_size, hidden_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            b1 = 1.0 / math.sqrt(self.hidden_size)
            b2 = 1.0 / math.sqrt(self.ffn_hidden_size)
            self.w1.uniform_(-b1, b1)
            self.w2.uniform_(-b2, b2)

    def forward(self, buf: Tensor, expert_offsets: Tensor, capacity: Optional[int] = None) -> Tensor:
        """``buf [rows, H]`` expert-major → ``[rows, H]``.

        With ``capacity`` and ``rows == E * capacity`` (pad-to-capacity layout) one batched
        ``bmm`` per projection over ``[E, capacity, H]``; otherwise :func:`grouped_mlp`
        over the ``expert_offsets`` segments (compact / dropless layouts).
        """
        buf = buf.to(self.w1.dtype)
        E = self.num_experts
        if capacity is not None and buf.shape[0] == E * capacity:
            x = buf.reshape(E, capacity, self.hidden_size)
            h = _act_forward(torch.bmm(x, self.w1), self.activation)
            return torch.bmm(h, self.w2).reshape(E * capacity, self.hidden_size)
        return grouped_mlp(buf, expert_offsets, self.w1, self.w2, self.activation)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"ffn_hidden_size={self.ffn_hidden_size}, activation={self.activation!r}"
        )


# --------------------------------------------------------------------------------------
# MoE layer
# --------------------------------------------------------------------------------------


class MoELayer(nn.Module):
    """Router + dispatch + expert MLPs + combine (Megatron-Core's ``MoELayer``).

    ``out[t] = Σ_{kept j} w[t, j] · expert_{i[t, j]}(x[t])``: the router selects and
    weighs experts and builds the dispatch plan (capacity / dropless, drop policy,
    layout), :func:`moe_router.permute` gathers the hidden states expert-major, the
    experts run (batched ``bmm`` for pad-to-capacity, a per-expert loop over
    ``expert_offsets`` otherwise), and :func:`moe_router.unpermute` combines. A token
    with no kept assignment gets 0: add the residual outside, as in a transformer block.

    Args:
        hidden_size, ffn_hidden_size, num_experts, topk: sizes (Megatron's
            ``--hidden-size``, ``--moe-ffn-hidden-size``, ``--num-experts``,
            ``--moe-router-topk``).
        activation: ``"swiglu"`` or ``"gelu"``.
        router: a :class:`TopKRouter` to use instead of building one.
        **router_kwargs: passed to :class:`TopKRouter` (every gating, loss, capacity and
            randomness option).
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        num_experts: int,
        topk: int = 2,
        *,
        activation: str = "swiglu",
        router: Optional[TopKRouter] = None,
        device=None,
        dtype=None,
        **router_kwargs: Any,
    ) -> None:
        super().__init__()
        if router is None:
            router = TopKRouter(hidden_size, num_experts, topk, device=device, **router_kwargs)
        elif not isinstance(router, TopKRouter):
            raise TypeError(f"moe_router.MoELayer: `router` must be a TopKRouter or None, got {type(router).__name__}")
        elif router_kwargs:
            raise ValueError(
                f"moe_router.MoELayer: `router_kwargs` = {sorted(router_kwargs)} given together with `router`: "
                "pass one or the other"
            )
        if router.hidden_size != hidden_size or router.num_experts != num_experts:
            raise ValueError(
                f"moe_router.MoELayer: invalid `router`: it has hidden_size={router.hidden_size}, "
                f"num_experts={router.num_experts}; the layer has hidden_size={hidden_size}, num_experts={num_experts}"
            )
        if not router.build_dispatch:
            raise ValueError(
                "moe_router.MoELayer: the router was built with dispatch=False; MoELayer needs the dispatch plan"
            )
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.router = router
        self.experts = ExpertMLPs(num_experts, hidden_size, ffn_hidden_size, activation, device=device, dtype=dtype)

    @property
    def topk(self) -> int:
        return self.router.topk

    def forward(
        self,
        hidden_states: Tensor,
        *,
        padding_mask: Optional[Tensor] = None,
        replay_indices: Optional[Tensor] = None,
        record: Optional[bool] = None,
        seq_len: Optional[int] = None,
    ) -> Tuple[Tensor, RouterOutput]:
        """``hidden_states [..., hidden]`` → ``(output [..., hidden], RouterOutput)``.

        The output has the input's dtype. Keyword arguments go to :meth:`TopKRouter.forward`.
        """
        _check_hidden("MoELayer", hidden_states, self.hidden_size, self.router.gate.weight.device)
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, self.hidden_size)
        r = self.router(
            hidden_states, padding_mask=padding_mask, replay_indices=replay_indices, record=record, seq_len=seq_len
        )
        d = r.dispatch
        buf = F.permute(x, d.row_to_token, d.row)
        y = self.experts(buf, d.expert_offsets, r.capacity if r.layout == "pad_to_capacity" else None)
        out = F.unpermute(y, d.row, d.kept_weights)
        return out.to(hidden_states.dtype).reshape(shape), r
