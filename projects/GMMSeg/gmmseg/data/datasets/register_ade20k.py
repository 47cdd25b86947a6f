"""ADE20K SceneParsing (150 classes): its class list and ``ade20k_sem_seg_{train,val}``."""

from __future__ import annotations

import os

from gmmseg.data.datasets.common import label_colormap, register_paired_splits

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


# ADE20K SceneParsing: Detectron2's list (it matches the order of the challenge's objectInfo150).
def ade20k_classes() -> list[str]:
    """The 150 ADE20K SceneParsing class names, index = label value in annotations_detectron2/."""
    from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

    return list(ADE20K_SEM_SEG_CATEGORIES)


def register_ade20k(root: str | os.PathLike | None = None) -> list[str]:
    """Register ``ade20k_sem_seg_{train,val}`` (150 classes, labels 0..149, 255 ignore)."""
    classes = ade20k_classes()
    colors = label_colormap(len(classes) + 1)[1:]  # skip black
    return register_paired_splits(
        ADE20K_SPLITS,
        root,
        "make annotations_detectron2/ with: python datasets/prepare_ade20k_sem_seg.py",
        stuff_classes=list(classes),
        stuff_colors=list(colors),
    )
