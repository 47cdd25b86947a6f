"""GMM versions of Detectron2's semantic-segmentation heads: same feature paths, GMM predictor.

``GMMDeepLabV3PlusHead`` (Detectron2's DeepLab project) and ``GMMSemSegFPNHead`` (the FCN-style
``SemSegFPNHead``) keep their parents' decoders and replace only the 1x1 softmax predictor by
``GMMPredictor``, so a config that switches ``MODEL.SEM_SEG_HEAD.NAME`` turns a softmax model into GMMSeg.

Inference returns ``({"logits": (N, C, H, W), "anomaly": (N, H, W)}, {})`` at the padded input resolution;
``PosteriorSemanticSegmentor`` turns it into ``sem_seg`` posteriors and an ``anomaly`` map per image. Called
with ``fullres_anomaly=True`` (the ``gmm_fullres`` score) the dict also holds ``"anomaly_fullres"``
(N, H, W): ``-max_c log p(x|c)`` scored per input pixel on the upsampled, re-normalised embeddings
(``GMMPredictor.fullres_anomaly_map``) rather than scored at stride ``common_stride`` and upsampled.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.projects.deeplab import DeepLabV3PlusHead
from torch import Tensor, nn

from .gmm_predictor import GMMPredictor

__all__ = ["GMMDeepLabV3PlusHead", "GMMSemSegFPNHead"]


def _gmm_head_outputs(
    head: nn.Module, decoder_features: Tensor, targets: Tensor | None, fullres_anomaly: bool = False
):
    """Shared forward of the GMM heads, given the decoder's (N, C_dec, H/s, W/s) features."""
    outputs = head.gmm_predictor(decoder_features)
    logits = F.interpolate(
        outputs["logits"], scale_factor=head.common_stride, mode="bilinear", align_corners=False
    )
    if head.training:
        losses = head.gmm_predictor.losses(outputs, targets, logits)
        losses["loss_sem_seg"] = losses["loss_sem_seg"] * head.loss_weight
        return None, losses
    anomaly = GMMPredictor.anomaly_map(outputs)[:, None]
    anomaly = F.interpolate(anomaly, scale_factor=head.common_stride, mode="bilinear", align_corners=False)[
        :, 0
    ]
    maps = {"logits": logits, "anomaly": anomaly}
    if fullres_anomaly:  # only when asked: it scores H x W pixels instead of H/s x W/s
        maps["anomaly_fullres"] = head.gmm_predictor.fullres_anomaly_map(
            outputs["embeddings"], tuple(logits.shape[-2:])
        )
    return maps, {}


@SEM_SEG_HEADS_REGISTRY.register()
class GMMDeepLabV3PlusHead(DeepLabV3PlusHead):
    """DeepLabV3+ (ASPP + decoder) with the GMM predictor on the decoder's output."""

    @configurable
    def __init__(self, input_shape, *, gmm_predictor: GMMPredictor, **kwargs: Any) -> None:
        kwargs["num_classes"] = None  # the parent builds its decoder only
        super().__init__(input_shape, **kwargs)
        self.gmm_predictor = gmm_predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = DeepLabV3PlusHead.from_config(cfg, input_shape)
        ret["gmm_predictor"] = GMMPredictor.from_config(
            cfg, in_channels=ret["decoder_channels"][0], loss_type=ret["loss_type"]
        )
        return ret

    def forward(
        self, features: dict[str, Tensor], targets: Tensor | None = None, *, fullres_anomaly: bool = False
    ):
        return _gmm_head_outputs(self, self.layers(features), targets, fullres_anomaly)


@SEM_SEG_HEADS_REGISTRY.register()
class GMMSemSegFPNHead(SemSegFPNHead):
    """The FCN-style FPN head (Panoptic FPN's semantic branch) with the GMM predictor."""

    @configurable
    def __init__(self, input_shape, *, gmm_predictor: GMMPredictor, **kwargs: Any) -> None:
        super().__init__(input_shape, **kwargs)
        self.predictor = nn.Identity()  # layers() now returns the fused features
        self.gmm_predictor = gmm_predictor

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = SemSegFPNHead.from_config(cfg, input_shape)
        ret["gmm_predictor"] = GMMPredictor.from_config(cfg, in_channels=ret["conv_dims"])
        return ret

    def forward(
        self, features: dict[str, Tensor], targets: Tensor | None = None, *, fullres_anomaly: bool = False
    ):
        return _gmm_head_outputs(self, self.layers(features), targets, fullres_anomaly)
