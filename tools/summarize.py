#!/usr/bin/env python
"""Print one Markdown table of the metrics that train_net.py saves in
``<output_dir>/inference/metrics.json``: mIoU and ECE per test set, AUROC / AP / FPR95 per anomaly score.

    python tools/summarize.py output/digitscapes/deeplabv3plus_R18_softmax [more output dirs ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from gmmseg.evaluation.report import markdown_table, results_rows
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "projects" / "GMMSeg"))
    from gmmseg.evaluation.report import markdown_table, results_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for output_dir in args.output_dirs:
        path = output_dir / "inference" / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (run train_net.py with OUTPUT_DIR {output_dir} first)")
        rows += results_rows(output_dir.name, json.loads(path.read_text()))
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
