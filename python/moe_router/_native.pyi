"""Type stubs of moe_router._native, the PyO3 bindings of the moe-router Rust crate.

Internal: called by moe_router.ops with contiguous CPU tensors. Every tensor argument is
a ``(data_ptr, numel)`` pair (``Buf``); outputs are filled in place. ``dtype`` names the
element type of logits / hidden states: ``"f32"``, ``"f16"`` or ``"bf16"``. Index
buffers are int32, counts int64 (dispatch and expert-choice counts int32), weights
float32, masks torch.bool (one byte per element). Sizes are checked against every
``numel``; a wrong call raises ``ValueError`` (``TypeError`` for an unknown dtype),
never reads or writes out of bounds. The GIL is released while Rust runs.
"""

from typing import Optional, Tuple

Buf = Tuple[int, int]

__version__: str
CUDA: bool

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
