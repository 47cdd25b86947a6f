"""Diagonal-Gaussian log-likelihoods without the (N, M, D) broadcast.

``log N(x | mu, diag(s^2)) = -0.5 * sum_d (x_d - mu_d)^2 / s_d^2 - sum_d log s_d - D/2 log(2 pi)`` and the
quadratic form expands into two matrix products, ``(x^2) @ (1/s^2).T - 2 x @ (mu/s^2).T + sum(mu^2/s^2)``,
so the only array of size N x M is the output itself. Both ``x`` and the means are shifted by the mean of
the means first (the log-likelihood is invariant to a common shift); this keeps the expanded terms close
in magnitude to the result and avoids most of the cancellation the expansion would otherwise suffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .precision import float32_region

__all__ = ["diag_gaussian_log_prob", "compute_dtype"]

_LOG_2PI = math.log(2.0 * math.pi)
# rows of x per chunk on the no-grad path: the two (rows, D) temporaries stay at ~1 MiB each (float32)
_CHUNK_ELEMENTS = 1 << 18


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Floating dtype the inputs are promoted to: at least float32 (half and bfloat16 are upcast)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point or torch.finfo(dtype).bits < 32:
        dtype = torch.float32
    return dtype


@float32_region
def diag_gaussian_log_prob(
    x: Tensor,
    means: Tensor,
    stds: Tensor,
    *,
    centre: bool = True,
    chunk_size: int | None = None,
) -> Tensor:
    """Exact ``log N(x_n | means_m, diag(stds_m^2))`` for every pair: returns ``(N, M)``.

    Args:
        x: ``(N, D)`` points. Gradients flow to ``x`` (and to ``means``/``stds`` if they require them).
        means, stds: ``(M, D)`` component means and standard deviations (``stds > 0``).
        centre: subtract the mean of ``means`` from both sides first (numerical accuracy, same result).
        chunk_size: rows of ``x`` per chunk when no gradient is needed (default: 2^18 elements).

    Computed in ``promote(x, means, stds)`` with at least float32; the result has that dtype. Peak extra
    memory is the ``(N, M)`` output plus two ``(chunk, D)`` temporaries (without autograd).
    """
    if x.dim() != 2 or means.dim() != 2 or stds.shape != means.shape or x.shape[1] != means.shape[1]:
        raise ValueError(
            f"expected x (N, D), means and stds (M, D); got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(stds.shape)}"
        )
    dtype = compute_dtype(x, means, stds)
    x = x.to(dtype)
    means = means.to(dtype)
    stds = stds.to(dtype)
    n, d = x.shape

    centre_vec = means.mean(dim=0) if centre and means.shape[0] > 0 else means.new_zeros(d)
    means_c = means - centre_vec
    prec = stds.reciprocal().square()  # (M, D) = 1 / s^2
    lin = means_c * prec  # (M, D) = mu / s^2
    # per-component constants, computed once: log-normaliser and -0.5 * sum(mu^2 / s^2)
    log_norm = -stds.log().sum(dim=1) - 0.5 * d * _LOG_2PI  # (M,)
    bias = log_norm - 0.5 * (means_c * lin).sum(dim=1)  # (M,)
    w_sq = (-0.5 * prec).t()  # (D, M)
    w_lin = lin.t()  # (D, M)

    needs_grad = torch.is_grad_enabled() and (x.requires_grad or means.requires_grad or stds.requires_grad)
    # a traced graph (export) must not bake in the chunk loop of the input it was traced with
    if needs_grad or torch.jit.is_tracing():
        xc = x - centre_vec
        out = torch.addmm(bias, xc.square(), w_sq)
        out = torch.addmm(out, xc, w_lin)
        # log p <= log_norm  <=>  Mahalanobis term >= 0 (removes negative round-off)
        return torch.clamp(out, max=log_norm)

    out = torch.empty((n, means.shape[0]), dtype=dtype, device=x.device)
    rows = chunk_size if chunk_size is not None else max(1, _CHUNK_ELEMENTS // max(d, 1))
    for start in range(0, n, rows):
        xc = x[start : start + rows] - centre_vec
        block = out[start : start + rows]
        torch.addmm(bias, xc.square(), w_sq, out=block)
        block.addmm_(xc, w_lin).clamp_(max=log_norm)  # while the block is in cache
    return out
