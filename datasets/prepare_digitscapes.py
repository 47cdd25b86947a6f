#!/usr/bin/env python
"""Generate DigitScapes, GMMSeg-D2's built-in segmentation + anomaly dataset, from scikit-learn's data.

Nothing is downloaded: the images are synthesised deterministically from the handwritten digits and sample
photographs that ship with scikit-learn. Detectron2 code registers the result automatically as
``digitscapes_train``, ``digitscapes_val`` and ``digitscapes_anomaly_val``. See datasets/README.md.

    python datasets/prepare_digitscapes.py                   # -> $DETECTRON2_DATASETS or ./datasets
    python datasets/prepare_digitscapes.py --image-size 128 --overwrite
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from gmmseg_datasets.digitscapes import DEFAULT_COUNTS, generate_digitscapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets root; writes <root>/digitscapes (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    parser.add_argument("--seed", type=int, default=0, help="generation seed (default: 0)")
    parser.add_argument(
        "--image-size", type=int, default=96, help="square image side in pixels (default: 96)"
    )
    parser.add_argument("--train", type=int, default=DEFAULT_COUNTS["train"], help="number of train images")
    parser.add_argument("--val", type=int, default=DEFAULT_COUNTS["val"], help="number of val images")
    parser.add_argument(
        "--anomaly-val", type=int, default=DEFAULT_COUNTS["anomaly_val"], help="number of anomaly_val images"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: min(2, CPUs); output is the same)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing dataset with other settings"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = {"train": args.train, "val": args.val, "anomaly_val": args.anomaly_val}
    # without --overwrite an existing folder is either kept (same settings) or an error
    kept = (Path(args.root).expanduser() / "digitscapes").exists() and not args.overwrite
    start = time.perf_counter()
    try:
        out = generate_digitscapes(
            args.root,
            seed=args.seed,
            image_size=args.image_size,
            counts=counts,
            workers=args.workers,
            overwrite=args.overwrite,
        )
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    total = sum(counts.values())
    if kept:
        print(f"DigitScapes is already up to date at {out} (same settings; --overwrite regenerates it)")
    else:
        print(
            f"DigitScapes ({total} images: {counts}, {args.image_size}px, seed {args.seed}) written to {out}"
        )
        print(f"took {elapsed:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
