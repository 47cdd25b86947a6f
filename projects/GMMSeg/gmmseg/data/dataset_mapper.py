"""Semantic-segmentation data mapper: reads an image and its label map, checks them, augments them.

Detectron2's generic ``DatasetMapper`` would read these files too, but it neither checks that the label
fits the image nor that its values are classes, and a wrong label file then surfaces as a CUDA assert or a
silently wrong loss far from its cause. Here every such problem is an error naming the file.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.projects.point_rend import ColorAugSSDTransform

__all__ = ["SemanticDatasetMapper", "TrainLabelsMapper", "check_label_values"]


def check_label_values(label: np.ndarray, num_classes: int, ignore_label: int, file_name: str) -> None:
    """Raise ValueError naming ``file_name`` if ``label`` holds a value that is neither a class nor ignore."""
    values = np.unique(label)
    bad = values[(values >= num_classes) & (values != ignore_label)]
    if bad.size:
        raise ValueError(
            f"{file_name}: label values {bad.tolist()[:10]} are outside the {num_classes} classes "
            f"(0..{num_classes - 1}) and are not the ignore label {ignore_label}"
        )


class SemanticDatasetMapper:
    """Map a dataset dict to ``{"image", "sem_seg", "height", "width", ...}`` for Detectron2 models.

    In training it applies the augmentations (resize, category-area-constrained crop, flip) to the image
    and the label together; in testing only the resize, and the label is left for the evaluator to read.
    """

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: list[T.Augmentation],
        image_format: str,
        num_classes: int,
        ignore_label: int,
    ) -> None:
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.num_classes = num_classes
        self.ignore_label = ignore_label
        mode = "training" if is_train else "inference"
        logging.getLogger(__name__).info(f"[SemanticDatasetMapper] augmentations for {mode}: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        if is_train:
            augs: list[T.Augmentation] = [
                T.ResizeShortestEdge(
                    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING
                )
            ]
            if cfg.INPUT.CROP.ENABLED:
                augs.append(
                    T.RandomCrop_CategoryAreaConstraint(
                        cfg.INPUT.CROP.TYPE,
                        cfg.INPUT.CROP.SIZE,
                        cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                    )
                )
            if cfg.INPUT.COLOR_AUG_SSD:  # Mask2Former's photometric augmentation
                augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
            if cfg.INPUT.RANDOM_FLIP != "none":
                augs.append(
                    T.RandomFlip(
                        horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                        vertical=cfg.INPUT.RANDOM_FLIP == "vertical",
                    )
                )
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]
        dataset_names = cfg.DATASETS.TRAIN if is_train else cfg.DATASETS.TEST
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if dataset_names:
            ignore_label = MetadataCatalog.get(dataset_names[0]).get("ignore_label", ignore_label)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "ignore_label": ignore_label,
        }

    def _read_label(self, file_name: str, image_shape: tuple[int, int]) -> np.ndarray:
        try:
            label = utils.read_image(file_name)
        except OSError as err:
            raise ValueError(f"{file_name}: unreadable label file ({err})") from err
        if label.ndim == 3:
            raise ValueError(
                f"{file_name}: label must be a single-channel PNG of class indices (got {label.shape})"
            )
        if label.shape != image_shape:
            raise ValueError(
                f"{file_name}: label size {label.shape[1]}x{label.shape[0]} differs from its image "
                f"({image_shape[1]}x{image_shape[0]})"
            )
        check_label_values(label, self.num_classes, self.ignore_label, file_name)
        return label  # uint8 through the augmentations (their resize needs it), int64 afterwards

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        dataset_dict = copy.deepcopy(dataset_dict)
        file_name = dataset_dict["file_name"]
        try:
            image = utils.read_image(file_name, format=self.image_format)
        except OSError as err:
            raise ValueError(f"{file_name}: unreadable image ({err})") from err
        utils.check_image_size(dataset_dict, image)

        label = None
        if self.is_train:
            if "sem_seg_file_name" not in dataset_dict:
                raise ValueError(f"{file_name}: training needs a label ('sem_seg_file_name' missing)")
            label = self._read_label(dataset_dict.pop("sem_seg_file_name"), image.shape[:2])

        aug_input = T.AugInput(image, sem_seg=label)
        self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if label is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        return dataset_dict


class TrainLabelsMapper(SemanticDatasetMapper):
    """Test-time preprocessing (no augmentation) that still reads, checks and resizes the label with the
    image: for statistics of a trained model over its training set (``tools/fit_*.py``), and for models
    that use the labels at evaluation (Mask2Former's query matching). It keeps ``sem_seg_file_name``, from
    which the evaluator reads the ground truth at the original size."""

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        self.is_train = True  # read and check the label ...
        try:
            mapped = super().__call__(dataset_dict)
        finally:
            self.is_train = False
        if "sem_seg_file_name" in dataset_dict:
            mapped["sem_seg_file_name"] = dataset_dict["sem_seg_file_name"]
        return mapped
