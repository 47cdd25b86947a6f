"""A semantic segmentor whose inference returns class posteriors, so every model is evaluated alike.

Detectron2's ``SemanticSegmentor`` returns raw logits in ``sem_seg``. Calibration (ECE) and the post-hoc
anomaly scores need probabilities, and GMM heads produce posteriors directly, so this meta-architecture
normalises the contract: ``sem_seg`` is always a (C, H, W) posterior at the input's original resolution.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

__all__ = ["PosteriorSemanticSegmentor"]


@META_ARCH_REGISTRY.register()
class PosteriorSemanticSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` with ``sem_seg`` = softmax posteriors (training is unchanged)."""

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if self.training:
            return super().forward(batched_inputs)
        return [
            {"sem_seg": F.softmax(logit.float(), dim=0)} for logit in self.inference_logits(batched_inputs)
        ]

    @torch.no_grad()
    def inference_logits(self, batched_inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Logits at input resolution, for post-hoc scores that need them (max logit, energy)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        logits, _ = self.sem_seg_head(self.backbone(images.tensor))
        return [
            sem_seg_postprocess(logit, size, x.get("height", size[0]), x.get("width", size[1]))
            for logit, x, size in zip(logits, batched_inputs, images.image_sizes)
        ]
