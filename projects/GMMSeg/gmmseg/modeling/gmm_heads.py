"""The named GMM heads ``GMMDeepLabV3PlusHead`` and ``GMMSemSegFPNHead``: registered names for Detectron2's
``DeepLabV3PlusHead`` and ``SemSegFPNHead`` with the GMM predictor, kept for existing configs.

They are what ``MODEL.GMM.ENABLED`` makes of those two heads (``gmm_head.convert_head_to_gmm``: same class,
forward and parameter names), built in the order of earlier releases so that their runs and checkpoints
stay bit for bit what they were: the ``GMMPredictor`` is drawn before the decoder (in ``from_config``), and
DeepLabV3+'s softmax classifier, which the conversion would draw and drop, is never built.
"""

from __future__ import annotations

from typing import Any

from detectron2.config import configurable
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.projects.deeplab import DeepLabV3PlusHead

from .gmm_head import GMMHead, attach_gmm_predictor, gmm_class_of
from .gmm_predictor import GMMPredictor

__all__ = ["GMMDeepLabV3PlusHead", "GMMSemSegFPNHead"]


@SEM_SEG_HEADS_REGISTRY.register()
@gmm_class_of(DeepLabV3PlusHead)
class GMMDeepLabV3PlusHead(GMMHead, DeepLabV3PlusHead):
    """DeepLabV3+ (ASPP + decoder) with the GMM predictor on the decoder's output."""

    @configurable
    def __init__(self, input_shape, *, gmm_predictor: GMMPredictor, **kwargs: Any) -> None:
        kwargs["num_classes"] = None  # the parent builds its decoder only (no softmax classifier drawn)
        super().__init__(input_shape, **kwargs)
        self.decoder_only = False  # so that layers() calls self.predictor: the tap attached below
        attach_gmm_predictor(self, gmm_predictor)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = DeepLabV3PlusHead.from_config(cfg, input_shape)
        ret["gmm_predictor"] = GMMPredictor.from_config(
            cfg, in_channels=ret["decoder_channels"][0], loss_type=ret["loss_type"]
        )
        return ret


@SEM_SEG_HEADS_REGISTRY.register()
@gmm_class_of(SemSegFPNHead)
class GMMSemSegFPNHead(GMMHead, SemSegFPNHead):
    """The FCN-style FPN head (Panoptic FPN's semantic branch) with the GMM predictor."""

    @configurable
    def __init__(self, input_shape, *, gmm_predictor: GMMPredictor, **kwargs: Any) -> None:
        super().__init__(input_shape, **kwargs)  # draws the softmax classifier, replaced as it always was
        attach_gmm_predictor(self, gmm_predictor)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = SemSegFPNHead.from_config(cfg, input_shape)
        ret["gmm_predictor"] = GMMPredictor.from_config(cfg, in_channels=ret["conv_dims"])
        return ret
