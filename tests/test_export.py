"""tools/export_model.py: traced TorchScript and ONNX exports of softmax and GMMSeg models (DeepLabV3+ and
FPN, tiny DigitScapes configs) give the eager model's posteriors and anomaly map, at any input size.

Tolerances (largest absolute difference, exported - eager; the anomaly's relative to its map's range):
TorchScript runs the same kernels as the eager model (1e-5), onnxruntime its own (1e-4)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from gmmseg_datasets.digitscapes import generate_digitscapes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4}
TINY = ["INPUT.MIN_SIZE_TEST", "64", "DATASETS.TEST", "('digitscapes_val',)"]


def _tool():
    spec = importlib.util.spec_from_file_location("export_model", REPO / "tools" / "export_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export")
    generate_digitscapes(str(root / "datasets"), seed=0, image_size=64, counts={"train": 1, "val": 2})
    return root


def _weights(root: Path, config: str) -> Path:
    """A checkpoint of the (randomly initialised, seed 0) model, so the test rebuilds the tool's model."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gmmseg import load_cfg

    path = root / f"{config}.pth"
    if not path.is_file():
        cfg = load_cfg(CONFIGS / f"{config}.yaml", ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
        torch.manual_seed(0)
        DetectionCheckpointer(build_model(cfg), str(root)).save(config)
    return path


def _eager(config: str, weights: Path, opts: tuple[str, ...] = ()):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gmmseg import load_cfg

    cfg = load_cfg(CONFIGS / f"{config}.yaml", ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts])
    model = build_model(cfg)
    DetectionCheckpointer(model).load(str(weights))
    return model.eval()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize(
    "config",
    ["deeplabv3plus_R18_gmmseg", "deeplabv3plus_R18_softmax", "fpn_R18_gmmseg", "fpn_R18_softmax"],
)
def test_export_matches_eager_on_dataset_images_and_other_sizes(
    data, tmp_path, monkeypatch, capsys, config, fmt
):
    from gmmseg.export import eager_outputs, load_exported

    monkeypatch.setenv("DETECTRON2_DATASETS", str(data / "datasets"))
    weights = _weights(data, config)
    out = tmp_path / "export"
    argv = ["--config-file", str(CONFIGS / f"{config}.yaml"), "--format", fmt, "--output", str(out)]
    assert _tool().main([*argv, *TINY, "MODEL.WEIGHTS", str(weights)]) == 0
    assert "max abs difference exported - eager over 2 images" in capsys.readouterr().out

    summary = json.loads((out / "export.json").read_text())
    score = "gmm" if "gmmseg" in config else "msp"
    assert summary["anomaly_score"] == score and summary["fixed_size"] is None
    assert summary["check"]["images"] == 2 and summary["check"]["passed"]
    assert summary["check"]["sem_seg"] <= TOLERANCE[fmt]
    assert summary["check"]["anomaly"] <= TOLERANCE[fmt] * max(1.0, summary["check"]["anomaly_range"])

    # the exported file alone, on sizes it was not traced with, against the eager model of the same weights
    exported = load_exported(out / summary["file"])
    model = _eager(config, weights)
    generator = torch.Generator().manual_seed(1)
    for height, width in ((64, 96), (77, 50)):
        image = torch.rand(3, height, width, generator=generator) * 255
        posteriors, anomaly = exported(image)
        want_posteriors, want_anomaly = eager_outputs(model, image, score)
        assert posteriors.shape == (12, height, width) and anomaly.shape == (height, width)
        torch.testing.assert_close(posteriors.sum(0), torch.ones(height, width), atol=1e-5, rtol=0)
        assert (posteriors - want_posteriors).abs().max() <= TOLERANCE[fmt]
        spread = max(1.0, float(want_anomaly.max() - want_anomaly.min()))
        assert (anomaly - want_anomaly).abs().max() <= TOLERANCE[fmt] * spread
        assert anomaly.std() > 0


def test_check_fails_when_the_exported_model_differs(data, tmp_path, monkeypatch, capsys):
    import gmmseg.export

    monkeypatch.setenv("DETECTRON2_DATASETS", str(data / "datasets"))
    load = gmmseg.export.load_exported

    def perturbed(path):
        run = load(path)
        return lambda image: tuple(x + 1e-2 for x in run(image))

    monkeypatch.setattr(gmmseg.export, "load_exported", perturbed)
    config = CONFIGS / "deeplabv3plus_R18_gmmseg.yaml"
    argv = ["--config-file", str(config), "--output", str(tmp_path), *TINY]
    assert _tool().main(argv) == 1
    assert "difference above --tolerance" in capsys.readouterr().err
    assert not json.loads((tmp_path / "export.json").read_text())["check"]["passed"]


def test_images_from_files_and_bad_values_fail_at_start(data, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), np.uint8)).save(folder / "a.png")
    config = CONFIGS / "fpn_R18_gmmseg.yaml"
    base = ["--config-file", str(config), "--input", str(folder), "--output", str(tmp_path / "out")]
    assert _tool().main([*base, "--anomaly-score", "gmm_fullres", "INPUT.MIN_SIZE_TEST", "64"]) == 0
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary["anomaly_score"] == "gmm_fullres" and summary["check"]["images"] == 1
    assert summary["fixed_size"] == [64, 107]  # its bands of output rows are sized in Python

    tool = _tool()
    assert tool.main([*base, "--anomaly-score", "rba"]) == 2  # Mask2Former's
    assert "TEST.ANOMALY_SCORES" in capsys.readouterr().err
    assert tool.main([*base, "MODEL.GMM.EMBED_DIM", "0"]) == 2
    assert "MODEL.GMM.EMBED_DIM = 0 is invalid" in capsys.readouterr().err
    assert tool.main([*base[:2], "--input", str(tmp_path / "none"), "--output", str(tmp_path)]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def test_mask2former_exports_for_the_traced_size(data, tmp_path, monkeypatch):
    """Mask2Former's deformable attention traces through its pure-PyTorch path, for one image size."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(data / "datasets"))
    config = CONFIGS / "mask2former_R18_gmmseg.yaml"
    argv = ["--config-file", str(config), "--output", str(tmp_path), *TINY]
    assert _tool().main(argv) == 0
    summary = json.loads((tmp_path / "export.json").read_text())
    assert summary["fixed_size"] == [64, 64] and summary["anomaly_score"] == "gmm"
    assert summary["check"]["sem_seg"] <= TOLERANCE["torchscript"]
    assert summary["check"]["anomaly"] <= TOLERANCE["torchscript"]
