"""Exact pixel-level anomaly metrics (AUROC, AP, FPR95) and ROC / PR curves, from scores or grouped counts.

All non-void pixels of a split are pooled; anomaly pixels are the positive class and the anomaly score
(higher = more anomalous) ranks them. Everything reduces to one table: for each distinct score value (or
histogram bin), in descending score order, how many pixels of each label it holds. Equal scores form one
group, exactly as scikit-learn's ``roc_curve`` / ``average_precision_score`` group tied thresholds, so
:func:`anomaly_metrics` reproduces scikit-learn while sorting only once (O(n log n), no pixel loops).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = [
    "TPR_TARGET",
    "VOID",
    "anomaly_metrics",
    "as_scores",
    "grouped_counts",
    "metrics_from_counts",
    "roc_pr_curves",
    "to_numpy",
]

VOID = 255
TPR_TARGET = 0.95  # FPR95: false-positive rate where the true-positive rate first reaches 95%


def to_numpy(x: Any) -> np.ndarray:
    """A tensor (any device, any float dtype) or array-like as numpy, for the numpy-only metrics."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def as_scores(scores: Any) -> np.ndarray:
    """1-D float32/float64 scores (float32 kept: it sorts faster); NaN has no rank, so it is an error."""
    s = to_numpy(scores).reshape(-1)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
    if np.isnan(s).any():
        raise ValueError(f"anomaly scores contain {int(np.isnan(s).sum())} NaN values")
    return s


def grouped_counts(
    scores: np.ndarray, codes: np.ndarray, num_codes: int, return_values: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """(G, num_codes) int64 pixel counts per distinct score value, highest score first.

    One argsort; group ids come from a cumulative sum over "value changed" flags and one ``bincount``
    over ``group * K + code`` does the counting. ``return_values`` also returns the G score values (the
    component metrics threshold at one of them).
    """
    order = np.argsort(scores)
    s = scores[order]
    changed = s[1:] != s[:-1]  # where a new score value (group) starts, from the second pixel on
    key = np.empty(s.size, dtype=np.int64)
    if s.size:
        key[0] = 0
        np.cumsum(changed, out=key[1:])
    num_groups = int(key[-1]) + 1 if s.size else 0
    key *= num_codes
    key += codes[order]
    counts = np.bincount(key, minlength=num_groups * num_codes).reshape(num_groups, num_codes)
    if return_values:
        values = s[np.concatenate(([True], changed))] if s.size else s
        return counts[::-1], values[::-1]
    return counts[::-1]


def metrics_from_counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """AUROC / AP / FPR95 (fractions) from per-group positive and negative counts, highest score first.

    With ``T``/``F`` the cumulative counts at the end of each group and ``p``/``n`` the group's own:
    AUROC = sum n (T - p/2) / (P N) (the trapezoid, i.e. tied pairs count 1/2); AP = sum (p / P) T / (T + F)
    (scikit-learn's step-wise sum (R_k - R_{k-1}) P_k); FPR95 = F / N at the first group with T / P >= 0.95
    (the smallest FPR over thresholds with TPR >= 0.95, since FPR only grows as the threshold drops).
    """
    keep = (pos + neg) > 0
    pos = pos[keep].astype(np.float64)
    neg = neg[keep].astype(np.float64)
    num_pos, num_neg = pos.sum(), neg.sum()
    if num_pos == 0 or num_neg == 0:
        raise ValueError(
            f"anomaly metrics need both classes; got {int(num_pos)} anomaly and {int(num_neg)} "
            "in-distribution pixels"
        )
    tps, fps = np.cumsum(pos), np.cumsum(neg)
    auroc = np.sum(neg * (tps - 0.5 * pos)) / (num_pos * num_neg)
    ap = np.sum(pos * (tps / (tps + fps))) / num_pos
    k = int(np.argmax(tps / num_pos >= TPR_TARGET))
    return {"auroc": float(auroc), "ap": float(ap), "fpr95": float(fps[k] / num_neg)}


def _prepare(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten, check and drop void pixels; labels become 0/1 uint8."""
    s = as_scores(scores)
    y = to_numpy(labels).reshape(-1)
    if s.size != y.size:
        raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
    bad = (y != 0) & (y != 1) & (y != VOID)
    if bad.any():
        raise ValueError(
            f"labels must be 0 (in-distribution), 1 (anomaly) or 255 (void); got {np.unique(y[bad]).tolist()}"
        )
    keep = y != VOID
    return s[keep], y[keep].astype(np.uint8)


def anomaly_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """Exact ``{"auroc", "ap", "fpr95"}`` (fractions) of ``scores`` for anomaly ``labels`` (1 anomaly, 0 not).

    Pixels labelled 255 are dropped. Ties are grouped as scikit-learn does, so the results equal
    ``roc_auc_score``, ``average_precision_score`` and the FPR at the first ``roc_curve`` point (without
    ``drop_intermediate``) whose TPR reaches 0.95. Raises ValueError if either class is missing.
    """
    s, y = _prepare(scores, labels)
    counts = grouped_counts(s, y, 2)
    return metrics_from_counts(counts[:, 1], counts[:, 0])


def roc_pr_curves(pos: np.ndarray, neg: np.ndarray, max_points: int = 1001) -> dict[str, np.ndarray]:
    """ROC and PR curves for plotting, thinned to about ``2 * max_points`` points spread along both axes."""
    keep = (pos + neg) > 0
    tps = np.cumsum(pos[keep].astype(np.float64))
    fps = np.cumsum(neg[keep].astype(np.float64))
    tpr, fpr = tps / tps[-1], fps / fps[-1]
    grid = np.linspace(0.0, 1.0, max_points)
    idx = np.unique(
        np.concatenate([np.searchsorted(fpr, grid), np.searchsorted(tpr, grid), [0, len(tps) - 1]]).clip(
            0, len(tps) - 1
        )
    )
    return {
        "fpr": np.r_[0.0, fpr[idx]],
        "tpr": np.r_[0.0, tpr[idx]],
        "recall": tpr[idx],
        "precision": tps[idx] / (tps[idx] + fps[idx]),
    }
