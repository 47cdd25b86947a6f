"""GMMSeg's generative classifier: one uniform-weight diagonal Gaussian mixture per class."""

from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .gaussian import diag_gaussian_log_prob
from .precision import float32_region

__all__ = ["GaussianMixtureClassifier", "unfitted_std"]


def unfitted_std(dim: int, var_floor: float = 0.01) -> float:
    """Standard deviation of a component that has not seen any feature yet: ``sqrt(2 / dim + var_floor)``.

    It is what the reference's M-step gives a queue of random unit vectors (its queues start filled with
    them, and its first M-step replaces the initial stds of 1): each coordinate of a random unit vector has
    variance ``1 / dim`` around zero, and centring on the queue's normalised mean adds ``1 / dim`` more on
    average. Our queues hold real features only, so a class whose pixels are never classified correctly
    keeps its initial stds. At 1 they would lock it out for good: the log-determinant term of a fitted
    component (stds near 0.1 in 64 dims) outweighs any distance on the unit sphere, so the class could never
    win a pixel, hence never be enqueued. At this value it still can near its own means.
    """
    return math.sqrt(2.0 / dim + var_floor)


class GaussianMixtureClassifier(nn.Module):
    """Class scores ``log p(x | c)`` from C mixtures of K diagonal Gaussians in D dims.

    ``means`` and ``stds`` (C, K, D) are buffers: they get no gradient and are fitted only by EM
    (``OnlineGMM`` writes them through ``update_parameters``); the gradient flows to the features ``x``.
    ``trainable=True`` makes them parameters learned by back-propagation instead (the paper's
    "discriminative GMMSeg" ablation); means are then L2-normalised and stds floored at ``min_std`` where
    they are used.

    ``score="wta"`` (default, as the reference) scores a class by its best component,
    ``max_k log N(x | mu_ck, s_ck)``; ``score="mixture"`` by the uniform mixture,
    ``logsumexp_k log N(x | mu_ck, s_ck) - log K``.
    """

    means: Tensor
    stds: Tensor

    def __init__(
        self,
        num_classes: int,
        num_components: int = 5,
        dim: int = 64,
        *,
        score: str = "wta",
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
        trainable: bool = False,
        min_std: float = 0.1,
        initial_std: float | None = None,
    ) -> None:
        """Means as the reference: trunc_normal(std=init_std), L2-normalised. Stds: ``initial_std``, by
        default ``unfitted_std(dim)`` (the reference starts at 1 but replaces them at its first M-step
        from queues of random vectors; see ``unfitted_std``)."""
        super().__init__()
        if score not in ("wta", "mixture"):
            raise ValueError(f"score must be 'wta' or 'mixture', got {score!r}")
        self.num_classes = num_classes
        self.num_components = num_components
        self.dim = dim
        self.score = score
        self.trainable = trainable
        self.min_std = min_std
        means = torch.empty(num_classes, num_components, dim)
        nn.init.trunc_normal_(means, std=init_std, generator=generator)
        if initial_std is None:
            initial_std = unfitted_std(dim)
        if not initial_std > 0:
            raise ValueError(f"initial_std must be positive, got {initial_std}")
        stds = torch.full((num_classes, num_components, dim), float(initial_std))
        if trainable:
            self.means = nn.Parameter(F.normalize(means, dim=-1))
            self.stds = nn.Parameter(stds)
        else:
            self.register_buffer("means", F.normalize(means, dim=-1))
            self.register_buffer("stds", stds)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, num_components={self.num_components}, dim={self.dim}, "
            f"score={self.score!r}" + (", trainable=True" if self.trainable else "")
        )

    def parameters_in_use(self) -> Tuple[Tensor, Tensor]:
        """(means, stds) as the log-likelihood uses them: detached buffers, or the learned parameters
        with unit-length means and stds of at least ``min_std``."""
        if self.trainable:
            return F.normalize(self.means, dim=-1), self.stds.clamp_min(self.min_std)
        return self.means.detach(), self.stds.detach()

    @float32_region
    def component_log_prob(self, x: Tensor) -> Tensor:
        """``log N(x | mu_ck, diag(s_ck^2))`` for ``x`` (..., D): ``(..., C, K)``."""
        lead = x.shape[:-1]
        means, stds = self.parameters_in_use()
        flat = diag_gaussian_log_prob(
            x.reshape(-1, self.dim), means.reshape(-1, self.dim), stds.reshape(-1, self.dim)
        )
        return flat.view(*lead, self.num_classes, self.num_components)

    @float32_region
    def class_log_prob(self, x: Tensor, component_log_prob: Tensor | None = None) -> Tensor:
        """Class scores ``(..., C)`` (wta or mixture); pass ``component_log_prob`` to reuse it. Both are
        float32 (or float64 for float64 input) under autocast too: ``gmm.precision``."""
        comp = self.component_log_prob(x) if component_log_prob is None else component_log_prob
        if self.score == "wta":
            return comp.amax(dim=-1)
        return torch.logsumexp(comp, dim=-1) - math.log(self.num_components)

    def forward(self, x: Tensor) -> Tensor:
        """Class scores ``(..., C)``, usable as logits for cross-entropy."""
        return self.class_log_prob(x)

    @float32_region
    def half_mahalanobis(self, component_log_prob: Tensor) -> Tensor:
        """``0.5 * sum_d ((x_d - mu_ckd) / s_ckd)^2`` (..., C, K) from the log-likelihoods (..., C, K).

        That is ``log N`` without its normalising constant ``-sum_d log s_ckd - D/2 log 2 pi``. Up to the
        constant ``D/2`` it is how far ``log N(x)`` falls below the mean log-likelihood of the component's
        own samples, so a broad component is not penalised for its volume (a typicality test per
        component). Never negative: the log-likelihoods are clamped at the constant."""
        _, stds = self.parameters_in_use()
        stds = stds.to(component_log_prob.dtype)
        log_norm = -stds.log().sum(dim=-1) - 0.5 * self.dim * math.log(2.0 * math.pi)
        return (log_norm - component_log_prob).clamp_min(0.0)

    def anomaly_score(self, x: Tensor) -> Tensor:
        """``-max_c log p(x | c)`` ``(...)``: high where no class explains the feature."""
        return -self.class_log_prob(x).amax(dim=-1)

    @torch.no_grad()
    def update_parameters(self, means: Tensor, stds: Tensor) -> None:
        """Replace the parameters (shapes (C, K, D)); means are expected L2-normalised, stds positive."""
        if means.shape != self.means.shape or stds.shape != self.stds.shape:
            raise ValueError(
                f"expected means and stds of shape {tuple(self.means.shape)}, got "
                f"{tuple(means.shape)} and {tuple(stds.shape)}"
            )
        self.means.copy_(means)
        self.stds.copy_(stds)
