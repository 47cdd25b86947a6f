#!/usr/bin/env python
"""GMMSeg-D2 demo, in the style of Detectron2's demo/demo.py: images in, segmentation overlays and anomaly
heat maps out as PNGs, from a config and weights.

python demo.py --config-file configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml \
    --input datasets/digitscapes/anomaly_val/images --output output/demo \
    --opts MODEL.WEIGHTS output/digitscapes/deeplabv3plus_R18_gmmseg/model_final.pth

For every image ``<name>`` it writes ``<name>_seg.png`` (the predicted classes over the image, coloured
as the dataset's metadata says) and ``<name>_anomaly.png`` (the anomaly score as a heat map over the
image: GMMSeg's ``-max_c log p(x|c)`` for GMM models, else the first of ``TEST.ANOMALY_SCORES``; choose
another with ``--anomaly-score``). ``--save-raw`` also writes the raw scores as ``<name>_anomaly.npy``.
Heat maps are scaled per image between the score's 1st and 99th percentiles unless ``--score-range LOW
HIGH`` fixes the scale (so that images can be compared).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import glob
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the config file")
    parser.add_argument(
        "--input", nargs="+", required=True, help="images, folders of images, or glob patterns ('dir/*.png')"
    )
    parser.add_argument("--output", required=True, help="folder for the PNGs (created if needed)")
    parser.add_argument(
        "--anomaly-score", default=None, help="which anomaly score to draw (default: the first)"
    )
    parser.add_argument(
        "--score-range",
        nargs=2,
        type=float,
        default=None,
        metavar=("LOW", "HIGH"),
        help="fixed heat-map scale",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the overlays (0..1)")
    parser.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help="draw both PNGs this many times larger than the image (labels stay legible on small images)",
    )
    parser.add_argument("--save-raw", action="store_true", help="also save the anomaly scores as .npy")
    parser.add_argument(
        "--opts",
        default=[],
        nargs=argparse.REMAINDER,
        help="config overrides as KEY VALUE pairs (MODEL.WEIGHTS ...)",
    )
    return parser


def list_images(inputs: list[str]) -> list[Path]:
    """Expand files, folders (their images, sorted) and glob patterns; an input that names nothing fails."""
    images: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(item)))
        if not found:
            raise FileNotFoundError(f"--input {item!r}: no image found there")
        images.extend(found)
    return images


def heat_map(score: np.ndarray, score_range: tuple[float, float] | None = None) -> np.ndarray:
    """(H, W) scores -> (H, W, 3) uint8 RGB with matplotlib's 'inferno' colormap (dark = normal)."""
    import matplotlib

    low, high = score_range if score_range is not None else np.percentile(score, [1, 99])
    scaled = np.clip((score - low) / max(high - low, 1e-12), 0.0, 1.0)
    return (matplotlib.colormaps["inferno"](scaled)[..., :3] * 255).astype(np.uint8)


class Predictor:
    """Detectron2's ``DefaultPredictor`` for GMMSeg-D2 models: one image in (RGB array), the model's
    per-image result out (``sem_seg`` posteriors, ``anomaly_scores``) at the image's resolution."""

    def __init__(self, cfg) -> None:
        from detectron2.engine import DefaultPredictor

        self._predictor = DefaultPredictor(cfg)
        self.metadata = self._predictor.metadata

    def __call__(self, image_rgb: np.ndarray) -> dict:
        # DefaultPredictor expects BGR input and converts to the config's INPUT.FORMAT itself
        return self._predictor(np.ascontiguousarray(image_rgb[:, :, ::-1]))


def run(args: argparse.Namespace) -> list[Path]:
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.logger import setup_logger
    from detectron2.utils.visualizer import ColorMode, Visualizer
    from PIL import Image

    from gmmseg import setup_cfg

    setup_logger(name="gmmseg")
    logger = logging.getLogger("gmmseg")
    images = list_images(args.input)
    cfg = setup_cfg(args.config_file, args.opts)  # validated: a bad value fails here, naming its key
    if not cfg.MODEL.WEIGHTS:
        logger.warning("MODEL.WEIGHTS is empty: the demo runs an untrained model")
    predictor = Predictor(cfg)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in images:
        start = time.perf_counter()
        try:
            image = read_image(str(path), format="RGB")
        except OSError as err:
            raise ValueError(f"{path}: unreadable image ({err})") from err
        result = predictor(image)
        labels = result["sem_seg"].argmax(dim=0).cpu().numpy()
        visualizer = Visualizer(image, predictor.metadata, scale=args.scale, instance_mode=ColorMode.IMAGE)
        overlay = visualizer.draw_sem_seg(labels, alpha=args.alpha).get_image()
        seg_file = output / f"{path.stem}_seg.png"
        Image.fromarray(overlay).save(seg_file)
        written.append(seg_file)

        scores = result.get("anomaly_scores", {})
        name = args.anomaly_score or next(iter(scores), None)
        if name is not None:
            if name not in scores:
                raise ValueError(f"--anomaly-score {name!r}: this model gives {sorted(scores)}")
            score = scores[name].float().cpu().numpy()
            heat = heat_map(score, tuple(args.score_range) if args.score_range else None)
            blended = Image.fromarray((args.alpha * heat + (1 - args.alpha) * image).astype(np.uint8))
            if overlay.shape[:2] != image.shape[:2]:  # --scale: the same size as the overlay
                blended = blended.resize((overlay.shape[1], overlay.shape[0]), Image.NEAREST)
            anomaly_file = output / f"{path.stem}_anomaly.png"
            blended.save(anomaly_file)
            written.append(anomaly_file)
            if args.save_raw:
                np.save(output / f"{path.stem}_anomaly.npy", score)
        logger.info(f"{path}: {time.perf_counter() - start:.2f} s ({name or 'no anomaly score'})")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if not args.scale > 0:
        parser.error(f"--scale {args.scale}: expected a number > 0")
    try:
        written = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"demo.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
