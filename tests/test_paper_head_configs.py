"""The paper configs of the heads beyond DeepLabV3+, FPN and Mask2Former (SegFormer, UperNet, OCRNet):
each carries its family's published settings (the authors' or mmsegmentation's config, with the paper's
crops and test protocol); configs/README.md lists where they differ. The checks every config gets (pairs,
builds, GMM values) are in test_configs.py."""

from __future__ import annotations

import pytest
from test_configs import OCRNET_PAPER_LEAFS, PAPER, SEGFORMER_PAPER_LEAFS, UPERNET_PAPER_LEAFS, _id, load

from gmmseg.data.datasets import register_all_public_datasets


@pytest.fixture(scope="module", autouse=True)
def _public_datasets() -> None:
    """The paper's datasets registered as set-up registers them, so their metadata can be compared."""
    register_all_public_datasets()


def _assert_segformer_adamw(solver) -> None:
    """SegFormer's AdamW schedule, which mmsegmentation's UperNet-Swin configs use too: lr 6e-5, weight
    decay 0.01 (none on norms), poly decay of power 1 after a linear warm-up of 1500 iterations."""
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM) == (
        "ADAMW",
        6e-5,
        0.01,
        0.0,
    )
    assert (solver.LR_SCHEDULER_NAME, solver.POLY_LR_POWER) == ("WarmupPolyLR", 1.0)
    assert (solver.WARMUP_METHOD, solver.WARMUP_ITERS, solver.WARMUP_FACTOR) == ("linear", 1500, 1e-6)


@pytest.mark.parametrize("path", SEGFORMER_PAPER_LEAFS, ids=_id)
def test_paper_segformer_settings(path):
    """The GMMSeg authors' SegFormer-B5 Cityscapes run (segformer_mit-b5_gmmseg_768x768_80k_cityscapes) with
    converted MiT-B5 weights; configs/README.md lists where Detectron2 still differs from it."""
    cfg, spec = load(path), PAPER[path.parent.name]
    head = cfg.MODEL.SEM_SEG_HEAD
    assert (head.NUM_CLASSES, head.IGNORE_VALUE) == (spec["classes"], 255)
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (spec["train"], spec["test"])
    assert cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == "mit_b5_d2.pth"
    assert cfg.MODEL.BACKBONE.NAME == "D2MixTransformer"
    assert (cfg.MODEL.MIT.VARIANT, cfg.MODEL.MIT.DROP_PATH_RATE) == ("B5", 0.1)
    assert (head.NAME, head.CONVS_DIM, head.DROPOUT, head.NORM) == ("SegFormerHead", 768, 0.1, "SyncBN")
    assert list(head.IN_FEATURES) == ["res2", "res3", "res4", "res5"] and head.COMMON_STRIDE == 4
    crop = cfg.INPUT.CROP
    assert (list(crop.SIZE), crop.TYPE, crop.SINGLE_CATEGORY_MAX_AREA) == ([768, 768], "absolute", 0.75)
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING) == ((512, 2048), "range")
    assert cfg.INPUT.COLOR_AUG_SSD and cfg.INPUT.RANDOM_FLIP == "horizontal"
    solver = cfg.SOLVER
    _assert_segformer_adamw(solver)
    assert solver.HEAD_MULTIPLIER == 10 and solver.BACKBONE_MULTIPLIER == 1
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER) == (16, 80000)
    window = cfg.TEST.SLIDING_WINDOW
    assert window.ENABLED and (list(window.SIZE), list(window.STRIDE)) == ([768, 768], [512, 512])
    assert cfg.OUTPUT_DIR == f"./output/{path.parent.name}/{path.stem}"


# UperNet-Swin per dataset (mmsegmentation's UperNet-Swin-B, ImageNet-1k 224, window 7, with the paper's
# crops): crop, iterations, sliding windows (Cityscapes) or whole images at short side 512
UPERNET_PAPER = {
    "cityscapes": {"crop": [768, 768], "short": (512, 2048), "max_iter": 80000, "window": True, "test": 1024},
    "ade20k": {"crop": [512, 512], "short": (256, 1024), "max_iter": 160000, "window": False, "test": 512},
    "coco_stuff": {"crop": [512, 512], "short": (256, 1024), "max_iter": 80000, "window": False, "test": 512},
}


@pytest.mark.parametrize("path", UPERNET_PAPER_LEAFS, ids=_id)
def test_paper_upernet_settings(path):
    """The paper's UperNet-Swin rows: mmsegmentation's UperNet-Swin-B (UPerHead with 512 channels, pool
    scales 1/2/3/6, auxiliary FCN head on res4 at 0.4) and its AdamW solver; configs/README.md lists where
    Detectron2 still differs from it."""
    cfg, spec, upernet = load(path), PAPER[path.parent.name], UPERNET_PAPER[path.parent.name]
    head = cfg.MODEL.SEM_SEG_HEAD
    assert (head.NUM_CLASSES, head.IGNORE_VALUE) == (spec["classes"], 255)
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (spec["train"], spec["test"])
    assert cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == "swin_base_patch4_window7_224.pkl"
    assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer"
    swin = cfg.MODEL.SWIN
    assert (swin.EMBED_DIM, list(swin.DEPTHS), list(swin.NUM_HEADS), swin.WINDOW_SIZE) == (
        128,
        [2, 2, 18, 2],
        [4, 8, 16, 32],
        7,
    )
    assert (swin.DROP_PATH_RATE, swin.APE, swin.PRETRAIN_IMG_SIZE) == (0.3, False, 224)
    assert (head.NAME, head.CONVS_DIM, head.DROPOUT, head.NORM) == ("UPerNetHead", 512, 0.1, "SyncBN")
    assert list(head.IN_FEATURES) == ["res2", "res3", "res4", "res5"] and head.COMMON_STRIDE == 4
    aux = cfg.MODEL.UPERNET
    assert list(aux.POOL_SCALES) == [1, 2, 3, 6]
    assert (aux.AUX_IN_FEATURE, aux.AUX_CHANNELS, aux.AUX_LOSS_WEIGHT) == ("res4", 256, 0.4)
    crop = cfg.INPUT.CROP
    assert (list(crop.SIZE), crop.TYPE, crop.SINGLE_CATEGORY_MAX_AREA) == (upernet["crop"], "absolute", 0.75)
    # mmseg's Resize(ratio_range=(0.5, 2.0)): the short side uniform in [0.5, 2] x 1024 (Cityscapes) or 512
    assert (tuple(cfg.INPUT.MIN_SIZE_TRAIN), cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING) == (upernet["short"], "range")
    assert cfg.INPUT.COLOR_AUG_SSD and cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.INPUT.MIN_SIZE_TEST == upernet["test"]
    solver = cfg.SOLVER
    _assert_segformer_adamw(solver)
    assert solver.WEIGHT_DECAY_EMBED == 0.0 and solver.HEAD_MULTIPLIER == solver.BACKBONE_MULTIPLIER == 1
    assert (solver.IMS_PER_BATCH, solver.MAX_ITER) == (16, upernet["max_iter"])
    window = cfg.TEST.SLIDING_WINDOW
    assert window.ENABLED == upernet["window"]
    if window.ENABLED:
        assert (list(window.SIZE), list(window.STRIDE)) == ([768, 768], [512, 512])
    assert cfg.OUTPUT_DIR == f"./output/{path.parent.name}/{path.stem}"


# mmsegmentation's ocrnet_hr48 schedules: 80k on Cityscapes (and here COCO-Stuff), 160k on ADE20K
OCRNET_MAX_ITER = {"cityscapes": 80000, "ade20k": 160000, "coco_stuff": 80000}


@pytest.mark.parametrize("path", OCRNET_PAPER_LEAFS, ids=_id)
def test_paper_ocrnet_settings(path):
    """OCRNet / HRNetV2-W48 with mmsegmentation's ocrnet_hr48 model and solver (SGD lr 0.01, momentum 0.9,
    weight decay 5e-4, poly 0.9, auxiliary loss 0.4, SyncBN) on the paper's crops and test protocol
    (Cityscapes 768x768 with 768 / 512 windows; ADE20K and COCO-Stuff 512x512, whole images at short
    side 512), converted official HRNet-W48-C weights; configs/README.md lists the differences."""
    cfg, spec = load(path), PAPER[path.parent.name]
    head, cityscapes = cfg.MODEL.SEM_SEG_HEAD, path.parent.name == "cityscapes"
    assert (head.NUM_CLASSES, head.IGNORE_VALUE) == (spec["classes"], 255)
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (spec["train"], spec["test"])
    assert cfg.MODEL.DEVICE == "cuda" and cfg.MODEL.WEIGHTS == "hrnetv2_w48_d2.pth"
    hrnet = cfg.MODEL.HRNET
    assert (cfg.MODEL.BACKBONE.NAME, hrnet.VARIANT, hrnet.NORM) == ("D2HRNet", "W48", "SyncBN")
    assert (head.NAME, head.NORM, head.DROPOUT, head.COMMON_STRIDE) == ("OCRHead", "SyncBN", 0.0, 4)
    assert list(head.IN_FEATURES) == ["res2", "res3", "res4", "res5"]
    ocr = cfg.MODEL.OCR
    assert (ocr.CHANNELS, ocr.KEY_CHANNELS, ocr.AUX_LOSS_WEIGHT) == (512, 256, 0.4)
    crop = cfg.INPUT.CROP
    assert (list(crop.SIZE), crop.TYPE, crop.SINGLE_CATEGORY_MAX_AREA) == (spec["crop"], "absolute", 0.75)
    short = (512, 2048) if cityscapes else (256, 1024)
    assert (cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING) == (short, "range")
    assert cfg.INPUT.COLOR_AUG_SSD and cfg.INPUT.RANDOM_FLIP == "horizontal"
    assert cfg.INPUT.MIN_SIZE_TEST == (1024 if cityscapes else 512)
    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.MOMENTUM) == ("SGD", 0.01, 0.9)
    assert solver.WEIGHT_DECAY == solver.WEIGHT_DECAY_NORM == 0.0005
    assert solver.HEAD_MULTIPLIER == 1 and solver.BACKBONE_MULTIPLIER == 1
    assert (solver.LR_SCHEDULER_NAME, solver.POLY_LR_POWER, solver.WARMUP_ITERS) == ("WarmupPolyLR", 0.9, 0)
    assert solver.IMS_PER_BATCH == 16 and solver.MAX_ITER == OCRNET_MAX_ITER[path.parent.name]
    window = cfg.TEST.SLIDING_WINDOW
    assert window.ENABLED == cityscapes
    if cityscapes:
        assert (list(window.SIZE), list(window.STRIDE)) == ([768, 768], [512, 512])
    assert cfg.OUTPUT_DIR == f"./output/{path.parent.name}/{path.stem}"
