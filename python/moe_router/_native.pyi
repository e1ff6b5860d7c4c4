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

from typing import Dict, Optional

from torch import Tensor

__version__: str
SCORE_FUNCTIONS: tuple
DROP_POLICIES: tuple
LAYOUTS: tuple

def cuda_device_count() -> int:
    """CUDA devices the driver reports; 0 without libcuda (never raises)."""

def cuda_warmup(device: int) -> int:
    """Create device ``device``'s backend and compile / load every kernel module now; returns the module count."""

def _emulate_cuda_on_cpu(on: bool) -> None:
    """Tests only: CPU tensors take the CUDA branch; refused unless device 0 is the CPU emulator."""

def _cuda_calls() -> Dict[str, int]:
    """CUDA-branch calls per op since the process started."""

def topk_gating(
    logits: Tensor,
    expert_bias: Optional[Tensor],
    weights: Tensor,
    indices: Tensor,
    *,
    topk: int,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    normalize: bool = False,
    num_groups: Optional[int] = None,
    group_topk: Optional[int] = None,
    scaling_factor: float = 1.0,
    noise_std: float = 0.0,
    expert_mask_rate: float = 0.0,
    seed: int = 0,
    offset: int = 0,
) -> None: ...
def topk_gating_replay(
    logits: Tensor,
    indices: Tensor,
    weights: Tensor,
    *,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    normalize: bool = False,
    scaling_factor: float = 1.0,
) -> None: ...
def topk_gating_backward(
    logits: Tensor,
    indices: Tensor,
    grad_weights: Tensor,
    grad_logits: Tensor,
    *,
    score_function: str = "softmax",
    pre_softmax: bool = False,
    normalize: bool = False,
    scaling_factor: float = 1.0,
) -> None: ...
def capacity(
    num_tokens: int,
    num_experts: int,
    topk: int,
    capacity_factor: float,
    min_capacity: int = 0,
    capacity_multiple: Optional[int] = None,
) -> int: ...
def dispatch_max_rows(
    num_tokens: int,
    topk: int,
    *,
    num_experts: int,
    capacity: Optional[int] = None,
    drop_policy: Optional[str] = None,
    layout: str = "compact",
    align: int = 1,
    renormalize: bool = False,
    ep_size: int = 1,
    seed: int = 0,
    offset: int = 0,
) -> int: ...
def dispatch(
    indices: Tensor,
    weights: Tensor,
    slot: Tensor,
    row: Tensor,
    kept_weights: Tensor,
    tokens_per_expert: Tensor,
    row_to_token: Tensor,
    expert_offsets: Tensor,
    rows_per_rank: Tensor,
    counts: Tensor,
    *,
    num_experts: int,
    capacity: Optional[int] = None,
    drop_policy: Optional[str] = None,
    layout: str = "compact",
    align: int = 1,
    renormalize: bool = False,
    ep_size: int = 1,
    seed: int = 0,
    offset: int = 0,
) -> None:
    """``counts`` [2] int64 = (num_rows, dropped)."""

def expert_choice_num_rows(num_tokens: int, num_experts: int, capacity: int) -> int:
    """``num_experts * capacity``, validated as ``expert_choice`` (call before allocating)."""

def expert_choice(
    logits: Tensor,
    weights: Tensor,
    row: Tensor,
    row_to_token: Tensor,
    row_weights: Tensor,
    tokens_per_expert: Tensor,
    expert_offsets: Tensor,
) -> None: ...
def expert_choice_backward(logits: Tensor, row: Tensor, grad_weights: Tensor, grad_logits: Tensor) -> None: ...
def permute(x: Tensor, row_to_token: Tensor, out: Tensor) -> None: ...
def permute_backward(grad_buf: Tensor, row: Tensor, grad_x: Tensor) -> None: ...
def unpermute(y: Tensor, row: Tensor, weights: Tensor, out: Tensor) -> None: ...
def unpermute_backward(
    grad_out: Tensor, y: Tensor, row: Tensor, weights: Tensor, grad_y: Tensor, grad_weights: Tensor
) -> None: ...

# --- Losses (one function per op for CPU and CUDA tensors; options are keywords) ---------
# Every tensor is contiguous and on one device; `logits` [T, E] float32 / float16 /
# bfloat16, `padding_mask` [T] bool or None. Outputs are 0-d / small tensors that the
# caller allocates on that device; both devices write them (no host read on CUDA).

def aux_loss(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Optional[Tensor],
    total_tokens: Optional[Tensor],
    loss: Tensor,
    counts_out: Tensor,
    total_out: Tensor,
    *,
    topk: int,
    score_function: str = "softmax",
    coeff: float = 1.0,
) -> None:
    """Switch/GShard loss. ``counts`` [E] int64 (or None: the top-k counts of these logits) and
    ``total_tokens`` [] int64 (only with ``counts``); writes ``loss`` [] float32,
    ``counts_out`` [E] int64 (the counts used), ``total_out`` [] int64 (the T_total used)."""

def aux_loss_backward(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Tensor,
    total_tokens: Tensor,
    grad_loss: Tensor,
    grad_logits: Tensor,
    *,
    topk: int,
    score_function: str = "softmax",
    coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] (dtype of logits) for ``grad_loss`` [] float32, with the forward's
    ``counts_out`` and ``total_out``."""

def seq_aux_loss(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    loss: Tensor,
    counts_out: Tensor,
    valid_tokens: Tensor,
    *,
    seq_len: int,
    topk: int,
    score_function: str = "softmax",
    coeff: float = 1.0,
) -> None:
    """Sequence-level loss of [B * seq_len, E] logits: ``loss`` [] float32, ``counts_out`` [B, E]
    int64, ``valid_tokens`` [B] int64."""

def seq_aux_loss_backward(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    counts: Tensor,
    valid_tokens: Tensor,
    grad_loss: Tensor,
    grad_logits: Tensor,
    *,
    seq_len: int,
    topk: int,
    score_function: str = "softmax",
    coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] with the forward's ``counts_out`` and ``valid_tokens`` (checked
    against ``padding_mask`` on CPU)."""

def z_loss(
    logits: Tensor, padding_mask: Optional[Tensor], loss: Tensor, valid_tokens: Tensor, *, coeff: float = 1.0
) -> None:
    """Router z-loss: ``loss`` [] float32, ``valid_tokens`` [] int64."""

def z_loss_backward(
    logits: Tensor,
    padding_mask: Optional[Tensor],
    valid_tokens: Tensor,
    grad_loss: Tensor,
    grad_logits: Tensor,
    *,
    coeff: float = 1.0,
) -> None:
    """``grad_logits`` [T, E] for ``grad_loss`` [] float32, with the forward's ``valid_tokens``
    (checked against ``padding_mask`` on CPU)."""

def expert_mask_len(num_tokens: int, num_experts: int, *, topk: int, rate: float, seed: int, offset: int) -> int:
    """Elements of ``masked``, validated as ``expert_mask`` (call before allocating)."""

def expert_mask(masked: Tensor, *, topk: int, rate: float, seed: int, offset: int) -> None:
    """Fills ``masked`` ``[num_tokens, num_experts]`` bool (True = masked); seed / offset in [0, 2**64)."""

def assignment_dropout(
    indices: Tensor,
    weights: Tensor,
    out_indices: Tensor,
    out_weights: Tensor,
    keep: Tensor,
    dropped: Tensor,
    *,
    num_experts: int,
    rate: float,
    seed: int,
    offset: int,
    renormalize: bool,
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
    logits: Tensor,
    indices: Tensor,
    selected_counts: Tensor,
    kept_counts: Tensor,
    scalars: Tensor,
    floats: Tensor,
    *,
    slot: Optional[Tensor] = None,
    padding_mask: Optional[Tensor] = None,
    strict: bool,
) -> None:
    """``logits`` ``[T, E]`` float32 / float16 / bfloat16, ``indices`` / ``slot`` ``[T, k]`` int32,
    ``padding_mask`` ``[T]`` bool → ``selected_counts`` / ``kept_counts`` ``[E]`` int64 (kept zeros without
    slots), ``scalars`` ``[4]`` int64 = (valid tokens, dropped, non-finite logits, sum selected), ``floats``
    ``[4]`` float32 = (max_violation, mean_entropy, mean_lse, max_lse). ``strict``: ``ValueError`` on
    non-finite logits of valid tokens (on CUDA after one host read of the count)."""
