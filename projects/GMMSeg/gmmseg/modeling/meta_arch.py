"""A semantic segmentor whose inference returns class posteriors and per-pixel anomaly scores, so every
model (softmax or GMM head) is evaluated alike, with sliding-window inference as an option.

Detectron2's ``SemanticSegmentor`` returns raw logits in ``sem_seg``. Calibration (ECE) and anomaly scores
need probabilities, and GMM heads also give a per-pixel anomaly score, so this meta-architecture fixes the
contract. Per image, at the input's original resolution:

- ``sem_seg``: (C, H, W) class posteriors;
- ``anomaly``: (H, W) ``-max_c log p(x|c)`` (GMM heads only);
- ``anomaly_scores``: {name: (H, W)} the scores named by ``TEST.ANOMALY_SCORES`` (default: ``gmm`` for
  GMM heads; ``msp``, ``entropy``, ``max_logit``, ``energy`` and, with ``TEST.MAHALANOBIS_STATS``,
  ``mahalanobis`` for softmax heads), all from the same forward pass. ``gmm_fullres`` (per-pixel GMM heads,
  only when named) scores each input pixel's upsampled, re-normalised embedding instead of upsampling the
  scores of the head's grid.

With ``TEST.POSTHOC_GMM`` (``tools/fit_posthoc_gmm.py``) a softmax model's classifier is replaced by GMMs
fitted to its penultimate features after training: posteriors and the ``gmm`` score come from them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from torch import Tensor

from .anomaly_scores import LOGIT_SCORES, SCORE_NAMES, MahalanobisStats, logit_scores, mahalanobis_score
from .gmm_head import convert_head_to_gmm
from .gmm_predictor import GMMPredictor
from .posthoc import PosthocGMM

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
        unknown = set(anomaly_scores) - set(SCORE_NAMES)
        if unknown:
            raise ValueError(f"unknown anomaly scores {sorted(unknown)}; expected some of {SCORE_NAMES}")
        if "mahalanobis" in anomaly_scores and mahalanobis_stats is None:
            raise ValueError(
                "the 'mahalanobis' score needs TEST.MAHALANOBIS_STATS (tools/fit_mahalanobis.py)"
            )
        self.anomaly_score_names = tuple(anomaly_scores)
        # the head scores full-resolution pixels only when asked (H x W x C x K log-likelihoods)
        self.fullres_anomaly = "gmm_fullres" in anomaly_scores
        if self.fullres_anomaly and (
            posthoc_gmm is not None
            or not isinstance(getattr(self.sem_seg_head, "gmm_predictor", None), GMMPredictor)
        ):
            raise ValueError(
                "the 'gmm_fullres' anomaly score needs a per-pixel GMM head (GMMDeepLabV3PlusHead, "
                "GMMSemSegFPNHead)"
            )
        # images are padded to a multiple of this (mask-classification models need more than the backbone)
        self.size_divisibility = self.backbone.size_divisibility
        self.mahalanobis_stats = mahalanobis_stats
        self.sliding_window = sliding_window
        self.sliding_stride = sliding_stride
        self.posthoc_gmm = posthoc_gmm  # plain tensors, not buffers: not part of the model's checkpoint
        self._penultimate: Tensor | None = None
        if mahalanobis_stats is not None or posthoc_gmm is not None:
            predictor = getattr(self.sem_seg_head, "predictor", None)
            if not isinstance(predictor, torch.nn.Module):
                raise ValueError(
                    "the 'mahalanobis' score and TEST.POSTHOC_GMM need a head with a `predictor` layer "
                    "(softmax heads)"
                )
            predictor.register_forward_pre_hook(self._keep_penultimate)

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

    def _keep_penultimate(self, module: torch.nn.Module, inputs: tuple[Tensor, ...]) -> None:
        if not self.training:
            self._penultimate = inputs[0].detach()

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if self.training:
            return super().forward(batched_inputs)
        results = []
        for out in self.inference_outputs(batched_inputs):
            result = {"sem_seg": F.softmax(out["logits"].float(), dim=0)}
            is_gmm = "anomaly" in out
            if is_gmm:
                result["anomaly"] = out["anomaly"]
            names = self.anomaly_score_names or (
                ("gmm",) if is_gmm else LOGIT_SCORES + (("mahalanobis",) if self.mahalanobis_stats else ())
            )
            scores = logit_scores(out["logits"], [n for n in names if n in LOGIT_SCORES])
            if "gmm" in names:
                if not is_gmm:
                    raise ValueError("the 'gmm' anomaly score needs a GMM head")
                scores["gmm"] = out["anomaly"]
            if "gmm_fullres" in names:
                scores["gmm_fullres"] = out["anomaly_fullres"]
            if "mahalanobis" in names:
                scores["mahalanobis"] = out["mahalanobis"]
            result["anomaly_scores"] = {n: scores[n] for n in names}
            results.append(result)
        return results

    @torch.no_grad()
    def inference_outputs(self, batched_inputs: list[dict[str, Any]]) -> list[dict[str, Tensor]]:
        """Per image ``{"logits": (C, H, W)[, "anomaly": (H, W)][, "anomaly_fullres": (H, W)]
        [, "mahalanobis": (H, W)]}`` at the input's original resolution (the logits also serve post-hoc
        scores such as max logit)."""
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
        """Backbone + head on a normalised (N, 3, h, w) batch: logits (N, C, h, w) and, where available,
        anomaly and Mahalanobis maps (N, h, w), all at the batch's resolution."""
        backbone_features = self.backbone(images)
        if self.fullres_anomaly:
            head_out, _ = self.sem_seg_head(backbone_features, fullres_anomaly=True)
        else:
            head_out, _ = self.sem_seg_head(backbone_features)
        maps = dict(head_out) if isinstance(head_out, dict) else {"logits": head_out}
        if self.mahalanobis_stats is None and self.posthoc_gmm is None:
            return maps
        features, self._penultimate = self._penultimate, None
        if features is None:
            raise RuntimeError("the head's predictor was not called: no penultimate features")
        if self.mahalanobis_stats is not None:
            dist = torch.stack([mahalanobis_score(f, self.mahalanobis_stats) for f in features])
            maps["mahalanobis"] = F.interpolate(
                dist[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False
            )[:, 0]
        if self.posthoc_gmm is not None:
            scores = self.posthoc_gmm.class_scores(features)  # (N, C, h, w) log p(x|c)
            logits = F.interpolate(scores, size=images.shape[-2:], mode="bilinear", align_corners=False)
            maps["logits"] = logits
            maps["anomaly"] = -logits.amax(dim=1)
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
