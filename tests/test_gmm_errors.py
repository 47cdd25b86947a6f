"""benchmarks/gmm_errors.py: the decomposition of GMM class scores on misclassified pixels."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Independent, Normal

from gmmseg.modeling import GMMPredictor

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gmm_errors.py"
CONFIG = REPO / "configs" / "digitscapes" / "deeplabv3plus_R18_gmmseg.yaml"
C, K, D = 3, 2, 4


def _module():
    spec = importlib.util.spec_from_file_location("gmm_errors", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fitted_predictor() -> GMMPredictor:
    torch.manual_seed(0)
    predictor = GMMPredictor(8, C, embed_dim=D, num_components=K, norm="")
    means = F.normalize(torch.randn(C, K, D), dim=-1)
    stds = 0.1 + torch.rand(C, K, D)  # unequal spreads, so the log-det terms differ between classes
    predictor.gmm.update_parameters(means, stds)
    return predictor


def test_decomposition_matches_torch_distributions():
    errors = _module()
    predictor = _fitted_predictor()
    x = F.normalize(torch.randn(200, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    labels = torch.randint(0, C, (200,), generator=torch.Generator().manual_seed(2))
    labels[:5] = 255  # ignored pixels are dropped
    terms = errors.decompose(x, labels, predictor)

    keep = labels < C
    xk = x[keep].double()
    means, stds = predictor.gmm.means.double(), predictor.gmm.stds.double()
    log_prob = Independent(Normal(means, stds), 1).log_prob(xk[:, None, None])  # (N, C, K)
    best = log_prob.argmax(-1)  # each class's best component
    mu = means[torch.arange(C), best]  # (N, C, D)
    sd = stds[torch.arange(C), best]
    torch.testing.assert_close(terms["quadratic"], -0.5 * ((xk[:, None] - mu) / sd).square().sum(-1))
    torch.testing.assert_close(terms["log_det"], -sd.log().sum(-1))
    torch.testing.assert_close(
        terms["quadratic"] + terms["log_det"] - 0.5 * D * math.log(2 * math.pi), log_prob.amax(-1)
    )
    assert torch.equal(terms["labels"], labels[keep])
    assert torch.equal(terms["raw_pred"], log_prob.amax(-1).argmax(-1))
    logits = predictor.logit_norm(log_prob.amax(-1).float())
    assert torch.equal(terms["posterior_pred"], logits.argmax(-1))


def test_rows_count_errors_and_which_term_decides_them():
    errors = _module()
    # 4 pixels: two of class 0 (one right, one wrong), two of class 1 (both wrong)
    terms = {
        "labels": torch.tensor([0, 0, 1, 1]),
        "posterior_pred": torch.tensor([0, 1, 0, 0]),
        "raw_pred": torch.tensor([0, 0, 0, 1]),
        # (N, C): the wrong class-0 pixel is closer to class 0 (quadratic) but loses on the log-det term
        "quadratic": torch.tensor(
            [[0.0, -5.0], [-1.0, -3.0], [-2.0, -4.0], [-1.0, -2.0]], dtype=torch.float64
        ),
        "log_det": torch.tensor([[1.0, 1.0], [0.0, 4.0], [1.0, 1.0], [3.0, 2.0]], dtype=torch.float64),
    }
    table = errors.rows(terms, {"a": [0], "b": [1], "all": [0, 1]})
    a, b, both = table
    assert (a["pixels"], a["wrong"], a["acc"], a["raw_acc"]) == (2, 1, 50.0, 100.0)
    assert a["closer_to_true"] == 100.0 and a["median_d_quad"] == 2.0 and a["median_d_logdet"] == -4.0
    assert (b["pixels"], b["wrong"], b["acc"], b["raw_acc"]) == (2, 2, 0.0, 50.0)
    # class-1 pixels: quadratic true - predicted = -2 and -1 (farther from their own class)
    assert b["closer_to_true"] == 0.0 and b["median_d_quad"] == pytest.approx(-1.5)
    assert (both["pixels"], both["wrong"]) == (4, 3)
    text = errors.markdown(table)
    assert text.count("\n| ") == 4 and "| a | 2 | 50.0 | 100.0 | 1 | 100.0% | +2.00 | -4.00 |" in text


def test_mean_iou_matches_scikit_learn():
    from sklearn.metrics import jaccard_score

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (500,), generator=g)
    labels[:20] = 255  # ignored
    pred = torch.where(torch.rand(500, generator=g) < 0.6, labels, torch.randint(0, 4, (500,), generator=g))
    pred[:20] = 0
    keep = labels < 5
    per_class = jaccard_score(labels[keep].numpy(), pred[keep].numpy(), labels=list(range(5)), average=None)
    errors = _module()
    assert errors.mean_iou(pred, labels, [0, 1, 2, 3, 4], 5) == pytest.approx(100 * per_class.mean())
    assert errors.mean_iou(pred, labels, [3, 4], 5) == pytest.approx(100 * per_class[3:].mean())
    # a class neither present nor predicted is left out of the mean, not counted as 0
    assert errors.mean_iou(pred, labels, [0, 1, 2, 3, 4, 5], 6) == pytest.approx(100 * per_class.mean())


def test_linear_probe_separates_what_the_mixtures_do_not():
    """Embeddings split by a hyperplane but far from the mixtures' means: the probe gets them right."""
    errors = _module()
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(600, D, generator=g), dim=-1)
    labels = (x[:, 0] > 0).long()
    probe = errors.fit_linear_probe(x, labels, num_classes=2, max_samples=400)
    accuracy = (torch.as_tensor(probe.predict(x.double().numpy())) == labels).float().mean()
    assert accuracy > 0.97


def test_parse_classes():
    assert _module().parse_classes("4-6,9") == [4, 5, 6, 9]


@pytest.mark.slow
def test_script_reports_every_class_of_a_saved_model(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from gmmseg import add_gmmseg_config
    from gmmseg_datasets.digitscapes import generate_digitscapes

    generate_digitscapes(str(tmp_path / "datasets"), seed=0, image_size=64, counts={"train": 2, "val": 3})
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(CONFIG))
    cfg.merge_from_list(["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), str(tmp_path)).save("weights")
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--config-file", str(CONFIG),
            "--weights", str(tmp_path / "weights.pth"), "--summary-classes", "4-11",
            "--max-images", "2", "--linear-probe", "2", "INPUT.MIN_SIZE_TEST", "64",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    names = [line.split(" | ")[0][2:] for line in lines[2:16]]
    assert names[:12] == ["sky", "water", "foliage", "building"] + [f"digit {i}" for i in range(8)]
    assert names[12:] == ["digit 0 to digit 7", "all classes"]
    pixels = [int(line.split(" | ")[1].replace(",", "")) for line in lines[2:16]]
    assert sum(pixels[:12]) == pixels[13] > 0 and sum(pixels[4:12]) == pixels[12]
    probe_table = proc.stdout[proc.stdout.index("| classifier |") :].splitlines()
    assert probe_table[0] == "| classifier | all classes | digit 0 to digit 7 | the other classes |"
    assert [row.split(" | ")[0] for row in probe_table[2:5]] == [
        "| GMM head (posterior)",
        "| GMM head (raw Bayes rule)",
        "| linear probe (digitscapes_train, 2 images)",
    ]


def test_missing_weights_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--config-file", str(CONFIG), "--weights", str(tmp_path / "none.pth")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and "none.pth: no such file" in proc.stderr
