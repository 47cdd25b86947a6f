"""How an anomaly evaluation turns many images into one number: pooled pixels or the mean over images.

``pooled`` (the default; SegmentMeIfYouCan, Fishyscapes): every non-void pixel of the split is one
sample of one curve. ``per_image`` (``pytorch-ood``'s ``OODPerImageSegmentationMetrics``): AUROC / AP /
FPR95 of each image separately, then the mean over the images; images without in-distribution or without
anomaly pixels have no curve and are skipped (and counted). Either way AP is the step sum of
scikit-learn's ``average_precision_score`` and FPR95 the FPR at the first threshold whose TPR >= 0.95
(:mod:`.anomaly_ranking`).

Also here: the evaluator's component metrics (:mod:`.anomaly_components`) on the images it kept, at the
threshold of the split's best pixel F1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .anomaly_components import (
    ComponentSettings,
    ImageComponents,
    aggregate_components,
    best_f1_point,
    image_components,
)
from .anomaly_labels import CODE_ID, NUM_CODES, SUBSETS
from .anomaly_ranking import VOID, grouped_counts, metrics_from_counts

__all__ = [
    "AGGREGATIONS",
    "add_conventions",
    "components_at_best_f1",
    "image_metrics",
    "per_image_means",
    "threshold_components",
]

AGGREGATIONS = ("pooled", "per_image")


def image_metrics(
    scores: np.ndarray, codes: np.ndarray, subsets: Mapping[str, Sequence[int]]
) -> dict[str, dict[str, float]]:
    """``{subset: {"auroc", "ap", "fpr95"}}`` of one image's valid pixels, for each subset (anomaly codes)
    that the image has together with in-distribution pixels; other subsets are left out (skipped)."""
    counts = grouped_counts(scores, codes, NUM_CODES)
    out = {}
    neg = counts[:, CODE_ID]
    for name, members in subsets.items():
        pos = counts[:, list(members)].sum(axis=1)
        if pos.sum() > 0 and neg.sum() > 0:
            out[name] = metrics_from_counts(pos, neg)
    return out


def per_image_means(
    records: Sequence[Mapping[str, Mapping[str, Mapping[str, float]]]], score: str, subset: str
) -> tuple[dict[str, float], int]:
    """Mean (fractions) of each metric over the images whose record has ``score`` / ``subset``, and their
    number. ``math.fsum`` makes the mean independent of the order in which images arrived."""
    values = [r[score][subset] for r in records if subset in r.get(score, {})]
    if not values:
        return {}, 0
    return {k: math.fsum(v[k] for v in values) / len(values) for k in ("auroc", "ap", "fpr95")}, len(values)


def threshold_components(
    score_map: np.ndarray, codes: np.ndarray, settings: ComponentSettings, threshold: float, strict: bool
) -> ImageComponents:
    """One image's components with the prediction ``score > threshold`` (``strict``, the benchmark's rule
    for a given threshold) or ``score >= threshold`` (a curve point's score value)."""
    void = codes == VOID
    pred = score_map > threshold if strict else score_map >= threshold
    anomaly = (codes != CODE_ID) & ~void
    return image_components(pred, anomaly, void, settings.min_pred_size, settings.min_gt_size)


def components_at_best_f1(
    states: Sequence[Mapping[str, Any]],
    name: str,
    counts: np.ndarray,
    values: np.ndarray,
    members: Sequence[int],
    settings: ComponentSettings,
) -> tuple[list[ImageComponents], dict[str, float]]:
    """Component statistics of every kept image at the best-F1 point of the pooled curve of score ``name``.

    ``counts`` / ``values``: the pooled per-group counts and score values (highest first); each state
    holds its images' (H, W) codes (``"images"``) and, per score, their valid pixels' scores concatenated
    in the same order. Returns the per-image statistics and ``{"threshold", "pixel_F1"}``.
    """
    k, f1 = best_f1_point(counts[:, list(members)].sum(axis=1), counts[:, CODE_ID])
    threshold = float(values[k])
    parts = []
    for state in states:
        scores = state["scores"][name]
        start = 0
        for codes in state["images"]:
            valid = codes != VOID
            n = int(valid.sum())
            score_map = np.full(codes.shape, -np.inf, dtype=scores.dtype)
            score_map[valid] = scores[start : start + n]
            start += n
            parts.append(threshold_components(score_map, codes, settings, threshold, strict=False))
    return parts, {"threshold": threshold, "pixel_F1": f1}


def add_conventions(
    results: dict[str, float],
    states: Sequence[Mapping[str, Any]],
    names: Sequence[str],
    subsets: Mapping[str, Sequence[int]],
    grouped: Mapping[str, np.ndarray],
    values: Mapping[str, np.ndarray],
    use_hist: bool,
    aggregation: str,
    settings: ComponentSettings | None,
) -> dict[str, Any]:
    """Per-image means (in place of the pooled metrics) and component metrics, added to ``results``;
    returns what the report adds about them."""
    extra: dict[str, Any] = {"aggregation": aggregation}
    if aggregation == "per_image":
        records = [r for s in states for r in s["records"]]
        extra["per_image"] = {"images": len(records), "images_with_both_classes": {}}
        for name in names:
            for fam in subsets:
                prefix = f"{name}/{fam}/" if fam else f"{name}/"
                means, count = per_image_means(records, name, fam)
                extra["per_image"]["images_with_both_classes"][prefix.rstrip("/")] = count
                for key in ("AUROC", "AP", "FPR95"):
                    results.pop(prefix + f"bound_{key}", None)  # the bounds are the pooled metrics'
                    results[prefix + key] = 100.0 * means[key.lower()] if count else math.nan
    if settings is None:
        return extra
    report: dict[str, Any] = {"settings": dataclasses.asdict(settings)}
    if settings.threshold is None and use_hist:
        report["skipped"] = "the best-F1 threshold needs exact mode (or set a fixed threshold)"
        extra["components"] = report
        return extra
    for name in names:
        if settings.threshold is not None:
            parts = [p for s in states for p in s["parts"].get(name, [])]
            info = {"threshold": settings.threshold, "rule": "score > threshold"}
        else:
            parts, info = components_at_best_f1(
                states, name, grouped[name], values[name], SUBSETS[""], settings
            )
            info["rule"] = "score >= threshold (the pooled pixel curve's best-F1 point)"
        agg = aggregate_components(parts)
        for key in ("sIoU", "PPV", "mean_F1"):
            results[f"{name}/{key}"] = 100.0 * agg[key]
        report[name] = {k: v if k.startswith("num_") else 100.0 * v for k, v in agg.items()} | info
    extra["components"] = report
    return extra
