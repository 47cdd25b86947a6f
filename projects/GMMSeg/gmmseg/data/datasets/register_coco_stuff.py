"""COCO-Stuff-164k (80 things + 91 stuff): its class list and ``coco_2017_{train,val}_stuff_sem_seg``."""

from __future__ import annotations

import os
from typing import Any

from gmmseg.data.datasets.common import label_colormap, register_paired_splits

COCO_STUFF_SPLITS = {
    "coco_2017_train_stuff_sem_seg": ("coco/train2017", "coco/stuffthingmaps_detectron2/train2017"),
    "coco_2017_val_stuff_sem_seg": ("coco/val2017", "coco/stuffthingmaps_detectron2/val2017"),
}

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


def register_coco_stuff(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``coco_2017_{train,val}_stuff_sem_seg`` (COCO-Stuff-164k, 171 classes)."""
    categories = coco_stuff_categories()
    return register_paired_splits(
        COCO_STUFF_SPLITS,
        root,
        "make stuffthingmaps_detectron2/ with: python datasets/prepare_coco_stuff_164k_sem_seg.py",
        stuff_classes=[c["name"] for c in categories],
        stuff_colors=[tuple(c["color"]) for c in categories],
        stuff_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )
