"""UperNet (UPerNetHead): the PPM + FPN decoder wired as UperNet (checked against an independent composition
of its layers), output stride 4 on ResNet-18 and on a tiny Swin, the published parameter counts of
UperNet-Swin, the auxiliary FCN head, softmax and GMMSeg (by the one key MODEL.GMM.ENABLED) through
PosteriorSemanticSegmentor, and the config rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from head_testing import (
    NUM_CLASSES,
    REPO,
    assert_invalid,
    assert_posteriors,
    batch,
    cfg_without_datasets,
    digitscapes_cfg,
    train_gmm_briefly,
    validated_cfg,
)

from gmmseg import validate_gmmseg_config
from gmmseg.engine.hooks import GMMEMHook
from gmmseg.modeling import GMMHead, GMMPredictor, UPerNetHead
from gmmseg.modeling.gmm_head import DecoderTap
from gmmseg.modeling.upernet_head import PyramidPooling

STAGES = ("res2", "res3", "res4", "res5")
# a Swin small enough for CPU tests: channels 16/32/64/128, one block per stage, 4x4 windows
TINY_SWIN = [
    "MODEL.BACKBONE.NAME",
    "D2SwinTransformer",
    "MODEL.SWIN.EMBED_DIM",
    16,
    "MODEL.SWIN.DEPTHS",
    [1, 1, 1, 1],
    "MODEL.SWIN.NUM_HEADS",
    [1, 2, 2, 4],
    "MODEL.SWIN.WINDOW_SIZE",
    4,
]
BACKBONES = {"R18": [], "tiny-Swin": TINY_SWIN}
FIRST_LAYER = {"R18": "backbone.stem.conv1.weight", "tiny-Swin": "backbone.patch_embed.proj.weight"}


def _features(channels=(8, 16, 24, 32), size=(32, 48), n=2, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, w = size
    return {
        name: torch.randn(n, c, h // s, w // s, generator=g)
        for name, c, s in zip(STAGES, channels, (4, 8, 16, 32))
    }


def _shapes(channels=(8, 16, 24, 32)) -> dict[str, ShapeSpec]:
    return {name: ShapeSpec(channels=c, stride=s) for name, c, s in zip(STAGES, channels, (4, 8, 16, 32))}


def test_pyramid_pooling_grids_and_global_context():
    """One branch per scale, pooled to s x s; the output keeps the input's size, and a change in one
    corner reaches the opposite corner (the 1x1 grid), which a 3x3 conv alone could not."""
    torch.manual_seed(0)
    ppm = PyramidPooling(in_channels=8, channels=4, scales=(1, 2, 3, 6), norm="").eval()
    x = torch.randn(2, 8, 12, 18)
    pooled = ppm.pooled(x)
    assert [tuple(p.shape) for p in pooled] == [(2, 4, s, s) for s in (1, 2, 3, 6)]
    assert ppm.bottleneck.in_channels == 8 + 4 * 4 and ppm.bottleneck.kernel_size == (3, 3)
    with torch.no_grad():
        out = ppm(x)
        changed = x.clone()
        changed[:, :, 0, 0] += 10.0
        moved = ppm(changed)
    assert out.shape == (2, 4, 12, 18)
    assert not torch.allclose(out[:, :, -1, -1], moved[:, :, -1, -1])


def test_decoder_is_ppm_plus_top_down_fpn():
    """The decoder equals UperNet composed by hand from its layers: PPM on res5, 1x1 laterals, top-down
    sums from the coarsest (each adding the already-summed level above), 3x3 FPN convs but on the PPM
    level, all upsampled to res2 and concatenated finest first, the 3x3 fuse conv; the logits are the
    classifier on it. IN_FEATURES in any order."""
    torch.manual_seed(0)
    shapes = _shapes()
    head = UPerNetHead(
        {name: shapes[name] for name in ("res5", "res3", "res2", "res4")},
        num_classes=5,
        channels=16,
        common_stride=4,
    ).eval()
    assert head.in_features == list(STAGES)
    assert set(head.lateral_convs) == set(head.fpn_convs) == {"res2", "res3", "res4"}
    features = _features()

    def up(x, like):
        return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)

    with torch.no_grad():
        top = head.ppm(features["res5"])
        p4 = head.lateral_convs["res4"](features["res4"]) + up(top, features["res4"])
        p3 = head.lateral_convs["res3"](features["res3"]) + up(p4, features["res3"])
        p2 = head.lateral_convs["res2"](features["res2"]) + up(p3, features["res2"])
        levels = [
            head.fpn_convs["res2"](p2),
            head.fpn_convs["res3"](p3),
            head.fpn_convs["res4"](p4),
            top,
        ]
        expected = head.fuse(torch.cat([levels[0], *(up(x, levels[0]) for x in levels[1:])], dim=1))
        torch.testing.assert_close(head.decoder(features), expected)
        logits, losses = head(features)
    assert losses == {}
    want = F.interpolate(head.predictor(expected), scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(logits, want)


def test_convs_follow_mmsegmentation():
    """Every decoder conv: no bias, a BatchNorm, ReLU; kernels 1 (PPM branches, laterals) and 3 (PPM
    bottleneck, FPN, fuse); the classifier a biased 1x1 conv."""
    head = UPerNetHead(_shapes(), num_classes=5, channels=16, common_stride=4)
    convs = [*(b[1] for b in head.ppm.branches), *head.lateral_convs.values()]
    assert all(c.kernel_size == (1, 1) for c in convs)
    convs3 = [head.ppm.bottleneck, *head.fpn_convs.values(), head.fuse]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs3)
    for conv in convs + convs3:
        assert conv.bias is None and isinstance(conv.norm, torch.nn.BatchNorm2d)
        assert conv.activation is F.relu
    assert head.fuse.in_channels == 4 * 16 and head.predictor.kernel_size == (1, 1)
    assert head.predictor.bias is not None and head.aux_head is None  # no auxiliary head by default


@pytest.mark.parametrize("size, expected_millions", [("T", 60), ("B", 121)])
def test_swin_upernet_parameter_counts_match_the_swin_paper(size, expected_millions):
    """UperNet-Swin on ADE20K (150 classes, auxiliary head included) rounds to the Swin paper's Table 3:
    60M for Swin-T, 121M for Swin-B."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.NORM", "BN"]
    if size == "T":
        opts += ["MODEL.SWIN.EMBED_DIM", 96, "MODEL.SWIN.DEPTHS", [2, 2, 6, 2]]
        opts += ["MODEL.SWIN.NUM_HEADS", [3, 6, 12, 24]]
    cfg = cfg_without_datasets(REPO / "configs" / "ade20k" / "upernet_SwinB_softmax.yaml", *opts)
    model = build_model(cfg)
    assert model.sem_seg_head.aux_head is not None
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == expected_millions


def test_head_rejects_a_wrong_stride():
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.COMMON_STRIDE"):
        UPerNetHead(_shapes(), num_classes=3, channels=8, common_stride=8)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_output_stride_and_channels(backbone):
    """On both backbones the decoder gives CONVS_DIM channels at stride 4; inference logits are at the
    input's resolution."""
    cfg = digitscapes_cfg("upernet_R18_softmax.yaml", *BACKBONES[backbone])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    head = model.sem_seg_head
    assert isinstance(head, UPerNetHead) and head.in_features == list(STAGES)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        features = model.backbone(x)
        decoded = head.decoder(features)
        logits, _ = head(features)
    assert decoded.shape == (2, cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, 16, 24)
    assert logits.shape == (2, NUM_CLASSES, 64, 96)


@pytest.mark.parametrize("config", ["upernet_R18_softmax.yaml", "upernet_R18_gmmseg.yaml"])
@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_trains_and_infers_through_the_meta_architecture(backbone, config):
    """A training step gives finite losses (the auxiliary one too, softmax or GMM) and gradients down to
    the backbone's first layer; inference gives posteriors summing to 1 (GMMSeg: and the anomaly map),
    also by sliding windows."""
    cfg = digitscapes_cfg(config, *BACKBONES[backbone])
    validate_gmmseg_config(cfg)
    gmm = cfg.MODEL.GMM.ENABLED
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.sem_seg_head
    assert isinstance(head, UPerNetHead) and isinstance(head, GMMHead) == gmm
    model.train()
    losses = model(batch())
    expected = {"loss_sem_seg", "loss_sem_seg_aux"} | ({"loss_gmm_component"} if gmm else set())
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    params = dict(model.named_parameters())
    for name in (FIRST_LAYER[backbone], "sem_seg_head.ppm.branches.0.1.weight", "sem_seg_head.fuse.weight"):
        assert params[name].grad is not None and params[name].grad.abs().sum() > 0, name
    assert head.aux_head.classifier.weight.grad.abs().sum() > 0
    model.eval()
    image = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8)
    for window in (False, True):
        model.sliding_window, model.sliding_stride = ((64, 64), (32, 32)) if window else (None, None)
        out = assert_posteriors(model, image, gmm)
        assert list(out["anomaly_scores"]) == (["gmm"] if gmm else ["msp", "entropy", "max_logit", "energy"])


def test_gmm_key_replaces_only_the_decode_classifier():
    """MODEL.GMM.ENABLED: the predictor becomes the tap, the GMM predictor reads CONVS_DIM channels, the
    auxiliary FCN head keeps its softmax classifier, and checkpoints hold no predictor weights."""
    cfg = digitscapes_cfg("upernet_R18_gmmseg.yaml")
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.sem_seg_head
    assert type(head).__name__ == "GMMUPerNetHead" and isinstance(head.predictor, DecoderTap)
    assert isinstance(head.gmm_predictor, GMMPredictor)
    assert head.gmm_predictor.projection.in_channels == cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
    keys = set(model.state_dict())
    assert (
        "sem_seg_head.aux_head.classifier.weight" in keys and "sem_seg_head.gmm_predictor.gmm.means" in keys
    )
    assert not any(k.startswith("sem_seg_head.predictor.") for k in keys)


@pytest.mark.parametrize("config", ["upernet_R18_softmax.yaml", "upernet_R18_gmmseg.yaml"])
def test_auxiliary_loss_is_the_weighted_fcn_cross_entropy(config):
    """loss_sem_seg_aux = AUX_LOSS_WEIGHT x cross-entropy of the FCN head on res4, upsampled to the labels
    (ignored pixels left out); AUX_LOSS_WEIGHT 0 builds no auxiliary head and gives no such loss."""
    cfg = digitscapes_cfg(config, "MODEL.UPERNET.AUX_LOSS_WEIGHT", 0.25)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    head = model.sem_seg_head
    head.aux_head.dropout.p = 0.0
    targets = torch.randint(0, NUM_CLASSES, (2, 64, 64))
    targets[:, :8] = 255
    features = model.backbone(torch.randn(2, 3, 64, 64))
    _, losses = head(features, targets)
    logits = F.interpolate(
        head.aux_head(features["res4"]), size=(64, 64), mode="bilinear", align_corners=False
    )
    want = 0.25 * F.cross_entropy(logits, targets, ignore_index=255)
    torch.testing.assert_close(losses["loss_sem_seg_aux"], want)

    cfg = digitscapes_cfg(config, "MODEL.UPERNET.AUX_LOSS_WEIGHT", 0.0)
    model = build_model(cfg).train()
    assert model.sem_seg_head.aux_head is None
    assert not any("aux" in name for name in model.state_dict())
    assert "loss_sem_seg_aux" not in model(batch())


@pytest.mark.parametrize(
    "opts, key",
    [
        (("MODEL.UPERNET.POOL_SCALES", [1, 0, 3]), "MODEL.UPERNET.POOL_SCALES"),
        (("MODEL.UPERNET.POOL_SCALES", [2, 2]), "MODEL.UPERNET.POOL_SCALES"),
        (("MODEL.UPERNET.POOL_SCALES", []), "MODEL.UPERNET.POOL_SCALES"),
        (("MODEL.UPERNET.AUX_CHANNELS", 0), "MODEL.UPERNET.AUX_CHANNELS"),
        (("MODEL.UPERNET.AUX_LOSS_WEIGHT", -0.4), "MODEL.UPERNET.AUX_LOSS_WEIGHT"),
        (("MODEL.UPERNET.AUX_IN_FEATURE", "res6"), "MODEL.UPERNET.AUX_IN_FEATURE"),
        (("MODEL.SEM_SEG_HEAD.CONVS_DIM", 0), "MODEL.SEM_SEG_HEAD.CONVS_DIM"),
        (("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8), "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"),
        (("MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res2"]), "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
        (("MODEL.RESNETS.OUT_FEATURES", ["res3", "res4", "res5"]), "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
        ((*TINY_SWIN, "MODEL.SWIN.OUT_FEATURES", ["res2", "res3", "res5"]), "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    ],
)
def test_invalid_values_name_the_key(opts, key):
    assert_invalid(digitscapes_cfg("upernet_R18_softmax.yaml", *opts), key)


def test_unused_auxiliary_feature_is_not_checked():
    """Without an auxiliary head (weight 0) its input name does not matter."""
    validate_gmmseg_config(
        digitscapes_cfg(
            "upernet_R18_softmax.yaml",
            "MODEL.UPERNET.AUX_LOSS_WEIGHT",
            0.0,
            "MODEL.UPERNET.AUX_IN_FEATURE",
            "x",
        )
    )


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*upernet*.yaml")), ids=lambda p: p.name)
def test_upernet_configs_validate(path):
    """Every UperNet config loads and validates (test_configs.py builds the models): R-18 with 64 channels
    on DigitScapes, Swin-B with mmsegmentation's 512 and its auxiliary head elsewhere."""
    cfg = validated_cfg(path)
    head, upernet = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.UPERNET
    assert head.NAME == "UPerNetHead" and list(head.IN_FEATURES) == list(STAGES)
    assert list(upernet.POOL_SCALES) == [1, 2, 3, 6] and upernet.AUX_LOSS_WEIGHT == 0.4
    assert upernet.AUX_IN_FEATURE == "res4"
    if "digitscapes" in path.parts:
        assert cfg.MODEL.BACKBONE.NAME == "build_resnet_backbone" and cfg.MODEL.RESNETS.DEPTH == 18
        assert (head.CONVS_DIM, upernet.AUX_CHANNELS) == (64, 32)
    else:
        assert cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer" and cfg.MODEL.SWIN.EMBED_DIM == 128
        assert (head.CONVS_DIM, upernet.AUX_CHANNELS) == (512, 256)


def test_gmm_upernet_trains_with_the_trainer(tmp_path, unique_name):
    """A few iterations of GMMSegTrainer by the one key (AdamW groups, online-EM hook): the memory fills,
    the M-step moves the means, the checkpoint holds the mixtures and the auxiliary head."""
    trainer, checkpoint = train_gmm_briefly(tmp_path, unique_name, "upernet_R18_gmmseg.yaml")
    (hook,) = [h for h in trainer._hooks if isinstance(h, GMMEMHook)]
    assert int(hook.online.state_dict()["memory.count"].sum()) > 0
    assert {"sem_seg_head.gmm_predictor.gmm.means", "sem_seg_head.aux_head.classifier.weight"} <= set(
        checkpoint
    )
