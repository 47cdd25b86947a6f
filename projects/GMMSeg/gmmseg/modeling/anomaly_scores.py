"""Per-pixel anomaly scores (higher = more anomalous) for GMMSeg and for softmax models.

GMMSeg's own score (``gmm``) is ``-max_c log p(x|c)`` from its generative class likelihoods, scored on the
head's grid (stride 4) and upsampled, as the paper; ``gmm_fullres`` scores every input pixel instead, on the
embeddings upsampled and put back on the unit sphere (``GMMPredictor.fullres_anomaly_map``; per-pixel GMM
heads only, computed only when asked). For softmax models the
usual post-hoc scores are computed from the same forward pass, so all models are compared on exactly the
same pixels: maximum softmax probability (``msp``: ``-max_c p(c|x)``), entropy of the posterior, max
logit (``-max_c f_c(x)``), energy (``-logsumexp_c f_c(x)``, Liu et al. 2020) and the Mahalanobis distance
of the penultimate features to the nearest class mean under a shared covariance (Lee et al. 2018), whose
statistics ``tools/fit_mahalanobis.py`` estimates on the training set.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GMM_SCORES",
    "LOGIT_SCORES",
    "SCORE_NAMES",
    "MahalanobisStats",
    "logit_scores",
    "mahalanobis_score",
]

LOGIT_SCORES = ("msp", "entropy", "max_logit", "energy")
GMM_SCORES = ("gmm", "gmm_fullres")
SCORE_NAMES = (*GMM_SCORES, *LOGIT_SCORES, "mahalanobis")


def logit_scores(logits: Tensor, names: tuple[str, ...] | list[str] = LOGIT_SCORES) -> dict[str, Tensor]:
    """Post-hoc scores from (C, H, W) logits; each (H, W). Unknown names raise ValueError."""
    logits = logits.float()
    out: dict[str, Tensor] = {}
    log_p = None
    for name in names:
        if name in ("msp", "entropy") and log_p is None:
            log_p = F.log_softmax(logits, dim=0)
        if name == "msp":
            out[name] = -log_p.exp().amax(dim=0)
        elif name == "entropy":
            out[name] = -(log_p.exp() * log_p).sum(dim=0)
        elif name == "max_logit":
            out[name] = -logits.amax(dim=0)
        elif name == "energy":
            out[name] = -torch.logsumexp(logits, dim=0)
        else:
            raise ValueError(f"unknown logit-based anomaly score {name!r}; expected one of {LOGIT_SCORES}")
    return out


class MahalanobisStats:
    """Class means (C, F) and the shared precision matrix (F, F) of penultimate features."""

    def __init__(self, means: Tensor, precision: Tensor) -> None:
        if means.dim() != 2 or precision.shape != (means.shape[1], means.shape[1]):
            raise ValueError(
                f"expected means (C, F) and precision (F, F), got {tuple(means.shape)}, "
                f"{tuple(precision.shape)}"
            )
        self.means = means.double()
        self.precision = precision.double()

    @classmethod
    def load(cls, path: str) -> MahalanobisStats:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as err:
            raise ValueError(
                f"{path}: cannot read Mahalanobis statistics ({err}); create them with "
                "tools/fit_mahalanobis.py"
            ) from err
        return cls(state["means"], state["precision"])

    def save(self, path: str) -> None:
        torch.save({"means": self.means, "precision": self.precision}, path)

    @classmethod
    def from_sums(
        cls, sums: Tensor, counts: Tensor, outer_sum: Tensor, shrinkage: float = 1e-6
    ) -> MahalanobisStats:
        """From per-class feature sums (C, F), counts (C,) and the total outer product sum (F, F):
        shared covariance = (sum_i f_i f_i^T - sum_c n_c mu_c mu_c^T) / N, slightly regularised."""
        sums, counts, outer_sum = sums.double(), counts.double(), outer_sum.double()
        present = counts > 0
        means = torch.zeros_like(sums)
        means[present] = sums[present] / counts[present, None]
        total = counts.sum().clamp_min(1)
        cov = (outer_sum - (means.T * counts) @ means) / total
        cov = cov + shrinkage * cov.diagonal().mean().clamp_min(1e-12) * torch.eye(
            cov.shape[0], dtype=cov.dtype
        )
        means[~present] = float("nan")  # classes never seen are never the nearest
        return cls(means, torch.linalg.inv(cov))


def mahalanobis_score(features: Tensor, stats: MahalanobisStats) -> Tensor:
    """``min_c (f - mu_c)^T P (f - mu_c)`` for (F, H, W) features: (H, W), computed as matrix products."""
    f, h, w = features.shape
    x = features.reshape(f, h * w).T.double()  # (N, F)
    means = stats.means.to(x.device)
    precision = stats.precision.to(x.device)
    valid = ~torch.isnan(means).any(dim=1)
    mu = means[valid]
    xp = x @ precision
    quad_x = (xp * x).sum(dim=1, keepdim=True)  # (N, 1)
    quad_mu = ((mu @ precision) * mu).sum(dim=1)  # (C,)
    dist = quad_x - 2.0 * xp @ mu.T + quad_mu  # (N, C)
    return dist.amin(dim=1).clamp_min(0).float().reshape(h, w)
