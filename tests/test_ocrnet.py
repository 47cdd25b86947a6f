"""OCRNet's head (``OCRHead``): the spatial gather and object attention compute what OCR defines; the head
trains with its auxiliary soft-region loss; by the one key MODEL.GMM.ENABLED its final classifier becomes
the GMM predictor while the auxiliary loss still reaches the total (the GMM head's general
``auxiliary_losses`` hook); both modes give posteriors through PosteriorSemanticSegmentor; the configs
validate and bad values name their key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from head_testing import (
    REPO,
    assert_invalid,
    assert_posteriors,
    batch,
    digitscapes_cfg,
    train_gmm_briefly,
    validated_cfg,
)
from torch import nn

from gmmseg import load_cfg, validate_gmmseg_config
from gmmseg.modeling import D2HRNet, GMMHead, OCRHead, convert_head_to_gmm
from gmmseg.modeling.gmm_head import DecoderTap, pop_auxiliary_losses
from gmmseg.modeling.ocr_head import ObjectAttention, spatial_gather
from gmmseg.solver import build_lr_scheduler

SHAPES = {name: ShapeSpec(channels=c, stride=s) for name, c, s in zip(("res2", "res3"), (8, 16), (4, 8))}


def _head(**kwargs) -> OCRHead:
    args = {"num_classes": 5, "channels": 16, "key_channels": 8, "common_stride": 4, "ignore_value": 255}
    return OCRHead(SHAPES, **{**args, **kwargs})


def _features(n: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(n, shape.channels, size // shape.stride, size // shape.stride, generator=g)
        for name, shape in SHAPES.items()
    }


def test_spatial_gather_weights_pixels_by_the_softmax_over_positions():
    features = torch.randn(1, 3, 2, 2)
    logits = torch.full((1, 2, 2, 2), -1e4)
    logits[0, 0, 1, 0] = 0.0  # region 0: all its weight on one pixel
    logits[0, 1] = 0.0  # region 1: uniform
    regions = spatial_gather(features, logits)
    assert regions.shape == (1, 3, 2, 1)
    torch.testing.assert_close(regions[0, :, 0, 0], features[0, :, 1, 0])
    torch.testing.assert_close(regions[0, :, 1, 0], features[0].mean(dim=(1, 2)))


def test_object_attention_is_scaled_dot_product_over_regions():
    """Against the per-pixel definition: softmax_k(q_p . k_k / sqrt(Ck)) weighted sum of the values."""
    torch.manual_seed(0)
    block = ObjectAttention(channels=6, key_channels=4, norm="").eval()
    pixels, regions = torch.randn(1, 6, 3, 2), torch.randn(1, 6, 5, 1)
    with torch.no_grad():
        out = block(pixels, regions)
        q, k, v = block.query(pixels)[0], block.key(regions)[0, :, :, 0], block.value(regions)[0, :, :, 0]
        expected = torch.empty(4, 3, 2)
        for y in range(3):
            for x in range(2):
                weights = F.softmax(q[:, y, x] @ k / 2.0, dim=0)  # sqrt(4)
                expected[:, y, x] = v @ weights
        torch.testing.assert_close(out, block.out(expected[None]))


def test_head_trains_with_the_auxiliary_loss():
    torch.manual_seed(0)
    head = _head(aux_loss_weight=0.4).train()
    targets = torch.randint(0, 5, (2, 32, 32))
    targets[:, :3] = 255
    _, losses = head(_features(), targets)
    assert set(losses) == {"loss_sem_seg", "loss_ocr_aux"} and head.auxiliary_losses == {}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    trained = (head.aux_predictor, head.aux, head.bottleneck, head.object_context.query[0], head.predictor)
    for module in trained:
        assert module.weight.grad is not None and module.weight.grad.abs().sum() > 0
    # the auxiliary loss is 0.4 x the cross-entropy of the soft-region logits at the input resolution
    with torch.no_grad():
        inputs = [F.interpolate(f, size=(8, 8), mode="bilinear") for f in _features().values()]
        x = torch.cat(inputs, dim=1)
        region_logits = F.interpolate(head.aux_predictor(head.aux(x)), scale_factor=4, mode="bilinear")
        expected = 0.4 * F.cross_entropy(region_logits, targets, ignore_index=255)
    torch.testing.assert_close(losses["loss_ocr_aux"].detach(), expected)
    head.eval()
    with torch.no_grad():
        logits, extra = head(_features(n=1))
    assert logits.shape == (1, 5, 32, 32) and extra == {} and head.auxiliary_losses == {}


def test_head_rejects_a_wrong_stride():
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.COMMON_STRIDE"):
        _head(common_stride=8)


def test_gmm_conversion_keeps_the_auxiliary_loss():
    """MODEL.GMM.ENABLED: the final classifier becomes the tap and the GMM predictor; the auxiliary
    classifier stays a softmax classifier, and its loss is in the GMM head's losses (and trains it)."""
    cfg = digitscapes_cfg("ocrnet_HRNetW18_gmmseg.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5)
    torch.manual_seed(0)
    head = convert_head_to_gmm(_head(), cfg).train()
    assert isinstance(head, GMMHead) and isinstance(head, OCRHead) and type(head).__name__ == "GMMOCRHead"
    assert isinstance(head.predictor, DecoderTap) and isinstance(head.aux_predictor, nn.Conv2d)
    assert head.gmm_predictor.projection.in_channels == 16
    _, losses = head(_features(), torch.randint(0, 5, (2, 32, 32)))
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component", "loss_ocr_aux"}
    assert head.auxiliary_losses == {}
    losses["loss_ocr_aux"].backward()
    assert head.aux_predictor.weight.grad.abs().sum() > 0


class _AuxiliaryHead(nn.Module):
    """Any head of the contract with a loss of its own, stored before its classifier is called."""

    def __init__(self, aux_name: str) -> None:
        super().__init__()
        self.common_stride, self.loss_weight, self.aux_name = 1, 1.0, aux_name
        self.decoder = nn.Conv2d(4, 8, 1)
        self.predictor = nn.Conv2d(8, 5, 1)

    def forward(self, features, targets=None):
        x = self.decoder(features["res2"])
        self.auxiliary_losses = {self.aux_name: x.square().mean()} if self.training else {}
        logits = self.predictor(x)
        if self.training:
            return None, {"loss_sem_seg": logits.mean(), **pop_auxiliary_losses(self)}
        return logits, {}


def test_auxiliary_losses_hook_is_general():
    """The GMM head adds whatever a head stored in ``auxiliary_losses``, hands it over once, and refuses
    a name that would overwrite one of its own losses."""
    cfg = digitscapes_cfg("ocrnet_HRNetW18_gmmseg.yaml", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 5)
    features, targets = {"res2": torch.randn(2, 4, 6, 6)}, torch.randint(0, 5, (2, 6, 6))
    head = convert_head_to_gmm(_AuxiliaryHead("loss_mine"), cfg).train()
    _, losses = head(features, targets)
    assert "loss_mine" in losses and head.auxiliary_losses == {}
    assert pop_auxiliary_losses(head) == {} and pop_auxiliary_losses(nn.Conv2d(1, 1, 1)) == {}
    clashing = convert_head_to_gmm(_AuxiliaryHead("loss_sem_seg"), cfg).train()
    with pytest.raises(KeyError, match="loss_sem_seg"):
        clashing(features, targets)


@pytest.mark.parametrize("config", ["ocrnet_HRNetW18_softmax.yaml", "ocrnet_HRNetW18_gmmseg.yaml"])
def test_digitscapes_ocrnet_trains_and_infers(config):
    """The DigitScapes pair builds from its config; a training step gives the auxiliary loss in both modes
    and finite gradients; inference gives posteriors summing to 1 (and, for GMMSeg, the anomaly map)."""
    cfg = digitscapes_cfg(config)
    validate_gmmseg_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg)
    head, gmm = model.sem_seg_head, cfg.MODEL.GMM.ENABLED
    assert isinstance(model.backbone, D2HRNet) and isinstance(head, OCRHead)
    assert type(head).__name__ == ("GMMOCRHead" if gmm else "OCRHead")
    model.train()
    losses = model(batch())
    expected = {"loss_sem_seg", "loss_ocr_aux"} | ({"loss_gmm_component"} if gmm else set())
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.conv1.weight.grad.abs().sum() > 0
    assert head.aux_predictor.weight.grad.abs().sum() > 0
    model.eval()
    assert_posteriors(model, torch.randint(0, 256, (3, 64, 80), dtype=torch.uint8), gmm)


@pytest.mark.parametrize(
    "opts, key",
    [
        (("MODEL.OCR.CHANNELS", 0), "MODEL.OCR.CHANNELS"),
        (("MODEL.OCR.KEY_CHANNELS", -256), "MODEL.OCR.KEY_CHANNELS"),
        (("MODEL.OCR.AUX_LOSS_WEIGHT", -0.4), "MODEL.OCR.AUX_LOSS_WEIGHT"),
        (("MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 8), "MODEL.SEM_SEG_HEAD.COMMON_STRIDE"),
    ],
)
def test_invalid_values_name_the_key(opts, key):
    assert_invalid(digitscapes_cfg("ocrnet_HRNetW18_softmax.yaml", *opts), key)


@pytest.mark.parametrize("path", sorted((REPO / "configs").rglob("*ocrnet_*.yaml")), ids=lambda p: p.name)
def test_ocrnet_configs_validate(path):
    """Every OCRNet config loads and validates (the models are built in test_configs.py)."""
    cfg = validated_cfg(path)
    assert (cfg.MODEL.BACKBONE.NAME, cfg.MODEL.SEM_SEG_HEAD.NAME) == ("D2HRNet", "OCRHead")
    digitscapes = "digitscapes" in path.parts
    assert cfg.MODEL.HRNET.VARIANT == ("W18_SMALL" if digitscapes else "W48")
    assert (cfg.MODEL.OCR.CHANNELS, cfg.MODEL.OCR.KEY_CHANNELS) == ((64, 32) if digitscapes else (512, 256))
    assert cfg.MODEL.OCR.AUX_LOSS_WEIGHT == 0.4


def test_gmm_ocrnet_trains_with_the_trainer(tmp_path, unique_name):
    """A few iterations of GMMSegTrainer on the GMMSeg pair by the one key: the M-step moves the means and
    the checkpoint holds the mixtures, the auxiliary classifier and the HRNet."""
    _, checkpoint = train_gmm_briefly(tmp_path, unique_name, "ocrnet_HRNetW18_gmmseg.yaml")
    expected = ("gmm_predictor.gmm.means", "aux_predictor.weight", "object_context.query.0.weight")
    assert all(f"sem_seg_head.{name}" in checkpoint for name in expected)
    assert "sem_seg_head.predictor.weight" not in checkpoint
    assert "backbone.stage4.0.fuse_layers.0.3.0.weight" in checkpoint


def test_paper_schedule_starts_at_the_base_rate():
    """No warm-up (mmsegmentation's OCRNet schedules): the first iteration runs at 0.01; the rate never
    falls below 1e-4 (mmsegmentation's min_lr)."""
    cfg = load_cfg(REPO / "configs" / "cityscapes" / "ocrnet_HRNetW48_softmax.yaml", [])
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    scheduler.last_epoch = cfg.SOLVER.MAX_ITER - 1
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)
