"""The generic on-disk format for semantic segmentation, and its automatic registration.

Every folder ``$DETECTRON2_DATASETS/<name>/`` (default ``./datasets``) that holds a ``meta.json`` becomes
one Detectron2 dataset ``<name>_<split>`` per split folder inside it::

    <name>/meta.json                 {"classes": [...], "colors": [[r, g, b], ...], "ignore_label": 255}
    <name>/<split>/images/<id>.png   (or .jpg) the image
    <name>/<split>/labels/<id>.png   class index per pixel, ignore_label where unlabelled
    <name>/<split>/ood/<id>.png      optional: 0 in-distribution, 1 anomaly, 255 void (Fishyscapes)
    <name>/<split>/ood_family/<id>.png  optional: which anomaly family a pixel belongs to (0 none)

Metadata (``stuff_classes``, ``stuff_colors``, ``ignore_label``, ``evaluator_type="sem_seg"``) is set in
``MetadataCatalog`` at registration. The file listing is read lazily, when the dataset is first used, and
every missing or inconsistent file is an error that names it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from detectron2.data import DatasetCatalog, MetadataCatalog

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
OPTIONAL_MAPS = ("ood", "ood_family")


class DatasetFormatError(ValueError):
    """A dataset folder does not follow the expected format; the message names the file."""


def datasets_root() -> Path:
    """Detectron2's convention: ``$DETECTRON2_DATASETS``, default ``./datasets``."""
    return Path(os.environ.get("DETECTRON2_DATASETS", "datasets")).expanduser()


def read_meta(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``meta.json``; raise DatasetFormatError naming the file on any problem."""
    path = Path(dataset_dir) / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise DatasetFormatError(f"{path}: missing (every dataset folder needs a meta.json)") from err
    except (OSError, json.JSONDecodeError) as err:
        raise DatasetFormatError(f"{path}: unreadable or not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DatasetFormatError(f"{path}: expected a JSON object with 'classes', 'colors', 'ignore_label'")
    classes = meta.get("classes")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise DatasetFormatError(f"{path}: 'classes' must be a non-empty list of strings")
    if len(set(classes)) != len(classes):
        raise DatasetFormatError(f"{path}: 'classes' has duplicate names")
    colors = meta.get("colors")
    if (
        not isinstance(colors, list)
        or len(colors) != len(classes)
        or not all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in colors
        )
    ):
        raise DatasetFormatError(
            f"{path}: 'colors' must hold one [r, g, b] (integers 0-255) per class ({len(classes)} classes)"
        )
    ignore = meta.get("ignore_label", 255)
    if not isinstance(ignore, int) or not 0 <= ignore <= 255 or ignore < len(classes):
        raise DatasetFormatError(
            f"{path}: 'ignore_label' must be an integer in [{len(classes)}, 255] (got {ignore!r})"
        )
    if len(classes) > 255:
        raise DatasetFormatError(f"{path}: at most 255 classes fit in 8-bit label PNGs")
    meta["ignore_label"] = ignore
    return meta


def index_by_stem(folder: str | os.PathLike, extensions: tuple[str, ...]) -> dict[str, Path]:
    """``{id: path}`` of the files in ``folder`` with one of ``extensions``; two files for one id is an
    error naming both."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix.lower() in extensions:
            if path.stem in found:
                raise DatasetFormatError(f"{path}: two files for image id '{path.stem}' ({found[path.stem]})")
            found[path.stem] = path
    return found


def pair_by_stem(
    images_dir: str | os.PathLike,
    other_dir: str | os.PathLike,
    image_extensions: tuple[str, ...],
    kind: str = "label",
    hint: str = "",
) -> list[tuple[str, Path, Path]]:
    """``[(id, image, other)]`` for ``images_dir/<id>.<ext>`` and ``other_dir/<id>.png``, sorted by id.

    Every image needs its ``kind`` file and vice versa: unlike Detectron2's ``load_sem_seg``, which warns
    and silently uses the intersection, a missing file is an error that names it (with ``hint`` on what
    to run to create it).
    """
    images_dir, other_dir = Path(images_dir), Path(other_dir)
    images = index_by_stem(images_dir, image_extensions)
    others = index_by_stem(other_dir, (".png",))
    if not images:
        raise DatasetFormatError(f"{images_dir}: no {'/'.join(image_extensions)} images")
    missing = sorted(set(images) - set(others))
    if missing:
        detail = f" ({len(missing)} of {len(images)} images have none; {hint})" if hint else ""
        raise DatasetFormatError(
            f"{other_dir / (missing[0] + '.png')}: missing {kind} for image {images[missing[0]]}{detail}"
        )
    extra = sorted(set(others) - set(images))
    if extra:
        raise DatasetFormatError(f"{others[extra[0]]}: {kind} without an image in {images_dir}")
    return [(image_id, images[image_id], others[image_id]) for image_id in sorted(images)]


def load_folder_split(split_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Return Detectron2 dataset dicts for one split folder.

    Each dict has ``file_name``, ``sem_seg_file_name``, ``image_id``, ``height``, ``width`` and, where the
    split has them, ``ood_file_name`` / ``ood_family_file_name``. Image and label sizes are read from the
    file headers (cheap) and must agree.
    """
    from PIL import Image

    split_dir = Path(split_dir)
    images_dir, labels_dir = split_dir / "images", split_dir / "labels"
    for folder in (images_dir, labels_dir):
        if not folder.is_dir():
            raise DatasetFormatError(
                f"{folder}: missing folder (expected images/ and labels/ in {split_dir})"
            )
    pairs = pair_by_stem(images_dir, labels_dir, IMAGE_EXTENSIONS)
    images = {image_id: image for image_id, image, _ in pairs}
    labels = {image_id: label for image_id, _, label in pairs}
    optional = {
        name: index_by_stem(split_dir / name, (".png",))
        for name in OPTIONAL_MAPS
        if (split_dir / name).is_dir()
    }
    for name, files in optional.items():
        absent = sorted(set(images) - set(files))
        if absent:
            raise DatasetFormatError(
                f"{split_dir / name / (absent[0] + '.png')}: missing ({name}/ is incomplete)"
            )

    dicts = []
    for image_id, image_path in images.items():
        try:
            with Image.open(image_path) as img:
                width, height = img.size
        except OSError as err:
            raise DatasetFormatError(f"{image_path}: unreadable image ({err})") from err
        record = {
            "file_name": str(image_path),
            "sem_seg_file_name": str(labels[image_id]),
            "image_id": image_id,
            "height": height,
            "width": width,
        }
        for name, files in optional.items():
            record[f"{name}_file_name"] = str(files[image_id])
        for key in ("sem_seg_file_name", *(f"{n}_file_name" for n in optional)):
            try:
                with Image.open(record[key]) as img:
                    size = img.size
            except OSError as err:
                raise DatasetFormatError(f"{record[key]}: unreadable ({err})") from err
            if size != (width, height):
                raise DatasetFormatError(
                    f"{record[key]}: size {size[0]}x{size[1]} differs from its image {image_path} "
                    f"({width}x{height})"
                )
        dicts.append(record)
    return dicts


def register_folder_dataset(dataset_dir: str | os.PathLike, name: str | None = None) -> list[str]:
    """Register every split folder of one dataset folder; return the registered dataset names.

    Re-registering the same name (e.g. after regenerating the data) replaces the old entry.
    """
    dataset_dir = Path(dataset_dir)
    meta = read_meta(dataset_dir)
    name = name or dataset_dir.name
    registered = []
    for split_dir in sorted(p for p in dataset_dir.iterdir() if p.is_dir() and (p / "images").is_dir()):
        dataset_name = f"{name}_{split_dir.name}"
        if dataset_name in DatasetCatalog.list():
            DatasetCatalog.remove(dataset_name)
            MetadataCatalog.remove(dataset_name)
        DatasetCatalog.register(dataset_name, lambda d=split_dir: load_folder_split(d))
        MetadataCatalog.get(dataset_name).set(
            stuff_classes=list(meta["classes"]),
            stuff_colors=[tuple(c) for c in meta["colors"]],
            ignore_label=meta["ignore_label"],
            evaluator_type="sem_seg",
            has_ood=(split_dir / "ood").is_dir(),
        )
        registered.append(dataset_name)
    return registered


def register_all_folder_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register every ``<root>/<name>/`` with a ``meta.json``. A broken folder is logged, not fatal here:

    the error is raised again, naming the file, when that dataset is actually requested.
    """
    root = Path(root) if root is not None else datasets_root()
    if not root.is_dir():
        return []
    names = []
    for dataset_dir in sorted(p for p in root.iterdir() if (p / "meta.json").is_file()):
        try:
            names += register_folder_dataset(dataset_dir)
        except DatasetFormatError as err:
            logger.warning("not registering %s: %s", dataset_dir, err)
    return names


def ensure_registered(dataset_name: str, root: str | os.PathLike | None = None) -> None:
    """Make sure ``dataset_name`` is registered, or raise an error that says which path was expected.

    Used at start-up for every dataset a config names, so that a missing or malformed folder fails
    immediately with the path, instead of Detectron2's bare "not registered" later on.
    """
    if dataset_name in DatasetCatalog.list():
        return
    root = Path(root) if root is not None else datasets_root()
    parts = dataset_name.split("_")
    for cut in range(len(parts) - 1, 0, -1):
        folder, split = root / "_".join(parts[:cut]), "_".join(parts[cut:])
        if (folder / "meta.json").is_file() or folder.is_dir():
            register_folder_dataset(folder)  # raises, naming the file, if the folder is malformed
            if dataset_name not in DatasetCatalog.list():
                raise DatasetFormatError(
                    f"{folder / split}: no such split (expected {folder / split / 'images'} and "
                    f"{folder / split / 'labels'})"
                )
            return
    raise DatasetFormatError(
        f"dataset '{dataset_name}' is not registered and no folder for it exists under {root.resolve()} "
        f"(expected {root / '<name>'}/meta.json with a '<split>' folder; set DETECTRON2_DATASETS to the "
        "datasets root, or generate DigitScapes with datasets/prepare_digitscapes.py)"
    )
