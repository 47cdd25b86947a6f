"""The poly schedule matches DeepLab's formula and survives --resume with a different MAX_ITER."""

from __future__ import annotations

import math

import pytest
import torch

from gmmseg.solver import WarmupPolyLR


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
