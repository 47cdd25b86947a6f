"""Trainer hooks: the GMM memory and EM update, and RNG state in checkpoints (exact resume)."""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase
from torch import nn

from gmmseg.gmm import FeatureMemory, gather_from_all_processes
from gmmseg.modeling.gmm_predictor import GMMPredictorBase

__all__ = ["GMMEMHook", "RNGStateHook", "find_gmm_predictors"]

logger = logging.getLogger(__name__)


def find_gmm_predictors(model: nn.Module) -> list[GMMPredictorBase]:
    """Every GMM predictor (pixel or query) inside ``model`` (DDP-wrapped or not)."""
    model = getattr(model, "module", model)
    return [m for m in model.modules() if isinstance(m, GMMPredictorBase)]


class GMMEMHook(HookBase):
    """Owns the feature memory and runs GMMSeg's EM after every training step.

    After each step it takes the step's labelled embeddings from the model (``pop_em_batch`` of its
    ``GMMPredictorBase``: pixels of a GMM head, or Mask2Former's queries labelled by the Hungarian
    matching; kept from the forward pass, no second pass), gathers them from all processes, runs the E-step
    (Sinkhorn by default) on that global batch, enqueues the correctly classified pixels into the
    per-(class, component) FIFO queues, and every ``interval`` iterations runs the M-step from the memory
    for the classes enqueued since the last one. (The reference updates the classes present in the
    current batch; for one whose queues got nothing new, its M-step reads the random vectors its queues
    start with. Ours hold real features only, so such a class keeps its parameters, and the classifier's
    initial stds, ``unfitted_std``, are what the reference's M-step would give it.) Every process holds
    the same memory and computes the same update, so the mixture parameters stay identical everywhere.
    The memory and the set of classes seen are saved with every checkpoint (``state_dict``) and restored
    by ``--resume``.

    ``capacity=0`` runs without a memory (the paper's "memory 0" ablation): the queues keep only what the
    steps since the previous M-step added, and are emptied after each M-step.

    ``memory_init="random"`` reproduces the reference instead, so the difference can be measured: every
    queue starts full of random unit vectors (``FeatureMemory.fill_random``, drawn from a CPU generator
    seeded ``seed``, hence identical on every process), the M-step reads all slots, and it updates every
    class present among the labelled pixels since the last M-step, whether or not any were enqueued.
    """

    def __init__(
        self,
        predictor: GMMPredictorBase,
        *,
        capacity: int = 32000,
        max_per_step: int = 20,
        sampling: str = "uniform",
        memory_dtype: torch.dtype = torch.float32,
        interval: int = 5,
        mean_momentum: float = 0.999,
        cov_momentum: float = 0.0,
        var_floor: float = 0.01,
        memory_init: str = "empty",
        seed: int = 0,
    ) -> None:
        if memory_init not in ("empty", "random"):
            raise ValueError(f"memory_init must be 'empty' or 'random', got {memory_init!r}")
        if memory_init == "random" and capacity == 0:
            raise ValueError("memory_init='random' needs a memory (capacity > 0)")
        self.predictor = predictor
        self.memory_init = memory_init
        self.interval = interval
        # capacity 0: no memory across M-steps; the queues hold what the steps since the last one added
        self.batch_only = capacity == 0
        if self.batch_only:
            capacity = max_per_step * interval
        self.mean_momentum = mean_momentum
        self.cov_momentum = cov_momentum
        self.var_floor = var_floor
        device = predictor.gmm.means.device
        self.memory = FeatureMemory(
            predictor.num_classes,
            predictor.num_components,
            predictor.embed_dim,
            capacity=capacity,
            max_per_step=max_per_step,
            sampling=sampling,
            dtype=memory_dtype,
            device=device,
        )
        if memory_init == "random":
            # a resumed run overwrites this with the checkpoint's memory (load_state_dict)
            self.memory.fill_random(torch.Generator(device="cpu").manual_seed(seed))
        # classes to update at the next M-step: those enqueued since the last one ("empty"), or those
        # present among the labelled pixels since the last one ("random", as the reference)
        self.seen = torch.zeros(predictor.num_classes, dtype=torch.bool, device=device)
        self._generator = torch.Generator(device="cpu").manual_seed(0) if sampling == "random" else None

    @classmethod
    def from_config(cls, cfg: CfgNode, predictor: GMMPredictorBase) -> GMMEMHook:
        """The hook for ``cfg.MODEL.GMM``; a random initial memory is seeded by ``cfg.SEED``, or by 0 when
        ``SEED < 0`` (a fixed seed, so that every process draws the same memory without communicating)."""
        gmm = cfg.MODEL.GMM
        return cls(
            predictor,
            capacity=gmm.MEMORY_CAPACITY,
            max_per_step=gmm.MEMORY_PER_STEP,
            sampling=gmm.MEMORY_SAMPLING,
            memory_dtype=getattr(torch, gmm.MEMORY_DTYPE),
            interval=gmm.UPDATE_INTERVAL,
            mean_momentum=gmm.MEAN_MOMENTUM,
            cov_momentum=gmm.COV_MOMENTUM,
            var_floor=gmm.VAR_FLOOR,
            memory_init=gmm.MEMORY_INIT,
            seed=cfg.SEED if cfg.SEED >= 0 else 0,
        )

    def after_step(self) -> None:
        batch = self.predictor.pop_em_batch()
        if batch is None:
            raise RuntimeError(
                "GMMEMHook found no EM batch after a training step: the GMM head did not run its losses "
                "(is the model in training mode, and is the head's forward the one from gmmseg?)"
            )
        start = time.perf_counter()
        written, seen_now = self.update(batch["embeddings"], batch["labels"], batch["correct"])
        shift = self._m_step() if (self.trainer.iter + 1) % self.interval == 0 else None
        storage = self.trainer.storage
        storage.put_scalar("gmm/em_time", time.perf_counter() - start)
        storage.put_scalar("gmm/enqueued", float(written))
        fill = self.memory.count.sum().item() / (self.memory.count.numel() * self.memory.capacity)
        storage.put_scalar("gmm/memory_fill", fill, smoothing_hint=False)
        storage.put_scalar("gmm/classes_seen", float(seen_now), smoothing_hint=False)
        if shift is not None:
            storage.put_scalar("gmm/mean_shift", shift, smoothing_hint=False)

    @torch.no_grad()
    def update(
        self, embeddings: torch.Tensor, labels: torch.Tensor, correct: torch.Tensor
    ) -> tuple[int, int]:
        """E-step and enqueue for one step's labelled pixels (this process's share).

        The pixels of all processes are gathered first and the E-step runs on the whole batch, so every
        process computes the same assignments and memory, equal to a single process seeing the global
        batch. Returns (features written, classes marked for the next M-step by this step: those
        enqueued, or with ``memory_init="random"`` those present among the labelled pixels).
        """
        embeddings, labels, correct = gather_from_all_processes(embeddings, labels, correct.to(torch.uint8))
        _, assignment = self.predictor.e_step(self.predictor.gmm.component_log_prob(embeddings), labels)
        if self.predictor.enqueue_correct_only:
            assignment = torch.where(correct.bool(), assignment, torch.full_like(assignment, -1))
        written = self.memory.enqueue(embeddings, labels, assignment, gather=False, generator=self._generator)
        marked = torch.zeros_like(self.seen)
        if self.memory_init == "random":
            marked[labels[(labels >= 0) & (labels < marked.numel())].long()] = True
        else:
            marked[labels[assignment >= 0]] = True
        self.seen |= marked
        return written, int(marked.sum())

    @torch.no_grad()
    def _m_step(self) -> float:
        """Update the mixtures of the classes marked since the last M-step (``seen``); returns the mean
        shift of their means (average L2 distance), for monitoring."""
        gmm = self.predictor.gmm
        old_means, old_stds = gmm.means.clone(), gmm.stds.clone()
        if not bool(self.seen.any()):
            return 0.0
        gmm.update_from_memory(
            self.memory,
            mean_momentum=self.mean_momentum,
            cov_momentum=self.cov_momentum,
            var_floor=self.var_floor,
        )
        keep = ~self.seen[:, None, None]
        gmm.update_parameters(torch.where(keep, old_means, gmm.means), torch.where(keep, old_stds, gmm.stds))
        shift = (gmm.means - old_means)[self.seen].norm(dim=-1).mean().item()
        self.seen.zero_()
        if self.batch_only:
            self.memory.reset()
        return shift

    def state_dict(self) -> dict[str, Any]:
        return {
            "memory": self.memory.state_dict(),
            "seen": self.seen.clone(),
            "generator": self._generator.get_state() if self._generator is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.memory.load_state_dict(state_dict["memory"])
        self.seen.copy_(state_dict["seen"])
        if self._generator is not None and state_dict.get("generator") is not None:
            self._generator.set_state(state_dict["generator"])
        logger.info(
            "GMM memory restored: %d features in %d queues",
            int(self.memory.count.sum()),
            int((self.memory.count > 0).sum()),
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
