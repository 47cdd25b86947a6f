"""Detectron2 models of GMMSeg-D2 (importing this registers them)."""

from .gmm_heads import GMMDeepLabV3PlusHead, GMMSemSegFPNHead
from .gmm_predictor import GMMPredictor
from .meta_arch import PosteriorSemanticSegmentor

__all__ = ["GMMDeepLabV3PlusHead", "GMMPredictor", "GMMSemSegFPNHead", "PosteriorSemanticSegmentor"]
