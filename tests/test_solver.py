"""The poly schedule matches DeepLab's formula and survives --resume with a different MAX_ITER; the
optimizer's parameter groups and Mask2Former's whole-model gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.solver import build_optimizer as detectron2_build_optimizer

from gmmseg import add_gmmseg_config
from gmmseg.compat import WarmupPolyLR
from gmmseg.modeling.gmm_predictor import GMMPredictor
from gmmseg.solver import build_optimizer


def _sched(max_iters: int, **kw) -> WarmupPolyLR:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    return WarmupPolyLR(opt, max_iters, warmup_iters=kw.pop("warmup_iters", 0), **kw)


def _advance(sched: WarmupPolyLR, steps: int) -> None:
    for _ in range(steps):
        sched.optimizer.step()
        sched.step()


def test_matches_deeplab_formula_after_warmup():
    sched = _sched(100, power=0.9)
    for it in range(100):
        assert sched.get_last_lr()[0] == pytest.approx(0.1 * (1 - it / 100) ** 0.9)
        _advance(sched, 1)


def test_constant_ending_floors_the_rate():
    sched = _sched(100, power=0.9, constant_ending=0.2)
    _advance(sched, 99)
    assert sched.get_last_lr()[0] == pytest.approx(0.1 * 0.2)


def test_resume_with_longer_schedule_uses_the_new_length():
    old = _sched(4)
    _advance(old, 4)
    new = _sched(8)
    new.load_state_dict(old.state_dict())
    assert "max_iters" not in old.state_dict()
    assert new.last_epoch == 4 and new.max_iters == 8
    _advance(new, 2)  # past the old end: DeepLab's class raises "math domain error" here
    assert new.get_last_lr()[0] == pytest.approx(0.1 * (1 - 6 / 8) ** 0.9)
    _advance(new, 4)  # past the new end: stays at zero instead of failing
    assert math.isfinite(new.get_last_lr()[0]) and new.get_last_lr()[0] == 0.0


class _Net(torch.nn.Module):
    """A backbone conv with BN, a learned embedding and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
        self.queries = torch.nn.Embedding(5, 4)
        self.head = torch.nn.Linear(4, 2)


def _solver_cfg(*opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_list(["SOLVER.BASE_LR", "0.01", "SOLVER.WEIGHT_DECAY", "0.05", *opts])
    return cfg


def _hyper(optimizer, param):
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


def test_adamw_groups_backbone_multiplier_and_embedding_decay():
    net = _Net()
    cfg = _solver_cfg(
        "SOLVER.OPTIMIZER", "ADAMW", "SOLVER.BACKBONE_MULTIPLIER", "0.1", "SOLVER.WEIGHT_DECAY_EMBED", "0.0"
    )
    opt = build_optimizer(cfg, net)
    assert isinstance(opt, torch.optim.AdamW)
    assert _hyper(opt, net.backbone[0].weight) == pytest.approx((0.001, 0.05))
    assert _hyper(opt, net.backbone[1].weight) == pytest.approx((0.001, 0.0))  # norm: WEIGHT_DECAY_NORM
    assert _hyper(opt, net.queries.weight) == pytest.approx((0.01, 0.0))
    assert _hyper(opt, net.head.weight) == pytest.approx((0.01, 0.05))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))


class _SegNet(torch.nn.Module):
    """Backbone and a semantic segmentation head with a LayerNorm, named as Detectron2's segmentors."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 4, 3)
        self.sem_seg_head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.LayerNorm(4))


def test_authors_optimizer_head_multiplier_and_no_decay_on_norms():
    """The GMMSeg authors' AdamW: decode head (projection and LayerNorms included) at 10x the base rate,
    no weight decay on normalisation layers; the backbone at the base rate with decay."""
    net = _SegNet()
    cfg = _solver_cfg(
        "SOLVER.OPTIMIZER", "ADAMW", "SOLVER.HEAD_MULTIPLIER", "10.0", "SOLVER.WEIGHT_DECAY_NORM", "0.0"
    )
    opt = build_optimizer(cfg, net)
    assert _hyper(opt, net.backbone.weight) == pytest.approx((0.01, 0.05))
    assert _hyper(opt, net.sem_seg_head[0].weight) == pytest.approx((0.1, 0.05))
    assert _hyper(opt, net.sem_seg_head[1].weight) == pytest.approx((0.1, 0.0))
    assert _hyper(opt, net.sem_seg_head[1].bias) == pytest.approx((0.1, 0.0))


class _GMMSegNet(torch.nn.Module):
    """A backbone conv and a head whose classifier is a GMM predictor."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = torch.nn.Conv2d(3, 4, 3)
        self.sem_seg_head = torch.nn.Module()
        self.sem_seg_head.predictor = GMMPredictor(4, 3, embed_dim=8, num_components=2)


def test_logit_norm_multiplier_scales_only_the_class_score_layernorm():
    """The class scores' LayerNorm gets base x head x logit-norm multiplier; the predictor's other
    LayerNorm (of the features) and projection keep the head's rate."""
    net = _GMMSegNet()
    cfg = _solver_cfg(
        "SOLVER.OPTIMIZER", "ADAMW", "SOLVER.HEAD_MULTIPLIER", "2.0", "SOLVER.LOGIT_NORM_MULTIPLIER", "30.0",
        "SOLVER.WEIGHT_DECAY_NORM", "0.0",
    )  # fmt: skip
    opt = build_optimizer(cfg, net)
    predictor = net.sem_seg_head.predictor
    assert _hyper(opt, predictor.logit_norm.weight) == pytest.approx((0.6, 0.0))
    assert _hyper(opt, predictor.logit_norm.bias) == pytest.approx((0.6, 0.0))
    assert _hyper(opt, predictor.feature_norm.weight) == pytest.approx((0.02, 0.0))
    assert _hyper(opt, net.backbone.weight) == pytest.approx((0.01, 0.05))
    others = [
        p
        for p in predictor.parameters()
        if p is not predictor.logit_norm.weight and p is not predictor.logit_norm.bias
    ]
    assert others and all(_hyper(opt, p)[0] == pytest.approx(0.02) for p in others)
    # at the default the groups are the ones without the key
    default = build_optimizer(_solver_cfg("SOLVER.OPTIMIZER", "ADAMW", "SOLVER.HEAD_MULTIPLIER", "2.0"), net)
    assert _hyper(default, predictor.logit_norm.weight)[0] == pytest.approx(0.02)


def test_sgd_defaults_equal_detectron2s_optimizer():
    """With the SGD defaults the groups are Detectron2's (which knows no embedding weight decay)."""
    net = _Net()
    cfg = _solver_cfg("SOLVER.WEIGHT_DECAY_EMBED", "0.05")
    ours, theirs = build_optimizer(cfg, net), detectron2_build_optimizer(cfg, net)
    assert type(ours) is torch.optim.SGD
    for param in net.parameters():
        assert _hyper(ours, param) == _hyper(theirs, param)
        group = next(g for g in ours.param_groups if any(p is param for p in g["params"]))
        assert (group["momentum"], group["nesterov"]) == (cfg.SOLVER.MOMENTUM, cfg.SOLVER.NESTEROV)


def test_full_model_clipping_clips_the_norm_of_all_gradients_together():
    net = _Net()
    cfg = _solver_cfg(
        "SOLVER.OPTIMIZER", "SGD", "SOLVER.MOMENTUM", "0.0", "SOLVER.WEIGHT_DECAY", "0.0",
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True", "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "full_model",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "0.5",
    )  # fmt: skip
    opt = build_optimizer(cfg, net)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    grads = {n: torch.randn_like(p) * 10 for n, p in net.named_parameters()}
    for n, p in net.named_parameters():
        p.grad = grads[n].clone()
    opt.step()
    total = torch.sqrt(sum((g**2).sum() for g in grads.values()))
    for n, p in net.named_parameters():  # SGD step = -lr * g * (0.5 / |g|_all): one common scale
        expected = before[n] - 0.01 * grads[n] * (0.5 / total)
        assert torch.allclose(p.detach(), expected, atol=1e-6), n
