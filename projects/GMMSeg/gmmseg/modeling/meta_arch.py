"""A semantic segmentor whose inference returns class posteriors (and, for GMM heads, an anomaly map), so
every model is evaluated alike.

Detectron2's ``SemanticSegmentor`` returns raw logits in ``sem_seg``. Calibration (ECE) and anomaly scores
need probabilities, and GMM heads also give a per-pixel anomaly score, so this meta-architecture fixes the
contract: ``sem_seg`` is always a (C, H, W) posterior at the input's original resolution, and ``anomaly``
an (H, W) map where the head provides one (GMM heads: ``-max_c log p(x|c)``).
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
    """``SemanticSegmentor`` with ``sem_seg`` = softmax posteriors (+ ``anomaly``); training unchanged.

    Works with any head of Detectron2's contract: softmax heads return a logits tensor at inference, GMM
    heads a dict ``{"logits", "anomaly"}``.
    """

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if self.training:
            return super().forward(batched_inputs)
        results = []
        for out in self.inference_outputs(batched_inputs):
            result = {"sem_seg": F.softmax(out["logits"].float(), dim=0)}
            if "anomaly" in out:
                result["anomaly"] = out["anomaly"]
            results.append(result)
        return results

    @torch.no_grad()
    def inference_outputs(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        """Per image ``{"logits": (C, H, W)[, "anomaly": (H, W)]}`` at the input's original resolution
        (the logits also serve post-hoc scores such as max logit and energy)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.backbone.size_divisibility)
        head_out, _ = self.sem_seg_head(self.backbone(images.tensor))
        if not isinstance(head_out, dict):
            head_out = {"logits": head_out}
        results = []
        for i, (x, size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            out = {"logits": sem_seg_postprocess(head_out["logits"][i], size, height, width)}
            if "anomaly" in head_out:
                out["anomaly"] = sem_seg_postprocess(head_out["anomaly"][i][None], size, height, width)[0]
            results.append(out)
        return results
