"""SegFormer's all-MLP decoder as a Detectron2 semantic-segmentation head (``SegFormerHead``).

As the official head (NVlabs/SegFormer ``SegFormerHead``): each input feature map gets a per-pixel linear
layer to a common embedding dim (``MODEL.SEM_SEG_HEAD.CONVS_DIM``: 256 for B0/B1, 768 for B2-B5 in the
official configs), is upsampled (bilinear) to the finest input, the coarsest first in the concatenation; a
1x1 convolution + norm + ReLU fuses them, then dropout (``MODEL.SEM_SEG_HEAD.DROPOUT``, 0.1; channel-wise,
as mmsegmentation's heads) and the 1x1 classifier ``predictor``.

It follows Detectron2's head contract (that of ``SemSegFPNHead``): softmax cross-entropy on logits
upsampled to the input (``ignore_value``, ``loss_weight``), upsampled logits at inference, and a
``predictor`` called once on the stride-``common_stride`` decoder features, so that ``MODEL.GMM.ENABLED``
turns it into a GMMSeg head (``gmm_head.convert_head_to_gmm``) and post-hoc scores read its penultimate
features. The GMMSeg authors' SegFormer head (mmsegmentation 0.22's ``SegformerHead``) differs: its
per-stage layers are 1x1 conv + BN + ReLU and it concatenates the finest first (``configs/README.md``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from torch import Tensor, nn

from .head_inputs import configured_inputs, sorted_in_features
from .mmseg_layers import classifier, conv_norm_relu

__all__ = ["SegFormerHead"]


@SEM_SEG_HEADS_REGISTRY.register()
class SegFormerHead(nn.Module):
    """SegFormer's all-MLP decoder and a 1x1 softmax classifier (``predictor``)."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        embed_dim: int,
        common_stride: int,
        norm: str = "BN",
        dropout: float = 0.1,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ) -> None:
        super().__init__()
        # coarsest first: the official head concatenates (c4, c3, c2, c1)
        self.in_features = sorted_in_features(
            input_shape, common_stride, "SegFormerHead", coarsest_first=True
        )
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        # per-pixel linear layers (a 1x1 convolution is one, with nn.Linear's default initialisation)
        self.embed = nn.ModuleDict(
            {name: nn.Conv2d(input_shape[name].channels, embed_dim, 1) for name in self.in_features}
        )
        self.fuse = conv_norm_relu(embed_dim * len(self.in_features), embed_dim, 1, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = classifier(embed_dim, num_classes)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": configured_inputs(head, input_shape),
            "num_classes": head.NUM_CLASSES,
            "embed_dim": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
        }

    # Detectron2's semantic-head contract, word for word SemSegFPNHead's: training ``(None,
    # {"loss_sem_seg"})`` (cross-entropy on logits upsampled by ``common_stride``), inference ``(logits at the
    # input resolution, {})``; both read ``layers`` below
    forward = SemSegFPNHead.forward
    losses = SemSegFPNHead.losses

    def layers(self, features: dict[str, Tensor]) -> Tensor:
        """Stride-``common_stride`` logits: embed, upsample, concatenate, fuse, dropout, ``predictor``."""
        size = features[self.in_features[-1]].shape[-2:]
        embedded = [
            F.interpolate(self.embed[name](features[name]), size=size, mode="bilinear", align_corners=False)
            for name in self.in_features
        ]
        return self.predictor(self.dropout(self.fuse(torch.cat(embedded, dim=1))))
