"""Backbones GMMSeg-D2 adds to Detectron2's registry (importing this registers them)."""

from .mit import MIT_VARIANTS, D2MixTransformer, MiTSpec

__all__ = ["MIT_VARIANTS", "D2MixTransformer", "MiTSpec"]
