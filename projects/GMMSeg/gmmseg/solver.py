"""Optimizer and learning-rate schedule.

Optimizer: SGD (DeepLab-style models) or AdamW (Mask2Former), with Mask2Former's parameter groups (a
learning-rate multiplier for the backbone, no weight decay on normalisation layers and on embeddings such
as learned queries and Swin's position tables) and its whole-model gradient-norm clipping
(``SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"``), next to Detectron2's per-parameter clipping.

Schedule: DeepLab's warm-up + poly decay (``gmmseg.compat.WarmupPolyLR``: safe to resume with a changed
schedule, unlike Detectron2's), or Detectron2's other schedules.
"""

from __future__ import annotations

from typing import Any

import torch
from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.solver.build import (
    _generate_optimizer_class_with_gradient_clipping,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)

from gmmseg.compat import WarmupPolyLR
from gmmseg.modeling.gmm_predictor import GMMPredictorBase

__all__ = ["build_lr_scheduler", "build_optimizer", "optimizer_param_groups"]

# parameters that are embeddings although they are not in an nn.Embedding (Swin's position tables)
EMBEDDING_PARAMETER_NAMES = ("relative_position_bias_table", "absolute_pos_embed")
HEAD_PREFIXES = ("sem_seg_head.", "module.sem_seg_head")


def optimizer_param_groups(cfg: CfgNode, model: torch.nn.Module) -> list[dict[str, Any]]:
    """Parameter groups with per-group ``lr`` and ``weight_decay``: ``SOLVER.BACKBONE_MULTIPLIER`` times
    the base rate for parameters under ``backbone``, ``SOLVER.HEAD_MULTIPLIER`` times it for the semantic
    segmentation head (``sem_seg_head``: the GMMSeg authors train their decode head, projection and
    LayerNorms included, at 10x), and ``SOLVER.LOGIT_NORM_MULTIPLIER`` times that for the LayerNorm over a
    GMM predictor's class scores (``GMMPredictorBase.logit_norm``; see its key in ``config.py``),
    ``SOLVER.WEIGHT_DECAY_NORM`` for normalisation layers,
    ``SOLVER.WEIGHT_DECAY_EMBED`` for embeddings, ``SOLVER.WEIGHT_DECAY`` otherwise."""
    solver = cfg.SOLVER
    norm_types = (
        torch.nn.modules.batchnorm._NormBase,
        torch.nn.GroupNorm,
        torch.nn.LayerNorm,
        torch.nn.LocalResponseNorm,
    )
    logit_norm = {
        id(p) for m in model.modules() if isinstance(m, GMMPredictorBase) for p in m.logit_norm.parameters()
    }
    groups: list[dict[str, Any]] = []
    seen: set[torch.nn.Parameter] = set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr = solver.BASE_LR
            if module_name == "backbone" or module_name.startswith(("backbone.", "module.backbone")):
                lr = lr * solver.BACKBONE_MULTIPLIER
            elif module_name == "sem_seg_head" or module_name.startswith(HEAD_PREFIXES):
                lr = lr * solver.HEAD_MULTIPLIER
            if id(param) in logit_norm:
                lr = lr * solver.LOGIT_NORM_MULTIPLIER
            weight_decay = solver.WEIGHT_DECAY
            if isinstance(module, norm_types):
                weight_decay = solver.WEIGHT_DECAY_NORM
            elif isinstance(module, torch.nn.Embedding) or name in EMBEDDING_PARAMETER_NAMES:
                weight_decay = solver.WEIGHT_DECAY_EMBED
            groups.append({"params": [param], "lr": lr, "weight_decay": weight_decay})
    return reduce_param_groups(groups)


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``SOLVER.OPTIMIZER`` ("SGD" | "ADAMW") over ``optimizer_param_groups``, with gradient clipping
    when ``SOLVER.CLIP_GRADIENTS.ENABLED``: "value" / "norm" per parameter (Detectron2), "full_model" on
    the norm of all gradients together (Mask2Former)."""
    solver = cfg.SOLVER
    groups = optimizer_param_groups(cfg, model)
    if solver.OPTIMIZER == "SGD":
        optimizer_type: type[torch.optim.Optimizer] = torch.optim.SGD
        kwargs: dict[str, Any] = {"momentum": solver.MOMENTUM, "nesterov": solver.NESTEROV}
    elif solver.OPTIMIZER == "ADAMW":
        optimizer_type, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"SOLVER.OPTIMIZER = {solver.OPTIMIZER!r} is invalid: expected 'SGD' or 'ADAMW'")
    clip = solver.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE == "full_model":
        max_norm, norm_type = clip.CLIP_VALUE, clip.NORM_TYPE

        def clip_all(params) -> None:
            torch.nn.utils.clip_grad_norm_(list(params), max_norm, norm_type)

        optimizer_type = _generate_optimizer_class_with_gradient_clipping(
            optimizer_type, global_clipper=clip_all
        )
    else:
        optimizer_type = maybe_add_gradient_clipping(cfg, optimizer_type)
    return optimizer_type(groups, lr=solver.BASE_LR, weight_decay=solver.WEIGHT_DECAY, **kwargs)


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
