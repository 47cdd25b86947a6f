"""HRNet as a Detectron2 backbone (``D2HRNet``, timm's HighResolutionNet): the four branches at strides
4 ... 32 with W ... 8W channels, the published parameter counts, the official weights through
tools/convert_hrnet_weights.py (float64 equality with a reference in the official structure), the norms,
and the validation of MODEL.HRNET.*."""

from __future__ import annotations

import pytest
import timm
import torch
from detectron2.layers import FrozenBatchNorm2d
from head_testing import (
    REPO,
    assert_converted_features,
    assert_invalid,
    cfg_without_datasets,
    load_tool,
    parameter_count,
)
from hrnet_reference import ReferenceHRNet
from timm.models.hrnet import cfg_cls
from torch import nn

from gmmseg.modeling import D2HRNet
from gmmseg.modeling.backbone.hrnet import HRNET_VARIANTS, hrnet_channels

NAMES, STRIDES = ("res2", "res3", "res4", "res5"), (4, 8, 16, 32)
HEAD = ("incre_modules", "downsamp_modules", "final_layer", "classifier")  # the classification head
# Published parameter counts, in millions. ImageNet classification models (HRNet-Image-Classification
# README, "ImageNet pretrained models": HRNet-W18-C 21.3M, HRNet-W48-C 77.5M): backbone + classification
# head. HRNetV2-W48 for Cityscapes segmentation (Wang et al., "Deep High-Resolution Representation
# Learning for Visual Recognition", TPAMI 2020, Cityscapes val table: 65.9M): backbone + HRNetV2's head.
PUBLISHED_CLASSIFICATION = {"W18": 21.3, "W48": 77.5}
PUBLISHED_HRNETV2_W48_CITYSCAPES = 65.9


def _converter():
    return load_tool("convert_hrnet_weights")


def _reference(variant: str) -> ReferenceHRNet:
    return ReferenceHRNet(cfg_cls[HRNET_VARIANTS[variant]])


def test_variants_are_timms():
    assert set(HRNET_VARIANTS.values()) <= set(timm.list_models("hrnet*"))
    assert hrnet_channels("W18_SMALL") == (16, 32, 64, 128) and hrnet_channels("W48") == (48, 96, 192, 384)


@pytest.mark.parametrize("variant", ["W18_SMALL", "W18"])
def test_output_strides_and_channels(variant):
    """The raw branches (W ... 8W channels), not timm's "incre" features (128 ... 1024 channels)."""
    torch.manual_seed(0)
    backbone = D2HRNet(variant=variant).eval()
    width = 16 if variant == "W18_SMALL" else 18
    channels = tuple(width * 2**i for i in range(4))
    shapes = backbone.output_shape()
    assert [(shapes[n].stride, shapes[n].channels) for n in NAMES] == list(zip(STRIDES, channels))
    with torch.no_grad():
        features = backbone(torch.randn(1, 3, 64, 96))
    assert list(features) == list(NAMES)
    for name, stride, c in zip(NAMES, STRIDES, channels):
        assert features[name].shape == (1, c, 64 // stride, 96 // stride)
    only = D2HRNet(variant=variant, out_features=("res2", "res4")).eval()
    assert list(only.output_shape()) == ["res2", "res4"]


@pytest.mark.parametrize("variant", ["W18", "W48"])
def test_parameter_counts_match_the_published_ones(variant):
    """D2HRNet has the official backbone's tensors, name for name; with the official classification head
    (which the converter drops) it is the published HRNet-W18-C / W48-C (21,299,004 / 77,469,864: both
    within 0.05% of 21.3M / 77.5M). W48 with HRNetV2's segmentation head on Cityscapes (1x1 conv + BN +
    ReLU on the 720 concatenated channels, then a 19-class 1x1 classifier) is 65.86M, 0.07% from 65.9M."""
    with torch.device("meta"):
        ours, reference = D2HRNet(variant=variant), _reference(variant)
    head = sum(parameter_count(getattr(reference, name)) for name in HEAD)
    backbone_names = {k for k in reference.state_dict() if not k.startswith(HEAD)}
    assert set(ours.state_dict()) == backbone_names
    assert parameter_count(ours) == parameter_count(reference) - head
    published = PUBLISHED_CLASSIFICATION[variant]
    assert abs((parameter_count(ours) + head) / 1e6 - published) < 0.01 * published
    if variant == "W48":
        c = sum(hrnet_channels("W48"))
        hrnetv2_head = (c * c + c) + 2 * c + (c * 19 + 19)  # conv (bias), BN, classifier
        total = (parameter_count(ours) + hrnetv2_head) / 1e6
        assert abs(total - PUBLISHED_HRNETV2_W48_CITYSCAPES) < 0.01 * PUBLISHED_HRNETV2_W48_CITYSCAPES


def _randomise(module: nn.Module, seed: int) -> None:
    """Every parameter and BN statistic drawn at random, so that no norm is an identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                draw = torch.randn(tensor.shape, generator=g, dtype=tensor.dtype) * 0.2
                positive = name.endswith(("running_var", "weight")) and tensor.dim() == 1
                tensor.copy_(draw.abs() + 0.5 if positive else draw)


@pytest.mark.parametrize("variant", ["W18_SMALL", "W18"])
def test_converted_weights_give_the_official_features(variant, tmp_path):
    """Official-layout weights (a reference in the official structure, random weights and BN statistics)
    -> tools/convert_hrnet_weights.py -> DetectionCheckpointer into D2HRNet: in float64 the four branches
    equal the reference's. Dropping one ReLU of the reference's last fuse is seen: the check is sharp."""
    reference = _reference(variant).double().eval()
    _randomise(reference, seed=1)
    torch.save(reference.state_dict(), tmp_path / "hrnet_official.pth")
    convert = _converter()
    args = [str(tmp_path / "hrnet_official.pth"), str(tmp_path / "hrnet_d2.pth"), "--variant", variant]
    assert convert.main(args) == 0

    backbone = D2HRNet(variant=variant).double().eval()
    x, ours = assert_converted_features(backbone, tmp_path / "hrnet_d2.pth", reference)
    reference.stage4[-1].relu = nn.Identity()
    with torch.no_grad():
        assert (reference(x)[0] - ours["res2"]).abs().max() > 1e-3


def test_converter_refuses_other_layouts():
    converter = _converter()
    with pytest.raises(ValueError, match="no HRNet backbone tensor"):
        converter.convert_state_dict({"classifier.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="not a tensor of the official HRNet"):
        converter.convert_state_dict({"backbone.conv1.weight": torch.zeros(1)})  # already converted
    with pytest.raises(ValueError, match="not a tensor of the official HRNet"):
        converter.convert_state_dict({"last_layer.0.weight": torch.zeros(1)})  # a segmentation model's head
    kept = converter.convert_state_dict({"stage2.0.fuse_layers.0.1.0.weight": torch.zeros(1)})
    assert set(kept) == {"backbone.stage2.0.fuse_layers.0.1.0.weight"}
    with torch.device("meta"):
        w18 = converter.convert_state_dict(_reference("W18").state_dict())
    with pytest.raises(ValueError, match="not HRNet-W48 weights"):
        converter.check_against_variant(w18, "W48")


def test_backbone_trains_on_cpu():
    torch.manual_seed(0)
    backbone = D2HRNet(variant="W18_SMALL").train()
    features = backbone(torch.randn(2, 3, 64, 64))
    sum(f.square().mean() for f in features.values()).backward()
    for module in (backbone.conv1, backbone.stage4[0].fuse_layers[0][3][0]):
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0


def test_norms():
    """SyncBN and FrozenBN replace every BatchNorm, keeping the parameter names."""
    bn = D2HRNet(variant="W18_SMALL")
    sync = D2HRNet(variant="W18_SMALL", norm="SyncBN")
    frozen = D2HRNet(variant="W18_SMALL", norm="FrozenBN")
    count = sum(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
    assert count > 0 and sum(isinstance(m, nn.SyncBatchNorm) for m in sync.modules()) == count
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules()) == count
    assert set(sync.state_dict()) == set(bn.state_dict())
    with pytest.raises(ValueError, match="HRNet norm 'GN'"):
        D2HRNet(variant="W18_SMALL", norm="GN")


@pytest.mark.parametrize(
    "opts, key",
    [
        (("MODEL.HRNET.VARIANT", "W17"), "MODEL.HRNET.VARIANT"),
        (("MODEL.HRNET.NORM", "GN"), "MODEL.HRNET.NORM"),
        (("MODEL.HRNET.OUT_FEATURES", ["res2", "res1"]), "MODEL.HRNET.OUT_FEATURES"),
        (("MODEL.HRNET.OUT_FEATURES", ["res3", "res4", "res5"]), "MODEL.SEM_SEG_HEAD.IN_FEATURES"),
    ],
)
def test_invalid_values_name_the_key(opts, key):
    path = REPO / "configs" / "digitscapes" / "ocrnet_HRNetW18_softmax.yaml"
    assert_invalid(cfg_without_datasets(path, *opts), key)
