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
# --- Losses (one function per op for CPU and CUDA tensors; options are keywords) ---------
# Every tensor is contiguous and on one device; `logits` [T, E] float32 / float16 /
# bfloat16, `padding_mask` [T] bool or None. Outputs are 0-d / small tensors that the
# caller allocates on that device; both devices write them (no host read on CUDA).

def aux_loss(
    logits: Tensor, padding_mask: Optional[Tensor], counts: Optional[Tensor], total_tokens: Optional[Tensor],
    loss: Tensor, counts_out: Tensor, total_out: Tensor, *, topk: int, score_function: str = "softmax",
    coeff: float = 1.0,
) -> None:
    """Switch/GShard loss. ``counts`` [E] int64 (or None: the top-k counts of these logits) and
    ``total_tokens`` [] int64 (only with ``counts``); writes ``loss`` [] float32,
    ``counts_out`` [E] int64 (the counts used), ``total_out`` [] int64 (the T_total used)."""
def aux_loss_backward(
    logits: Tensor, padding_mask: Optional[Tensor], counts: Tensor, total_tokens: Tensor, grad_loss: Tensor,
    grad_logits: Tensor, *, topk: int, score_function: str = "softmax", coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] (dtype of logits) for ``grad_loss`` [] float32, with the forward's
    ``counts_out`` and ``total_out``."""
def seq_aux_loss(
    logits: Tensor, padding_mask: Optional[Tensor], loss: Tensor, counts_out: Tensor, valid_tokens: Tensor, *,
    seq_len: int, topk: int, score_function: str = "softmax", coeff: float = 1.0,
) -> None:
    """Sequence-level loss of [B * seq_len, E] logits: ``loss`` [] float32, ``counts_out`` [B, E]
    int64, ``valid_tokens`` [B] int64."""
def seq_aux_loss_backward(
    logits: Tensor, padding_mask: Optional[Tensor], counts: Tensor, valid_tokens: Tensor, grad_loss: Tensor,
    grad_logits: Tensor, *, seq_len: int, topk: int, score_function: str = "softmax", coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] with the forward's ``counts_out`` and ``valid_tokens`` (checked
    against ``padding_mask`` on CPU)."""
def z_loss(
    logits: Tensor, padding_mask: Optional[Tensor], loss: Tensor, valid_tokens: Tensor, *, coeff: float = 1.0
) -> None:
    """Router z-loss: ``loss`` [] float32, ``valid_tokens`` [] int64."""
def z_loss_backward(
    logits: Tensor, padding_mask: Optional[Tensor], valid_tokens: Tensor, grad_loss: Tensor, grad_logits: Tensor, *,
    coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] for ``grad_loss`` [] float32, with the forward's ``valid_tokens``
    (checked against ``padding_mask`` on CPU)."""

def expert_mask(num_tokens: int, num_experts: int, topk: int, rate: float, seed: int, offset: int, masked: Buf) -> None: ...
def assignment_dropout(
    indices: Buf, weights: Buf, num_tokens: int, topk: int, num_experts: int, rate: float, seed: int, offset: int,
    renormalize: bool, out_indices: Buf, out_weights: Buf, keep: Buf,
) -> int:
    """Returns the number of routed assignments dropped."""
def assignment_dropout_backward(
    indices: Buf, weights: Buf, keep: Buf, num_tokens: int, topk: int, renormalize: bool, grad_out: Buf,
    grad_weights: Buf,
) -> None: ...
def update_expert_bias(bias: Buf, counts: Buf, rate: float) -> None: ...
def router_stats(
    dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int, slots: Optional[Buf],
    padding_mask: Optional[Buf], strict: bool, selected_counts_out: Buf, kept_counts_out: Optional[Buf],
) -> Tuple[int, int, float, float, float, float, int]:
    """Returns (num_tokens, dropped, max_violation, mean_entropy, mean_lse, max_lse, nonfinite_logits)."""

# --- CUDA (feature `cuda`) -------------------------------------------------------------

def cuda_device_count() -> int:
    """CUDA devices the driver reports; 0 without libcuda (never raises)."""
def router_stats_workspace_len(num_tokens: int) -> int:
    """f64 elements of the router-statistics workspace."""
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
def cuda_expert_mask(
    device: int, stream: int, num_tokens: int, num_experts: int, topk: int, rate: float, seed: int, offset: int,
    masked: Buf,
) -> None: ...
def cuda_assignment_dropout(
    device: int, stream: int, indices: Buf, weights: Buf, num_tokens: int, topk: int, num_experts: int, rate: float,
    seed: int, offset: int, renormalize: bool, out_indices: Buf, out_weights: Buf, keep: Buf, dropped: Buf,
) -> None: ...
def cuda_assignment_dropout_backward(
    device: int, stream: int, indices: Buf, weights: Buf, keep: Buf, num_tokens: int, topk: int, renormalize: bool,
    grad_out: Buf, grad_weights: Buf,
) -> None: ...
def cuda_update_expert_bias(device: int, stream: int, bias: Buf, counts: Buf, rate: float) -> None: ...
def cuda_router_stats(
    device: int, stream: int, dtype: str, logits: Buf, num_tokens: int, num_experts: int, indices: Buf, topk: int,
    slots: Optional[Buf], padding_mask: Optional[Buf], selected_counts: Buf, kept_counts: Buf, scalars: Buf,
    floats: Buf, workspace: Buf,
) -> None:
    """scalars = (valid tokens, dropped, non-finite logits, sum selected); no strict mode."""
