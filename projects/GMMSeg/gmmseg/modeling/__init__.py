"""Detectron2 models of GMMSeg-D2 (importing this registers them).

The Mask2Former models (``PosteriorMaskFormer``, ``GMMMaskFormer`` and the GMM transformer decoder) are
registered when Mask2Former (``maskformer2``) is installed, as ``tools/install.py`` does.
"""

from gmmseg.config import MASK2FORMER_IMPORT_ERROR

from .backbone import D2HRNet, D2MixTransformer
from .gmm_head import GMMHead, build_sem_seg_head, convert_head_to_gmm
from .gmm_heads import GMMDeepLabV3PlusHead, GMMSemSegFPNHead
from .gmm_predictor import GMMPredictor, GMMPredictorBase, QueryGMMPredictor
from .meta_arch import PosteriorSemanticSegmentor
from .ocr_head import OCRHead
from .segformer_head import SegFormerHead
from .upernet_head import UPerNetHead

__all__ = [
    "D2HRNet",
    "D2MixTransformer",
    "GMMDeepLabV3PlusHead",
    "GMMHead",
    "GMMPredictor",
    "GMMPredictorBase",
    "GMMSemSegFPNHead",
    "OCRHead",
    "PosteriorSemanticSegmentor",
    "QueryGMMPredictor",
    "SegFormerHead",
    "UPerNetHead",
    "build_sem_seg_head",
    "convert_head_to_gmm",
]

if MASK2FORMER_IMPORT_ERROR is None:
    from .mask_former import GMMMaskFormer, GMMMultiScaleMaskedTransformerDecoder, PosteriorMaskFormer

    __all__ += ["GMMMaskFormer", "GMMMultiScaleMaskedTransformerDecoder", "PosteriorMaskFormer"]
