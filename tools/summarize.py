#!/usr/bin/env python
"""Print one Markdown table of the metrics that train_net.py saves in
``<output_dir>/inference/metrics.json``: mIoU and ECE per test set, AUROC / AP / FPR95 per anomaly score.

    python tools/summarize.py output/digitscapes/deeplabv3plus_R18_softmax [more output dirs ...]
    python tools/summarize.py OUTPUT_DIR ... --groups stuff=0-3 digits=4-11 [--per-class]

``--groups`` adds a second table: each test set's mean IoU over groups of classes (class indices in the
dataset's order, as ``IoU-<class>`` in the metrics); ``--per-class`` adds every class's IoU to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gmmseg.evaluation.report import group_mean_iou, markdown_table, results_rows


def parse_group(text: str) -> tuple[str, list[int]]:
    """'digits=4-11' or 'some=0,2,5-6' -> ('digits', [4, ..., 11])."""
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=CLASSES, e.g. digits=4-11")
    classes: list[int] = []
    try:
        for part in spec.split(","):
            low, _, high = part.partition("-")
            classes += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: classes must be indices like 4-11 or 0,2,5") from None
    return name, classes


def group_rows(run: str, metrics: dict, groups: list[tuple[str, list[int]]], per_class: bool) -> list[list]:
    """One row per test set with per-class IoUs: run, dataset, mIoU, each group's mean IoU (and each
    class's IoU)."""
    rows = []
    for dataset, tasks in metrics.items():
        sem_seg = tasks.get("sem_seg", {})
        ious = [(key[4:], value) for key, value in sem_seg.items() if key.startswith("IoU-")]
        if not ious:
            continue
        row = [run, dataset, f"{sem_seg['mIoU']:.2f}"]
        for name, classes in groups:
            if max(classes) >= len(ious):
                raise SystemExit(
                    f"--groups {name}: class {max(classes)} but {dataset} has {len(ious)} classes"
                )
            row.append(f"{group_mean_iou(sem_seg, [ious[c][0] for c in classes]):.2f}")
        if per_class:
            row += [f"{value:.2f}" for _, value in ious]
        rows.append((row, [name for name, _ in ious]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("output_dirs", nargs="+", type=Path)
    parser.add_argument("--groups", nargs="+", type=parse_group, default=[], metavar="NAME=CLASSES")
    parser.add_argument("--per-class", action="store_true", help="every class's IoU in the groups table")
    args = parser.parse_args(argv)
    rows, grouped = [], []
    for output_dir in args.output_dirs:
        path = output_dir / "inference" / "metrics.json"
        if not path.is_file():
            raise SystemExit(f"{path}: missing (run train_net.py with OUTPUT_DIR {output_dir} first)")
        metrics = json.loads(path.read_text())
        rows += results_rows(output_dir.name, metrics)
        if args.groups or args.per_class:
            grouped += group_rows(output_dir.name, metrics, args.groups, args.per_class)
    print(markdown_table(rows))
    if grouped:
        header = ["model", "dataset", "mIoU"] + [f"{name} mIoU" for name, _ in args.groups]
        if args.per_class:
            header += grouped[0][1]
        print()
        print("| " + " | ".join(header) + " |")
        print("| --- | --- |" + " ---: |" * (len(header) - 2))
        for row, _ in grouped:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
