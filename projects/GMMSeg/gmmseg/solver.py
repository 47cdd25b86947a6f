"""Learning-rate schedule: DeepLab's warm-up + poly decay, safe to resume with a changed schedule.

Detectron2's DeepLab ``WarmupPolyLR`` stores its settings (``max_iters``...) in its state dict, so
``--resume`` with a larger ``SOLVER.MAX_ITER`` restores the old length and then fails with a math domain
error once past it. Here the state dict holds only the progress; the schedule always comes from the
config, and iterations past the end keep the final learning rate instead of failing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR as _DeepLabWarmupPolyLR
from detectron2.solver.lr_scheduler import _get_warmup_factor_at_iter

__all__ = ["WarmupPolyLR", "build_lr_scheduler"]


class WarmupPolyLR(_DeepLabWarmupPolyLR):
    """DeepLab's schedule: lr = base * warmup(it) * (1 - it / max_iters) ** power, floored at
    ``constant_ending * base`` when that is set."""

    _CONFIG_FIELDS = (
        "max_iters",
        "warmup_factor",
        "warmup_iters",
        "warmup_method",
        "power",
        "constant_ending",
    )

    def get_lr(self) -> list[float]:
        warmup = _get_warmup_factor_at_iter(
            self.warmup_method, self.last_epoch, self.warmup_iters, self.warmup_factor
        )
        decay = math.pow(max(0.0, 1.0 - self.last_epoch / self.max_iters), self.power)
        if self.constant_ending > 0 and warmup == 1.0:
            decay = max(decay, self.constant_ending)
        return [base_lr * warmup * decay for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in super().state_dict().items() if k not in self._CONFIG_FIELDS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict({k: v for k, v in state_dict.items() if k not in self._CONFIG_FIELDS})


def build_lr_scheduler(
    cfg: CfgNode, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LRScheduler:
    if cfg.SOLVER.LR_SCHEDULER_NAME != "WarmupPolyLR":
        return build_deeplab_lr_scheduler(cfg, optimizer)
    return WarmupPolyLR(
        optimizer,
        cfg.SOLVER.MAX_ITER,
        warmup_factor=cfg.SOLVER.WARMUP_FACTOR,
        warmup_iters=cfg.SOLVER.WARMUP_ITERS,
        warmup_method=cfg.SOLVER.WARMUP_METHOD,
        power=cfg.SOLVER.POLY_LR_POWER,
        constant_ending=cfg.SOLVER.POLY_LR_CONSTANT_ENDING,
    )
