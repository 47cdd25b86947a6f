"""GMMSeg on any head by one key (MODEL.GMM.ENABLED): Detectron2's SemSegFPNHead, DeepLabV3PlusHead and
DeepLabV3Head and a head defined here are converted, train with the online EM and return the anomaly map;
the named GMM heads are the same model (class, parameter names, outputs); the contract is enforced."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import write_folder_dataset
from detectron2.layers import Conv2d
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY, build_backbone, build_model
from detectron2.modeling.meta_arch.semantic_seg import SemSegFPNHead
from detectron2.projects.deeplab import DeepLabV3Head, DeepLabV3PlusHead
from torch import nn

from gmmseg import load_cfg, validate_gmmseg_config
from gmmseg.config_validation import ConfigValueError
from gmmseg.data.folder_dataset import register_folder_dataset
from gmmseg.engine import GMMSegTrainer
from gmmseg.engine.hooks import GMMEMHook
from gmmseg.modeling import (
    GMMDeepLabV3PlusHead,
    GMMHead,
    GMMPredictor,
    GMMSemSegFPNHead,
    build_sem_seg_head,
    convert_head_to_gmm,
)
from gmmseg.modeling.gmm_head import DecoderTap

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digitscapes"
NUM_CLASSES = 12


@SEM_SEG_HEADS_REGISTRY.register()  # a name no other test registers (the registry is process-global)
class TinyUserHeadOfGMMKeyTest(nn.Module):
    """A user's head of Detectron2's contract: a 3x3 conv "decoder", then the 1x1 ``predictor``; its
    forward computes the softmax loss (training) or the upsampled logits (inference) after it."""

    def __init__(self, cfg, input_shape) -> None:
        super().__init__()
        self.in_feature = cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES[-1]
        shape = input_shape[self.in_feature]
        self.common_stride = shape.stride
        self.loss_weight = cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT
        self.ignore_value = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        self.decoder = Conv2d(shape.channels, 16, kernel_size=3, padding=1, activation=F.relu)
        self.predictor = nn.Conv2d(16, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, kernel_size=1)

    def forward(self, features, targets=None):
        x = self.predictor(self.decoder(features[self.in_feature]))
        x = F.interpolate(x, scale_factor=self.common_stride, mode="bilinear", align_corners=False)
        if self.training:
            return None, {"loss_sem_seg": F.cross_entropy(x, targets, ignore_index=self.ignore_value)}
        return x, {}


CUSTOM_HEAD = TinyUserHeadOfGMMKeyTest.__name__


def _cfg(config: str, *opts):
    return load_cfg(CONFIGS / config, ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts])


# a head name -> the softmax config and overrides that build it with the key on
KEYED = {
    "DeepLabV3PlusHead": ("deeplabv3plus_R18_softmax.yaml", ()),
    "SemSegFPNHead": ("fpn_R18_softmax.yaml", ()),
    # ASPP on res4 (stride 16) and straight to the classifier; its channels are CONVS_DIM (both 64)
    "DeepLabV3Head": (
        "deeplabv3plus_R18_softmax.yaml",
        ("MODEL.SEM_SEG_HEAD.NAME", "DeepLabV3Head", "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res4"])
        + ("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 16),
    ),
    CUSTOM_HEAD: (
        "deeplabv3plus_R18_softmax.yaml",
        ("MODEL.SEM_SEG_HEAD.NAME", CUSTOM_HEAD, "MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res4"]),
    ),
}
BASES = {
    "DeepLabV3PlusHead": DeepLabV3PlusHead,
    "SemSegFPNHead": SemSegFPNHead,
    "DeepLabV3Head": DeepLabV3Head,
    CUSTOM_HEAD: TinyUserHeadOfGMMKeyTest,
}


def _keyed_cfg(name: str, *opts):
    config, overrides = KEYED[name]
    return _cfg(config, *overrides, "MODEL.GMM.ENABLED", True, *opts)


def _batch(n: int = 2, size: int = 64, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
            "sem_seg": torch.randint(0, NUM_CLASSES, (size, size), generator=g),
            "height": size,
            "width": size,
        }
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", list(KEYED))
def test_key_converts_the_registered_head(name):
    """The head keeps its class (as a base) and decoder, its classifier becomes the GMM predictor: the GMM
    losses and the EM batch in training, the GMM anomaly map at inference."""
    cfg = _keyed_cfg(name)
    validate_gmmseg_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.sem_seg_head
    assert isinstance(head, BASES[name]) and isinstance(head, GMMHead)
    assert type(head).__name__ == f"GMM{BASES[name].__name__}"
    assert isinstance(head.predictor, DecoderTap) and isinstance(head.gmm_predictor, GMMPredictor)
    assert head.gmm_predictor.num_classes == NUM_CLASSES
    keys = set(model.state_dict())
    assert "sem_seg_head.gmm_predictor.gmm.means" in keys
    assert not any(k.startswith("sem_seg_head.predictor.") for k in keys)  # the softmax weights are gone

    model.train()
    received = []
    head.gmm_predictor.em_observer = received.append
    losses = model(_batch())
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
    sum(losses.values()).backward()
    assert head.gmm_predictor.projection.weight.grad.abs().sum() > 0
    assert len(received) == 1 and len(received[0].labels) > 0  # one EM batch per step

    model.eval()
    inputs = _batch(n=1)
    inputs[0]["height"], inputs[0]["width"] = 80, 96
    with torch.no_grad():
        (out,) = model(inputs)
    assert out["sem_seg"].shape == (NUM_CLASSES, 80, 96) and out["anomaly"].shape == (80, 96)
    assert list(out["anomaly_scores"]) == ["gmm"] and torch.isfinite(out["anomaly"]).all()
    assert not head.predictor.stop  # disarmed after the forward
    x = torch.zeros(1, 8, 2, 2)
    assert head.predictor(x) is x  # outside the GMM forward the tap is the identity (layers() works)


@pytest.mark.parametrize(
    "name, named_head",
    [("DeepLabV3PlusHead", GMMDeepLabV3PlusHead), ("SemSegFPNHead", GMMSemSegFPNHead)],
)
def test_named_gmm_heads_are_the_converted_heads(name, named_head):
    """GMMDeepLabV3PlusHead / GMMSemSegFPNHead configs and the key on their softmax twins build one class
    with the same parameter names (checkpoints load both ways) and the same outputs for the same weights."""
    gmm_config = "deeplabv3plus_R18_gmmseg.yaml" if name == "DeepLabV3PlusHead" else "fpn_R18_gmmseg.yaml"
    torch.manual_seed(0)
    named = build_model(_cfg(gmm_config))
    torch.manual_seed(1)
    keyed = build_model(_keyed_cfg(name))
    assert type(named.sem_seg_head) is type(keyed.sem_seg_head) is named_head
    assert list(named.state_dict()) == list(keyed.state_dict())
    named.load_state_dict(keyed.state_dict())
    named.eval()
    keyed.eval()
    with torch.no_grad():
        a, b = named(_batch(n=1))[0], keyed(_batch(n=1))[0]
    assert torch.equal(a["sem_seg"], b["sem_seg"]) and torch.equal(a["anomaly"], b["anomaly"])


def test_build_sem_seg_head_follows_the_key():
    cfg = _keyed_cfg("SemSegFPNHead")
    shape = build_backbone(cfg).output_shape()
    assert isinstance(build_sem_seg_head(cfg, shape), GMMSemSegFPNHead)
    cfg.MODEL.GMM.ENABLED = False
    head = build_sem_seg_head(cfg, shape)
    assert type(head) is SemSegFPNHead and isinstance(head.predictor, nn.Conv2d)


class _NoClassifier(nn.Module):
    common_stride, loss_weight = 4, 1.0

    def __init__(self, predictor: nn.Module) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, features, targets=None):  # never calls self.predictor
        return features["x"], {}


def test_contract_is_enforced():
    cfg = _keyed_cfg("SemSegFPNHead")
    with pytest.raises(TypeError, match="1x1 nn.Conv2d"):
        convert_head_to_gmm(_NoClassifier(nn.Conv2d(8, NUM_CLASSES, 3)), cfg)
    with pytest.raises(ValueError, match="not the head's classifier"):
        convert_head_to_gmm(_NoClassifier(nn.Conv2d(8, 4, 1)), cfg)
    head = convert_head_to_gmm(_NoClassifier(nn.Conv2d(8, NUM_CLASSES, 1)), cfg)
    with pytest.raises(ValueError, match="GMM head already"):
        convert_head_to_gmm(head, cfg)
    with pytest.raises(RuntimeError, match="without calling self.predictor"):
        head.eval()({"x": torch.zeros(1, 8, 4, 4)})
    assert not head.predictor.stop


@pytest.mark.parametrize(
    "key, value",
    [
        ("MODEL.GMM.ENABLED", 1),  # not a bool
        ("MODEL.SEM_SEG_HEAD.NAME", "GMMDeepLabV3PlusHead"),  # a GMM head already
        ("MODEL.META_ARCHITECTURE", "SemanticSegmentor"),  # does not convert its head
        ("MODEL.META_ARCHITECTURE", "GMMMaskFormer"),
    ],
)
def test_key_is_refused_where_it_cannot_convert(key, value):
    cfg = _cfg("deeplabv3plus_R18_softmax.yaml", "MODEL.GMM.ENABLED", True)
    node, leaf = cfg, key.split(".")
    for part in leaf[:-1]:
        node = node[part]
    node[leaf[-1]] = value
    with pytest.raises(ConfigValueError) as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == "MODEL.GMM.ENABLED"


def test_posthoc_gmm_is_refused_with_the_key(tmp_path):
    path = tmp_path / "posthoc.pth"
    path.write_bytes(b"")
    cfg = _cfg("deeplabv3plus_R18_softmax.yaml", "MODEL.GMM.ENABLED", True, "TEST.POSTHOC_GMM", str(path))
    with pytest.raises(ConfigValueError) as info:
        validate_gmmseg_config(cfg)
    assert info.value.key == "TEST.POSTHOC_GMM"


def test_custom_head_trains_with_the_online_em(tmp_path, unique_name):
    """The head defined in this file, by the key alone, trains a few iterations with GMMSegTrainer: the
    EM hook fills the memory and moves the means, and inference gives the anomaly map."""
    dataset = write_folder_dataset(tmp_path, unique_name, {"train": 4}, size=(32, 48), num_classes=3)
    register_folder_dataset(dataset)
    cfg = _keyed_cfg(CUSTOM_HEAD)
    cfg.merge_from_list(
        ["DATASETS.TRAIN", (f"{unique_name}_train",), "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 3]
        + ["SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 3, "SOLVER.WARMUP_ITERS", 1]
        + ["SOLVER.CHECKPOINT_PERIOD", 100, "INPUT.MIN_SIZE_TRAIN", (32,), "INPUT.MIN_SIZE_TEST", 32]
        + ["MODEL.GMM.UPDATE_INTERVAL", 2, "MODEL.GMM.MEMORY_CAPACITY", 50]
        + ["OUTPUT_DIR", str(tmp_path / "out")]
    )
    validate_gmmseg_config(cfg)
    trainer = GMMSegTrainer(cfg)
    trainer.resume_or_load(resume=False)
    head = trainer.model.sem_seg_head
    assert isinstance(head, TinyUserHeadOfGMMKeyTest) and isinstance(head, GMMHead)
    means = head.gmm_predictor.gmm.means.clone()
    (hook,) = [h for h in trainer._hooks if isinstance(h, GMMEMHook)]
    trainer.train()
    assert int(hook.online.state_dict()["memory.count"].sum()) > 0
    assert not torch.equal(head.gmm_predictor.gmm.means, means)  # the M-step ran
    checkpoint = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)["model"]
    assert "sem_seg_head.gmm_predictor.gmm.means" in checkpoint
    model = trainer.model.eval()
    image = torch.randint(0, 256, (3, 32, 48), dtype=torch.uint8)
    with torch.no_grad():
        (out,) = model([{"image": image, "height": 32, "width": 48}])
    assert out["sem_seg"].shape == (3, 32, 48) and out["anomaly"].shape == (32, 48)
    assert set(out["anomaly_scores"]) == {"gmm"}
