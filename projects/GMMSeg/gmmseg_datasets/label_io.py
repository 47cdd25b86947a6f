"""Label PNGs in and out for the public datasets' preparation: reading, atomic writing, converting whole
folders in a process pool, and listing offending values in error messages."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from gmmseg.data.datasets.common import require_dir
from gmmseg.data.folder_dataset import DatasetFormatError

# (label array, source path for error messages) -> converted uint8 label array
LabelConversion = Callable[..., np.ndarray]


def unique_values(array: np.ndarray, limit: int = 10) -> str:
    """The distinct values of ``array``, at most ``limit`` of them, for an error message."""
    values = np.unique(array)
    shown = ", ".join(str(int(v)) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


def read_label(path: Path) -> np.ndarray:
    """A single-channel label PNG as an array; missing, unreadable or colour files name the path."""
    try:
        with Image.open(path) as img:
            if img.mode not in ("L", "P", "I", "I;16", "1"):
                raise DatasetFormatError(f"{path}: expected a single-channel label PNG, got mode {img.mode}")
            return np.array(img)
    except FileNotFoundError as err:
        raise DatasetFormatError(f"{path}: missing") from err
    except OSError as err:
        raise DatasetFormatError(f"{path}: unreadable ({err})") from err


def write_label(array: np.ndarray, path: Path) -> None:
    """Write a 2-D uint8 array as a mode-L PNG, atomically (PIL writes no timestamps)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(tmp, format="PNG")  # 2-D uint8: mode L
    os.replace(tmp, path)  # never leave a half-written label where a loader would take it


def map_jobs(func: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    """``func`` over ``jobs`` in order, in ``workers`` processes when there are several."""
    if workers <= 1 or len(jobs) < 2:
        return [func(job) for job in jobs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def _convert_job(job: tuple[LabelConversion, str, str]) -> str:
    convert, src, dst = job
    write_label(convert(read_label(Path(src)), source=src), Path(dst))
    return dst


def convert_folders(
    convert: LabelConversion, pairs: Sequence[tuple[Path, Path]], expected: str, workers: int
) -> int:
    """Convert every ``*.png`` of each source folder into its destination folder; return the count.

    ``convert`` must be a module-level function (the jobs are pickled to the worker processes).
    """
    jobs = []
    for src_dir, dst_dir in pairs:
        require_dir(src_dir, expected)
        files = sorted(src_dir.glob("*.png"))
        if not files:
            raise DatasetFormatError(f"{src_dir}: no .png label files (expected {expected})")
        jobs += [(convert, str(f), str(dst_dir / f.name)) for f in files]
    map_jobs(_convert_job, jobs, workers)
    return len(jobs)
