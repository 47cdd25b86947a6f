"""What DigitScapes is: its classes and colours, splits, anomaly families, styles, and the regions of the
photographs its textures come from (train and eval regions disjoint). Constants only, no dependencies."""

from __future__ import annotations

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

SPLITS: tuple[str, ...] = ("train", "val", "anomaly_val")
SPLIT_CODES = {"train": 0, "val": 1, "anomaly_val": 2}
DEFAULT_COUNTS: dict[str, int] = {"train": 2000, "val": 300, "anomaly_val": 300}
OOD_FAMILIES: dict[str, str] = {
    "1": "near: held-out handwritten digits 8 and 9, rendered with the known digits' styles",
    "2": "far: geometric shapes (disc, ring, star, triangle) filled with stripes, checkerboard, dots or "
    "dahlia-petal texture",
}

# Texture sources, (row0, row1, col0, col1) in the 427x640 photographs. "train" and "eval" parts are
# disjoint, so val/anomaly_val backgrounds are unseen pixels. Chosen by looking at the photographs.
TEXTURE_REGIONS: dict[str, dict[str, list[tuple[str, tuple[int, int, int, int]]]]] = {
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
PETAL_REGION = (120, 320, 205, 410)  # dahlia petals (flower.jpg): only ever used for far-OOD fill

SCENE_STYLES: tuple[str, ...] = ("natural", "night", "sepia", "greyscale")

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

CORE_ALPHA, VOID_ALPHA = 0.75, 0.25  # alpha >= core: object label; (void, core): 255; <= void: background
