"""ADE20K preparation: ``annotations/`` (0 other, 1..150) -> ``annotations_detectron2/`` (0..149, 255)."""

from __future__ import annotations

import os

import numpy as np

from gmmseg.data.datasets.common import dataset_root
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg_datasets.label_io import convert_folders, unique_values


def ade20k_to_detectron2(label: np.ndarray, source: str = "<array>") -> np.ndarray:
    """ADE20K SceneParsing labels (0 other/ignore, 1..150 classes) -> 0..149 with 255 ignore.

    The same ``label - 1`` in uint8 as Detectron2's and Mask2Former's ``prepare_ade20k_sem_seg.py``.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise DatasetFormatError(f"{source}: expected a single-channel label image, got shape {label.shape}")
    if label.size and int(label.max()) > 150:
        raise DatasetFormatError(
            f"{source}: values {unique_values(label[label > 150])} exceed 150 (ADE20K SceneParsing "
            "labels are 0 = other, 1..150 = classes)"
        )
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 -> -1 -> 255


def prepare_ade20k(root: str | os.PathLike | None = None, workers: int = 1) -> int:
    """``ADEChallengeData2016/annotations/`` -> ``annotations_detectron2/`` (label - 1, 0 -> 255)."""
    ade = dataset_root(root) / "ADEChallengeData2016"
    pairs = [
        (ade / "annotations" / s, ade / "annotations_detectron2" / s) for s in ("training", "validation")
    ]
    return convert_folders(
        ade20k_to_detectron2,
        pairs,
        "ADEChallengeData2016/annotations/<split>/*.png from ADEChallengeData2016.zip",
        workers,
    )
