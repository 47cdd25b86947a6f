"""Test helpers shared by the tests of the heads and backbones beyond DeepLabV3+ and FPN (test_segformer.py,
test_upernet.py, test_ocrnet.py, test_hrnet.py): their DigitScapes configs and batches, the weight
converters in tools/, the float64 check of converted weights against a reference in the official
structure, the posteriors a built model infers, and a short GMMSegTrainer run. In one place so that
every family is checked the same way; each test keeps the assertions that are its own."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import write_folder_dataset
from detectron2.checkpoint import DetectionCheckpointer
from torch import Tensor, nn

from gmmseg import load_cfg, validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.data.folder_dataset import register_folder_dataset
from gmmseg.engine import GMMSegTrainer

REPO = Path(__file__).resolve().parent.parent
DIGITSCAPES = REPO / "configs" / "digitscapes"
NUM_CLASSES = 12  # DigitScapes
NO_DATASETS = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]


def cfg_without_datasets(path: Path, *opts):
    """The config at ``path`` with ``opts``, without its datasets (nothing needs registering)."""
    return load_cfg(path, [*NO_DATASETS, *opts])


def validated_cfg(path: Path):
    """The config at ``path`` without its datasets, validated (ConfigValueError if it is not valid)."""
    cfg = cfg_without_datasets(path)
    validate_gmmseg_config(cfg)
    return cfg


def digitscapes_cfg(config: str, *opts):
    """A DigitScapes config, without its datasets."""
    return cfg_without_datasets(DIGITSCAPES / config, *opts)


def batch(n: int = 2, size: int = 64, seed: int = 0) -> list[dict]:
    """``n`` random DigitScapes-sized training inputs (uint8 image, labels of the 12 classes)."""
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, NUM_CLASSES, (size, size), generator=g),
        }
        for _ in range(n)
    ]


def load_tool(name: str) -> ModuleType:
    """The script ``tools/<name>.py`` as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def assert_invalid(cfg, key: str) -> None:
    """Validating ``cfg`` raises ConfigValueError naming ``key``."""
    with pytest.raises(ConfigValueError) as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == key


def assert_converted_features(
    backbone: nn.Module, checkpoint: Path, reference: nn.Module
) -> tuple[Tensor, dict[str, Tensor]]:
    """``backbone`` (float64, eval), every parameter NaN so that one the converted ``checkpoint`` does not
    set stays NaN, loaded by DetectionCheckpointer as Detectron2 loads ``MODEL.WEIGHTS``: on a float64
    input its feature maps equal ``reference``'s outputs (1e-10). Returns the input and the features, for
    each test's check that the comparison is sharp."""
    model = nn.Module()
    model.backbone = backbone
    with torch.no_grad():
        for param in model.backbone.parameters():
            param.fill_(float("nan"))  # anything the checkpoint does not set stays NaN
    DetectionCheckpointer(model).load(str(checkpoint))
    x = torch.randn(2, 3, 64, 96, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model.backbone(x)
        expected = reference(x)
    for got, want in zip(ours.values(), expected):
        assert got.shape == want.shape and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    return x, ours


def assert_posteriors(model: nn.Module, image: Tensor, gmm: bool) -> dict:
    """Inference of ``model`` (in eval mode) on ``image`` asked at 70 x 90: posteriors of the 12 classes
    summing to 1 and, for a GMMSeg model only, a finite anomaly map. Returns the output."""
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 70, "width": 90}])
    assert out["sem_seg"].shape == (NUM_CLASSES, 70, 90)
    torch.testing.assert_close(out["sem_seg"].sum(0), torch.ones(70, 90))
    assert ("anomaly" in out) == gmm
    if gmm:
        assert out["anomaly"].shape == (70, 90) and torch.isfinite(out["anomaly"]).all()
    return out


def train_gmm_briefly(tmp_path: Path, name: str, config: str, *opts) -> tuple[GMMSegTrainer, dict]:
    """Three iterations of GMMSegTrainer (batch 2, 32-pixel images of a 3-class folder dataset ``name``) on
    the DigitScapes GMMSeg ``config`` with ``opts``: the M-step moves the means and the final checkpoint
    holds them. Returns the trainer and the checkpoint's model state."""
    dataset = write_folder_dataset(tmp_path, name, {"train": 4}, size=(32, 64), num_classes=3)
    register_folder_dataset(dataset)
    cfg = digitscapes_cfg(config)
    cfg.merge_from_list(
        ["DATASETS.TRAIN", (f"{name}_train",), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3]
        + ["SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3, "SOLVER.WARMUP_ITERS", 1]
        + ["SOLVER.CHECKPOINT_PERIOD", 100, "INPUT.MIN_SIZE_TRAIN", (32,)]
        + ["MODEL.GMM.UPDATE_INTERVAL", 2, "MODEL.GMM.MEMORY_CAPACITY", 50]
        + ["MODEL.GMM.ENQUEUE_CORRECT_ONLY", False]  # an untrained model classifies few pixels right
        + ["OUTPUT_DIR", str(tmp_path / "out"), *opts]
    )
    validate_gmmseg_config(cfg)
    trainer = GMMSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.model.sem_seg_head
    means = head.gmm_predictor.gmm.means.clone()
    trainer.train()
    assert not torch.equal(head.gmm_predictor.gmm.means, means)
    checkpoint = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)["model"]
    assert "sem_seg_head.gmm_predictor.gmm.means" in checkpoint
    return trainer, checkpoint
