"""Mask2Former's set criterion as GMMSeg-D2 trains it: the last layer's Hungarian matching handed out with
the losses (``GMMMaskFormer`` labels its queries by it), and the mask losses run eagerly.

Importing this module replaces Mask2Former's scripted mask losses and matching costs by their eager
versions (``_use_eager_mask_losses``), for every Mask2Former model of the process.
"""

from __future__ import annotations

from typing import Any

import torch
from mask2former.modeling.criterion import SetCriterion
from torch import Tensor

__all__ = ["MaskFormerCriterion"]


def _use_eager_mask_losses() -> None:
    """Run Mask2Former's mask losses and matching costs eagerly instead of through ``torch.jit.script``.

    TorchScript's profiling executor re-optimises scripted functions after their first calls, which
    changes float results between a fresh process and a warm one: two identical runs in one process
    differed, and a run resumed after a crash could not end as the uninterrupted one. The eager functions
    compute the same losses (they are the ones Mask2Former scripts).
    """
    import mask2former.modeling.criterion as criterion_module
    import mask2former.modeling.matcher as matcher_module

    criterion_module.dice_loss_jit = criterion_module.dice_loss
    criterion_module.sigmoid_ce_loss_jit = criterion_module.sigmoid_ce_loss
    matcher_module.batch_dice_loss_jit = matcher_module.batch_dice_loss
    matcher_module.batch_sigmoid_ce_loss_jit = matcher_module.batch_sigmoid_ce_loss


_use_eager_mask_losses()


class MaskFormerCriterion(SetCriterion):
    """Mask2Former's set criterion, built from its loss weights, that also returns the last layer's
    Hungarian matching (``maskformer2`` 0.1's constructor takes the three weights and the number of
    auxiliary layers instead of a weight dict, which breaks its own ``MaskFormer.from_config``)."""

    def match_and_losses(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]]]:
        """Weighted losses of the last and the auxiliary layers, and the last layer's matching: per
        image ``(query indices, target indices)``."""
        last = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        num_masks = torch.as_tensor(
            [float(sum(len(t["labels"]) for t in targets))], device=outputs["pred_logits"].device
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(num_masks)
            num_masks = num_masks / torch.distributed.get_world_size()
        num_masks = torch.clamp(num_masks, min=1).item()

        losses: dict[str, Tensor] = {}
        indices = self.matcher(last, targets)
        for loss in self.losses:
            losses.update(self.get_loss(loss, last, targets, indices, num_masks))
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux, targets)
            for loss in self.losses:
                layer_losses = self.get_loss(loss, aux, targets, aux_indices, num_masks)
                losses.update({f"{k}_{i}": v for k, v in layer_losses.items()})
        weighted = {k: v * self.weight_dict[k] for k, v in losses.items() if k in self.weight_dict}
        return weighted, indices

    def forward(self, outputs: dict[str, Any], targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.match_and_losses(outputs, targets)[0]
