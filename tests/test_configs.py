"""The YAML configs under configs/: they load, softmax/GMMSeg pairs differ only in the head (and, for the
public datasets, the GMMSeg configs' class-balanced sampler), the paper configs carry the paper's settings,
and every model builds on CPU with the right number of classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model

from gmmseg import add_gmmseg_config
from gmmseg import modeling as _modeling  # noqa: F401  (registers the heads and meta-architectures)
from gmmseg.data.datasets import register_all_public_datasets

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
ALL_YAMLS = sorted(CONFIGS.rglob("*.yaml"))
LEAFS = [p for p in ALL_YAMLS if not p.name.startswith("Base-")]
SOFTMAX_LEAFS = [p for p in LEAFS if p.stem.endswith("_softmax")]
GMMSEG_LEAFS = [p for p in LEAFS if p.stem.endswith("_gmmseg")]

# What the paper configs must say, per dataset folder (classes, crop, schedule, datasets).
PAPER = {
    "cityscapes": {
        "classes": 19,
        "crop": [768, 768],
        "max_iter": 90000,
        "train": ("cityscapes_fine_sem_seg_train",),
        "test": ("cityscapes_fine_sem_seg_val",),
        "builtin": True,
    },
    "ade20k": {
        "classes": 150,
        "crop": [512, 512],
        "max_iter": 160000,
        "train": ("ade20k_sem_seg_train",),
        "test": ("ade20k_sem_seg_val",),
        "builtin": True,
    },
    "coco_stuff": {
        "classes": 171,
        "crop": [512, 512],
        "max_iter": 80000,
        "train": ("coco_2017_train_stuff_sem_seg",),
        "test": ("coco_2017_val_stuff_sem_seg",),
        "builtin": False,  # registered by a later issue
    },
}
PAPER_LEAFS = [p for p in LEAFS if p.parent.name in PAPER]
NON_PIXEL_HEADS = ("mask2former", "segformer", "upernet", "ocrnet")  # pairs with their own settings test
PIXEL_PAPER_LEAFS = [p for p in PAPER_LEAFS if not p.stem.startswith(NON_PIXEL_HEADS)]
MASK2FORMER_PAPER_LEAFS = [p for p in PAPER_LEAFS if p.stem.startswith("mask2former")]
SEGFORMER_PAPER_LEAFS = [p for p in PAPER_LEAFS if p.stem.startswith("segformer")]
UPERNET_PAPER_LEAFS = [p for p in PAPER_LEAFS if p.stem.startswith("upernet")]
# paper configs beyond the DeepLabV3+, FPN, Mask2Former and UperNet pairs every dataset has
EXTRA_PAPER_STEMS = {"cityscapes": {"segformer_B5_softmax", "segformer_B5_gmmseg"}}
# OCRNet / HRNetV2-W48: a pair on every dataset, and one on DigitScapes
OCRNET_PAPER_LEAFS = [p for p in PAPER_LEAFS if p.stem.startswith("ocrnet")]
OCRNET_STEMS = {"ocrnet_HRNetW48_softmax", "ocrnet_HRNetW48_gmmseg"}
for _name in PAPER:
    EXTRA_PAPER_STEMS[_name] = EXTRA_PAPER_STEMS.get(_name, set()) | OCRNET_STEMS
ARCHITECTURES = ("PosteriorSemanticSegmentor", "PosteriorMaskFormer", "GMMMaskFormer")
CLASSES = {"digitscapes": 12, **{name: spec["classes"] for name, spec in PAPER.items()}}
# softmax head -> its GMMSeg partner's head; SegFormerHead and UPerNetHead stay themselves and turn GMM by
# MODEL.GMM.ENABLED
HEAD_PAIRS = {
    "DeepLabV3PlusHead": "GMMDeepLabV3PlusHead",
    "SemSegFPNHead": "GMMSemSegFPNHead",
    "SegFormerHead": "SegFormerHead",
    "UPerNetHead": "UPerNetHead",
    "OCRHead": "OCRHead",
}
# The reference GMMSeg values (D, K, memory, per step, interval, momentum, Sinkhorn eps and iterations).
GMM_REFERENCE = {
    "EMBED_DIM": 64,
    "NUM_COMPONENTS": 5,
    "MEMORY_CAPACITY": 32000,
    "MEMORY_PER_STEP": 20,
    "UPDATE_INTERVAL": 5,
    "MEAN_MOMENTUM": 0.999,
    "SINKHORN_EPSILON": 0.05,
    "SINKHORN_ITERS": 3,
    "MEMORY_INIT": "random",  # the authors' queues start full of random unit vectors
}
SYNC_NORMS = ("SyncBN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N")


@pytest.fixture(scope="module", autouse=True)
def _public_datasets() -> None:
    """The paper's datasets registered as set-up registers them, so their metadata can be compared."""
    register_all_public_datasets()


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def load(path: Path) -> CfgNode:
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(str(path))
    return cfg


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def test_configs_exist():
    assert {p.parent.name for p in PAPER_LEAFS} == set(PAPER)
    for name in PAPER:
        stems = {p.stem for p in PAPER_LEAFS if p.parent.name == name}
        assert stems == {
            "deeplabv3plus_R101_softmax",
            "deeplabv3plus_R101_gmmseg",
            "fpn_R101_softmax",
            "fpn_R101_gmmseg",
            "mask2former_SwinL_softmax",
            "mask2former_SwinL_gmmseg",
            "upernet_SwinB_softmax",
            "upernet_SwinB_gmmseg",
        } | EXTRA_PAPER_STEMS.get(name, set()), name
    assert {p.stem for p in LEAFS if p.parent.name == "digitscapes"} >= {
        "mask2former_R18_softmax",
        "mask2former_R18_gmmseg",
        "segformer_B0_softmax",
        "segformer_B0_gmmseg",
        "upernet_R18_softmax",
        "upernet_R18_gmmseg",
        "ocrnet_HRNetW18_softmax",
        "ocrnet_HRNetW18_gmmseg",
    }


@pytest.mark.parametrize("path", ALL_YAMLS, ids=_id)
def test_config_merges(path):
    cfg = load(path)
    assert cfg.MODEL.META_ARCHITECTURE in ARCHITECTURES
    assert path.read_text().startswith("#"), f"{_id(path)} must start with a comment saying what it is"


def test_every_gmmseg_leaf_has_a_softmax_partner():
    softmax = {p.with_name(p.name.replace("_softmax", "_gmmseg")) for p in SOFTMAX_LEAFS}
    assert softmax == set(GMMSEG_LEAFS)


@pytest.mark.parametrize("softmax_path", SOFTMAX_LEAFS, ids=_id)
def test_pair_differs_only_in_head(softmax_path):
    gmm_path = softmax_path.with_name(softmax_path.name.replace("_softmax", "_gmmseg"))
    assert gmm_path.is_file(), f"{_id(softmax_path)} has no GMMSeg partner {_id(gmm_path)}"
    softmax, gmm = flatten(load(softmax_path)), flatten(load(gmm_path))
    assert softmax.keys() == gmm.keys()
    differing = {k for k in softmax if softmax[k] != gmm[k]}
    # per-pixel models swap the head; Mask2Former swaps the meta-architecture and the transformer decoder
    swapped = (
        "MODEL.SEM_SEG_HEAD.NAME",
        "MODEL.META_ARCHITECTURE",
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
    )
    allowed = {k for k in differing if k in (*swapped, "OUTPUT_DIR") or k.startswith("MODEL.GMM.")}
    if softmax_path.parent.name in PAPER:  # the authors' protocol: GMMSeg trains with their sampler
        assert (softmax["DATALOADER.SAMPLER_TRAIN"], gmm["DATALOADER.SAMPLER_TRAIN"]) == (
            "TrainingSampler",
            "ClassBalancedSampler",
        )
        allowed.add("DATALOADER.SAMPLER_TRAIN")
    assert differing == allowed, (
        f"{_id(softmax_path)} and {_id(gmm_path)} differ in {sorted(differing - allowed)}"
    )
    if softmax["MODEL.META_ARCHITECTURE"] == "PosteriorSemanticSegmentor":
        assert HEAD_PAIRS[softmax["MODEL.SEM_SEG_HEAD.NAME"]] == gmm["MODEL.SEM_SEG_HEAD.NAME"]
        assert gmm["MODEL.META_ARCHITECTURE"] == "PosteriorSemanticSegmentor"
        assert not softmax["MODEL.GMM.ENABLED"]
        # a head of the same name is a softmax head made GMM by the one key
        same_head = softmax["MODEL.SEM_SEG_HEAD.NAME"] == gmm["MODEL.SEM_SEG_HEAD.NAME"]
        assert gmm["MODEL.GMM.ENABLED"] == same_head
    else:
        assert (softmax["MODEL.META_ARCHITECTURE"], gmm["MODEL.META_ARCHITECTURE"]) == (
            "PosteriorMaskFormer",
            "GMMMaskFormer",
        )
        assert gmm["MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME"] == "GMMMultiScaleMaskedTransformerDecoder"
    assert softmax["OUTPUT_DIR"] != gmm["OUTPUT_DIR"]


@pytest.mark.parametrize("path", PIXEL_PAPER_LEAFS, ids=_id)
def test_paper_config_settings(path):
    cfg, spec = load(path), PAPER[path.parent.name]
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == spec["classes"]
    assert cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255
    assert cfg.MODEL.DEVICE == "cuda"  # Detectron2's default
    assert cfg.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert cfg.MODEL.WEIGHTS.startswith("detectron2://")
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (spec["train"], spec["test"])
    assert cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute"
    assert list(cfg.INPUT.CROP.SIZE) == spec["crop"] and cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 1.0
    assert cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.POLY_LR_POWER == 0.9
    assert cfg.SOLVER.IMS_PER_BATCH == 16 and cfg.SOLVER.MAX_ITER == spec["max_iter"]
    assert cfg.OUTPUT_DIR == f"./output/{path.parent.name}/{path.stem}"
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        if spec["builtin"]:
            assert name in DatasetCatalog.list(), f"{name} is not one of Detectron2's builtin datasets"
        if name in DatasetCatalog.list():  # the class count and ignore label agree with the metadata
            meta = MetadataCatalog.get(name)
            assert len(meta.stuff_classes) == cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            assert meta.ignore_label == cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE


# Mask2Former's paper settings (Swin-L, ImageNet-22k 384) per dataset: crop, queries, iterations
MASK2FORMER_PAPER = {
    "cityscapes": {"crop": [512, 1024], "max_iter": 90000},
    "ade20k": {"crop": [640, 640], "max_iter": 160000},
    "coco_stuff": {"crop": [640, 640], "max_iter": 80000},
}


@pytest.mark.parametrize("path", MASK2FORMER_PAPER_LEAFS, ids=_id)
def test_paper_mask2former_settings(path):
    cfg, spec = load(path), PAPER[path.parent.name]
    m2f = MASK2FORMER_PAPER[path.parent.name]
    assert (
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == spec["classes"] and cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE == 255
    )
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (spec["train"], spec["test"])
    assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    swin = cfg.MODEL.SWIN
    assert (swin.EMBED_DIM, list(swin.DEPTHS), list(swin.NUM_HEADS), swin.WINDOW_SIZE) == (
        192,
        [2, 2, 18, 2],
        [6, 12, 24, 48],
        12,
    )
    assert cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 200 and cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert list(cfg.INPUT.CROP.SIZE) == m2f["crop"] and cfg.INPUT.COLOR_AUG_SSD
    # the paper: AdamW, lr 1e-4, weight decay 0.05, lr / 10 at 0.9 and 0.95 of training
    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY) == ("ADAMW", 1e-4, 0.05)
    assert solver.IMS_PER_BATCH == 16 and solver.MAX_ITER == m2f["max_iter"]
    assert solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and solver.GAMMA == 0.1
    assert list(solver.STEPS) == [int(0.9 * solver.MAX_ITER), int(0.95 * solver.MAX_ITER)]
    assert solver.BACKBONE_MULTIPLIER == 0.1 and solver.CLIP_GRADIENTS.CLIP_TYPE == "full_model"
    assert cfg.OUTPUT_DIR == f"./output/{path.parent.name}/{path.stem}"


@pytest.mark.parametrize("path", [p for p in GMMSEG_LEAFS if p.parent.name in PAPER], ids=_id)
def test_paper_gmmseg_configs_use_reference_gmm_values(path):
    defaults = get_cfg()
    add_gmmseg_config(defaults)
    gmm = load(path).MODEL.GMM
    reference = dict(GMM_REFERENCE)
    if path.stem.startswith("mask2former"):  # queries, not pixels, fill the memory (see the config)
        assert gmm.MEMORY_CAPACITY == 1000 and gmm.ENQUEUE_CORRECT_ONLY is False
        assert gmm.MEMORY_INIT == "empty"  # real queries only, as measured on DigitScapes
        gmm = gmm.clone()
        for key in ("MEMORY_CAPACITY", "ENQUEUE_CORRECT_ONLY", "MEMORY_INIT"):
            gmm[key] = defaults.MODEL.GMM[key]
            reference.pop(key, None)
    if gmm.ENABLED:  # the one key on a softmax head (SegFormerHead, UPerNetHead) instead of a GMM head's name
        gmm = gmm.clone()
        gmm.ENABLED = defaults.MODEL.GMM.ENABLED
    assert gmm == defaults.MODEL.GMM
    assert {k: gmm[k] for k in reference} == reference


@pytest.mark.parametrize("path", LEAFS, ids=_id)
def test_model_builds_on_cpu(path):
    cfg = load(path)
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    for key in ("MODEL.RESNETS.NORM", "MODEL.SEM_SEG_HEAD.NORM", "MODEL.FPN.NORM", "MODEL.HRNET.NORM"):
        if flatten(cfg)[key] in SYNC_NORMS:  # SyncBN needs a process group (and GPUs) to train
            opts += [key, "BN"]
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    head, num_classes = model.sem_seg_head, CLASSES[path.parent.name]
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    keyed = cfg.MODEL.GMM.ENABLED  # the key converts the named head: its class becomes GMM<Name>
    assert type(head).__name__ == ("GMM" if keyed else "") + cfg.MODEL.SEM_SEG_HEAD.NAME
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    if cfg.MODEL.META_ARCHITECTURE == "GMMMaskFormer":  # C + 1 mixtures: the last one is "no object"
        gmm, predictor = cfg.MODEL.GMM, head.predictor.class_predictor
        assert predictor.num_classes == num_classes + 1 and not hasattr(head.predictor, "class_embed")
        assert tuple(predictor.gmm.means.shape) == (num_classes + 1, gmm.NUM_COMPONENTS, gmm.EMBED_DIM)
    elif cfg.MODEL.META_ARCHITECTURE == "PosteriorMaskFormer":
        assert head.predictor.class_embed.out_features == num_classes + 1
    elif cfg.MODEL.SEM_SEG_HEAD.NAME.startswith("GMM") or keyed:
        gmm = cfg.MODEL.GMM
        assert head.gmm_predictor.num_classes == num_classes
        assert tuple(head.gmm_predictor.gmm.means.shape) == (num_classes, gmm.NUM_COMPONENTS, gmm.EMBED_DIM)
    else:
        assert head.predictor.out_channels == num_classes
