"""Anomaly ground truth as one uint8 code per pixel: in-distribution, anomaly, or anomaly of a family.

An image's ``ood_file_name`` PNG holds 0 (in-distribution), 1 (anomaly) or 255 (void); the optional
``ood_family_file_name`` PNG names the family of anomaly pixels (1 near, 2 far). Folding both into one
code per pixel lets the evaluator count every family with a single ``bincount`` per score.
"""

from __future__ import annotations

import numpy as np
from detectron2.utils.file_io import PathManager
from PIL import Image

from .anomaly_ranking import VOID

__all__ = [
    "CODE_ANOMALY",
    "CODE_ID",
    "FAMILIES",
    "LABEL_MAPS",
    "NUM_CODES",
    "SUBSETS",
    "load_codes",
    "read_label_png",
]

# Pixel codes: one uint8 per pixel says in-distribution, anomaly, or anomaly of a given family.
CODE_ID, CODE_ANOMALY = 0, 1
FAMILIES = {"near": 1, "far": 2}  # values in ood_family PNGs; code = 1 + family
NUM_CODES = 2 + len(FAMILIES)
SUBSETS = {"": (1, 2, 3), **{name: (1 + value,) for name, value in FAMILIES.items()}}


def _lost_and_found_lut() -> np.ndarray:
    """LostAndFound gtCoarse label ids as the SMIYC benchmark reads them (``tracks.py``, DatasetLostAndFound:
    0 ignore, 1 road = known, 2..200 obstacles = anomaly; anything else stays void)."""
    lut = np.full(256, VOID, dtype=np.uint8)
    lut[1] = 0
    lut[2:201] = 1
    return lut


# ``input["ood_label_map"]`` names the conversion of a dataset's published label ids to 0 / 1 / 255
LABEL_MAPS = {"lost_and_found": _lost_and_found_lut()}


def read_label_png(path: str) -> np.ndarray:
    """A label PNG as stored (PIL gives palette indices for 'P' images, i.e. the labels themselves)."""
    with PathManager.open(path, "rb") as f:
        arr = np.asarray(Image.open(f))
    if arr.ndim != 2:
        raise ValueError(f"{path}: expected a single-channel label PNG, got shape {arr.shape}")
    return arr


def load_codes(input_: dict) -> tuple[np.ndarray, str, bool]:
    """``(codes, path, has_family)``: 0 in-distribution, 1 anomaly, 1 + family for near/far, 255 void.

    ``has_family`` says whether the input carried a family map, i.e. whether per-family metrics apply.
    """
    if "ood_file_name" not in input_:
        raise KeyError(
            f"input {input_.get('file_name', '<unknown>')!r} has no 'ood_file_name'; "
            "AnomalyEvaluator reads the anomaly ground truth from it"
        )
    path = input_["ood_file_name"]
    ood = read_label_png(path)
    if input_.get("ood_label_map"):
        if input_["ood_label_map"] not in LABEL_MAPS or ood.dtype != np.uint8:
            raise ValueError(
                f"{path}: cannot apply label map {input_['ood_label_map']!r} ({ood.dtype} labels)"
            )
        ood = LABEL_MAPS[input_["ood_label_map"]][ood]
    bad = (ood != 0) & (ood != 1) & (ood != VOID)
    if bad.any():
        raise ValueError(f"{path}: anomaly labels must be 0, 1 or 255, found {np.unique(ood[bad]).tolist()}")
    codes = ood.astype(np.uint8)
    family_path = input_.get("ood_family_file_name")
    if family_path:
        family = read_label_png(family_path)
        if family.shape != ood.shape:
            raise ValueError(f"{family_path}: shape {family.shape} differs from {path} {ood.shape}")
        bad = ~np.isin(family, (0, *FAMILIES.values(), VOID))
        if bad.any():
            raise ValueError(
                f"{family_path}: family labels must be 0, 1, 2 or 255, "
                f"found {np.unique(family[bad]).tolist()}"
            )
        clash = (ood == 0) & np.isin(family, tuple(FAMILIES.values()))
        if clash.any():
            raise ValueError(
                f"{family_path}: {int(clash.sum())} pixels have an anomaly family but are "
                f"in-distribution in {path}"
            )
        for value in FAMILIES.values():
            codes[(ood == 1) & (family == value)] = 1 + value
        return codes, path, True
    return codes, path, False
