"""One seeds table from several ``digitscapes.py`` tables: seeds trained in different invocations, processes
or sessions (for example seed 0 in ``benchmarks/results/headline.json`` and seeds 1 and 2 trained later,
one process per head).

Each input row holds, per metric, its value for each of ``row["seeds"]`` (``<metric>_seeds`` when there are
several, the value itself otherwise). Rows of the same variant and anomaly score are pooled by seed; a seed
given twice must carry the same numbers (a rerun of the same seed is deterministic, so a difference means
the inputs were not trained under one protocol) and is counted once. The output row holds the mean and the
sample standard deviation over the pooled seeds, as ``digitscapes.py`` computes them.

``--rename OLD=NEW`` relabels the rows recorded as variant OLD as NEW before pooling (all renames at once,
so two variants can swap names): for tables recorded before a default changed, such as the GMMSeg rows
recorded as "gmmseg" when its memory started empty, which today's ``VARIANTS`` call
"gmmseg_memory_empty". A row's description is today's ``VARIANTS`` one where its variant has one.

Usage: ``python benchmarks/merge_seeds.py A.json B.json ... [--rename OLD=NEW ...] [--only VARIANT ...]
[--output DIR] [--name seeds]`` (``--only``: keep these variants, by today's names). All inputs must have
the same number of iterations. Writes ``DIR/<name>.md``, ``.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import digitscapes as bench  # this folder's scripts: on sys.path as the running script's folder
from runs import write_results


def per_seed_values(row: dict) -> dict[int, dict[str, float | None]]:
    """``{seed: {metric: value}}`` of one recorded row."""
    seeds = row["seeds"]
    out: dict[int, dict[str, float | None]] = {seed: {} for seed in seeds}
    for key in bench.METRICS:
        if len(seeds) > 1 and row.get(key) is not None:
            values = row[f"{key}_seeds"]
        else:
            values = [row.get(key)] * len(seeds)  # one seed, or a metric absent for all of them
        for seed, value in zip(seeds, values):
            out[seed][key] = value
    return out


def same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return a == b or (math.isnan(a) and math.isnan(b))


def merge(tables: list[dict], rename: dict[str, str] | None = None) -> list[dict]:
    """Rows with each (variant, score)'s seeds pooled over ``tables``, in their first order of appearance;
    ``rename`` maps recorded variant names to today's."""
    rename = rename or {}
    pooled: dict[tuple[str, str], dict[int, dict]] = {}
    descriptions: dict[str, str] = {}
    for table in tables:
        for row in table["rows"]:
            variant = rename.get(row["variant"], row["variant"])
            key = (variant, row["score"])
            known = bench.VARIANTS.get(variant)
            descriptions[variant] = known[2] if known else row["description"]
            seen = pooled.setdefault(key, {})
            for seed, values in per_seed_values(row).items():
                if seed in seen and not all(same(seen[seed][k], values[k]) for k in bench.METRICS):
                    raise SystemExit(f"{key[0]} ({key[1]}), seed {seed}: two inputs give different numbers")
                seen.setdefault(seed, values)
    rows = []
    for (variant, score), by_seed in pooled.items():
        seeds = sorted(by_seed)
        row = {"variant": variant, "description": descriptions[variant], "score": score, "seeds": seeds}
        values = {key: [by_seed[s][key] for s in seeds] for key in bench.METRICS}
        rows.append(bench.add_seed_statistics(row, values))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tables", nargs="+", help="digitscapes.py JSON files")
    parser.add_argument("--output", default=str(bench.REPO / "output" / "benchmark_digitscapes"))
    parser.add_argument("--name", default="seeds")
    parser.add_argument(
        "--rename", nargs="+", default=[], metavar="OLD=NEW", help="relabel variant OLD as NEW"
    )
    parser.add_argument("--only", nargs="+", default=None, help="keep these variants (today's names)")
    args = parser.parse_args(argv)
    if any("=" not in pair for pair in args.rename):
        raise SystemExit(f"--rename takes OLD=NEW pairs, got {args.rename}")
    rename = dict(pair.split("=", 1) for pair in args.rename)
    unknown = sorted(set(rename.values()) - set(bench.VARIANTS))
    if unknown:
        raise SystemExit(f"--rename: {', '.join(unknown)} not in today's VARIANTS")
    start = time.time()
    tables = [json.loads(Path(p).read_text()) for p in args.tables]
    iters = {t["iters"] for t in tables}
    if len(iters) != 1 or any(t.get("quick") for t in tables):
        raise SystemExit(
            f"the inputs must share one schedule and none be --quick (iterations: {sorted(iters)})"
        )
    rows = [r for r in merge(tables, rename) if args.only is None or r["variant"] in args.only]
    all_seeds = sorted({s for r in rows for s in r["seeds"]})
    header = (
        f"### DigitScapes: softmax vs GMMSeg DeepLabV3+ R18 ({iters.pop()} iterations at batch 16, seeds "
        f"{', '.join(map(str, all_seeds))} where given: mean ± sample standard deviation)"
    )
    data = {
        "iters": tables[0]["iters"],
        "quick": False,
        "seeds": all_seeds,
        "inputs": args.tables,
        "rows": rows,
    }
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    write_results(
        root, args.name, bench.markdown(rows, header), data, lambda path: bench.plot(rows, path), start
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
