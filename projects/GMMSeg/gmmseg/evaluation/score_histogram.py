"""Streaming, mergeable score histogram: anomaly metrics of splits too large to sort, with error bounds.

:class:`ScoreHistogram` counts labels per score bin and treats scores within a bin as tied. Binning can
only confuse the order of pixels that share a bin, so each metric's distance to the exact value is
bounded from the histogram's own counts; the bounds are reported with the metrics (``bound_*``), which
makes the approximation checkable rather than a guess.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import numpy as np

from .anomaly_ranking import TPR_TARGET, VOID, as_scores, metrics_from_counts, to_numpy

__all__ = ["ScoreHistogram"]

logger = logging.getLogger(__name__)


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
        s = as_scores(scores)
        y = to_numpy(labels).reshape(-1)
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
        res = metrics_from_counts(counts[:, 1], counts[:, 0])
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
