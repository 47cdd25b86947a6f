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
This module imports neither torch nor Detectron2, so the dataset can be prepared anywhere.
"""

from __future__ import annotations

import functools
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

STUFF_CLASSES: tuple[str, ...] = ("sky", "water", "foliage", "building")
KNOWN_DIGITS: tuple[int, ...] = tuple(range(8))
ANOMALY_DIGITS: tuple[int, ...] = (8, 9)
DIGIT_CLASSES: tuple[str, ...] = tuple(f"digit {d}" for d in KNOWN_DIGITS)
DIGITSCAPES_CLASSES: tuple[str, ...] = STUFF_CLASSES + DIGIT_CLASSES
DIGITSCAPES_COLORS: tuple[tuple[int, int, int], ...] = (
    (70, 130, 180),  # sky
    (0, 60, 140),  # water
    (107, 142, 35),  # foliage
    (110, 70, 70),  # building
    (230, 25, 75),  # digit 0
    (245, 130, 48),  # digit 1
    (255, 225, 25),  # digit 2
    (60, 180, 75),  # digit 3
    (70, 240, 240),  # digit 4
    (145, 30, 180),  # digit 5
    (240, 50, 230),  # digit 6
    (250, 190, 212),  # digit 7
)
IGNORE_LABEL = 255

SKY, WATER, FOLIAGE, BUILDING = range(4)
_DIGIT_LABEL = {d: len(STUFF_CLASSES) + i for i, d in enumerate(KNOWN_DIGITS)}

SPLITS: tuple[str, ...] = ("train", "val", "anomaly_val")
_SPLIT_CODES = {"train": 0, "val": 1, "anomaly_val": 2}
DEFAULT_COUNTS: dict[str, int] = {"train": 2000, "val": 300, "anomaly_val": 300}
OOD_FAMILIES: dict[str, str] = {
    "1": "near: held-out handwritten digits 8 and 9, rendered with the known digits' styles",
    "2": "far: geometric shapes (disc, ring, star, triangle) filled with stripes, checkerboard, dots or "
    "dahlia-petal texture",
}

# Texture sources, (row0, row1, col0, col1) in the 427x640 photographs. "train" and "eval" parts are
# disjoint, so val/anomaly_val backgrounds are unseen pixels. Chosen by looking at the photographs.
_TEXTURE_REGIONS: dict[str, dict[str, list[tuple[str, tuple[int, int, int, int]]]]] = {
    "sky": {
        "train": [("china", (0, 185, 335, 445))],
        "eval": [("china", (0, 135, 450, 640))],
    },
    "water": {
        "train": [("china", (243, 318, 356, 430))],
        "eval": [("china", (243, 288, 432, 505))],
    },
    "foliage": {  # first entry: trees in china.jpg; second: blurred leaves behind the dahlia
        "train": [("china", (325, 427, 395, 640)), ("flower", (0, 300, 0, 150))],
        "eval": [("china", (345, 427, 0, 165)), ("flower", (0, 300, 480, 640))],
    },
    "building": {  # the pagoda: upper storeys for train, lower storeys for eval
        "train": [("china", (125, 232, 115, 305))],
        "eval": [("china", (240, 330, 82, 330)), ("china", (338, 388, 210, 310))],
    },
}
_PETAL_REGION = (120, 320, 205, 410)  # dahlia petals (flower.jpg): only ever used for far-OOD fill
# texture scale (photograph pixels -> image pixels) at image_size 96, per stuff class
_TEXTURE_SCALES = {
    "sky": (0.35, 0.5),
    "water": (0.7, 0.9, 1.1),
    "foliage": (0.3, 0.45, 0.6),
    "building": (0.35, 0.45),
}
_FLOWER_FOLIAGE_P = 0.35  # share of scenes whose foliage comes from the blurred dahlia leaves

SCENE_STYLES: tuple[str, ...] = ("natural", "night", "sepia", "greyscale")
_SCENE_STYLE_P = (0.31, 0.23, 0.23, 0.23)
INK_PALETTES: dict[str, tuple[float, float, float]] = {
    "white": (0.96, 0.96, 0.94),
    "black": (0.06, 0.06, 0.08),
    "red": (0.86, 0.10, 0.10),
    "yellow": (0.98, 0.84, 0.10),
    "cyan": (0.10, 0.80, 0.92),
    "magenta": (0.84, 0.18, 0.78),
}
DIGIT_FILLS = ("solid", "textured")
DIGIT_STROKES = ("thin", "normal", "bold")
DIGIT_SCALES = (2, 3, 4)  # pixels per scan cell at image_size 96
FAR_SHAPES = ("disc", "ring", "star", "triangle")
FAR_FILLS = ("stripes", "checkerboard", "dots", "petals")

_SS = 4  # supersampling factor for anti-aliased object masks
_CORE_ALPHA, _VOID_ALPHA = 0.75, 0.25  # alpha >= core: object label; (void, core): 255; <= void: background
_MAX_OVERLAP = 0.2  # max fraction of the smaller object's box covered by another object's box
_DIGIT_POOL_FRACTIONS = (0.6, 0.2, 0.2)  # train / val / anomaly_val share of the scans of each known digit


# ----------------------------------------------------------------------------------------------- sources


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_sample_images

    data = load_sample_images()
    return {
        Path(name).stem: np.asarray(img, dtype=np.float32) / 255.0
        for name, img in zip(data.filenames, data.images)
    }


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """(scans float32 [N, 8, 8] in 0..16, targets int [N]) of scikit-learn's 1,797 handwritten digits."""
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


@functools.lru_cache(maxsize=4)
def _texture_bank(image_size: int) -> dict[tuple[str, str], list[list[np.ndarray]]]:
    """(class, part) -> per source region -> the crop pre-resized at each texture scale."""
    photos, unit = _photos(), image_size / 96.0
    bank: dict[tuple[str, str], list[list[np.ndarray]]] = {}
    for cls, parts in _TEXTURE_REGIONS.items():
        for part, regions in parts.items():
            bank[(cls, part)] = [
                [_resize(photos[photo][r0:r1, c0:c1], scale * unit) for scale in _TEXTURE_SCALES[cls]]
                for photo, (r0, r1, c0, c1) in regions
            ]
    r0, r1, c0, c1 = _PETAL_REGION
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
    _, targets = _digits()
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


# ---------------------------------------------------------------------------------------------- textures


def _sample_texture(
    rng: np.random.Generator, sources: list[list[np.ndarray]], h: int, w: int, stack_rows: bool = False
) -> np.ndarray:
    """A random (h, w, 3) crop of one source at one scale, randomly mirrored.

    A source smaller than (h, w) is tiled: mirrored, or for buildings repeated vertically (``stack_rows``),
    which reads as more storeys rather than a kaleidoscope.
    """
    scales = sources[int(rng.integers(len(sources)))]
    tex = scales[int(rng.integers(len(scales)))]
    th, tw = tex.shape[:2]
    if th < h:
        tex = cv2.copyMakeBorder(tex, 0, h - th, 0, 0, cv2.BORDER_WRAP if stack_rows else cv2.BORDER_REFLECT)
    if tw < w:
        tex = cv2.copyMakeBorder(tex, 0, 0, 0, w - tw, cv2.BORDER_REFLECT)
    th, tw = tex.shape[:2]
    y, x = int(rng.integers(th - h + 1)), int(rng.integers(tw - w + 1))
    crop = tex[y : y + h, x : x + w]
    return crop[:, ::-1] if rng.random() < 0.5 else crop


def _composite(img: np.ndarray, layer: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Paste ``layer`` where ``mask`` holds, with a ~1 px soft edge as a camera would record it (the label
    boundary stays hard)."""
    soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.6)[..., None]
    return img * (1.0 - soft) + layer * soft


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int = 5) -> np.ndarray:
    """Low-frequency noise in [-1, 1] (a random grid, bicubically upsampled)."""
    grid = rng.uniform(-1.0, 1.0, size=(cells, cells)).astype(np.float32)
    return np.clip(cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC), -1.0, 1.0)


def _luminance(img: np.ndarray) -> np.ndarray:
    return img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _apply_scene_style(img: np.ndarray, style: str, rng: np.random.Generator) -> np.ndarray:
    """Recolour the whole background: the same scene under different 'cameras' or times of day."""
    if style == "night":
        lum = _luminance(img)[..., None] ** 1.3
        out = lum * np.array([0.30, 0.42, 0.85], np.float32) * 0.8 + np.array([0.02, 0.03, 0.09], np.float32)
    elif style == "sepia":
        sepia = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        out = img @ sepia.T * 0.85
    elif style == "greyscale":
        out = np.repeat(_luminance(img)[..., None], 3, axis=2)
    else:
        out = img
    gain, bias = rng.uniform(0.88, 1.12), rng.uniform(-0.05, 0.05)
    return np.clip(out * gain + bias, 0.0, 1.0)


# ------------------------------------------------------------------------------------------------ layout


def _building_polygons(rng: np.random.Generator, s: int, horizon: int) -> list[np.ndarray]:
    """One building on the horizon: a body with a flat, gabled or pagoda (tiered, overhanging) roof."""
    w = rng.uniform(0.14, 0.32) * s
    x0 = rng.uniform(-0.25 * w, s - 0.75 * w)
    base = horizon + rng.uniform(0.0, 0.08) * s
    top = base - max(0.12 * s, min(rng.uniform(0.2, 0.45) * s, base - 0.06 * s))
    roof = str(rng.choice(["flat", "gable", "pagoda"]))
    polys = []
    if roof == "flat":
        polys.append([(x0, base), (x0 + w, base), (x0 + w, top), (x0, top)])
    elif roof == "gable":
        ridge = top - rng.uniform(0.1, 0.25) * w
        polys.append([(x0, base), (x0 + w, base), (x0 + w, top), (x0 + w / 2, ridge), (x0, top)])
    else:  # tiers of walls narrowing upwards, each with an overhanging trapezoid roof
        tiers = int(rng.integers(2, 4))
        tier_h = (base - top) / tiers
        for t in range(tiers):
            shrink = 0.18 * t * w
            left, right = x0 + shrink, x0 + w - shrink
            y_bot, y_top = base - t * tier_h, base - (t + 1) * tier_h
            eave = y_top + 0.35 * tier_h
            over = 0.12 * w
            polys.append([(left, y_bot), (right, y_bot), (right, eave), (left, eave)])
            polys.append(
                [(left - over, eave), (right + over, eave), (right - 0.1 * w, y_top), (left + 0.1 * w, y_top)]
            )
    return [np.round(np.asarray(p)).astype(np.int32) for p in polys]


def _foliage_mask(rng: np.random.Generator, s: int, horizon: int) -> np.ndarray:
    """A wavy band of vegetation in the foreground, plus 0-2 tree crowns rising above the horizon."""
    x = np.arange(s, dtype=np.float32)
    base = rng.uniform(horizon + 0.12 * s, max(horizon + 0.13 * s, 0.9 * s))
    edge = np.full(s, base, np.float32)
    for _ in range(3):
        period = rng.uniform(0.3, 1.2) * s
        edge += rng.uniform(0.01, 0.05) * s * np.sin(2 * np.pi * x / period + rng.uniform(0, 2 * np.pi))
    mask = (np.arange(s, dtype=np.float32)[:, None] >= edge[None, :]).astype(np.uint8)
    for _ in range(int(rng.choice([0, 1, 1, 2]))):
        cx = rng.uniform(-0.05, 0.25) * s
        if rng.random() < 0.5:
            cx = s - 1 - cx
        crown_top = rng.uniform(0.1 * s, horizon + 0.02 * s)
        radius = rng.uniform(0.07, 0.14) * s
        y = crown_top + radius
        while y < base + radius:  # stack of jittered circles from the crown down into the band
            cxy = (round(cx + rng.uniform(-0.4, 0.4) * radius), round(y))
            cv2.circle(mask, cxy, max(1, round(radius * rng.uniform(0.8, 1.2))), 1, thickness=-1)
            y += radius * 0.9
    return mask.astype(bool)


# ----------------------------------------------------------------------------------------------- objects


def _digit_alpha(rng: np.random.Generator, scan: np.ndarray, box: int, stroke: str) -> np.ndarray:
    """Anti-aliased coverage (box x box, 0..1) of one scan: bicubic upsampling, threshold, erosion/dilation
    for the stroke width and a small rotation, all at 4x resolution, then area downsampling."""
    big = box * _SS
    img = cv2.resize(np.pad(scan / 16.0, 1), (big, big), interpolation=cv2.INTER_CUBIC)
    mask = (img > rng.uniform(0.35, 0.45)).astype(np.uint8)
    cell = big / 10.0
    radius = round(cell * {"thin": 0.22, "normal": 0.0, "bold": 0.22}[stroke])
    if radius > 0:
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
        mask = cv2.erode(mask, kernel) if stroke == "thin" else cv2.dilate(mask, kernel)
    return _rotate_and_downsample(mask, box, rng.uniform(-12.0, 12.0))


def _rotate_and_downsample(mask: np.ndarray, box: int, angle: float) -> np.ndarray:
    big = mask.shape[0]
    rot = cv2.getRotationMatrix2D(((big - 1) / 2.0, (big - 1) / 2.0), angle, 1.0)
    mask = cv2.warpAffine(mask.astype(np.float32), rot, (big, big), flags=cv2.INTER_LINEAR)
    return np.clip(cv2.resize(mask, (box, box), interpolation=cv2.INTER_AREA), 0.0, 1.0)


def _shape_alpha(rng: np.random.Generator, shape: str, box: int) -> np.ndarray:
    """Anti-aliased coverage of a far-OOD geometric shape, drawn at 4x resolution."""
    big = box * _SS
    mask = np.zeros((big, big), np.uint8)
    c = (big - 1) / 2.0
    if shape == "disc":
        cv2.circle(mask, (round(c), round(c)), round(0.46 * big), 1, thickness=-1)
    elif shape == "ring":
        cv2.circle(
            mask, (round(c), round(c)), round(0.38 * big), 1, thickness=round(rng.uniform(0.12, 0.2) * big)
        )
    else:  # star (alternating outer/inner vertices) or triangle
        if shape == "star":
            points = int(rng.choice([5, 6]))
            radius = np.tile([1.0, rng.uniform(0.38, 0.5)], points)
        else:
            radius = np.ones(3)
        phi = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.arange(len(radius)) / len(radius)
        pts = np.stack([c + 0.48 * big * radius * np.cos(phi), c + 0.48 * big * radius * np.sin(phi)], 1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return _rotate_and_downsample(mask, box, 0.0)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hsv = np.array([[[rng.uniform(0, 180), rng.uniform(150, 255), rng.uniform(120, 255)]]], np.float32)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def _far_fill(rng: np.random.Generator, fill: str, box: int, unit: float, bank) -> np.ndarray:
    """Synthetic pattern for far-OOD objects; none of these textures occurs on a known class."""
    if fill == "petals":
        return _sample_texture(rng, bank[("petals", "any")], box, box)
    c1 = _random_colour(rng)
    c2 = 1.0 - c1 if rng.random() < 0.5 else _random_colour(rng) * 0.4
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta)
    v = -xx * np.sin(theta) + yy * np.cos(theta)
    period = rng.uniform(4.0, 8.0) * unit
    if fill == "stripes":
        on = (u / period) % 1.0 < 0.5
    elif fill == "checkerboard":
        on = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    else:  # dots
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        on = du * du + dv * dv < 0.09
    return np.where(on[..., None], c1, c2).astype(np.float32)


def _digit_style(rng: np.random.Generator, bg_colour: np.ndarray) -> dict[str, Any]:
    """Ink palette, fill, stroke and scale, drawn independently of the digit so colour never identifies it.

    The palette is redrawn (a few times at most) if it would be nearly invisible on the local background.
    """
    names = list(INK_PALETTES)
    for _ in range(6):
        ink = names[int(rng.integers(len(names)))]
        if np.linalg.norm(np.asarray(INK_PALETTES[ink]) - bg_colour) > 0.4:
            break
    return {
        "ink": ink,
        "fill": DIGIT_FILLS[int(rng.integers(len(DIGIT_FILLS)))],
        "stroke": DIGIT_STROKES[int(rng.integers(len(DIGIT_STROKES)))],
    }


def _digit_fill(rng: np.random.Generator, ink: str, fill: str, box: int) -> np.ndarray:
    base = np.asarray(INK_PALETTES[ink], np.float32) + rng.uniform(-0.05, 0.05, 3).astype(np.float32)
    base = np.clip(base, 0.0, 1.0)
    if fill == "solid":
        return np.broadcast_to(base, (box, box, 3)).copy()
    # textured: a gradient towards a lighter/darker shade of the same ink, with blotchy modulation
    other = base * 0.45 if _luminance(base) > 0.45 else base + (1.0 - base) * 0.5
    yy, xx = np.mgrid[0:box, 0:box].astype(np.float32) / max(box - 1, 1)
    theta = rng.uniform(0, 2 * np.pi)
    t = np.clip((xx - 0.5) * np.cos(theta) + (yy - 0.5) * np.sin(theta) + 0.5, 0.0, 1.0)[..., None]
    tex = base * (1.0 - t) + other * t
    tex = tex * (1.0 + 0.25 * _smooth_noise(rng, box, box, cells=4)[..., None])
    return np.clip(tex, 0.0, 1.0).astype(np.float32)


def _place(rng: np.random.Generator, s: int, box: int, taken: list[tuple[int, int, int]]) -> tuple[int, int]:
    """Top-left corner for a box x box object: the first of 30 random candidates whose box overlaps no
    earlier box by more than ``_MAX_OVERLAP`` of the smaller one, else the least-overlapping candidate."""
    cand = rng.integers(0, s - box + 1, size=(30, 2))
    if not taken:
        return int(cand[0, 0]), int(cand[0, 1])
    other = np.asarray(taken)  # (n, 3): x, y, side
    lo = np.maximum(cand[:, None, :], other[None, :, :2])
    hi = np.minimum(cand[:, None, :] + box, other[None, :, :2] + other[None, :, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=2)
    overlap = (inter / np.minimum(box, other[:, 2])[None, :] ** 2).max(axis=1)
    ok = np.flatnonzero(overlap <= _MAX_OVERLAP)
    k = int(ok[0]) if len(ok) else int(np.argmin(overlap))
    return int(cand[k, 0]), int(cand[k, 1])


# ----------------------------------------------------------------------------------------------- scenes


def _split_code(split: str) -> int:
    if split not in _SPLIT_CODES:
        raise ValueError(f"unknown DigitScapes split {split!r}; expected one of {SPLITS}")
    return _SPLIT_CODES[split]


def render_scene(seed: int, split: str, index: int, image_size: int = 96) -> dict[str, Any]:
    """Render image ``index`` of ``split``: a pure function of its arguments (worker-count independent).

    Returns ``image`` (HxWx3 uint8), ``label`` (HxW uint8, class index or 255), ``ood`` and ``ood_family``
    (HxW uint8; all-0 except void outside anomaly_val) and ``record`` (JSON-able description: scene style,
    and per object its kind, digit, scan index, family and style), used for the split manifest.
    """
    s = int(image_size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _split_code(split), int(index)]))
    part = "train" if split == "train" else "eval"
    bank = _texture_bank(s)
    unit = s / 96.0

    # --- background: sky above the horizon, lake below, buildings on the horizon, foliage in front
    horizon = round(rng.uniform(0.3, 0.55) * s)
    label = np.full((s, s), WATER, np.uint8)
    label[:horizon] = SKY
    # textures are sampled at the size of their region, so that small sources rarely need tiling
    img = np.concatenate(
        [
            _sample_texture(rng, bank[("sky", part)], horizon, s),
            _sample_texture(rng, bank[("water", part)], s - horizon, s),
        ]
    )
    n_buildings = int(rng.integers(1, 4))
    for _ in range(n_buildings):
        mask = np.zeros((s, s), np.uint8)
        cv2.fillPoly(mask, _building_polygons(rng, s, horizon), 1)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        if not len(rows):
            continue
        (y0, y1), (x0, x1) = (rows[0], rows[-1] + 1), (cols[0], cols[-1] + 1)
        layer = img.copy()  # outside the box the soft edge then blends img with itself
        layer[y0:y1, x0:x1] = _sample_texture(
            rng, bank[("building", part)], y1 - y0, x1 - x0, stack_rows=True
        )
        img = _composite(img, layer, mask.astype(bool))
        label[mask.astype(bool)] = BUILDING
    foliage = _foliage_mask(rng, s, horizon)
    fol_sources = bank[("foliage", part)]
    fol_source = 1 if rng.random() < _FLOWER_FOLIAGE_P else 0
    img = _composite(img, _sample_texture(rng, fol_sources[fol_source : fol_source + 1], s, s), foliage)
    label[foliage] = FOLIAGE
    style = SCENE_STYLES[int(rng.choice(len(SCENE_STYLES), p=_SCENE_STYLE_P))]
    img = _apply_scene_style(img.astype(np.float32), style, rng)

    # --- objects: known digits, plus unknown objects in anomaly_val
    pools = digit_scan_pools(int(seed))[split]
    scans, _ = _digits()
    objects: list[dict[str, Any]] = []
    n_unknown = int(rng.integers(1, 4)) if split == "anomaly_val" else 0
    for _ in range(n_unknown):
        if rng.random() < 0.5:
            digit = ANOMALY_DIGITS[int(rng.integers(len(ANOMALY_DIGITS)))]
            objects.append({"kind": "digit", "digit": digit, "family": 1})
        else:
            objects.append(
                {
                    "kind": FAR_SHAPES[int(rng.integers(len(FAR_SHAPES)))],
                    "fill": FAR_FILLS[int(rng.integers(len(FAR_FILLS)))],
                    "family": 2,
                }
            )
    for _ in range(int(rng.integers(3, 7))):
        objects.append({"kind": "digit", "digit": int(rng.choice(KNOWN_DIGITS)), "family": 0})

    # unknown objects are placed first (so they get free space) but pasted last (so they stay visible)
    taken: list[tuple[int, int, int]] = []
    for obj in objects:
        if obj["kind"] == "digit":
            obj["scale"] = int(DIGIT_SCALES[int(rng.integers(len(DIGIT_SCALES)))])
            box = max(10, round(10 * obj["scale"] * unit))
        else:
            box = max(10, round(rng.uniform(0.22, 0.38) * s))
        x, y = _place(rng, s, box, taken)
        taken.append((x, y, box))
        obj["bbox"] = [x, y, x + box, y + box]

    ood = np.zeros((s, s), np.uint8)
    family = np.zeros((s, s), np.uint8)
    order = [o for o in objects if o["family"] == 0] + [o for o in objects if o["family"] != 0]
    for obj in order:
        x0, y0, x1, y1 = obj["bbox"]
        box = x1 - x0
        region = img[y0:y1, x0:x1]
        if obj["kind"] == "digit":
            pool = pools[obj["digit"]]
            obj["scan"] = int(pool[int(rng.integers(len(pool)))])
            obj.update(_digit_style(rng, region.reshape(-1, 3).mean(0)))
            alpha = _digit_alpha(rng, scans[obj["scan"]], box, obj["stroke"])
            paint = _digit_fill(rng, obj["ink"], obj["fill"], box)
        else:
            alpha = _shape_alpha(rng, obj["kind"], box)
            paint = _far_fill(rng, obj["fill"], box, unit, bank)
        img[y0:y1, x0:x1] = region * (1.0 - alpha[..., None]) + paint * alpha[..., None]
        core, edge = alpha >= _CORE_ALPHA, (alpha > _VOID_ALPHA) & (alpha < _CORE_ALPHA)
        lab, oo, fam = label[y0:y1, x0:x1], ood[y0:y1, x0:x1], family[y0:y1, x0:x1]
        lab[edge] = IGNORE_LABEL
        lab[core] = _DIGIT_LABEL[obj["digit"]] if obj["family"] == 0 else IGNORE_LABEL
        oo[edge], fam[edge] = IGNORE_LABEL, IGNORE_LABEL
        oo[core] = 1 if obj["family"] else 0
        fam[core] = obj["family"]
        if obj["family"] == 0:
            obj["label"] = _DIGIT_LABEL[obj["digit"]]

    record = {
        "style": style,
        "horizon": horizon,
        "buildings": n_buildings,
        "foliage_source": "flower" if fol_source else "china",
        "objects": [{k: obj[k] for k in sorted(obj)} for obj in order],
    }
    return {
        "image": np.round(img * 255.0).astype(np.uint8),
        "label": label,
        "ood": ood,
        "ood_family": family,
        "record": record,
    }


# ------------------------------------------------------------------------------------------- generation

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
                for cls, parts in _TEXTURE_REGIONS.items()
            },
            "petals_far_ood": ["flower", list(_PETAL_REGION)],
        },
        "void": f"object edge pixels with {_VOID_ALPHA} < alpha < {_CORE_ALPHA} are labelled {IGNORE_LABEL}",
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
        _texture_bank(image_size)
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
        for split, index, record, pix in sorted(results, key=lambda r: (_SPLIT_CODES[r[0]], r[1])):
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
