"""UperNet's decoder (Xiao et al., ECCV 2018) as a Detectron2 semantic-segmentation head (``UPerNetHead``).

As mmsegmentation's ``UPerHead`` (the head of the GMMSeg paper's UperNet rows): a pyramid pooling module
(PPM: average pooling to each of ``MODEL.UPERNET.POOL_SCALES`` (1, 2, 3, 6), 1x1 conv + norm + ReLU,
bilinear upsampling, concatenation with its input, 3x3 conv + norm + ReLU) on the coarsest input; 1x1
lateral convs on the others; a top-down FPN pass (each level adds the upsampled, already-summed level
above it); a 3x3 conv on every level but the PPM's; all levels upsampled to the finest and concatenated,
the finest first; a 3x3 fuse conv, dropout and the 1x1 classifier ``predictor``. Every conv has
``MODEL.SEM_SEG_HEAD.CONVS_DIM`` outputs (512 in the paper's configs), a norm and a ReLU, no bias.

mmsegmentation's UperNet configs add an auxiliary FCN head on res4 (3x3 conv to 256 channels + norm +
ReLU, dropout, 1x1 classifier; its cross-entropy weighted 0.4), used only in training. It is
``AuxiliaryFCNHead`` here, inside ``UPerNetHead`` (``MODEL.UPERNET.AUX_*``; weight 0 builds none), and its
loss is computed in ``forward`` before the decoder and stored in ``auxiliary_losses``, which ``GMMHead``
also adds (``gmm_head.pop_auxiliary_losses``): with ``MODEL.GMM.ENABLED`` the decode head's classifier
becomes the GMM predictor and the auxiliary head stays a softmax head, as in training a
GMMSeg model with mmsegmentation's UperNet config.

The main head follows Detectron2's head contract (``SemSegFPNHead``'s forward and losses, as
``SegFormerHead``), so ``MODEL.GMM.ENABLED`` converts it (``gmm_head.convert_head_to_gmm``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from torch import Tensor, nn

from .gmm_head import pop_auxiliary_losses
from .head_inputs import configured_inputs, sorted_in_features
from .mmseg_layers import classifier, conv_norm_relu

__all__ = ["AuxiliaryFCNHead", "PyramidPooling", "UPerNetHead"]


def _upsample(x: Tensor, size: Sequence[int]) -> Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling module with UperNet's bottleneck: global context at several grid sizes
    for the coarsest feature map, which then starts the top-down pass."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int], norm: str) -> None:
        super().__init__()
        self.scales = tuple(scales)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.AdaptiveAvgPool2d(scale), conv_norm_relu(in_channels, channels, 1, norm))
            for scale in self.scales
        )
        self.bottleneck = conv_norm_relu(in_channels + len(self.scales) * channels, channels, 3, norm)

    def pooled(self, x: Tensor) -> list[Tensor]:
        """Each branch's (N, channels, s, s) output, before upsampling."""
        return [branch(x) for branch in self.branches]

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        return self.bottleneck(torch.cat([x, *(_upsample(p, size) for p in self.pooled(x))], dim=1))


class AuxiliaryFCNHead(nn.Module):
    """mmsegmentation's auxiliary ``FCNHead`` (one 3x3 conv, no input concatenation): deep supervision of
    a middle feature map during training. Its classifier is ``classifier``, not ``predictor``: the GMM
    conversion and post-hoc scores read the main head's only."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, norm: str, dropout: float) -> None:
        super().__init__()
        self.conv = conv_norm_relu(in_channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


@SEM_SEG_HEADS_REGISTRY.register()
class UPerNetHead(nn.Module):
    """UperNet's PPM + FPN decoder, a 1x1 softmax classifier (``predictor``) and, optionally, the
    auxiliary FCN head."""

    @configurable
    def __init__(
        self,
        input_shape: dict[str, ShapeSpec],
        *,
        num_classes: int,
        channels: int,
        common_stride: int,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "BN",
        dropout: float = 0.1,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
        aux_in_feature: str = "",
        aux_shape: ShapeSpec | None = None,
        aux_channels: int = 256,
        aux_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        # finest first, as the concatenation; the coarsest goes through the PPM
        self.in_features = sorted_in_features(input_shape, common_stride, "UPerNetHead")
        *lateral_names, coarsest = self.in_features
        self.common_stride = common_stride
        self.loss_weight = loss_weight
        self.ignore_value = ignore_value
        self.ppm = PyramidPooling(input_shape[coarsest].channels, channels, pool_scales, norm)
        self.lateral_convs = nn.ModuleDict(
            {name: conv_norm_relu(input_shape[name].channels, channels, 1, norm) for name in lateral_names}
        )
        self.fpn_convs = nn.ModuleDict(
            {name: conv_norm_relu(channels, channels, 3, norm) for name in lateral_names}
        )
        self.fuse = conv_norm_relu(len(self.in_features) * channels, channels, 3, norm)
        self.dropout = nn.Dropout2d(dropout)
        self.predictor = classifier(channels, num_classes)
        self.aux_in_feature = aux_in_feature
        self.aux_loss_weight = aux_loss_weight
        self.aux_head: AuxiliaryFCNHead | None = None
        if aux_loss_weight > 0:
            if aux_shape is None:
                raise ValueError(
                    f"MODEL.UPERNET.AUX_IN_FEATURE = {aux_in_feature!r} is invalid: the auxiliary head "
                    "needs the shape of a backbone output"
                )
            self.aux_head = AuxiliaryFCNHead(aux_shape.channels, aux_channels, num_classes, norm, dropout)

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict:
        head, upernet = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.UPERNET
        aux = upernet.AUX_IN_FEATURE
        if upernet.AUX_LOSS_WEIGHT > 0 and aux not in input_shape:
            raise ValueError(
                f"MODEL.UPERNET.AUX_IN_FEATURE = {aux!r} is invalid: the backbone gives {sorted(input_shape)}"
            )
        return {
            "input_shape": configured_inputs(head, input_shape),
            "num_classes": head.NUM_CLASSES,
            "channels": head.CONVS_DIM,
            "common_stride": head.COMMON_STRIDE,
            "pool_scales": tuple(upernet.POOL_SCALES),
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
            "aux_in_feature": aux,
            "aux_shape": input_shape.get(aux),
            "aux_channels": upernet.AUX_CHANNELS,
            "aux_loss_weight": upernet.AUX_LOSS_WEIGHT,
        }

    # Detectron2's losses of the main head: cross-entropy on logits upsampled by ``common_stride``
    losses = SemSegFPNHead.losses

    def forward(
        self, features: dict[str, Tensor], targets: Tensor | None = None
    ) -> tuple[Tensor | None, dict[str, Tensor]]:
        """``SemSegFPNHead``'s contract: training ``(None, {"loss_sem_seg"[, "loss_sem_seg_aux"]})``,
        inference ``(logits at the input resolution, {})``."""
        self.auxiliary_losses = (
            self.auxiliary_head_losses(features, targets) if self.training and targets is not None else {}
        )
        results, losses = SemSegFPNHead.forward(self, features, targets)
        if self.training:
            losses.update(pop_auxiliary_losses(self))
        return results, losses

    def auxiliary_head_losses(self, features: dict[str, Tensor], targets: Tensor) -> dict[str, Tensor]:
        """The auxiliary FCN head's weighted cross-entropy (``{}`` without one), on its logits upsampled
        to the targets' size. Stored before the decoder runs, so that ``GMMHead.forward``, which stops the
        head's forward at ``predictor``, adds it too and the GMM model keeps it."""
        if self.aux_head is None:
            return {}
        logits = _upsample(self.aux_head(features[self.aux_in_feature]).float(), targets.shape[-2:])
        loss = F.cross_entropy(logits, targets, reduction="mean", ignore_index=self.ignore_value)
        return {"loss_sem_seg_aux": loss * self.aux_loss_weight}

    def decoder(self, features: dict[str, Tensor]) -> Tensor:
        """The (N, CONVS_DIM, H/s, W/s) fused features: PPM, laterals, top-down sums, FPN convs,
        upsampling to the finest level, concatenation, fuse conv."""
        *lateral_names, coarsest = self.in_features
        levels = [self.lateral_convs[name](features[name]) for name in lateral_names]
        levels.append(self.ppm(features[coarsest]))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the (summed) level above
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], levels[i - 1].shape[-2:])
        outputs = [self.fpn_convs[name](level) for name, level in zip(lateral_names, levels)]
        outputs.append(levels[-1])
        size = outputs[0].shape[-2:]
        return self.fuse(torch.cat([outputs[0], *(_upsample(o, size) for o in outputs[1:])], dim=1))

    def layers(self, features: dict[str, Tensor]) -> Tensor:
        """Stride-``common_stride`` logits: decoder, dropout, ``predictor`` (called once, here)."""
        return self.predictor(self.dropout(self.decoder(features)))
