"""Equipartition Sinkhorn-Knopp in the log domain, optionally for many independent groups at once.

The reference (GMMSeg's ``distributed_sinkhorn_wograd``) works on ``Q = exp(logits / eps).T``: it
normalises the total, then alternates "each component row sums to 1/K" and "each sample column sums to
1/N", and finally multiplies by N so every sample's assignment sums to 1. Every one of these steps is a
division by a positive per-row, per-column or global constant; in the log domain they become subtractions
of log-sum-exps. The global normalisation and the 1/K, 1/N factors only shift all entries by a constant
that the following normalisation removes again, so they do not change the result and are skipped here.

``groups`` runs one Sinkhorn problem per group (e.g. per class, as the E-step of GMMSeg does) in one
vectorised pass: the per-component normalisation becomes a segmented log-sum-exp over the samples of
each group (scatter-amax + index-add); the per-sample normalisation is a plain row log-sum-exp.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .precision import float32_region

__all__ = ["sinkhorn", "normalize_by_max_abs"]


def _float_dtype(t: Tensor) -> torch.dtype:
    if t.dtype.is_floating_point and torch.finfo(t.dtype).bits >= 32:
        return t.dtype
    return torch.float32


def _num_groups(groups: Tensor, num_groups: int | None) -> int:
    if num_groups is not None:
        return num_groups
    return int(groups.max().item()) + 1 if groups.numel() > 0 else 0


def _segment_logsumexp(z: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """``out[g, k] = logsumexp(z[groups == g, k])`` for ``z`` (N, K); ``-inf`` for empty groups."""
    k = z.shape[1]
    index = groups[:, None].expand(-1, k)
    gmax = z.new_full((num_groups, k), float("-inf")).scatter_reduce_(0, index, z, "amax")
    shifted = (z - gmax[groups]).exp_()
    total = z.new_zeros((num_groups, k)).index_add_(0, groups, shifted)
    return gmax + total.log()


@float32_region
def normalize_by_max_abs(
    logits: Tensor, groups: Tensor | None = None, num_groups: int | None = None
) -> Tensor:
    """Divide ``logits`` (N, K) by their largest absolute value (per group if ``groups`` is given).

    This is what GMMSeg does to each class's log-likelihoods before Sinkhorn: it maps them to [-1, 1] so
    that ``epsilon`` has a scale-free meaning. Groups whose values are all zero are left unchanged.
    """
    dtype = _float_dtype(logits)
    logits = logits.to(dtype)
    if logits.numel() == 0:
        return logits.clone()
    row_max = logits.abs().amax(dim=1)
    if groups is None:
        scale = row_max.max()
        return logits / torch.where(scale > 0, scale, torch.ones_like(scale))
    g = _num_groups(groups, num_groups)
    scale = row_max.new_zeros(g).scatter_reduce_(0, groups, row_max, "amax")[groups]
    return logits / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]


@float32_region
def sinkhorn(
    logits: Tensor,
    epsilon: float = 0.05,
    n_iters: int = 3,
    *,
    groups: Tensor | None = None,
    num_groups: int | None = None,
    normalize: bool = False,
) -> Tensor:
    """Equipartition assignment ``(N, K)``: rows sum to 1 and, after convergence, columns to ``N / K``.

    Args:
        logits: ``(N, K)`` scores (e.g. component log-likelihoods of one class's pixels).
        epsilon: entropic temperature; ``exp(logits / epsilon)`` is the initial transport kernel.
        n_iters: number of (component, sample) normalisation rounds (the reference uses 3).
        groups: optional ``(N,)`` group ids in ``[0, num_groups)``; every group is an independent problem
            whose samples share out the K components equally (columns sum to ``N_g / K`` per group).
        num_groups: number of groups (avoids a device sync to find it).
        normalize: divide the logits by their max absolute value (per group) first, as GMMSeg does.

    Returns the soft assignment in the logits' dtype (float32 for half inputs); finite for any finite
    input (the logits are clipped to ``+-finfo.max * epsilon / 8``, far beyond where the exponentials
    saturate); ``N = 0`` gives an empty ``(0, K)`` result.
    """
    if logits.dim() != 2:
        raise ValueError(f"expected logits of shape (N, K), got {tuple(logits.shape)}")
    if epsilon <= 0 or n_iters < 1:
        raise ValueError("epsilon must be positive and n_iters at least 1")
    dtype = _float_dtype(logits)
    n, k = logits.shape
    z = logits.to(dtype)
    if n == 0 or k == 0:
        return z.new_zeros((n, k))
    if groups is not None:
        groups = groups.to(device=z.device, dtype=torch.long)
        num_groups = _num_groups(groups, num_groups)
    if normalize:
        z = normalize_by_max_abs(z, groups, num_groups)
    limit = torch.finfo(dtype).max / 8.0 * min(epsilon, 1.0)
    z = z.clamp(-limit, limit) / epsilon
    for _ in range(n_iters):
        # every component gets the same total mass (within each group) ...
        if groups is None:
            z = z - torch.logsumexp(z, dim=0, keepdim=True)
        else:
            z = z - _segment_logsumexp(z, groups, num_groups)[groups]
        # ... and every sample's assignment sums to one
        z = z - torch.logsumexp(z, dim=1, keepdim=True)
    return z.exp()
