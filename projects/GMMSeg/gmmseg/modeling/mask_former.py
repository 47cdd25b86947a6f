"""Mask2Former for semantic segmentation with the GMM class predictor, and its softmax twin.

Built on the official Mask2Former code (``maskformer2``): its backbone (ResNet or Swin), pixel decoder,
masked-attention transformer decoder, Hungarian matcher and set criterion (``mask_criterion.py``) are used
as they are. What GMMSeg-D2 adds:

- ``GMMMultiScaleMaskedTransformerDecoder``: Mask2Former's decoder whose class head (a linear layer over
  query embeddings, C + 1 logits) is a ``QueryGMMPredictor``: projected, normalised query embeddings scored
  by C + 1 Gaussian mixtures, no object being the last (see ``QueryGMMPredictor`` for why it is a mixture
  too). Its logits are the decoder's ``pred_logits``, so the matcher's class cost (``-p(c|q)``), the set
  criterion's cross-entropy (with the no-object weight) and semantic inference all use GMM posteriors.
- ``PosteriorMaskFormer``: the meta-architecture for the softmax decoder, with the project's inference
  contract (posteriors, anomaly scores, sliding windows) and training targets made from ``sem_seg``
  (so it shares the data mapper, and its label checks, with the per-pixel models).
- ``GMMMaskFormer``: the same for the GMM decoder. In training it also labels every query of the last
  decoder layer by the Hungarian matching (the matched ground-truth class, or no object), adds the
  component loss, whose E-step hands the query embeddings with those labels to ``GMMEMHook`` (the
  predictor's ``em_observer``), which fills the memory and runs EM exactly as for pixel heads.

Semantic inference is Mask2Former's: ``s_c(x) = sum_q p(c|q) sigmoid(m_q(x))`` over the real classes.
These scores do not sum to one over c; the posterior reported (``sem_seg``) is ``s_c(x) / sum_c' s_c'(x)``
(the argmax, hence mIoU, is Mask2Former's), and ``log s_c(x)`` serves as the logits of the post-hoc scores
(``max_logit`` is then ``-log max_c s_c(x)``, ``energy`` ``-log sum_c s_c(x)``: low foreground mass).

GMM anomaly score per pixel. The pixel-level model scores a pixel by ``-max_c log p(x|c)``. In mask
classification a pixel has no class evidence of its own: it receives the class evidence of the queries
whose masks claim it. So the pixel score is the expected query score under the pixel's soft ownership,

    anomaly(x) = - sum_q pi_q(x) max_{c<C} log p(e_q | c),
    pi_q(x) = w_q(x) / sum_q' w_q'(x),   w_q(x) = (1 - p(no object | q)) sigmoid(m_q(x)),

with the same query weighting as Mask2Former's semantic inference (mask probability times the query's
object probability), so queries rejected as "no object" do not dilute the score, and an object that no
class mixture explains, claimed by a query with an unlikely embedding, scores high. A small uniform floor
in ``w`` keeps ``pi`` defined where no query claims a pixel. The other mask-classification maps (the
claiming query's likelihood, RbA) and why this one is the default: ``mask_anomaly.py``; each is computed
only when a score of ``TEST.ANOMALY_SCORES`` reads it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.structures import ImageList
from mask2former.modeling.matcher import HungarianMatcher
from mask2former.modeling.transformer_decoder.mask2former_transformer_decoder import (
    MultiScaleMaskedTransformerDecoder,
)
from mask2former.modeling.transformer_decoder.maskformer_transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
)
from torch import Tensor

from .anomaly_scores import (
    CLASS_LIKELIHOOD,
    CLASS_LIKELIHOOD_ASSIGNED,
    LOGITS,
    MASK_CLASSIFICATION_MAPS,
    MASK_CLASSIFICATION_SOFTMAX_MAPS,
    REJECTED_BY_ALL,
)
from .gmm_predictor import QueryGMMPredictor
from .mask_anomaly import (
    OWNERSHIP_FLOOR,
    assigned_query_anomaly,
    mask_classification_anomaly,
    mask_classification_scores,
    mask_weighted_sums,
    ownership_anomaly_from_sums,
    ownership_columns,
    rejected_by_all,
)
from .mask_criterion import MaskFormerCriterion
from .meta_arch import PosteriorSemanticSegmentor
from .query_labels import labels_from_matching, query_calibration

__all__ = [
    "GMMMaskFormer",
    "GMMMultiScaleMaskedTransformerDecoder",
    "OWNERSHIP_FLOOR",
    "MaskFormerCriterion",
    "PosteriorMaskFormer",
    "mask_classification_anomaly",
    "mask_classification_scores",
    "mask_weighted_sums",
]


@TRANSFORMER_DECODER_REGISTRY.register()
class GMMMultiScaleMaskedTransformerDecoder(MultiScaleMaskedTransformerDecoder):
    """Mask2Former's masked-attention decoder with a GMM class predictor over the query embeddings.

    Every decoder layer's predictions (the deep-supervision ones too) come from the same predictor, as
    Mask2Former's shared ``class_embed``. The last layer's GMM outputs (embeddings, component and class
    log-likelihoods) are returned under ``"gmm"`` for the component loss, the EM batch and anomaly maps.
    """

    @configurable
    def __init__(self, in_channels, mask_classification=True, *, gmm_predictor: QueryGMMPredictor, **kwargs):
        super().__init__(in_channels, mask_classification, **kwargs)
        del self.class_embed  # replaced by the GMM predictor
        self.class_predictor = gmm_predictor
        self._layer_outputs: list[dict[str, Tensor]] = []

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int, mask_classification: bool) -> dict[str, Any]:
        ret = MultiScaleMaskedTransformerDecoder.from_config(cfg, in_channels, mask_classification)
        ret["gmm_predictor"] = QueryGMMPredictor.from_config(cfg, hidden_dim=cfg.MODEL.MASK_FORMER.HIDDEN_DIM)
        return ret

    def forward(self, x, mask_features, mask=None) -> dict[str, Any]:
        self._layer_outputs = []
        out = super().forward(x, mask_features, mask)
        out["gmm"] = self._layer_outputs[-1]
        self._layer_outputs = []
        return out

    def forward_prediction_heads(self, output: Tensor, mask_features: Tensor, attn_mask_target_size):
        """As Mask2Former's, but the class logits are the GMM predictor's normalised class scores."""
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # (B, Q, hidden)
        gmm_outputs = self.class_predictor(decoder_output)
        self._layer_outputs.append(gmm_outputs)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)
        # where a query's mask is below 0.5 it may not attend (Mask2Former's masked attention)
        attn_mask = F.interpolate(
            outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False
        )
        attn_mask = attn_mask.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1)
        return gmm_outputs["logits"], outputs_mask, (attn_mask < 0.5).detach()


@META_ARCH_REGISTRY.register()
class PosteriorMaskFormer(PosteriorSemanticSegmentor):
    """Mask2Former (semantic) with the project's data, evaluation and inference contract.

    Training: ``sem_seg`` labels become per-class binary masks (one target per class present, ignore
    pixels in none), matched to queries by Mask2Former's Hungarian matcher; losses are Mask2Former's
    (class cross-entropy with the no-object weight, point-sampled mask BCE and dice, on every decoder
    layer). Inference: see the module docstring; where the inputs carry ``sem_seg`` (evaluation on a
    labelled split) and no sliding window is used, each result also holds ``query_calibration``, the
    queries' posteriors and Hungarian labels (``query_labels.py``), for the query-level ECE.
    """

    @configurable
    def __init__(
        self,
        *,
        criterion: MaskFormerCriterion,
        size_divisibility: int,
        ignore_value: int,
        deep_supervision: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.criterion = criterion
        self.deep_supervision = deep_supervision
        if size_divisibility >= 0:
            self.size_divisibility = size_divisibility
        self.ignore_value = ignore_value
        self.num_classes = self.sem_seg_head.num_classes
        self._queries: tuple[Tensor, Tensor] | None = None  # the last inference pass's class and mask logits

    @classmethod
    def from_config(cls, cfg: CfgNode) -> dict[str, Any]:
        ret = PosteriorSemanticSegmentor.from_config(cfg)
        mf = cfg.MODEL.MASK_FORMER
        matcher = HungarianMatcher(
            cost_class=mf.CLASS_WEIGHT,
            cost_mask=mf.MASK_WEIGHT,
            cost_dice=mf.DICE_WEIGHT,
            num_points=mf.TRAIN_NUM_POINTS,
        )
        ret["criterion"] = MaskFormerCriterion(
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            matcher=matcher,
            class_weight=mf.CLASS_WEIGHT,
            mask_weight=mf.MASK_WEIGHT,
            dice_weight=mf.DICE_WEIGHT,
            # one set of auxiliary losses per decoder layer before the last (none without deep supervision)
            num_layers=mf.DEC_LAYERS - 1 if mf.DEEP_SUPERVISION else 0,
            eos_coef=mf.NO_OBJECT_WEIGHT,
            losses=["labels", "masks"],
            num_points=mf.TRAIN_NUM_POINTS,
            oversample_ratio=mf.OVERSAMPLE_RATIO,
            importance_sample_ratio=mf.IMPORTANCE_SAMPLE_RATIO,
        )
        ret["size_divisibility"] = mf.SIZE_DIVISIBILITY
        ret["ignore_value"] = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        ret["deep_supervision"] = mf.DEEP_SUPERVISION
        return ret

    def head_maps(self) -> frozenset[str]:
        """Mask2Former's semantic scores serve as logits, and give RbA; no class likelihoods."""
        return MASK_CLASSIFICATION_SOFTMAX_MAPS

    def penultimate_layer(self) -> None:
        """None: queries, not pixels, are classified, so post-hoc models of pixel features do not apply."""
        return None

    def forward(self, batched_inputs: list[dict[str, Any]]):
        if not self.training:
            results = super().forward(batched_inputs)
            queries, self._queries = self._queries, None
            labelled = all("sem_seg" in x for x in batched_inputs)
            if queries is not None and self.sliding_window is None and labelled:
                images = ImageList.from_tensors([x["image"] for x in batched_inputs], self.size_divisibility)
                targets = self.prepare_targets(batched_inputs, images)
                for result, calibration in zip(
                    results, query_calibration(self.criterion.matcher, *queries, targets)
                ):
                    result["query_calibration"] = calibration
            return results
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        if not self.deep_supervision:
            outputs = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        targets = self.prepare_targets(batched_inputs, images)
        losses, indices = self.criterion.match_and_losses(outputs, targets)
        losses.update(self.extra_losses(outputs, targets, indices))
        return losses

    def extra_losses(
        self, outputs: dict[str, Any], targets: list[dict[str, Tensor]], indices: list[tuple[Tensor, Tensor]]
    ) -> dict[str, Tensor]:
        """Losses beyond Mask2Former's (none for the softmax decoder)."""
        return {}

    def prepare_targets(
        self, batched_inputs: list[dict[str, Any]], images: ImageList
    ) -> list[dict[str, Tensor]]:
        """Per image ``{"labels": (T,), "masks": (T, H_pad, W_pad)}``: one binary mask per class present
        in ``sem_seg`` (ignored and padded pixels belong to none)."""
        if "sem_seg" not in batched_inputs[0]:
            raise ValueError("training a mask-classification model needs 'sem_seg' labels in its inputs")
        labels = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs], self.size_divisibility, self.ignore_value
        ).tensor
        if labels.shape[-2:] != images.tensor.shape[-2:]:
            raise ValueError(
                f"label size {tuple(labels.shape[-2:])} differs from the padded image size "
                f"{tuple(images.tensor.shape[-2:])}"
            )
        targets = []
        for label in labels:
            classes = torch.unique(label)
            classes = classes[(classes != self.ignore_value) & (classes >= 0) & (classes < self.num_classes)]
            targets.append({"labels": classes, "masks": (label[None] == classes[:, None, None]).float()})
        return targets

    def _window_maps(self, images: Tensor) -> dict[str, Tensor]:
        outputs = self.sem_seg_head(self.backbone(images))
        self._queries = (outputs["pred_logits"], outputs["pred_masks"])
        mask_pred = F.interpolate(
            outputs["pred_masks"], size=images.shape[-2:], mode="bilinear", align_corners=False
        )
        query_score = self.query_scores(outputs)  # once per window: the sums and the maps share it
        columns = self.aggregated_columns(outputs, query_score)
        scores, sums = mask_weighted_sums(outputs["pred_logits"], mask_pred, columns)
        maps = {LOGITS: torch.log(scores.clamp_min(torch.finfo(scores.dtype).tiny))}
        maps.update(self.extra_maps(outputs, mask_pred, scores, sums, query_score))
        return maps

    def query_scores(self, outputs: dict[str, Any]) -> Tensor | None:
        """(B, Q) per-query scores the maps read, made once per window (None: none)."""
        return None

    def aggregated_columns(self, outputs: dict[str, Any], query_score: Tensor | None) -> Tensor | None:
        """(B, Q, E) per-query values whose mask-weighted sums ``extra_maps`` needs, summed in the same pass
        as the semantic scores (None: none)."""
        return None

    def extra_maps(
        self,
        outputs: dict[str, Any],
        mask_pred: Tensor,
        scores: Tensor,
        sums: Tensor | None,
        query_score: Tensor | None,
    ) -> dict[str, Tensor]:
        """Further (B, H, W) maps from the decoder outputs, the upsampled mask logits, the semantic scores
        ``s_c`` (B, C, H, W), the sums of ``aggregated_columns`` of the same pass and ``query_scores``: RbA
        when a score reads it."""
        if REJECTED_BY_ALL in self.needed_maps:
            return {REJECTED_BY_ALL: rejected_by_all(scores)}
        return {}


@META_ARCH_REGISTRY.register()
class GMMMaskFormer(PosteriorMaskFormer):
    """Mask2Former whose class predictor is GMMSeg's: needs ``GMMMultiScaleMaskedTransformerDecoder``.

    Training adds the component loss over the last layer's queries and the EM batch for ``GMMEMHook``:
    every query of the last layer with its label from the Hungarian matching (the matched class, or no
    object) and whether the GMM posterior's argmax agrees. Inference adds the ``anomaly`` map (when a
    score reads it).

    With queries, enqueue every matched query (``MODEL.GMM.ENQUEUE_CORRECT_ONLY False``, as the configs
    do): under the pixel heads' correct-only filter, "no object" is the only class right from the start,
    so it alone gets fitted; its small variances make its score an outlier among the class scores, the
    LayerNorm over them squashes the real classes' logits together, and those classes never become
    correct, so they are never fitted (on DigitScapes the class loss stayed at log 13).
    """

    @configurable
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(self.sem_seg_head.predictor, GMMMultiScaleMaskedTransformerDecoder):
            raise ValueError(
                "GMMMaskFormer needs MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "
                "'GMMMultiScaleMaskedTransformerDecoder'"
            )

    def head_maps(self) -> frozenset[str]:
        """Logits, RbA and the query-likelihood maps, soft and hard ownership (``extra_maps``)."""
        return MASK_CLASSIFICATION_MAPS

    @property
    def gmm_predictor(self) -> QueryGMMPredictor:
        return self.sem_seg_head.predictor.class_predictor

    def extra_losses(self, outputs, targets, indices):
        query_labels = labels_from_matching(
            indices, targets, outputs["pred_logits"].shape[:2], self.num_classes
        )
        return self.gmm_predictor.losses(outputs["gmm"], query_labels.to(outputs["pred_logits"].device))

    def query_scores(self, outputs):
        """``max_{c<C} log p(e_q|c)`` (``object_log_prob``), which both query-likelihood maps read (None
        when no score reads either)."""
        if not {CLASS_LIKELIHOOD, CLASS_LIKELIHOOD_ASSIGNED} & self.needed_maps:
            return None
        return self.gmm_predictor.object_log_prob(outputs["gmm"])

    def aggregated_columns(self, outputs, query_score):
        """The soft-ownership anomaly's per-query columns (``ownership_columns``) when a score reads that
        map: summed with the semantic scores, one pass over the masks instead of two."""
        if CLASS_LIKELIHOOD not in self.needed_maps:
            return None
        return ownership_columns(outputs["pred_logits"], query_score)

    def extra_maps(self, outputs, mask_pred, scores, sums, query_score):
        """The softmax model's maps, and each query-likelihood map a score reads: the ``anomaly`` map
        (soft ownership, ``mask_classification_anomaly`` from the sums of ``aggregated_columns``; the
        default ``gmm`` score reads it) and the claiming query's likelihood."""
        maps = super().extra_maps(outputs, mask_pred, scores, sums, query_score)
        if CLASS_LIKELIHOOD in self.needed_maps:
            maps[CLASS_LIKELIHOOD] = ownership_anomaly_from_sums(sums, query_score)
        if CLASS_LIKELIHOOD_ASSIGNED in self.needed_maps:
            mask_cls = outputs["pred_logits"]
            maps[CLASS_LIKELIHOOD_ASSIGNED] = assigned_query_anomaly(mask_cls, mask_pred, query_score)
        return maps
