#!/usr/bin/env python
"""Convert COCO-Stuff-164k label maps to 171 contiguous classes for GMMSeg-D2 / Detectron2.

``<root>/coco/stuffthingmaps/{train2017,val2017}/*.png`` (the unpacked ``stuffthingmaps_trainval2017.zip``:
value = COCO-Stuff id - 1, i.e. 0..181 with gaps, 255 unlabelled) -> ``coco/stuffthingmaps_detectron2/``
(0..170 in the order of the 80 thing + 91 stuff classes, 255 ignore), as MaskFormer-family code bases do.
Registered names: coco_2017_{train,val}_stuff_sem_seg.

    python datasets/prepare_coco_stuff_164k_sem_seg.py       # root: $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_coco_stuff_164k_sem_seg.py --input /downloads/stuffthingmaps --workers 8
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gmmseg_datasets.coco_stuff import DatasetFormatError, prepare_coco_stuff_164k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets root holding coco/ (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    parser.add_argument(
        "--input",
        default=None,
        help="folder with train2017/ and val2017/ maps (default: <root>/coco/stuffthingmaps)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        count = prepare_coco_stuff_164k(args.root, input_dir=args.input, workers=args.workers)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {count} labels under {Path(args.root) / 'coco/stuffthingmaps_detectron2'} "
        f"in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
