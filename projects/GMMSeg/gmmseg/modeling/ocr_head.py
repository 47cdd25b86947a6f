"""OCRNet's head (Yuan et al., "Object-Contextual Representations for Semantic Segmentation", ECCV 2020)
on HRNetV2 features, as a Detectron2 semantic-segmentation head (``OCRHead``).

1. HRNetV2 representation: the input maps upsampled (bilinear) to the finest one and concatenated, finest
   first (15W channels on an HRNet of width W: 720 for W48).
2. Soft object regions: an auxiliary FCN branch (1x1 conv + norm + ReLU, then its own 1x1 classifier
   ``aux_predictor``) predicts coarse class logits, trained with cross-entropy weighted by
   ``aux_loss_weight`` (0.4, mmsegmentation's ``ocrnet_hr*`` configs). It stays a softmax classifier in the
   GMMSeg model too: its logits are how OCR forms regions, not the model's prediction.
3. Pixel features: a 3x3 conv + norm + ReLU to ``channels`` (512, OCR's "mid channels").
4. Object region representations: per class, the pixel features averaged with weights softmax-ed over the
   image positions of that class's soft-region logits (``spatial_gather``).
5. Object-contextual representation: attention of each pixel over the regions (``ObjectAttention``: queries
   from pixels, keys and values from regions, ``key_channels`` 256, scaled dot product).
6. Augmented representation: the context concatenated with the pixel features, a 1x1 conv + norm + ReLU
   back to ``channels``, dropout (``MODEL.SEM_SEG_HEAD.DROPOUT``; mmsegmentation uses none), and the final
   1x1 classifier ``predictor``.

Detectron2's head contract (that of ``SemSegFPNHead``) and GMMSeg's: ``predictor`` is called once on the
stride-``common_stride`` features of step 6, so ``MODEL.GMM.ENABLED`` replaces it by the GMM predictor
(``gmm_head.convert_head_to_gmm``); the auxiliary loss is stored in ``auxiliary_losses`` before that call,
so that both the softmax and the GMM head add it (``gmm_head.pop_auxiliary_losses``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from torch import Tensor, nn

from .gmm_head import pop_auxiliary_losses
from .head_inputs import configured_inputs, sorted_in_features
from .mmseg_layers import conv_norm_relu

__all__ = ["OCRHead", "ObjectAttention", "spatial_gather"]

AUX_LOSS_NAME = "loss_ocr_aux"


def spatial_gather(features: Tensor, region_logits: Tensor) -> Tensor:
    """Object region representations (N, C, K, 1): for each of the K regions, the mean of the (N, C, H, W)
    ``features`` weighted by the softmax over the H x W positions of its (N, K, H, W) logits."""
    weights = F.softmax(region_logits.flatten(2), dim=2)  # (N, K, HW), each region sums to 1
    regions = torch.bmm(weights, features.flatten(2).transpose(1, 2))  # (N, K, C)
    return regions.transpose(1, 2).unsqueeze(-1)


class ObjectAttention(nn.Module):
    """Each pixel's object-contextual representation: attention over the region representations. Queries
    (pixels) and keys (regions) go through two conv + norm + ReLU layers to ``key_channels``, values one;
    the context goes back to ``channels`` by one more (OCR's ``ObjectAttentionBlock``)."""

    def __init__(self, channels: int, key_channels: int, norm: str) -> None:
        super().__init__()
        self.key_channels = key_channels
        self.query = nn.Sequential(
            conv_norm_relu(channels, key_channels, 1, norm),
            conv_norm_relu(key_channels, key_channels, 1, norm),
        )
        self.key = nn.Sequential(
            conv_norm_relu(channels, key_channels, 1, norm),
            conv_norm_relu(key_channels, key_channels, 1, norm),
        )
        self.value = conv_norm_relu(channels, key_channels, 1, norm)
        self.out = conv_norm_relu(key_channels, channels, 1, norm)

    def forward(self, pixels: Tensor, regions: Tensor) -> Tensor:
        n, _, h, w = pixels.shape
        query = self.query(pixels).flatten(2).transpose(1, 2)  # (N, HW, Ck)
        key = self.key(regions).flatten(2)  # (N, Ck, K)
        value = self.value(regions).flatten(2).transpose(1, 2)  # (N, K, Ck)
        attention = F.softmax(torch.bmm(query, key) * self.key_channels**-0.5, dim=-1)  # (N, HW, K)
        context = torch.bmm(attention, value).transpose(1, 2).reshape(n, self.key_channels, h, w)
        return self.out(context)


@SEM_SEG_HEADS_REGISTRY.register()
class OCRHead(nn.Module):
    """OCR on the concatenated input maps (HRNetV2), with an auxiliary soft-region classifier and a 1x1
    softmax classifier ``predictor``. Training returns ``(None, {"loss_sem_seg", "loss_ocr_aux"})``."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        channels: int = 512,
        key_channels: int = 256,
        common_stride: int,
        norm: str = "BN",
        dropout: float = 0.0,
        aux_loss_weight: float = 0.4,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ) -> None:
        super().__init__()
        # finest first, as HRNetV2 concatenates its branches
        self.in_features = sorted_in_features(input_shape, common_stride, "OCRHead")
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.aux_loss_weight = aux_loss_weight
        self.ignore_value = ignore_value
        self.auxiliary_losses: dict[str, Tensor] = {}
        in_channels = sum(input_shape[name].channels for name in self.in_features)
        self.aux = conv_norm_relu(in_channels, in_channels, 1, norm)
        self.aux_predictor = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        self.bottleneck = conv_norm_relu(in_channels, channels, 3, norm)
        self.object_context = ObjectAttention(channels, key_channels, norm)
        self.fuse = conv_norm_relu(2 * channels, channels, 1, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = nn.Conv2d(channels, num_classes, kernel_size=1)
        for classifier in (self.aux_predictor, self.predictor):  # mmsegmentation's classifier init
            nn.init.normal_(classifier.weight, 0.0, 0.01)
            nn.init.zeros_(classifier.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        head, ocr = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.OCR
        return {
            "input_shape": configured_inputs(head, input_shape),
            "num_classes": head.NUM_CLASSES,
            "channels": ocr.CHANNELS,
            "key_channels": ocr.KEY_CHANNELS,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "aux_loss_weight": ocr.AUX_LOSS_WEIGHT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
        }

    def forward(
        self, features: dict[str, Tensor], targets: Tensor | None = None
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """Training: ``(None, losses)``, the classifier's and the auxiliary one; inference: ``(logits at the
        input resolution, {})``."""
        logits = self.layers(features, targets)
        if self.training:
            return None, {**self.losses(logits, targets), **pop_auxiliary_losses(self)}
        upsampled = F.interpolate(
            logits, scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        return upsampled, {}

    # cross-entropy on the logits upsampled by ``common_stride``, times ``loss_weight`` ("loss_sem_seg")
    losses = SemSegFPNHead.losses

    def layers(self, features: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        """Stride-``common_stride`` logits (steps 1-6); in training also stores the auxiliary loss."""
        size = features[self.in_features[0]].shape[-2:]
        x = torch.cat(
            [
                F.interpolate(features[name], size=size, mode="bilinear", align_corners=False)
                for name in self.in_features
            ],
            dim=1,
        )
        region_logits = self.aux_predictor(self.aux(x))
        self.auxiliary_losses = {}
        if self.training and targets is not None:
            self.auxiliary_losses = {AUX_LOSS_NAME: self.auxiliary_loss(region_logits, targets)}
        pixels = self.bottleneck(x)
        context = self.object_context(pixels, spatial_gather(pixels, region_logits))
        return self.predictor(self.dropout(self.fuse(torch.cat([context, pixels], dim=1))))

    def auxiliary_loss(self, region_logits: Tensor, targets: Tensor) -> Tensor:
        """The soft-region branch's cross-entropy at the input resolution, times ``aux_loss_weight``."""
        upsampled = F.interpolate(
            region_logits.float(), scale_factor=self.common_stride, mode="bilinear", align_corners=False
        )
        loss = F.cross_entropy(upsampled, targets, reduction="mean", ignore_index=self.ignore_value)
        return loss * self.aux_loss_weight
