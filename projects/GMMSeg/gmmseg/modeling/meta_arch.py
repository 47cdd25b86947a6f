"""A semantic segmentor whose inference returns class posteriors and per-pixel anomaly scores, so every
model (softmax or GMM head) is evaluated alike, with sliding-window inference as an option.

Detectron2's ``SemanticSegmentor`` returns raw logits in ``sem_seg``. Calibration (ECE) and anomaly scores
need probabilities, and GMM heads also give a per-pixel anomaly score, so this meta-architecture fixes the
contract. Per image, at the input's original resolution:

- ``sem_seg``: (C, H, W) class posteriors;
- ``anomaly``: (H, W) ``-max_c log p(x|c)`` (models with class likelihoods only, when a score reads it, as
  their default ``gmm`` does; with logit-based scores only, it is not computed);
- ``anomaly_scores``: {name: (H, W)} the scores named by ``TEST.ANOMALY_SCORES``, all from the same forward
  pass. Which scores exist, what each needs, and which a model gets by default is ``anomaly_scores.py``;
  a model says which maps it gives (``head_maps`` and its post-hoc models), and computes the costly or
  optional ones (``gmm_fullres``, ``gmm_mahalanobis``, ``mahalanobis``, Mask2Former's ``rba``,
  ``gmm_assigned``) only when a score reads them.

With ``TEST.POSTHOC_GMM`` (``tools/fit_posthoc_gmm.py``) a softmax model's classifier is replaced by GMMs
fitted to its penultimate features after training: posteriors and the ``gmm`` score come from them. The
post-hoc models (that one, and the Mahalanobis statistics) are ``posthoc.py``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor, nn

from .anomaly_scores import (
    CLASS_LIKELIHOOD,
    LOGITS,
    compute_scores,
    maps_needed,
    resolve_scores,
)
from .gmm_head import HEAD_MAPS, GMMHead, convert_head_to_gmm
from .gmm_predictor import GMMPredictor
from .penultimate import PenultimateFeatures, penultimate_layer
from .posthoc import MahalanobisStats, PosthocGMM

__all__ = ["PosteriorSemanticSegmentor"]


@META_ARCH_REGISTRY.register()
class PosteriorSemanticSegmentor(SemanticSegmentor):
    """``SemanticSegmentor`` with posteriors and anomaly scores at inference; training is unchanged.

    Works with any head of Detectron2's contract: softmax heads return a logits tensor at inference, GMM
    heads a dict ``{"logits", "anomaly"}``. With ``TEST.SLIDING_WINDOW.ENABLED`` each image is covered by
    overlapping windows (``SIZE``, ``STRIDE``) whose outputs are averaged, as in the paper's Cityscapes
    evaluation (768 / 512).
    """

    @configurable
    def __init__(
        self,
        *,
        anomaly_scores: tuple[str, ...] = (),
        mahalanobis_stats: MahalanobisStats | None = None,
        posthoc_gmm: PosthocGMM | None = None,
        sliding_window: tuple[int, int] | None = None,
        sliding_stride: tuple[int, int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        # plain tensors, not buffers: not part of the model's checkpoint
        self.mahalanobis_stats = mahalanobis_stats
        self.posthoc_gmm = posthoc_gmm
        posthoc = [m for m in (mahalanobis_stats, posthoc_gmm) if m is not None]
        available = set(self.head_maps())
        if any(m.replaces_classifier for m in posthoc):  # the head's class maps are no longer the model's
            available = {LOGITS}
        for model in posthoc:
            available |= set(model.maps)
        self.anomaly_score_names = resolve_scores(tuple(anomaly_scores), available)
        needed = maps_needed(self.anomaly_score_names)
        # the maps the scores read: a model computes its optional ones (Mask2Former's) only when in here
        self.needed_maps = needed
        # the maps a GMM head computes besides its logits (gmm_head.HEAD_MAPS): those a score reads, so
        # none when all scores are logit-based
        self.requested_head_maps = needed & HEAD_MAPS
        # post-hoc models run when their maps are read; one that replaces the classifier, always
        self.posthoc_models = [m for m in posthoc if m.replaces_classifier or set(m.maps) & needed]
        self._penultimate: PenultimateFeatures | None = None
        if posthoc:
            layer = self.penultimate_layer()
            if layer is None:
                raise ValueError(
                    "the 'mahalanobis' score and TEST.POSTHOC_GMM need a per-pixel softmax head with a "
                    "`predictor` layer (not mask classification)"
                )
            if self.posthoc_models:
                self._penultimate = PenultimateFeatures(layer)
        # images are padded to a multiple of this (mask-classification models need more than the backbone)
        self.size_divisibility = self.backbone.size_divisibility
        self.sliding_window = sliding_window
        self.sliding_stride = sliding_stride

    @classmethod
    def from_config(cls, cfg):
        ret = SemanticSegmentor.from_config(cfg)
        if cfg.MODEL.GMM.ENABLED:  # GMMSeg on the registered head: its classifier becomes GMMPredictor
            ret["sem_seg_head"] = convert_head_to_gmm(ret["sem_seg_head"], cfg)
        test = cfg.TEST
        ret["anomaly_scores"] = tuple(test.ANOMALY_SCORES)
        if test.MAHALANOBIS_STATS:
            ret["mahalanobis_stats"] = MahalanobisStats.load(test.MAHALANOBIS_STATS)
        if test.POSTHOC_GMM:
            ret["posthoc_gmm"] = PosthocGMM.load(test.POSTHOC_GMM)
        if test.SLIDING_WINDOW.ENABLED:
            ret["sliding_window"] = tuple(test.SLIDING_WINDOW.SIZE)
            ret["sliding_stride"] = tuple(test.SLIDING_WINDOW.STRIDE)
        return ret

    def head_maps(self) -> frozenset[str]:
        """The maps (``anomaly_scores.MAPS``) the head gives at inference: logits, and a per-pixel GMM
        head's class-likelihood maps."""
        if isinstance(getattr(self.sem_seg_head, "gmm_predictor", None), GMMPredictor):
            return frozenset({LOGITS}) | HEAD_MAPS
        return frozenset({LOGITS})

    def penultimate_layer(self) -> nn.Module | None:
        """The layer whose input post-hoc models read (the head's classifier), or None."""
        return penultimate_layer(self.sem_seg_head)

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if self.training:
            return super().forward(batched_inputs)
        results = []
        for out in self.inference_outputs(batched_inputs):
            result = {"sem_seg": F.softmax(out[LOGITS].float(), dim=0)}
            if CLASS_LIKELIHOOD in out:
                result["anomaly"] = out[CLASS_LIKELIHOOD]
            result["anomaly_scores"] = compute_scores(self.anomaly_score_names, out)
            results.append(result)
        return results

    @torch.no_grad()
    def inference_outputs(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Per image ``{"logits": (C, H, W)[, "anomaly": (H, W)][, "anomaly_fullres": (H, W)]
        [, "mahalanobis": (H, W)]}`` (mask classification: ``"rba"``, ``"anomaly_assigned"`` too) at the
        input's original resolution (the logits also serve post-hoc scores such as max logit)."""
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        if self.sliding_window is None:
            padded = ImageList.from_tensors(images, self.size_divisibility)
            maps = self._window_maps(padded.tensor)
            per_image = [{k: v[i] for k, v in maps.items()} for i in range(len(images))]
            sizes = padded.image_sizes
        else:
            per_image = [self._sliding_maps(image) for image in images]
            sizes = [tuple(image.shape[-2:]) for image in images]
        results = []
        for maps, x, size in zip(per_image, batched_inputs, sizes):
            height, width = x.get("height", size[0]), x.get("width", size[1])
            out = {}
            for key, value in maps.items():
                resized = sem_seg_postprocess(value if value.dim() == 3 else value[None], size, height, width)
                out[key] = resized if value.dim() == 3 else resized[0]
            results.append(out)
        return results

    def _window_maps(self, images: Tensor) -> dict[str, Tensor]:
        """Backbone + head on a normalised (N, 3, h, w) batch: logits (N, C, h, w) and the other maps the
        scores need (N, h, w), all at the batch's resolution."""
        backbone_features = self.backbone(images)
        if isinstance(self.sem_seg_head, GMMHead):
            head_out, _ = self.sem_seg_head(backbone_features, maps=self.requested_head_maps)
        else:
            head_out, _ = self.sem_seg_head(backbone_features)
        maps = dict(head_out) if isinstance(head_out, dict) else {LOGITS: head_out}
        if self._penultimate is not None:
            features = self._penultimate.pop()
            for model in self.posthoc_models:
                maps.update(model.window_maps(features, tuple(images.shape[-2:])))
        return maps

    def _sliding_maps(self, image: Tensor) -> dict[str, Tensor]:
        """Average the window outputs over a (3, H, W) image; windows overlap by ``size - stride``."""
        (wh, ww), (sh, sw) = self.sliding_window, self.sliding_stride
        _, height, width = image.shape
        pad_h, pad_w = max(wh - height, 0), max(ww - width, 0)
        if pad_h or pad_w:  # zero = the mean colour after normalisation
            image = F.pad(image, (0, pad_w, 0, pad_h))
        full_h, full_w = image.shape[-2:]
        ys = sorted({min(y, full_h - wh) for y in range(0, max(full_h - wh, 0) + sh, sh)})
        xs = sorted({min(x, full_w - ww) for x in range(0, max(full_w - ww, 0) + sw, sw)})
        sums: dict[str, Tensor] = {}
        count = image.new_zeros((full_h, full_w))
        for y in ys:
            windows = torch.stack([image[:, y : y + wh, x : x + ww] for x in xs])
            maps = self._window_maps(windows)
            for key, value in maps.items():
                if key not in sums:
                    sums[key] = value.new_zeros((*value.shape[1:-2], full_h, full_w))
                for i, x in enumerate(xs):
                    sums[key][..., y : y + wh, x : x + ww] += value[i]
            for x in xs:
                count[y : y + wh, x : x + ww] += 1
        return {key: (value / count)[..., :height, :width] for key, value in sums.items()}
