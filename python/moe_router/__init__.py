"""moe_router: Mixture-of-Experts routing ops for PyTorch.

Top-k gating (softmax / sigmoid, pre- or post-softmax, group-limited, expert bias,
noise, expert masking, routing replay), capacity and capacity-factor dispatch (five
drop policies, compact / padded / dropless layouts, expert-parallel row grouping),
expert-choice routing, permute / unpermute of hidden states, load-balance (Switch,
sequence-level, global-batch) and z losses, expert dropout, aux-loss-free bias updates
and router statistics. The computation is the `moe-router` Rust crate's exact CPU
reference; every op is a ``torch.library`` custom op (``torch.ops.moe_router.*``) with a
fake kernel and an autograd formula, so it works under ``torch.compile(fullgraph=True)``.

The public API is :mod:`moe_router.functional`, re-exported here; the ``nn.Module``
layers ``TopKRouter`` and ``MoELayer`` live in :mod:`moe_router.modules`.
"""

from . import _native
from . import ops  # noqa: F401  (registers the torch.ops.moe_router custom ops)
from .functional import (
    DROP_POLICIES,
    LAYOUTS,
    SCORE_FUNCTIONS,
    Dispatch,
    ExpertChoice,
    RouterStats,
    assignment_dropout,
    aux_loss,
    capacity,
    dispatch,
    dispatch_max_rows,
    expert_choice,
    expert_mask,
    global_aux_loss,
    permute,
    router_stats,
    seq_aux_loss,
    topk_gating,
    topk_gating_replay,
    unpermute,
    update_expert_bias,
    warmup,
    z_loss,
)

__version__ = _native.__version__

_MODULE_EXPORTS = ("TopKRouter", "MoELayer", "update_router_biases")


def __getattr__(name):
    # The nn.Modules are imported on first use, so that `import moe_router` stays light
    # and the functional API does not depend on them.
    if name in _MODULE_EXPORTS:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module 'moe_router' has no attribute {name!r}")


__all__ = [
    "Dispatch",
    "ExpertChoice",
    "RouterStats",
    "DROP_POLICIES",
    "LAYOUTS",
    "SCORE_FUNCTIONS",
    "assignment_dropout",
    "aux_loss",
    "capacity",
    "dispatch",
    "dispatch_max_rows",
    "expert_choice",
    "expert_mask",
    "global_aux_loss",
    "permute",
    "router_stats",
    "seq_aux_loss",
    "topk_gating",
    "topk_gating_replay",
    "unpermute",
    "update_expert_bias",
    "warmup",
    "z_loss",
    *_MODULE_EXPORTS,
]
