"""What every public-dataset registration shares: the datasets root, file checks, the paired-folder loader,
the catalog entry that replaces Detectron2's own, and the fallback colour map."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.folder_dataset import DatasetFormatError, datasets_root, pair_by_stem

IGNORE_LABEL = 255


def label_colormap(n: int) -> list[tuple[int, int, int]]:
    """The PASCAL VOC bit-interleaving colour map: ``n`` distinct, deterministic colours.

    Used for visualisation where a dataset defines no colours of its own (ADE20K, most COCO stuff).
    """
    colors = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


def dataset_root(root: str | os.PathLike | None) -> Path:
    """``root`` if given, else ``$DETECTRON2_DATASETS`` read now (so loaders see a later change)."""
    return Path(root).expanduser() if root is not None else datasets_root()


def require_dir(folder: Path, expected: str) -> None:
    """Raise DatasetFormatError naming ``folder`` and what belongs there, if it is missing."""
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: missing folder (expected {expected})")


def read_image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise DatasetFormatError(f"{path}: unreadable image ({err})") from err


def load_paired_sem_seg(
    image_dir: str | os.PathLike,
    label_dir: str | os.PathLike,
    image_extensions: Sequence[str],
    prepare_hint: str,
) -> list[dict[str, Any]]:
    """Dataset dicts for ``image_dir/<id>.<ext>`` + ``label_dir/<id>.png``; every image needs a label.

    Unlike Detectron2's ``load_sem_seg``, an image without a label (or a label without an image) is an
    error naming the file, not a warning followed by silently training on the intersection.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    require_dir(image_dir, f"the images, *{'/'.join(image_extensions)}")
    require_dir(label_dir, f"the label PNGs ({prepare_hint})")
    pairs = pair_by_stem(image_dir, label_dir, tuple(image_extensions), "label", prepare_hint)
    dicts = []
    for image_id, image_path, label_path in pairs:
        width, height = read_image_size(image_path)
        dicts.append(
            {
                "file_name": str(image_path),
                "sem_seg_file_name": str(label_path),
                "image_id": image_id,
                "height": height,
                "width": width,
            }
        )
    return dicts


def register_dataset(name: str, loader: Callable[[], list[dict[str, Any]]], **metadata: Any) -> None:
    """Register ``name``, replacing an earlier entry (Detectron2's builtin one, or a re-registration)."""
    if name in DatasetCatalog.list():  # Detectron2's builtin entry, or an earlier registration
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # Metadata attributes cannot be overwritten, only replaced whole
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_paired_splits(
    splits: dict[str, tuple[str, str]], root: str | os.PathLike | None, prepare_hint: str, **metadata: Any
) -> list[str]:
    """Register each ``name -> (image dir, label dir)`` of ``splits`` (paths relative to the datasets
    root, ``.jpg`` images beside PNG labels, read lazily by ``load_paired_sem_seg``) with the same
    ``metadata``, as a semantic-segmentation set without anomalies; return the names."""
    for name, (image_rel, gt_rel) in splits.items():
        register_dataset(
            name,
            lambda i=image_rel, g=gt_rel: load_paired_sem_seg(
                dataset_root(root) / i, dataset_root(root) / g, (".jpg",), prepare_hint
            ),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            has_ood=False,
            **metadata,
        )
    return list(splits)
