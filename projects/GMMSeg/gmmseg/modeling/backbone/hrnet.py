"""HRNet (HRNetV2's backbone) as a Detectron2 backbone, built on timm's ``HighResolutionNet``.

HRNet keeps a stride-4 branch through the whole network and adds a branch at half the resolution in each
stage (strides 4, 8, 16, 32 with W, 2W, 4W, 8W channels), exchanging information between branches after
every module. For segmentation, HRNetV2 reads the four branch outputs of the last stage (the head
upsamples and concatenates them), so ``D2HRNet`` returns exactly those as ``res2`` ... ``res5``.

timm's model is a port of the official HRNet-Image-Classification code and keeps its parameter names
(``conv1``, ``bn1``, ``layer1``, ``transition1``, ``stage2.<m>.branches`` / ``fuse_layers`` ...), so official
ImageNet weights load after the classification head is dropped (``tools/convert_hrnet_weights.py``).
The head is not built here: timm's ``features_only`` default (``feature_location='incre'``) would return
the classification head's channel-increasing bottlenecks (128, 256, 512, 1024 channels), which HRNetV2
does not use; ``head=""`` keeps the raw branches. ``tests/test_hrnet.py`` checks the function against a
reference written in the official structure.
"""

from __future__ import annotations

from detectron2.config import configurable
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from torch import Tensor, nn

__all__ = ["HRNET_FEATURES", "HRNET_NORMS", "HRNET_STRIDES", "HRNET_VARIANTS", "D2HRNet", "hrnet_channels"]

HRNET_FEATURES = ("res2", "res3", "res4", "res5")
HRNET_STRIDES = dict(zip(HRNET_FEATURES, (4, 8, 16, 32)))
# MODEL.HRNET.VARIANT -> timm's architecture (HRNet-Image-Classification's cls_hrnet_* configs):
# W18_SMALL is HRNet-W18-Small-v1 (branches 16/32/64/128 channels), W18_SMALL_V2 the v2 (18/36/72/144,
# fewer blocks than W18).
HRNET_VARIANTS: dict[str, str] = {
    "W18_SMALL": "hrnet_w18_small",
    "W18_SMALL_V2": "hrnet_w18_small_v2",
    "W18": "hrnet_w18",
    "W30": "hrnet_w30",
    "W32": "hrnet_w32",
    "W40": "hrnet_w40",
    "W44": "hrnet_w44",
    "W48": "hrnet_w48",
    "W64": "hrnet_w64",
}
# BN (per process), SyncBN (over all GPUs, as mmsegmentation's HRNet configs) or FrozenBN (statistics and
# affine parameters fixed); the parameter names are the same for all three
HRNET_NORMS = ("BN", "SyncBN", "FrozenBN")
# the stem, the first stage and the three multi-branch stages with their transitions, in official order
HRNET_MODULES = (
    "conv1",
    "bn1",
    "act1",
    "conv2",
    "bn2",
    "act2",
    "layer1",
    "transition1",
    "stage2",
    "transition2",
    "stage3",
    "transition3",
    "stage4",
)


def hrnet_channels(variant: str) -> tuple[int, ...]:
    """The channels of the four branches (W, 2W, 4W, 8W) of ``MODEL.HRNET.VARIANT`` ``variant``."""
    from timm.models.hrnet import cfg_cls

    return tuple(cfg_cls[HRNET_VARIANTS[variant]]["stage4"]["num_channels"])


@BACKBONE_REGISTRY.register()
class D2HRNet(Backbone):
    """HRNet with Detectron2's backbone interface: the last stage's four branches ``{"res2": stride 4, ...,
    "res5": stride 32}`` (NCHW, after the final fuse and ReLU) for the names in ``out_features``. All four
    branches are always computed (each feeds the others' fuse layers). Parameter names are timm's, which are
    the official ones (``conv1.weight``, ``stage4.2.fuse_layers.0.3.0.weight``, ...)."""

    @configurable
    def __init__(
        self,
        *,
        variant: str,
        in_channels: int = 3,
        norm: str = "BN",
        out_features: tuple[str, ...] = HRNET_FEATURES,
    ) -> None:
        super().__init__()
        from timm.models.hrnet import HighResolutionNet, cfg_cls  # timm is loaded when an HRNet is built

        if variant not in HRNET_VARIANTS:
            raise ValueError(f"HRNet variant {variant!r}: expected one of {list(HRNET_VARIANTS)}")
        unknown = [name for name in out_features if name not in HRNET_FEATURES]
        if unknown or not out_features:
            raise ValueError(f"out_features {list(out_features)}: expected names among {HRNET_FEATURES}")
        if norm not in HRNET_NORMS:
            raise ValueError(f"HRNet norm {norm!r}: expected one of {HRNET_NORMS}")
        net = HighResolutionNet(cfg_cls[HRNET_VARIANTS[variant]], in_chans=in_channels, head="")
        for name in HRNET_MODULES:
            setattr(self, name, getattr(net, name))
        if norm == "SyncBN":
            nn.SyncBatchNorm.convert_sync_batchnorm(self)
        elif norm == "FrozenBN":
            FrozenBatchNorm2d.convert_frozen_batchnorm(self)
        self._out_features = [name for name in HRNET_FEATURES if name in out_features]
        channels = dict(zip(HRNET_FEATURES, hrnet_channels(variant)))
        self._out_feature_strides = {name: HRNET_STRIDES[name] for name in self._out_features}
        self._out_feature_channels = {name: channels[name] for name in self._out_features}

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec) -> dict:
        hrnet = cfg.MODEL.HRNET
        return {
            "variant": hrnet.VARIANT,
            "in_channels": input_shape.channels,
            "norm": hrnet.NORM,
            "out_features": tuple(hrnet.OUT_FEATURES),
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.act1(self.bn1(self.conv1(x)))  # stride 2
        x = self.layer1(self.act2(self.bn2(self.conv2(x))))  # stride 4, the one-branch first stage
        branches = [x if isinstance(t, nn.Identity) else t(x) for t in self.transition1]
        branches = self.stage2(branches)
        for transition, stage in (
            (self.transition2, self.stage3),
            (self.transition3, self.stage4),
        ):
            # existing branches pass through; the new, coarser one comes from the coarsest so far
            inputs = [
                branches[i] if isinstance(t, nn.Identity) else t(branches[-1])
                for i, t in enumerate(transition)
            ]
            branches = stage(inputs)
        return {name: out for name, out in zip(HRNET_FEATURES, branches) if name in self._out_feature_strides}

    # output_shape: Detectron2's Backbone default, from _out_features and their strides and channels

    @property
    def size_divisibility(self) -> int:
        """Inputs are padded to a multiple of the coarsest stride, so that every branch's fuse layers
        (nearest upsampling by 2^k, stride-2 convolutions) meet at the same sizes."""
        return 32
