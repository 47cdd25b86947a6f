"""Shared fixtures: tiny datasets written in the project's on-disk format."""

from __future__ import annotations

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
