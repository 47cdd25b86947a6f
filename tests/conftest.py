"""Shared fixtures: tiny datasets written in the project's on-disk format."""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_folder_dataset(
    root: Path,
    name: str,
    splits: dict[str, int],
    size: tuple[int, int] = (32, 40),
    num_classes: int = 3,
    ignore_label: int = 255,
    with_ood: bool = False,
    seed: int = 0,
) -> Path:
    """Write ``root/name`` in the generic format: meta.json + <split>/images|labels[/ood]."""
    rng = np.random.default_rng(seed)
    dataset_dir = root / name
    dataset_dir.mkdir(parents=True)
    meta = {
        "classes": [f"class{i}" for i in range(num_classes)],
        "colors": [[int(v) for v in rng.integers(0, 256, 3)] for _ in range(num_classes)],
        "ignore_label": ignore_label,
    }
    (dataset_dir / "meta.json").write_text(json.dumps(meta))
    h, w = size
    for split, count in splits.items():
        for sub in ("images", "labels") + (("ood",) if with_ood else ()):
            (dataset_dir / split / sub).mkdir(parents=True)
        for i in range(count):
            label = rng.integers(0, num_classes, (h, w)).astype(np.uint8)
            label[:2] = ignore_label
            image = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
            Image.fromarray(image).save(dataset_dir / split / "images" / f"{i:04d}.png")
            Image.fromarray(label).save(dataset_dir / split / "labels" / f"{i:04d}.png")
            if with_ood:
                ood = (label == 0).astype(np.uint8)
                ood[:2] = 255
                Image.fromarray(ood).save(dataset_dir / split / "ood" / f"{i:04d}.png")
    return dataset_dir


@pytest.fixture
def unique_name() -> str:
    """A dataset name no other test registers (Detectron2's catalogs are process-global)."""
    return f"t{uuid.uuid4().hex[:8]}"


def run_two_gloo_workers(worker, args: tuple, out_dir: Path, timeout: float = 180) -> tuple:
    """Start ``worker(rank, *args)`` in 2 spawned processes and return the objects each pickled to
    ``out_dir/rank<r>.pkl``.

    The processes are joined by hand instead of ``mp.spawn(join=True)``: that kills the other rank as soon
    as one exits non-zero, and gloo occasionally aborts ("terminate called without an active exception")
    while tearing down after the work is done. Workers write their results before teardown, so one that
    failed for real leaves no ``rank*.pkl`` (and a traceback in ``rank*.err``).
    """
    import pickle

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    for proc in ctx.processes:
        proc.join(timeout=timeout)
    for proc in ctx.processes:
        if proc.is_alive():
            proc.terminate()
            proc.join()
            pytest.fail("distributed worker hung")
    errors = {p.name: p.read_text() for p in out_dir.glob("rank*.err")}
    assert not errors, errors
    exitcodes = [proc.exitcode for proc in ctx.processes]
    assert all(code == 0 or code < 0 for code in exitcodes), exitcodes  # < 0: signal at teardown
    results = []
    for rank in range(2):
        with open(out_dir / f"rank{rank}.pkl", "rb") as f:
            results.append(pickle.load(f))
    return tuple(results)


def save_gloo_worker_result(out: str, rank: int, work) -> None:
    """The worker side of ``run_two_gloo_workers``, in a process whose gloo group is initialised: run
    ``work()``, wait for every rank (nobody tears gloo down while a peer may still be inside a collective)
    and pickle its result to ``out/rank<rank>.pkl``; on an exception write the traceback to
    ``out/rank<rank>.err`` instead and re-raise. The process group is destroyed in every case."""
    import os
    import pickle
    import traceback

    import torch.distributed as dist

    try:
        result = work()
        dist.barrier()
        with open(os.path.join(out, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump(result, f)
    except BaseException:
        with open(os.path.join(out, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
