"""tools/export_anomaly_maps.py: SegmentMeIfYouCan submission files (the benchmark's paths, float16 'value'
datasets, gzip 9) written from a tiny GMMSeg model on the SMIYC fixtures, read back with h5py alone, and
evaluated from the folder to the numbers train_net's evaluation gives the same (float16) maps."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import SMIYC, SMIYC_H, SMIYC_MODEL_CONFIG, SMIYC_MODEL_OPTS, SMIYC_W
from torch import nn

from gmmseg.evaluation.smiyc_files import anomaly_map_path, frame_paths, read_anomaly_map, write_anomaly_map

REPO = Path(__file__).resolve().parent.parent
DATASET_ARGS = [arg for name in SMIYC for arg in ("--dataset", name)]
# the benchmark's persistence folders (road_anomaly_benchmark/datasets/tracks.py, tracks_extra.py) and
# frame ids, written out by hand from the fixtures of conftest.py
EXPECTED_FILES = {
    "AnomalyTrack-all/validation0000.hdf5",
    "AnomalyTrack-all/validation0001.hdf5",
    "ObstacleTrack-all/validation_1.hdf5",
    "ObstacleTrack-all/validation_2.hdf5",
    "LostAndFound-test/02_Hanns_Klemm_Str_44_000001_000040.hdf5",
    "LostAndFound-test/04_Maurener_Weg_8_000000_000030.hdf5",  # also FishyLAF's (a LAF test frame)
    "LostAndFound-train/13_Elly_Beinhorn_Str_000000_000050.hdf5",
}


def _tool():
    spec = importlib.util.spec_from_file_location(
        "export_anomaly_maps", REPO / "tools" / "export_anomaly_maps.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Float16Scores(nn.Module):
    """The model with its anomaly maps rounded to float16, as the files hold them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.anomaly_score_names = model.anomaly_score_names

    def forward(self, inputs):
        outputs = self.model(inputs)
        for out in outputs:
            out["anomaly_scores"] = {k: v.half().float() for k, v in out["anomaly_scores"].items()}
        return outputs


def _model(opts: list[str], weights: Path | None = None) -> nn.Module:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gmmseg import setup_cfg

    if weights is None:
        torch.manual_seed(0)
    model = build_model(setup_cfg(SMIYC_MODEL_CONFIG, opts))
    if weights is not None:
        DetectionCheckpointer(model).load(str(weights))
    return model.eval()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def test_export_then_evaluate_folder_gives_train_nets_numbers(smiyc_root, tmp_path, capsys):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog

    from gmmseg import setup_cfg
    from gmmseg.engine import GMMSegTrainer

    opts = [*SMIYC_MODEL_OPTS, "DATASETS.TEST", repr(SMIYC), "OUTPUT_DIR", str(tmp_path / "run")]
    DetectionCheckpointer(_model(opts), str(tmp_path)).save("tiny")
    weights = tmp_path / "tiny.pth"
    storage = tmp_path / "outputs"
    tool = _tool()
    argv = ["--config-file", str(SMIYC_MODEL_CONFIG), "--method", "Tiny", *DATASET_ARGS]
    assert tool.main([*argv, "--output", str(storage), *opts, "MODEL.WEIGHTS", str(weights)]) == 0
    assert "FishyLAFAnomaly-val: 2 'gmm' maps" in capsys.readouterr().out

    # the layout and the format, read with h5py alone
    method_dir = storage / "anomaly_p" / "Tiny"
    assert {str(p.relative_to(method_dir)) for p in method_dir.rglob("*") if p.is_file()} == EXPECTED_FILES
    cfg = setup_cfg(SMIYC_MODEL_CONFIG, opts)
    model = _model(opts, weights)
    for name in SMIYC:
        for inputs in GMMSegTrainer.build_test_loader(cfg, name):
            expected = model(inputs)[0]["anomaly_scores"]["gmm"].detach().numpy()
            record = inputs[0]
            folder = {
                "AnomalyTrack-validation": "AnomalyTrack-all",
                "ObstacleTrack-validation": "ObstacleTrack-all",
                "LostAndFound-testNoKnown": "LostAndFound-test",
                "FishyLAFAnomaly-val": "LostAndFound-train"
                if "/train/" in record["file_name"]
                else "LostAndFound-test",
            }[name]
            with h5py.File(method_dir / folder / f"{record['image_id']}.hdf5", "r") as f:
                assert list(f.keys()) == ["value"]
                value = f["value"]
                assert value.dtype == np.float16 and value.shape == (SMIYC_H, SMIYC_W)
                assert value.compression == "gzip" and value.compression_opts == 9
                np.testing.assert_array_equal(value[()], expected.astype(np.float16))

    # evaluated from the folder = train_net's evaluation of the same float16 maps, key for key
    argv += ["--evaluate-folder", str(storage), "--score", "gmm", *opts]
    assert tool.main(argv) == 0
    out = capsys.readouterr().out
    assert "| Tiny | AnomalyTrack-validation | - | - | gmm |" in out and "sIoU (%)" in out
    from_files = json.loads((tmp_path / "run" / "evaluate_folder" / "Tiny" / "metrics.json").read_text())
    direct = GMMSegTrainer.test(cfg, Float16Scores(model))
    float32 = GMMSegTrainer.test(cfg, model)
    for name in SMIYC:
        got = from_files[name]["anomaly"]
        assert {f"gmm/{m}" for m in ("AUROC", "AP", "FPR95", "sIoU", "PPV", "mean_F1")} <= set(got)
        assert _equal(got, dict(direct[name]["anomaly"])), name
        # float16 only rounds: the float32 maps' numbers are close (ties it creates move them a little)
        assert got == pytest.approx(dict(float32[name]["anomaly"]), abs=1.0, nan_ok=True)
    assert DatasetCatalog.get("AnomalyTrack-validation")  # the fixture's sets are still registered


def _write_like_the_benchmark(path: Path, anomaly_p: np.ndarray, key: str = "value") -> None:
    """road_anomaly_benchmark's Evaluation.save_output + ChannelLoaderHDF5.write_file, inlined."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=anomaly_p.astype(np.float16), compression=9)


def test_evaluate_folder_of_another_method_and_its_errors(smiyc_root, tmp_path, capsys):
    """Files written as the benchmark writes them (the ground truth as score: perfect metrics); a missing,
    foreign, misshapen or keyless file fails naming it."""
    from detectron2.data import DatasetCatalog

    from gmmseg.evaluation.anomaly_labels import load_codes

    storage = tmp_path / "outputs"
    for record in DatasetCatalog.get("AnomalyTrack-validation"):
        codes, _, _ = load_codes(record)
        target = storage / "anomaly_p" / "Other" / "AnomalyTrack-all" / f"{record['image_id']}.hdf5"
        _write_like_the_benchmark(target, (codes == 1).astype(np.float32))
    argv = ["--config-file", str(SMIYC_MODEL_CONFIG), "--evaluate-folder", str(storage), "--method", "Other"]
    argv += ["--dataset", "AnomalyTrack-validation", *SMIYC_MODEL_OPTS, "OUTPUT_DIR", str(tmp_path / "run")]
    tool = _tool()
    assert tool.main(argv) == 0
    result = json.loads((tmp_path / "run/evaluate_folder/Other/metrics.json").read_text())
    anomaly = result["AnomalyTrack-validation"]["anomaly"]  # rows labelled with the method name
    assert (
        anomaly["Other/AUROC"] == 100.0 and anomaly["Other/FPR95"] == 0.0 and anomaly["Other/sIoU"] == 100.0
    )
    capsys.readouterr()

    target = storage / "anomaly_p/Other/AnomalyTrack-all/validation0001.hdf5"
    cases = [
        (lambda: _write_like_the_benchmark(target, np.zeros((SMIYC_H, SMIYC_W + 1))), "shape (24, 33)"),
        (
            lambda: _write_like_the_benchmark(target, np.zeros((SMIYC_H, SMIYC_W)), key="scores"),
            "no dataset 'value'",
        ),
        (lambda: target.write_bytes(b"not hdf5"), "not a readable HDF5 file"),
        (lambda: target.unlink(), "1 of 2 anomaly maps missing"),
    ]
    for damage, message in cases:
        damage()
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert str(target) in err and message in err, err
    wrong = [*argv[:3], str(tmp_path), *argv[4:]]  # no anomaly_p/Other there
    assert tool.main(wrong) == 2 and "anomaly_p/Other: no such folder" in capsys.readouterr().err


def test_paths_and_checks_for_any_dataset(tmp_path):
    record = {"file_name": "/data/digitscapes/anomaly_val/images/0003.png", "image_id": 3}
    path = anomaly_map_path(tmp_path, "M", "digitscapes_anomaly_val", record)
    assert path == tmp_path / "anomaly_p" / "M" / "digitscapes_anomaly_val" / "0003.hdf5"
    twin = {"file_name": "/data/digitscapes/val/images/0003.png"}
    with pytest.raises(ValueError, match="frames 0 and 1 both map to"):
        frame_paths(tmp_path, "M", "mixed", [record, twin])
    with pytest.raises(ValueError, match="method name"):
        anomaly_map_path(tmp_path, "a/b", "x", record)
    with pytest.raises(ValueError, match="not finite in float16"):
        write_anomaly_map(path, np.full((2, 3), 1e5, np.float32))
    scores = np.linspace(-3.0, 70000.0 / 2, 6, dtype=np.float32).reshape(2, 3)
    write_anomaly_map(path, scores)
    np.testing.assert_array_equal(
        read_anomaly_map(path, (2, 3)), scores.astype(np.float16).astype(np.float32)
    )
