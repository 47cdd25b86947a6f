"""ADE20K SceneParsing (150 classes): its class list and ``ade20k_sem_seg_{train,val}``."""

from __future__ import annotations

import os

from gmmseg.data.datasets.common import (
    IGNORE_LABEL,
    dataset_root,
    label_colormap,
    load_paired_sem_seg,
    register_dataset,
)

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
    for name, (image_rel, gt_rel) in ADE20K_SPLITS.items():
        register_dataset(
            name,
            lambda i=image_rel, g=gt_rel: load_paired_sem_seg(
                dataset_root(root) / i,
                dataset_root(root) / g,
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
