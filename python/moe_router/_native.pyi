"""Type stubs of moe_router._native, the PyO3 bindings of the moe-router Rust crate.

Internal: called by moe_router.ops with contiguous CPU tensors. Every tensor argument is
a ``(data_ptr, numel)`` pair (``Buf``); outputs are filled in place. ``dtype`` names the
element type of logits / hidden states: ``"f32"``, ``"f16"`` or ``"bf16"``. Index
buffers are int32, counts int64 (dispatch and expert-choice counts int32), weights
float32, masks torch.bool (one byte per element). Sizes are checked against every
``numel``; a wrong call raises ``ValueError`` (``TypeError`` for an unknown dtype),
never reads or writes out of bounds. The GIL is released while Rust runs.

CUDA (``has_cuda()``: the ``cuda`` feature, on in the default build): the ``cuda_*``
functions take the same ``(data_ptr, numel)`` pairs, here device addresses of contiguous
CUDA tensors, plus ``device`` (the CUDA ordinal) and ``stream``
(``torch.cuda.current_stream(device).cuda_stream``) first. They check every size, option
and address (non-null, aligned, outputs disjoint) before touching a device (``ValueError``),
then launch on that stream without synchronising; a missing driver / device / NVRTC is a
``RuntimeError``. Scalar results (losses, counts) are written to 1-element device buffers.
Workspaces are caller-allocated, sized by the ``*_workspace_len`` functions.
"""

from typing import Optional, Tuple

from torch import Tensor

Buf = Tuple[int, int]

__version__: str
CUDA: bool

def has_cuda() -> bool:
    """Whether the CUDA bindings (``cuda_*``) are compiled in; says nothing about a device."""

def topk_gating(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, expert_bias: Optional[Buf], topk: int,
    score_function: str, pre_softmax: bool, normalize: bool, num_groups: Optional[int], group_topk: Optional[int],
    scaling_factor: float, noise_std: float, expert_mask_rate: float, seed: int, offset: int, weights: Buf,
    indices: Buf,
) -> None: ...
def topk_gating_replay(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int, score_function: str,
    pre_softmax: bool, normalize: bool, scaling_factor: float, weights: Buf,
) -> None: ...
def topk_gating_backward(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int, grad_weights: Buf,
    score_function: str, pre_softmax: bool, normalize: bool, scaling_factor: float, grad_logits: Buf,
) -> None: ...
def capacity(
    num_tokens: int, num_experts: int, topk: int, capacity_factor: float, min_capacity: int = 0,
    capacity_multiple: Optional[int] = None,
) -> int: ...
def dispatch_max_rows(
    num_tokens: int, topk: int, num_experts: int, capacity: Optional[int], drop_policy: str, layout: str, align: int,
    renormalize: bool, ep_size: int, seed: int, offset: int,
) -> int: ...
def dispatch(
    indices: Buf, weights: Buf, num_tokens: int, topk: int, num_experts: int, capacity: Optional[int],
    drop_policy: str, layout: str, align: int, renormalize: bool, ep_size: int, seed: int, offset: int, slot: Buf,
    row: Buf, kept_weights: Buf, tokens_per_expert: Buf, row_to_token: Buf, expert_offsets: Buf, rows_per_rank: Buf,
) -> Tuple[int, int]:
    """Returns (num_rows, dropped)."""
def expert_choice(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, capacity: int, weights: Buf, row: Buf,
    row_to_token: Buf, row_weights: Buf, tokens_per_expert: Buf, expert_offsets: Buf,
) -> None: ...
def expert_choice_backward(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, row: Buf, grad_weights: Buf, grad_logits: Buf
) -> None: ...
def permute(dtype: str, x: Buf, num_tokens: int, hidden: int, row_to_token: Buf, out: Buf) -> None: ...
def permute_backward(
    dtype: str, grad_buf: Buf, num_rows: int, hidden: int, row: Buf, num_tokens: int, topk: int, grad_x: Buf
) -> None: ...
def unpermute(
    dtype: str, y: Buf, num_rows: int, hidden: int, row: Buf, weights: Buf, num_tokens: int, topk: int, out: Buf
) -> None: ...
def unpermute_backward(
    dtype: str, grad_out: Buf, y: Buf, num_rows: int, hidden: int, row: Buf, weights: Buf, num_tokens: int,
    topk: int, grad_y: Buf, grad_weights: Buf,
) -> None: ...
def aux_loss(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, padding_mask: Optional[Buf], counts: Optional[Buf],
    total_tokens: Optional[int], topk: int, score_function: str, coeff: float, counts_out: Buf,
) -> Tuple[float, int]:
    """Returns (loss, total_tokens)."""
def aux_loss_backward(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, padding_mask: Optional[Buf], counts: Buf,
    total_tokens: int, topk: int, score_function: str, coeff: float, grad_loss: float, grad_logits: Buf,
) -> None: ...
def seq_aux_loss(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, seq_len: int, padding_mask: Optional[Buf], topk: int,
    score_function: str, coeff: float, counts_out: Buf,
) -> float: ...
def seq_aux_loss_backward(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, seq_len: int, padding_mask: Optional[Buf],
    counts: Buf, topk: int, score_function: str, coeff: float, grad_loss: float, grad_logits: Buf,
) -> None: ...
def z_loss(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, padding_mask: Optional[Buf], coeff: float
) -> Tuple[float, int]:
    """Returns (loss, valid_tokens)."""
def z_loss_backward(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, padding_mask: Optional[Buf], coeff: float,
    grad_loss: float, grad_logits: Buf,
) -> None: ...
# --- Tensor bindings: one function per op for CPU and CUDA tensors -------------------
# Tensors in (inputs, then the outputs the call fills), options as keyword arguments.
# Each tensor's dtype, shape, contiguity and device are read through DLPack and checked
# (``TypeError`` for a dtype, ``ValueError`` for a shape / device mix / overlapping
# output); CPU tensors run the Rust reference, CUDA tensors the kernels on torch's
# current stream of their device, without a host synchronisation.

def expert_mask(masked: Tensor, *, topk: int, rate: float, seed: int, offset: int) -> None:
    """Fills ``masked`` ``[num_tokens, num_experts]`` bool (True = masked); seed / offset in [0, 2**64)."""
def assignment_dropout(
    indices: Tensor, weights: Tensor, out_indices: Tensor, out_weights: Tensor, keep: Tensor, dropped: Tensor, *,
    num_experts: int, rate: float, seed: int, offset: int, renormalize: bool,
) -> None:
    """``indices`` int32 / ``weights`` float32 ``[T, k]`` → ``out_indices`` int32, ``out_weights`` float32,
    ``keep`` bool ``[T, k]`` and ``dropped`` (0-d int64: routed assignments dropped)."""
def assignment_dropout_backward(
    indices: Tensor, weights: Tensor, keep: Tensor, grad_out: Tensor, grad_weights: Tensor, *, renormalize: bool
) -> None:
    """``grad_weights`` float32 ``[T, k]`` from the forward's inputs, its ``keep`` and ``grad_out`` float32."""
def update_expert_bias(bias: Tensor, counts: Tensor, *, rate: float) -> None:
    """``bias`` ``[E]`` float32 (contiguous) updated in place from ``counts`` ``[E]`` int64."""
def router_stats(
    logits: Tensor, indices: Tensor, selected_counts: Tensor, kept_counts: Tensor, scalars: Tensor, floats: Tensor, *,
    slots: Optional[Tensor] = None, padding_mask: Optional[Tensor] = None, strict: bool,
) -> None:
    """``logits`` ``[T, E]`` float32 / float16 / bfloat16, ``indices`` / ``slots`` ``[T, k]`` int32,
    ``padding_mask`` ``[T]`` bool → ``selected_counts`` / ``kept_counts`` ``[E]`` int64 (kept zeros without
    slots), ``scalars`` ``[4]`` int64 = (valid tokens, dropped, non-finite logits, sum selected), ``floats``
    ``[4]`` float32 = (max_violation, mean_entropy, mean_lse, max_lse). ``strict``: ``ValueError`` on
    non-finite logits of valid tokens (on CUDA after one host read of the count)."""

# --- CUDA (feature `cuda`) -------------------------------------------------------------

def cuda_device_count() -> int:
    """CUDA devices the driver reports; 0 without libcuda (never raises)."""
def losses_workspace_len(num_tokens: int, num_experts: int, seq_len: Optional[int] = None) -> int:
    """f64 elements of the loss forward workspace (aux / z: ``seq_len=None``)."""
def aux_loss_backward_workspace_len(num_tokens: int, num_experts: int, seq_len: Optional[int] = None) -> int:
    """f32 elements of the aux-loss backward workspace."""
def unpermute_backward_workspace_len(num_rows: int) -> int:
    """i32 elements of the unpermute-backward workspace."""
def cuda_topk_gating(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, expert_bias: Optional[Buf],
    topk: int, score_function: str, pre_softmax: bool, normalize: bool, num_groups: Optional[int],
    group_topk: Optional[int], scaling_factor: float, noise_std: float, expert_mask_rate: float, seed: int,
    offset: int, weights: Buf, indices: Buf,
) -> None: ...
def cuda_topk_gating_replay(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int,
    score_function: str, pre_softmax: bool, normalize: bool, scaling_factor: float, weights: Buf,
) -> None: ...
def cuda_topk_gating_backward(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int,
    grad_weights: Buf, score_function: str, pre_softmax: bool, normalize: bool, scaling_factor: float,
    grad_logits: Buf,
) -> None: ...
def cuda_dispatch_workspace_len(
    num_tokens: int, topk: int, num_experts: int, capacity: Optional[int], drop_policy: str, layout: str, align: int,
    renormalize: bool, ep_size: int, seed: int, offset: int,
) -> int:
    """i32 elements of the ``cuda_dispatch`` workspace (options as ``dispatch_max_rows``)."""
def cuda_dispatch(
    device: int, stream: int, indices: Buf, weights: Buf, num_tokens: int, topk: int, num_experts: int,
    capacity: Optional[int], drop_policy: str, layout: str, align: int, renormalize: bool, ep_size: int, seed: int,
    offset: int, slot: Buf, row: Buf, kept_weights: Buf, tokens_per_expert: Buf, row_to_token: Buf,
    expert_offsets: Buf, rows_per_rank: Buf, counts: Buf, workspace: Buf,
) -> None:
    """``counts`` [2] int64 = (num_rows, dropped), written on the device; ``indices`` values are not checked."""
def cuda_expert_choice(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, capacity: int,
    weights: Buf, row: Buf, row_to_token: Buf, row_weights: Buf, tokens_per_expert: Buf, expert_offsets: Buf,
) -> None: ...
def cuda_expert_choice_backward(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, row: Buf,
    grad_weights: Buf, grad_logits: Buf,
) -> None: ...
def cuda_permute(
    device: int, stream: int, dtype: str, x: Buf, num_tokens: int, hidden: int, row_to_token: Buf, out: Buf
) -> None: ...
def cuda_permute_backward(
    device: int, stream: int, dtype: str, grad_buf: Buf, num_rows: int, hidden: int, row: Buf, num_tokens: int,
    topk: int, grad_x: Buf,
) -> None: ...
def cuda_unpermute(
    device: int, stream: int, dtype: str, y: Buf, num_rows: int, hidden: int, row: Buf, weights: Buf,
    num_tokens: int, topk: int, out: Buf,
) -> None: ...
def cuda_unpermute_backward(
    device: int, stream: int, dtype: str, grad_out: Buf, y: Buf, num_rows: int, hidden: int, row: Buf, weights: Buf,
    num_tokens: int, topk: int, grad_y: Buf, grad_weights: Buf, workspace: Buf,
) -> None: ...
def cuda_aux_loss(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int,
    padding_mask: Optional[Buf], counts: Optional[Buf], total_tokens: Optional[int], topk: int, score_function: str,
    coeff: float, loss: Buf, counts_out: Buf, scores_sum: Buf, total_out: Buf, workspace: Buf,
) -> None: ...
def cuda_aux_loss_backward(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int,
    padding_mask: Optional[Buf], counts: Buf, total_tokens: Buf, topk: int, score_function: str, coeff: float,
    grad_loss: Buf, workspace: Buf, grad_logits: Buf,
) -> None: ...
def cuda_seq_aux_loss(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, seq_len: int,
    padding_mask: Optional[Buf], topk: int, score_function: str, coeff: float, loss: Buf, counts_out: Buf,
    scores_sum: Buf, valid_out: Buf, workspace: Buf,
) -> None: ...
def cuda_seq_aux_loss_backward(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, seq_len: int,
    padding_mask: Optional[Buf], counts: Buf, valid_tokens: Buf, topk: int, score_function: str, coeff: float,
    grad_loss: Buf, workspace: Buf, grad_logits: Buf,
) -> None: ...
def cuda_z_loss(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int,
    padding_mask: Optional[Buf], coeff: float, loss: Buf, valid_tokens: Buf, workspace: Buf,
) -> None: ...
def cuda_z_loss_backward(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int,
    padding_mask: Optional[Buf], valid_tokens: Buf, coeff: float, grad_loss: Buf, grad_logits: Buf,
) -> None: ...
