"""The per-pixel GMM head's inference path: the folded 1x1 projection, contiguous logits and the anomaly map
computed only when a score reads it, each against the previous formulation in float64; and the training
path left bit for bit as it was (losses and gradients equal to the formulation written out here)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm
from detectron2.modeling import build_model
from torch import nn

from gmmseg import load_cfg
from gmmseg.modeling import GMMPredictor
from gmmseg.modeling.folded_projection import folded_weights, project_channels_last

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "digitscapes"


def _randomise_norm(norm: nn.Module, g: torch.Generator) -> None:
    """Running statistics and affine parameters far from the identity, so that folding them matters."""
    channels = norm.running_mean.numel()
    norm.running_mean.copy_(torch.randn(channels, generator=g))
    norm.running_var.copy_(0.2 + torch.rand(channels, generator=g))
    norm.weight.data.copy_(0.5 + torch.rand(channels, generator=g))
    norm.bias.data.copy_(torch.randn(channels, generator=g))


def _conv(norm: str, activation, g: torch.Generator) -> Conv2d:
    conv = Conv2d(24, 16, kernel_size=1, bias=not norm, norm=get_norm(norm, 16), activation=activation)
    nn.init.normal_(conv.weight, generator=g)
    if conv.bias is not None:
        nn.init.normal_(conv.bias, generator=g)
    if norm in ("BN", "FrozenBN"):
        _randomise_norm(conv.norm, g)
    return conv.eval()


@pytest.mark.parametrize("norm", ["BN", "FrozenBN", ""])
@pytest.mark.parametrize("activation", [F.relu, None, torch.tanh])
def test_folded_projection_matches_the_float64_convolution(norm, activation):
    g = torch.Generator().manual_seed(0)
    conv = _conv(norm, activation, g)
    x = torch.randn(2, 24, 5, 7, generator=g)
    with torch.no_grad():
        got = project_channels_last(conv, x)
        want = conv.double()(x.double()).permute(0, 2, 3, 1)
    assert got.shape == (2, 5, 7, 16) and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_norms_with_batch_statistics_are_not_folded():
    g = torch.Generator().manual_seed(0)
    training_bn = _conv("BN", F.relu, g).train()
    no_stats = Conv2d(8, 4, 1, bias=False, norm=nn.BatchNorm2d(4, track_running_stats=False)).eval()
    group_norm = Conv2d(8, 4, 1, bias=False, norm=nn.GroupNorm(2, 4)).eval()
    strided = Conv2d(8, 4, 1, stride=2).eval()
    for conv in (training_bn, no_stats, group_norm, strided):
        assert folded_weights(conv) is None
        assert project_channels_last(conv, torch.randn(1, conv.in_channels, 4, 4)) is None
    assert isinstance(_conv("FrozenBN", None, g).norm, FrozenBatchNorm2d)


def _predictor(norm: str = "BN") -> GMMPredictor:
    g = torch.Generator().manual_seed(1)
    predictor = GMMPredictor(24, 6, norm=norm, embed_dim=32, num_components=3)
    if norm == "BN":
        _randomise_norm(predictor.projection.norm, g)
    predictor.gmm.update_parameters(
        F.normalize(torch.randn(6, 3, 32, generator=g), dim=-1), 0.2 + 0.2 * torch.rand(6, 3, 32, generator=g)
    )
    return predictor.eval()


def _previous_scores(predictor: GMMPredictor, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The inference outputs as computed before the folded projection (module, then permute), float64."""
    predictor = copy.deepcopy(predictor).double()
    projected = predictor.projection(x.double()).permute(0, 2, 3, 1)
    norm = predictor.feature_norm  # ``normalise`` itself casts to float32
    normalised = F.layer_norm(projected, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    outputs = predictor.score(F.normalize(normalised, dim=-1))
    outputs["logits"] = outputs["logits"].permute(0, 3, 1, 2)
    return outputs


@pytest.mark.parametrize("norm", ["BN", "GN"])
def test_predictor_inference_matches_the_previous_formulation_in_float64(norm):
    predictor = _predictor(norm)
    x = torch.randn(2, 24, 6, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = predictor(x)
        want = _previous_scores(predictor, x)
    for key in ("embeddings", "component_log_prob", "class_log_prob", "logits"):
        assert got[key].dtype == torch.float32 and got[key].shape == want[key].shape, key
        scale = want[key].abs().amax().item()
        torch.testing.assert_close(got[key].double(), want[key], rtol=0, atol=2e-5 * max(scale, 1.0))


def _model(*opts):
    cfg = load_cfg(CONFIGS / "deeplabv3plus_R18_gmmseg.yaml", ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()"])
    cfg.merge_from_list(list(opts))
    torch.manual_seed(0)
    model = build_model(cfg)
    head = model.sem_seg_head
    _randomise_norm(head.gmm_predictor.projection.norm, torch.Generator().manual_seed(3))
    return model.eval()


def _backbone_features(model, size=(64, 96)) -> dict[str, torch.Tensor]:
    image = torch.randint(0, 256, (1, 3, *size), generator=torch.Generator().manual_seed(4)).float()
    with torch.no_grad():
        return model.backbone((image - model.pixel_mean) / model.pixel_std)


def test_head_inference_gives_contiguous_logits_and_the_anomaly_map_only_when_asked(monkeypatch):
    model = _model()
    head = model.sem_seg_head
    features = _backbone_features(model)
    with torch.no_grad():
        maps, _ = head(features)
        outputs = _previous_scores(head.gmm_predictor, head.decoder_features(features))

    def upsample(t):
        return F.interpolate(t, scale_factor=head.common_stride, mode="bilinear", align_corners=False)

    logits, anomaly = (
        upsample(outputs["logits"]),
        upsample(-outputs["class_log_prob"].amax(-1)[:, None])[:, 0],
    )
    assert set(maps) == {"logits", "anomaly"} and maps["logits"].is_contiguous()
    torch.testing.assert_close(maps["logits"].double(), logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(maps["anomaly"].double(), anomaly, rtol=0, atol=1e-4 * anomaly.abs().max())

    def refuse(*args):
        raise AssertionError("the anomaly map was computed though not asked for")

    monkeypatch.setattr(GMMPredictor, "anomaly_map", staticmethod(refuse))
    with torch.no_grad():
        without, _ = head(features, maps=())
    assert set(without) == {"logits"} and torch.equal(without["logits"], maps["logits"])


def test_head_refuses_unknown_map_names_naming_the_known_ones():
    model = _model()
    features = _backbone_features(model)
    with torch.no_grad(), pytest.raises(ValueError) as info:
        model.sem_seg_head(features, maps={"anomaly", "anomaly_halfres", "rba"})
    message = str(info.value)
    assert "['anomaly_halfres', 'rba']" in message
    assert "['anomaly', 'anomaly_fullres', 'anomaly_mahalanobis']" in message


def test_head_computes_each_named_map_as_when_asked_alone():
    """One set names every map: asked together, each map equals the one computed alone (and the default
    set is the ``anomaly`` map alone)."""
    model = _model()
    head = model.sem_seg_head
    features = _backbone_features(model)
    names = ("anomaly", "anomaly_fullres", "anomaly_mahalanobis")
    with torch.no_grad():
        together, _ = head(features, maps=set(names))
        alone = {name: head(features, maps=[name])[0] for name in names}
        default, _ = head(features)
    assert set(together) == {"logits", *names} and set(default) == {"logits", "anomaly"}
    for name in names:
        assert set(alone[name]) == {"logits", name} and torch.equal(together[name], alone[name][name])
    assert torch.equal(default["anomaly"], alone["anomaly"]["anomaly"])


def test_models_compute_the_anomaly_map_only_when_a_score_reads_it():
    default, logit_only = _model(), _model("TEST.ANOMALY_SCORES", "('msp', 'energy')")
    assert default.requested_head_maps == {"anomaly"} and not logit_only.requested_head_maps
    inputs = [{"image": torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8), "height": 70, "width": 90}]
    with torch.no_grad():
        (full,), (lean,) = default(inputs), logit_only(inputs)
    assert "anomaly" in full and list(full["anomaly_scores"]) == ["gmm"]
    assert "anomaly" not in lean and list(lean["anomaly_scores"]) == ["msp", "energy"]
    assert torch.equal(full["sem_seg"], lean["sem_seg"])


def test_training_forward_is_the_previous_formulation_bit_for_bit():
    """Training is untouched by the inference path: losses and gradients equal, bit for bit, those of the
    formulation written out here (projection module, permute, channels-last logits upsampled as they are)."""
    model = _model()
    model.train()
    head, predictor = model.sem_seg_head, model.sem_seg_head.gmm_predictor
    features = _backbone_features(model)
    targets = torch.randint(0, 12, (1, 64, 96), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(6)  # the same ASPP dropout in both forwards
    _, losses = head(features, targets)
    sum(losses.values()).backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    head.zero_grad()

    torch.manual_seed(6)
    decoded = head.decoder_features(features, targets)
    outputs = predictor.score(predictor.normalise(predictor.projection(decoded).permute(0, 2, 3, 1)))
    outputs["logits"] = outputs["logits"].permute(0, 3, 1, 2)
    logits = F.interpolate(
        outputs["logits"], scale_factor=head.common_stride, mode="bilinear", align_corners=False
    )
    want = predictor.losses(outputs, targets, logits)
    want["loss_sem_seg"] = want["loss_sem_seg"] * head.loss_weight
    assert set(losses) == set(want)
    assert all(torch.equal(losses[k], want[k]) for k in want)
    sum(want.values()).backward()
    assert grads and all(torch.equal(p.grad, grads[n]) for n, p in head.named_parameters() if n in grads)
