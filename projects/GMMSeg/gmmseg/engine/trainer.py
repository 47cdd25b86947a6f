"""The project's Detectron2 trainer: data mapper, evaluators, resumable data stream and poly LR, and DDP that
also works on CPU (the Detectron2 v0.6 work-arounds it uses are ``gmmseg.compat``)."""

from __future__ import annotations

import itertools
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.evaluation import DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from gmmseg.compat import AnyDeviceAMPTrainer, OptimizerStateInCheckpoints, amp_dtype, wrap_distributed
from gmmseg.config_validation import MASK_FORMER_ARCHITECTURES, RESUMABLE_TRAIN_SAMPLERS
from gmmseg.data.class_balanced_sampler import ClassBalancedTrainingSampler, class_image_index_for_datasets
from gmmseg.data.dataset_mapper import SemanticDatasetMapper, TrainLabelsMapper
from gmmseg.evaluation.sem_seg import SemSegEvaluator
from gmmseg.solver import build_lr_scheduler, build_optimizer

from .hooks import GMMEMHook, RNGStateHook, find_gmm_predictors

__all__ = ["GMMSegTrainer", "ResumableTrainingSampler"]


class ResumableTrainingSampler(TrainingSampler):
    """Detectron2's infinite shuffled sampler, able to start ``skip`` samples (per process) into its
    stream, so that a resumed run reads the batches an uninterrupted run would have read."""

    def __init__(self, size: int, shuffle: bool = True, seed: int | None = None, skip: int = 0) -> None:
        super().__init__(size, shuffle=shuffle, seed=seed)
        self._skip = skip

    def __iter__(self):
        start = self._rank + self._skip * self._world_size
        yield from itertools.islice(self._infinite_indices(), start, None, self._world_size)


class GMMSegTrainer(OptimizerStateInCheckpoints, DefaultTrainer):
    """``DefaultTrainer`` with GMMSeg-D2's data mapper, evaluators and resumable poly LR schedule, whose
    checkpoints keep the optimizer state (``gmmseg.compat.OptimizerStateInCheckpoints``).

    ``__init__`` is DefaultTrainer's, except for the DDP wrapper (``gmmseg.compat.wrap_distributed``):
    Detectron2 v0.6 always passes ``device_ids``, which DDP rejects for CPU models; and for
    ``SOLVER.AMP.ENABLED``, whose trainer (``gmmseg.compat.AnyDeviceAMPTrainer``) also runs on the CPU
    (bfloat16 autocast).
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
        if cfg.SOLVER.AMP.ENABLED:  # v0.6's AMPTrainer is CUDA-only (gmmseg.compat)
            device = cfg.MODEL.DEVICE
            self._trainer = AnyDeviceAMPTrainer(
                model,
                data_loader,
                optimizer,
                device_type=torch.device(device).type,
                dtype=amp_dtype(device, cfg.SOLVER.AMP.DTYPE),
            )
        else:
            self._trainer = SimpleTrainer(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None):
        """Semantic evaluator (mIoU, ECE) where the split has labels; anomaly evaluator (AUROC, AP, FPR95,
        sIoU, PPV, mean F1 for every anomaly score) where it has ``ood`` maps. DigitScapes' anomaly_val gets
        both."""
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        evaluators = []
        if meta.get("evaluator_type", "sem_seg") == "sem_seg":
            evaluators.append(
                SemSegEvaluator(
                    dataset_name,
                    distributed=True,
                    output_dir=output_folder,
                    num_calibration_bins=cfg.TEST.CALIBRATION_BINS,
                )
            )
        if meta.get("has_ood", False) or meta.get("evaluator_type", None) == "anomaly":
            evaluators.append(cls.build_anomaly_evaluator(cfg, dataset_name, output_folder))
        if not evaluators:
            raise ValueError(
                f"dataset '{dataset_name}' has neither semantic labels nor anomaly maps to evaluate"
            )
        return DatasetEvaluators(evaluators)

    @classmethod
    def build_anomaly_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None, distributed: bool = True
    ):
        """The anomaly evaluator of ``dataset_name`` with the config's settings (mode, aggregation, component
        metrics and size filters, the dataset's where the config says -1); also used to evaluate maps read
        from files (tools/export_anomaly_maps.py), so both see the same pixels and settings."""
        from gmmseg.evaluation.anomaly import AnomalyEvaluator
        from gmmseg.evaluation.anomaly_components import component_settings

        return AnomalyEvaluator(
            dataset_name,
            distributed=distributed,
            output_dir=output_folder,
            mode=cfg.TEST.ANOMALY_EVAL_MODE,
            max_exact_pixels=cfg.TEST.ANOMALY_MAX_EXACT_PIXELS,
            num_bins=cfg.TEST.ANOMALY_NUM_BINS,
            aggregation=cfg.TEST.ANOMALY_AGGREGATION,
            components=component_settings(
                cfg.TEST.ANOMALY_COMPONENTS.ENABLED,
                cfg.TEST.ANOMALY_COMPONENTS.MIN_PRED_SIZE,
                cfg.TEST.ANOMALY_COMPONENTS.MIN_GT_SIZE,
                cfg.TEST.ANOMALY_COMPONENTS.THRESHOLD,
                MetadataCatalog.get(dataset_name),
            ),
        )

    @classmethod
    def build_train_loader(cls, cfg: CfgNode, start_iter: int = 0):
        """The training loader; ``start_iter`` > 0 skips the batches of the iterations already done.

        ``DATALOADER.SAMPLER_TRAIN``: "TrainingSampler" (shuffled epochs) or "ClassBalancedSampler" (the
        authors' class-balanced draws); other names go to Detectron2's own loader (not resumable).
        With ``SEED >= 0`` the sample order depends only on the seed, so a resumed run continues the
        same stream (exact for datasets of one aspect ratio, like DigitScapes; with aspect-ratio grouping
        of mixed sizes, batch composition may differ slightly).
        """
        mapper = SemanticDatasetMapper(cfg, is_train=True)
        sampler_name = cfg.DATALOADER.SAMPLER_TRAIN
        if sampler_name not in RESUMABLE_TRAIN_SAMPLERS:
            return build_detection_train_loader(cfg, mapper=mapper)
        seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
        skip = start_iter * cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size()
        if sampler_name == "ClassBalancedSampler":
            dataset, index = class_image_index_for_datasets(
                cfg.DATASETS.TRAIN, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            )
            sampler = ClassBalancedTrainingSampler(index, seed=seed, skip=skip)
            logging.getLogger(__name__).info(
                "Using training sampler ClassBalancedSampler: %d classes present in %d images",
                len(sampler.classes),
                len(dataset),
            )
        else:
            dataset = get_detection_dataset_dicts(cfg.DATASETS.TRAIN, filter_empty=False)
            sampler = ResumableTrainingSampler(len(dataset), seed=seed, skip=skip)
        loader = build_detection_train_loader(cfg, mapper=mapper, dataset=dataset, sampler=sampler)
        # A DataLoader draws its workers' base seed from the global torch generator when its iterator
        # starts (lazily, inside the first training step); a dedicated generator keeps dropout & co. on
        # the global one identical between an uninterrupted and a resumed run.
        torch_loader = (
            loader if isinstance(loader, torch.utils.data.DataLoader) else getattr(loader, "dataset", None)
        )
        if isinstance(torch_loader, torch.utils.data.DataLoader):
            torch_loader.generator = torch.Generator().manual_seed(seed)
        return loader

    def build_hooks(self):
        """Detectron2's hooks plus, before the checkpointer (so checkpoints hold this step's memory),
        the RNG-state hook and, for GMM models, the online-EM hook (``GMMEMHook``; its ``OnlineGMM``
        holds the memory)."""
        hook_list = super().build_hooks()
        extra = [RNGStateHook()]
        # mixtures learned by back-propagation (MODEL.GMM.FIT backprop) need no memory and no EM
        predictors = [p for p in find_gmm_predictors(self._trainer.model) if p.fitted_by_em]
        if len(predictors) > 1:
            raise ValueError(f"found {len(predictors)} GMMPredictor modules; GMMSegTrainer supports one")
        if predictors:
            extra.append(GMMEMHook.from_config(self.cfg, predictors[0]))
        position = next(
            (i for i, h in enumerate(hook_list) if isinstance(h, hooks.PeriodicCheckpointer)), len(hook_list)
        )
        return hook_list[:position] + extra + hook_list[position:]

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        if self.start_iter > 0:  # continue the data stream where the checkpointed run stopped
            loader = self.build_train_loader(self.cfg, start_iter=self.start_iter)
            self._trainer.data_loader = loader
            self._trainer._data_loader_iter = iter(loader)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        """Test-time preprocessing; a Mask2Former model on a labelled split also gets the (resized) labels,
        from which it matches its queries for the query-level ECE (``PosteriorMaskFormer``)."""
        labelled = MetadataCatalog.get(dataset_name).get("evaluator_type", "sem_seg") == "sem_seg"
        if labelled and cfg.MODEL.META_ARCHITECTURE in MASK_FORMER_ARCHITECTURES:
            mapper = TrainLabelsMapper(cfg, is_train=False)
        else:
            mapper = SemanticDatasetMapper(cfg, is_train=False)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)
