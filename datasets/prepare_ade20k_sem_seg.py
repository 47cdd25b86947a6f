#!/usr/bin/env python
"""Convert ADE20K SceneParsing labels for GMMSeg-D2 / Detectron2.

``<root>/ADEChallengeData2016/annotations/{training,validation}/*.png`` (0 = other, 1..150 = classes) ->
``annotations_detectron2/{training,validation}/*.png`` (0..149, 255 ignore), the conversion of
Detectron2's and Mask2Former's script of the same name. Registered names: ade20k_sem_seg_{train,val}.

    python datasets/prepare_ade20k_sem_seg.py                # root: $DETECTRON2_DATASETS or ./datasets
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gmmseg_datasets.ade20k import DatasetFormatError, prepare_ade20k


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets root holding ADEChallengeData2016/ (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes")
    args = parser.parse_args(argv)
    start = time.time()
    try:
        count = prepare_ade20k(args.root, workers=args.workers)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {count} labels under {Path(args.root) / 'ADEChallengeData2016/annotations_detectron2'} "
        f"in {time.time() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
