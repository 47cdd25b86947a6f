"""Calibration of class posteriors (pixels, or Mask2Former's queries): reliability bins, expected
calibration error, diagrams.

Calibration reduces to three per-bin sums over equal-width confidence bins (sample count, summed
confidence, correct samples); being sums they add up across images and ranks, so the evaluator only
accumulates them (``bin_statistics``) and the ECE, the report table and the diagram are computed from them
at the end.
"""

from __future__ import annotations

from typing import List

import numpy as np
import torch
from detectron2.utils.file_io import PathManager

__all__ = ["bin_statistics", "expected_calibration_error", "plot_reliability_diagram", "reliability_table"]


@torch.no_grad()
def bin_statistics(
    confidence: torch.Tensor, correct: torch.Tensor, num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-bin (count, summed confidence, correct count) of 1-D confidences in [0, 1] and correctness
    flags, over ``num_bins`` equal-width bins; computed on the tensors' device, returned as numpy.
    Binning is in float64, so that a confidence of exactly 1 lands in the last bin."""
    conf = confidence.reshape(-1).double()
    bin_idx = torch.floor(conf * num_bins).long().clamp_(0, num_bins - 1)
    counts = torch.bincount(bin_idx, minlength=num_bins)
    conf_sums = torch.bincount(bin_idx, weights=conf, minlength=num_bins)
    correct_sums = torch.bincount(bin_idx[correct.reshape(-1).bool()], minlength=num_bins)
    return counts.cpu().numpy(), conf_sums.cpu().numpy(), correct_sums.cpu().numpy()


def expected_calibration_error(counts: np.ndarray, conf_sums: np.ndarray, correct_sums: np.ndarray) -> float:
    """ECE in [0, 1]: ``sum_b (n_b / N) * |acc_b - conf_b|``; NaN when there are no samples.

    ``(n_b / N) * |correct_b / n_b - confsum_b / n_b| == |correct_b - confsum_b| / N``, so empty bins
    need no special case.
    """
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    gap = np.abs(np.asarray(correct_sums, dtype=np.float64) - np.asarray(conf_sums, dtype=np.float64))
    return float(gap.sum() / total)


def reliability_table(counts: np.ndarray, conf_sums: np.ndarray, correct_sums: np.ndarray) -> List[dict]:
    """Per-bin rows (edges, count, mean confidence, accuracy) for the JSON report."""
    num_bins = len(counts)
    rows = []
    for b in range(num_bins):  # loop over bins (B ~ 15), not pixels
        n = int(counts[b])
        rows.append(
            {
                "lower": b / num_bins,
                "upper": (b + 1) / num_bins,
                "count": n,
                "mean_confidence": float(conf_sums[b] / n) if n else None,
                "accuracy": float(correct_sums[b] / n) if n else None,
            }
        )
    return rows


def plot_reliability_diagram(
    counts: np.ndarray,
    conf_sums: np.ndarray,
    correct_sums: np.ndarray,
    path: str,
    title: str = "Reliability diagram",
) -> None:
    """Write a reliability diagram PNG: per-bin accuracy vs confidence over the diagonal, counts below.

    matplotlib is imported here (and used through the Agg canvas, not pyplot) so that importing the
    evaluator neither needs matplotlib nor changes the process-wide backend.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(counts, dtype=np.float64)
    num_bins = len(counts)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / num_bins
    nonempty = counts > 0
    acc = np.zeros(num_bins)
    mean_conf = np.zeros(num_bins)
    acc[nonempty] = np.asarray(correct_sums, dtype=np.float64)[nonempty] / counts[nonempty]
    mean_conf[nonempty] = np.asarray(conf_sums, dtype=np.float64)[nonempty] / counts[nonempty]
    ece = expected_calibration_error(counts, conf_sums, correct_sums)

    fig = Figure(figsize=(5, 6.5))
    FigureCanvasAgg(fig)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(
        centers[nonempty], acc[nonempty], width=width, edgecolor="black", color="tab:blue", label="accuracy"
    )
    ax.bar(
        centers[nonempty],
        (mean_conf - acc)[nonempty],
        bottom=acc[nonempty],
        width=width,
        edgecolor="tab:red",
        color="tab:red",
        alpha=0.3,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize="small")
    ax.set_title(f"{title}\nECE = {100 * ece:.2f}%")

    ax_hist.bar(centers, counts, width=width, edgecolor="black", color="tab:gray")
    if counts.max(initial=0) > 0:
        ax_hist.set_yscale("log")
    ax_hist.set_xlabel("confidence (max posterior)")
    ax_hist.set_ylabel("pixels")
    fig.tight_layout()

    with PathManager.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
