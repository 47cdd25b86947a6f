"""Class labels of Mask2Former's queries from the Hungarian matching: the class loss's targets in training,
and the reference for the calibration of the query posteriors at evaluation.

Why the Hungarian matching, and not the majority ground-truth class under each query's mask: the class
posterior ``p(c|q)`` over C real classes + "no object" is trained by cross-entropy against exactly these
labels (the matched class, or no object for every other query), so its calibration is only meaningful
against them. A majority label has no "no object": it would give a real class to every query whose mask
covers some pixels, and count a confident, correct rejection of a duplicate query as a confident error.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["evaluation_query_labels", "labels_from_matching", "query_calibration"]

Matching = Sequence[tuple[Tensor, Tensor]]


def labels_from_matching(
    indices: Matching, targets: Sequence[dict[str, Tensor]], shape: torch.Size, no_object: int
) -> Tensor:
    """(B, Q) labels: each matched query's target class, ``no_object`` for the others. ``indices``: per
    image (query indices, target indices), as Mask2Former's ``HungarianMatcher`` returns them."""
    device = targets[0]["labels"].device if len(targets) else torch.device("cpu")
    labels = torch.full(tuple(shape), no_object, dtype=torch.long, device=device)
    for b, ((query_idx, target_idx), target) in enumerate(zip(indices, targets)):
        labels[b, query_idx.to(device)] = target["labels"][target_idx.to(device)]
    return labels


@torch.no_grad()
def evaluation_query_labels(
    matcher: Callable[[dict[str, Tensor], list[dict[str, Tensor]]], Matching],
    pred_logits: Tensor,
    pred_masks: Tensor,
    targets: list[dict[str, Tensor]],
    no_object: int,
    seed: int = 0,
) -> Tensor:
    """(B, Q) Hungarian labels of (B, Q, C+1) class logits and (B, Q, h, w) mask logits, by the training
    matcher. Its mask costs are computed on randomly sampled points: they are drawn from ``seed`` inside a
    forked random state, so that the labels do not vary between evaluations and an evaluation during
    training leaves the training's random stream untouched."""
    device = pred_logits.device
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else []):
        torch.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        indices = matcher({"pred_logits": pred_logits, "pred_masks": pred_masks}, targets)
    return labels_from_matching(indices, targets, pred_logits.shape[:2], no_object).to(device)


def query_calibration(
    matcher: Callable[[dict[str, Tensor], list[dict[str, Tensor]]], Matching],
    pred_logits: Tensor,
    pred_masks: Tensor,
    targets: list[dict[str, Tensor]],
) -> list[dict[str, Tensor]]:
    """Per image ``{"posteriors": (Q, C+1), "labels": (Q,)}``: every query's class posterior (no object
    last) and its Hungarian label (C: no object), what ``SemSegEvaluator`` bins for the query ECE."""
    no_object = pred_logits.shape[-1] - 1
    labels = evaluation_query_labels(matcher, pred_logits, pred_masks, targets, no_object)
    posteriors = F.softmax(pred_logits.float(), dim=-1)
    return [{"posteriors": p, "labels": y} for p, y in zip(posteriors, labels)]
