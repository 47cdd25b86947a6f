"""benchmarks/anomaly_gap.py on random-initialised models and a tiny generated DigitScapes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "anomaly_gap.py"
CONFIGS = {m: REPO / "configs" / "digitscapes" / f"deeplabv3plus_R18_{m}.yaml" for m in ("gmmseg", "softmax")}


def _module():
    spec = importlib.util.spec_from_file_location("anomaly_gap", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grouped_median_matches_numpy():
    rng = np.random.default_rng(0)
    values, groups = rng.normal(size=301), rng.integers(0, 5, 301)
    groups[groups == 3] = 4  # group 3 is empty
    got = _module().grouped_median(values, groups, 6)
    expected = [np.median(values[groups == g]) if (groups == g).any() else np.nan for g in range(6)]
    np.testing.assert_allclose(got, expected)


def test_boundary_mask_marks_pixels_within_width_of_a_region_change():
    region = np.zeros((9, 9), np.int64)
    region[:, 5:] = 7
    edge = _module().boundary_mask(region, 2)
    assert edge[:, 3:7].all() and not edge[:, :3].any() and not edge[:, 7:].any()


def test_parse_groups():
    assert _module().parse_groups(["stuff=0-3", "odd=5,7-8"]) == {"stuff": [0, 1, 2, 3], "odd": [5, 7, 8]}


@pytest.mark.slow
def test_script_on_random_models_matches_scikit_learn(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from sklearn.metrics import average_precision_score, roc_auc_score

    from gmmseg import add_gmmseg_config
    from gmmseg_datasets.digitscapes import generate_digitscapes

    datasets = tmp_path / "datasets"
    generate_digitscapes(
        str(datasets), seed=0, image_size=64, counts={"train": 0, "val": 0, "anomaly_val": 8}
    )
    args = []
    for name, config in CONFIGS.items():
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        cfg.merge_from_file(str(config))
        cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
        torch.manual_seed(0)
        model = build_model(cfg)
        if name == "gmmseg":  # unequal spreads per class, as fitted mixtures have
            gmm = model.sem_seg_head.gmm_predictor.gmm
            gmm.update_parameters(gmm.means, 0.1 + 0.2 * torch.rand(gmm.stds.shape))
        DetectionCheckpointer(model, str(tmp_path)).save(name)
        args += [f"--{name}", str(config), str(tmp_path / f"{name}.pth")]
    out = tmp_path / "gap"
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--output", str(out), "--quick", "--save-pixels",
         "--opts", "INPUT.MIN_SIZE_TEST", "64"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suffix in ("md", "json", "png"):
        assert (out / f"anomaly_gap.{suffix}").stat().st_size > 0
    result = json.loads((out / "anomaly_gap.json").read_text())
    px = dict(np.load(out / "pixels.npz"))
    assert result["images"] == 8 and px["image"].max() == 7
    ood = [
        np.asarray(Image.open(p)) for p in sorted((datasets / "digitscapes/anomaly_val/ood").glob("*.png"))
    ]
    assert px["family"].size == sum(int((m != 255).sum()) for m in ood)  # every non-void pixel, once
    known = px["family"] == 0
    for family, value in (("near", 1), ("far", 2)):
        row = result["subsets"][f"{family} vs all known"]
        chosen = known | (px["family"] == value)
        y = px["family"][chosen] == value
        assert row["anomalies"] == int(y.sum()) > 0 and row["known"] == int(known.sum())
        for score in ("gmm", "gmm_fullres", "entropy", "msp"):
            metrics = row["scores"][score]
            s = px[score][chosen]
            assert metrics["auroc"] == pytest.approx(100 * roc_auc_score(y, s), abs=1e-9)
            assert metrics["ap"] == pytest.approx(100 * average_precision_score(y, s), abs=1e-9)
    # every known pixel has a class here: the per-class FPR95s add up to the overall one
    per_class, overall = result["per_class"], result["subsets"]["all"]["scores"]
    weights = np.asarray(per_class["pixels"]) / sum(per_class["pixels"])
    for score in ("gmm", "entropy"):
        assert float(weights @ np.asarray(per_class[f"fpr95_{score}"])) == pytest.approx(
            overall[score]["fpr95"]
        )
    text = (out / "anomaly_gap.md").read_text()
    assert "| near vs known digits |" in text and "| boundary (both sides) |" in text
    assert text.count("| digit ") == 8
