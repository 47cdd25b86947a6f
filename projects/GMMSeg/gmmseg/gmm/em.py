"""EM for GMMSeg's class-conditional mixtures: batched E-step, memory M-step, and a plain batch EM fit.

- ``e_step``: component responsibilities of every pixel within its own class, for all classes at once
  (Sinkhorn equipartition per class via the grouped ``sinkhorn``, or vanilla EM's normalised likelihoods).
- ``m_step``: GMMSeg's update of every class's means and stds from the feature memory, all queues at once
  from the memory's running sums (no loop over classes or components).
- ``fit_gmm``: ordinary maximum-likelihood EM of a diagonal GMM on one set of features (post-hoc baseline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .gaussian import compute_dtype, diag_gaussian_log_prob
from .memory import FeatureMemory
from .precision import float32_region
from .sinkhorn import sinkhorn

__all__ = ["e_step", "m_step", "m_step_from_statistics", "fit_gmm", "GMMFit", "kmeans_plusplus"]


@float32_region
@torch.no_grad()
def e_step(
    log_probs: Tensor,
    labels: Tensor | None = None,
    *,
    num_classes: int | None = None,
    method: str = "sinkhorn",
    hard: bool = True,
    epsilon: float = 0.05,
    n_iters: int = 3,
    normalize: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Assign every pixel to one of its own class's components; returns ``(resp (N, K), assignment (N,))``.

    Args:
        log_probs: ``(N, C, K)`` component log-likelihoods of all classes (the own class is picked with
            ``labels``), or ``(N, K)`` log-likelihoods of each pixel's own class already.
        labels: ``(N,)`` class ids. Pixels with a label outside ``[0, C)`` (e.g. 255) get assignment -1
            and an all-zero responsibility row. Without labels all pixels form one group.
        num_classes: number of classes for ``(N, K)`` input (default: inferred, costs a device sync).
        method: "sinkhorn" (GMMSeg: equipartition among each class's pixels) or "vanilla"
            (responsibilities = softmax over K of the log-likelihoods, i.e. uniform-weight EM).
        hard: return one-hot responsibilities of the argmax (the reference) instead of soft ones.
        epsilon, n_iters, normalize: Sinkhorn settings; ``normalize`` divides each class's
            log-likelihoods by their max absolute value first, as the reference does.

    All classes are processed in one vectorised pass (grouped Sinkhorn), not in a loop over classes.
    """
    if method not in ("sinkhorn", "vanilla"):
        raise ValueError(f"method must be 'sinkhorn' or 'vanilla', got {method!r}")
    n = log_probs.shape[0]
    if log_probs.dim() == 3:
        if labels is None:
            raise ValueError("labels are required with (N, C, K) log-likelihoods")
        num_classes = log_probs.shape[1]
    elif log_probs.dim() != 2:
        raise ValueError(f"expected (N, K) or (N, C, K) log-likelihoods, got {tuple(log_probs.shape)}")
    k = log_probs.shape[-1]
    dtype = compute_dtype(log_probs)
    resp = torch.zeros((n, k), dtype=dtype, device=log_probs.device)
    assignment = torch.full((n,), -1, dtype=torch.long, device=log_probs.device)

    if labels is None:
        own = log_probs.to(dtype)
        index = None
        groups = None
    else:
        labels = labels.reshape(-1).to(device=log_probs.device, dtype=torch.long)
        if num_classes is None:
            num_classes = int(labels.max().item()) + 1 if n > 0 else 0
        index = ((labels >= 0) & (labels < num_classes)).nonzero().squeeze(1)
        groups = labels[index]
        own = log_probs[index, groups] if log_probs.dim() == 3 else log_probs[index]
        own = own.to(dtype)
    if own.shape[0] == 0:
        return resp, assignment

    if method == "sinkhorn":
        q = sinkhorn(own, epsilon, n_iters, groups=groups, num_groups=num_classes, normalize=normalize)
    else:
        q = torch.softmax(own, dim=1)
    arg = q.argmax(dim=1)
    if hard:
        q = F.one_hot(arg, k).to(dtype)
    if index is None:
        return q, arg
    resp[index] = q
    assignment[index] = arg
    return resp, assignment


@float32_region
@torch.no_grad()
def m_step_from_statistics(
    sums: Tensor,
    sq_sums: Tensor,
    counts: Tensor,
    means: Tensor,
    stds: Tensor,
    *,
    mean_momentum: float = 0.999,
    cov_momentum: float = 0.0,
    var_floor: float = 0.01,
) -> Tuple[Tensor, Tensor]:
    """GMMSeg's M-step for all (class, component) queues at once; returns new ``(means, stds)``.

    From the sum ``S``, sum of squares ``Q`` and count ``n`` of each queue's features (``(C, K, D)``,
    ``(C, K, D)``, ``(C, K)``):

    - ``new_mean = normalize(S)``; ``mean = normalize(m * mean + (1 - m) * new_mean)`` with
      ``m = mean_momentum`` (reference: 0.999);
    - ``var = mean_n (f_n - new_mean)^2 + var_floor = Q/n - 2 new_mean S/n + new_mean^2 + var_floor``
      (the reference centres on the normalised ``new_mean``, not on the plain average);
    - ``std = c * std + (1 - c) * sqrt(var)`` with ``c = cov_momentum`` (reference: 0, i.e. replace). The
      momentum acts on the standard deviations, as the reference's ``momentum_update`` of its
      ``diagonal`` parameter does.

    Queues with ``n = 0`` keep their mean and std. Computed in float64, returned in the dtype of ``means``.
    """
    acc = torch.float64
    present = (counts > 0)[..., None]
    n = counts.to(acc).clamp_min(1)[..., None]
    s = sums.to(acc)
    new_mean = F.normalize(s, dim=-1)
    old_mean = means.to(acc)
    mean = F.normalize(mean_momentum * old_mean + (1.0 - mean_momentum) * new_mean, dim=-1)
    var = sq_sums.to(acc) / n - 2.0 * new_mean * s / n + new_mean.square()
    std_new = (var.clamp_min(0.0) + var_floor).sqrt()
    std = cov_momentum * stds.to(acc) + (1.0 - cov_momentum) * std_new
    out_means = torch.where(present, mean, old_mean).to(means.dtype)
    out_stds = torch.where(present, std, stds.to(acc)).to(stds.dtype)
    return out_means, out_stds


@float32_region
@torch.no_grad()
def m_step(
    memory: FeatureMemory,
    means: Tensor,
    stds: Tensor,
    *,
    mean_momentum: float = 0.999,
    cov_momentum: float = 0.0,
    var_floor: float = 0.01,
    exact: bool = False,
) -> Tuple[Tensor, Tensor]:
    """M-step from a ``FeatureMemory`` (see ``m_step_from_statistics``); returns new ``(means, stds)``.

    Uses the memory's running sums (O(C*K*D) work); ``exact=True`` recomputes them from the stored
    features first (reads the whole buffer; only filled slots count either way).
    """
    sums, sq_sums, counts = memory.statistics(exact=exact)
    return m_step_from_statistics(
        sums.to(means.device),
        sq_sums.to(means.device),
        counts.to(means.device),
        means,
        stds,
        mean_momentum=mean_momentum,
        cov_momentum=cov_momentum,
        var_floor=var_floor,
    )


@dataclass
class GMMFit:
    """Result of ``fit_gmm``: parameters and the final average log-likelihood per sample."""

    means: Tensor  # (K, D)
    stds: Tensor  # (K, D)
    weights: Tensor  # (K,)
    log_likelihood: float
    n_iter: int
    converged: bool

    def log_prob(self, x: Tensor) -> Tensor:
        """Mixture log-density ``log sum_k w_k N(x | mu_k, diag(s_k^2))`` of ``x`` (N, D): ``(N,)``."""
        comp = diag_gaussian_log_prob(x, self.means, self.stds)
        return torch.logsumexp(comp + self.weights.to(comp.dtype).log(), dim=1)


def _sq_dists(x: Tensor, centers: Tensor) -> Tensor:
    d = (x * x).sum(1, keepdim=True) - 2.0 * x @ centers.t() + (centers * centers).sum(1)
    return d.clamp_min_(0.0)


@float32_region
@torch.no_grad()
def kmeans_plusplus(
    x: Tensor, k: int, *, generator: torch.Generator | None = None, n_iters: int = 10
) -> Tuple[Tensor, Tensor]:
    """k-means++ seeding followed by ``n_iters`` Lloyd steps; returns ``(centers (k, D), labels (N,))``."""
    n = x.shape[0]
    if n < k:
        raise ValueError(f"need at least {k} points, got {n}")
    first = torch.randint(n, (1,), generator=generator, device="cpu").item()
    centers = [x[first]]
    d2 = _sq_dists(x, x[first][None]).squeeze(1)
    for _ in range(1, k):
        probs = d2 if float(d2.sum()) > 0 else torch.ones_like(d2)
        idx = torch.multinomial(probs.double().cpu(), 1, generator=generator).item()
        centers.append(x[idx])
        d2 = torch.minimum(d2, _sq_dists(x, x[idx][None]).squeeze(1))
    c = torch.stack(centers)
    labels = _sq_dists(x, c).argmin(1)
    for _ in range(n_iters):
        counts = torch.bincount(labels, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        c = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], c)
        new_labels = _sq_dists(x, c).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return c, labels


@float32_region
@torch.no_grad()
def fit_gmm(
    features: Tensor,
    num_components: int,
    n_iters: int = 100,
    *,
    tol: float = 1e-6,
    reg_covar: float = 1e-6,
    learn_weights: bool = True,
    generator: torch.Generator | None = None,
) -> GMMFit:
    """Maximum-likelihood EM of a diagonal-covariance GMM on ``features`` (N, D).

    Initialised by k-means++ (+ Lloyd steps) drawn from ``generator``; stops after ``n_iters`` EM
    iterations or when the average log-likelihood improves by less than ``tol``. ``reg_covar`` is added
    to every variance (as scikit-learn does); ``learn_weights=False`` keeps uniform mixture weights.
    Computed in at least float32 on the features' device.

    Why not scikit-learn's ``GaussianMixture`` (which ``tests/gmm/test_em.py`` checks this against): the
    post-hoc baseline needs uniform weights, as the paper's GMMs have, and ``GaussianMixture`` always
    learns them; and it runs on NumPy, so features gathered on a GPU would have to leave it.
    """
    dtype = compute_dtype(features)
    x = features.to(dtype)
    if x.dim() != 2:
        raise ValueError("features must be (N, D)")
    k = num_components
    offset = x.mean(0)  # centring keeps E[x^2] - mu^2 well conditioned
    x = x - offset
    x2 = x * x
    eps = 10 * torch.finfo(dtype).eps

    def maximise(resp: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        nk = resp.sum(0) + eps
        mu = (resp.t() @ x) / nk[:, None]
        var = (resp.t() @ x2) / nk[:, None] - mu.square()
        w = nk / nk.sum() if learn_weights else torch.full_like(nk, 1.0 / k)
        return mu, (var.clamp_min(0.0) + reg_covar).sqrt(), w

    _, labels = kmeans_plusplus(x, k, generator=generator)
    means, stds, weights = maximise(F.one_hot(labels, k).to(dtype))
    prev = -math.inf
    converged = False
    it = 0
    while it < n_iters:
        it += 1
        log_joint = diag_gaussian_log_prob(x, means, stds) + weights.log()
        log_norm = torch.logsumexp(log_joint, dim=1, keepdim=True)
        ll = float(log_norm.mean())
        means, stds, weights = maximise((log_joint - log_norm).exp())
        if abs(ll - prev) < tol:
            converged = True
            break
        prev = ll
    final = torch.logsumexp(diag_gaussian_log_prob(x, means, stds) + weights.log(), dim=1).mean()
    return GMMFit(means + offset, stds, weights, float(final), it, converged)
