"""Detectron2 models of GMMSeg-D2 (importing this registers them)."""

from .meta_arch import PosteriorSemanticSegmentor

__all__ = ["PosteriorSemanticSegmentor"]
