"""SegmentMeIfYouCan datasets: tiny fixtures written in each published layout (a webp image included),
registered under the benchmark's names, the roots it reads, and evaluated end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.datasets import PUBLIC_DATASET_NAMES, register_smiyc
from gmmseg.data.datasets.register_smiyc import TRACK_SIZE_FILTERS as DATA_FILTERS
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg.evaluation import AnomalyEvaluator
from gmmseg.evaluation.anomaly_components import TRACK_SIZE_FILTERS, component_settings
from gmmseg.evaluation.anomaly_labels import load_codes

H, W = 24, 32
SMIYC = (
    "AnomalyTrack-validation",
    "ObstacleTrack-validation",
    "LostAndFound-testNoKnown",
    "FishyLAFAnomaly-val",
)


def _image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (H, W, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _labels(path: Path, values: tuple[int, ...] = (0, 1, 255)) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = np.full((H, W), values[0], np.uint8)
    lab[4:12, 6:16] = values[1]
    lab[-3:] = values[2]
    if len(values) > 3:
        lab[14:18, 20:26] = values[3]
    Image.fromarray(lab).save(path)
    return lab


def write_anomaly_track(root: Path) -> None:
    base = root / "dataset_AnomalyTrack"
    for fid in ("validation0000", "validation0001", "cow0000"):  # cow0000: a test frame, no labels
        _image(base / "images" / f"{fid}.jpg")
        if fid.startswith("validation"):
            _labels(base / "labels_masks" / f"{fid}_labels_semantic.png")


def write_obstacle_track(root: Path) -> None:
    base = root / "dataset_ObstacleTrack"
    for fid in ("validation_1", "validation_2", "validation_19", "validation_25", "curvy-street_0"):
        _image(base / "images" / f"{fid}.webp")
        _labels(base / "labels_masks" / f"{fid}_labels_semantic.png")


LAF_FRAMES = {
    "test": (
        "01_Hanns_Klemm_Str_45_000006_000100",
        "04_Maurener_Weg_8_000000_000030",
        "02_Hanns_Klemm_Str_44_000001_000040",
    ),
    "train": ("13_Elly_Beinhorn_Str_000000_000050",),
}


def write_laf(laf: Path) -> None:
    for split, fids in LAF_FRAMES.items():
        for fid in fids:
            scene = fid.rsplit("_", 2)[0]
            _image(laf / "leftImg8bit" / split / scene / f"{fid}_leftImg8bit.png")
            # LAF ids: 1 road, 5 an obstacle, 0 ignore, 250 (> 200) not an obstacle either
            _labels(laf / "gtCoarse" / split / scene / f"{fid}_gtCoarse_labelIds.png", (1, 5, 0, 250))


def write_fishy(fishy: Path) -> None:
    for fid in ("04_Maurener_Weg_8_000000_000030", "13_Elly_Beinhorn_Str_000000_000050"):
        _labels(fishy / "labels" / "val" / f"{fid}_fishy-labels.png")


@pytest.fixture
def smiyc_root(tmp_path, monkeypatch):
    for env in ("DIR_LAF", "DIR_FISHY_LAF", "DIR_DATASETS"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    write_anomaly_track(tmp_path)
    write_obstacle_track(tmp_path)
    write_laf(tmp_path / "dataset_LostAndFound")
    write_fishy(tmp_path / "dataset_FishyLAF")
    register_smiyc()
    return tmp_path


def test_frames_selected_as_the_benchmark_does(smiyc_root):
    ids = {name: [d["image_id"] for d in DatasetCatalog.get(name)] for name in SMIYC}
    assert ids["AnomalyTrack-validation"] == ["validation0000", "validation0001"]
    assert ids["ObstacleTrack-validation"] == ["validation_1", "validation_2"]  # 19, 21..29 excluded
    # known objects (bicycles in 01_Hanns_Klemm_Str_45_000006) excluded
    assert ids["LostAndFound-testNoKnown"] == [
        "02_Hanns_Klemm_Str_44_000001_000040",
        "04_Maurener_Weg_8_000000_000030",
    ]
    assert ids["FishyLAFAnomaly-val"] == [
        "04_Maurener_Weg_8_000000_000030",
        "13_Elly_Beinhorn_Str_000000_000050",
    ]
    fishy = DatasetCatalog.get("FishyLAFAnomaly-val")
    assert "/train/" in fishy[1]["file_name"] and "/test/" in fishy[0]["file_name"]
    obstacle = DatasetCatalog.get("ObstacleTrack-validation")[0]
    assert obstacle["file_name"].endswith(".webp") and (obstacle["height"], obstacle["width"]) == (H, W)
    for name in SMIYC:
        meta = MetadataCatalog.get(name)
        track = "obstacle" if name.startswith(("Obstacle", "LostAndFound")) else "anomaly"
        assert (
            meta.evaluator_type == "anomaly" and meta.smiyc_track == track and len(meta.stuff_classes) == 19
        )
        assert (meta.component_min_pred_size, meta.component_min_gt_size) == TRACK_SIZE_FILTERS[track]
        assert name in PUBLIC_DATASET_NAMES
    assert DATA_FILTERS == TRACK_SIZE_FILTERS


def test_laf_label_ids_become_0_1_255(smiyc_root):
    d = DatasetCatalog.get("LostAndFound-testNoKnown")[0]
    codes, _, _ = load_codes(d)
    raw = np.asarray(Image.open(d["ood_file_name"]))
    assert set(np.unique(raw)) == {0, 1, 5, 250}
    np.testing.assert_array_equal(codes, np.select([raw == 1, raw == 5], [0, 1], 255))
    with pytest.raises(ValueError, match="label map"):
        load_codes({**d, "ood_label_map": "nope"})


def test_environment_roots(smiyc_root, tmp_path_factory, monkeypatch):
    elsewhere = tmp_path_factory.mktemp("laf_elsewhere")
    write_laf(elsewhere / "LAF")
    fishy = tmp_path_factory.mktemp("fishy_elsewhere")
    write_fishy(fishy)
    monkeypatch.setenv("DIR_LAF", str(elsewhere / "LAF"))
    monkeypatch.setenv("DIR_FISHY_LAF", str(fishy))
    assert DatasetCatalog.get("LostAndFound-testNoKnown")[0]["file_name"].startswith(str(elsewhere))
    assert DatasetCatalog.get("FishyLAFAnomaly-val")[0]["ood_file_name"].startswith(str(fishy))
    bench = tmp_path_factory.mktemp("dir_datasets")
    write_anomaly_track(bench)
    monkeypatch.setenv("DIR_DATASETS", str(bench))  # the benchmark's root wins over DETECTRON2_DATASETS
    assert DatasetCatalog.get("AnomalyTrack-validation")[0]["file_name"].startswith(str(bench))
    monkeypatch.setenv("DIR_DATASETS", str(tmp_path_factory.mktemp("empty")))
    with pytest.raises(DatasetFormatError, match="dataset_ObstacleTrack"):
        DatasetCatalog.get("ObstacleTrack-validation")


def test_missing_label_names_the_file(smiyc_root):
    (smiyc_root / "dataset_AnomalyTrack/labels_masks/validation0001_labels_semantic.png").unlink()
    with pytest.raises(DatasetFormatError, match="validation0001_labels_semantic.png"):
        DatasetCatalog.get("AnomalyTrack-validation")


@pytest.mark.parametrize("name", SMIYC)
def test_evaluate_each_dataset(smiyc_root, name):
    """A score that is 1 on anomaly pixels: perfect pixel metrics, and one perfect component per image."""
    dicts = DatasetCatalog.get(name)
    settings = component_settings(True, 0, 0, None, MetadataCatalog.get(name))
    ev = AnomalyEvaluator(name, distributed=False, mode="exact", components=settings)
    ev.reset()
    for d in dicts:
        codes, _, _ = load_codes(d)
        ev.process([d], [{"anomaly": torch.from_numpy((codes == 1).astype(np.float32))}])
    res = ev.evaluate()["anomaly"]
    assert res["anomaly/AUROC"] == 100.0 and res["anomaly/AP"] == 100.0 and res["anomaly/FPR95"] == 0.0
    assert res["anomaly/sIoU"] == 100.0 and res["anomaly/PPV"] == 100.0 and res["anomaly/mean_F1"] == 100.0
    # the track's size filters (80 px objects): kept on the obstacle track, dropped on the anomaly track
    track = component_settings(True, -1, -1, None, MetadataCatalog.get(name))
    ev = AnomalyEvaluator(name, distributed=False, mode="exact", components=track)
    ev.reset()
    for d in dicts:
        codes, _, _ = load_codes(d)
        ev.process([d], [{"anomaly": torch.from_numpy((codes == 1).astype(np.float32))}])
    res = ev.evaluate()["anomaly"]
    if MetadataCatalog.get(name).smiyc_track == "obstacle":
        assert res["anomaly/mean_F1"] == 100.0
    else:
        assert np.isnan(res["anomaly/sIoU"])  # every object voided (< 100 px)
