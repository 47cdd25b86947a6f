"""The GMM predictor that replaces a segmentation head's softmax 1x1 convolution.

Data flow (one way): decoder features -> 1x1 projection (+norm +ReLU) -> LayerNorm -> L2 normalisation
= embeddings (D dims) -> per-class Gaussian mixtures = component log-likelihoods (C x K) -> class scores
(max or log-mean-exp over K) -> LayerNorm over the C scores (learned per-class scale/shift, as the
reference) -> logits. Training back-propagates the cross-entropy of the logits (and a small cross-entropy
over the C*K components) into the embeddings only: the mixture parameters are buffers, fitted by EM.

The predictor is a scorer: it neither holds nor updates the memory. Its losses run the step's one E-step
(``e_step``, whose assignments are the component loss's targets) and hand the labelled embeddings with
those assignments, their classes and whether they were classified correctly, as an ``EMBatch``, to
``em_observer``: whoever fits the mixtures (``GMMEMHook``, which passes it on to ``gmm.OnlineGMM``).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import Conv2d, get_norm
from detectron2.projects.deeplab.loss import DeepLabCE
from torch import Tensor, nn

from gmmseg.gmm import EMBatch, EStep, GaussianMixtureClassifier, float32_region, unfitted_std

from .folded_projection import project_channels_last

__all__ = ["GMMPredictor", "GMMPredictorBase", "QueryGMMPredictor"]


class GMMPredictorBase(nn.Module):
    """The part of a model that scores embeddings with class mixtures; what ``GMMEMHook`` works with.

    Holds the mixtures (``gmm``: ``num_classes`` mixtures of ``num_components`` Gaussians in ``embed_dim``
    dims, buffers fitted only by EM), the normalisation of the class scores into logits, and the E-step
    (``e_step``) of the component loss. In training, its losses give each step's ``EMBatch`` to
    ``em_observer`` when one is set (and the mixtures are fitted by EM): the one channel from the model to
    the online EM. Subclasses say what is embedded: pixels (``GMMPredictor``) or Mask2Former queries
    (``QueryGMMPredictor``).
    """

    em_observer: Callable[[EMBatch], None] | None
    feature_norm: nn.Module  # the subclass's LayerNorm of the projected features (``normalise``)

    def __init__(
        self,
        num_classes: int,
        *,
        embed_dim: int = 64,
        num_components: int = 5,
        class_score: str = "wta",
        logit_norm: str = "layernorm",
        logit_norm_init_scale: float = 1.0,
        e_step: EStep | None = None,
        component_loss_weight: float = 0.01,
        fit: str = "em",
        initial_std: float | None = None,
    ) -> None:
        """``e_step``: the E-step settings (default ``EStep()``: Sinkhorn); ``initial_std``: the mixtures'
        stds before their first M-step (default ``unfitted_std``)."""
        super().__init__()
        if fit not in ("em", "backprop"):
            raise ValueError(f"fit must be 'em' or 'backprop', got {fit!r}")
        self.fit = fit
        self.num_classes = num_classes
        self.num_components = num_components
        self.embed_dim = embed_dim
        self.e_step = e_step if e_step is not None else EStep()
        self.component_loss_weight = component_loss_weight
        self._scoring_args = (class_score, logit_norm, logit_norm_init_scale, initial_std)
        self.em_observer = None

    def _build_scoring(self) -> None:
        """Create the mixtures and the logit normalisation. Subclasses call it after building their
        embedding layers, so that parameters are initialised in the same order (and from the same random
        draws) as in earlier releases."""
        class_score, logit_norm, init_scale, initial_std = self._scoring_args
        self.gmm = GaussianMixtureClassifier(
            self.num_classes,
            self.num_components,
            self.embed_dim,
            score=class_score,
            trainable=self.fit == "backprop",
            initial_std=initial_std,
        )
        self.logit_norm = nn.LayerNorm(self.num_classes) if logit_norm == "layernorm" else nn.Identity()
        if logit_norm == "layernorm":
            nn.init.constant_(self.logit_norm.weight, init_scale)

    @staticmethod
    def gmm_kwargs(cfg: CfgNode) -> dict:
        """The constructor arguments that come from ``MODEL.GMM`` (the memory and M-step settings are the
        online EM's: ``GMMEMHook.from_config``)."""
        gmm = cfg.MODEL.GMM
        return {
            "embed_dim": gmm.EMBED_DIM,
            "num_components": gmm.NUM_COMPONENTS,
            "class_score": gmm.CLASS_SCORE,
            "logit_norm": gmm.LOGIT_NORM,
            "logit_norm_init_scale": gmm.LOGIT_NORM_INIT_SCALE,
            "e_step": EStep(gmm.E_STEP, gmm.SINKHORN_EPSILON, gmm.SINKHORN_ITERS),
            "component_loss_weight": gmm.COMPONENT_LOSS_WEIGHT,
            "fit": gmm.FIT,
            # the std the M-step gives a component with no feature (random unit vectors + VAR_FLOOR)
            "initial_std": unfitted_std(gmm.EMBED_DIM, gmm.VAR_FLOOR),
        }

    @float32_region
    def normalise(self, projected: Tensor) -> Tensor:
        """(..., D) projected features -> unit-length embeddings (LayerNorm, then L2), in float32 even
        under autocast: the log-likelihoods are only as precise as the embeddings."""
        return F.normalize(self.feature_norm(projected.float()), dim=-1)

    @float32_region
    def score(self, embeddings: Tensor) -> dict[str, Tensor]:
        """For (..., D) embeddings: component log-likelihoods (..., C, K), class scores ``log p(x|c)``
        (..., C) and the normalised class scores (..., C) whose softmax is the posterior; all float32 under
        autocast too (``gmmseg.gmm.precision``)."""
        component = self.gmm.component_log_prob(embeddings)
        class_scores = self.gmm.class_log_prob(embeddings, component)
        return {
            "embeddings": embeddings,
            "component_log_prob": component,
            "class_log_prob": class_scores,
            "logits": self.logit_norm(class_scores),
        }

    def component_loss(self, component_log_prob: Tensor, labels: Tensor, assignment: Tensor) -> Tensor:
        """Cross-entropy over all C*K components (weight ``component_loss_weight``) for (P, C, K)
        log-likelihoods; the target of an item of class c is (c, ``assignment``: its component under this
        process's E-step). Items labelled -1 are left out; without any, an exact zero that keeps the
        graph."""
        valid = labels >= 0
        if self.component_loss_weight <= 0 or not bool(valid.any()):
            return component_log_prob.sum() * 0.0  # keep the graph connected (DDP)
        target = labels[valid] * self.num_components + assignment[valid]
        flat = component_log_prob[valid].reshape(-1, self.num_classes * self.num_components)
        return F.cross_entropy(flat, target) * self.component_loss_weight

    def e_step_and_component_loss(
        self, embeddings: Tensor, component_log_prob: Tensor, labels: Tensor, correct: Tensor
    ) -> Tensor:
        """The step's one E-step on (P, D) embeddings, (P, C, K) log-likelihoods, (P,) labels (-1: none)
        and (P,) correctness: returns the component loss and gives the labelled items' ``EMBatch`` to
        ``em_observer``."""
        assignment = self.e_step.assign(component_log_prob.detach(), labels)
        loss = self.component_loss(component_log_prob, labels, assignment)
        if self.em_observer is not None and self.fitted_by_em:
            valid = labels >= 0
            self.em_observer(
                EMBatch(embeddings.detach()[valid], labels[valid], correct[valid], assignment[valid])
            )
        return loss

    @property
    def fitted_by_em(self) -> bool:
        """Whether the mixtures are fitted by EM (``GMMEMHook``), not learned by back-propagation."""
        return self.fit == "em"


class GMMPredictor(GMMPredictorBase):
    """Pixel embeddings and GMM class scores for a (N, in_channels, H, W) feature map."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        norm: str = "BN",
        ignore_value: int = 255,
        loss_type: str = "cross_entropy",
        projection_activation: str = "relu",
        **kwargs,
    ) -> None:
        """``projection_activation``: "relu" after the 1x1 projection (+ norm), as the reference, or
        "none"."""
        super().__init__(num_classes, **kwargs)
        if projection_activation not in ("relu", "none"):
            raise ValueError(f"projection_activation must be 'relu' or 'none', got {projection_activation!r}")
        self.ignore_value = ignore_value
        if loss_type not in ("cross_entropy", "hard_pixel_mining"):
            raise ValueError(f"loss_type must be 'cross_entropy' or 'hard_pixel_mining', got {loss_type!r}")
        # DeepLab's bootstrapped cross-entropy (the hardest 20% of pixels), as the softmax DeepLab head
        self.hard_pixel_loss = (
            DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=0.2)
            if loss_type == "hard_pixel_mining"
            else None
        )
        self.projection = Conv2d(
            in_channels,
            self.embed_dim,
            kernel_size=1,
            bias=not norm,
            norm=get_norm(norm, self.embed_dim),
            activation=F.relu if projection_activation == "relu" else None,
        )
        nn.init.kaiming_normal_(self.projection.weight, mode="fan_out", nonlinearity="relu")
        self.feature_norm = nn.LayerNorm(self.embed_dim)
        self._build_scoring()

    @classmethod
    def from_config(cls, cfg: CfgNode, in_channels: int, loss_type: str = "cross_entropy") -> GMMPredictor:
        """Predictor from ``MODEL.GMM`` and the head's class count, norm and ignore value; ``loss_type``
        follows the head being replaced (DeepLab: ``MODEL.SEM_SEG_HEAD.LOSS_TYPE``; FPN: cross-entropy)."""
        return cls(
            in_channels,
            cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            norm=cfg.MODEL.SEM_SEG_HEAD.NORM,
            ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
            loss_type=loss_type,
            projection_activation=cfg.MODEL.GMM.PROJECTION_ACTIVATION,
            **cls.gmm_kwargs(cfg),
        )

    def embed(self, x: Tensor) -> Tensor:
        """(N, C_in, H, W) -> (N, H, W, D) unit-length embeddings. At inference the projection is one GEMM
        into channels-last embeddings, its norm folded in (``folded_projection``); in training (or with a
        norm that cannot be folded) the ``Conv2d`` module, then a permute."""
        projected = None if self.training else project_channels_last(self.projection, x)
        if projected is None:
            projected = self.projection(x).permute(0, 2, 3, 1)
        return self.normalise(projected)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Embeddings (N, H, W, D), component log-likelihoods (N, H, W, C, K), class scores
        ``log p(x|c)`` (N, H, W, C), and the logits (N, C, H, W) that the posterior is the softmax of."""
        outputs = self.score(self.embed(x))
        outputs["logits"] = outputs["logits"].permute(0, 3, 1, 2)
        return outputs

    @staticmethod
    def anomaly_map(outputs: dict[str, Tensor]) -> Tensor:
        """(N, H, W) anomaly score ``-max_c log p(x|c)``, from the generative scores (before any
        normalisation across classes)."""
        return -outputs["class_log_prob"].amax(dim=-1)

    def mahalanobis_anomaly_map(self, outputs: dict[str, Tensor]) -> Tensor:
        """(N, H, W) ``min_{c,k} 0.5 * ||(x - mu_ck) / s_ck||^2``: the ``gmm_mahalanobis`` score, the
        paper's ``-max_c log p(x|c)`` without each component's log-determinant (volume) term.

        Why an option: a class whose fitted stds are broader (sky on some seeds) has a smaller
        log-determinant, so even its typical pixels get a lower ``log p(x|c)`` and rank with anomalies;
        the distance in units of each component's own stds compares a pixel with what that component
        expects of its samples (``GaussianMixtureClassifier.half_mahalanobis``)."""
        return self.gmm.half_mahalanobis(outputs["component_log_prob"]).flatten(-2).amin(dim=-1)

    @torch.no_grad()
    def fullres_class_log_prob(
        self,
        embeddings: Tensor,
        size: tuple[int, int],
        *,
        max_over_classes: bool = False,
        max_elements: int = 1 << 23,
    ) -> Tensor:
        """Class scores ``log p(x|c)`` (N, H, W, C) of the (N, h, w, D) embeddings carried to ``size`` =
        (H, W); with ``max_over_classes`` only ``max_c log p(x|c)`` (N, H, W).

        Each output pixel's embedding is the bilinear interpolation (``align_corners=False``, as the
        logits' upsampling) of its four grid neighbours, put back on the unit sphere: a convex
        combination of unit vectors is shorter than 1 (between two embeddings at angle t, by cos(t/2)
        midway), and the mixtures were fitted to unit vectors only, so an unnormalised blend would look
        unlikely merely for lying on a class boundary. The pixels are scored in bands of output rows of
        about ``max_elements`` values each, so memory does not grow with H x W x (D + C x K).
        """
        n, h, w, d = embeddings.shape
        height, width = int(size[0]), int(size[1])
        device = embeddings.device

        def source(out_len: int, in_len: int) -> tuple[Tensor, Tensor, Tensor]:
            # PyTorch's bilinear source index: (i + 0.5) * in / out - 0.5, clamped at 0
            pos = ((torch.arange(out_len, device=device) + 0.5) * (in_len / out_len) - 0.5).clamp_min(0)
            low = pos.floor().long().clamp_max(in_len - 1)
            return low, (low + 1).clamp_max(in_len - 1), (pos - low).to(embeddings.dtype)

        y0, y1, wy = source(height, h)
        x0, x1, wx = source(width, w)
        wx = wx[:, None]
        classes = self.num_classes
        per_row = n * width * (3 * d + classes * self.num_components)
        rows = max(1, max_elements // max(per_row, 1))
        out = embeddings.new_empty((n, height, width) if max_over_classes else (n, height, width, classes))
        for start in range(0, height, rows):
            band = slice(start, start + rows)
            top, bottom = embeddings[:, y0[band]], embeddings[:, y1[band]]  # (N, R, w, D)
            top = top[:, :, x0] * (1 - wx) + top[:, :, x1] * wx  # (N, R, W, D)
            bottom = bottom[:, :, x0] * (1 - wx) + bottom[:, :, x1] * wx
            wy_band = wy[band][None, :, None, None]
            x = F.normalize(top * (1 - wy_band) + bottom * wy_band, dim=-1)
            scores = self.gmm.class_log_prob(x)
            out[:, band] = scores.amax(dim=-1) if max_over_classes else scores
        return out

    def fullres_anomaly_map(self, embeddings: Tensor, size: tuple[int, int]) -> Tensor:
        """(N, H, W) ``-max_c log p(x|c)`` scored at each pixel of ``size`` (``fullres_class_log_prob``),
        instead of scored on the embeddings' grid and then upsampled (``anomaly_map``)."""
        return -self.fullres_class_log_prob(embeddings, size, max_over_classes=True)

    def losses(self, outputs: dict[str, Tensor], targets: Tensor, logits_full: Tensor) -> dict[str, Tensor]:
        """Cross-entropy of the posteriors at label resolution (``logits_full``, already upsampled by the
        head), plus the component loss at feature resolution, whose E-step also gives the EM batch.

        A batch without any labelled pixel gives exact zeros (not NaN), with the graph kept connected.
        """
        labelled = (targets != self.ignore_value).sum()
        if self.hard_pixel_loss is not None and bool(labelled > 0):
            loss_sem_seg = self.hard_pixel_loss(logits_full, targets)
        else:
            loss_sem_seg = F.cross_entropy(
                logits_full, targets, ignore_index=self.ignore_value, reduction="sum"
            )
            loss_sem_seg = loss_sem_seg / labelled.clamp_min(1)

        n, h, w, _ = outputs["class_log_prob"].shape
        labels = F.interpolate(targets[:, None].float(), size=(h, w), mode="nearest").long().reshape(-1)
        labels = torch.where((labels >= 0) & (labels < self.num_classes), labels, torch.full_like(labels, -1))
        component = outputs["component_log_prob"].reshape(n * h * w, self.num_classes, self.num_components)
        prediction = outputs["logits"].detach().argmax(dim=1).reshape(-1)
        embeddings = outputs["embeddings"].reshape(-1, self.embed_dim)
        loss_component = self.e_step_and_component_loss(embeddings, component, labels, prediction == labels)
        return {"loss_sem_seg": loss_sem_seg, "loss_gmm_component": loss_component}


class QueryGMMPredictor(GMMPredictorBase):
    """Mask2Former's class predictor as GMMs: query embeddings -> C + 1 class mixtures.

    A query's decoder output (hidden_dim) is projected to D dims by a linear layer, LayerNorm-ed and
    L2-normalised, as GMMSeg's pixel embeddings are, and scored by ``num_classes + 1`` mixtures. The last
    mixture is "no object": in Mask2Former the queries that the Hungarian matcher leaves unmatched are
    trained towards an extra class, and keeping that class generative (its own K Gaussians, fitted by EM
    on the unmatched queries' embeddings) keeps the posterior ``p(c | q)`` a plain Bayes rule over
    mixtures, so the matcher's class cost, the set criterion and semantic inference all use the same
    GMM posteriors. Anomaly scores use only the ``num_classes`` real mixtures.
    """

    def __init__(self, hidden_dim: int, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes + 1, **kwargs)
        self.num_object_classes = num_classes
        self.projection = nn.Linear(hidden_dim, self.embed_dim)
        self.feature_norm = nn.LayerNorm(self.embed_dim)
        self._build_scoring()

    @classmethod
    def from_config(cls, cfg: CfgNode, hidden_dim: int) -> QueryGMMPredictor:
        return cls(hidden_dim, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, **cls.gmm_kwargs(cfg))

    def forward(self, queries: Tensor) -> dict[str, Tensor]:
        """For (B, Q, hidden_dim) decoder outputs: embeddings (B, Q, D), component log-likelihoods
        (B, Q, C+1, K), class scores (B, Q, C+1) and logits (B, Q, C+1), no-object last."""
        return self.score(self.normalise(self.projection(queries)))

    def object_log_prob(self, outputs: dict[str, Tensor]) -> Tensor:
        """(B, Q) ``max_c log p(q | c)`` over the real classes (no-object excluded)."""
        return outputs["class_log_prob"][..., : self.num_object_classes].amax(dim=-1)

    def losses(self, outputs: dict[str, Tensor], query_labels: Tensor) -> dict[str, Tensor]:
        """Component loss for (B, Q) query labels (matched class, or ``num_classes`` = no object); its
        E-step gives the EM batch: every query's embedding, label and whether its argmax matched it."""
        labels = query_labels.reshape(-1)
        component = outputs["component_log_prob"].reshape(-1, self.num_classes, self.num_components)
        prediction = outputs["logits"].detach().argmax(dim=-1).reshape(-1)
        embeddings = outputs["embeddings"].reshape(-1, self.embed_dim)
        return {
            "loss_gmm_component": self.e_step_and_component_loss(
                embeddings, component, labels, prediction == labels
            )
        }
