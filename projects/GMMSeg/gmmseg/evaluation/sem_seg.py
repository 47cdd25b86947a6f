"""Semantic-segmentation evaluator: IoU / accuracy metrics plus pixel-level calibration (ECE).

Detectron2 0.6 ships a ``SemSegEvaluator`` but it uses ``np.int`` / ``np.float`` (removed in numpy 2),
takes the ground truth through ``DatasetCatalog`` and ignores the posteriors. GMMSeg is a generative
classifier whose selling point includes calibrated posteriors, so this evaluator also accumulates
reliability-bin statistics. Everything is accumulated as small sufficient statistics (a CxC confusion
matrix and three B-length bin arrays), which makes distributed evaluation a plain sum.

The math lives in module-level pure numpy functions (:func:`confusion_matrix` and
:func:`segmentation_metrics` here, the calibration ones in :mod:`.calibration`) so it can be tested on its
own; the evaluator does the per-pixel work in torch on the output's device and only moves the small
per-image statistics to numpy.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from .calibration import (
    bin_statistics,
    expected_calibration_error,
    plot_reliability_diagram,
    reliability_table,
)

__all__ = ["SemSegEvaluator", "confusion_matrix", "segmentation_metrics"]

logger = logging.getLogger(__name__)

# |sum_c p_c - 1| above this means the model returned unnormalised scores (logits), not posteriors.
_PROB_SUM_TOL = 1e-3


# --------------------------------------------------------------------------------------------------
# Pure functions (numpy in, numpy out)
# --------------------------------------------------------------------------------------------------
def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_label: int) -> np.ndarray:
    """(C, C) int64 confusion matrix, rows = ground truth, columns = prediction.

    Pixels whose ground truth equals ``ignore_label`` are skipped. One ``np.bincount`` over the flat
    index ``gt * C + pred`` does the whole count without a Python loop.
    """
    gt = np.asarray(gt, dtype=np.int64).reshape(-1)
    pred = np.asarray(pred, dtype=np.int64).reshape(-1)
    if gt.shape != pred.shape:
        raise ValueError(f"gt and pred differ in size: {gt.size} vs {pred.size}")
    keep = gt != ignore_label
    gt, pred = gt[keep], pred[keep]
    for name, arr in (("gt", gt), ("pred", pred)):
        bad = (arr < 0) | (arr >= num_classes)
        if bad.any():
            raise ValueError(f"{name} has labels outside [0, {num_classes}): {np.unique(arr[bad]).tolist()}")
    counts = np.bincount(gt * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _nanmean(x: np.ndarray) -> float:
    """Mean over finite entries; NaN (without numpy's empty-slice warning) when there are none."""
    valid = ~np.isnan(x)
    return float(x[valid].mean()) if valid.any() else float("nan")


def segmentation_metrics(conf_matrix: np.ndarray, class_names: Sequence[str]) -> Dict[str, float]:
    """Standard segmentation metrics, in percent, from a (C, C) gt-by-prediction confusion matrix.

    Returns ``mIoU``, ``fwIoU``, ``IoU-<name>``, ``mACC``, ``pACC``, ``ACC-<name>`` (Detectron2's keys and
    order). A class's IoU is NaN when it is absent from both ground truth and prediction (union 0) and its
    accuracy is NaN when it is absent from the ground truth; NaNs are left out of the means. A class that
    is only predicted (false positives, no ground truth) has IoU 0 and does count in mIoU.
    """
    cm = np.asarray(conf_matrix, dtype=np.float64)
    num_classes = cm.shape[0]
    if cm.shape != (num_classes, num_classes):
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a {num_classes}-class confusion matrix")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique (they become metric keys): {list(class_names)}")

    tp = np.diag(cm)
    pos_gt = cm.sum(axis=1)
    pos_pred = cm.sum(axis=0)
    union = pos_gt + pos_pred - tp
    total = pos_gt.sum()

    iou = np.full(num_classes, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    acc = np.full(num_classes, np.nan)
    np.divide(tp, pos_gt, out=acc, where=pos_gt > 0)

    if total > 0:
        present = pos_gt > 0  # union > 0 there, so iou is finite
        fwiou = float(np.sum(pos_gt[present] / total * iou[present]))
        pacc = float(tp.sum() / total)
    else:
        fwiou = pacc = float("nan")

    res: Dict[str, float] = OrderedDict()
    res["mIoU"] = 100.0 * _nanmean(iou)
    res["fwIoU"] = 100.0 * fwiou
    for name, v in zip(class_names, iou):
        res[f"IoU-{name}"] = 100.0 * float(v)
    res["mACC"] = 100.0 * _nanmean(acc)
    res["pACC"] = 100.0 * pacc
    for name, v in zip(class_names, acc):
        res[f"ACC-{name}"] = 100.0 * float(v)
    return res


def _json_safe(x: Any) -> Any:
    """NaN/inf -> None so the JSON file is standard JSON (json.dumps would write bare ``NaN``)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


# --------------------------------------------------------------------------------------------------
# Evaluator
# --------------------------------------------------------------------------------------------------
class SemSegEvaluator(DatasetEvaluator):
    """mIoU / fwIoU / mACC / pACC and pixel ECE from ``output["sem_seg"]`` class posteriors.

    Mask-classification models (Mask2Former) whose outputs carry ``query_calibration`` (per image the
    queries' (Q, C+1) posteriors and (Q,) Hungarian labels, ``modeling/query_labels.py``) also get the ECE
    of the query posteriors: ``ECE-query`` over the matched queries (confidence = max posterior, correct =
    its argmax is the matched class) and ``ECE-query-all`` over every query, the unmatched ones labelled
    "no object". Beside the pixel ``ECE`` (after the mask-weighted sum over queries), they tell whether
    soft pixel posteriors come from the queries' posteriors or from their aggregation.

    Ground truth comes from each input's ``sem_seg_file_name`` PNG (class index per pixel), not from the
    model output. State is a confusion matrix plus reliability-bin sums, so ``distributed=True`` only
    gathers a few small arrays to rank 0.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        num_classes: int | None = None,
        ignore_label: int | None = None,
        num_calibration_bins: int = 15,
    ) -> None:
        """
        Args:
            dataset_name: name in ``MetadataCatalog``; its ``stuff_classes`` name the classes and its
                ``ignore_label`` (default 255) marks unlabeled pixels.
            distributed: gather statistics from all ranks in :meth:`evaluate` (only rank 0 returns).
            output_dir: where to write ``sem_seg_evaluation.json`` and ``reliability_diagram.png``.
            num_classes: must match ``len(stuff_classes)``; only needed when metadata has no classes.
            ignore_label: overrides the metadata's ignore label.
            num_calibration_bins: number of equal-width confidence bins for ECE.
        """
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        meta = MetadataCatalog.get(dataset_name)

        class_names = meta.get("stuff_classes", None)
        if class_names is None:
            if num_classes is None:
                raise ValueError(
                    f"dataset {dataset_name!r} has no 'stuff_classes' metadata; pass num_classes explicitly"
                )
            class_names = [str(i) for i in range(num_classes)]
        elif num_classes is not None and num_classes != len(class_names):
            raise ValueError(
                f"num_classes={num_classes} but dataset {dataset_name!r} has {len(class_names)} stuff_classes"
            )
        self._class_names: List[str] = list(class_names)
        self._num_classes = len(self._class_names)
        self._ignore_label = int(ignore_label if ignore_label is not None else meta.get("ignore_label", 255))
        if num_calibration_bins < 1:
            raise ValueError(f"num_calibration_bins must be >= 1, got {num_calibration_bins}")
        self._num_bins = int(num_calibration_bins)
        self._warned_logits = False
        self.reset()

    def reset(self) -> None:
        """Clear the accumulated statistics (called by ``inference_on_dataset`` before each round)."""
        c, b = self._num_classes, self._num_bins
        self._conf_matrix = np.zeros((c, c), dtype=np.int64)
        self._bin_counts = np.zeros(b, dtype=np.int64)
        self._bin_conf_sums = np.zeros(b, dtype=np.float64)
        self._bin_correct_sums = np.zeros(b, dtype=np.int64)
        # query bins: [matched queries, all queries] x [count, confidence sum, correct count] x bins
        self._query_bins = np.zeros((2, 3, b), dtype=np.float64)

    # ---------------------------------------------------------------------------------------------
    def _load_gt(self, input_: dict) -> Tuple[np.ndarray, str]:
        """Read the label PNG; PIL gives palette indices for 'P' images, i.e. the class ids."""
        if "sem_seg_file_name" not in input_:
            raise KeyError(
                f"input {input_.get('file_name', '<unknown>')!r} has no 'sem_seg_file_name'; "
                "SemSegEvaluator reads the ground truth from it"
            )
        path = input_["sem_seg_file_name"]
        with PathManager.open(path, "rb") as f:
            gt = np.asarray(Image.open(f), dtype=np.int64)
        return gt, path

    def _posteriors(self, scores: torch.Tensor, path: str) -> torch.Tensor:
        """Return (C, H, W) probabilities; softmax first if the model handed back logits."""
        scores = scores.float()
        sums = scores.sum(dim=0)
        if not torch.isfinite(sums).all():
            raise ValueError(f"sem_seg output for {path} contains NaN or inf")
        if (sums - 1.0).abs().max().item() > _PROB_SUM_TOL:
            if not self._warned_logits:
                logger.warning(
                    "SemSegEvaluator: output['sem_seg'] does not sum to 1 over classes (|sum - 1| > %g); "
                    "treating it as logits and applying softmax over C. Return posteriors to silence this.",
                    _PROB_SUM_TOL,
                )
                self._warned_logits = True
            scores = torch.softmax(scores, dim=0)
        return scores

    @torch.no_grad()
    def process(self, inputs: List[dict], outputs: List[dict]) -> None:
        """Accumulate the confusion matrix and reliability-bin sums for each image.

        Per-pixel work (argmax, masking, bincount) stays in torch on the output's device; only the
        C*C + 3*B per-image sums go to numpy.
        """
        c, b = self._num_classes, self._num_bins
        for input_, output in zip(inputs, outputs):
            gt_np, path = self._load_gt(input_)
            scores = output["sem_seg"]
            if scores.dim() != 3 or scores.shape[0] != c:
                raise ValueError(
                    f"output['sem_seg'] for {path} must have shape (C={c}, H, W), got {tuple(scores.shape)}"
                )
            if gt_np.shape != tuple(scores.shape[1:]):
                raise ValueError(
                    f"ground truth {path} has shape {gt_np.shape} but the prediction is "
                    f"{tuple(scores.shape[1:])} (H, W)"
                )
            device = scores.device
            gt = torch.from_numpy(gt_np).to(device).reshape(-1)
            valid = gt != self._ignore_label
            bad = valid & ((gt < 0) | (gt >= c))
            if bad.any():
                values = torch.unique(gt[bad]).tolist()
                raise ValueError(
                    f"ground truth {path} has labels {values} outside [0, {c}) that are not the "
                    f"ignore label {self._ignore_label}"
                )

            probs = self._posteriors(scores, path)
            conf, pred = probs.max(dim=0)  # first maximal index on ties, like argmax
            gt_v = gt[valid]
            pred_v = pred.reshape(-1)[valid]
            conf_v = conf.reshape(-1)[valid].double()  # float64 binning: c == 1 lands in the last bin
            correct = pred_v == gt_v

            cm = torch.bincount(gt_v * c + pred_v, minlength=c * c)
            counts, conf_sums, correct_sums = bin_statistics(conf_v, correct, b)

            self._conf_matrix += cm.cpu().numpy().reshape(c, c)
            self._bin_counts += counts
            self._bin_conf_sums += conf_sums
            self._bin_correct_sums += correct_sums
            if "query_calibration" in output:
                self._process_queries(output["query_calibration"])

    def _process_queries(self, queries: dict[str, torch.Tensor]) -> None:
        """Add one image's queries to the query bins: all of them, and the matched ones (label < C)."""
        posteriors, labels = queries["posteriors"].float(), queries["labels"].long()
        if posteriors.shape[-1] != self._num_classes + 1 or labels.shape != posteriors.shape[:1]:
            raise ValueError(
                f"query_calibration needs (Q, {self._num_classes + 1}) posteriors and (Q,) labels, got "
                f"{tuple(posteriors.shape)} and {tuple(labels.shape)}"
            )
        conf, pred = posteriors.max(dim=-1)
        correct = pred == labels
        matched = labels < self._num_classes
        for row, keep in enumerate((matched, torch.ones_like(matched))):
            self._query_bins[row] += np.stack(bin_statistics(conf[keep], correct[keep], self._num_bins))

    # ---------------------------------------------------------------------------------------------
    def evaluate(self) -> OrderedDict[str, Dict[str, float]] | None:
        """Sum statistics over ranks (if distributed) and compute metrics on the main process.

        Returns ``OrderedDict(sem_seg=metrics)`` on the main process, ``None`` on the others (as
        Detectron2's evaluators do), and ``{}`` with a warning when no labelled pixel was seen.
        """
        stats = (
            self._conf_matrix,
            self._bin_counts,
            self._bin_conf_sums,
            self._bin_correct_sums,
            self._query_bins,
        )
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(stats, dst=0)
            if not comm.is_main_process():
                return None
            stats = tuple(np.sum([s[i] for s in gathered], axis=0) for i in range(len(stats)))
        conf_matrix, counts, conf_sums, correct_sums, query_bins = stats

        if conf_matrix.sum() == 0:
            logger.warning(f"SemSegEvaluator on {self._dataset_name}: no labelled pixels were processed.")
            return OrderedDict()

        results = segmentation_metrics(conf_matrix, self._class_names)
        results["ECE"] = 100.0 * expected_calibration_error(counts, conf_sums, correct_sums)
        has_queries = query_bins[1, 0].sum() > 0
        if has_queries:
            results["ECE-query"] = 100.0 * expected_calibration_error(*query_bins[0])
            results["ECE-query-all"] = 100.0 * expected_calibration_error(*query_bins[1])

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            report = {
                "dataset": self._dataset_name,
                "metrics": dict(results),
                "class_names": self._class_names,
                "ignore_label": self._ignore_label,
                "confusion_matrix": conf_matrix.tolist(),
                "confusion_matrix_layout": "rows = ground truth, columns = prediction (pixel counts)",
                "reliability_bins": reliability_table(counts, conf_sums, correct_sums),
            }
            if has_queries:
                report["query_reliability_bins"] = {
                    "matched": reliability_table(*query_bins[0]),
                    "all": reliability_table(*query_bins[1]),
                }
            with PathManager.open(os.path.join(self._output_dir, "sem_seg_evaluation.json"), "w") as f:
                json.dump(_json_safe(report), f, indent=2)
            plot_reliability_diagram(
                counts,
                conf_sums,
                correct_sums,
                os.path.join(self._output_dir, "reliability_diagram.png"),
                title=f"Reliability diagram ({self._dataset_name})",
            )

        logger.info(
            "SemSegEvaluator on %s: mIoU %.2f, fwIoU %.2f, mACC %.2f, pACC %.2f, ECE %.2f",
            self._dataset_name,
            results["mIoU"],
            results["fwIoU"],
            results["mACC"],
            results["pACC"],
            results["ECE"],
        )
        return OrderedDict({"sem_seg": results})
