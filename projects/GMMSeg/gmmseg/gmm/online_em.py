"""Online EM of GMMSeg's class mixtures: the whole fitting state and both EM steps in one object.

``OnlineGMM`` owns what fitting the mixtures of a ``GaussianMixtureClassifier`` needs beyond the
classifier's own means and stds: the feature memory, the classes seen since the last M-step, the E-step
settings (``EStep``) and the M-step settings. A training step hands it one ``observe`` call (E-step,
unless the caller already ran it, and enqueue); every ``interval`` steps ``maximise`` runs the M-step.
The classifier stays a pure scorer: it knows nothing of the memory.

In GMMSeg the E-step of a step serves two purposes: its assignments are the targets of the component loss
and the components the features are enqueued into. ``EStep`` is that E-step; the model runs it once per
step, and passes its assignment to ``observe`` together with the features (``EMBatch`` carries them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from .classifier import GaussianMixtureClassifier
from .em import e_step, m_step
from .memory import FeatureMemory
from .precision import float32_region

__all__ = ["EMBatch", "EStep", "OnlineGMM"]


@dataclass(frozen=True)
class EStep:
    """E-step settings: how labelled features are assigned to one component of their own class.

    ``method`` "sinkhorn" (GMMSeg: equipartition among each class's features, ``n_iters`` rounds at
    temperature ``epsilon``, on log-likelihoods scaled to [-1, 1]) or "vanilla" (plain EM: the most
    likely component). Assignments are hard, as in the reference.
    """

    method: str = "sinkhorn"
    epsilon: float = 0.05
    n_iters: int = 3

    def __post_init__(self) -> None:
        if self.method not in ("sinkhorn", "vanilla"):
            raise ValueError(f"E-step method must be 'sinkhorn' or 'vanilla', got {self.method!r}")

    def assign(self, component_log_prob: Tensor, labels: Tensor) -> Tensor:
        """``(N,)`` component of each item within its class, for ``(N, C, K)`` log-likelihoods and
        ``(N,)`` labels; -1 where the label is outside ``[0, C)``."""
        _, assignment = e_step(
            component_log_prob,
            labels,
            num_classes=component_log_prob.shape[1],
            method=self.method,
            hard=True,
            epsilon=self.epsilon,
            n_iters=self.n_iters,
        )
        return assignment


@dataclass(frozen=True)
class EMBatch:
    """One training step's labelled items as the E-step left them: what ``OnlineGMM.observe`` takes.

    ``embeddings`` (P, D) detached features, ``labels`` (P,) class ids, ``correct`` (P,) bool (the model's
    argmax equals the label), ``assignment`` (P,) the component of the own class (-1: none).
    """

    embeddings: Tensor
    labels: Tensor
    correct: Tensor
    assignment: Tensor


class OnlineGMM:
    """GMMSeg's online EM for the mixtures of ``classifier``: memory, classes seen, E- and M-step.

    ``observe`` enqueues a step's labelled features into the per-(class, component) FIFO queues
    (``FeatureMemory``: ``capacity`` per queue, at most ``max_per_step`` per queue and step); with
    ``enqueue_correct_only`` only those the model classified correctly (reference). ``maximise`` runs the
    momentum M-step (``gmm.em.m_step``) from the memory for the classes marked since the last one and
    writes it into the classifier's buffers; the others keep their parameters. ``due(step)`` says whether
    the M-step is due after the ``step``-th observed step (every ``interval``).

    ``memory_init="empty"`` (this class's default; ``MODEL.GMM.MEMORY_INIT``'s is "random"): queues hold real
    features only, and a class is marked when features of it were enqueued. (The reference updates the classes
    present in the current batch; for one whose queues got nothing new its M-step reads the random vectors its
    queues start with. Here such a class keeps its parameters, and the classifier's initial stds,
    ``unfitted_std``, are what the reference's M-step would give it.) ``memory_init="random"`` reproduces the
    reference: every queue starts full of random unit vectors (``FeatureMemory.fill_random``, from a CPU
    generator seeded ``seed``, hence identical on every process), the M-step reads all slots, and it updates
    every class present among the labelled features since the last M-step, enqueued or not.

    ``capacity=0`` runs without a memory (the paper's "memory 0" ablation): the queues keep only what the
    steps since the previous M-step added (room for ``interval * max_per_step``) and are emptied after
    each M-step.

    Several processes keep identical mixtures when each observes the same global batch (gather it first).
    Not an ``nn.Module``: it is training state, saved with ``state_dict`` beside the model, not in it.
    """

    def __init__(
        self,
        classifier: GaussianMixtureClassifier,
        *,
        e_step: EStep | None = None,
        enqueue_correct_only: bool = True,
        capacity: int = 32000,
        max_per_step: int = 20,
        sampling: str = "uniform",
        memory_dtype: torch.dtype = torch.float32,
        memory_init: str = "empty",
        seed: int = 0,
        interval: int = 5,
        mean_momentum: float = 0.999,
        cov_momentum: float = 0.0,
        var_floor: float = 0.01,
    ) -> None:
        if classifier.trainable:
            raise ValueError(
                "the classifier's mixtures are learned by back-propagation: nothing to fit by EM"
            )
        if memory_init not in ("empty", "random"):
            raise ValueError(f"memory_init must be 'empty' or 'random', got {memory_init!r}")
        if memory_init == "random" and capacity == 0:
            raise ValueError("memory_init='random' needs a memory (capacity > 0)")
        if interval < 1 or capacity < 0:
            raise ValueError(f"need interval >= 1 and capacity >= 0, got {interval} and {capacity}")
        self.classifier = classifier
        self.e_step = e_step if e_step is not None else EStep()
        self.enqueue_correct_only = enqueue_correct_only
        self.memory_init = memory_init
        self.interval = interval
        self.mean_momentum = mean_momentum
        self.cov_momentum = cov_momentum
        self.var_floor = var_floor
        # capacity 0: no memory across M-steps; the queues hold what the steps since the last one added
        self.batch_only = capacity == 0
        device = classifier.means.device
        self.memory = FeatureMemory(
            classifier.num_classes,
            classifier.num_components,
            classifier.dim,
            capacity=max_per_step * interval if self.batch_only else capacity,
            max_per_step=max_per_step,
            sampling=sampling,
            dtype=memory_dtype,
            device=device,
        )
        if memory_init == "random":
            # a resumed run overwrites this with the checkpoint's memory (load_state_dict)
            self.memory.fill_random(torch.Generator(device="cpu").manual_seed(seed))
        # classes to update at the next M-step: those enqueued since the last one ("empty"), or those
        # present among the labelled features since the last one ("random", as the reference)
        self.seen = torch.zeros(classifier.num_classes, dtype=torch.bool, device=device)
        self._generator = torch.Generator(device="cpu").manual_seed(0) if sampling == "random" else None

    @float32_region
    @torch.no_grad()
    def observe(
        self, embeddings: Tensor, labels: Tensor, correct: Tensor, assignment: Tensor | None = None
    ) -> tuple[int, int]:
        """Enqueue one step's labelled features; returns (slots written, classes marked by this step).

        ``embeddings`` (P, D), ``labels`` (P,) (outside ``[0, C)``: skipped), ``correct`` (P,) bool.
        ``assignment`` (P,): each item's component from the E-step the caller already ran (the one its
        component loss used); without it the E-step (``self.e_step``) runs here on the classifier's
        log-likelihoods of ``embeddings``.
        """
        labels = labels.reshape(-1).long()
        if assignment is None:
            assignment = self.e_step.assign(self.classifier.component_log_prob(embeddings), labels)
        assignment = assignment.reshape(-1).long()
        if self.enqueue_correct_only:
            assignment = torch.where(correct.reshape(-1).bool(), assignment, torch.full_like(assignment, -1))
        written = self.memory.enqueue(embeddings, labels, assignment, gather=False, generator=self._generator)
        labelled = (labels >= 0) & (labels < self.classifier.num_classes)
        if self.memory_init == "empty":
            labelled &= (assignment >= 0) & (assignment < self.classifier.num_components)
        marked = torch.zeros_like(self.seen)
        marked[labels[labelled]] = True
        self.seen |= marked
        return written, int(marked.sum())

    def due(self, step: int) -> bool:
        """Whether the M-step runs after training step number ``step`` (counted from 1)."""
        return step % self.interval == 0

    @float32_region
    @torch.no_grad()
    def maximise(self) -> float:
        """M-step for the classes marked since the last one (``seen``), written into the classifier;
        returns the mean shift of their means (average L2 distance), for monitoring."""
        clf = self.classifier
        if not bool(self.seen.any()):
            return 0.0
        old_means, old_stds = clf.means.clone(), clf.stds.clone()
        means, stds = m_step(
            self.memory,
            old_means,
            old_stds,
            mean_momentum=self.mean_momentum,
            cov_momentum=self.cov_momentum,
            var_floor=self.var_floor,
        )
        seen = self.seen[:, None, None]
        clf.update_parameters(torch.where(seen, means, old_means), torch.where(seen, stds, old_stds))
        shift = (clf.means - old_means)[self.seen].norm(dim=-1).mean().item()
        self.seen.zero_()
        if self.batch_only:
            self.memory.reset()
        return shift

    def state_dict(self) -> dict[str, Tensor]:
        """The fitting state as plain tensors (loads with ``torch.load(weights_only=True)``): the memory's
        buffers (``memory.*``), ``seen`` and, for random sampling, ``sampling_generator``. The mixtures
        themselves are the classifier's (the model's state)."""
        state = {f"memory.{k}": v for k, v in self.memory.state_dict().items()}
        state["seen"] = self.seen.clone()
        if self._generator is not None:
            state["sampling_generator"] = self._generator.get_state()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``'s output (shapes must match: same classes, components, capacity)."""
        known = {f"memory.{k}" for k in self.memory.state_dict()} | {"seen", "sampling_generator"}
        unknown = sorted(set(state_dict) - known)
        if unknown:
            raise KeyError(f"unexpected keys in the OnlineGMM state: {unknown}")
        prefix = "memory."
        self.memory.load_state_dict(
            {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        )
        self.seen.copy_(state_dict["seen"])
        if self._generator is not None and state_dict.get("sampling_generator") is not None:
            self._generator.set_state(state_dict["sampling_generator"])
