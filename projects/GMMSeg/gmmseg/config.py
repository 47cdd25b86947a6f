"""GMMSeg-D2's config keys, and the validation that makes a bad value fail at start with the key named."""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_gmmseg_config", "validate_gmmseg_config", "ConfigValueError"]


class ConfigValueError(ValueError):
    """An invalid config value; the message starts with the full key."""

    def __init__(self, key: str, value, expected: str) -> None:
        super().__init__(f"{key} = {value!r} is invalid: expected {expected}")
        self.key = key


def add_gmmseg_config(cfg: CN) -> None:
    """Add the keys GMMSeg-D2 uses (Detectron2's DeepLab keys included) to ``cfg`` in place."""
    if not hasattr(cfg.SOLVER, "POLY_LR_POWER"):
        add_deeplab_config(cfg)
    # How training images are read: "semantic" = gmmseg.data.SemanticDatasetMapper.
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Number of equal-width confidence bins of the expected calibration error (ECE).
    cfg.TEST.CALIBRATION_BINS = 15


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ConfigValueError(key, value, expected)


def validate_gmmseg_config(cfg: CN) -> None:
    """Check the values GMMSeg-D2 relies on; raise ConfigValueError naming the first bad key.

    Dataset-dependent checks (class count, ignore label) need the datasets registered, so this also
    registers every dataset the config names (raising, with the path, if a folder is missing or broken).
    """
    from detectron2.data import MetadataCatalog

    from gmmseg.data.folder_dataset import ensure_registered

    _check(
        cfg.INPUT.DATASET_MAPPER_NAME in ("semantic",),
        "INPUT.DATASET_MAPPER_NAME",
        cfg.INPUT.DATASET_MAPPER_NAME,
        "'semantic'",
    )
    _check(
        isinstance(cfg.TEST.CALIBRATION_BINS, int) and cfg.TEST.CALIBRATION_BINS >= 1,
        "TEST.CALIBRATION_BINS",
        cfg.TEST.CALIBRATION_BINS,
        "an integer >= 1",
    )
    head = cfg.MODEL.SEM_SEG_HEAD
    _check(
        isinstance(head.NUM_CLASSES, int) and head.NUM_CLASSES >= 1,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        head.NUM_CLASSES,
        "an integer >= 1",
    )
    _check(
        isinstance(head.IGNORE_VALUE, int)
        and (head.IGNORE_VALUE < 0 or head.IGNORE_VALUE >= head.NUM_CLASSES),
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
        head.IGNORE_VALUE,
        "a value that is not a class index",
    )
    _check(
        cfg.INPUT.RANDOM_FLIP in ("none", "horizontal", "vertical"),
        "INPUT.RANDOM_FLIP",
        cfg.INPUT.RANDOM_FLIP,
        "'none', 'horizontal' or 'vertical'",
    )
    _check(cfg.SOLVER.IMS_PER_BATCH >= 1, "SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, "an integer >= 1")
    _check(cfg.SOLVER.MAX_ITER >= 1, "SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, "an integer >= 1")
    _check(cfg.SOLVER.BASE_LR > 0, "SOLVER.BASE_LR", cfg.SOLVER.BASE_LR, "a positive number")
    _check(
        cfg.MODEL.DEVICE == "cpu" or cfg.MODEL.DEVICE.startswith("cuda"),
        "MODEL.DEVICE",
        cfg.MODEL.DEVICE,
        "'cpu' or 'cuda[:N]'",
    )
    if cfg.INPUT.CROP.ENABLED:
        size = list(cfg.INPUT.CROP.SIZE)
        _check(len(size) == 2 and all(s > 0 for s in size), "INPUT.CROP.SIZE", size, "two positive numbers")

    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            ensure_registered(name)
            meta = MetadataCatalog.get(name)
            classes = meta.get("stuff_classes", None)
            if classes is not None:
                _check(
                    len(classes) == head.NUM_CLASSES,
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                    head.NUM_CLASSES,
                    f"{len(classes)}, the number of classes of {key} dataset '{name}'",
                )
            ignore = meta.get("ignore_label", None)
            if ignore is not None:
                _check(
                    ignore == head.IGNORE_VALUE,
                    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
                    head.IGNORE_VALUE,
                    f"{ignore}, the ignore_label of {key} dataset '{name}'",
                )
