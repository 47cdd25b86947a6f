"""Trainer hooks: the GMM online EM adapter, and RNG state in checkpoints (exact resume)."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, Mapping

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from torch import nn

from gmmseg.gmm import EMBatch, MixtureDiagnostics, OnlineGMM, gather_from_all_processes
from gmmseg.modeling.gmm_predictor import GMMPredictorBase

__all__ = ["GMMEMHook", "RNGStateHook", "find_gmm_predictors", "upgrade_em_hook_state"]

logger = logging.getLogger(__name__)


def find_gmm_predictors(model: nn.Module) -> list[GMMPredictorBase]:
    """Every GMM predictor (pixel or query) inside ``model`` (DDP-wrapped or not)."""
    model = getattr(model, "module", model)
    return [m for m in model.modules() if isinstance(m, GMMPredictorBase)]


def upgrade_em_hook_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """``GMMEMHook``'s checkpoint state in the current layout (``OnlineGMM.state_dict``).

    Releases up to 0.1.0 saved ``{"memory": {features, ptr, count, sums, sq_sums}, "seen": ...,
    "generator": state or None}``; now the keys are flat: ``memory.features``, ..., ``seen`` and
    ``sampling_generator``. A state already in the current layout is returned as it is.
    """
    if not isinstance(state.get("memory"), Mapping):
        return dict(state)
    upgraded = {f"memory.{k}": v for k, v in state["memory"].items()}
    upgraded["seen"] = state["seen"]
    if state.get("generator") is not None:
        upgraded["sampling_generator"] = state["generator"]
    return upgraded


class GMMEMHook(HookBase):
    """The trainer's adapter of ``OnlineGMM`` (GMMSeg's online EM) for one GMM predictor.

    It subscribes to the predictor's ``em_observer``: each training step's losses run the E-step once and
    hand over the labelled embeddings with their assignments (``EMBatch``: pixels of a GMM head, or
    Mask2Former's queries labelled by the Hungarian matching; no second forward pass). The hook gathers
    them from all processes and gives them to ``online.observe`` (enqueue); after the step it runs
    ``online.maximise`` (the M-step) every ``MODEL.GMM.UPDATE_INTERVAL`` iterations, logs, and saves and
    restores ``online``'s state with the trainer's checkpoints (``--resume``).

    Every ``diagnostics_period`` iterations (``MODEL.GMM.DIAGNOSTICS_PERIOD``; 0: never) it also logs the
    mixtures' per-class statistics (``gmm.MixtureDiagnostics``) as ``gmm_diag/<statistic>/<class>``:
    ``std``, ``memory_share``, ``mean_angle``, ``offered_per_step``, ``written_per_step``; classes by index,
    Mask2Former's last one as ``no_object``. With a LayerNorm over the class scores, also its per-class
    weight and bias (``logit_scale``, ``logit_bias``) and their mean weight, ``gmm_diag/logit_scale_mean``:
    the inverse temperature of the posteriors.

    Every process enqueues the same global batch and computes the same M-step, so the mixtures stay
    identical everywhere. Each process's assignments come from the E-step on its own share of the batch
    (the same assignments its component loss uses, as in the reference); with the Sinkhorn E-step, whose
    equipartition is over the items it is given, that differs from one E-step over the gathered batch.
    """

    def __init__(
        self, predictor: GMMPredictorBase, diagnostics_period: int = 0, **online_kwargs: Any
    ) -> None:
        """``online_kwargs``: ``OnlineGMM``'s settings; its E-step is the predictor's."""
        self.online = OnlineGMM(predictor.gmm, e_step=predictor.e_step, **online_kwargs)
        predictor.em_observer = self.observe
        self.predictor = predictor
        self._observed: tuple[int, int, float] | None = None  # this step's (written, marked, seconds)
        self.diagnostics_period = diagnostics_period
        names = [str(c) for c in range(predictor.num_classes)]
        if getattr(predictor, "num_object_classes", predictor.num_classes) < predictor.num_classes:
            names[-1] = "no_object"  # Mask2Former's extra class (QueryGMMPredictor)
        self.class_names = names
        self._diagnostics = MixtureDiagnostics(self.online)
        self._steps_since_diagnostics = 0

    @classmethod
    def from_config(cls, cfg: CfgNode, predictor: GMMPredictorBase) -> GMMEMHook:
        """The hook for ``cfg.MODEL.GMM``; a random initial memory is seeded by ``cfg.SEED``, or by 0 when
        ``SEED < 0`` (a fixed seed, so that every process draws the same memory without communicating).
        ``MEMORY_INIT`` describes a memory: with ``MEMORY_CAPACITY 0`` (none, the paper's ablation) it is
        ignored, so that the ablation stays one key away from the default ``random``."""
        gmm = cfg.MODEL.GMM
        return cls(
            predictor,
            enqueue_correct_only=gmm.ENQUEUE_CORRECT_ONLY,
            capacity=gmm.MEMORY_CAPACITY,
            max_per_step=gmm.MEMORY_PER_STEP,
            sampling=gmm.MEMORY_SAMPLING,
            memory_dtype=getattr(torch, gmm.MEMORY_DTYPE),
            memory_init=gmm.MEMORY_INIT if gmm.MEMORY_CAPACITY > 0 else "empty",
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
            interval=gmm.UPDATE_INTERVAL,
            mean_momentum=gmm.MEAN_MOMENTUM,
            cov_momentum=gmm.COV_MOMENTUM,
            var_floor=gmm.VAR_FLOOR,
            diagnostics_period=gmm.DIAGNOSTICS_PERIOD,
        )

    def before_train(self) -> None:
        """Start the diagnostics from the mixtures as training starts (a resumed run's, once loaded)."""
        self._diagnostics = MixtureDiagnostics(self.online)
        self._steps_since_diagnostics = 0

    def observe(self, batch: EMBatch) -> None:
        """The predictor's ``em_observer``: gather this process's share from all processes (rank order)
        and enqueue the global batch."""
        start = time.perf_counter()
        embeddings, labels, correct, assignment = gather_from_all_processes(
            batch.embeddings, batch.labels, batch.correct.to(torch.uint8), batch.assignment
        )
        written, marked = self.online.observe(embeddings, labels, correct.bool(), assignment)
        previous = self._observed or (0, 0, 0.0)  # a step with several forward passes adds up
        self._observed = (
            previous[0] + written,
            previous[1] + marked,
            previous[2] + time.perf_counter() - start,
        )

    def after_step(self) -> None:
        if self._observed is None:
            raise RuntimeError(
                "GMMEMHook received no EM batch in a training step: the GMM head did not run its losses "
                "(is the model in training mode, and is the head's forward the one from gmmseg?)"
            )
        (written, marked, seconds), self._observed = self._observed, None
        start = time.perf_counter()
        shift = self.online.maximise() if self.online.due(self.trainer.iter + 1) else None
        storage = self.trainer.storage
        storage.put_scalar("gmm/em_time", seconds + time.perf_counter() - start)
        storage.put_scalar("gmm/enqueued", float(written))
        memory = self.online.memory
        fill = memory.count.sum().item() / (memory.count.numel() * memory.capacity)
        storage.put_scalar("gmm/memory_fill", fill, smoothing_hint=False)
        storage.put_scalar("gmm/classes_seen", float(marked), smoothing_hint=False)
        if shift is not None:
            storage.put_scalar("gmm/mean_shift", shift, smoothing_hint=False)
        self._steps_since_diagnostics += 1
        if self.diagnostics_period > 0 and (self.trainer.iter + 1) % self.diagnostics_period == 0:
            storage.put_scalars(smoothing_hint=False, **self.collect_diagnostics())

    def collect_diagnostics(self) -> dict[str, float]:
        """The ``gmm_diag/*`` scalars (class docstring) over the steps since the previous call."""
        stats = self._diagnostics.collect(max(self._steps_since_diagnostics, 1))
        self._steps_since_diagnostics = 0
        norm = self.predictor.logit_norm
        if isinstance(norm, nn.LayerNorm) and norm.weight is not None:
            stats["logit_scale"] = norm.weight.detach()
            if norm.bias is not None:
                stats["logit_bias"] = norm.bias.detach()
        scalars = {
            f"gmm_diag/{name}/{cls}": value
            for name, values in stats.items()
            for cls, value in zip(self.class_names, values.tolist())
        }
        if "logit_scale" in stats:
            scalars["gmm_diag/logit_scale_mean"] = stats["logit_scale"].double().mean().item()
        return scalars

    def state_dict(self) -> dict[str, Any]:
        return self.online.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.online.load_state_dict(upgrade_em_hook_state(state_dict))
        logger.info(
            "GMM memory restored: %d features in %d queues",
            int(self.online.memory.count.sum()),
            int((self.online.memory.count > 0).sum()),
        )


class RNGStateHook(HookBase):
    """Saves the random number generators' states with every checkpoint and restores them on resume, so
    that dropout and random sampling continue exactly as in an uninterrupted run.

    The states are applied in ``before_train`` (not at load time), after the trainer has rebuilt its
    data loader, which itself draws from the torch generator.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        # plain tensors and numbers only: checkpoints load with torch.load(weights_only=True)
        name, keys, pos, has_gauss, cached = np.random.get_state()
        numpy_state = {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        }
        state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict

    def before_train(self) -> None:
        if self._pending is None:
            return
        torch.set_rng_state(self._pending["torch"])
        n = self._pending["numpy"]
        np.random.set_state(
            (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        )
        random.setstate(self._pending["python"])
        if "cuda" in self._pending and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self._pending["cuda"])
        self._pending = None
