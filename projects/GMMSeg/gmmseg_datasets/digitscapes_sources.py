"""DigitScapes' raw material from scikit-learn: the two sample photographs, cut into texture crops at each
scale, and the handwritten digit scans, split into disjoint pools per split. Loaded once, then cached."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from gmmseg_datasets.digitscapes_spec import ANOMALY_DIGITS, PETAL_REGION, SPLITS, TEXTURE_REGIONS

# texture scale (photograph pixels -> image pixels) at image_size 96, per stuff class
_TEXTURE_SCALES = {
    "sky": (0.35, 0.5),
    "water": (0.7, 0.9, 1.1),
    "foliage": (0.3, 0.45, 0.6),
    "building": (0.35, 0.45),
}
_DIGIT_POOL_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / anomaly_val share of the scans of each known digit


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {
        Path(name).stem: np.asarray(img, dtype=np.float32) / 255.0
        for name, img in zip(data.filenames, data.images)
    }


@functools.lru_cache(maxsize=1)
def digit_scans() -> tuple[np.ndarray, np.ndarray]:
    """(scans float32 [N, 8, 8] in 0..16, targets int [N]) of scikit-learn's 1,797 handwritten digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def texture_bank(image_size: int) -> dict[tuple[str, str], list[list[np.ndarray]]]:
    """(class, part) -> per source region -> the crop pre-resized at each texture scale."""
    photos, unit = _photos(), image_size / 96.0
    bank: dict[tuple[str, str], list[list[np.ndarray]]] = {}
    for cls, parts in TEXTURE_REGIONS.items():
        for part, regions in parts.items():
            bank[(cls, part)] = [
                [_resize(photos[photo][r0:r1, c0:c1], scale * unit) for scale in _TEXTURE_SCALES[cls]]
                for photo, (r0, r1, c0, c1) in regions
            ]
    r0, r1, c0, c1 = PETAL_REGION
    bank[("petals", "any")] = [[_resize(photos["flower"][r0:r1, c0:c1], s * unit) for s in (0.15, 0.22, 0.3)]]
    return bank


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    h, w = img.shape[:2]
    size = (max(2, round(w * scale)), max(2, round(h * scale)))
    return cv2.resize(img, size, interpolation=cv2.INTER_AREA)


@functools.lru_cache(maxsize=8)
def digit_scan_pools(seed: int = 0) -> dict[str, dict[int, tuple[int, ...]]]:
    """Disjoint pools of ``load_digits`` indices: ``pools[split][digit]`` -> sorted scan indices.

    Known digits are split 60/20/20 into train/val/anomaly_val by a permutation drawn from ``seed``, so no
    handwritten sample seen in training is ever evaluated. Digits 8 and 9 (the near anomalies) go to
    anomaly_val only.
    """
    _, targets = digit_scans()
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1_000_003]))
    pools: dict[str, dict[int, tuple[int, ...]]] = {split: {} for split in SPLITS}
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(targets == digit))
        if digit in ANOMALY_DIGITS:
            cuts = [0, 0, 0, len(idx)]
        else:
            n_train = round(len(idx) * _DIGIT_POOL_FRACTIONS[0])
            n_val = round(len(idx) * _DIGIT_POOL_FRACTIONS[1])
            cuts = [0, n_train, n_train + n_val, len(idx)]
        for k, split in enumerate(SPLITS):
            pools[split][digit] = tuple(sorted(int(i) for i in idx[cuts[k] : cuts[k + 1]]))
    return pools
