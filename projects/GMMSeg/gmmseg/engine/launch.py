"""Multi-process launch on GPUs (NCCL) or CPUs (gloo), with Detectron2's flags and conventions.

Detectron2 v0.6's ``launch`` hard-codes NCCL and asserts CUDA, so ``--num-gpus 2 MODEL.DEVICE cpu`` cannot
run there. This launcher behaves the same on GPUs and, for CPU runs, starts the processes with gloo, so
multi-process training (gathered GMM memory, merged evaluation) runs and is tested on CPU-only machines.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine.launch import _find_free_port
from detectron2.utils import comm

__all__ = ["DEFAULT_TIMEOUT", "launch"]

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
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` processes on each machine.

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
