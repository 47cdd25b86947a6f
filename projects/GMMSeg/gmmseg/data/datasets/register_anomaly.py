"""The anomaly sets (Fishyscapes Lost & Found, Fishyscapes Static, Road Anomaly): their loader and names.

No semantic labels, only ``ood_file_name`` masks (0 in-distribution, 1 anomaly, 255 void); the
``stuff_classes`` are Cityscapes' 19 because the models evaluated on them are trained on Cityscapes.
"""

from __future__ import annotations

import os
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
from gmmseg.data.folder_dataset import DatasetFormatError, pair_by_stem

ANOMALY_SPLITS = {
    "fs_lost_and_found_val": ("fs_lost_and_found/original", "fs_lost_and_found/labels"),
    "fs_static_val": ("fs_static/original", "fs_static/labels"),
    "road_anomaly": ("road_anomaly/original", "road_anomaly/labels"),
}
_ANOMALY_HINTS = {
    "fs_lost_and_found_val": "from SynBoost's preprocessed Fishyscapes release, see datasets/README.md",
    "fs_static_val": "from SynBoost's preprocessed Fishyscapes release, see datasets/README.md",
    "road_anomaly": "make them with: python datasets/prepare_road_anomaly.py",
}


def load_anomaly_folder(
    image_dir: str | os.PathLike, ood_dir: str | os.PathLike, prepare_hint: str
) -> list[dict[str, Any]]:
    """Dataset dicts for an anomaly set: ``image_dir/<id>.<ext>`` + ``ood_dir/<id>.png`` (0/1/255).

    The dicts carry ``ood_file_name`` and no ``sem_seg_file_name`` (these sets have no semantic labels).
    Mask sizes are checked against the images here (the sets are small), values by the evaluator.
    """
    image_dir, ood_dir = Path(image_dir), Path(ood_dir)
    require_dir(image_dir, "the images, *.png/*.jpg")
    require_dir(
        ood_dir, f"the anomaly masks <id>.png with 0 in-distribution, 1 anomaly, 255 void ({prepare_hint})"
    )
    pairs = pair_by_stem(image_dir, ood_dir, (".png", ".jpg", ".jpeg", ".webp"), "anomaly mask")
    dicts = []
    for image_id, image_path, mask_path in pairs:
        width, height = read_image_size(image_path)
        mask_size = read_image_size(mask_path)
        if mask_size != (width, height):
            raise DatasetFormatError(
                f"{mask_path}: size {mask_size[0]}x{mask_size[1]} differs from its image {image_path} "
                f"({width}x{height})"
            )
        dicts.append(
            {
                "file_name": str(image_path),
                "ood_file_name": str(mask_path),
                "image_id": image_id,
                "height": height,
                "width": width,
            }
        )
    return dicts


def register_anomaly_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``fs_lost_and_found_val``, ``fs_static_val`` and ``road_anomaly`` (ood masks only)."""
    classes = cityscapes_train_classes()
    for name, (image_rel, ood_rel) in ANOMALY_SPLITS.items():
        register_dataset(
            name,
            lambda i=image_rel, o=ood_rel, n=name: load_anomaly_folder(
                dataset_root(root) / i, dataset_root(root) / o, _ANOMALY_HINTS[n]
            ),
            stuff_classes=[n for n, _ in classes],
            stuff_colors=[c for _, c in classes],
            ignore_label=IGNORE_LABEL,
            evaluator_type="anomaly",
            has_ood=True,
        )
    return list(ANOMALY_SPLITS)
