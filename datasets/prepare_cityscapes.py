#!/usr/bin/env python
"""Make Cityscapes' ``*_gtFine_labelTrainIds.png`` (19 classes, 255 ignore) for GMMSeg-D2.

Reads ``<root>/cityscapes/gtFine/{train,val}/<city>/*_gtFine_polygons.json`` (rasterised with
cityscapesscripts' own code, as its createTrainIdLabelImgs.py does) or, where a frame has no JSON,
``*_gtFine_labelIds.png`` (mapped with cityscapesscripts' id -> trainId table), and writes
``*_gtFine_labelTrainIds.png`` next to them. Registered names: cityscapes_fine_sem_seg_{train,val}.

    python datasets/prepare_cityscapes.py                    # root: $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_cityscapes.py --root /data --source labelIds --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gmmseg_datasets.cityscapes import DatasetFormatError, prepare_cityscapes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets root holding cityscapes/ (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    parser.add_argument(
        "--splits", nargs="+", default=["train", "val"], help="gtFine splits (default: train val)"
    )
    parser.add_argument(
        "--source",
        choices=["auto", "json", "labelIds"],
        default="auto",
        help="annotations to convert: polygons JSON, labelIds PNG, or auto (JSON where present)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        count = prepare_cityscapes(args.root, splits=args.splits, source=args.source, workers=args.workers)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {count} *_gtFine_labelTrainIds.png under {Path(args.root) / 'cityscapes/gtFine'} "
        f"in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
