"""The generic on-disk format: registration, metadata, and errors that name the offending file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_folder_dataset
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.folder_dataset import (
    DatasetFormatError,
    ensure_registered,
    register_all_folder_datasets,
    register_folder_dataset,
)


def test_registers_every_split_with_metadata(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"train": 3, "val": 2}, with_ood=False)
    names = register_all_folder_datasets(tmp_path)
    assert names == [f"{unique_name}_train", f"{unique_name}_val"]
    dicts = DatasetCatalog.get(f"{unique_name}_train")
    assert [d["image_id"] for d in dicts] == ["0000", "0001", "0002"]
    first = dicts[0]
    assert first["file_name"] == str(ds / "train" / "images" / "0000.png")
    assert first["sem_seg_file_name"] == str(ds / "train" / "labels" / "0000.png")
    assert (first["height"], first["width"]) == (32, 40)
    meta = MetadataCatalog.get(f"{unique_name}_val")
    assert meta.stuff_classes == ["class0", "class1", "class2"]
    assert meta.ignore_label == 255 and meta.evaluator_type == "sem_seg"
    assert len(meta.stuff_colors) == 3 and not meta.has_ood


def test_optional_ood_maps_are_listed(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"anomaly_val": 2}, with_ood=True)
    register_folder_dataset(ds)
    dicts = DatasetCatalog.get(f"{unique_name}_anomaly_val")
    assert dicts[1]["ood_file_name"] == str(ds / "anomaly_val" / "ood" / "0001.png")
    assert MetadataCatalog.get(f"{unique_name}_anomaly_val").has_ood


def test_jpg_images_are_accepted(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    png = ds / "val" / "images" / "0000.png"
    Image.open(png).save(png.with_suffix(".jpg"))
    png.unlink()
    register_folder_dataset(ds)
    assert DatasetCatalog.get(f"{unique_name}_val")[0]["file_name"].endswith("0000.jpg")


@pytest.mark.parametrize(
    "meta, fragment",
    [
        ({"colors": [[0, 0, 0]], "ignore_label": 255}, "'classes'"),
        ({"classes": ["a", "b"], "colors": [[0, 0, 0]], "ignore_label": 255}, "'colors'"),
        ({"classes": ["a", "a"], "colors": [[0, 0, 0]] * 2}, "duplicate"),
        ({"classes": ["a", "b"], "colors": [[0, 0, 0], [1, 1, 300]]}, "'colors'"),
        ({"classes": ["a", "b"], "colors": [[0, 0, 0]] * 2, "ignore_label": 1}, "'ignore_label'"),
    ],
)
def test_bad_meta_names_the_file(tmp_path, unique_name, meta, fragment):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    (ds / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetFormatError, match=fragment) as info:
        register_folder_dataset(ds)
    assert str(ds / "meta.json") in str(info.value)


def test_invalid_json_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    (ds / "meta.json").write_text("{not json")
    with pytest.raises(DatasetFormatError, match="meta.json"):
        register_folder_dataset(ds)


def _loaded(ds, split, unique_name):
    register_folder_dataset(ds)
    return DatasetCatalog.get(f"{unique_name}_{split}")


def test_missing_label_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 2})
    (ds / "val" / "labels" / "0001.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"labels/0001\.png: missing label"):
        _loaded(ds, "val", unique_name)


def test_label_without_image_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 2})
    (ds / "val" / "images" / "0001.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"labels/0001\.png: label without an image"):
        _loaded(ds, "val", unique_name)


def test_size_mismatch_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 2})
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(ds / "val" / "labels" / "0001.png")
    with pytest.raises(DatasetFormatError, match=r"labels/0001\.png: size 10x10 differs"):
        _loaded(ds, "val", unique_name)


def test_unreadable_image_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    (ds / "val" / "images" / "0000.png").write_bytes(b"not a png")
    with pytest.raises(DatasetFormatError, match=r"images/0000\.png: unreadable"):
        _loaded(ds, "val", unique_name)


def test_incomplete_ood_folder_names_the_file(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 2}, with_ood=True)
    (ds / "val" / "ood" / "0000.png").unlink()
    with pytest.raises(DatasetFormatError, match=r"ood/0000\.png: missing"):
        _loaded(ds, "val", unique_name)


def test_reregistering_replaces_the_old_entry(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 2})
    register_folder_dataset(ds)
    (ds / "val" / "images" / "0001.png").unlink()
    (ds / "val" / "labels" / "0001.png").unlink()
    register_folder_dataset(ds)
    assert len(DatasetCatalog.get(f"{unique_name}_val")) == 1


def test_broken_folder_is_skipped_by_autoregistration_but_fails_on_request(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    (ds / "meta.json").write_text("[]")
    assert register_all_folder_datasets(tmp_path) == []
    with pytest.raises(DatasetFormatError, match=str(ds / "meta.json")):
        ensure_registered(f"{unique_name}_val", root=tmp_path)


def test_ensure_registered_names_the_missing_split_or_folder(tmp_path, unique_name):
    ds = write_folder_dataset(tmp_path, unique_name, {"val": 1})
    with pytest.raises(DatasetFormatError, match=str(ds / "test")):
        ensure_registered(f"{unique_name}_test", root=tmp_path)
    with pytest.raises(DatasetFormatError, match="no folder for it exists"):
        ensure_registered("nosuchdataset_val", root=tmp_path)
    ensure_registered(f"{unique_name}_val", root=tmp_path)
    assert f"{unique_name}_val" in DatasetCatalog.list()
