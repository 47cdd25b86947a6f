#!/usr/bin/env python
"""Print a Markdown table of the headline metrics that train_net.py saves in
``<output_dir>/inference/metrics.json``.

python tools/summarize.py output/digitscapes/deeplabv3plus_R18_softmax [more output dirs ...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

COLUMNS = (("sem_seg", "mIoU"), ("sem_seg", "pACC"), ("sem_seg", "mACC"), ("sem_seg", "ECE"))


def rows(output_dir: Path) -> list[list[str]]:
    path = output_dir / "inference" / "metrics.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (run train_net.py with OUTPUT_DIR {output_dir} first)")
    out = []
    for dataset, results in json.loads(path.read_text()).items():
        cells = [output_dir.name, dataset]
        for task, metric in COLUMNS:
            value = results.get(task, {}).get(metric)
            cells.append("-" if value is None or math.isnan(value) else f"{value:.2f}")
        out.append(cells)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    header = ["model", "dataset", *(f"{m} (%)" for _, m in COLUMNS)]
    table = [header, ["---"] * len(header)]
    for output_dir in args.output_dirs:
        table += rows(output_dir)
    print("\n".join("| " + " | ".join(r) + " |" for r in table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
