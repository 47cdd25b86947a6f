"""Work-arounds for Detectron2 v0.6 (the release this project installs), kept together.

Each says what fails in v0.6 and where Detectron2 stands later. v0.6 (late 2021) is Detectron2's latest
release: fixes made since are on its main branch only, so each work-around can go once the project moves
to a Detectron2 that has the fix (checked against main's source, ``facebookresearch/detectron2``):

- ``launch``: v0.6 asserts CUDA and hard-codes NCCL, so multi-process CPU runs (``--num-gpus 2
  MODEL.DEVICE cpu``) are impossible. Main (commit b4b6cc9c, PR #4720, January 2023) uses gloo when no
  GPU is visible; it still picks NCCL for CPU runs on a machine that has GPUs, which this one does not.
- ``wrap_distributed``: v0.6's ``DefaultTrainer`` wraps the model with ``create_ddp_model``, which always
  passes ``device_ids``, and DistributedDataParallel rejects ``device_ids`` for CPU models. Unchanged on
  main: still needed.
- ``OptimizerStateInCheckpoints``: v0.6's ``DefaultTrainer`` leaves the optimizer out of its checkpoints,
  so ``--resume`` restarts SGD momentum and Adam moments. Fixed on main (commit ac6774fe, PR #3686,
  November 2021: ``DefaultTrainer.state_dict`` saves ``_trainer``, whose state holds the optimizer).
- ``WarmupPolyLR``: DeepLab's schedule stores ``max_iters`` & co. in its state dict, so ``--resume`` with a
  larger ``SOLVER.MAX_ITER`` restores the old length and then fails with a math domain error once past it.
  Unchanged on main: still needed.
- ``tracing_adapter``: v0.6's ``detectron2/export/__init__.py`` imports ``caffe2``, which PyTorch no
  longer ships, so ``from detectron2.export import TracingAdapter`` fails. Fixed on main (commit d29378aa,
  November 2021: "caffe2 is optional").
- ``AnyDeviceAMPTrainer``: v0.6's ``AMPTrainer`` asserts CUDA and uses ``torch.cuda.amp`` (float16 only), so
  ``SOLVER.AMP.ENABLED`` cannot train on the CPU. Main lets the dtype be chosen (commit 96c752ce, November
  2022) but still asserts CUDA: still needed.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import types
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import SimpleTrainer
from detectron2.engine.launch import _find_free_port
from detectron2.projects.deeplab.lr_scheduler import WarmupPolyLR as _DeepLabWarmupPolyLR
from detectron2.solver.lr_scheduler import _get_warmup_factor_at_iter
from detectron2.utils import comm
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = [
    "DEFAULT_TIMEOUT",
    "AnyDeviceAMPTrainer",
    "OptimizerStateInCheckpoints",
    "WarmupPolyLR",
    "amp_dtype",
    "launch",
    "tracing_adapter",
    "wrap_distributed",
]

DEFAULT_TIMEOUT = timedelta(minutes=30)


def launch(
    main_func: Callable[..., Any],
    num_processes_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str | None = None,
    args: tuple = (),
    timeout: timedelta = DEFAULT_TIMEOUT,
    device: str = "cuda",
) -> None:
    """Detectron2's ``launch`` that also runs on CPU: ``main_func(*args)`` in ``num_processes_per_machine``
    processes on each machine.

    ``device`` "cuda" uses one GPU per process and NCCL; "cpu" uses gloo. ``dist_url`` "auto" picks a
    free local port (single machine only), as in Detectron2.
    """
    world_size = num_machines * num_processes_per_machine
    if world_size <= 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines != 1:
            raise ValueError("--dist-url auto works only on one machine; give tcp://HOST:PORT")
        dist_url = f"tcp://127.0.0.1:{_find_free_port()}"
    if num_machines > 1 and str(dist_url).startswith("file://"):
        logging.getLogger(__name__).warning(
            "file:// is not a reliable init_method across machines; prefer tcp://"
        )
    mp.spawn(
        _worker,
        nprocs=num_processes_per_machine,
        args=(
            main_func,
            world_size,
            num_processes_per_machine,
            machine_rank,
            dist_url,
            args,
            timeout,
            device,
        ),
        daemon=False,
    )


def _worker(
    local_rank: int,
    main_func: Callable[..., Any],
    world_size: int,
    num_processes_per_machine: int,
    machine_rank: int,
    dist_url: str,
    args: tuple,
    timeout: timedelta,
    device: str,
) -> None:
    use_cuda = device.startswith("cuda")
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("MODEL.DEVICE is cuda but CUDA is not available; use MODEL.DEVICE cpu")
        if num_processes_per_machine > torch.cuda.device_count():
            raise RuntimeError(
                f"--num-gpus {num_processes_per_machine} but {torch.cuda.device_count()} GPUs are visible"
            )
    global_rank = machine_rank * num_processes_per_machine + local_rank
    try:
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=dist_url,
            world_size=world_size,
            rank=global_rank,
            timeout=timeout,
        )
    except Exception:
        logging.getLogger(__name__).error("Process group URL: %s", dist_url)
        raise
    # Detectron2's comm module finds the local rank through this group.
    num_machines = world_size // num_processes_per_machine
    for i in range(num_machines):
        group = dist.new_group(
            list(range(i * num_processes_per_machine, (i + 1) * num_processes_per_machine))
        )
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = group
    if use_cuda:
        torch.cuda.set_device(local_rank)
    comm.synchronize()
    try:
        main_func(*args)
    finally:
        dist.destroy_process_group()


def wrap_distributed(model: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel when there are several processes: one GPU each, or CPU (gloo), where
    ``device_ids`` must be left out."""
    if comm.get_world_size() == 1:
        return model
    device_ids = [comm.get_local_rank()] if device.startswith("cuda") else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


class OptimizerStateInCheckpoints:
    """Mixin for a ``DefaultTrainer`` subclass (listed before it): its checkpoints keep the optimizer
    state (``_trainer``, the key Detectron2's main branch uses), so a resumed run continues SGD momentum
    and the learning rate where it stopped."""

    _trainer: Any

    def state_dict(self) -> dict:
        state = super().state_dict()  # type: ignore[misc]
        state["_trainer"] = self._trainer.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logging.getLogger(__name__).warning("checkpoint has no optimizer state: SGD momentum restarts")


class WarmupPolyLR(_DeepLabWarmupPolyLR):
    """DeepLab's schedule, safe to resume with a changed schedule: lr = base * warmup(it) * (1 - it /
    max_iters) ** power, floored at ``constant_ending * base`` when that is set.

    The state dict holds only the progress, so the schedule always comes from the config; iterations past
    the end keep the final learning rate instead of failing.
    """

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


def tracing_adapter() -> type[nn.Module]:
    """Detectron2's ``TracingAdapter`` class. Where ``detectron2.export`` fails to import for want of
    caffe2 (v0.6), its ``flatten`` module is loaded under a bare package that runs no ``__init__``; the bare
    package is dropped again, so ``import detectron2.export`` behaves as before."""
    try:
        from detectron2.export import TracingAdapter
    except ModuleNotFoundError as error:
        if not (error.name or "").startswith("caffe2"):
            raise
    else:
        return TracingAdapter
    import detectron2

    name = "detectron2.export"
    package = types.ModuleType(name)
    package.__path__ = [str(Path(detectron2.__file__).parent / "export")]
    sys.modules[name] = package
    try:
        from detectron2.export.flatten import TracingAdapter
    finally:
        del sys.modules[name]
    return TracingAdapter


def amp_dtype(device: str, name: str = "auto") -> torch.dtype:
    """The autocast dtype ``SOLVER.AMP.DTYPE`` names on ``device`` ("auto": float16 on CUDA, bfloat16
    elsewhere, where float16 kernels are few and slow)."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


class AnyDeviceAMPTrainer(SimpleTrainer):
    """v0.6's ``AMPTrainer`` on the model's device: ``torch.autocast(device_type, dtype)``, with a
    ``GradScaler`` for float16 only (bfloat16 has float32's exponent range: gradients do not underflow).
    Its ``state_dict`` holds ``grad_scaler`` as v0.6's does (empty when the scaler is off)."""

    def __init__(
        self, model: nn.Module, data_loader, optimizer, *, device_type: str, dtype: torch.dtype
    ) -> None:
        super().__init__(model, data_loader, optimizer)
        self.device_type = device_type
        self.dtype = dtype
        self.grad_scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)

    def run_step(self) -> None:
        assert self.model.training, "[AnyDeviceAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start
        with torch.autocast(self.device_type, dtype=self.dtype):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        self.optimizer.zero_grad()
        self.grad_scaler.scale(losses).backward()
        self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["grad_scaler"] = self.grad_scaler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        scaler_state = state_dict.get("grad_scaler")
        if scaler_state:  # absent or empty: saved without AMP or with the scaler off
            self.grad_scaler.load_state_dict(scaler_state)
