"""Type stubs of moe_router._native, the PyO3 bindings of the moe-router Rust crate.

Internal: called by moe_router.ops. Every function takes ``torch.Tensor`` arguments (the
inputs, then the outputs it fills) and keyword options. It reads each tensor's shape,
strides, dtype and device itself (DLPack) and checks them against the op's main inputs
before touching any memory: every tensor C-contiguous, of the dtype and exact shape the
op needs, all on one device, no output overlapping another tensor. A wrong call raises
``TypeError`` (not a tensor, wrong dtype, unknown or missing option) or ``ValueError``
(shapes, values, devices), with a message starting ``moe_router.<op>:``; no call can read
or write memory its tensors do not own. CPU tensors run the Rust reference with the GIL
released; CUDA tensors run the kernels on torch's current stream of their device, with no
host synchronisation (workspaces come from torch's allocator). Dtypes: logits / hidden
states float32, float16 or bfloat16; indices int32; weights float32; masks torch.bool.
"""

from typing import Dict, Optional, Tuple

from torch import Tensor

Buf = Tuple[int, int]

__version__: str
DROP_POLICIES: tuple
LAYOUTS: tuple

def cuda_device_count() -> int:
    """CUDA devices the driver reports; 0 without libcuda (never raises)."""
def _emulate_cuda_on_cpu(on: bool) -> None:
    """Tests only: CPU tensors take the CUDA branch; refused unless device 0 is the CPU emulator."""
def _cuda_calls() -> Dict[str, int]:
    """CUDA-branch calls per op since the process started."""
def topk_gating(
    logits: Tensor, expert_bias: Optional[Tensor], weights: Tensor, indices: Tensor, *, topk: int,
    score_function: str = "softmax", pre_softmax: bool = False, normalize: bool = False,
    num_groups: Optional[int] = None, group_topk: Optional[int] = None, scaling_factor: float = 1.0,
    noise_std: float = 0.0, expert_mask_rate: float = 0.0, seed: int = 0, offset: int = 0,
) -> None: ...
def topk_gating_replay(
    logits: Tensor, indices: Tensor, weights: Tensor, *, score_function: str = "softmax", pre_softmax: bool = False,
    normalize: bool = False, scaling_factor: float = 1.0,
) -> None: ...
def topk_gating_backward(
    logits: Tensor, indices: Tensor, grad_weights: Tensor, grad_logits: Tensor, *, score_function: str = "softmax",
    pre_softmax: bool = False, normalize: bool = False, scaling_factor: float = 1.0,
) -> None: ...
def capacity(
    num_tokens: int, num_experts: int, topk: int, capacity_factor: float, min_capacity: int = 0,
    capacity_multiple: Optional[int] = None,
) -> int: ...
def dispatch_max_rows(
    num_tokens: int, topk: int, *, num_experts: int, capacity: Optional[int] = None, drop_policy: Optional[str] = None,
    layout: str = "compact", align: int = 1, renormalize: bool = False, ep_size: int = 1, seed: int = 0,
    offset: int = 0,
) -> int: ...
def dispatch(
    indices: Tensor, weights: Tensor, slot: Tensor, row: Tensor, kept_weights: Tensor, tokens_per_expert: Tensor,
    row_to_token: Tensor, expert_offsets: Tensor, rows_per_rank: Tensor, counts: Tensor, *, num_experts: int,
    capacity: Optional[int] = None, drop_policy: Optional[str] = None, layout: str = "compact", align: int = 1,
    renormalize: bool = False, ep_size: int = 1, seed: int = 0, offset: int = 0,
) -> None:
    """``counts`` [2] int64 = (num_rows, dropped)."""
def expert_choice_num_rows(num_tokens: int, num_experts: int, capacity: int) -> int:
    """``num_experts * capacity``, validated as ``expert_choice`` (call before allocating)."""
def expert_choice(
    logits: Tensor, weights: Tensor, row: Tensor, row_to_token: Tensor, row_weights: Tensor,
    tokens_per_expert: Tensor, expert_offsets: Tensor,
) -> None: ...
def expert_choice_backward(logits: Tensor, row: Tensor, grad_weights: Tensor, grad_logits: Tensor) -> None: ...
def permute(x: Tensor, row_to_token: Tensor, out: Tensor) -> None: ...
def permute_backward(grad_buf: Tensor, row: Tensor, grad_x: Tensor) -> None: ...
def unpermute(y: Tensor, row: Tensor, weights: Tensor, out: Tensor) -> None: ...
def unpermute_backward(
    grad_out: Tensor, y: Tensor, row: Tensor, weights: Tensor, grad_y: Tensor, grad_weights: Tensor
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

def expert_mask_len(num_tokens: int, num_experts: int, *, topk: int, rate: float, seed: int, offset: int) -> int:
    """Elements of ``masked``, validated as ``expert_mask`` (call before allocating)."""
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

