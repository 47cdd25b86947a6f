"""Per-class statistics of the fitted mixtures and their memory, for watching online EM during training.

Why: a mixture classifier can degrade while its loss curve alone cannot say why (a class whose stds
collapse, one that floods the memory, means that stop moving or keep jumping). These are the quantities
that tell those apart, one value per class, computed from ``OnlineGMM``'s state in a few vectorised
reductions (no loop over classes), so logging them costs next to nothing. Pure PyTorch: the trainer's hook
(``gmmseg.engine.hooks.GMMEMHook``) names and logs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .online_em import OnlineGMM

__all__ = ["MixtureDiagnostics", "mean_angle_degrees", "mixture_statistics"]


def mean_angle_degrees(means: Tensor, reference: Tensor) -> Tensor:
    """(C,) mean over the K components of the angle, in degrees, between (C, K, D) ``means`` and
    ``reference``, both taken as directions. ``2 atan2(|a - b|, |a + b|)`` (Kahan) stays accurate for tiny
    angles, where ``acos`` of a dot product near 1 loses all its digits."""
    a, b = F.normalize(means.double(), dim=-1), F.normalize(reference.double(), dim=-1)
    angle = 2 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    return torch.rad2deg(angle).mean(dim=-1)


def mixture_statistics(stds: Tensor, count: Tensor) -> dict[str, Tensor]:
    """(C,) tensors from (C, K, D) ``stds`` and the (C, K) fill counts of the memory's queues:

    - ``std``: the mean of the class's component stds (over components and dimensions);
    - ``memory_share``: the class's share of all filled slots (0 everywhere for an empty memory).
    """
    per_class = count.sum(dim=1).double()
    return {
        "std": stds.double().mean(dim=(1, 2)),
        "memory_share": per_class / per_class.sum().clamp_min(1),
    }


class MixtureDiagnostics:
    """The statistics of ``online``'s mixtures at a log, and their change since the previous log.

    Holds a snapshot (means, memory tallies) from its construction or its last ``collect``. ``collect``
    returns ``mixture_statistics`` plus, per class, ``mean_angle`` (degrees the component means turned
    since the snapshot, averaged over components), ``offered_per_step`` (features per step that reached
    the memory past the enqueue filter: for Mask2Former, the matched queries of the class) and
    ``written_per_step`` (those written, after the per-queue cap), averaged over the ``steps`` since the
    snapshot rather than taken from the last step alone, which would be noise.
    """

    def __init__(self, online: OnlineGMM) -> None:
        self.online = online
        self._snapshot = self._state()

    def _state(self) -> tuple[Tensor, Tensor, Tensor]:
        memory = self.online.memory
        return self.online.classifier.means.detach().clone(), memory.offered.clone(), memory.pushed.clone()

    @torch.no_grad()
    def collect(self, steps: int) -> dict[str, Tensor]:
        """(C,) float64 statistics (see the class docstring); ``steps`` >= 1 since the last call."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        means0, offered0, pushed0 = self._snapshot
        clf, memory = self.online.classifier, self.online.memory
        out = mixture_statistics(clf.stds.detach(), memory.count)
        out["mean_angle"] = mean_angle_degrees(clf.means.detach(), means0)
        out["offered_per_step"] = (memory.offered - offered0).sum(dim=1).double() / steps
        out["written_per_step"] = (memory.pushed - pushed0).sum(dim=1).double() / steps
        self._snapshot = self._state()
        return out
