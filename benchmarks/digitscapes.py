"""The DigitScapes benchmark: softmax vs GMMSeg DeepLabV3+ and the experiments that separate the causes of
their difference, all under the main job's protocol (plain cross-entropy, its optimiser and schedule).

Variants (same backbone, decoder, data, seed and schedule; each differs from ``softmax`` / ``gmmseg`` only
in what ``VARIANTS`` names): the class-balanced sampler (both heads), the authors' memory (32,000 slots
started full of random unit vectors), flat stds, no component loss, fast means, the decode head at the
backbone's learning rate (both heads; the main job uses the authors' 10x), K = 1, vanilla EM, no memory,
the discriminative GMM (back-propagation), GMMs fitted after softmax training, and DeepLab's bootstrapped
loss (both heads); and the other architectures' DigitScapes pairs (FPN, SegFormer, UperNet, OCRNet),
same protocol. The variants are listed in ``variants.py``. GMM variants are scored with the paper's
``gmm`` score, with ``gmm_fullres`` (the same score on embeddings upsampled to the input resolution) and
with ``gmm_mahalanobis`` (the same without the components' log-determinant terms).

Each variant runs ``train_net.py`` in ``OUTPUT/<variant>/`` (``OUTPUT/<variant>_seed<N>/`` for seeds other
than 0) and is evaluated on ``digitscapes_val`` (mIoU, ECE) and ``digitscapes_anomaly_val`` (AUROC / AP /
FPR95, all anomalies and the near / far families). ``--seeds 0 1 2`` trains every chosen variant with
each seed; ``--close-seeds`` trains the headline pair with seeds 0, 1, 2 and, after a first pass with seed
0, repeats with seeds 1 and 2 every variant whose difference from GMMSeg (val mIoU or AUROC) is under
three times GMMSeg's seed-to-seed standard deviation (``needs_more_seeds``). The table gives each metric's
mean and sample standard deviation over the seeds a variant has.
The script is resumable: a finished variant is skipped, an interrupted one continues from its last
checkpoint (``--resume``). It shows a progress bar with the estimated time left and writes
``OUTPUT/<name>.md`` (the table), ``OUTPUT/<name>.json`` and ``OUTPUT/<name>.png`` (the plots).

Usage: ``python benchmarks/digitscapes.py [--close-seeds] [--iters N] [--output output/benchmark_digitscapes]
[--only gmmseg softmax] [--seeds 0 1 2] [--name results] [--quick]``. ``--quick`` runs every variant for a
few iterations on a tiny generated DigitScapes: a pipeline check for CI, not numbers.
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

# this folder's runs.py: the running script's folder is first on sys.path
from runs import (
    REPO,
    Progress,
    benchmark_env,
    is_done,
    mark_done,
    run_logged,
    run_training,
    settings_key,
    write_results,
)
from variants import GMMSEG, HEADLINE, VARIANTS

from gmmseg.evaluation.report import group_mean_iou

# GMM variants are also scored by the options beside the paper's score (full resolution, no volume term)
GMM_SCORES = ["TEST.ANOMALY_SCORES", "('gmm', 'gmm_fullres', 'gmm_mahalanobis')"]
QUICK = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "MODEL.GMM.MEMORY_PER_STEP", "5",
    "MODEL.GMM.UPDATE_INTERVAL", "2",
]  # fmt: skip


def schedule_overrides(iters: int | None, quick: bool, seed: int = 0) -> list[str]:
    """The schedule: the config's own (the main job's) unless ``iters`` is given."""
    opts = (
        []
        if iters is None
        else ["SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // 3))]
    )
    return opts + ["SEED", str(seed)] + (QUICK if quick else [])


def config_iters(config: Path) -> int:
    """MAX_ITER of a config (after its _BASE_), for the progress bar."""
    from gmmseg import load_cfg

    return load_cfg(config).SOLVER.MAX_ITER


def run_dir(root: Path, name: str, seed: int) -> Path:
    """Where one variant's run with one seed lives (seed 0 keeps the plain name)."""
    return root / (name if seed == 0 else f"{name}_seed{seed}")


def is_gmm(name: str) -> bool:
    """A variant whose model has the GMM classifier (its config is a ``*_gmmseg.yaml``)."""
    return VARIANTS[name][0].stem.endswith("_gmmseg")


def run_variant(
    name: str, root: Path, opts: list[str], env: dict, progress: Progress | None, iters: int, seed: int = 0
) -> dict:
    config, extra, _ = VARIANTS[name]
    out = run_dir(root, name, seed)
    if name != "softmax_posthoc_gmm":
        scores = GMM_SCORES if is_gmm(name) and "--quick" not in env.get("GMMSEG_BENCH_FLAGS", "") else []
        return run_training(name, config, [*opts, *extra, *scores], out, env, progress, iters)
    key = settings_key(name, config, [*opts, *extra])
    if is_done(out, key):
        return json.loads((out / "inference" / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    weights = run_dir(root, "softmax", seed) / "model_final.pth"  # needs the trained softmax model
    gmm_file = out / "posthoc_gmm.pth"
    fit = [
        py,
        str(REPO / "tools" / "fit_posthoc_gmm.py"),
        "--config-file",
        str(config),
        "--output",
        str(gmm_file),
    ]
    if "--quick" in env.get("GMMSEG_BENCH_FLAGS", ""):
        fit += ["--per-image", "20"]
    run_logged([*fit, *opts, "MODEL.WEIGHTS", str(weights)], out / "log.txt", env, None, 0)
    evaluate = [py, str(REPO / "train_net.py"), "--config-file", str(config), "--eval-only", *opts]
    evaluate += ["MODEL.WEIGHTS", str(weights), "TEST.POSTHOC_GMM", str(gmm_file), "OUTPUT_DIR", str(out)]
    run_logged(evaluate, out / "log.txt", env, None, 0)
    mark_done(out, key)
    return json.loads((out / "inference" / "metrics.json").read_text())


# DigitScapes' class groups (gmmseg_datasets.digitscapes): 4 stuff classes, then the 8 known digits
STUFF = ("sky", "water", "foliage", "building")
DIGITS = tuple(f"digit {d}" for d in range(8))
CLOSED_SET = ("mIoU", "stuff mIoU", "digit mIoU", "ECE")
# pixel metrics of all anomalies and of each family, then SegmentMeIfYouCan's component metrics (all)
COMPONENT_METRICS = ("sIoU", "PPV", "mean_F1")
METRICS = (
    CLOSED_SET
    + tuple(f"{family}{metric}" for family in ("", "near/", "far/") for metric in ("AUROC", "AP", "FPR95"))
    + COMPONENT_METRICS
)


def rows_for(name: str, per_seed: dict[int, dict]) -> list[dict]:
    """Table rows of one variant: its closed-set metrics and, per anomaly score, all / near / far.

    ``per_seed`` maps each seed to its run's metrics. A row holds each metric's mean over the seeds; with
    several seeds also its sample standard deviation (``<metric>_std``) and the per-seed values
    (``<metric>_seeds``, in the order of ``row["seeds"]``).
    """
    gmm_scores = is_gmm(name) or name == "softmax_posthoc_gmm"
    scores = ["gmm", "gmm_fullres", "gmm_mahalanobis"] if gmm_scores else ["msp", "entropy"]
    anomaly_keys = [set(m["digitscapes_anomaly_val"]["anomaly"]) for m in per_seed.values()]
    scores = [s for s in scores if all(f"{s}/AUROC" in keys for keys in anomaly_keys)]
    rows = []
    for score in scores:
        values: dict[str, list] = {key: [] for key in METRICS}
        for metrics in per_seed.values():
            val = metrics["digitscapes_val"]["sem_seg"]
            anomaly = metrics["digitscapes_anomaly_val"]["anomaly"]
            values["mIoU"].append(val["mIoU"])
            values["stuff mIoU"].append(group_mean_iou(val, STUFF))
            values["digit mIoU"].append(group_mean_iou(val, DIGITS))
            values["ECE"].append(val["ECE"])
            for key in METRICS[len(CLOSED_SET) :]:
                values[key].append(anomaly.get(f"{score}/{key}"))
        row = {"variant": name, "description": VARIANTS[name][2], "score": score, "seeds": list(per_seed)}
        rows.append(add_seed_statistics(row, values))
    return rows


def add_seed_statistics(row: dict, values: dict[str, list]) -> dict:
    """``row`` with, per metric, the mean of its per-seed ``values`` (None if any seed lacks it) and, with
    several seeds, the sample standard deviation (``<metric>_std``) and the values (``<metric>_seeds``)."""
    for key, seen in values.items():
        if any(v is None for v in seen):
            row[key] = None
            continue
        row[key] = statistics.fmean(seen)
        if len(seen) > 1:
            row[f"{key}_std"] = sample_std(seen)
            row[f"{key}_seeds"] = seen
    return row


def needs_more_seeds(row: dict, reference: dict, keys: tuple[str, ...] = ("mIoU", "AUROC")) -> bool:
    """A variant needs seeds 1 and 2 when its difference from GMMSeg (``reference``, a row over several
    seeds) is under three times GMMSeg's seed-to-seed standard deviation in any of ``keys``: a difference
    that size could be noise."""
    for key in keys:
        spread = reference.get(f"{key}_std")
        if row.get(key) is None or reference.get(key) is None or spread is None or math.isnan(spread):
            continue
        if abs(row[key] - reference[key]) < 3.0 * spread:
            return True
    return False


def first_pass(names: list[str], seeds: list[int], close_seeds: bool) -> list[tuple[str, int]]:
    """The runs before any seed is added by ``needs_more_seeds``: every variant with every seed, or, with
    ``close_seeds``, every variant with the first seed and then the headline pair with the others."""
    if not close_seeds:
        return [(name, seed) for seed in seeds for name in names]
    return [(name, seeds[0]) for name in names] + [(n, s) for s in seeds[1:] for n in HEADLINE if n in names]


def sample_std(values: list[float]) -> float:
    """Sample standard deviation that returns NaN for NaN input.

    ``statistics.stdev`` raises on NaN (a class absent from a short run's predictions and
    labels has IoU NaN), so the spread is computed directly.
    """
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(rows: list[dict], header: str) -> str:
    def f(row, key):
        value = row.get(key)
        if value is None:
            return "-"
        spread = row.get(f"{key}_std")
        return f"{value:.2f}" + ("" if spread is None else f" ± {spread:.2f}")

    def g(row, key):
        return "-" if row.get(key) is None else f"{row[key]:.2f}"

    lines = [
        header,
        "",
        "| variant | val mIoU | stuff / digit mIoU | val ECE | score | AUROC | AP | FPR95 "
        "| near AUROC / AP / FPR95 | far AUROC / AP / FPR95 | sIoU / PPV / mean F1 |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        near = " / ".join(g(r, f"near/{m}") for m in ("AUROC", "AP", "FPR95"))
        far = " / ".join(g(r, f"far/{m}") for m in ("AUROC", "AP", "FPR95"))
        components = " / ".join(g(r, m) for m in COMPONENT_METRICS)
        groups = f"{g(r, 'stuff mIoU')} / {g(r, 'digit mIoU')}"
        lines.append(
            f"| {r['description']} | {f(r, 'mIoU')} | {groups} | {f(r, 'ECE')} | {r['score']} | "
            f"{f(r, 'AUROC')} | {f(r, 'AP')} | {f(r, 'FPR95')} | {near} | {far} | {components} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['variant']} ({r['score']})" for r in rows]
    fig, axes = plt.subplots(1, 4, figsize=(18, 1.5 + 0.3 * len(rows)))
    for ax, (key, title) in zip(
        axes,
        [
            ("mIoU", "val mIoU (%)"),
            ("AUROC", "anomaly AUROC (%)"),
            ("AP", "anomaly AP (%)"),
            ("FPR95", "FPR95 (%, lower is better)"),
        ],
    ):
        values = [r[key] if r[key] is not None else 0.0 for r in rows]
        ax.barh(
            range(len(rows)),
            values,
            xerr=[r.get(f"{key}_std", 0.0) for r in rows],  # seed-to-seed spread, when several seeds
            color=["tab:gray" if r["variant"].startswith("softmax") else "tab:blue" for r in rows],
        )
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=None, help="iterations per run (default: the config's)")
    parser.add_argument("--output", default=str(REPO / "output" / "benchmark_digitscapes"))
    parser.add_argument(
        "--only", nargs="+", choices=list(VARIANTS), default=None, help="run these variants only"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train every variant with each")
    parser.add_argument(
        "--close-seeds",
        action="store_true",
        help="seeds 0 1 2 for the headline pair and for every variant within 3 seed stds of GMMSeg",
    )
    parser.add_argument("--name", default="results", help="the table's files: OUTPUT/<name>.{md,json,png}")
    parser.add_argument(
        "--quick", action="store_true", help="a few iterations on a tiny dataset (pipeline check)"
    )
    args = parser.parse_args(argv)
    names = args.only or list(VARIANTS)
    seeds = list(dict.fromkeys(args.seeds))
    if "softmax_posthoc_gmm" in names and "softmax" not in names:
        names = ["softmax", *names]
    if args.close_seeds:
        names = list(dict.fromkeys([*HEADLINE, *names]))
        seeds = list(dict.fromkeys([*seeds, 0, 1, 2]))
    names = [n for n in VARIANTS if n in names]  # softmax before its post-hoc variant
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    iters = 4 if args.quick else args.iters
    env = benchmark_env(args.quick)
    run_iters = iters or config_iters(GMMSEG)
    # first pass: every variant with seed 0 (and the headline pair with every seed), so that a comparable
    # table exists as early as possible; then the further seeds of the variants that need them
    plan = first_pass(names, seeds, args.close_seeds)
    progress = Progress(run_iters * sum(1 for n, _ in plan if n != "softmax_posthoc_gmm"))
    start = time.time()
    results: dict[str, dict[int, dict]] = {name: {} for name in names}

    def run(name: str, seed: int) -> None:
        progress.describe(name if len(seeds) == 1 else f"{name}, seed {seed}")
        results[name][seed] = run_variant(
            name, root, schedule_overrides(iters, args.quick, seed), env, progress, run_iters, seed
        )

    try:
        for name, seed in plan:
            run(name, seed)
        if args.close_seeds:
            reference = rows_for("gmmseg", results["gmmseg"])[0]
            close = [
                n
                for n in names
                if n not in HEADLINE and needs_more_seeds(rows_for(n, results[n])[0], reference)
            ]
            print(
                f"within 3 seed stds of GMMSeg, repeated with seeds {seeds[1:]}: {', '.join(close) or 'none'}"
            )
            progress.bar.total += run_iters * len(close) * (len(seeds) - 1)
            for seed in seeds[1:]:
                for name in close:
                    run(name, seed)
    finally:
        progress.close()
    rows = [row for name in names for row in rows_for(name, results[name])]
    seeds_text = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"seeds {', '.join(map(str, seeds))} where given: mean ± sample standard deviation"
    )
    header = (
        f"### DigitScapes: softmax vs GMMSeg DeepLabV3+ R18 and ablations ({run_iters} iterations at batch "
        f"{2 if args.quick else 16}, {seeds_text}{', --quick' if args.quick else ''})"
    )
    data = {"iters": run_iters, "quick": args.quick, "seeds": seeds, "rows": rows}
    write_results(root, args.name, markdown(rows, header), data, lambda path: plot(rows, path), start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
