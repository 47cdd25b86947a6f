"""Shared fixtures: tiny datasets written in the project's on-disk format and in SegmentMeIfYouCan's."""

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


SMIYC = (
    "AnomalyTrack-validation",
    "ObstacleTrack-validation",
    "LostAndFound-testNoKnown",
    "FishyLAFAnomaly-val",
)
SMIYC_H, SMIYC_W = 24, 32
# a tiny GMMSeg model with Cityscapes' 19 classes for the SMIYC fixtures (24x32 images read at 32 px; the
# config's component filters, 2 / 0 px, suit such images); randomly initialised unless MODEL.WEIGHTS is added
SMIYC_MODEL_CONFIG = (
    Path(__file__).resolve().parent.parent / "configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml"
)
SMIYC_MODEL_OPTS = [
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
    "19",
    "INPUT.MIN_SIZE_TEST",
    "32",
    "DATASETS.TRAIN",
    "()",
    "TEST.ANOMALY_EVAL_MODE",
    "exact",
]
SMIYC_LAF_FRAMES = {
    "test": (
        "01_Hanns_Klemm_Str_45_000006_000100",
        "04_Maurener_Weg_8_000000_000030",
        "02_Hanns_Klemm_Str_44_000001_000040",
    ),
    "train": ("13_Elly_Beinhorn_Str_000000_000050",),
}


def _smiyc_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (SMIYC_H, SMIYC_W, 3)).astype(np.uint8)
    Image.fromarray(rgb).save(path)


def _smiyc_labels(path: Path, values: tuple[int, ...] = (0, 1, 255), shift: int = 0) -> np.ndarray:
    """An 8x10 object (``shift`` rows down: frames differ), void bottom rows, and with a fourth value an
    extra 4x6 patch of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = np.full((SMIYC_H, SMIYC_W), values[0], np.uint8)
    lab[4 + shift : 12 + shift, 6:16] = values[1]
    lab[-3:] = values[2]
    if len(values) > 3:
        lab[14:18, 20:26] = values[3]
    Image.fromarray(lab).save(path)
    return lab


def write_anomaly_track(root: Path) -> None:
    """SMIYC's RoadAnomaly21 layout: two validation frames and a test frame without labels."""
    base = root / "dataset_AnomalyTrack"
    for i, fid in enumerate(("validation0000", "validation0001", "cow0000")):
        _smiyc_image(base / "images" / f"{fid}.jpg", seed=i)
        if fid.startswith("validation"):
            _smiyc_labels(base / "labels_masks" / f"{fid}_labels_semantic.png", shift=i)


def write_obstacle_track(root: Path) -> None:
    """RoadObstacle21: validation frames the benchmark keeps (1, 2) and excludes (19, 25), a test frame."""
    base = root / "dataset_ObstacleTrack"
    for i, fid in enumerate(
        ("validation_1", "validation_2", "validation_19", "validation_25", "curvy-street_0")
    ):
        _smiyc_image(base / "images" / f"{fid}.webp", seed=10 + i)
        _smiyc_labels(base / "labels_masks" / f"{fid}_labels_semantic.png", shift=i)


def write_laf(laf: Path) -> None:
    """LostAndFound: three test frames (one in a scene with bicycles) and one train frame."""
    for split, fids in SMIYC_LAF_FRAMES.items():
        for i, fid in enumerate(fids):
            scene = fid.rsplit("_", 2)[0]
            _smiyc_image(laf / "leftImg8bit" / split / scene / f"{fid}_leftImg8bit.png", seed=20 + i)
            # LAF ids: 1 road, 5 an obstacle, 0 ignore, 250 (> 200) not an obstacle either
            labels = laf / "gtCoarse" / split / scene / f"{fid}_gtCoarse_labelIds.png"
            _smiyc_labels(labels, (1, 5, 0, 250), shift=i)


def write_fishy(fishy: Path) -> None:
    """FishyLAF's relabelled validation frames: one from LostAndFound's test split, one from train."""
    for i, fid in enumerate(("04_Maurener_Weg_8_000000_000030", "13_Elly_Beinhorn_Str_000000_000050")):
        _smiyc_labels(fishy / "labels" / "val" / f"{fid}_fishy-labels.png", shift=2 - i)


@pytest.fixture
def smiyc_root(tmp_path, monkeypatch) -> Path:
    """The four SegmentMeIfYouCan sets in their published layouts under $DETECTRON2_DATASETS, registered."""
    from gmmseg.data.datasets import register_smiyc

    for env in ("DIR_LAF", "DIR_FISHY_LAF", "DIR_DATASETS"):
        monkeypatch.delenv(env, raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    write_anomaly_track(tmp_path)
    write_obstacle_track(tmp_path)
    write_laf(tmp_path / "dataset_LostAndFound")
    write_fishy(tmp_path / "dataset_FishyLAF")
    register_smiyc()
    return tmp_path


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
