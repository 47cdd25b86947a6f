"""Layers as mmsegmentation builds them, for the heads that follow its configs (``SegFormerHead``,
``UPerNetHead``, ``OCRHead``): mmcv's ``ConvModule`` (conv + norm + ReLU) and the 1x1 classifier with
its initialisation. In one place so that the heads' layers, and so their checkpoints, stay alike."""

from __future__ import annotations

import torch.nn.functional as F
from detectron2.layers import Conv2d, get_norm
from fvcore.nn import weight_init
from torch import nn

__all__ = ["classifier", "conv_norm_relu"]


def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int, norm: str) -> Conv2d:
    """mmcv's ``ConvModule``: conv ("same" padding; bias only without a norm), norm, ReLU; He (fan-out)
    initialisation."""
    conv = Conv2d(
        in_channels,
        out_channels,
        kernel_size=kernel_size,
        padding=kernel_size // 2,
        bias=norm == "",
        norm=get_norm(norm, out_channels),
        activation=F.relu,
    )
    weight_init.c2_msra_fill(conv)
    return conv


def classifier(in_channels: int, num_classes: int) -> nn.Conv2d:
    """A 1x1 classifier with mmsegmentation's initialisation (normal, std 0.01; zero bias)."""
    conv = nn.Conv2d(in_channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, 0.0, 0.01)
    nn.init.zeros_(conv.bias)
    return conv
