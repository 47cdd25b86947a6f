"""Pixel-level anomaly segmentation metrics (AUROC, AP, FPR95) and their Detectron2 evaluator.

All non-void pixels of a split are pooled; anomaly pixels are the positive class and the anomaly score
(higher = more anomalous) ranks them. Everything reduces to one table: for each distinct score value (or
histogram bin), in descending score order, how many pixels of each label it holds. Equal scores form one
group, exactly as scikit-learn's ``roc_curve`` / ``average_precision_score`` group tied thresholds, so
:func:`anomaly_metrics` reproduces scikit-learn while sorting only once (O(n log n), no pixel loops).

Splits too large to hold go through :class:`ScoreHistogram`, which counts labels per score bin and
treats scores within a bin as tied. Binning can only confuse the order of pixels that share a bin, so
each metric's distance to the exact value is bounded from the histogram's own counts; the bounds are
reported with the metrics (``bound_*``), which makes the approximation checkable rather than a guess.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from .sem_seg import _json_safe

__all__ = ["anomaly_metrics", "ScoreHistogram", "AnomalyEvaluator"]

logger = logging.getLogger(__name__)

VOID = 255
TPR_TARGET = 0.95  # FPR95: false-positive rate where the true-positive rate first reaches 95%


# --------------------------------------------------------------------------------------------------
# Exact metrics from grouped counts
# --------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype not in (torch.float32, torch.float64):
            x = x.float()  # numpy has no bfloat16
        return x.numpy()
    return np.asarray(x)


def _as_scores(scores: Any) -> np.ndarray:
    """1-D float32/float64 scores (float32 kept: it sorts faster); NaN has no rank, so it is an error."""
    s = _to_numpy(scores).reshape(-1)
    if s.dtype not in (np.float32, np.float64):
        s = s.astype(np.float32 if s.dtype == np.float16 else np.float64)
    if np.isnan(s).any():
        raise ValueError(f"anomaly scores contain {int(np.isnan(s).sum())} NaN values")
    return s


def _grouped_counts(scores: np.ndarray, codes: np.ndarray, num_codes: int) -> np.ndarray:
    """(G, num_codes) int64 pixel counts per distinct score value, highest score first.

    One argsort; group ids come from a cumulative sum over "value changed" flags and one ``bincount``
    over ``group * K + code`` does the counting.
    """
    order = np.argsort(scores)
    s = scores[order]
    key = np.empty(s.size, dtype=np.int64)
    if s.size:
        key[0] = 0
        np.cumsum(s[1:] != s[:-1], out=key[1:])
    num_groups = int(key[-1]) + 1 if s.size else 0
    key *= num_codes
    key += codes[order]
    counts = np.bincount(key, minlength=num_groups * num_codes).reshape(num_groups, num_codes)
    return counts[::-1]


def _metrics_from_counts(pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
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
    s = _as_scores(scores)
    y = _to_numpy(labels).reshape(-1)
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
    counts = _grouped_counts(s, y, 2)
    return _metrics_from_counts(counts[:, 1], counts[:, 0])


def _curves(pos: np.ndarray, neg: np.ndarray, max_points: int = 1001) -> dict[str, np.ndarray]:
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


# --------------------------------------------------------------------------------------------------
# Streaming histogram
# --------------------------------------------------------------------------------------------------
def _lattice_range(values: np.ndarray, num_bins: int, margin: float, quantile: float) -> tuple[float, float]:
    """Pick ``(lo, width)``: a power-of-two bin width and a start on a coarse lattice.

    The window covers the ``quantile``..``1 - quantile`` range of the finite ``values`` widened by ``margin``
    times that span on each side (rare outliers go to the end bins instead of stretching every bin). Width
    2^e and a start that is a multiple of (window / 8) make the edges exactly representable and canonical:
    processes that pick a range from similar data almost always pick the very same edges (merging is then
    a plain sum), and otherwise their edges lie on nested lattices, which keeps a merge fine-grained.
    """
    finite = values[np.isfinite(values)].astype(np.float64)
    if finite.size == 0:
        a, b = -1.0, 1.0
    else:
        a, b = (float(v) for v in np.quantile(finite, [quantile, 1.0 - quantile]))
        if not b > a:
            a, b = float(finite.min()), float(finite.max())
        if not b > a:
            a, b = a - max(abs(a), 1.0), a + max(abs(a), 1.0)
    span = b - a
    lo_t, hi_t = a - margin * span, b + margin * span
    if not math.isfinite(hi_t - lo_t):
        lo_t, hi_t = a, b
        if not math.isfinite(hi_t - lo_t):
            raise ValueError(f"scores span [{a}, {b}], beyond float64; pass an explicit score_range")
    # the finest width that keeps lo / width below 2^46 (edges k * width stay exact in float64)
    min_width = math.ldexp(1.0, math.frexp(max(abs(lo_t), abs(hi_t)))[1] - 46)
    width = max(math.ldexp(1.0, math.ceil(math.log2((hi_t - lo_t) * 8 / 7 / num_bins))), min_width)
    while True:
        step = width * max(num_bins // 8, 1)
        lo = math.floor(lo_t / step) * step
        if lo <= lo_t and lo + num_bins * width >= hi_t:
            return lo, width
        width *= 2


class ScoreHistogram:
    """Mergeable per-bin label counts of anomaly scores, for splits too large to sort.

    Bins: ``num_bins`` equal bins over ``[lo, hi)`` plus two open end bins, ``(-inf, lo)`` and
    ``[hi, +inf]``, so no score is ever lost (they only cost resolution, which the bounds report); in
    general (after merging differently ranged histograms) bin ``j`` is ``[edges[j-1], edges[j])``.
    ``counts[j, k]`` is the number of pixels with label ``k`` in bin ``j`` (bins ascending). Labels are
    ``0 .. num_labels - 1`` (default 2: 0 in-distribution, 1 anomaly); 255 is void and dropped.

    Range: fixed from ``score_range`` (use this for distributed runs when the score scale is known), or
    chosen from the data: the first ``warmup_pixels`` pixels are buffered exactly, then a window around
    their 0.1%..99.9% quantiles, widened by ``margin`` times that span on both sides and snapped to a
    power-of-two lattice (see :func:`_lattice_range`), fixes the edges. Later scores outside it go to the
    end bins. Bin membership is decided by comparison with the stored edges, so bins are exact intervals.

    Merging (:meth:`merge`): identical edges add counts; warming-up buffers are pooled (so the range is
    chosen from all of them). Differently ranged histograms (processes that fixed their own ranges) are
    merged onto the finest partition compatible with both: every edge of either, except edges lying
    strictly inside an *occupied* bin of the other, whose pixels cannot be split (an empty bin constrains
    nothing, so where only one side has data its resolution is kept). Every occupied bin of either then
    lies in one merged bin, so the merged counts are exact for the merged (possibly non-uniform) bins and
    the bounds below stay rigorous; only resolution is lost, and the bounds show how much.

    Metrics treat scores in one bin as tied (they equal :func:`anomaly_metrics` of the bin index). With
    bins in descending order, ``p``/``n`` a bin's positives/negatives, ``T``/``F`` the counts above it and
    ``P``/``N`` the totals, :meth:`metrics` also reports the range each exact metric must lie in, whatever
    the order (and ties) of scores inside bins:

    * AUROC: only pairs within one bin can be misordered and each counts 1/2 here, so
      ``|AUROC_hist - AUROC| <= bound_auroc = 0.5 * sum p n / (P N)``.
    * FPR95: the exact crossing threshold lies in the first bin where TPR reaches 0.95, so the exact FPR95
      is in ``[F / N, (F + n) / N]`` of that bin; FPR95_hist is the upper end, ``bound_fpr95 = n / N``.
    * AP: a bin contributes ``sum`` over its positives of their precision. A positive's precision is at
      most ``(T + p) / (T + F + p)`` (all positives of the bin first, tied) and the j-th positive's is at
      least ``(T + j) / (T + F + n + j)`` (all negatives first). Summing,
      ``ap_upper = sum (p / P) (T + p) / (T + F + p)`` and, with ``sum_j 1 / (c + j) <= log1p(p / (c + 1/2))``
      (convexity of 1/x), ``ap_lower = sum [p - (F + n) log1p(p / (T + F + n + 1/2))] / P``. The exact AP lies
      in ``[ap_lower, ap_upper]`` and ``bound_ap = max(ap_upper - AP_hist, AP_hist - ap_lower)``.
    """

    def __init__(
        self,
        num_bins: int = 65536,
        score_range: tuple[float, float] | None = None,
        *,
        num_labels: int = 2,
        warmup_pixels: int = 1 << 20,
        margin: float = 0.5,
        quantile: float = 1e-3,
    ) -> None:
        if num_bins < 1:
            raise ValueError(f"num_bins must be >= 1, got {num_bins}")
        if not 1 <= num_labels < VOID:
            raise ValueError(f"num_labels must be in [1, {VOID}), got {num_labels}")
        if not 0 <= quantile < 0.5 or margin < 0:
            raise ValueError(f"need 0 <= quantile < 0.5 and margin >= 0, got {quantile}, {margin}")
        self.num_labels = int(num_labels)
        self.warmup_pixels = int(warmup_pixels)
        self._requested_bins = int(num_bins)
        self._margin, self._quantile = float(margin), float(quantile)
        self._edges: np.ndarray | None = None
        self.counts = np.zeros((0, self.num_labels), dtype=np.int64)
        self._buffer: list[tuple[np.ndarray, np.ndarray]] = []
        self._buffered = 0
        if score_range is not None:
            lo, hi = (float(v) for v in score_range)
            if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
                raise ValueError(f"score_range must be finite with lo < hi, got {score_range}")
            self._set_edges(np.linspace(lo, hi, num_bins + 1))

    # ---------------------------------------------------------------------------------------------
    @property
    def is_ranged(self) -> bool:
        """True once the bin edges are fixed (before that, scores are buffered exactly)."""
        return self._edges is not None

    @property
    def edges(self) -> np.ndarray:
        """Finite bin edges ``e_0 < ... < e_m``; bin ``j`` is ``[e_{j-1}, e_j)`` with ``e_{-1} = -inf``."""
        if self._edges is None:
            raise RuntimeError("the histogram has no range yet; call fix_range() or add more pixels")
        return self._edges

    @property
    def num_bins(self) -> int:
        """Number of finite bins (the two open end bins not included)."""
        return max(len(self.edges) - 1, 0)

    @property
    def num_pixels(self) -> int:
        return int(self.counts.sum()) + self._buffered

    def _set_edges(self, edges: np.ndarray, counts: np.ndarray | None = None) -> None:
        self._edges = np.asarray(edges, dtype=np.float64)
        m = len(self._edges)
        self.counts = (
            np.zeros((m + 1, self.num_labels), dtype=np.int64) if counts is None else counts.astype(np.int64)
        )
        self._lo = float(self._edges[0]) if m else 0.0
        self._width = float(self._edges[1] - self._edges[0]) if m >= 2 else 0.0
        self._uniform = m >= 2 and bool(np.allclose(np.diff(self._edges), self._width, rtol=1e-9, atol=0.0))

    def _bin_index(self, x: np.ndarray) -> np.ndarray:
        """``searchsorted(edges, x, "right")``: arithmetic guess, then exact fix-up against the edges."""
        edges = self._edges
        m = len(edges)
        if not self._uniform:
            return np.searchsorted(edges, x, side="right")
        t = np.floor((x - self._lo) / self._width)
        np.clip(t, -1, m - 1, out=t)
        j = t.astype(np.int64) + 1
        for _ in range(8):  # rounding can put a value next to an edge one bin off; comparisons settle it
            low = (j >= 1) & (x < edges[np.maximum(j - 1, 0)])
            high = (j <= m - 1) & (x >= edges[np.minimum(j, m - 1)])
            if not (low.any() or high.any()):
                return j
            j -= low
            j += high
        return np.searchsorted(edges, x, side="right")

    def _bin(self, scores: np.ndarray, labels: np.ndarray) -> None:
        j = self._bin_index(scores.astype(np.float64, copy=False))
        flat = np.bincount(j * self.num_labels + labels, minlength=self.counts.size)
        self.counts += flat.reshape(self.counts.shape)

    def add(self, scores: Any, labels: Any) -> None:
        """Count ``scores`` (any shape) with ``labels`` (same size; 255 = void, dropped)."""
        s = _as_scores(scores)
        y = _to_numpy(labels).reshape(-1)
        if s.size != y.size:
            raise ValueError(f"scores and labels differ in size: {s.size} vs {y.size}")
        keep = y != VOID
        s, y = s[keep], y[keep].astype(np.int64)
        bad = (y < 0) | (y >= self.num_labels)
        if bad.any():
            raise ValueError(
                f"labels must be in [0, {self.num_labels}) or 255; got {np.unique(y[bad]).tolist()}"
            )
        if self.is_ranged:
            self._bin(s, y)
            return
        self._buffer.append((s.copy(), y.astype(np.uint8)))
        self._buffered += s.size
        if self._buffered >= self.warmup_pixels:
            self.fix_range()

    def fix_range(self) -> None:
        """Fix the edges from the buffered scores (no-op if already fixed) and count the buffer."""
        if self.is_ranged:
            return
        scores, labels = self._pop_buffer()
        lo, width = _lattice_range(scores, self._requested_bins, self._margin, self._quantile)
        self._set_edges(lo + width * np.arange(self._requested_bins + 1, dtype=np.float64))
        self._bin(scores, labels.astype(np.int64))

    def _pop_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        if self._buffer:
            scores = np.concatenate([b[0].astype(np.float64) for b in self._buffer])
            labels = np.concatenate([b[1] for b in self._buffer])
        else:
            scores, labels = np.zeros(0), np.zeros(0, np.uint8)
        self._buffer, self._buffered = [], 0
        return scores, labels

    def _like(self) -> ScoreHistogram:
        return ScoreHistogram(
            self._requested_bins,
            num_labels=self.num_labels,
            warmup_pixels=self.warmup_pixels,
            margin=self._margin,
            quantile=self._quantile,
        )

    def _strictly_inside_occupied(self, points: np.ndarray) -> np.ndarray:
        """Which ``points`` fall strictly inside a bin of this histogram that holds pixels."""
        occupied = self.counts.sum(axis=1) > 0
        return occupied[np.searchsorted(self.edges, points, side="right")] & ~np.isin(points, self.edges)

    def _rebinned(self, edges: np.ndarray) -> np.ndarray:
        """Counts on ``edges``, none of which lies strictly inside an occupied bin of this histogram.

        Each occupied bin then lies in the new bin that holds its left edge (empty bins carry nothing).
        """
        old = self.edges
        target = np.zeros(len(old) + 1, dtype=np.int64)  # old bin j = [old[j-1], old[j]); j = 0 stays 0
        target[1:] = np.searchsorted(edges, old, side="right")
        out = np.zeros((len(edges) + 1, self.num_labels), dtype=np.int64)
        np.add.at(out, target, self.counts)
        return out

    def merge(self, other: ScoreHistogram) -> ScoreHistogram:
        """A new histogram holding the pixels of both (see the class docstring for differing ranges)."""
        if other.num_labels != self.num_labels:
            raise ValueError(f"cannot merge histograms with {self.num_labels} and {other.num_labels} labels")
        out = self._like()
        ranged = [h for h in (self, other) if h.is_ranged]
        if len(ranged) == 2 and np.array_equal(self.edges, other.edges):
            out._set_edges(self.edges, self.counts + other.counts)
        elif len(ranged) == 2:
            union = np.union1d(self.edges, other.edges)
            common = union[~(self._strictly_inside_occupied(union) | other._strictly_inside_occupied(union))]
            logger.warning(
                "ScoreHistogram.merge: different bin edges ([%g, %g) in %d bins vs [%g, %g) in %d bins); "
                "merging onto %d edges compatible with both (a fixed score_range avoids the resolution loss)",
                self.edges[0] if len(self.edges) else np.nan,
                self.edges[-1] if len(self.edges) else np.nan,
                self.num_bins,
                other.edges[0] if len(other.edges) else np.nan,
                other.edges[-1] if len(other.edges) else np.nan,
                other.num_bins,
                len(common),
            )
            out._set_edges(common, self._rebinned(common) + other._rebinned(common))
        elif len(ranged) == 1:
            out._set_edges(ranged[0].edges, ranged[0].counts)
        for h in (self, other):
            for s, y in h._buffer:
                out.add(s, y)
        return out

    # ---------------------------------------------------------------------------------------------
    def grouped(self, positive: Sequence[int] = (1,), negative: Sequence[int] = (0,)) -> np.ndarray:
        """(bins, 2) [negatives, positives] per bin, highest scores first (fixes the range if needed)."""
        self.fix_range()
        neg = self.counts[:, list(negative)].sum(axis=1)
        pos = self.counts[:, list(positive)].sum(axis=1)
        return np.stack([neg, pos], axis=1)[::-1]

    def metrics(self, positive: Sequence[int] = (1,), negative: Sequence[int] = (0,)) -> dict[str, float]:
        """Metrics treating each bin as one tie, their rigorous ``bound_*`` and ``*_lower``/``*_upper`` ends.

        ``positive``/``negative``: which labels count as anomaly / in-distribution (others are ignored),
        e.g. one anomaly family against all in-distribution pixels.
        """
        counts = self.grouped(positive, negative)
        counts = counts[counts.sum(axis=1) > 0]
        res = _metrics_from_counts(counts[:, 1], counts[:, 0])
        neg, pos = counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
        num_pos, num_neg = pos.sum(), neg.sum()
        tps, fps = np.cumsum(pos), np.cumsum(neg)
        t_above, f_above = tps - pos, fps - neg

        auroc_lower = float(np.sum(neg * t_above) / (num_pos * num_neg))
        tied = float(np.sum(pos * neg) / (num_pos * num_neg))
        k = int(np.argmax(tps / num_pos >= TPR_TARGET))
        has_pos = pos > 0
        ap_upper = float(np.sum(pos[has_pos] * (tps[has_pos] / (tps[has_pos] + f_above[has_pos]))) / num_pos)
        ap_lower = float(
            np.sum(pos - (f_above + neg) * np.log1p(pos / (t_above + f_above + neg + 0.5))) / num_pos
        )
        res.update(
            bound_auroc=0.5 * tied,
            bound_ap=max(ap_upper - res["ap"], res["ap"] - ap_lower, 0.0),
            bound_fpr95=float(neg[k] / num_neg),
            auroc_lower=auroc_lower,
            auroc_upper=auroc_lower + tied,
            ap_lower=ap_lower,
            ap_upper=ap_upper,
            fpr95_lower=float(f_above[k] / num_neg),
            fpr95_upper=res["fpr95"],
        )
        return res

    def summary(self) -> dict[str, Any]:
        """Range and end-bin occupancy, for the JSON report."""
        self.fix_range()
        edges = self.edges
        return {
            "finite_bins": self.num_bins,
            "range": [float(edges[0]), float(edges[-1])] if len(edges) else None,
            "bin_width": self._width if self._uniform else None,  # None: non-uniform after a merge
            "pixels": int(self.counts.sum()),
            "below_range": int(self.counts[0].sum()),
            "above_range": int(self.counts[-1].sum()) if len(edges) else 0,
        }


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------
# Pixel codes: one uint8 per pixel says in-distribution, anomaly, or anomaly of a given family.
_CODE_ID, _CODE_ANOMALY = 0, 1
_FAMILIES = {"near": 1, "far": 2}  # values in ood_family PNGs; code = 1 + family
_NUM_CODES = 2 + len(_FAMILIES)
_SUBSETS = {"": (1, 2, 3), **{name: (1 + value,) for name, value in _FAMILIES.items()}}


def _map_numpy(m: Any) -> np.ndarray:
    """A score map as float32 numpy on the CPU (the evaluator's exact mode stores float32)."""
    if isinstance(m, torch.Tensor):
        return m.detach().float().cpu().numpy()
    return np.asarray(m, dtype=np.float32)


def _read_png(path: str) -> np.ndarray:
    with PathManager.open(path, "rb") as f:
        arr = np.asarray(Image.open(f))
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label PNG, got shape {arr.shape}")
    return arr


class AnomalyEvaluator(DatasetEvaluator):
    """AUROC / AP / FPR95 of every anomaly score a model returns, pooled over all non-void pixels.

    Per output: ``output["anomaly_scores"]`` = ``{name: (H, W)}`` (e.g. ``gmm``, ``msp``, ``energy``), or
    else ``output["anomaly"]`` alone, reported as ``anomaly``. Ground truth: ``input["ood_file_name"]``
    (0 in-distribution, 1 anomaly, 255 void) and, if present, the family map ``input["ood_family_file_name"]``
    (1 near, 2 far; anomaly pixels without a family count only in the overall metrics), giving per-family
    metrics against all in-distribution pixels. All scores are evaluated on exactly the same pixels.

    ``mode``: ``"exact"`` keeps float32 scores of every pixel and sorts them (error beyond
    ``max_exact_pixels``), ``"histogram"`` streams into :class:`ScoreHistogram` (reports ``bound_*``),
    ``"auto"`` is exact until ``max_exact_pixels`` would be exceeded, then switches (and logs it) with the
    bins fixed from the pixels kept so far. Budgets are per process: ``max_exact_pixels / world_size``.

    Distributed histograms need no collective during ``process`` (ranks may switch at different times or
    see no image): with ``score_range`` all ranks share the edges and merging is a sum; without it each
    rank fixes a lattice-snapped range (usually identical across ranks) and the main process merges
    differing ones onto edges compatible with all, exactly (:meth:`ScoreHistogram.merge`), so the
    reported bounds hold for the merged result. Exact pixels of ranks that never switched are binned
    into the merged histogram on the main process.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        mode: str = "auto",
        max_exact_pixels: int = 50_000_000,
        num_bins: int = 65536,
        score_range: tuple[float, float] | Mapping[str, tuple[float, float]] | None = None,
        num_heatmaps: int = 4,
    ) -> None:
        """
        Args:
            dataset_name: used in logs and the report (ground truth comes from the inputs' file names).
            distributed: gather from all ranks in :meth:`evaluate` (only rank 0 returns results).
            output_dir: where ``anomaly_evaluation.json``, ``roc_pr_<score>.png`` and
                ``heatmap_<image_id>.png`` go; nothing is written without it.
            mode: ``"exact"``, ``"histogram"`` or ``"auto"``.
            max_exact_pixels: pixel budget of exact mode over all ranks (memory ~ 5 bytes per pixel
                and score on the main process).
            num_bins: finite bins per histogram.
            score_range: fixed histogram range, one ``(lo, hi)`` for all scores or ``{score: (lo, hi)}``;
                identical on all ranks, so merging is exact. Without it the range comes from the data.
            num_heatmaps: image / ground truth / score panels written for the first images.
        """
        if mode not in ("exact", "histogram", "auto"):
            raise ValueError(f"mode must be 'exact', 'histogram' or 'auto', got {mode!r}")
        if max_exact_pixels < 1 or num_bins < 1 or num_heatmaps < 0:
            raise ValueError("max_exact_pixels and num_bins must be >= 1 and num_heatmaps >= 0")
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._mode = mode
        self._max_exact_pixels = int(max_exact_pixels)
        self._num_bins = int(num_bins)
        self._score_range = score_range
        self._num_heatmaps = int(num_heatmaps)
        self.reset()

    def reset(self) -> None:
        """Drop everything accumulated (``inference_on_dataset`` calls this before each round)."""
        self._names: tuple[str, ...] | None = None
        self._use_hist = self._mode == "histogram"
        self._codes: list[np.ndarray] = []
        self._scores: dict[str, list[np.ndarray]] = {}
        self._hists: dict[str, ScoreHistogram] = {}
        self._num_pixels = 0
        self._has_family = False
        self._heatmaps: list[dict[str, Any]] = []

    # ---------------------------------------------------------------------------------------------
    def _range_for(self, name: str) -> tuple[float, float] | None:
        if isinstance(self._score_range, Mapping):
            return self._score_range.get(name)
        return self._score_range

    def _new_hist(self, name: str) -> ScoreHistogram:
        return ScoreHistogram(self._num_bins, self._range_for(name), num_labels=_NUM_CODES)

    def _budget(self) -> int:
        world = comm.get_world_size() if self._distributed else 1
        return -(-self._max_exact_pixels // world)

    def _load_codes(self, input_: dict) -> tuple[np.ndarray, str]:
        """Per-pixel code: 0 in-distribution, 1 anomaly, 1 + family for near/far anomalies, 255 void."""
        if "ood_file_name" not in input_:
            raise KeyError(
                f"input {input_.get('file_name', '<unknown>')!r} has no 'ood_file_name'; "
                "AnomalyEvaluator reads the anomaly ground truth from it"
            )
        path = input_["ood_file_name"]
        ood = _read_png(path)
        bad = (ood != 0) & (ood != 1) & (ood != VOID)
        if bad.any():
            raise ValueError(
                f"{path}: anomaly labels must be 0, 1 or 255, found {np.unique(ood[bad]).tolist()}"
            )
        codes = ood.astype(np.uint8)
        family_path = input_.get("ood_family_file_name")
        if family_path:
            family = _read_png(family_path)
            if family.shape != ood.shape:
                raise ValueError(f"{family_path}: shape {family.shape} differs from {path} {ood.shape}")
            bad = ~np.isin(family, (0, *_FAMILIES.values(), VOID))
            if bad.any():
                raise ValueError(
                    f"{family_path}: family labels must be 0, 1, 2 or 255, "
                    f"found {np.unique(family[bad]).tolist()}"
                )
            clash = (ood == 0) & np.isin(family, tuple(_FAMILIES.values()))
            if clash.any():
                raise ValueError(
                    f"{family_path}: {int(clash.sum())} pixels have an anomaly family but are "
                    f"in-distribution in {path}"
                )
            for value in _FAMILIES.values():
                codes[(ood == 1) & (family == value)] = 1 + value
            self._has_family = True
        return codes, path

    @staticmethod
    def _score_maps(output: dict, path: str) -> dict[str, Any]:
        if "anomaly_scores" in output:
            maps = dict(output["anomaly_scores"])
        elif "anomaly" in output:
            maps = {"anomaly": output["anomaly"]}
        else:
            raise KeyError(f"output for {path} has neither 'anomaly_scores' nor 'anomaly'")
        if not maps:
            raise ValueError(f"output['anomaly_scores'] for {path} is empty")
        for name in maps:
            if "/" in name:
                raise ValueError(
                    f"anomaly score name {name!r} must not contain '/' (it separates result keys)"
                )
        return maps

    def _switch_to_histograms(self, fix_range: bool) -> None:
        """Move the exact buffers into histograms; in auto mode the range is fixed from all of them."""
        codes = np.concatenate(self._codes) if self._codes else np.zeros(0, np.uint8)
        for name in self._names or ():
            hist = self._new_hist(name)
            if codes.size:
                hist.add(np.concatenate(self._scores[name]), codes)
            if fix_range:
                hist.fix_range()
            self._hists[name] = hist
        self._codes, self._scores = [], {}
        self._use_hist = True

    @torch.no_grad()
    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Read each image's ground truth, check it against the score maps and keep / bin valid pixels."""
        for input_, output in zip(inputs, outputs):
            codes, path = self._load_codes(input_)
            maps = self._score_maps(output, path)
            if self._names is None:
                self._names = tuple(maps)
            elif set(maps) != set(self._names):
                raise ValueError(
                    f"output for {path} has anomaly scores {sorted(maps)} but earlier images had "
                    f"{sorted(self._names)}; every image must carry the same scores"
                )
            valid = (codes != VOID).reshape(-1)
            flat_codes = codes.reshape(-1)[valid]
            scores = {}
            for name in self._names:
                m = maps[name]
                if tuple(m.shape) != codes.shape:
                    raise ValueError(
                        f"ground truth {path} has shape {codes.shape} but anomaly score {name!r} has shape "
                        f"{tuple(m.shape)} (H, W)"
                    )
                s = _map_numpy(m).reshape(-1)[valid]
                if np.isnan(s).any():
                    raise ValueError(f"anomaly score {name!r} for {path} has {int(np.isnan(s).sum())} NaNs")
                scores[name] = s
            if self._output_dir and len(self._heatmaps) < self._num_heatmaps:
                self._heatmaps.append(self._heatmap_data(input_, codes, maps))

            self._num_pixels += flat_codes.size
            if self._use_hist:
                for name in self._names:
                    if name not in self._hists:
                        self._hists[name] = self._new_hist(name)
                    self._hists[name].add(scores[name], flat_codes)
                continue
            self._codes.append(flat_codes)
            for name in self._names:
                self._scores.setdefault(name, []).append(scores[name])
            if self._num_pixels > self._budget():
                if self._mode == "exact":
                    raise RuntimeError(
                        f"AnomalyEvaluator(mode='exact') on {self._dataset_name}: more than "
                        f"{self._budget()} valid pixels on this process (max_exact_pixels="
                        f"{self._max_exact_pixels}); use mode='auto' or 'histogram'"
                    )
                logger.info(
                    "AnomalyEvaluator on %s: more than %d pixels on this process, switching from exact to "
                    "histogram mode (%d bins, range fixed from the %d pixels seen so far)",
                    self._dataset_name,
                    self._budget(),
                    self._num_bins,
                    self._num_pixels,
                )
                self._switch_to_histograms(fix_range=True)

    def _heatmap_data(self, input_: dict, codes: np.ndarray, maps: dict[str, Any]) -> dict[str, Any]:
        """Downsampled copies (longest side <= 512) of image, ground truth and scores for one heat map."""
        stride = max(1, math.ceil(max(codes.shape) / 512))
        image = None
        if input_.get("file_name"):
            try:
                with PathManager.open(input_["file_name"], "rb") as f:
                    image = np.asarray(Image.open(f).convert("RGB"))[::stride, ::stride]
            except OSError as err:
                logger.warning(
                    "AnomalyEvaluator: cannot read %s for a heat map (%s)", input_["file_name"], err
                )
        image_id = input_.get("image_id", os.path.splitext(os.path.basename(input_.get("file_name", "")))[0])
        return {
            "image_id": str(image_id) or str(len(self._heatmaps)),
            "image": image,
            "codes": codes[::stride, ::stride].copy(),
            "scores": {n: _map_numpy(m)[::stride, ::stride].copy() for n, m in maps.items()},
        }

    # ---------------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "names": self._names,
            "use_hist": self._use_hist,
            "codes": np.concatenate(self._codes) if self._codes else np.zeros(0, np.uint8),
            "scores": {n: np.concatenate(v) for n, v in self._scores.items()},
            "hists": self._hists,
            "has_family": self._has_family,
            "heatmaps": self._heatmaps,
        }

    def evaluate(self) -> OrderedDict[str, dict[str, float]] | None:
        """Gather, compute per-score metrics (percent) on the main process, write the report and plots.

        Returns ``OrderedDict(anomaly={"<score>/AUROC": ..., "<score>/near/AP": ...})`` on the main
        process, ``None`` elsewhere, ``{}`` with a warning if nothing was processed.
        """
        state = self._state()
        if self._distributed:
            comm.synchronize()
            states = comm.gather(state, dst=0)
            if not comm.is_main_process():
                return None
        else:
            states = [state]
        states = [s for s in states if s["names"] is not None]
        if not states:
            logger.warning("AnomalyEvaluator on %s: no images were processed.", self._dataset_name)
            return OrderedDict()
        names = states[0]["names"]
        for s in states[1:]:
            if set(s["names"]) != set(names):
                raise ValueError(
                    f"processes saw different anomaly scores: {sorted(names)} vs {sorted(s['names'])}"
                )
        has_family = any(s["has_family"] for s in states)
        use_hist = any(s["use_hist"] for s in states)
        codes = np.concatenate([s["codes"] for s in states])

        grouped: dict[str, np.ndarray] = {}  # name -> (groups, codes) counts, highest score first
        hists: dict[str, ScoreHistogram] = {}
        for name in names:
            if use_hist:  # merge() returns new objects: the processes' own histograms stay untouched
                parts = [s["hists"][name] for s in states if s["use_hist"]]
                hist = parts[0]._like()
                for part in parts:
                    hist = hist.merge(part)
                if codes.size:
                    hist.add(np.concatenate([s["scores"][name] for s in states if not s["use_hist"]]), codes)
                hist.fix_range()
                hists[name] = hist
                grouped[name] = hist.counts[::-1]
            else:
                scores = np.concatenate([s["scores"][name] for s in states])
                grouped[name] = _grouped_counts(scores, codes, _NUM_CODES)

        totals = next(iter(grouped.values())).sum(axis=0)
        if totals[_CODE_ID] == 0 or totals[1:].sum() == 0:
            raise ValueError(
                f"AnomalyEvaluator on {self._dataset_name}: need in-distribution and anomaly pixels, got "
                f"{int(totals[_CODE_ID])} and {int(totals[1:].sum())}"
            )
        subsets = {"": _SUBSETS[""]}
        if has_family:
            for fam, members in _SUBSETS.items():
                if fam and totals[list(members)].sum() > 0:
                    subsets[fam] = members

        results: dict[str, float] = OrderedDict()
        curves: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for name in names:
            curves[name] = {}
            for fam, members in subsets.items():
                counts = grouped[name]
                pos, neg = counts[:, list(members)].sum(axis=1), counts[:, _CODE_ID]
                if use_hist:
                    m = hists[name].metrics(positive=members, negative=(_CODE_ID,))
                else:
                    m = _metrics_from_counts(pos, neg)
                prefix = f"{name}/{fam}/" if fam else f"{name}/"
                results[prefix + "AUROC"] = 100.0 * m["auroc"]
                results[prefix + "AP"] = 100.0 * m["ap"]
                results[prefix + "FPR95"] = 100.0 * m["fpr95"]
                if use_hist:
                    for key in ("AUROC", "AP", "FPR95"):
                        results[prefix + f"bound_{key}"] = 100.0 * m[f"bound_{key.lower()}"]
                if self._output_dir:
                    curves[name][fam or "all"] = {**_curves(pos, neg), **m}

        mode = "histogram" if use_hist else "exact"
        logger.info(
            "AnomalyEvaluator on %s (%s mode, %d pixels): %s",
            self._dataset_name,
            mode,
            int(totals.sum()),
            ", ".join(f"{k} {v:.2f}" for k, v in results.items() if "bound" not in k),
        )
        if self._output_dir:
            self._write_outputs(results, mode, totals, hists, curves, states)
        return OrderedDict({"anomaly": results})

    # ---------------------------------------------------------------------------------------------
    def _write_outputs(
        self,
        results: dict[str, float],
        mode: str,
        totals: np.ndarray,
        hists: dict[str, ScoreHistogram],
        curves: dict[str, dict[str, dict[str, Any]]],
        states: list[dict[str, Any]],
    ) -> None:
        PathManager.mkdirs(self._output_dir)
        report: dict[str, Any] = {
            "dataset": self._dataset_name,
            "mode": mode,
            "metrics": dict(results),
            "pixels": {
                "in_distribution": int(totals[_CODE_ID]),
                "anomaly": int(totals[1:].sum()),
                **{fam: int(totals[1 + v]) for fam, v in _FAMILIES.items()},
            },
            "definitions": {
                "AUROC": "area under the ROC curve, anomaly = positive, ties count 1/2",
                "AP": "sum_n (R_n - R_{n-1}) P_n over distinct thresholds (sklearn average_precision_score)",
                "FPR95": "smallest false-positive rate among thresholds whose true-positive rate >= 95%",
                "families": "near / far: that family's pixels against all in-distribution pixels",
                "bound_*": "histogram mode: |histogram metric - exact metric| <= bound (percent)",
            },
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
        with PathManager.open(os.path.join(self._output_dir, "anomaly_evaluation.json"), "w") as f:
            json.dump(_json_safe(report), f, indent=2)
        for name, by_family in curves.items():
            _plot_roc_pr(by_family, os.path.join(self._output_dir, f"roc_pr_{_safe(name)}.png"), name)
        heatmaps = [h for s in states for h in s["heatmaps"]][: self._num_heatmaps]
        for h in heatmaps:
            _plot_heatmap(h, os.path.join(self._output_dir, f"heatmap_{_safe(h['image_id'])}.png"))


def _safe(name: str) -> str:
    return re.sub(r"[^\w.-]", "_", name)


def _plot_roc_pr(by_family: dict[str, dict[str, Any]], path: str, score_name: str) -> None:
    """ROC and precision-recall curves of one score, one line per family, side by side.

    matplotlib is imported here and used through the Agg canvas (no pyplot), so importing the evaluator
    neither needs matplotlib nor changes the process-wide backend.
    """
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


_CODE_COLORS = {_CODE_ID: (30, 30, 30), _CODE_ANOMALY: (255, 140, 0), 2: (255, 220, 0), 3: (230, 30, 30)}


def _plot_heatmap(data: dict[str, Any], path: str) -> None:
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
