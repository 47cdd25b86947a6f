"""End to end through the real CLI: a few training iterations of the softmax baseline and of GMMSeg on
CPU, their checkpoints, resuming, ``--eval-only`` from the saved weights, and two CPU processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmmseg_datasets.digitscapes import DIGITSCAPES_CLASSES, generate_digitscapes

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
CONFIG = CONFIGS / "deeplabv3plus_R18_softmax.yaml"
TINY = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "4",
    "SOLVER.CHECKPOINT_PERIOD",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "DATALOADER.NUM_WORKERS",
    "0",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MIN_SIZE_TEST",
    "64",
]


def _run(
    args: list[str], datasets: Path, config: Path = CONFIG, script: str = "train_net.py", timeout: float = 600
) -> str:
    """Run ``script`` (train_net.py or a tool under tools/) on ``config``; it must succeed."""
    env = {**os.environ, "DETECTRON2_DATASETS": str(datasets), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / script), "--config-file", str(config), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def tiny_digitscapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("datasets")
    generate_digitscapes(str(root), seed=0, image_size=64, counts={"train": 8, "val": 4, "anomaly_val": 4})
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "config",
    [
        "deeplabv3plus_R18_softmax.yaml",
        "deeplabv3plus_R18_gmmseg.yaml",
        "mask2former_R18_softmax.yaml",
        "mask2former_R18_gmmseg.yaml",
    ],
)
def test_train_checkpoint_resume_and_eval_only(tiny_digitscapes, tmp_path, config):
    config = CONFIGS / config
    out = tmp_path / "run"
    log = _run([*TINY, "OUTPUT_DIR", str(out)], tiny_digitscapes, config)
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    metrics = json.loads((out / "inference" / "metrics.json").read_text())["digitscapes_val"]["sem_seg"]
    assert 0.0 <= metrics["mIoU"] <= 100.0 and 0.0 <= metrics["ECE"] <= 100.0
    assert {f"IoU-{c}" for c in DIGITSCAPES_CLASSES} <= set(metrics)
    assert "| run | digitscapes_val |" in log  # the results table
    assert (out / "inference" / "digitscapes_val" / "sem_seg_evaluation.json").is_file()

    anomaly = json.loads((out / "inference" / "metrics.json").read_text())["digitscapes_anomaly_val"][
        "anomaly"
    ]
    scores = ["gmm"] if "gmmseg" in config.name else ["msp", "entropy", "max_logit", "energy"]
    if config.name == "mask2former_R18_softmax.yaml":
        scores.append("rba")
    for score in scores:
        for metric in ("AUROC", "AP", "FPR95"):
            assert 0.0 <= anomaly[f"{score}/{metric}"] <= 100.0
            assert f"{score}/near/{metric}" in anomaly and f"{score}/far/{metric}" in anomaly
    assert f"| {scores[0]} |" in log

    # --eval-only needs only the weights, and reproduces the training run's final evaluation
    eval_out = tmp_path / "eval"
    extra = []
    if config.name == "deeplabv3plus_R18_softmax.yaml":  # the fifth post-hoc score: Mahalanobis
        stats = tmp_path / "mahalanobis.pth"
        weights = ["MODEL.WEIGHTS", str(out / "model_final.pth")]
        _run(
            ["--output", str(stats), *TINY, *weights],
            tiny_digitscapes,
            config,
            "tools/fit_mahalanobis.py",
            300,
        )
        extra = ["TEST.MAHALANOBIS_STATS", str(stats)]
    _run(
        [
            "--eval-only",
            *TINY,
            "MODEL.WEIGHTS",
            str(out / "model_final.pth"),
            "OUTPUT_DIR",
            str(eval_out),
            *extra,
        ],
        tiny_digitscapes,
        config,
    )
    evaluated = json.loads((eval_out / "inference" / "metrics.json").read_text())
    assert evaluated["digitscapes_val"]["sem_seg"] == pytest.approx(metrics, nan_ok=True)
    again = evaluated["digitscapes_anomaly_val"]["anomaly"]
    assert {k: v for k, v in again.items() if k in anomaly} == pytest.approx(anomaly, nan_ok=True)
    if extra:
        assert 0.0 <= again["mahalanobis/AUROC"] <= 100.0
        # the post-hoc GMM ablation: mixtures fitted to the frozen features replace the classifier
        gmm_file = tmp_path / "posthoc_gmm.pth"
        _run(
            [
                "--output",
                str(gmm_file),
                "--per-image",
                "20",
                *TINY,
                *weights,
                "MODEL.GMM.NUM_COMPONENTS",
                "2",
            ],
            tiny_digitscapes,
            config,
            "tools/fit_posthoc_gmm.py",
            300,
        )
        posthoc_out = tmp_path / "posthoc"
        _run(
            [
                "--eval-only",
                *TINY,
                "MODEL.WEIGHTS",
                str(out / "model_final.pth"),
                "OUTPUT_DIR",
                str(posthoc_out),
                "TEST.POSTHOC_GMM",
                str(gmm_file),
            ],
            tiny_digitscapes,
            config,
        )
        posthoc = json.loads((posthoc_out / "inference" / "metrics.json").read_text())
        assert 0.0 <= posthoc["digitscapes_val"]["sem_seg"]["mIoU"] <= 100.0
        assert set(k.split("/")[0] for k in posthoc["digitscapes_anomaly_val"]["anomaly"]) == {"gmm"}

    # --resume continues from the last checkpoint instead of starting over
    log = _run(["--resume", *TINY, "SOLVER.MAX_ITER", "6", "OUTPUT_DIR", str(out)], tiny_digitscapes, config)
    assert "Starting training from iteration 4" in log

    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    assert "optimizer" in checkpoint["trainer"]["_trainer"]  # SGD / AdamW state survives a resume
    hooks = checkpoint["trainer"]["hooks"]
    assert "RNGStateHook" in hooks
    if "gmmseg" in config.name:
        mixtures = (
            "sem_seg_head.predictor.class_predictor.gmm.means"  # Mask2Former: query mixtures
            if "mask2former" in config.name
            else "sem_seg_head.gmm_predictor.gmm.means"
        )
        assert mixtures in checkpoint["model"]
        assert int(hooks["GMMEMHook"]["memory.count"].sum()) > 0
        assert "GMM memory restored" in log
    else:
        assert "GMMEMHook" not in hooks


@pytest.mark.slow
def test_ablation_variants_train(tiny_digitscapes, tmp_path):
    """The paper's ablations as config keys: no memory (MEMORY_CAPACITY 0) and the discriminative variant
    (FIT backprop: the mixtures are parameters, no EM hook)."""
    config = CONFIGS / "deeplabv3plus_R18_gmmseg.yaml"
    out = tmp_path / "batch_only"
    _run(
        [*TINY, "DATASETS.TEST", "()", "MODEL.GMM.MEMORY_CAPACITY", "0", "MODEL.GMM.UPDATE_INTERVAL", "2"]
        + ["OUTPUT_DIR", str(out)],
        tiny_digitscapes,
        config,
    )
    hooks = torch.load(out / "model_final.pth", weights_only=True)["trainer"]["hooks"]
    online = hooks["GMMEMHook"]
    assert online["memory.features"].shape[2] == 2 * 20  # room for UPDATE_INTERVAL steps of MEMORY_PER_STEP
    assert int(online["memory.count"].sum()) == 0  # emptied by the M-step after the last iteration

    out = tmp_path / "backprop"
    _run(
        [*TINY, "DATASETS.TEST", "()", "MODEL.GMM.FIT", "backprop", "OUTPUT_DIR", str(out)],
        tiny_digitscapes,
        config,
    )
    checkpoint = torch.load(out / "model_final.pth", weights_only=True)
    assert "GMMEMHook" not in checkpoint["trainer"]["hooks"]
    assert "sem_seg_head.gmm_predictor.gmm.means" in checkpoint["model"]


@pytest.mark.slow
def test_bad_override_fails_at_start_naming_the_key(tiny_digitscapes, tmp_path):
    env = {**os.environ, "DETECTRON2_DATASETS": str(tiny_digitscapes)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "train_net.py"),
            "--config-file",
            str(CONFIG),
            "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
            "5",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5 is invalid" in proc.stderr
    assert not list(tmp_path.iterdir())  # failed before writing anything


@pytest.mark.slow
@pytest.mark.parametrize("config", ["deeplabv3plus_R18_softmax.yaml", "mask2former_R18_gmmseg.yaml"])
def test_two_cpu_processes_train_and_evaluate(tiny_digitscapes, tmp_path, config):
    out = tmp_path / "ddp"
    log = _run(
        ["--num-gpus", "2", "--dist-url", "auto", *TINY, "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)],
        tiny_digitscapes,
        CONFIGS / config,
    )
    assert "world size: 2" in log.lower() or "Rank of current process: 0. World size: 2" in log
    metrics = json.loads((out / "inference" / "metrics.json").read_text())["digitscapes_val"]["sem_seg"]
    assert 0.0 <= metrics["mIoU"] <= 100.0
    assert (out / "model_final.pth").is_file()
