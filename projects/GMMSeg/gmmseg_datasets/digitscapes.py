"""DigitScapes: a small, deterministic, multi-modal scene-segmentation dataset with anomalies.

GMMSeg models every class as a Gaussian mixture and flags pixels that no class explains as anomalies. A
benchmark for it therefore needs (a) known classes that are genuinely multi-modal, so that one Gaussian
per class underfits, and (b) unknown objects at test time, both close to and far from the known classes.
Nothing can be downloaded here, so the dataset is synthesised from real data shipped with scikit-learn:

* stuff classes (``sky``, ``water``, ``foliage``, ``building``) are textured with crops of the two sample
  photographs (``china.jpg``: sky, lake, trees, pagoda; ``flower.jpg``: blurred leaves) and laid out like a
  landscape: sky above a horizon, lake below it, buildings standing on the horizon, foliage in front;
* ``digit 0`` ... ``digit 7`` are handwritten 8x8 scans (``load_digits``) upsampled and pasted as objects;
* ``anomaly_val`` adds 1-3 unknown objects per image: held-out digits 8/9 (near OOD, same styles as the
  known digits) or pattern-filled geometric shapes (far OOD).

Multi-modality comes from styles that are independent of the class: four colour schemes for the whole
background (natural, night, sepia, greyscale), two foliage sources, and for digits six ink palettes shared
by all digit classes, solid or textured fill, three stroke widths and three scales. The class is
identified by shape (and texture/layout for stuff), never by colour alone.

No test pixel has been seen in training: train textures come from one part of each photograph and
val/anomaly_val textures from another, and the digit scans are split into disjoint pools per split.

Everything is a pure function of ``(seed, split, index, image_size)`` (a ``numpy`` Generator seeded with
``SeedSequence([seed, split_code, index])``), so the output is byte-identical for any worker count.
None of the DigitScapes modules imports torch or Detectron2, so the dataset can be prepared anywhere.

This module writes the dataset (``generate_digitscapes``) and is the one to import: it re-exports the
public names of ``digitscapes_spec`` (classes, splits, styles), ``digitscapes_sources`` (the
scikit-learn photographs and digit scans) and ``digitscapes_render`` (one scene, ``render_scene``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

from gmmseg_datasets.digitscapes_render import render_scene
from gmmseg_datasets.digitscapes_sources import digit_scan_pools, texture_bank
from gmmseg_datasets.digitscapes_spec import (
    ANOMALY_DIGITS,
    CORE_ALPHA,
    DEFAULT_COUNTS,
    DIGIT_CLASSES,
    DIGIT_FILLS,
    DIGIT_SCALES,
    DIGIT_STROKES,
    DIGITSCAPES_CLASSES,
    DIGITSCAPES_COLORS,
    FAR_FILLS,
    FAR_SHAPES,
    IGNORE_LABEL,
    INK_PALETTES,
    KNOWN_DIGITS,
    OOD_FAMILIES,
    PETAL_REGION,
    SCENE_STYLES,
    SPLIT_CODES,
    SPLITS,
    STUFF_CLASSES,
    TEXTURE_REGIONS,
    VOID_ALPHA,
)

__all__ = [
    "ANOMALY_DIGITS",
    "DEFAULT_COUNTS",
    "DIGITSCAPES_CLASSES",
    "DIGITSCAPES_COLORS",
    "DIGIT_CLASSES",
    "GENERATOR_VERSION",
    "IGNORE_LABEL",
    "KNOWN_DIGITS",
    "OOD_FAMILIES",
    "SCENE_STYLES",
    "SPLITS",
    "STUFF_CLASSES",
    "digit_scan_pools",
    "generate_digitscapes",
    "render_scene",
]

GENERATOR_NAME = "digitscapes"
GENERATOR_VERSION = 1

_WORKER: dict[str, Any] = {}


def _init_worker(out_dir: str, seed: int, image_size: int) -> None:
    cv2.setNumThreads(1)  # parallelism comes from the pool; avoid oversubscribing the cores
    _WORKER.update(out_dir=out_dir, seed=seed, image_size=image_size)


def _save_png(array: np.ndarray, path: str) -> None:
    """uint8 HxW -> mode "L", HxWx3 -> "RGB"; PIL writes no timestamps, so the bytes are reproducible."""
    Image.fromarray(np.ascontiguousarray(array)).save(path, format="PNG", compress_level=1)


def _render_and_write(task: tuple[str, int]) -> tuple[str, int, dict[str, Any], list[int]]:
    split, index = task
    sample = render_scene(_WORKER["seed"], split, index, _WORKER["image_size"])
    split_dir, name = os.path.join(_WORKER["out_dir"], split), f"{index:06d}.png"
    _save_png(sample["image"], os.path.join(split_dir, "images", name))
    _save_png(sample["label"], os.path.join(split_dir, "labels", name))
    if split == "anomaly_val":
        _save_png(sample["ood"], os.path.join(split_dir, "ood", name))
        _save_png(sample["ood_family"], os.path.join(split_dir, "ood_family", name))
    counts = np.bincount(sample["label"].ravel(), minlength=256)
    return (
        split,
        index,
        sample["record"],
        [int(c) for c in counts[: len(DIGITSCAPES_CLASSES)]] + [int(counts[IGNORE_LABEL])],
    )


def _generator_settings(seed: int, image_size: int, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "name": GENERATOR_NAME,
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "image_size": int(image_size),
        "counts": {split: int(counts[split]) for split in SPLITS},
    }


def _resolve_counts(counts: dict[str, int] | None) -> dict[str, int]:
    merged = dict(DEFAULT_COUNTS)
    for split, n in (counts or {}).items():
        if split not in DEFAULT_COUNTS:
            raise ValueError(f"unknown DigitScapes split {split!r} in counts; expected keys from {SPLITS}")
        if int(n) < 0:
            raise ValueError(f"counts[{split!r}] must be >= 0, got {n}")
        merged[split] = int(n)
    return merged


def _build_meta(settings: dict[str, Any], pixel_counts: dict[str, list[int]]) -> dict[str, Any]:
    return {
        "classes": list(DIGITSCAPES_CLASSES),
        "colors": [list(c) for c in DIGITSCAPES_COLORS],
        "ignore_label": IGNORE_LABEL,
        "generator": settings,
        "stuff_classes": list(STUFF_CLASSES),
        "known_digits": list(KNOWN_DIGITS),
        "anomaly_digits": list(ANOMALY_DIGITS),
        "ood_families": dict(OOD_FAMILIES),
        "styles": {
            "scene": list(SCENE_STYLES),
            "ink": list(INK_PALETTES),
            "digit_fill": list(DIGIT_FILLS),
            "digit_stroke": list(DIGIT_STROKES),
            "digit_scale_px_per_cell_at_96": list(DIGIT_SCALES),
            "far_shapes": list(FAR_SHAPES),
            "far_fills": list(FAR_FILLS),
        },
        "texture_sources": {
            "note": "crops (row0, row1, col0, col1) of sklearn's sample photographs; train and eval "
            "(val, anomaly_val) parts are disjoint",
            "regions": {
                cls: {p: [[n, list(r)] for n, r in v] for p, v in parts.items()}
                for cls, parts in TEXTURE_REGIONS.items()
            },
            "petals_far_ood": ["flower", list(PETAL_REGION)],
        },
        "void": f"object edge pixels with {VOID_ALPHA} < alpha < {CORE_ALPHA} are labelled {IGNORE_LABEL}",
        "pixel_counts": {
            "columns": list(DIGITSCAPES_CLASSES) + ["ignore"],
            **{split: pix for split, pix in pixel_counts.items() if settings["counts"][split]},
        },
    }


def generate_digitscapes(
    root: str,
    seed: int = 0,
    image_size: int = 96,
    counts: dict[str, int] | None = None,
    workers: int | None = None,
    overwrite: bool = False,
) -> str:
    """Generate DigitScapes into ``<root>/digitscapes`` and return that path.

    The dataset is written to a temporary folder next to the target and renamed into place only when
    complete, so an interrupted run never leaves a folder that looks like a finished dataset. If the target
    already holds a dataset with the same settings it is kept (nothing is rendered) unless ``overwrite``;
    if its settings differ (or it is not a DigitScapes folder) a ``FileExistsError`` asks for ``overwrite``.
    ``counts`` overrides the default image count of any split; ``workers`` defaults to ``min(2, cpus)``
    and does not change the output.
    """
    image_size = int(image_size)
    if not 32 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [32, 1024] (64..128 recommended), got {image_size}")
    counts = _resolve_counts(counts)
    settings = _generator_settings(seed, image_size, counts)
    root_path = Path(root).expanduser()
    target = root_path / GENERATOR_NAME

    if target.exists() and not overwrite:
        try:
            existing = json.loads((target / "meta.json").read_text()).get("generator")
        except (OSError, ValueError, AttributeError):
            existing = None
        if existing == settings:
            return str(target)
        raise FileExistsError(
            f"{target} already exists with different settings ({existing} != {settings}); pass "
            "overwrite=True (--overwrite on the command line) to replace it"
        )

    root_path.mkdir(parents=True, exist_ok=True)
    # the staging folder sits inside a hidden parent so that dataset auto-registration, which looks for
    # <root>/<name>/meta.json, never sees the half-written dataset
    staging = Path(tempfile.mkdtemp(prefix=f".{GENERATOR_NAME}.tmp-", dir=root_path))
    try:
        out_dir = staging / GENERATOR_NAME
        out_dir.mkdir()
        for split in (sp for sp in SPLITS if counts[sp]):  # no folder for an empty split
            subdirs = ["images", "labels"] + (["ood", "ood_family"] if split == "anomaly_val" else [])
            for sub in subdirs:
                (out_dir / split / sub).mkdir(parents=True)
        tasks = [(split, i) for split in SPLITS for i in range(counts[split])]
        n_workers = workers if workers is not None else min(2, os.cpu_count() or 1)
        n_workers = max(1, min(int(n_workers), len(tasks) or 1))
        init_args = (str(out_dir), int(seed), image_size)
        # load the sources once here: forked workers inherit them instead of each importing sklearn again
        texture_bank(image_size)
        digit_scan_pools(int(seed))
        if n_workers == 1:
            _init_worker(*init_args)
            results = [_render_and_write(t) for t in tasks]
        else:
            with multiprocessing.get_context().Pool(n_workers, _init_worker, init_args) as pool:
                results = pool.map(
                    _render_and_write, tasks, chunksize=max(1, min(32, len(tasks) // (4 * n_workers)))
                )

        records: dict[str, dict[str, Any]] = {split: {} for split in SPLITS}
        pixel_counts = {split: [0] * (len(DIGITSCAPES_CLASSES) + 1) for split in SPLITS}
        for split, index, record, pix in sorted(results, key=lambda r: (SPLIT_CODES[r[0]], r[1])):
            records[split][f"{index:06d}"] = record
            pixel_counts[split] = [a + b for a, b in zip(pixel_counts[split], pix)]
        for split in (sp for sp in SPLITS if counts[sp]):
            manifest = {
                "split": split,
                "count": counts[split],
                "texture_part": "train" if split == "train" else "eval",
                "images": records[split],
            }
            _write_json(out_dir / split / "manifest.json", manifest)
        _write_json(out_dir / "meta.json", _build_meta(settings, pixel_counts))

        if target.exists():  # overwrite: move the old dataset aside, then swap the new one in
            old = staging / "old"
            os.rename(target, old)
            try:
                os.rename(out_dir, target)
            except BaseException:
                os.rename(old, target)
                raise
        else:
            os.rename(out_dir, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return str(target)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1) + "\n")
