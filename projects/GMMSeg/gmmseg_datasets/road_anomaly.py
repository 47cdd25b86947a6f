"""Road Anomaly preparation: the original release -> ``road_anomaly/{original,labels}`` (0/1 masks)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from gmmseg.data.datasets.common import dataset_root, read_image_size, require_dir
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg_datasets.label_io import read_label, unique_values, write_label


def road_anomaly_to_ood(labels_semantic: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Road Anomaly ``labels_semantic.png`` (0 background, 2 anomaly) -> 0 in-distribution / 1 anomaly.

    The release has no void class, so the result has no 255. Value 1 (road, in some tools' class lists)
    is in-distribution, as in road-anomaly-benchmark (``anomaly_gt = labels_source >= 2``).
    """
    label = np.asarray(labels_semantic)
    if label.ndim != 2:
        raise DatasetFormatError(
            f"{source}: expected a single-channel labels_semantic.png, got shape {label.shape}"
        )
    bad = label > 2
    if bad.any():
        raise DatasetFormatError(
            f"{source}: values {unique_values(label[bad])} are not Road Anomaly labels (0 background, "
            "2 anomaly)"
        )
    return (label == 2).astype(np.uint8)


def prepare_road_anomaly(
    root: str | os.PathLike | None = None, source: str | os.PathLike | None = None
) -> int:
    """Original Road Anomaly release -> ``<root>/road_anomaly/{original,labels}`` (0/1 masks, no void).

    ``source`` is the unpacked release (``frame_list.json`` and ``frames/<name>.jpg`` with
    ``frames/<name>.labels/labels_semantic.png``); by default ``<root>/RoadAnomaly_jpg`` or
    ``<root>/RoadAnomaly``, whichever exists. Images are copied unchanged.
    """
    base = dataset_root(root)
    if source is None:
        candidates = [base / "RoadAnomaly_jpg", base / "RoadAnomaly"]
        found = [c for c in candidates if (c / "frames").is_dir()]
        if not found:
            raise DatasetFormatError(
                f"{candidates[0] / 'frames'}: missing folder (expected the unpacked Road Anomaly release, "
                f"RoadAnomaly_jpg.zip, with frames/<name>.jpg; also looked in {candidates[1] / 'frames'})"
            )
        src = found[0]
    else:
        src = Path(source)
    frames_dir = src / "frames"
    require_dir(frames_dir, "frames/<name>.jpg and frames/<name>.labels/labels_semantic.png")
    list_file = src / "frame_list.json"
    if list_file.is_file():
        try:
            names = json.loads(list_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise DatasetFormatError(f"{list_file}: unreadable or not valid JSON ({err})") from err
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetFormatError(f"{list_file}: expected a JSON list of image file names")
        images = [frames_dir / n for n in names]
    else:
        images = sorted(
            p for p in frames_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")
        )
    if not images:
        raise DatasetFormatError(f"{frames_dir}: no images")
    out_images, out_labels = base / "road_anomaly" / "original", base / "road_anomaly" / "labels"
    out_images.mkdir(parents=True, exist_ok=True)
    out_labels.mkdir(parents=True, exist_ok=True)
    for image_path in images:
        if not image_path.is_file():
            raise DatasetFormatError(f"{image_path}: missing (listed in {list_file})")
        label_path = frames_dir / f"{image_path.stem}.labels" / "labels_semantic.png"
        label = read_label(label_path)
        width, height = read_image_size(image_path)
        if label.shape != (height, width):
            raise DatasetFormatError(
                f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from its image {image_path} "
                f"({width}x{height})"
            )
        write_label(road_anomaly_to_ood(label, source=str(label_path)), out_labels / f"{image_path.stem}.png")
        shutil.copyfile(image_path, out_images / image_path.name)
    return len(images)
