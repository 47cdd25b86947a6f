"""SegmentMeIfYouCan's evaluation sets in their published layouts, under the benchmark's own names.

Layouts, roots and frame selections are those of the benchmark's dataset definitions
(github.com/SegmentMeIfYouCan/road-anomaly-benchmark, ``road_anomaly_benchmark/datasets/tracks.py`` and
``tracks_extra.py``, ``paths.py``)::

    AnomalyTrack-validation    dataset_AnomalyTrack/images/validation*.jpg                   (RoadAnomaly21)
                               dataset_AnomalyTrack/labels_masks/<fid>_labels_semantic.png   0 / 1 / 255
    ObstacleTrack-validation   dataset_ObstacleTrack/images/validation_*.webp                (RoadObstacle21)
                               dataset_ObstacleTrack/labels_masks/<fid>_labels_semantic.png  0 / 1 / 255
    LostAndFound-testNoKnown   dataset_LostAndFound/leftImg8bit/test/<NN_scene>/<fid>_leftImg8bit.png
                               (or .webp / .jpg)
                               dataset_LostAndFound/gtCoarse/test/<NN_scene>/<fid>_gtCoarse_labelIds.png
                               (LAF ids: 0 void, 1 road = known, 2..200 obstacle = anomaly, else void)
    FishyLAFAnomaly-val        dataset_FishyLAF/labels/val/<fid>_fishy-labels.png            0 / 1 / 255
                               images: the LostAndFound frame <fid> (train or test split)

Roots, as the benchmark reads them: ``$DIR_LAF`` (LostAndFound) and ``$DIR_FISHY_LAF`` (FishyLAF labels)
name a dataset's folder; otherwise ``$DIR_DATASETS/<dataset_folder>``; otherwise, as every dataset of
this project, ``$DETECTRON2_DATASETS/<dataset_folder>``. Frame selections: the ObstacleTrack validation
scene without the ``validation_19``, ``validation_21`` ... ``validation_29`` frames; LostAndFound's test
split without its 17 invalid frames (positions in the sorted 1,203-frame split) and without the scenes
holding known objects (children, bicycles); FishyLAF's validation frames are those with a label file.

Metadata: ``evaluator_type="anomaly"``, Cityscapes' 19 ``stuff_classes`` (models evaluated here are
trained on Cityscapes) and the track's component size filters (``component_min_pred_size`` /
``component_min_gt_size``: anomaly track 500 / 100, obstacle track 50 / 10), which
``TEST.ANOMALY_COMPONENTS.MIN_*_SIZE = -1`` uses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gmmseg.data.datasets.common import (
    IGNORE_LABEL,
    dataset_root,
    read_image_size,
    register_dataset,
    require_dir,
)
from gmmseg.data.datasets.register_cityscapes import cityscapes_train_classes
from gmmseg.data.folder_dataset import DatasetFormatError

__all__ = ["SMIYC_SPLITS", "LAF_TEST_INVALID", "LAF_TEST_KNOWN_OBJECTS", "register_smiyc", "smiyc_root"]

logger = logging.getLogger(__name__)

OBSTACLE_VALIDATION_EXCLUDED = ("validation_19", *(f"validation_{i}" for i in range(21, 30)))
LAF_TEST_FRAMES = 1203
LAF_TEST_INVALID = (17, 37, 55, 72, 91, 110, 129, 153, 174, 197, 218, 353, 490, 618, 686, 792, 793)
LAF_TEST_KNOWN_OBJECTS = (
    "15_Rechbergstr_Deckenpfronn",  # children
    "01_Hanns_Klemm_Str_45_000006",  # bicycles
    "01_Hanns_Klemm_Str_45_000007",
    "10_Schlossberg_9_000004",
)
_IMAGE_EXTENSIONS = ("png", "webp", "jpg")
# (min predicted, min ground-truth component size) per track, as the benchmark's SegEval-AnomalyTrack /
# SegEval-ObstacleTrack (= gmmseg.evaluation.anomaly_components.TRACK_SIZE_FILTERS, not imported: the
# data package does not load the evaluators)
TRACK_SIZE_FILTERS = {"anomaly": (500, 100), "obstacle": (50, 10)}


def smiyc_root(folder: str, env: str | None, root: str | os.PathLike | None) -> Path:
    """A dataset's folder: ``root/folder`` if ``root`` is given, else ``$<env>``, ``$DIR_DATASETS/folder``
    or ``$DETECTRON2_DATASETS/folder``, read when called (loaders run lazily)."""
    if root is not None:
        return Path(root).expanduser() / folder
    if env and os.environ.get(env):
        return Path(os.environ[env]).expanduser()
    if os.environ.get("DIR_DATASETS"):
        return Path(os.environ["DIR_DATASETS"]).expanduser() / folder
    return dataset_root(None) / folder


def _record(image: Path, label: Path, fid: str, label_map: str | None = None) -> dict[str, Any]:
    if not label.is_file():
        raise DatasetFormatError(f"{label}: missing label file for image {image}")
    width, height = read_image_size(image)
    record = {"file_name": str(image), "ood_file_name": str(label), "image_id": fid}
    record.update(height=height, width=width)
    if label_map:
        record["ood_label_map"] = label_map  # gmmseg.evaluation.anomaly_labels.LABEL_MAPS
    return record


def load_track(root: Path, extension: str, keep: Callable[[str], bool]) -> list[dict[str, Any]]:
    """``images/<fid>.<extension>`` + ``labels_masks/<fid>_labels_semantic.png`` for the kept frame ids."""
    require_dir(root / "images", f"the track's images, <fid>.{extension}")
    require_dir(root / "labels_masks", "the labels <fid>_labels_semantic.png (0 known, 1 anomaly, 255 void)")
    images = sorted((root / "images").glob(f"*.{extension}"))
    dicts = [
        _record(p, root / "labels_masks" / f"{p.stem}_labels_semantic.png", p.stem)
        for p in images
        if keep(p.stem)
    ]
    if not dicts:
        raise DatasetFormatError(f"{root / 'images'}: no validation frames *.{extension}")
    return dicts


def _laf_images(laf: Path, split: str) -> list[Path]:
    folder = laf / "leftImg8bit" / split
    require_dir(folder, "LostAndFound images <NN_scene>/<fid>_leftImg8bit.png")
    for ext in _IMAGE_EXTENSIONS:  # the benchmark takes the first format found
        found = sorted(folder.glob(f"*/*_leftImg8bit.{ext}"), key=lambda p: p.name)
        if found:
            return found
    raise DatasetFormatError(f"{folder}: no <NN_scene>/<fid>_leftImg8bit.{{png,webp,jpg}} images")


def _laf_fid(path: Path) -> str:
    return path.name[: -len(path.suffix) - len("_leftImg8bit")]


def load_laf_test_no_known(laf: Path) -> list[dict[str, Any]]:
    """LostAndFound-testNoKnown: the test split without invalid frames and known-object scenes."""
    images = _laf_images(laf, "test")
    if len(images) == LAF_TEST_FRAMES:
        invalid = set(LAF_TEST_INVALID)
        images = [p for i, p in enumerate(images) if i not in invalid]
    else:  # the invalid frames are known by position in the complete split only
        logger.warning(
            "LostAndFound-testNoKnown: %d test frames instead of %d; the 17 invalid frames (known by their "
            "position in the full split) are not removed",
            len(images),
            LAF_TEST_FRAMES,
        )
    dicts = []
    for image in images:
        fid = _laf_fid(image)
        if fid.startswith(LAF_TEST_KNOWN_OBJECTS):
            continue
        label = laf / "gtCoarse" / "test" / image.parent.name / f"{fid}_gtCoarse_labelIds.png"
        dicts.append(_record(image, label, fid, label_map="lost_and_found"))
    return dicts


def load_fishy_laf_val(fishy: Path, laf: Path) -> list[dict[str, Any]]:
    """FishyLAFAnomaly-val: Fishyscapes' relabelled LostAndFound frames, images from either LAF split."""
    labels_dir = fishy / "labels" / "val"
    require_dir(labels_dir, "Fishyscapes LAF labels <fid>_fishy-labels.png (0 / 1 / 255)")
    images = {_laf_fid(p): p for split in ("train", "test") if (laf / "leftImg8bit" / split).is_dir()
              for p in _laf_images(laf, split)}  # fmt: skip
    dicts = []
    for label in sorted(labels_dir.glob("*_fishy-labels.png")):
        fid = label.name[: -len("_fishy-labels.png")]
        if fid not in images:
            raise DatasetFormatError(f"{label}: no LostAndFound image {fid}_leftImg8bit.* under {laf}")
        dicts.append(_record(images[fid], label, fid))
    if not dicts:
        raise DatasetFormatError(f"{labels_dir}: no *_fishy-labels.png")
    return dicts


# name -> (track, loader(root))
SMIYC_SPLITS: dict[str, tuple[str, Callable[[str | os.PathLike | None], list[dict[str, Any]]]]] = {
    "AnomalyTrack-validation": (
        "anomaly",
        lambda r: load_track(
            smiyc_root("dataset_AnomalyTrack", None, r), "jpg", lambda f: f.startswith("validation")
        ),
    ),
    "ObstacleTrack-validation": (
        "obstacle",
        lambda r: load_track(
            smiyc_root("dataset_ObstacleTrack", None, r),
            "webp",
            lambda f: f.split("_")[0] == "validation" and not f.startswith(OBSTACLE_VALIDATION_EXCLUDED),
        ),
    ),
    "LostAndFound-testNoKnown": (
        "obstacle",
        lambda r: load_laf_test_no_known(smiyc_root("dataset_LostAndFound", "DIR_LAF", r)),
    ),
    "FishyLAFAnomaly-val": (
        "anomaly",
        lambda r: load_fishy_laf_val(
            smiyc_root("dataset_FishyLAF", "DIR_FISHY_LAF", r),
            smiyc_root("dataset_LostAndFound", "DIR_LAF", r),
        ),
    ),
}


def register_smiyc(root: str | os.PathLike | None = None) -> list[str]:
    """Register the four SegmentMeIfYouCan evaluation sets (lazily: nothing is read here)."""
    classes = cityscapes_train_classes()
    for name, (track, loader) in SMIYC_SPLITS.items():
        min_pred, min_gt = TRACK_SIZE_FILTERS[track]
        register_dataset(
            name,
            lambda load=loader: load(root),
            stuff_classes=[n for n, _ in classes],
            stuff_colors=[c for _, c in classes],
            ignore_label=IGNORE_LABEL,
            evaluator_type="anomaly",
            has_ood=True,
            smiyc_track=track,
            component_min_pred_size=min_pred,
            component_min_gt_size=min_gt,
        )
    return list(SMIYC_SPLITS)
