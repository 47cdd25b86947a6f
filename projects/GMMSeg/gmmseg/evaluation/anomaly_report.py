"""What an anomaly evaluation writes to its output folder: the JSON report, ROC / PR plots and heat maps.

``anomaly_evaluation.json`` holds the metrics, the pixel counts, what each metric means and, in
histogram mode, each histogram's range and the exact metrics' brackets; the figures come from
:mod:`.anomaly_plots`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Sequence

import numpy as np
from detectron2.utils.file_io import PathManager

from .anomaly_labels import CODE_ID, FAMILIES
from .anomaly_plots import plot_heatmap, plot_roc_pr
from .score_histogram import ScoreHistogram
from .sem_seg import _json_safe

__all__ = ["write_anomaly_report"]


def write_anomaly_report(
    output_dir: str,
    dataset_name: str,
    results: dict[str, float],
    mode: str,
    totals: np.ndarray,
    hists: dict[str, ScoreHistogram],
    curves: dict[str, dict[str, dict[str, Any]]],
    heatmaps: Sequence[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the report, one ROC / PR figure per score and one figure per heat-map record.

    ``totals``: pixels per code; ``hists``: the merged histograms (empty in exact mode); ``curves``:
    ``{score: {family: roc_pr_curves(...) | metrics}}``; ``extra``: the aggregation and, if computed,
    the component metrics' details (:func:`.anomaly_aggregation.add_conventions`).
    """
    PathManager.mkdirs(output_dir)
    report: dict[str, Any] = {
        "dataset": dataset_name,
        "mode": mode,
        "metrics": dict(results),
        "pixels": {
            "in_distribution": int(totals[CODE_ID]),
            "anomaly": int(totals[1:].sum()),
            **{fam: int(totals[1 + v]) for fam, v in FAMILIES.items()},
        },
        "definitions": {
            "AUROC": "area under the ROC curve, anomaly = positive, ties count 1/2",
            "AP": "sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn average_precision_score)",
            "FPR95": "smallest false-positive rate among thresholds whose true-positive rate >= 95%",
            "families": "near / far: that family's pixels against all in-distribution pixels",
            "bound_*": "histogram mode: |histogram metric - exact metric| <= bound (percent)",
            "aggregation": "pooled: all non-void pixels of the split; per_image: mean over images that "
            "hold both classes",
            "sIoU": "mean over ground-truth components of |k ∩ P| / |(k ∪ P) minus other ground truth|, "
            "P the predicted components touching k (SegmentMeIfYouCan)",
            "PPV": "mean over predicted components of the share of their pixels on ground-truth anomalies",
            "mean_F1": "F1 = 2TP / (2TP + FN + FP) of components (TP: sIoU >= t; FP: PPV < t), averaged "
            "over t in linspace(0.25, 0.75, 11)",
        },
        **(extra or {}),
    }
    if hists:
        report["histograms"] = {
            name: {
                **h.summary(),
                "brackets": {
                    fam: {k: 100.0 * v for k, v in c.items() if k.endswith(("_lower", "_upper"))}
                    for fam, c in curves[name].items()
                },
            }
            for name, h in hists.items()
        }
    with PathManager.open(os.path.join(output_dir, "anomaly_evaluation.json"), "w") as f:
        json.dump(_json_safe(report), f, indent=2)
    for name, by_family in curves.items():
        plot_roc_pr(by_family, os.path.join(output_dir, f"roc_pr_{_safe(name)}.png"), name)
    for h in heatmaps:
        plot_heatmap(h, os.path.join(output_dir, f"heatmap_{_safe(h['image_id'])}.png"))


def _safe(name: str) -> str:
    """``name`` usable in a file name (score names and image ids may hold any character)."""
    return re.sub(r"[^\w.-]", "_", name)
