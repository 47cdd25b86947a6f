#!/usr/bin/env python
"""Convert the Road Anomaly release (Lis et al., ICCV 2019) to GMMSeg-D2's anomaly layout.

Reads ``frame_list.json`` and ``frames/<name>.jpg`` + ``frames/<name>.labels/labels_semantic.png``
(0 background, 2 anomaly) from the unpacked ``RoadAnomaly_jpg.zip`` and writes
``<root>/road_anomaly/original/<name>.jpg`` (copied) and ``<root>/road_anomaly/labels/<name>.png``
(0 in-distribution, 1 anomaly; the release has no void, so there is no 255). Registered name: road_anomaly.

    python datasets/prepare_road_anomaly.py          # source: <root>/RoadAnomaly_jpg or <root>/RoadAnomaly
    python datasets/prepare_road_anomaly.py --source /downloads/RoadAnomaly_jpg
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gmmseg_datasets.road_anomaly import DatasetFormatError, prepare_road_anomaly


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("DETECTRON2_DATASETS", "datasets"),
        help="datasets root; writes <root>/road_anomaly (default: $DETECTRON2_DATASETS or ./datasets)",
    )
    parser.add_argument(
        "--source", default=None, help="the unpacked release (holds frames/ and frame_list.json)"
    )
    args = parser.parse_args(argv)
    try:
        count = prepare_road_anomaly(args.root, source=args.source)
    except DatasetFormatError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {count} images and 0/1 masks under {Path(args.root) / 'road_anomaly'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
