"""How one DigitScapes scene is drawn: the landscape (sky, lake, buildings, foliage) and its textures, the
digits and unknown objects pasted on it, and the labels, anomaly masks and record that come with it."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from gmmseg_datasets.digitscapes_sources import digit_scan_pools, digit_scans, texture_bank
from gmmseg_datasets.digitscapes_spec import (
    ANOMALY_DIGITS,
    CORE_ALPHA,
    DIGIT_FILLS,
    DIGIT_SCALES,
    DIGIT_STROKES,
    FAR_FILLS,
    FAR_SHAPES,
    IGNORE_LABEL,
    INK_PALETTES,
    KNOWN_DIGITS,
    SCENE_STYLES,
    SPLIT_CODES,
    SPLITS,
    STUFF_CLASSES,
    VOID_ALPHA,
)

SKY, WATER, FOLIAGE, BUILDING = range(4)
_DIGIT_LABEL = {d: len(STUFF_CLASSES) + i for i, d in enumerate(KNOWN_DIGITS)}
_FLOWER_FOLIAGE_P = 0.35  # share of scenes whose foliage comes from the blurred dahlia leaves
_SCENE_STYLE_P = (0.31, 0.23, 0.23, 0.23)
_SS = 4  # supersampling factor for anti-aliased object masks
_MAX_OVERLAP = 0.2  # max fraction of the smaller object's box covered by another object's box


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
    if split not in SPLIT_CODES:
        raise ValueError(f"unknown DigitScapes split {split!r}; expected one of {SPLITS}")
    return SPLIT_CODES[split]


def render_scene(seed: int, split: str, index: int, image_size: int = 96) -> dict[str, Any]:
    """Render image ``index`` of ``split``: a pure function of its arguments (worker-count independent).

    Returns ``image`` (HxWx3 uint8), ``label`` (HxW uint8, class index or 255), ``ood`` and ``ood_family``
    (HxW uint8; all-0 except void outside anomaly_val) and ``record`` (JSON-able description: scene style,
    and per object its kind, digit, scan index, family and style), used for the split manifest.
    """
    s = int(image_size)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), _split_code(split), int(index)]))
    part = "train" if split == "train" else "eval"
    bank = texture_bank(s)
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
    scans, _ = digit_scans()
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
        core, edge = alpha >= CORE_ALPHA, (alpha > VOID_ALPHA) & (alpha < CORE_ALPHA)
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
