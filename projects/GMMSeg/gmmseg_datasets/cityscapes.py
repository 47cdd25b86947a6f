"""Cityscapes preparation: labelIds or polygon annotations -> ``*_gtFine_labelTrainIds.png``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np

from gmmseg.data.datasets.common import IGNORE_LABEL, dataset_root, require_dir
from gmmseg.data.datasets.register_cityscapes import cityscapes_labels
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg_datasets.label_io import map_jobs, read_label, unique_values, write_label


@cache
def cityscapes_label_id_lut() -> np.ndarray:
    """A 256-entry table labelId -> trainId (255 ignore); ids absent from cityscapesscripts map to -1.

    Every trainId that cityscapesscripts marks as ignored (255, or -1 for 'license plate') becomes 255.
    """
    lut = np.full(256, -1, dtype=np.int16)
    for lab in cityscapes_labels():
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else IGNORE_LABEL
    lut.flags.writeable = False  # cached and shared by every conversion
    return lut


def cityscapes_ids_to_train_ids(label_ids: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Map Cityscapes labelIds to trainIds (uint8, 255 ignore) with cityscapesscripts' table.

    ``-1`` (license plate, only representable in signed arrays) maps to 255 like every ignored class;
    a value that is no Cityscapes id raises DatasetFormatError naming ``source``.
    """
    ids = np.asarray(label_ids)
    if ids.ndim != 2:
        raise DatasetFormatError(f"{source}: expected a single-channel labelIds image, got shape {ids.shape}")
    lut = cityscapes_label_id_lut()
    ids = ids.astype(np.int64)
    out = np.full(ids.shape, -1, dtype=np.int16)
    plate = ids == -1
    in_range = (ids >= 0) & (ids < 256)
    out[in_range] = lut[ids[in_range]]
    out[plate] = IGNORE_LABEL
    bad = out < 0
    if bad.any():
        raise DatasetFormatError(
            f"{source}: values {unique_values(ids[bad])} are not Cityscapes labelIds "
            "(cityscapesscripts.helpers.labels defines -1..33)"
        )
    return out.astype(np.uint8)


def cityscapes_polygons_to_train_ids(json_path: str | os.PathLike) -> np.ndarray:
    """Rasterise a ``*_gtFine_polygons.json`` into trainIds with cityscapesscripts' own drawing code.

    This is what cityscapesscripts' ``createTrainIdLabelImgs.py`` does (``json2labelImg(..., "trainIds")``),
    so the result is identical to the official files.
    """
    from cityscapesscripts.helpers.annotation import Annotation
    from cityscapesscripts.helpers.labels import name2label
    from cityscapesscripts.preparation.json2labelImg import createLabelImage

    json_path = Path(json_path)
    if not json_path.is_file():  # cityscapesscripts only prints a message and returns an empty annotation
        raise DatasetFormatError(f"{json_path}: missing")
    annotation = Annotation()
    try:
        annotation.fromJsonFile(str(json_path))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetFormatError(f"{json_path}: not a Cityscapes polygon annotation ({err!r})") from err
    if annotation.imgWidth <= 0 or annotation.imgHeight <= 0:
        raise DatasetFormatError(f"{json_path}: 'imgWidth'/'imgHeight' must be positive")
    for obj in annotation.objects:  # createLabelImage would sys.exit() on an unknown label
        label = obj.label
        if label not in name2label and label.endswith("group"):
            label = label[: -len("group")]
        if label not in name2label and not getattr(obj, "deleted", 0):
            raise DatasetFormatError(f"{json_path}: unknown Cityscapes label {obj.label!r}")
    image = createLabelImage(annotation, "trainIds")
    out = np.array(image, dtype=np.int16)
    # trainId -1 cannot be drawn into an 8-bit image; cityscapesscripts skips those polygons (id < 0)
    return np.where((out < 0) | (out >= 255), IGNORE_LABEL, out).astype(np.uint8)


def _cityscapes_job(job: tuple[str, str, str]) -> str:
    kind, src, dst = job
    if kind == "json":
        train_ids = cityscapes_polygons_to_train_ids(src)
    else:
        train_ids = cityscapes_ids_to_train_ids(read_label(Path(src)), source=src)
    write_label(train_ids, Path(dst))
    return dst


def prepare_cityscapes(
    root: str | os.PathLike | None = None,
    splits: Sequence[str] = ("train", "val"),
    source: str = "auto",
    workers: int = 1,
) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` next to each Cityscapes gtFine annotation; return the count.

    ``source`` is ``"json"`` (rasterise ``*_gtFine_polygons.json`` like cityscapesscripts'
    createTrainIdLabelImgs), ``"labelIds"`` (map ``*_gtFine_labelIds.png`` through cityscapesscripts'
    table) or ``"auto"`` (the polygons where present, else the labelIds PNG). Both give the same file.
    """
    if source not in ("auto", "json", "labelIds"):
        raise ValueError(f"source must be 'auto', 'json' or 'labelIds', got {source!r}")
    gt_root = dataset_root(root) / "cityscapes" / "gtFine"
    jobs: list[tuple[str, str, str]] = []
    for split in splits:
        split_dir = gt_root / split
        require_dir(split_dir, f"gtFine/{split}/<city>/ from Cityscapes' gtFine_trainvaltest.zip")
        frames: dict[Path, dict[str, Path]] = {}
        for path in sorted(split_dir.glob("*/*_gtFine_polygons.json")):
            frames.setdefault(path.parent / path.name[: -len("_polygons.json")], {})["json"] = path
        for path in sorted(split_dir.glob("*/*_gtFine_labelIds.png")):
            frames.setdefault(path.parent / path.name[: -len("_labelIds.png")], {})["labelIds"] = path
        if not frames:
            raise DatasetFormatError(
                f"{split_dir}: no <city>/*_gtFine_polygons.json or *_gtFine_labelIds.png annotations"
            )
        for stem, found in sorted(frames.items()):
            kind = ("json" if "json" in found else "labelIds") if source == "auto" else source
            if kind not in found:
                suffix = "_polygons.json" if kind == "json" else "_labelIds.png"
                raise DatasetFormatError(f"{stem.parent / (stem.name + suffix)}: missing (source={source!r})")
            jobs.append((kind, str(found[kind]), str(stem.parent / f"{stem.name}_labelTrainIds.png")))
    map_jobs(_cityscapes_job, jobs, workers)
    return len(jobs)
