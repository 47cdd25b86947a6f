"""Has the main job converged? Both heads trained for the main job's schedule T and for 2T.

The criterion of the fair comparison: doubling the schedule moves neither model's val mIoU by more than
``--tolerance`` (1 point). The T runs are the benchmark's ``softmax`` and ``gmmseg`` runs (shared with
``digitscapes.py`` in the same ``--output``); the 2T runs evaluate every ``--eval-period`` iterations, so the
plot shows val mIoU against iterations for both heads, with the T runs' final values as markers.

Writes ``OUTPUT/<name>.md`` (the table), ``.json`` and ``.png`` (the curves).

Usage: ``python benchmarks/convergence.py [--factor 2] [--eval-period N]
[--iters T] [--main-iters N] [--only softmax|gmmseg] [--output output/benchmark_digitscapes]
[--short-results results.json] [--name convergence] [--quick]``. The main job (``tools/main.sh``) trains
1,000 iterations of the configs' protocol:
``--iters 1000 --main-iters 1000 --output output/benchmark_digitscapes_it1000`` checks that schedule.
``--short-results`` takes the T runs' val mIoU from a table ``digitscapes.py`` wrote at T iterations (for
example ``benchmarks/results/headline.json``) instead of training them again: only the 2T runs train.
``--only`` lets the two heads train in two processes at once; a last call without it, which reuses every
finished run, writes the table for both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import digitscapes as bench  # this folder's scripts: on sys.path as the running script's folder
from runs import Progress, benchmark_env, run_training, write_results


def curve(run: Path, max_iter: int) -> list[tuple[int, float]]:
    """(iterations done, val mIoU) of every evaluation in a run's ``metrics.json``.

    A periodic evaluation after step ``i`` is logged at iteration ``i`` (``i + 1`` steps done); the final
    one, in ``after_train``, at ``max_iter``. Detectron2 writes ``metrics.json`` every 20 iterations with the
    latest value of each metric, so evaluations closer together than that keep only the last.
    """
    points = []
    for line in (run / "metrics.json").read_text().splitlines():
        record = json.loads(line)
        for key in ("digitscapes_val/sem_seg/mIoU", "sem_seg/mIoU"):
            if key in record:
                points.append((min(int(record["iteration"]) + 1, max_iter), float(record[key])))
                break
    return points


def recorded_miou(path: Path, iters: int) -> dict[str, float]:
    """Seed-0 val mIoU of the headline pair in a ``digitscapes.py`` table, checked to be at ``iters``."""
    data = json.loads(path.read_text())
    if data.get("iters") != iters or data.get("quick"):
        raise SystemExit(f"{path} holds {data.get('iters')}-iteration runs, not T = {iters}")
    found = {}
    for row in data["rows"]:
        seeds = row.get("seeds", [0])
        if row["variant"] in bench.HEADLINE and 0 in seeds:
            value = row["mIoU_seeds"][seeds.index(0)] if len(seeds) > 1 else row["mIoU"]
            found.setdefault(row["variant"], float(value))
    missing = [n for n in bench.HEADLINE if n not in found]
    if missing:
        raise SystemExit(f"{path} has no row for {', '.join(missing)}")
    return found


def converged(final_t: float, final_2t: float, tolerance: float) -> bool:
    """Doubling the schedule moved val mIoU by at most ``tolerance`` points."""
    return abs(final_2t - final_t) <= tolerance


def plot(
    curves: dict[str, list[tuple[int, float]]], finals: dict[str, tuple[int, float]], path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"softmax": "tab:gray", "gmmseg": "tab:blue"}
    for name, points in curves.items():
        xs, ys = zip(*points) if points else ((), ())
        ax.plot(xs, ys, marker=".", color=colors[name], label=f"{name}, 2T schedule (periodic evaluation)")
        it, miou = finals[name]
        ax.plot(
            [it], [miou], marker="*", markersize=12, color=colors[name], ls="none", label=f"{name}, T run"
        )
    ax.set_xlabel("iteration")
    ax.set_ylabel("val mIoU (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--factor", type=int, default=2, help="the long schedule is this many times T")
    parser.add_argument("--iters", type=int, default=None, help="T (default: --main-iters)")
    parser.add_argument(
        "--main-iters",
        type=int,
        default=None,
        help="the schedule whose runs are digitscapes.py's own in the same --output, trained as "
        "`digitscapes.py --iters N` trains them (default: the configs')",
    )
    parser.add_argument("--eval-period", type=int, default=500, help="of the runs other than the main job's")
    parser.add_argument("--only", nargs="+", choices=["softmax", "gmmseg"], default=None)
    parser.add_argument("--tolerance", type=float, default=1.0, help="mIoU points")
    parser.add_argument("--output", default=str(bench.REPO / "output" / "benchmark_digitscapes"))
    parser.add_argument(
        "--short-results",
        default=None,
        help="a digitscapes.py JSON at T iterations whose val mIoU stands for the T runs (not retrained)",
    )
    parser.add_argument("--name", default="convergence")
    parser.add_argument("--quick", action="store_true", help="a few iterations on a tiny dataset")
    args = parser.parse_args(argv)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    env = benchmark_env(args.quick)
    config_iters = bench.config_iters(bench.GMMSEG)
    main_iters = 4 if args.quick else (args.main_iters or config_iters)
    short = args.iters or main_iters
    long = short * args.factor
    names = [n for n in bench.HEADLINE if n in (args.only or bench.HEADLINE)]
    recorded = recorded_miou(Path(args.short_results), short) if args.short_results else {}
    progress = Progress((0 if recorded else short) * len(names) + long * len(names))
    start = time.time()
    rows, curves, finals = [], {}, {}

    def train(name: str, iters: int) -> tuple[dict, Path]:
        """The main job's own run (shared with digitscapes.py) at its schedule; otherwise a run evaluated
        every ``--eval-period`` iterations (which does not change its training)."""
        if iters == main_iters:
            schedule = None if iters == config_iters and not args.quick else iters
            opts = bench.schedule_overrides(schedule, args.quick)
            return bench.run_variant(name, root, opts, env, progress, iters), bench.run_dir(root, name, 0)
        config, extra, _ = bench.VARIANTS[name]
        opts = bench.schedule_overrides(iters, args.quick) + ["TEST.EVAL_PERIOD", str(args.eval_period)]
        out = root / f"{name}_it{iters}"
        return run_training(out.name, config, [*opts, *extra], out, env, progress, iters), out

    try:
        for name in names:
            if recorded:
                t = recorded[name]
            else:
                metrics, _ = train(name, short)
                t = metrics["digitscapes_val"]["sem_seg"]["mIoU"]
            long_metrics, out = train(name, long)
            t2 = long_metrics["digitscapes_val"]["sem_seg"]["mIoU"]
            curves[name] = curve(out, long)
            finals[name] = (short, t)
            rows.append(
                {
                    "variant": name,
                    "description": bench.VARIANTS[name][2],
                    "iters": short,
                    "mIoU": t,
                    "long_iters": long,
                    "long_mIoU": t2,
                    "difference": t2 - t,
                    "converged": converged(t, t2, args.tolerance),
                    "curve": curves[name],
                }
            )
    finally:
        progress.close()
    lines = [
        f"### Convergence: val mIoU after T = {short} and {args.factor}T = {long} iterations "
        f"(converged: moved by at most {args.tolerance:g} point{'s' if args.tolerance != 1 else ''})",
        "",
        f"| model | mIoU at {short} | mIoU at {long} | difference | converged |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['description']} | {r['mIoU']:.2f} | {r['long_mIoU']:.2f} | {r['difference']:+.2f} | "
            f"{'yes' if r['converged'] else 'no'} |"
        )
    data = {
        "factor": args.factor,
        "eval_period": args.eval_period,
        "short_results": args.short_results,
        "rows": rows,
    }
    write_results(
        root, args.name, "\n".join(lines) + "\n", data, lambda path: plot(curves, finals, path), start
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
