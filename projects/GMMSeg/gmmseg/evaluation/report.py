"""One results table for closed-set and anomaly metrics, shared by train_net.py and tools/summarize.py."""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping

__all__ = ["HEADER", "group_mean_iou", "results_rows", "markdown_table"]

HEADER = (
    "model", "dataset", "mIoU", "ECE", "anomaly score", "AUROC", "AP", "FPR95", "sIoU", "PPV", "mean F1"
)  # fmt: skip
# result keys of the anomaly columns (component metrics only per score, not per family)
ANOMALY_METRICS = ("AUROC", "AP", "FPR95", "sIoU", "PPV", "mean_F1")


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}"


def group_mean_iou(sem_seg: Mapping[str, float], class_names: Iterable[str]) -> float:
    """Mean of ``IoU-<name>`` over a group of classes, leaving out NaN (classes neither in the ground truth
    nor predicted) as mIoU does; NaN when every class of the group is absent."""
    present = [sem_seg[f"IoU-{name}"] for name in class_names if not math.isnan(sem_seg[f"IoU-{name}"])]
    return math.fsum(present) / len(present) if present else math.nan


def results_rows(model: str, per_dataset: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, ...]]:
    """Rows of ``HEADER`` from ``{dataset: {"sem_seg": {...}, "anomaly": {"<score>[/<family>]/AUROC"...}}}``.

    One row per dataset and anomaly score (and per anomaly family, e.g. ``gmm (near)``); mIoU and ECE
    repeat on each row of their dataset; component metrics (sIoU, PPV, mean F1) where evaluated, else
    "-". Metrics are in percent, as the evaluators report them.
    """
    rows = []
    for dataset, results in per_dataset.items():
        sem = results.get("sem_seg", {}) or {}
        anomaly = results.get("anomaly", {}) or {}
        scores: dict[str, dict[str, float]] = {}
        for key, value in anomaly.items():
            *name, metric = key.split("/")
            if metric in ANOMALY_METRICS and len(name) in (1, 2):
                label = name[0] if len(name) == 1 else f"{name[0]} ({name[1]})"
                scores.setdefault(label, {})[metric] = value
        base = (model, dataset, _fmt(sem.get("mIoU")), _fmt(sem.get("ECE")))
        if not scores:
            rows.append((*base, "-", *("-" for _ in ANOMALY_METRICS)))
        for label, metrics in scores.items():
            rows.append((*base, label, *(_fmt(metrics.get(m)) for m in ANOMALY_METRICS)))
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    header = [HEADER[0], HEADER[1], *(f"{h} (%)" if h not in ("anomaly score",) else h for h in HEADER[2:])]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
