"""Independent float64 references for the moe_router tests.

Written from docs/semantics.md with plain PyTorch (and a small NumPy Philox-4x32-10 for the
random streams); nothing here imports moe_router, so a test that compares an op with
these functions compares two independent implementations.
"""

from __future__ import annotations

import math

import numpy as np
import torch

F64 = torch.float64


# --------------------------------------------------------------------------------------
# Inputs


def tie_free_logits(t: int, e: int, *, seed: int, dtype=torch.float32, spread: float = 0.25) -> torch.Tensor:
    """[t, e] logits whose values within a row are a shuffled grid with step `spread`
    plus a small jitter: every pair of scores in a row differs by a margin far above f32
    (and bf16) rounding, so the selection is the same whatever the precision."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(e, generator=g).to(F64) for _ in range(t)]
    base = torch.stack(rows) if rows else torch.empty((0, e), dtype=F64)
    base = (base - e / 2) * spread + torch.rand((t, 1), generator=g, dtype=F64) * 0.5
    return base.to(dtype)


def randn(shape, *, seed: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * scale).to(dtype)


def stable_topk(q: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row, descending; ties: lower index first (a stable
    sort keeps the original order of equal keys)."""
    return torch.sort(q, dim=-1, descending=True, stable=True).indices[..., :k]


# --------------------------------------------------------------------------------------
# Top-k gating (docs/semantics.md §2 "Top-k gating")


def gating_weights(z, idx, *, score_function="softmax", pre_softmax=False, normalize=False, scaling_factor=1.0):
    """Weights of the experts `idx` [T, k] for logits `z` [T, E] (differentiable in z)."""
    idx = idx.long()
    if score_function == "softmax":
        if pre_softmax:
            w = torch.softmax(z, dim=-1).gather(1, idx)
        else:
            w = torch.softmax(z.gather(1, idx), dim=-1)
    else:
        w = torch.sigmoid(z).gather(1, idx)
    if normalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return w * scaling_factor


def selection_scores(z, *, score_function="softmax", pre_softmax=False, bias=None):
    z = z.to(F64)
    if score_function == "softmax":
        q = torch.softmax(z, dim=-1) if pre_softmax else z.clone()
    else:
        q = torch.sigmoid(z)
    if bias is not None:
        q = q + bias.to(F64)
    return q


def topk_gating(z, k, *, score_function="softmax", pre_softmax=False, normalize=False, bias=None,
                num_groups=None, group_topk=None, scaling_factor=1.0, masked=None):  # fmt: skip
    """(weights [T, k] f64, indices [T, k] int64) for logits z (any float dtype)."""
    z = z.to(F64)
    t, e = z.shape
    q = selection_scores(z, score_function=score_function, pre_softmax=pre_softmax, bias=bias)
    if masked is not None:
        q = q.masked_fill(masked, -math.inf)
    if num_groups is not None:
        per_group = e // num_groups
        qg = q.view(t, num_groups, per_group)
        group_score = torch.sort(qg, dim=-1, descending=True).values[..., : k // group_topk].sum(-1)
        keep = stable_topk(group_score, group_topk)
        eligible = torch.zeros((t, num_groups), dtype=torch.bool).scatter_(1, keep, True)
        q = q.masked_fill(~eligible.repeat_interleave(per_group, dim=1), -math.inf)
    idx = stable_topk(q, k)
    w = gating_weights(z, idx, score_function=score_function, pre_softmax=pre_softmax, normalize=normalize,
                       scaling_factor=scaling_factor)  # fmt: skip
    return w, idx


# --------------------------------------------------------------------------------------
# Losses


def aux_scores(z, score_function):
    if score_function == "softmax":
        return torch.softmax(z, dim=-1)
    s = torch.sigmoid(z)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def aux_loss(z, k, *, score_function="softmax", coeff=1.0, padding_mask=None, counts=None, total_tokens=None):
    """Switch/GShard loss in f64 (differentiable in z): coeff * E / (k T^2) * sum_e c_e sum_t P."""
    t, e = z.shape
    p = aux_scores(z, score_function)
    valid = torch.ones(t, dtype=torch.bool) if padding_mask is None else ~padding_mask
    if counts is None:
        idx = stable_topk(p.detach()[valid], k)
        counts = torch.zeros(e, dtype=F64).index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=F64))
    counts = counts.to(F64)
    n = int(valid.sum()) if total_tokens is None else total_tokens
    if n == 0:
        return (p * 0).sum()
    return coeff * e / (k * n * n) * (counts * p[valid].sum(0)).sum()


def hf_mixtral_load_balancing(z, k, attention_mask=None):
    """HF transformers' Mixtral `load_balancing_loss_func` for one layer, rewritten:
    E * sum_e mean_t(tokens_per_expert over the k one-hots) * mean_t(router_prob)."""
    t, e = z.shape
    probs = torch.softmax(z, dim=-1)
    _, selected = torch.topk(probs, k, dim=-1)
    expert_mask = torch.nn.functional.one_hot(selected, e).to(F64)  # [T, k, E]
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(dim=0)  # [k, E]
        router_prob_per_expert = probs.mean(dim=0)
    else:
        m = attention_mask.to(F64)
        tokens_per_expert = (expert_mask * m[:, None, None]).sum(0) / m.sum()
        router_prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return (tokens_per_expert * router_prob_per_expert.unsqueeze(0)).sum() * e


def seq_aux_loss(z, k, seq_len, *, score_function="softmax", coeff=1.0, padding_mask=None):
    t, e = z.shape
    b = t // seq_len
    losses = []
    for s in range(b):
        sl = slice(s * seq_len, (s + 1) * seq_len)
        m = None if padding_mask is None else padding_mask[sl]
        valid = seq_len if m is None else int((~m).sum())
        if valid == 0:
            continue
        losses.append(aux_loss(z[sl], k, score_function=score_function, coeff=coeff, padding_mask=m))
    if not losses:
        return (z * 0).sum()
    return torch.stack(losses).mean()


def z_loss(z, *, coeff=1.0, padding_mask=None):
    lse = torch.logsumexp(z, dim=-1)
    if padding_mask is not None:
        lse = lse[~padding_mask]
    if lse.numel() == 0:
        return (z * 0).sum()
    return coeff * (lse**2).mean()


# --------------------------------------------------------------------------------------
# Philox-4x32-10 (Salmon et al. SC'11; Random123's philox4x32_10) and the crate's stream
# layout (documented in src/philox.rs): key = [seed lo, seed hi], counter = [index lo,
# (index hi & 0xFFFFFF) | domain << 24, offset lo, offset hi].

_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = np.uint64(0xFFFFFFFF)
DOMAIN_SELECTION_NOISE, DOMAIN_RANDOM_DROP, DOMAIN_EXPERT_MASKING, DOMAIN_ASSIGNMENT_DROPOUT = 1, 2, 3, 4


def philox4x32_10(counter, key):
    """Vectorised over the leading axis: counter uint64 [n, 4] (32-bit values), key (k0, k1)."""
    c = [counter[:, i].astype(np.uint64) for i in range(4)]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for r in range(10):
        if r > 0:
            k0 = (k0 + np.uint64(_W0)) & _MASK
            k1 = (k1 + np.uint64(_W1)) & _MASK
        p0 = np.uint64(_M0) * c[0]
        p1 = np.uint64(_M1) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & _MASK
        hi1, lo1 = p1 >> np.uint64(32), p1 & _MASK
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return np.stack(c, axis=1)


def philox_uniform(seed: int, offset: int, domain: int, index: np.ndarray) -> np.ndarray:
    """Uniform in [0, 1) (top 24 bits of the first word) for each element index, float32."""
    index = np.asarray(index, dtype=np.uint64).reshape(-1)
    n = index.shape[0]
    counter = np.empty((n, 4), dtype=np.uint64)
    counter[:, 0] = index & _MASK
    counter[:, 1] = ((index >> np.uint64(32)) & np.uint64(0x00FFFFFF)) | np.uint64(domain << 24)
    counter[:, 2] = np.uint64(offset & 0xFFFFFFFF)
    counter[:, 3] = np.uint64(offset >> 32)
    x0 = philox4x32_10(counter, (seed & 0xFFFFFFFF, seed >> 32))[:, 0]
    return ((x0 >> np.uint64(8)).astype(np.float64) / 16777216.0).astype(np.float32)


def expert_mask(t: int, e: int, k: int, rate: float, seed: int, offset: int) -> torch.Tensor:
    """Expert masking (docs/semantics.md §9.1): candidate (t, e) masked when u < rate; if fewer than k remain,
    the masked candidates with the largest u (ties: lower expert) are unmasked."""
    u = philox_uniform(seed, offset, DOMAIN_EXPERT_MASKING, np.arange(t * e)).reshape(t, e)
    masked = u < np.float32(rate)
    for row in range(t):
        need = k - int((~masked[row]).sum())
        if need > 0:
            cand = [c for c in range(e) if masked[row, c]]
            cand.sort(key=lambda c: (-u[row, c], c))
            for c in cand[:need]:
                masked[row, c] = False
    return torch.from_numpy(masked)


def assignment_keep(indices: torch.Tensor, rate: float, seed: int, offset: int) -> torch.Tensor:
    """keep[t, j]: routed and u(t * k + j) >= rate."""
    t, k = indices.shape
    u = philox_uniform(seed, offset, DOMAIN_ASSIGNMENT_DROPOUT, np.arange(t * k)).reshape(t, k)
    return torch.from_numpy(u >= np.float32(rate)) & (indices >= 0)


def assignment_dropout_weights(w, indices, keep, renormalize: bool):
    """Output weights (differentiable in w): keep * w, and with renormalize the token's
    sum S over routed entries preserved for tokens that lost something."""
    routed = indices >= 0
    kept = torch.where(keep, w, torch.zeros_like(w))
    if not renormalize:
        return kept
    s = torch.where(routed, w, torch.zeros_like(w)).sum(-1, keepdim=True)
    s_keep = kept.sum(-1, keepdim=True)
    lost = (routed & ~keep).any(-1, keepdim=True)
    return torch.where(lost, kept * (s / (s_keep + 1e-20)), kept)


# --------------------------------------------------------------------------------------
# Statistics


def router_stats(z, indices, e, *, slot=None, padding_mask=None):
    z = z.to(F64)
    valid = torch.ones(z.shape[0], dtype=torch.bool) if padding_mask is None else ~padding_mask
    zi, ii = z[valid], indices[valid].long()
    sel = torch.zeros(e, dtype=torch.int64).index_add_(0, ii[ii >= 0], torch.ones_like(ii[ii >= 0]))
    out = {"num_tokens": int(valid.sum()), "selected_counts": sel}
    if slot is not None:
        sv = slot[valid].long()
        kept_mask = (sv >= 0) & (ii >= 0)
        out["kept_counts"] = torch.zeros(e, dtype=torch.int64).index_add_(
            0, ii[kept_mask], torch.ones_like(ii[kept_mask])
        )
        out["dropped"] = int(((sv < 0) & (ii >= 0)).sum())
    else:
        out["dropped"] = 0
    c = sel.to(F64)
    out["max_violation"] = float(c.max() / c.mean() - 1) if c.mean() > 0 else 0.0
    p = torch.softmax(zi, -1)
    ent = -(p * torch.log(p.clamp_min(1e-300))).sum(-1)
    lse = torch.logsumexp(zi, -1)
    out["mean_entropy"] = float(ent.mean()) if zi.shape[0] else 0.0
    out["mean_lse"] = float(lse.mean()) if zi.shape[0] else 0.0
    out["max_lse"] = float(lse.max()) if zi.shape[0] else 0.0
    out["nonfinite_logits"] = int((~torch.isfinite(zi)).sum())
    return out


def update_expert_bias(bias, counts, rate):
    c = counts.to(F64)
    return (bias.to(F64) + rate * torch.sign(c.mean() - c)).to(torch.float32)
