"""Backbones GMMSeg-D2 adds to Detectron2's registry (importing this registers them)."""

from .hrnet import HRNET_VARIANTS, D2HRNet
from .mit import MIT_VARIANTS, D2MixTransformer, MiTSpec

__all__ = ["HRNET_VARIANTS", "MIT_VARIANTS", "D2HRNet", "D2MixTransformer", "MiTSpec"]
