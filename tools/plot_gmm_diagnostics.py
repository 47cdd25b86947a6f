#!/usr/bin/env python
"""Plot a GMM run's mixture diagnostics over training, from its ``metrics.json``; two runs side by side.

Why: the class loss of GMM Mask2Former rises once its memory is full (issue 14); the loss alone cannot say
whether a class's stds collapse, "no object" floods the memory, the means stop moving or the class-score
scale stays put. The run must log them (``MODEL.GMM.DIAGNOSTICS_PERIOD 20``: ``gmm_diag/*``, see
``GMMEMHook``). One column per run, rows sharing their y axis so that a before/after pair compares at a
glance: class loss (last decoder layer) with the memory fill, per-class mean std, memory share, features
per step reaching the memory (past the enqueue filter) and written, turn of the means, class-score scale.
"No object" is drawn thick and black.

    python tools/plot_gmm_diagnostics.py output/digitscapes/mask2former_R18_gmmseg --output diag.png
    python tools/plot_gmm_diagnostics.py OUT_BEFORE OUT_AFTER --labels before after --output diag.png
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict

Series = tuple[list[int], list[float]]
# class-loss keys, first present wins: Mask2Former's last decoder layer, then the per-pixel heads'
LOSS_KEYS = ("loss_ce", "loss_sem_seg")
NO_OBJECT = "no_object"
# (statistic, y label) of the per-class rows, below the class-loss row
CLASS_ROWS = (
    ("std", "mean std of components"),
    ("memory_share", "share of memory slots"),
    ("offered_per_step", "features / step past filter"),
    ("written_per_step", "features / step written"),
    ("mean_angle", "turn of means since last log (deg)"),
)


def load_metrics(path: str) -> dict[str, Series]:
    """``{key: (iterations, values)}`` from a Detectron2 ``metrics.json`` (one JSON object per line); a
    resumed run's repeated iterations keep their last value, and an unfinished last line is skipped."""
    by_iter: dict[str, dict[int, float]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            it = record.get("iteration")
            if not isinstance(it, int):
                continue  # evaluation results and the like
            for key, value in record.items():
                if key != "iteration" and isinstance(value, (int, float)):
                    by_iter[key][it] = float(value)
    return {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in by_iter.items()}


def class_series(metrics: dict[str, Series], statistic: str) -> dict[str, Series]:
    """``{class: series}`` of ``gmm_diag/<statistic>/<class>``, real classes by index, then no object."""
    prefix = f"gmm_diag/{statistic}/"
    found = {k[len(prefix) :]: v for k, v in metrics.items() if k.startswith(prefix)}
    return dict(
        sorted(found.items(), key=lambda kv: (kv[0] == NO_OBJECT, int(kv[0]) if kv[0].isdigit() else 0))
    )


def _metrics_file(output_dir: str) -> str:
    path = output_dir if output_dir.endswith(".json") else os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no metrics.json (pass a training run's OUTPUT_DIR)")
    return path


def _draw_classes(ax, series: dict[str, Series]) -> None:
    for name, (x, y) in series.items():
        if name == NO_OBJECT:
            ax.plot(x, y, color="black", linewidth=2.2, label="no object", zorder=3)
        else:
            ax.plot(x, y, linewidth=0.9, alpha=0.8)


def plot_runs(runs: list[tuple[str, dict[str, Series]]], output: str, loss_key: str | None = None) -> None:
    """Write the PNG ``output``: one column per (label, metrics) run (module docstring for the rows)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = 2 + len(CLASS_ROWS)
    fig = Figure(figsize=(6.5 * len(runs), 2.3 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, len(runs), sharex="col", sharey="row", squeeze=False)
    for col, (label, metrics) in enumerate(runs):
        key = loss_key or next((k for k in LOSS_KEYS if k in metrics), None)
        ax = axes[0, col]
        ax.set_title(label)
        if key in metrics:
            ax.plot(*metrics[key], color="tab:red", label=key)
        if "gmm/memory_fill" in metrics:
            twin = ax.twinx()
            twin.plot(*metrics["gmm/memory_fill"], color="tab:gray", linestyle="--", label="memory fill")
            twin.set_ylim(0, 1.05)
            twin.set_ylabel("memory fill", color="tab:gray")
        ax.set_ylabel(f"class loss ({key})" if key else "class loss (none logged)")
        for row, (statistic, ylabel) in enumerate(CLASS_ROWS, start=1):
            series = class_series(metrics, statistic)
            _draw_classes(axes[row, col], series)
            axes[row, col].set_ylabel(ylabel)
            if NO_OBJECT in series and col == 0:
                axes[row, col].legend(loc="best", fontsize="small")
        ax = axes[-1, col]
        _draw_classes(ax, class_series(metrics, "logit_scale"))
        if "gmm_diag/logit_scale_mean" in metrics:
            ax.plot(*metrics["gmm_diag/logit_scale_mean"], color="tab:blue", linewidth=2.2, label="mean")
            ax.legend(loc="best", fontsize="small")
        ax.set_ylabel("class-score scale")
        ax.set_xlabel("iteration")
        if not any(k.startswith("gmm_diag/") for k in metrics):
            axes[1, col].text(0.5, 0.5, "no gmm_diag/* logged", ha="center", transform=axes[1, col].transAxes)
    fig.tight_layout()
    fig.savefig(output, dpi=90)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="one or two training output dirs")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--labels", nargs="+", help="column titles (default: the directories)")
    parser.add_argument("--loss-key", help=f"class-loss key (default: the first of {', '.join(LOSS_KEYS)})")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("at most two runs (a before/after pair)")
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        parser.error("give one label per run")
    runs = [(label, load_metrics(_metrics_file(run))) for label, run in zip(labels, args.runs)]
    plot_runs(runs, args.output, args.loss_key)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
