"""Detectron2 evaluator of anomaly segmentation: AUROC / AP / FPR95 and sIoU / PPV / mean F1 of every score.

The evaluator reads each image's anomaly ground truth (:mod:`.anomaly_labels`), keeps the valid pixels'
scores (exact mode, :mod:`.anomaly_ranking`) or streams them into histograms (:mod:`.score_histogram`)
when a split is too large to hold; the main process merges, computes the metrics (pooled or per image,
:mod:`.anomaly_aggregation`; components, :mod:`.anomaly_components`) and writes the report and figures
(:mod:`.anomaly_report`).
"""

from __future__ import annotations

import logging
import math
import os
from collections import OrderedDict
from typing import Any, Mapping

import numpy as np
import torch
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from .anomaly_aggregation import AGGREGATIONS, add_conventions, image_metrics, threshold_components
from .anomaly_components import ComponentSettings
from .anomaly_labels import CODE_ID, NUM_CODES, SUBSETS, load_codes
from .anomaly_ranking import VOID, grouped_counts, metrics_from_counts, roc_pr_curves
from .anomaly_report import write_anomaly_report
from .score_histogram import ScoreHistogram

__all__ = ["AnomalyEvaluator"]

logger = logging.getLogger(__name__)


def _map_numpy(m: Any) -> np.ndarray:
    """A score map as float32 numpy on the CPU (the evaluator's exact mode stores float32)."""
    if isinstance(m, torch.Tensor):
        return m.detach().float().cpu().numpy()
    return np.asarray(m, dtype=np.float32)


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
        aggregation: str = "pooled",
        components: ComponentSettings | None = None,
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
            aggregation: ``"pooled"`` (all valid pixels of the split) or ``"per_image"`` (mean over images
                of each image's AUROC / AP / FPR95).
            components: SegmentMeIfYouCan's component metrics with these settings; ``None``: none. At the
                best-F1 threshold they need exact mode (the images' scores are kept; they are skipped,
                with a warning, once a split goes to histograms); a fixed threshold works in any mode.
        """
        if mode not in ("exact", "histogram", "auto"):
            raise ValueError(f"mode must be 'exact', 'histogram' or 'auto', got {mode!r}")
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
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
        self._aggregation = aggregation
        self._components = components
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
        self._image_records: list[dict[str, Any]] = []  # per_image: each image's metrics
        self._images: list[np.ndarray] = []  # components at best F1: each image's (H, W) codes
        self._parts: dict[str, list] = {}  # components at a fixed threshold: each image's statistics

    # ---------------------------------------------------------------------------------------------
    def _range_for(self, name: str) -> tuple[float, float] | None:
        if isinstance(self._score_range, Mapping):
            return self._score_range.get(name)
        return self._score_range

    def _new_hist(self, name: str) -> ScoreHistogram:
        return ScoreHistogram(self._num_bins, self._range_for(name), num_labels=NUM_CODES)

    def _budget(self) -> int:
        world = comm.get_world_size() if self._distributed else 1
        return -(-self._max_exact_pixels // world)

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
        if self._images:
            logger.warning(
                "AnomalyEvaluator on %s: component metrics at the best-F1 threshold need exact mode; "
                "they are skipped (set a fixed threshold, TEST.ANOMALY_COMPONENTS.THRESHOLD, or raise "
                "TEST.ANOMALY_MAX_EXACT_PIXELS)",
                self._dataset_name,
            )
        self._images = []

    @torch.no_grad()
    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """Read each image's ground truth, check it against the score maps and keep / bin valid pixels."""
        for input_, output in zip(inputs, outputs):
            codes, path, has_family = load_codes(input_)
            self._has_family |= has_family
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

            self._per_image(codes, flat_codes, scores, maps)
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

    def _per_image(self, codes: np.ndarray, flat_codes: np.ndarray, scores: dict, maps: dict) -> None:
        """What is kept of each image beyond its pixels: per-image metrics, components or its codes."""
        if self._aggregation == "per_image":
            self._image_records.append({n: image_metrics(s, flat_codes, SUBSETS) for n, s in scores.items()})
        settings = self._components
        if settings is not None and settings.threshold is not None:
            for name in scores:
                part = threshold_components(_map_numpy(maps[name]), codes, settings, settings.threshold, True)
                self._parts.setdefault(name, []).append(part)
        elif settings is not None and not self._use_hist:
            self._images.append(codes)

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
            "records": self._image_records,
            "images": self._images,
            "parts": self._parts,
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
        values: dict[str, np.ndarray] = {}  # name -> the groups' score values (exact mode)
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
                grouped[name], values[name] = grouped_counts(scores, codes, NUM_CODES, return_values=True)

        totals = next(iter(grouped.values())).sum(axis=0)
        if totals[CODE_ID] == 0 or totals[1:].sum() == 0:
            raise ValueError(
                f"AnomalyEvaluator on {self._dataset_name}: need in-distribution and anomaly pixels, got "
                f"{int(totals[CODE_ID])} and {int(totals[1:].sum())}"
            )
        subsets = {"": SUBSETS[""]}
        if has_family:
            for fam, members in SUBSETS.items():
                if fam and totals[list(members)].sum() > 0:
                    subsets[fam] = members

        results: dict[str, float] = OrderedDict()
        curves: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for name in names:
            curves[name] = {}
            for fam, members in subsets.items():
                counts = grouped[name]
                pos, neg = counts[:, list(members)].sum(axis=1), counts[:, CODE_ID]
                if use_hist:
                    m = hists[name].metrics(positive=members, negative=(CODE_ID,))
                else:
                    m = metrics_from_counts(pos, neg)
                prefix = f"{name}/{fam}/" if fam else f"{name}/"
                results[prefix + "AUROC"] = 100.0 * m["auroc"]
                results[prefix + "AP"] = 100.0 * m["ap"]
                results[prefix + "FPR95"] = 100.0 * m["fpr95"]
                if use_hist:
                    for key in ("AUROC", "AP", "FPR95"):
                        results[prefix + f"bound_{key}"] = 100.0 * m[f"bound_{key.lower()}"]
                if self._output_dir:
                    curves[name][fam or "all"] = {**roc_pr_curves(pos, neg), **m}

        extra = add_conventions(
            results, states, names, subsets, grouped, values, use_hist, self._aggregation, self._components
        )
        mode = "histogram" if use_hist else "exact"
        logger.info(
            "AnomalyEvaluator on %s (%s mode, %d pixels): %s",
            self._dataset_name,
            mode,
            int(totals.sum()),
            ", ".join(f"{k} {v:.2f}" for k, v in results.items() if "bound" not in k),
        )
        if self._output_dir:
            heatmaps = [h for s in states for h in s["heatmaps"]][: self._num_heatmaps]
            write_anomaly_report(
                self._output_dir, self._dataset_name, results, mode, totals, hists, curves, heatmaps, extra
            )
        return OrderedDict({"anomaly": results})
