"""The project's Detectron2 trainer: data mapper, evaluators, poly LR, and DDP that also works on CPU."""

from __future__ import annotations

import logging
import os
import weakref

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from gmmseg.data.dataset_mapper import SemanticDatasetMapper
from gmmseg.evaluation.sem_seg import SemSegEvaluator
from gmmseg.solver import build_lr_scheduler

__all__ = ["GMMSegTrainer", "wrap_distributed"]


def wrap_distributed(model: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel when there are several processes: one GPU each, or CPU (gloo)."""
    if comm.get_world_size() == 1:
        return model
    device_ids = [comm.get_local_rank()] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class GMMSegTrainer(DefaultTrainer):
    """``DefaultTrainer`` with GMMSeg-D2's data mapper, evaluators and resumable poly LR schedule.

    ``__init__`` is DefaultTrainer's, except for the DDP wrapper: Detectron2 v0.6 always passes
    ``device_ids``, which DDP rejects for CPU models, so multi-process CPU training could not run.
    """

    def __init__(self, cfg: CfgNode) -> None:
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = wrap_distributed(model, cfg.MODEL.DEVICE)
        trainer_cls = AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer
        self._trainer = trainer_cls(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluators = [
            SemSegEvaluator(
                dataset_name,
                distributed=True,
                output_dir=output_folder,
                num_calibration_bins=cfg.TEST.CALIBRATION_BINS,
            )
        ]
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_detection_train_loader(cfg, mapper=SemanticDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_detection_test_loader(
            cfg, dataset_name, mapper=SemanticDatasetMapper(cfg, is_train=False)
        )

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)
