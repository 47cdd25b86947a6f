"""SegmentMeIfYouCan datasets: tiny fixtures written in each published layout (a webp image included),
registered under the benchmark's names, the roots it reads, and evaluated end to end (through
``train_net.py --eval-only`` too)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMIYC, SMIYC_MODEL_CONFIG, SMIYC_MODEL_OPTS, write_anomaly_track, write_fishy, write_laf
from conftest import SMIYC_H as H
from conftest import SMIYC_W as W
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image

from gmmseg.data.datasets import PUBLIC_DATASET_NAMES
from gmmseg.data.datasets.register_smiyc import TRACK_SIZE_FILTERS as DATA_FILTERS
from gmmseg.data.folder_dataset import DatasetFormatError
from gmmseg.evaluation import AnomalyEvaluator
from gmmseg.evaluation.anomaly_components import TRACK_SIZE_FILTERS, component_settings
from gmmseg.evaluation.anomaly_labels import load_codes

REPO = Path(__file__).resolve().parent.parent


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


def test_train_net_eval_only_reports_pixel_and_component_metrics(smiyc_root, tmp_path):
    """``train_net.py --eval-only`` (its ``main``, in process) on an anomaly- and an obstacle-track set:
    AUROC / AP / FPR95 and sIoU / PPV / mean F1 of the model's score, returned, tabled and saved."""
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    from detectron2.engine import default_argument_parser

    out = tmp_path / "eval"
    sets = ("AnomalyTrack-validation", "LostAndFound-testNoKnown")
    opts = [*SMIYC_MODEL_OPTS, "DATASETS.TEST", repr(sets), "OUTPUT_DIR", str(out)]
    args = default_argument_parser().parse_args(
        ["--config-file", str(SMIYC_MODEL_CONFIG), "--eval-only", *opts]
    )
    torch.manual_seed(0)
    results = train_net.main(args)
    saved = json.loads((out / "inference" / "metrics.json").read_text())
    for name in sets:
        anomaly = results[name]["anomaly"]
        for metric in ("AUROC", "AP", "FPR95", "sIoU", "PPV", "mean_F1"):
            assert 0.0 <= anomaly[f"gmm/{metric}"] <= 100.0, (name, metric)
        assert saved[name]["anomaly"] == pytest.approx(dict(anomaly))
    log = (out / "log.txt").read_text()
    assert "sIoU (%) | PPV (%) | mean F1 (%)" in log and "| LostAndFound-testNoKnown | - | - | gmm |" in log
