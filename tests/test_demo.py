"""demo.py end to end: a folder of images in, segmentation overlays and anomaly heat maps out."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmmseg_datasets.digitscapes import generate_digitscapes

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_gmmseg.yaml"


def _demo(args: list[str], datasets: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, str(REPO / "demo.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def weights_and_data(tmp_path_factory) -> tuple[Path, Path]:
    """DigitScapes at 64 px and the weights of an (untrained) GMMSeg model saved as a checkpoint."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from gmmseg import add_gmmseg_config

    root = tmp_path_factory.mktemp("demo")
    generate_digitscapes(
        str(root / "datasets"), seed=0, image_size=64, counts={"train": 2, "val": 2, "anomaly_val": 3}
    )
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, str(root)).save("weights")
    return root / "weights.pth", root / "datasets"


@pytest.mark.slow
def test_folder_in_overlays_and_heat_maps_out(weights_and_data, tmp_path):
    weights, datasets = weights_and_data
    images = datasets / "digitscapes" / "anomaly_val" / "images"
    out = tmp_path / "out"
    proc = _demo(
        [
            "--config-file", str(CONFIG), "--input", str(images), "--output", str(out), "--save-raw",
            "--opts", "MODEL.WEIGHTS", str(weights), "INPUT.MIN_SIZE_TEST", "64",
        ],
        datasets,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.stem for p in images.iterdir())
    assert len(names) == 3
    for name in names:
        size = Image.open(images / f"{name}.png").size
        seg, heat = Image.open(out / f"{name}_seg.png"), Image.open(out / f"{name}_anomaly.png")
        assert seg.size == size and heat.size == size and seg.mode == "RGB"
        raw = np.load(out / f"{name}_anomaly.npy")
        assert raw.shape == size[::-1] and np.isfinite(raw).all() and raw.std() > 0
        # the heat map shows the score: brighter where the score is higher (inferno is dark-to-bright)
        brightness = np.asarray(heat, dtype=np.float64).mean(-1)
        image = np.asarray(Image.open(images / f"{name}.png"), dtype=np.float64).mean(-1)
        heat_part = brightness - 0.5 * image  # remove the blended image
        assert np.corrcoef(heat_part.ravel(), raw.ravel())[0, 1] > 0.5
    assert f"wrote {2 * len(names)} files" in proc.stdout


@pytest.mark.slow
def test_bad_input_and_unknown_score_are_reported(weights_and_data, tmp_path):
    weights, datasets = weights_and_data
    proc = _demo(
        ["--config-file", str(CONFIG), "--input", str(tmp_path / "nothing"), "--output", str(tmp_path)],
        datasets,
    )
    assert proc.returncode == 2 and "no image found there" in proc.stderr
    image = next((datasets / "digitscapes" / "val" / "images").iterdir())
    proc = _demo(
        [
            "--config-file", str(CONFIG), "--input", str(image), "--output", str(tmp_path),
            "--anomaly-score", "msp", "--opts", "MODEL.WEIGHTS", str(weights),
        ],
        datasets,
    )  # fmt: skip
    assert proc.returncode == 2 and "--anomaly-score 'msp': this model gives ['gmm']" in proc.stderr


@pytest.mark.slow
def test_scale_draws_larger_pngs_of_the_same_maps(weights_and_data, tmp_path):
    weights, datasets = weights_and_data
    image = sorted((datasets / "digitscapes" / "anomaly_val" / "images").iterdir())[0]
    common = ["--config-file", str(CONFIG), "--input", str(image)]
    opts = ["--opts", "MODEL.WEIGHTS", str(weights), "INPUT.MIN_SIZE_TEST", "64"]
    for scale, out in (("1", tmp_path / "x1"), ("2", tmp_path / "x2")):
        proc = _demo([*common, "--output", str(out), "--scale", scale, *opts], datasets)
        assert proc.returncode == 0, proc.stderr[-3000:]
    width, height = Image.open(image).size
    for kind in ("seg", "anomaly"):
        large = Image.open(tmp_path / "x2" / f"{image.stem}_{kind}.png")
        assert large.size == (2 * width, 2 * height)
    small = np.asarray(Image.open(tmp_path / "x1" / f"{image.stem}_anomaly.png"))
    large = np.asarray(Image.open(tmp_path / "x2" / f"{image.stem}_anomaly.png"))
    np.testing.assert_array_equal(large[::2, ::2], small)  # the same heat map, drawn larger

    proc = _demo([*common, "--output", str(tmp_path / "x0"), "--scale", "0"], datasets)
    assert proc.returncode == 2 and "--scale 0.0: expected a number > 0" in proc.stderr


def test_bad_override_fails_at_start_naming_the_key(tmp_path, capsys):
    """The demo sets its config up as train_net.py does: validated, so a bad value stops it first."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", REPO / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    no_data = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    argv = ["--config-file", str(CONFIG), "--input", str(image), "--output", str(tmp_path / "out")]
    assert demo.main([*argv, "--opts", *no_data, "MODEL.GMM.EMBED_DIM", "0"]) == 2
    assert "MODEL.GMM.EMBED_DIM = 0 is invalid" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
