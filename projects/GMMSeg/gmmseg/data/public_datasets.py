"""The GMMSeg paper's public datasets: on-disk layouts, label conversions and Detectron2 registration.

Closed-set semantic segmentation (``evaluator_type="sem_seg"``, ``ignore_label=255``)::

    cityscapes_fine_sem_seg_{train,val}   cityscapes/leftImg8bit/<split>/<city>/*_leftImg8bit.png
                                          cityscapes/gtFine/<split>/<city>/*_gtFine_labelTrainIds.png
    ade20k_sem_seg_{train,val}            ADEChallengeData2016/images/{training,validation}/*.jpg
                                          ADEChallengeData2016/annotations_detectron2/{training,validation}/*.png
    coco_2017_{train,val}_stuff_sem_seg   coco/{train2017,val2017}/*.jpg
                                          coco/stuffthingmaps_detectron2/{train2017,val2017}/*.png

Anomaly segmentation (``evaluator_type="anomaly"``; no semantic labels, only ``ood_file_name`` masks with
0 in-distribution, 1 anomaly, 255 void; ``stuff_classes`` are Cityscapes' 19 because the models evaluated
on them are trained on Cityscapes)::

    fs_lost_and_found_val   fs_lost_and_found/{original,labels}/<id>.png
    fs_static_val           fs_static/{original,labels}/<id>.png
    road_anomaly            road_anomaly/{original,labels}/<id>.{jpg,png}   (labels: 0/1, no void)

This is the layout of SynBoost's preprocessed release of the three sets (``data_processed.tar``;
giandbt/synboost reads ``<dataroot>/{original,labels}`` with dataroot ``fs_lost_and_found``, ``fs_static``
or ``road_anomaly``), so its folders can be moved under the datasets root as they are. PEBAL
(tianyu0207/PEBAL, ``code/dataset/data_loader.py``) and RPL (yyliu01/RPL,
``rpl.code/dataset/validation/{fishyscapes,road_anomaly}.py``) read the same ``original/`` + ``labels/``
folders and values (0 in-distribution, 1 anomaly, 255 void). ``prepare_road_anomaly`` writes this layout
from the original Road Anomaly release.

Paths are relative to ``$DETECTRON2_DATASETS`` (default ``./datasets``), read when a dataset is loaded,
not when it is registered. Registration is cheap and happens at import of ``gmmseg.d2``; the file listing
happens on ``DatasetCatalog.get``, and a missing folder or file raises ``DatasetFormatError`` naming the
path and what was expected there. Detectron2 v0.6 registers Cityscapes and ADE20K itself, but its loaders
fail with bare ``assert`` messages (or silently use the intersection of images and labels) and its
metadata lack ``stuff_colors`` (ADE20K) or use the Cityscapes-specific evaluator; the names are therefore
re-registered here.

The conversion functions (``prepare_*``) hold the logic of the thin ``datasets/prepare_*.py`` scripts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.folder_dataset import DatasetFormatError, datasets_root, pair_by_stem

logger = logging.getLogger(__name__)

IGNORE_LABEL = 255
OOD_IN, OOD_ANOMALY, OOD_VOID = 0, 1, 255

# ---------------------------------------------------------------------------------------------------------
# Class definitions
# ---------------------------------------------------------------------------------------------------------


def _cityscapes_labels() -> list[Any]:
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
    train = sorted((lab for lab in _cityscapes_labels() if 0 <= lab.trainId < 255), key=lambda x: x.trainId)
    if [lab.trainId for lab in train] != list(range(len(train))):
        raise RuntimeError(f"cityscapesscripts trainIds are not contiguous: {[x.trainId for x in train]}")
    return [(lab.name, tuple(lab.color)) for lab in train]


@cache
def cityscapes_label_id_lut() -> np.ndarray:
    """A 256-entry table labelId -> trainId (255 ignore); ids absent from cityscapesscripts map to -1.

    Every trainId that cityscapesscripts marks as ignored (255, or -1 for 'license plate') becomes 255.
    """
    lut = np.full(256, -1, dtype=np.int16)
    for lab in _cityscapes_labels():
        if 0 <= lab.id < 256:
            lut[lab.id] = lab.trainId if 0 <= lab.trainId < 255 else IGNORE_LABEL
    lut.flags.writeable = False  # cached and shared by every conversion
    return lut


# ADE20K SceneParsing: Detectron2's list (it matches the order of the challenge's objectInfo150).
def ade20k_classes() -> list[str]:
    """The 150 ADE20K SceneParsing class names, index = label value in annotations_detectron2/."""
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    return list(ADE20K_SEM_SEG_CATEGORIES)


# COCO-Stuff stuff classes, COCO-Stuff ids 92..182 in order: the official list
# (github.com/nightrome/cocostuff, labels.md / labels.txt), the same 91 entries that MaskFormer and
# Mask2Former use (mask2former/data/datasets/register_coco_stuff_10k.py, COCO_CATEGORIES[80:]).
# Detectron2's builtin COCO_CATEGORIES has all 80 thing classes but only the 53 merged *panoptic* stuff
# classes, so the stuff names are listed here; the 80 thing classes are taken from Detectron2.
COCO_STUFF_STUFF_NAMES: tuple[str, ...] = (
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage", "cardboard",
    "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard",
    "curtain", "desk-stuff", "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone",
    "floor-tile", "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass",
    "gravel", "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable", "wall-brick",
    "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile", "wall-wood", "water-other",
    "waterdrops", "window-blind", "window-other", "wood",
)  # fmt: skip
COCO_STUFF_FIRST_STUFF_ID = 92


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


def coco_stuff_categories() -> list[dict[str, Any]]:
    """The 171 COCO-Stuff-164k classes (80 things, 91 stuff) in contiguous-id order.

    Each entry has the COCO-Stuff ``id`` (1..182 with the 11 unused thing ids missing), ``name``,
    ``isthing`` and a ``color``: Detectron2's colour where Detectron2 knows that id under the same name
    (all things, 36 stuff classes), otherwise one from :func:`label_colormap`.
    """
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    d2_by_id = {c["id"]: c for c in COCO_CATEGORIES}
    things = [dict(c) for c in COCO_CATEGORIES if c["isthing"] == 1]
    cmap = label_colormap(256)
    stuff = []
    for offset, name in enumerate(COCO_STUFF_STUFF_NAMES):
        cid = COCO_STUFF_FIRST_STUFF_ID + offset
        d2 = d2_by_id.get(cid)
        color = d2["color"] if d2 is not None and d2["name"] == name else cmap[cid]
        stuff.append({"id": cid, "name": name, "isthing": 0, "color": list(color)})
    categories = things + stuff
    if len(things) != 80 or len(categories) != 171:
        raise RuntimeError(f"expected 80 + 91 COCO-Stuff classes, got {len(things)} + {len(stuff)}")
    return categories


# ---------------------------------------------------------------------------------------------------------
# Label conversions (pure functions on arrays; the prepare_* functions apply them to files)
# ---------------------------------------------------------------------------------------------------------


def _unique_values(array: np.ndarray, limit: int = 10) -> str:
    values = np.unique(array)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


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
            f"{source}: values {_unique_values(ids[bad])} are not Cityscapes labelIds "
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


def ade20k_to_detectron2(label: np.ndarray, source: str = "<array>") -> np.ndarray:
    """ADE20K SceneParsing labels (0 other/ignore, 1..150 classes) -> 0..149 with 255 ignore.

    The same ``label - 1`` in uint8 as Detectron2's and Mask2Former's ``prepare_ade20k_sem_seg.py``.
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise DatasetFormatError(f"{source}: expected a single-channel label image, got shape {label.shape}")
    if label.size and int(label.max()) > 150:
        raise DatasetFormatError(
            f"{source}: values {_unique_values(label[label > 150])} exceed 150 (ADE20K SceneParsing "
            "labels are 0 = other, 1..150 = classes)"
        )
    return (label.astype(np.int16) - 1).astype(np.uint8)  # 0 -> -1 -> 255


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
            f"{source}: values {_unique_values(label[out < 0])} are no COCO-Stuff ids "
            "(stuffthingmaps hold 0..181 = COCO-Stuff id - 1, and 255 unlabelled)"
        )
    return out.astype(np.uint8)


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
            f"{source}: values {_unique_values(label[bad])} are not Road Anomaly labels (0 background, "
            "2 anomaly)"
        )
    return (label == 2).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------------------


def _root(root: str | os.PathLike | None) -> Path:
    return Path(root).expanduser() if root is not None else datasets_root()


def _require_dir(folder: Path, expected: str) -> None:
    if not folder.is_dir():
        raise DatasetFormatError(f"{folder}: missing folder (expected {expected})")


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file header, without decoding the pixels."""
    try:
        with Image.open(path) as img:
            return img.size
    except OSError as err:
        raise DatasetFormatError(f"{path}: unreadable image ({err})") from err


def _read_label(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetFormatError(f"{path}: expected a single-channel label PNG, got mode {img.mode}")
            return np.array(img)
    except FileNotFoundError as err:
        raise DatasetFormatError(f"{path}: missing") from err
    except OSError as err:
        raise DatasetFormatError(f"{path}: unreadable ({err})") from err


def _write_label(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")  # 2-D uint8: mode L
    os.replace(tmp, path)  # never leave a half-written label where a loader would take it


def _map_jobs(func: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    if workers <= 1 or len(jobs) < 2:
        return [func(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


# ---------------------------------------------------------------------------------------------------------
# Loaders (called by DatasetCatalog.get)
# ---------------------------------------------------------------------------------------------------------


def load_cityscapes_semantic(image_dir: str | os.PathLike, gt_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Dataset dicts for one Cityscapes split: every ``*_leftImg8bit.png`` needs its labelTrainIds file."""
    image_dir, gt_dir = Path(image_dir), Path(gt_dir)
    _require_dir(
        image_dir,
        "Cityscapes' leftImg8bit/<split>/<city>/*_leftImg8bit.png, from leftImg8bit_trainvaltest.zip",
    )
    _require_dir(
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
            width, height = _image_size(image_path)
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
    _require_dir(image_dir, f"the images, *{'/'.join(image_extensions)}")
    _require_dir(label_dir, f"the label PNGs ({prepare_hint})")
    pairs = pair_by_stem(image_dir, label_dir, tuple(image_extensions), "label", prepare_hint)
    dicts = []
    for image_id, image_path, label_path in pairs:
        width, height = _image_size(image_path)
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


def load_anomaly_folder(
    image_dir: str | os.PathLike, ood_dir: str | os.PathLike, prepare_hint: str
) -> list[dict[str, Any]]:
    """Dataset dicts for an anomaly set: ``image_dir/<id>.<ext>`` + ``ood_dir/<id>.png`` (0/1/255).

    The dicts carry ``ood_file_name`` and no ``sem_seg_file_name`` (these sets have no semantic labels).
    Mask sizes are checked against the images here (the sets are small), values by the evaluator.
    """
    image_dir, ood_dir = Path(image_dir), Path(ood_dir)
    _require_dir(image_dir, "the images, *.png/*.jpg")
    _require_dir(
        ood_dir, f"the anomaly masks <id>.png with 0 in-distribution, 1 anomaly, 255 void ({prepare_hint})"
    )
    pairs = pair_by_stem(image_dir, ood_dir, (".png", ".jpg", ".jpeg", ".webp"), "anomaly mask")
    dicts = []
    for image_id, image_path, mask_path in pairs:
        width, height = _image_size(image_path)
        mask_size = _image_size(mask_path)
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


# ---------------------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------------------

CITYSCAPES_SPLITS = {
    "cityscapes_fine_sem_seg_train": ("cityscapes/leftImg8bit/train", "cityscapes/gtFine/train"),
    "cityscapes_fine_sem_seg_val": ("cityscapes/leftImg8bit/val", "cityscapes/gtFine/val"),
}
ADE20K_SPLITS = {
    "ade20k_sem_seg_train": (
        "ADEChallengeData2016/images/training",
        "ADEChallengeData2016/annotations_detectron2/training",
    ),
    "ade20k_sem_seg_val": (
        "ADEChallengeData2016/images/validation",
        "ADEChallengeData2016/annotations_detectron2/validation",
    ),
}
COCO_STUFF_SPLITS = {
    "coco_2017_train_stuff_sem_seg": ("coco/train2017", "coco/stuffthingmaps_detectron2/train2017"),
    "coco_2017_val_stuff_sem_seg": ("coco/val2017", "coco/stuffthingmaps_detectron2/val2017"),
}
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
PUBLIC_DATASET_NAMES: tuple[str, ...] = (
    *CITYSCAPES_SPLITS,
    *ADE20K_SPLITS,
    *COCO_STUFF_SPLITS,
    *ANOMALY_SPLITS,
)


def _register(name: str, loader: Callable[[], list[dict[str, Any]]], **metadata: Any) -> None:
    if name in DatasetCatalog.list():  # Detectron2's builtin entry, or an earlier registration
        DatasetCatalog.remove(name)
    if name in MetadataCatalog.list():
        MetadataCatalog.remove(name)  # Metadata attributes cannot be overwritten, only replaced whole
    DatasetCatalog.register(name, loader)
    MetadataCatalog.get(name).set(**metadata)


def register_cityscapes(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``cityscapes_fine_sem_seg_{train,val}`` (trainId labels, 19 classes)."""
    classes = cityscapes_train_classes()
    id_map = {lab.id: lab.trainId for lab in _cityscapes_labels() if 0 <= lab.trainId < 255}
    for name, (image_rel, gt_rel) in CITYSCAPES_SPLITS.items():
        _register(
            name,
            lambda i=image_rel, g=gt_rel: load_cityscapes_semantic(_root(root) / i, _root(root) / g),
            stuff_classes=[n for n, _ in classes],
            stuff_colors=[c for _, c in classes],
            stuff_dataset_id_to_contiguous_id=dict(id_map),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            has_ood=False,
        )
    return list(CITYSCAPES_SPLITS)


def register_ade20k(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``ade20k_sem_seg_{train,val}`` (150 classes, labels 0..149, 255 ignore)."""
    classes = ade20k_classes()
    colors = label_colormap(len(classes) + 1)[1:]  # skip black
    for name, (image_rel, gt_rel) in ADE20K_SPLITS.items():
        _register(
            name,
            lambda i=image_rel, g=gt_rel: load_paired_sem_seg(
                _root(root) / i,
                _root(root) / g,
                (".jpg",),
                "make annotations_detectron2/ with: python datasets/prepare_ade20k_sem_seg.py",
            ),
            stuff_classes=list(classes),
            stuff_colors=list(colors),
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            has_ood=False,
        )
    return list(ADE20K_SPLITS)


def register_coco_stuff(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``coco_2017_{train,val}_stuff_sem_seg`` (COCO-Stuff-164k, 171 classes)."""
    categories = coco_stuff_categories()
    for name, (image_rel, gt_rel) in COCO_STUFF_SPLITS.items():
        _register(
            name,
            lambda i=image_rel, g=gt_rel: load_paired_sem_seg(
                _root(root) / i,
                _root(root) / g,
                (".jpg",),
                "make stuffthingmaps_detectron2/ with: python datasets/prepare_coco_stuff_164k_sem_seg.py",
            ),
            stuff_classes=[c["name"] for c in categories],
            stuff_colors=[tuple(c["color"]) for c in categories],
            stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
            ignore_label=IGNORE_LABEL,
            evaluator_type="sem_seg",
            has_ood=False,
        )
    return list(COCO_STUFF_SPLITS)


def register_anomaly_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``fs_lost_and_found_val``, ``fs_static_val`` and ``road_anomaly`` (ood masks only)."""
    classes = cityscapes_train_classes()
    for name, (image_rel, ood_rel) in ANOMALY_SPLITS.items():
        _register(
            name,
            lambda i=image_rel, o=ood_rel, n=name: load_anomaly_folder(
                _root(root) / i, _root(root) / o, _ANOMALY_HINTS[n]
            ),
            stuff_classes=[n for n, _ in classes],
            stuff_colors=[c for _, c in classes],
            ignore_label=IGNORE_LABEL,
            evaluator_type="anomaly",
            has_ood=True,
            ood_values={"in_distribution": OOD_IN, "anomaly": OOD_ANOMALY, "void": OOD_VOID},
        )
    return list(ANOMALY_SPLITS)


def register_all_public_datasets(root: str | os.PathLike | None = None) -> list[str]:
    """Register every public dataset of the paper; return the names.

    With ``root=None`` each loader reads ``$DETECTRON2_DATASETS`` when it runs, so the variable can be set
    after import. Nothing touches the disk here.
    """
    return [
        *register_cityscapes(root),
        *register_ade20k(root),
        *register_coco_stuff(root),
        *register_anomaly_datasets(root),
    ]


# ---------------------------------------------------------------------------------------------------------
# Preparation (the datasets/prepare_*.py scripts)
# ---------------------------------------------------------------------------------------------------------


def _cityscapes_job(job: tuple[str, str, str]) -> str:
    kind, src, dst = job
    if kind == "json":
        train_ids = cityscapes_polygons_to_train_ids(src)
    else:
        train_ids = cityscapes_ids_to_train_ids(_read_label(Path(src)), source=src)
    _write_label(train_ids, Path(dst))
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
    gt_root = _root(root) / "cityscapes" / "gtFine"
    jobs: list[tuple[str, str, str]] = []
    for split in splits:
        split_dir = gt_root / split
        _require_dir(split_dir, f"gtFine/{split}/<city>/ from Cityscapes' gtFine_trainvaltest.zip")
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
    _map_jobs(_cityscapes_job, jobs, workers)
    return len(jobs)


def _convert_job(job: tuple[str, str, str]) -> str:
    kind, src, dst = job
    convert = {"ade20k": ade20k_to_detectron2, "coco_stuff": coco_stuff_to_detectron2}[kind]
    _write_label(convert(_read_label(Path(src)), source=src), Path(dst))
    return dst


def _convert_folders(kind: str, pairs: Sequence[tuple[Path, Path]], expected: str, workers: int) -> int:
    jobs = []
    for src_dir, dst_dir in pairs:
        _require_dir(src_dir, expected)
        files = sorted(src_dir.glob("*.png"))
        if not files:
            raise DatasetFormatError(f"{src_dir}: no .png label files (expected {expected})")
        jobs += [(kind, str(f), str(dst_dir / f.name)) for f in files]
    _map_jobs(_convert_job, jobs, workers)
    return len(jobs)


def prepare_ade20k(root: str | os.PathLike | None = None, workers: int = 1) -> int:
    """``ADEChallengeData2016/annotations/`` -> ``annotations_detectron2/`` (label - 1, 0 -> 255)."""
    ade = _root(root) / "ADEChallengeData2016"
    pairs = [
        (ade / "annotations" / s, ade / "annotations_detectron2" / s) for s in ("training", "validation")
    ]
    return _convert_folders(
        "ade20k",
        pairs,
        "ADEChallengeData2016/annotations/<split>/*.png from ADEChallengeData2016.zip",
        workers,
    )


def prepare_coco_stuff_164k(
    root: str | os.PathLike | None = None,
    input_dir: str | os.PathLike | None = None,
    workers: int = 1,
) -> int:
    """``coco/stuffthingmaps/{train2017,val2017}`` -> ``coco/stuffthingmaps_detectron2/`` (0..170, 255).

    ``input_dir`` defaults to ``<root>/coco/stuffthingmaps`` (where ``stuffthingmaps_trainval2017.zip`` is
    unpacked). Every map is written, including all-unlabelled ones, so every image keeps its label file.
    """
    coco = _root(root) / "coco"
    src = Path(input_dir) if input_dir is not None else coco / "stuffthingmaps"
    pairs = [(src / s, coco / "stuffthingmaps_detectron2" / s) for s in ("train2017", "val2017")]
    return _convert_folders(
        "coco_stuff",
        pairs,
        "the PNGs of stuffthingmaps_trainval2017.zip ({train2017,val2017}/*.png)",
        workers,
    )


def prepare_road_anomaly(
    root: str | os.PathLike | None = None, source: str | os.PathLike | None = None
) -> int:
    """Original Road Anomaly release -> ``<root>/road_anomaly/{original,labels}`` (0/1 masks, no void).

    ``source`` is the unpacked release (``frame_list.json`` and ``frames/<name>.jpg`` with
    ``frames/<name>.labels/labels_semantic.png``); by default ``<root>/RoadAnomaly_jpg`` or
    ``<root>/RoadAnomaly``, whichever exists. Images are copied unchanged.
    """
    base = _root(root)
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
    _require_dir(frames_dir, "frames/<name>.jpg and frames/<name>.labels/labels_semantic.png")
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
        label = _read_label(label_path)
        width, height = _image_size(image_path)
        if label.shape != (height, width):
            raise DatasetFormatError(
                f"{label_path}: size {label.shape[1]}x{label.shape[0]} differs from its image {image_path} "
                f"({width}x{height})"
            )
        _write_label(
            road_anomaly_to_ood(label, source=str(label_path)), out_labels / f"{image_path.stem}.png"
        )
        shutil.copyfile(image_path, out_images / image_path.name)
    return len(images)
