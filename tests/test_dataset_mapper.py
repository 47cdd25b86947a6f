"""SemanticDatasetMapper: tensors out, and bad label files rejected with their names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_folder_dataset
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from PIL import Image

from gmmseg import SemanticDatasetMapper, add_gmmseg_config
from gmmseg.data.folder_dataset import register_folder_dataset


def _setup(tmp_path, unique_name, **cfg_overrides):
    ds = write_folder_dataset(tmp_path, unique_name, {"train": 2}, size=(32, 40), num_classes=3)
    register_folder_dataset(ds)
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.DATASETS.TRAIN = (f"{unique_name}_train",)
    cfg.DATASETS.TEST = (f"{unique_name}_train",)
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    cfg.INPUT.MIN_SIZE_TRAIN = (32,)
    cfg.INPUT.MIN_SIZE_TEST = 32
    cfg.INPUT.FORMAT = "RGB"
    for key, value in cfg_overrides.items():
        cfg.merge_from_list([key, value])
    return ds, cfg, DatasetCatalog.get(f"{unique_name}_train")


def test_train_mapping_keeps_image_and_label_aligned(tmp_path, unique_name):
    ds, cfg, dicts = _setup(tmp_path, unique_name, **{"INPUT.RANDOM_FLIP": "horizontal"})
    out = SemanticDatasetMapper(cfg, is_train=True)(dicts[0])
    image = np.asarray(Image.open(dicts[0]["file_name"]))
    label = np.asarray(Image.open(dicts[0]["sem_seg_file_name"]))
    assert out["image"].shape == (3, 32, 40) and out["image"].dtype == torch.uint8
    assert out["sem_seg"].shape == (32, 40) and out["sem_seg"].dtype == torch.int64
    got_image, got_label = out["image"].permute(1, 2, 0).numpy(), out["sem_seg"].numpy()
    flipped = np.array_equal(got_image, image[:, ::-1])
    assert flipped or np.array_equal(got_image, image)
    assert np.array_equal(got_label, label[:, ::-1] if flipped else label)
    assert "sem_seg_file_name" not in out


def test_test_mapping_resizes_and_leaves_label_to_evaluator(tmp_path, unique_name):
    _, cfg, dicts = _setup(tmp_path, unique_name, **{"INPUT.MIN_SIZE_TEST": 64})
    out = SemanticDatasetMapper(cfg, is_train=False)(dicts[0])
    assert out["image"].shape == (3, 64, 80)
    assert "sem_seg" not in out and out["sem_seg_file_name"] == dicts[0]["sem_seg_file_name"]
    assert (out["height"], out["width"]) == (32, 40)


def test_label_value_outside_classes_names_the_file(tmp_path, unique_name):
    _, cfg, dicts = _setup(tmp_path, unique_name)
    label = np.zeros((32, 40), np.uint8)
    label[5, 5] = 7
    Image.fromarray(label).save(dicts[1]["sem_seg_file_name"])
    mapper = SemanticDatasetMapper(cfg, is_train=True)
    mapper(dicts[0])
    with pytest.raises(ValueError, match=r"labels/0001\.png: label values \[7\] are outside the 3 classes"):
        mapper(dicts[1])


def test_rgb_label_and_size_mismatch_name_the_file(tmp_path, unique_name):
    _, cfg, dicts = _setup(tmp_path, unique_name)
    mapper = SemanticDatasetMapper(cfg, is_train=True)
    Image.fromarray(np.zeros((32, 40, 3), np.uint8)).save(dicts[0]["sem_seg_file_name"])
    with pytest.raises(ValueError, match=r"labels/0000\.png: label must be a single-channel PNG"):
        mapper(dicts[0])
    Image.fromarray(np.zeros((16, 40), np.uint8)).save(dicts[1]["sem_seg_file_name"])
    with pytest.raises(ValueError, match=r"labels/0001\.png: label size 40x16 differs"):
        mapper(dicts[1])


def test_unreadable_image_names_the_file(tmp_path, unique_name):
    _, cfg, dicts = _setup(tmp_path, unique_name)
    with open(dicts[0]["file_name"], "wb") as f:
        f.write(b"garbage")
    with pytest.raises(ValueError, match=r"images/0000\.png: unreadable image"):
        SemanticDatasetMapper(cfg, is_train=True)(dicts[0])
