#!/usr/bin/env python
"""Export a trained per-pixel segmentor (softmax or GMMSeg) by tracing, to TorchScript or ONNX, and check
the exported model against the eager one on real images.

    python tools/export_model.py --config-file configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml \\
        --format torchscript --output output/export/deeplabv3plus_R18_gmmseg \\
        MODEL.WEIGHTS output/digitscapes/deeplabv3plus_R18_gmmseg/model_final.pth

The exported model takes one (3, H, W) float32 image of raw 0-255 pixels in ``INPUT.FORMAT`` order (not
normalised: that is inside) and returns ``sem_seg`` (C, H, W) class posteriors and ``anomaly`` (H, W), one
anomaly score (``gmm`` for GMMSeg, ``msp`` for softmax models by default; ``--anomaly-score``), both at the
input's resolution (``gmmseg.export`` has the contract). The images traced and checked are the first
``--num-images`` of ``DATASETS.TEST[0]`` as the test loader reads them, or the files given with
``--input``, resized as ``DefaultPredictor`` does. The largest absolute differences (exported - eager) are
printed and written with the contract to ``<output>/export.json``; the exit status is 1 when a difference
exceeds ``--tolerance`` (the anomaly's relative to the range of its map).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

EXAMPLE_IMAGES = ("*.png", "*.jpg", "*.jpeg")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript")
    parser.add_argument("--output", required=True, help="directory for model.ts / model.onnx and export.json")
    parser.add_argument(
        "--input", action="append", help="an image or folder to check on (repeatable; default: the test set)"
    )
    parser.add_argument("--num-images", type=int, default=4, help="how many images to check on (default 4)")
    parser.add_argument(
        "--anomaly-score", default=None, help="the score to export (default: the model's first)"
    )
    parser.add_argument(
        "--tolerance", type=float, default=1e-3, help="largest accepted difference (default 1e-3)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, e.g. MODEL.WEIGHTS path")
    return parser


def image_files(inputs: list[str]) -> list[Path]:
    """The image files named, folders expanded (sorted)."""
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for pattern in EXAMPLE_IMAGES for p in item.glob(pattern))
        elif item.is_file():
            files.append(item)
        else:
            raise FileNotFoundError(f"--input {item}: no such file or folder")
    if not files:
        raise FileNotFoundError(f"--input {' '.join(inputs)}: no image found there")
    return files


def sample_images(cfg, inputs: list[str] | None, count: int) -> list[torch.Tensor]:
    """(3, H, W) raw float32 images as the model reads them: from files (``DefaultPredictor``'s resize
    and channel order) or from the test loader of ``DATASETS.TEST[0]``."""
    import detectron2.data.transforms as T
    from detectron2.data.detection_utils import read_image

    if inputs:
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        images = []
        for path in image_files(inputs)[:count]:
            array = read_image(str(path), format=cfg.INPUT.FORMAT)
            array = resize.get_transform(array).apply_image(array)
            images.append(torch.as_tensor(array.astype("float32").transpose(2, 0, 1)))
        return images
    if not cfg.DATASETS.TEST:
        raise ValueError("no images: give --input, or a config with DATASETS.TEST")
    from gmmseg.engine import GMMSegTrainer

    loader = GMMSegTrainer.build_test_loader(cfg, cfg.DATASETS.TEST[0])
    return [batch[0]["image"].float() for batch in itertools.islice(loader, count)]


def run(args: argparse.Namespace) -> dict:
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    from gmmseg import setup_cfg
    from gmmseg.export import export_model, exported_score, fixed_size, load_exported, max_abs_differences

    setup_logger(name="gmmseg")
    opts = list(args.opts)
    if args.input:  # images given: no dataset needs to be registered
        opts = ["DATASETS.TRAIN", "()", "DATASETS.TEST", "()", *opts]
    opts += ["DATALOADER.NUM_WORKERS", "0"]
    if args.anomaly_score:  # the model computes the maps that score needs (e.g. gmm_fullres)
        opts += ["TEST.ANOMALY_SCORES", f"('{args.anomaly_score}',)"]
    cfg = setup_cfg(args.config_file, opts)  # validated: a bad value fails here, naming its key
    if cfg.MODEL.DEVICE != "cpu":
        cfg.defrost()
        cfg.MODEL.DEVICE = "cpu"  # exported and checked on the CPU
        cfg.freeze()
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    score = exported_score(model, args.anomaly_score)
    images = sample_images(cfg, args.input, args.num_images)
    if not images:
        raise ValueError(f"no image in {cfg.DATASETS.TEST[0]}")
    path = export_model(model, images[0], args.output, args.format, score)
    check = max_abs_differences(model, load_exported(path), images, score)
    relative = check["anomaly"] / max(check["anomaly_range"], 1.0)
    check["passed"] = check["sem_seg"] <= args.tolerance and relative <= args.tolerance
    classes = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("stuff_classes") if cfg.DATASETS.TEST else None
    summary = {
        "file": path.name,
        "format": args.format,
        "input": {"name": "image", "shape": ["3", "H", "W"], "format": cfg.INPUT.FORMAT, "range": "0-255"},
        # a trace for the traced size only (Mask2Former, sliding window): H and W must be these
        "fixed_size": list(images[0].shape[-2:]) if fixed_size(model, score) else None,
        "outputs": {"sem_seg": ["C", "H", "W"], "anomaly": ["H", "W"]},
        "anomaly_score": score,
        "classes": classes,
        "check": {**check, "tolerance": args.tolerance},
    }
    (Path(args.output) / "export.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = f"for {summary['fixed_size']} inputs only" if summary["fixed_size"] else "for any input size"
    print(f"exported {path} ({args.format}, {size}); anomaly score {score!r}")
    print(
        f"max abs difference exported - eager over {check['images']} images: posteriors "
        f"{check['sem_seg']:.3g}, anomaly {check['anomaly']:.3g} (map range {check['anomaly_range']:.3g})"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    try:
        summary = run(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"export_model.py: error: {err}", file=sys.stderr)
        return 2
    if not summary["check"]["passed"]:
        print(f"export_model.py: difference above --tolerance {args.tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
