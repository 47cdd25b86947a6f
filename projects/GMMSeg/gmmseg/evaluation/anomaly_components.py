"""SegmentMeIfYouCan's component-level anomaly metrics: sIoU, PPV and mean F1 over connected components.

The definitions are those of the benchmark's code (github.com/SegmentMeIfYouCan/road-anomaly-benchmark):

- ``road_anomaly_benchmark/metrics/instance_segmentation.py``, ``default_instancer``: the prediction is
  the pixels above the threshold minus void pixels; ground-truth and predicted components are the
  8-connected components (3 x 3 structure) of the anomaly mask and of the prediction; predicted
  components smaller than ``thresh_segsize`` pixels are dropped; ground-truth components smaller than
  ``thresh_instsize`` pixels become void, and everything below is counted on the non-void pixels only.
- same file, ``segment_metrics``: for a ground-truth component ``k`` and the predicted components ``P``
  that touch it, sIoU = |k ∩ P| / |(k ∪ P) \\ A|, where ``A`` are the pixels of the other ground-truth
  components (the "adjustment"); PPV of a predicted component ``p`` = |p ∩ G| / |p| with ``G`` all
  ground-truth components it touches; a ground-truth component is a true positive at threshold ``t`` when
  its sIoU >= t (else a false negative), a predicted component a false positive when its PPV < t.
- same file, ``MetricSegment.aggregate``: components are pooled over the split; sIoU and PPV are the means
  over all ground-truth / predicted components, F1(t) = 2 TP / (2 TP + FN + FP) with counts summed over
  images, and mean F1 averages F1 over the 11 thresholds ``linspace(0.25, 0.75, 11)``.
- ``MetricSegment.configs``: size filters 500 / 100 (``SegEval-AnomalyTrack``) and 50 / 10
  (``SegEval-ObstacleTrack``); ``get_thresh_p_from_curve``: the score threshold is the best-F1 point of
  the split's pixel precision-recall curve (``metrics/pixel_classification_curves.py``,
  ``curves_from_cmats``: F1 = 2 TP / (2 TP + FP + FN), ``nanargmax`` over thresholds from high to low).

Two deliberate differences, both where the benchmark approximates: the threshold comes from the exact
pooled curve, not from 768 percentile bins, and the predicted pixels are exactly those counted at that
curve point (score >= the point's score value; the benchmark's ``> bin edge`` can split a bin). The
benchmark's size-filter loop also visits the background "component" 0, so an image with fewer than
``thresh_instsize`` non-anomaly pixels would become void entirely; that corner case is not reproduced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

__all__ = [
    "SIOU_THRESHOLDS",
    "TRACK_SIZE_FILTERS",
    "ComponentSettings",
    "ImageComponents",
    "aggregate_components",
    "best_f1_point",
    "component_settings",
    "image_components",
]

SIOU_THRESHOLDS = np.linspace(0.25, 0.75, 11)
# (minimum predicted component size, minimum ground-truth component size) of each SMIYC track
TRACK_SIZE_FILTERS = {"anomaly": (500, 100), "obstacle": (50, 10)}
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class ComponentSettings:
    """How component metrics are computed: size filters in pixels and an optional fixed score threshold.

    ``threshold=None`` (the benchmark's rule) thresholds at the best-F1 point of the split's pooled pixel
    curve, which needs every image's scores kept until the end (exact mode); a fixed threshold is applied
    per image as the images arrive, so it also works in histogram mode.
    """

    min_pred_size: int = TRACK_SIZE_FILTERS["anomaly"][0]
    min_gt_size: int = TRACK_SIZE_FILTERS["anomaly"][1]
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.min_pred_size < 0 or self.min_gt_size < 0:
            raise ValueError(
                f"component size filters must be >= 0, got {self.min_pred_size} / {self.min_gt_size}"
            )


def component_settings(
    enabled: bool, min_pred_size: int, min_gt_size: int, threshold: float | None, metadata: Any
) -> ComponentSettings | None:
    """The settings of ``TEST.ANOMALY_COMPONENTS`` for one dataset: a size filter of -1 takes the dataset's
    (``component_min_pred_size`` / ``component_min_gt_size`` in its metadata), else the anomaly track's."""
    if not enabled:
        return None
    pred_default, gt_default = TRACK_SIZE_FILTERS["anomaly"]
    return ComponentSettings(
        min_pred_size if min_pred_size >= 0 else int(metadata.get("component_min_pred_size", pred_default)),
        min_gt_size if min_gt_size >= 0 else int(metadata.get("component_min_gt_size", gt_default)),
        None if threshold is None else float(threshold),
    )


@dataclass(frozen=True)
class ImageComponents:
    """One image's components: sIoU of each ground-truth one, sIoU and PPV of each predicted one."""

    siou_gt: np.ndarray
    siou_pred: np.ndarray
    ppv: np.ndarray


def _drop_small(labels: np.ndarray, num: int, min_size: int) -> np.ndarray:
    """Per-label flag (index = label, 0 = background never flagged): component smaller than min_size."""
    sizes = np.bincount(labels.ravel(), minlength=num + 1)
    small = sizes < min_size
    small[0] = False
    return small


def _compact(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Positive labels renumbered 1..n in increasing order (0 stays 0), and n."""
    present = np.unique(values)
    present = present[present > 0]
    lut_size = int(values.max()) + 1 if values.size else 1
    lut = np.zeros(lut_size, dtype=np.int64)
    lut[present] = np.arange(1, present.size + 1)
    return lut[values], int(present.size)


def image_components(
    pred: np.ndarray, anomaly: np.ndarray, void: np.ndarray, min_pred_size: int, min_gt_size: int
) -> ImageComponents:
    """Component statistics of one image (``default_instancer`` + ``segment_metrics`` of the benchmark).

    Args:
        pred: (H, W) bool, pixels predicted anomalous (void pixels are ignored).
        anomaly: (H, W) bool, ground-truth anomaly pixels.
        void: (H, W) bool, void pixels.
        min_pred_size: predicted components with fewer pixels are dropped (counted before the small
            ground-truth components are voided, as the benchmark does).
        min_gt_size: ground-truth components with fewer pixels become void.

    Vectorised over components: every quantity is a sum over the sparse (ground truth, prediction)
    overlap table, built with one ``np.unique`` over the non-void pixels.
    """
    if not (pred.shape == anomaly.shape == void.shape) or pred.ndim != 2:
        raise ValueError(f"pred, anomaly and void must be equal (H, W), got {pred.shape} {anomaly.shape}")
    gt_lab, num_gt = ndimage.label(anomaly & ~void, _EIGHT_CONNECTED)
    pr_lab, num_pr = ndimage.label(pred & ~void, _EIGHT_CONNECTED)
    if num_pr and min_pred_size > 0:
        pr_lab[_drop_small(pr_lab, num_pr, min_pred_size)[pr_lab]] = 0
    roi = ~void
    if num_gt and min_gt_size > 0:
        roi &= ~_drop_small(gt_lab, num_gt, min_gt_size)[gt_lab]
    g, num_gt = _compact(gt_lab[roi])
    p, num_pr = _compact(pr_lab[roi])

    gt_size = np.bincount(g, minlength=num_gt + 1)[1:].astype(np.float64)
    pr_size = np.bincount(p, minlength=num_pr + 1)[1:].astype(np.float64)
    both = (g > 0) & (p > 0)
    pairs, overlap = np.unique(g[both] * (num_pr + 1) + p[both], return_counts=True)
    gi, pj = pairs // (num_pr + 1) - 1, pairs % (num_pr + 1) - 1  # 0-based component indices
    overlap = overlap.astype(np.float64)

    # |k ∩ all predictions| and |p ∩ all ground truth|: the intersections of both loops
    gt_hit = np.bincount(gi, overlap, minlength=num_gt)
    pr_hit = np.bincount(pj, overlap, minlength=num_pr)
    # ground-truth k, P = predictions touching k: |P| and |P ∩ other ground truth| = sum |p ∩ GT| - |k ∩ P|
    pred_union = np.bincount(gi, pr_size[pj], minlength=num_gt)
    adjust_gt = np.bincount(gi, pr_hit[pj], minlength=num_gt) - gt_hit
    siou_gt = gt_hit / (pred_union + gt_size - gt_hit - adjust_gt)
    # prediction p, G = ground truth touching p: |G| and |G ∩ other predictions|
    gt_union = np.bincount(pj, gt_size[gi], minlength=num_pr)
    adjust_pr = np.bincount(pj, gt_hit[gi], minlength=num_pr) - pr_hit
    siou_pred = pr_hit / (gt_union + pr_size - pr_hit - adjust_pr)
    return ImageComponents(siou_gt=siou_gt, siou_pred=siou_pred, ppv=pr_hit / pr_size)


def best_f1_point(pos: np.ndarray, neg: np.ndarray) -> tuple[int, float]:
    """Index (into per-group counts, highest score first) and value of the pixel curve's best F1.

    F1 at a group = 2 TP / (TP + FP + P) for the pixels scoring at least the group's score; the first
    (highest-score) maximum wins, as ``np.nanargmax`` does over the benchmark's descending thresholds.
    """
    tps = np.cumsum(pos, dtype=np.float64)
    fps = np.cumsum(neg, dtype=np.float64)
    f1 = 2.0 * tps / (tps + fps + tps[-1])
    k = int(np.argmax(f1))
    return k, float(f1[k])


def _fraction(num: float, den: float) -> float:
    return num / den if den > 0 else math.nan


def aggregate_components(
    parts: Sequence[ImageComponents], thresholds: np.ndarray = SIOU_THRESHOLDS
) -> dict[str, float]:
    """Split-level metrics (fractions; NaN where undefined) from the images' components, in any order.

    ``sIoU`` (mean over ground-truth components), ``sIoU_pred``, ``PPV`` (mean over predicted
    components), ``F1_25`` / ``F1_50`` / ``F1_75``, ``mean_F1`` (over ``thresholds``), and the component
    counts ``num_gt`` / ``num_pred``. Means use ``math.fsum``: the result does not depend on the order
    in which images (or processes) contributed.
    """
    siou_gt = np.concatenate([np.zeros(0)] + [p.siou_gt for p in parts])
    siou_pred = np.concatenate([np.zeros(0)] + [p.siou_pred for p in parts])
    ppv = np.concatenate([np.zeros(0)] + [p.ppv for p in parts])
    out = {
        "sIoU": _fraction(math.fsum(siou_gt), siou_gt.size),
        "sIoU_pred": _fraction(math.fsum(siou_pred), siou_pred.size),
        "PPV": _fraction(math.fsum(ppv), ppv.size),
    }
    f1s = []
    for t in thresholds:
        tp = int(np.count_nonzero(siou_gt >= t))
        fn = siou_gt.size - tp
        fp = int(np.count_nonzero(ppv < t))
        f1s.append(_fraction(2 * tp, 2 * tp + fn + fp))
        for marked in (0.25, 0.5, 0.75):
            if math.isclose(t, marked):
                out[f"F1_{round(marked * 100)}"] = f1s[-1]
    out["mean_F1"] = float(np.mean(f1s))
    out["num_gt"] = float(siou_gt.size)
    out["num_pred"] = float(ppv.size)
    return out
