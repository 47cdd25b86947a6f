"""COCO-Stuff-164k preparation: ``stuffthingmaps/`` (COCO-Stuff id - 1) -> ``stuffthingmaps_detectron2/``
(contiguous 0..170, 255 unlabelled)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

import numpy as np

from gmmseg.data.datasets.common import IGNORE_LABEL, dataset_root
from gmmseg.data.datasets.register_coco_stuff import (
    COCO_STUFF_FIRST_STUFF_ID,
    COCO_STUFF_STUFF_NAMES,
    coco_stuff_categories,
)
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg_datasets.label_io import convert_folders, unique_values


@cache
def coco_stuff_lut() -> np.ndarray:
    """256-entry table: stuffthingmaps value (COCO-Stuff id - 1; 255 unlabelled) -> 0..170 or 255.

    Values of the 11 COCO ids that no class uses map to 255 (they never occur in the official maps);
    values above 181 other than 255 are no COCO-Stuff ids and map to -1 (an error).
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[: COCO_STUFF_FIRST_STUFF_ID + len(COCO_STUFF_STUFF_NAMES) - 1] = IGNORE_LABEL
    for contiguous, cat in enumerate(coco_stuff_categories()):
        lut[cat["id"] - 1] = contiguous
    lut[255] = IGNORE_LABEL
    lut.flags.writeable = False  # cached and shared by every conversion
    return lut


def coco_stuff_to_detectron2(label: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Map an official ``stuffthingmaps_trainval2017`` PNG (ids 0..181, 255) to contiguous 0..170/255."""
    label = np.asarray(label)
    if label.ndim != 2 or label.dtype != np.uint8:
        raise DatasetFormatError(
            f"{source}: expected a single-channel 8-bit map, got shape {label.shape} {label.dtype}"
        )
    out = coco_stuff_lut()[label]
    if (out < 0).any():
        raise DatasetFormatError(
            f"{source}: values {unique_values(label[out < 0])} are no COCO-Stuff ids "
            "(stuffthingmaps hold 0..181 = COCO-Stuff id - 1, and 255 unlabelled)"
        )
    return out.astype(np.uint8)


def prepare_coco_stuff_164k(
    root: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> int:
    """``coco/stuffthingmaps/{train2017,val2017}`` -> ``coco/stuffthingmaps_detectron2/`` (0..170, 255).

    ``input_dir`` defaults to ``<root>/coco/stuffthingmaps`` (where ``stuffthingmaps_trainval2017.zip`` is
    unpacked). Every map is written, including all-unlabelled ones, so every image keeps its label file.
    """
    coco = dataset_root(root) / "coco"
    src = Path(input_dir) if input_dir is not None else coco / "stuffthingmaps"
    pairs = [(src / s, coco / "stuffthingmaps_detectron2" / s) for s in ("train2017", "val2017")]
    return convert_folders(
        coco_stuff_to_detectron2,
        pairs,
        "the PNGs of stuffthingmaps_trainval2017.zip ({train2017,val2017}/*.png)",
        workers,
    )
