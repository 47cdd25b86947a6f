"""Figures of an anomaly evaluation: ROC and precision-recall curves per score, and per-image heat maps.

matplotlib is imported inside each function and used through the Agg canvas (no pyplot), so importing
the evaluator neither needs matplotlib nor changes the process-wide backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from detectron2.utils.file_io import PathManager

from .anomaly_labels import CODE_ANOMALY, CODE_ID
from .anomaly_ranking import TPR_TARGET

__all__ = ["plot_heatmap", "plot_roc_pr"]


def plot_roc_pr(by_family: dict[str, dict[str, Any]], path: str, score_name: str) -> None:
    """ROC and precision-recall curves of one score, one line per family, side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.5))
    FigureCanvasAgg(fig)
    ax_roc, ax_pr = fig.subplots(1, 2)
    for fam, c in by_family.items():
        ax_roc.plot(
            c["fpr"], c["tpr"], label=f"{fam} (AUROC {100 * c['auroc']:.1f}, FPR95 {100 * c['fpr95']:.1f})"
        )
        ax_pr.plot(c["recall"], c["precision"], label=f"{fam} (AP {100 * c['ap']:.1f})")
    ax_roc.plot([0, 1], [0, 1], "k:", linewidth=1)
    ax_roc.axhline(TPR_TARGET, color="gray", linestyle="--", linewidth=0.8)
    ax_roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false-positive rate", ylabel="true-positive rate")
    ax_roc.set_title(f"ROC: {score_name}")
    ax_pr.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="recall", ylabel="precision")
    ax_pr.set_title(f"precision-recall: {score_name}")
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


_CODE_COLORS = {CODE_ID: (30, 30, 30), CODE_ANOMALY: (255, 140, 0), 2: (255, 220, 0), 3: (230, 30, 30)}


def plot_heatmap(data: dict[str, Any], path: str) -> None:
    """Image | anomaly ground truth | one panel per score (colour range: the score's 1-99% quantiles)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    codes = data["codes"]
    gt = np.full((*codes.shape, 3), 160, np.uint8)  # void: gray
    for code, color in _CODE_COLORS.items():
        gt[codes == code] = color
    panels: list[tuple[str, np.ndarray, bool]] = []
    if data["image"] is not None:
        panels.append(("image", data["image"], False))
    panels.append(("ground truth (orange/yellow/red: anomaly/near/far)", gt, False))
    panels += [(f"score: {n}", s, True) for n, s in data["scores"].items()]
    h, w = codes.shape
    fig = Figure(figsize=(3.2 * len(panels), 3.2 * h / max(w, 1) + 0.6))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, arr, is_score) in zip(axes, panels):
        if is_score:
            finite = arr[np.isfinite(arr)]
            lo, hi = np.quantile(finite, [0.01, 0.99]) if finite.size else (0.0, 1.0)
            im = ax.imshow(arr, cmap="inferno", vmin=lo, vmax=hi if hi > lo else lo + 1e-6)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        else:
            ax.imshow(arr)
        ax.set_title(title, fontsize="small")
        ax.axis("off")
    fig.suptitle(str(data["image_id"]), fontsize="small")
    fig.tight_layout()
    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
