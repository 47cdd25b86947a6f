"""GMMSeg on any Detectron2 semantic-segmentation head: its 1x1 classifier swapped for ``GMMPredictor``.

With ``MODEL.GMM.ENABLED True``, ``PosteriorSemanticSegmentor`` builds the registered head
(``MODEL.SEM_SEG_HEAD.NAME``) as usual and hands it to ``convert_head_to_gmm``, whose docstring is the
contract a head must follow; ``build_sem_seg_head`` does the same for other meta-architectures.

How the decoder features are reached without knowing the head: its ``predictor`` becomes a
``DecoderTap``; ``GMMHead.forward`` arms it and runs the head's own forward, which stops with the tap's input
exactly where the softmax classifier was, before any softmax loss or upsampling. The head's class becomes
``GMM<Name>``, a subclass of its own with ``GMMHead`` first (as ``torch.nn.utils.parametrize`` does), so
parameter names do not change (``sem_seg_head.<decoder...>``, ``sem_seg_head.gmm_predictor.*``) and
``isinstance`` with the original class still holds. Outside ``GMMHead.forward`` the tap is the identity:
``head.layers(features)`` returns the decoder features.

The converted head returns, in training, ``(None, {"loss_sem_seg", "loss_gmm_component"})`` (and the
head's auxiliary losses, if it has any: contract point 5); at inference
``({"logits": (N, C, H, W), "anomaly": (N, H, W)}, {})`` at the padded input resolution, which
``PosteriorSemanticSegmentor`` turns into ``sem_seg`` posteriors and an ``anomaly`` map per image. Which
maps besides the logits it computes is one set, ``maps`` (names in ``HEAD_MAPS``; ``DEFAULT_MAPS``, the
``anomaly`` map alone, unless told), which the meta-architecture fills with the maps its scores read:
``"anomaly"`` (N, H, W), ``-max_c log p(x|c)`` scored at stride ``common_stride`` and upsampled (the
``gmm`` score; left out when all scores are logit-based); ``"anomaly_fullres"`` (N, H, W), the same
scored per input pixel on the upsampled, re-normalised embeddings (``GMMPredictor.fullres_anomaly_map``,
the ``gmm_fullres`` score); ``"anomaly_mahalanobis"`` (N, H, W), the distance to the nearest component in
its own stds (``GMMPredictor.mahalanobis_anomaly_map``, the ``gmm_mahalanobis`` score).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Callable

import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head as build_registered_head
from torch import Tensor, nn

from .anomaly_scores import CLASS_LIKELIHOOD, CLASS_LIKELIHOOD_FULLRES, CLASS_LIKELIHOOD_MAHALANOBIS
from .gmm_predictor import GMMPredictor

__all__ = [
    "DEFAULT_MAPS",
    "HEAD_MAPS",
    "DecoderTap",
    "GMMHead",
    "attach_gmm_predictor",
    "build_sem_seg_head",
    "convert_head_to_gmm",
    "gmm_class_of",
    "gmm_head_class",
    "pop_auxiliary_losses",
]


# the maps besides the logits a GMM head computes when named in ``GMMHead.forward``'s ``maps``
HEAD_MAPS = frozenset({CLASS_LIKELIHOOD, CLASS_LIKELIHOOD_FULLRES, CLASS_LIKELIHOOD_MAHALANOBIS})
# those it computes unless told otherwise: the ``anomaly`` map of the default ``gmm`` score
DEFAULT_MAPS = frozenset({CLASS_LIKELIHOOD})


class DecoderFeatures(Exception):
    """Carries the decoder features from an armed ``DecoderTap`` out of the head's forward (control flow,
    not an error: ``GMMHead.decoder_features`` always catches it)."""

    def __init__(self, features: Tensor) -> None:
        super().__init__("decoder features reached the GMM head's tap")
        self.features = features


class DecoderTap(nn.Module):
    """Stands where the head's 1x1 classifier was. Armed (``stop``, only inside ``GMMHead.forward``) it ends
    the head's forward with its input; otherwise it is the identity. No parameters, so no checkpoint key."""

    def __init__(self) -> None:
        super().__init__()
        self.stop = False

    def forward(self, x: Tensor) -> Tensor:
        if self.stop:
            raise DecoderFeatures(x)
        return x


def pop_auxiliary_losses(head: nn.Module) -> dict[str, Tensor]:
    """The losses ``head`` stored in ``head.auxiliary_losses`` during its last forward, handed over once
    (the attribute is emptied, so no graph outlives the step). Heads with a loss of their own besides the
    classifier's (OCRNet's soft-region branch) compute it before calling ``predictor`` and store it there:
    the GMM head's forward never returns to theirs, so this is how such a loss reaches the total."""
    losses = dict(getattr(head, "auxiliary_losses", None) or {})
    if losses:
        head.auxiliary_losses = {}
    return losses


class GMMHead(nn.Module):
    """The forward of a head whose classifier is ``gmm_predictor``; the head's own class comes next in the
    MRO and supplies the decoder (its forward up to ``predictor``), ``common_stride`` and ``loss_weight``."""

    predictor: DecoderTap
    gmm_predictor: GMMPredictor
    common_stride: int
    loss_weight: float

    def decoder_features(self, features: dict[str, Tensor], targets: Tensor | None = None) -> Tensor:
        """The (N, C_dec, H/s, W/s) features the head's forward gives its ``predictor``."""
        tap = self.predictor
        if not isinstance(tap, DecoderTap):
            raise TypeError(f"{type(self).__name__}.predictor is a {type(tap).__name__}, not a DecoderTap")
        tap.stop = True
        try:
            super().forward(features, targets)
        except DecoderFeatures as reached:
            return reached.features
        finally:
            tap.stop = False
        raise RuntimeError(
            f"{type(self).__name__}.forward returned without calling self.predictor: the GMM head cannot "
            "find its decoder features (see convert_head_to_gmm for the contract)"
        )

    def forward(
        self,
        features: dict[str, Tensor],
        targets: Tensor | None = None,
        *,
        maps: Collection[str] = DEFAULT_MAPS,
    ) -> tuple[dict[str, Tensor] | None, dict[str, Tensor]]:
        """Training: ``(None, losses)`` (``maps`` unused). Inference: the logits and the maps named in
        ``maps`` (module docstring): each costs time, so the meta-architecture names those a score reads."""
        outputs = self.gmm_predictor(self.decoder_features(features, targets))
        auxiliary = pop_auxiliary_losses(self)
        if self.training:
            logits = F.interpolate(
                outputs["logits"], scale_factor=self.common_stride, mode="bilinear", align_corners=False
            )
            losses = self.gmm_predictor.losses(outputs, targets, logits)
            losses["loss_sem_seg"] = losses["loss_sem_seg"] * self.loss_weight
            clash = sorted(set(auxiliary) & set(losses))
            if clash:
                raise KeyError(f"{type(self).__name__}.auxiliary_losses reuses the GMM losses' names {clash}")
            return None, {**losses, **auxiliary}
        unknown = sorted(set(maps) - HEAD_MAPS)
        if unknown:
            raise ValueError(f"unknown GMM head maps {unknown}; expected some of {sorted(HEAD_MAPS)}")
        # the predictor's logits are a permuted (N, H, W, C) tensor: upsampled as they are, the
        # full-resolution logits would be channels-last and every later full-resolution op (cropping,
        # posteriors) would copy them back; made contiguous on the stride-s grid, that copy is s^2 smaller
        logits = F.interpolate(
            outputs["logits"].contiguous(),
            scale_factor=self.common_stride,
            mode="bilinear",
            align_corners=False,
        )
        grid_maps = {CLASS_LIKELIHOOD: GMMPredictor.anomaly_map(outputs)} if CLASS_LIKELIHOOD in maps else {}
        if CLASS_LIKELIHOOD_MAHALANOBIS in maps:
            grid_maps[CLASS_LIKELIHOOD_MAHALANOBIS] = self.gmm_predictor.mahalanobis_anomaly_map(outputs)
        computed = {"logits": logits}
        for key, value in grid_maps.items():  # scored on the stride-s grid, upsampled as the logits
            computed[key] = F.interpolate(
                value[:, None], scale_factor=self.common_stride, mode="bilinear", align_corners=False
            )[:, 0]
        if CLASS_LIKELIHOOD_FULLRES in maps:  # it scores H x W pixels instead of H/s x W/s
            computed[CLASS_LIKELIHOOD_FULLRES] = self.gmm_predictor.fullres_anomaly_map(
                outputs["embeddings"], tuple(logits.shape[-2:])
            )
        return computed, {}


# head class -> the class its converted heads take: made on first use, or a named one (gmm_class_of)
_GMM_CLASSES: dict[type[nn.Module], type[GMMHead]] = {}


def gmm_head_class(base: type[nn.Module]) -> type[GMMHead]:
    """The class converted ``base`` heads take: ``GMM<Base>`` (``GMMHead``, then ``base``), made once."""
    if base not in _GMM_CLASSES:
        namespace = {"__module__": __name__, "__doc__": f"{base.__name__} with the GMM predictor."}
        _GMM_CLASSES[base] = type(f"GMM{base.__name__}", (GMMHead, base), namespace)
    return _GMM_CLASSES[base]


def gmm_class_of(base: type[nn.Module]) -> Callable[[type[GMMHead]], type[GMMHead]]:
    """Class decorator: converted ``base`` heads take the decorated class (a named ``GMMHead`` subclass
    of ``base`` that also builds the GMM head directly, as ``GMMSemSegFPNHead``), so both ways of building
    give one class."""

    def record(gmm_class: type[GMMHead]) -> type[GMMHead]:
        if not issubclass(gmm_class, base):
            raise TypeError(f"{gmm_class.__name__} is not a subclass of {base.__name__}")
        _GMM_CLASSES[base] = gmm_class
        return gmm_class

    return record


def attach_gmm_predictor(head: nn.Module, gmm_predictor: GMMPredictor) -> GMMHead:
    """Make ``head`` (in place) a GMM head with ``gmm_predictor``: its ``predictor`` becomes the tap and
    its class ``gmm_head_class(type(head))``. Nothing is checked: ``convert_head_to_gmm`` does."""
    head.predictor = DecoderTap()
    head.gmm_predictor = gmm_predictor
    if not isinstance(head, GMMHead):
        head.__class__ = gmm_head_class(type(head))
    return head


def convert_head_to_gmm(head: nn.Module, cfg: CfgNode) -> GMMHead:
    """Replace the 1x1 softmax classifier of a built semantic-segmentation head by a ``GMMPredictor``
    (``MODEL.GMM``), in place; returns the head. The contract the head must follow, as Detectron2's
    ``SemSegFPNHead``, ``DeepLabV3PlusHead`` and ``DeepLabV3Head`` do:

    1. ``head.predictor`` is its classifier: an ``nn.Conv2d`` with a 1x1 kernel (Detectron2's ``Conv2d``
       is one) from the decoder's C_dec channels to ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` logits;
    2. ``head.forward(features, targets=None)`` calls ``self.predictor`` once, on the (N, C_dec, H/s, W/s)
       decoder features (directly or inside ``layers()``), before anything that uses the logits: all that
       follows the call (softmax loss, upsampling, ...) never runs and is the GMM head's instead;
    3. ``head.common_stride`` is s (the GMM logits and anomaly map are upsampled by it to the input), and
       ``head.loss_weight`` scales the GMM cross-entropy as it scaled the softmax one;
    4. ``head.ignore_value``, if present, equals ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE``, which the GMM losses
       use; ``head.loss_type``, if present ("cross_entropy" | "hard_pixel_mining", as DeepLab's heads),
       picks the GMM cross-entropy, else plain cross-entropy;
    5. losses of the head's own besides the classifier's (an auxiliary branch, as OCRNet's soft object
       regions) are computed in forward before the ``predictor`` call and stored in the dict
       ``head.auxiliary_losses`` (``pop_auxiliary_losses``): the GMM head adds them to its losses.

    The softmax classifier's weights are dropped (the ``GMMPredictor`` is drawn after the head is built),
    so checkpoints hold ``<head>.gmm_predictor.*`` and no ``<head>.predictor.*``.
    """
    predictor = getattr(head, "predictor", None)
    name = type(head).__name__
    if isinstance(head, GMMHead):
        raise ValueError(f"{name} is a GMM head already: MODEL.GMM.ENABLED is for softmax heads")
    if not (isinstance(predictor, nn.Conv2d) and tuple(predictor.kernel_size) == (1, 1)):
        raise TypeError(f"{name}.predictor must be the head's 1x1 nn.Conv2d classifier, got {predictor!r}")
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    if predictor.out_channels != num_classes:
        raise ValueError(
            f"{name}.predictor has {predictor.out_channels} outputs, not MODEL.SEM_SEG_HEAD.NUM_CLASSES "
            f"= {num_classes}: it is not the head's classifier"
        )
    for attr in ("common_stride", "loss_weight"):
        if not hasattr(head, attr):
            raise AttributeError(f"{name} has no `{attr}`, which the GMM head needs")
    ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
    if getattr(head, "ignore_value", ignore_value) != ignore_value:
        raise ValueError(
            f"{name}.ignore_value = {head.ignore_value} differs from MODEL.SEM_SEG_HEAD.IGNORE_VALUE "
            f"= {ignore_value}, which the GMM losses use"
        )
    gmm_predictor = GMMPredictor.from_config(
        cfg, in_channels=predictor.in_channels, loss_type=getattr(head, "loss_type", "cross_entropy")
    )
    return attach_gmm_predictor(head, gmm_predictor)


def build_sem_seg_head(cfg: CfgNode, input_shape: dict[str, ShapeSpec]) -> nn.Module:
    """Detectron2's ``build_sem_seg_head``, converted by ``convert_head_to_gmm`` when
    ``MODEL.GMM.ENABLED``: the one call a meta-architecture needs to offer GMMSeg on any head."""
    head = build_registered_head(cfg, input_shape)
    return convert_head_to_gmm(head, cfg) if cfg.MODEL.GMM.ENABLED else head
