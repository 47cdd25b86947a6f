"""Cityscapes (fine, 19 trainId classes): its class table and ``cityscapes_fine_sem_seg_{train,val}``."""

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
from gmmseg.data.folder_dataset import DatasetFormatError

CITYSCAPES_SPLITS = {
    "cityscapes_fine_sem_seg_train": ("cityscapes/leftImg8bit/train", "cityscapes/gtFine/train"),
    "cityscapes_fine_sem_seg_val": ("cityscapes/leftImg8bit/val", "cityscapes/gtFine/val"),
}


def cityscapes_labels() -> list[Any]:
    """cityscapesscripts' label table: the official source of ids, trainIds, names and colours."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ImportError as err:  # a pinned dependency; say how to get it rather than fail obscurely
        raise ImportError(
            "Cityscapes support needs cityscapesscripts (pip install cityscapesscripts==2.3.0, see "
            "requirements/pins.txt)"
        ) from err
    return list(labels)


def cityscapes_train_classes() -> list[tuple[str, tuple[int, int, int]]]:
    """(name, colour) of the 19 evaluated Cityscapes classes, in trainId order 0..18."""
    train = sorted((lab for lab in cityscapes_labels() if 0 <= lab.trainId < 255), key=lambda x: x.trainId)
    if [lab.trainId for lab in train] != list(range(len(train))):
        raise RuntimeError(f"cityscapesscripts trainIds are not contiguous: {[x.trainId for x in train]}")
    return [(lab.name, tuple(lab.color)) for lab in train]


def load_cityscapes_semantic(image_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Dataset dicts for one Cityscapes split: every ``*_leftImg8bit.png`` needs its labelTrainIds file."""
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    require_dir(
        image_dir,
        "Cityscapes' leftImg8bit/<split>/<city>/*_leftImg8bit.png, from leftImg8bit_trainvaltest.zip",
    )
    require_dir(
        gt_dir, "Cityscapes' gtFine/<split>/<city>/*_gtFine_labelTrainIds.png, from gtFine_trainvaltest.zip"
    )
    cities = sorted(p for p in image_dir.iterdir() if p.is_dir())
    if not cities:
        raise DatasetFormatError(
            f"{image_dir}: no city folders (expected {image_dir}/<city>/*_leftImg8bit.png)"
        )
    suffix = "_leftImg8bit.png"
    dicts = []
    for city in cities:
        gt_city = gt_dir / city.name
        for image_path in sorted(city.glob(f"*{suffix}")):
            base = image_path.name[: -len(suffix)]
            label_path = gt_city / f"{base}_gtFine_labelTrainIds.png"
            if not label_path.is_file():
                raise DatasetFormatError(
                    f"{label_path}: missing label for {image_path} (make the *_gtFine_labelTrainIds.png "
                    "files with: python datasets/prepare_cityscapes.py)"
                )
            width, height = read_image_size(image_path)
            dicts.append(
                {
                    "file_name": str(image_path),
                    "sem_seg_file_name": str(label_path),
                    "image_id": base,
                    "height": height,
                    "width": width,
                }
            )
    if not dicts:
        raise DatasetFormatError(f"{image_dir}: no *{suffix} images in its city folders")
    return dicts


def register_cityscapes(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``cityscapes_fine_sem_seg_{train,val}`` (trainId labels, 19 classes)."""
    classes = cityscapes_train_classes()
    id_map = {lab.id: lab.trainId for lab in cityscapes_labels() if 0 <= lab.trainId < 255}
    for name, (image_rel, gt_rel) in CITYSCAPES_SPLITS.items():
        register_dataset(
            name,
            lambda i=image_rel, g=gt_rel: load_cityscapes_semantic(
                dataset_root(root) / i, dataset_root(root) / g
            ),
            stuff_classes=[n for n, _ in classes],
            stuff_colors=[c for _, c in classes],
            stuff_dataset_id_to_contiguous_id=dict(id_map),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            has_ood=False,
        )
    return list(CITYSCAPES_SPLITS)
