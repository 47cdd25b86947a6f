"""Per-pixel anomaly maps of mask classification (Mask2Former), all from one decoder output.

A mask-classification model classifies queries, not pixels: query q has class logits ``z_q`` (C real
classes + no object, last) and a mask ``m_q(x)``. Every map here is computed from those, at the input's
resolution, on the same forward pass as the semantic scores ``s_c(x) = sum_q p(c|q) sigmoid(m_q(x))``
(``mask_classification_scores``). Higher = more anomalous.

- ``mask_classification_anomaly`` (score ``gmm``, GMMMaskFormer, the default): the query likelihoods
  ``max_{c<C} log p(e_q|c)`` carried to the pixel by its soft ownership ``pi_q(x)`` (below).
- ``assigned_query_anomaly`` (score ``gmm_assigned``, GMMMaskFormer): the likelihood of the one query
  that claims the pixel, ``argmax_q pi_q(x)`` (hard instead of soft ownership, as Mask2Former's panoptic
  inference gives each pixel to one query).
- ``rejected_by_all`` (score ``rba``, both Mask2Formers): RbA, "Rejected by All" (Nayal et al., ICCV 2023),
  ``-sum_c tanh(s_c(x))``: each class's query masks act as a one-vs-all detector, and a pixel no class
  claims is anomalous. On GMMMaskFormer ``p(c|q)`` are the GMM posteriors, so the same formula gives the
  rejected-by-all score of the GMM class evidence.

The GMMSeg paper evaluates anomalies with per-pixel models only (DeepLab, SegFormer; ``-max_c log p(x|c)``,
SPEC.md section 3): it prescribes no anomaly score for Mask2Former. ``gmm`` stays the default because it
is that score's direct transfer (query likelihoods, weighted as Mask2Former's semantic inference weighs
queries) and, unlike the hard assignment, varies smoothly where masks overlap.

RbA on the class *likelihoods* instead of posteriors is not offered: ``tanh`` needs scores on a [0, ~1]
scale, while ``log p(e|c)`` of a D = 64 Gaussian spans hundreds of nats, so ``tanh`` would saturate to
+-1 and merely count the classes whose density exceeds 1, a threshold set by the dimension and units,
not by the data. "Rejected by every class density" is ``-max_c log p(e|c)`` itself: ``gmm`` and
``gmm_assigned``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "OWNERSHIP_FLOOR",
    "assigned_query_anomaly",
    "mask_classification_anomaly",
    "mask_classification_scores",
    "mask_weighted_sums",
    "ownership_anomaly_from_sums",
    "ownership_columns",
    "ownership_log_weights",
    "rejected_by_all",
]

# uniform floor of the pixel-to-query ownership weights: keeps pi defined where no query claims a pixel
OWNERSHIP_FLOOR = 1e-6


def _object_log_prob(mask_cls: Tensor) -> Tensor:
    """(B, Q) ``log(1 - p(no object|q))``, stable when the no-object probability rounds to 1."""
    logits = mask_cls.float()
    return torch.logsumexp(logits[..., :-1], dim=-1) - torch.logsumexp(logits, dim=-1)


def mask_classification_scores(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """Mask2Former's semantic scores ``sum_q p(c|q) sigmoid(m_q)``: (B, Q, C+1) logits and (B, Q, H, W)
    mask logits -> (B, C, H, W)."""
    return mask_weighted_sums(mask_cls, mask_pred)[0]


def mask_weighted_sums(
    mask_cls: Tensor, mask_pred: Tensor, extra_columns: Tensor | None = None
) -> tuple[Tensor, Tensor | None]:
    """The semantic scores (``mask_classification_scores``) and the mask-weighted sums ``sum_q
    sigmoid(m_q) v_q`` (B, E, H, W) of the (B, Q, E) ``extra_columns`` (None without), in one pass over
    the (B, Q, H, W) masks: the sigmoid and the product are the costly part of mask inference."""
    probs = F.softmax(mask_cls.float(), dim=-1)[..., :-1]
    classes = probs.shape[-1]
    if extra_columns is not None:
        probs = torch.cat([probs, extra_columns.float()], dim=-1)
    sums = torch.einsum("bqc,bqhw->bchw", probs, mask_pred.float().sigmoid())
    return sums[:, :classes], (sums[:, classes:] if extra_columns is not None else None)


def ownership_log_weights(mask_cls: Tensor, mask_pred: Tensor) -> Tensor:
    """(B, Q, H, W) ``log w_q(x)``, ``w_q(x) = (1 - p(no object|q)) sigmoid(m_q(x))``: Mask2Former's
    query weighting in semantic inference. In log space so that extreme mask logits never tie at 0."""
    return _object_log_prob(mask_cls)[..., None, None] + F.logsigmoid(mask_pred.float())


def ownership_columns(mask_cls: Tensor, query_score: Tensor) -> Tensor:
    """(B, Q, 2) per-query columns ``[o_q s_q, o_q]``, ``o_q = 1 - p(no object|q)``, ``s_q`` the query
    score: their mask-weighted sums over the queries, ``sum_q sigmoid(m_q(x)) [o_q s_q, o_q]``, are all
    the soft-ownership anomaly needs (``ownership_anomaly_from_sums``). Mask2Former's semantic inference
    sums ``p(c|q)`` with the same mask weights, so the two share one pass over the (B, Q, H, W) masks
    (``GMMMaskFormer``)."""
    object_prob = 1.0 - F.softmax(mask_cls.float(), dim=-1)[..., -1]
    return torch.stack([object_prob * query_score.float(), object_prob], dim=-1)


def ownership_anomaly_from_sums(sums: Tensor, query_score: Tensor) -> Tensor:
    """(B, H, W) ``-sum_q pi_q(x) s_q`` from the (B, 2, H, W) mask-weighted sums of ``ownership_columns``:
    with ``w_q = o_q sigmoid(m_q) + OWNERSHIP_FLOOR`` it is ``-(sum_q o_q sigmoid(m_q) s_q + floor sum_q
    s_q) / (sum_q o_q sigmoid(m_q) + floor Q)``."""
    score = query_score.float()
    floor_numerator = (OWNERSHIP_FLOOR * score.sum(dim=1))[:, None, None]
    numerator = sums[:, 0] + floor_numerator
    denominator = sums[:, 1] + OWNERSHIP_FLOOR * score.shape[1]
    return -numerator / denominator


def mask_classification_anomaly(mask_cls: Tensor, mask_pred: Tensor, query_score: Tensor) -> Tensor:
    """Per-pixel GMM anomaly (B, H, W): ``-sum_q pi_q(x) query_score_q``, soft ownership ``pi_q(x)``
    proportional to ``w_q(x) + OWNERSHIP_FLOOR``; ``query_score`` (B, Q) is ``max_{c<C} log p(e_q|c)``.

    Queries rejected as "no object" do not dilute the score, and an object that no class mixture
    explains, claimed by a query with an unlikely embedding, scores high (``mask_former`` docstring)."""
    columns = ownership_columns(mask_cls, query_score)
    sums = torch.einsum("bqk,bqhw->bkhw", columns, mask_pred.float().sigmoid())
    return ownership_anomaly_from_sums(sums, query_score)


def assigned_query_anomaly(mask_cls: Tensor, mask_pred: Tensor, query_score: Tensor) -> Tensor:
    """(B, H, W) ``-query_score[q*(x)]`` with ``q*(x) = argmax_q w_q(x)``: the likelihood of the query
    that claims the pixel, not an average over the queries that share it (which blends an anomalous
    object's query with the background queries around it). Ties go to the lower query index."""
    owner = ownership_log_weights(mask_cls, mask_pred).argmax(dim=1)  # (B, H, W)
    return -torch.gather(query_score.float(), 1, owner.flatten(1)).view_as(owner)


def rejected_by_all(class_scores: Tensor) -> Tensor:
    """RbA (B, H, W) ``-sum_c tanh(s_c(x))`` of (B, C, H, W) mask-classification class scores
    ``s_c(x) = sum_q p(c|q) sigmoid(m_q(x))`` over the real classes (no object excluded).

    Source: the official code, github.com/NazirNayal8/RbA, ``evaluate_ood.py::get_RbA``
    (``-logits.tanh().sum(dim=0)`` on the model's ``sem_seg``, which ``mask2former/maskformer_model.py::
    MaskFormer.semantic_inference`` makes as ``s_c`` above). ``s_c >= 0``, so ``tanh(s_c)`` in [0, 1): a
    class claims a pixel when its score is near 1, and the score is near 0 where every class rejects it.
    """
    return -torch.tanh(class_scores.float()).sum(dim=1)
