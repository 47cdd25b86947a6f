"""The DigitScapes benchmark: softmax vs GMMSeg DeepLabV3+ and the paper's ablations, under one schedule.

Variants (same backbone, decoder, data, seed and schedule; they differ only in what is named):

- ``softmax``: the softmax DeepLabV3+ R-18 baseline (post-hoc scores MSP and entropy);
- ``gmmseg``: GMMSeg (K = 5, Sinkhorn EM, the config's memory);
- ``gmmseg_K1``: one Gaussian per class (``MODEL.GMM.NUM_COMPONENTS 1``);
- ``gmmseg_vanilla_em``: plain EM responsibilities instead of Sinkhorn (``MODEL.GMM.E_STEP vanilla``);
- ``gmmseg_memory0`` / ``gmmseg_memory_small``: no memory / a 10x smaller one (``MODEL.GMM.MEMORY_CAPACITY``);
- ``gmmseg_discriminative``: the mixtures learned by back-propagation (``MODEL.GMM.FIT backprop``);
- ``softmax_posthoc_gmm``: GMMs fitted to the trained softmax model's features afterwards
  (``tools/fit_posthoc_gmm.py``, then ``TEST.POSTHOC_GMM``).

Probes (``--probes``, or by name with ``--only``): one setting changed at a time (a ``MODEL.GMM`` key of
GMMSeg, or the loss of both models), to look for what holds GMMSeg back in this short from-scratch
schedule; see ``PROBES``.

Each variant runs ``train_net.py`` in ``OUTPUT/<variant>/`` (``OUTPUT/<variant>_seed<N>/`` for seeds other
than 0) and is evaluated on ``digitscapes_val`` (mIoU, ECE) and ``digitscapes_anomaly_val`` (AUROC / AP /
FPR95, all anomalies and the near / far families). With several ``--seeds``, the table gives each metric's
mean and sample standard deviation over the seeds (per-seed values in ``results.json``): the seed-to-seed
spread is what tells a real difference between two variants from noise.
The script is resumable: a finished variant is skipped, an interrupted one continues from its last
checkpoint (``--resume``). It shows a progress bar with the estimated time left and writes
``OUTPUT/results.md`` (the table), ``OUTPUT/results.json`` and ``OUTPUT/results.png`` (the plots).

Usage: ``python benchmarks/digitscapes.py [--iters 600] [--output output/benchmark_digitscapes]
[--only gmmseg softmax] [--probes] [--seeds 0 1 2] [--name results] [--quick]``. ``--quick`` runs every
variant for a few iterations on a tiny generated DigitScapes: a pipeline check for CI, not numbers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gmmseg.evaluation.report import group_mean_iou

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
SOFTMAX = CONFIGS / "deeplabv3plus_R18_softmax.yaml"
GMMSEG = CONFIGS / "deeplabv3plus_R18_gmmseg.yaml"
# name -> (config, overrides, description)
VARIANTS: dict[str, tuple[Path, list[str], str]] = {
    "softmax": (SOFTMAX, [], "softmax DeepLabV3+ R18"),
    "gmmseg": (GMMSEG, [], "GMMSeg (K = 5, Sinkhorn EM, memory 2,000)"),
    "gmmseg_K1": (GMMSEG, ["MODEL.GMM.NUM_COMPONENTS", "1"], "GMMSeg, K = 1"),
    "gmmseg_vanilla_em": (GMMSEG, ["MODEL.GMM.E_STEP", "vanilla"], "GMMSeg, vanilla EM"),
    "gmmseg_memory0": (GMMSEG, ["MODEL.GMM.MEMORY_CAPACITY", "0"], "GMMSeg, no memory"),
    "gmmseg_memory_small": (GMMSEG, ["MODEL.GMM.MEMORY_CAPACITY", "200"], "GMMSeg, memory 200"),
    "gmmseg_discriminative": (GMMSEG, ["MODEL.GMM.FIT", "backprop"], "discriminative GMMSeg (backprop)"),
    "softmax_posthoc_gmm": (SOFTMAX, [], "softmax + GMM fitted afterwards"),
}
# one setting at a time (``--probes``): what holds GMMSeg back in this schedule?
PROBES: dict[str, tuple[Path, list[str], str]] = {
    "gmmseg_mean_momentum_0.99": (
        GMMSEG, ["MODEL.GMM.MEAN_MOMENTUM", "0.99"], "GMMSeg probe: MEAN_MOMENTUM 0.99 (faster means)"
    ),
    "gmmseg_enqueue_all": (
        GMMSEG, ["MODEL.GMM.ENQUEUE_CORRECT_ONLY", "False"], "GMMSeg probe: enqueue misclassified pixels too"
    ),
    "gmmseg_logit_scale_5": (
        GMMSEG, ["MODEL.GMM.LOGIT_NORM_INIT_SCALE", "5.0"], "GMMSeg probe: LOGIT_NORM_INIT_SCALE 5 (sharper)"
    ),
    "gmmseg_no_logit_norm": (
        GMMSEG, ["MODEL.GMM.LOGIT_NORM", "none"], "GMMSeg probe: LOGIT_NORM none (plain Bayes rule)"
    ),
    "gmmseg_linear_projection": (
        GMMSEG, ["MODEL.GMM.PROJECTION_ACTIVATION", "none"], "GMMSeg probe: no ReLU after the projection"
    ),
    # the loss both models share: plain cross-entropy instead of DeepLab's hardest-20%-of-pixels one
    "softmax_plain_ce": (
        SOFTMAX, ["MODEL.SEM_SEG_HEAD.LOSS_TYPE", "cross_entropy"], "softmax probe: plain cross-entropy"
    ),
    "gmmseg_plain_ce": (
        GMMSEG, ["MODEL.SEM_SEG_HEAD.LOSS_TYPE", "cross_entropy"], "GMMSeg probe: plain cross-entropy"
    ),
}  # fmt: skip
ABLATIONS = list(VARIANTS)
VARIANTS.update(PROBES)
QUICK = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "DATALOADER.NUM_WORKERS", "0",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "MODEL.GMM.MEMORY_PER_STEP", "5",
    "MODEL.GMM.UPDATE_INTERVAL", "2",
]  # fmt: skip
ITER_RE = re.compile(r"\biter: (\d+)\b")


def schedule_overrides(iters: int, quick: bool, seed: int = 0) -> list[str]:
    opts = ["SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", str(max(1, iters // 3))]
    return opts + ["SEED", str(seed)] + (QUICK if quick else [])


def run_dir(root: Path, name: str, seed: int) -> Path:
    """Where one variant's run with one seed lives (seed 0 keeps the plain name)."""
    return root / (name if seed == 0 else f"{name}_seed{seed}")


def settings_key(name: str, opts: list[str]) -> str:
    """Identifies a variant's settings: a finished run is reused only for the same settings."""
    config, extra, _ = VARIANTS[name]
    text = json.dumps([name, config.read_text(), extra, opts])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Progress:
    """One bar over all variants' iterations, with the time left estimated from the measured pace."""

    def __init__(self, total_iters: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total_iters, unit="it", dynamic_ncols=True, smoothing=0.05)

    def describe(self, text: str) -> None:
        self.bar.set_description(text)

    def advance(self, n: int) -> None:
        self.bar.update(n)

    def skip(self, n: int) -> None:
        """Iterations that will not run (finished or resumed runs): off the total, so that the pace and
        the time left are estimated from iterations trained in this invocation only."""
        self.bar.total -= n
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_logged(cmd: list[str], log_path: Path, env: dict, progress: Progress | None, start_iter: int) -> None:
    """Run ``cmd``, writing its output to ``log_path`` and moving the bar with Detectron2's iteration logs."""
    done = start_iter
    with open(log_path, "a") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for line in proc.stdout:
            log.write(line)
            match = ITER_RE.search(line)
            if match and progress is not None:
                now = int(match.group(1)) + 1
                progress.advance(max(0, now - done))
                done = max(done, now)
        if proc.wait() != 0:
            raise RuntimeError(f"{' '.join(cmd[:3])} ... failed; see {log_path}")


def last_iteration(out: Path) -> int:
    """Iterations already done by an interrupted run (from its last checkpoint's name), else 0."""
    marker = out / "last_checkpoint"
    if not marker.is_file():
        return 0
    match = re.search(r"model_(\d+)\.pth", marker.read_text())
    return int(match.group(1)) + 1 if match else 0


def run_variant(
    name: str, root: Path, opts: list[str], env: dict, progress: Progress | None, iters: int, seed: int = 0
) -> dict:
    config, extra, _ = VARIANTS[name]
    out = run_dir(root, name, seed)
    key = settings_key(name, opts)
    done_file = out / "done.json"
    if done_file.is_file() and json.loads(done_file.read_text()).get("key") == key:
        if progress is not None:
            progress.skip(iters if name != "softmax_posthoc_gmm" else 0)
        return json.loads((out / "inference" / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    if name == "softmax_posthoc_gmm":  # needs the trained softmax model
        weights = run_dir(root, "softmax", seed) / "model_final.pth"
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
    else:
        start = last_iteration(out)
        if progress is not None:
            progress.skip(start)
        train = [py, str(REPO / "train_net.py"), "--config-file", str(config)]
        train += ["--resume"] if start > 0 else []
        train += [*opts, *extra, "OUTPUT_DIR", str(out)]
        run_logged(train, out / "log.txt", env, progress, start)
    done_file.write_text(json.dumps({"key": key, "time": time.time()}))
    return json.loads((out / "inference" / "metrics.json").read_text())


# DigitScapes' class groups (gmmseg.data.digitscapes): 4 stuff classes, then the 8 known digits
STUFF = ("sky", "water", "foliage", "building")
DIGITS = tuple(f"digit {d}" for d in range(8))
CLOSED_SET = ("mIoU", "stuff mIoU", "digit mIoU", "ECE")
METRICS = CLOSED_SET + tuple(
    f"{family}{metric}" for family in ("", "near/", "far/") for metric in ("AUROC", "AP", "FPR95")
)


def rows_for(name: str, per_seed: dict[int, dict]) -> list[dict]:
    """Table rows of one variant: its closed-set metrics and, per anomaly score, all / near / far.

    ``per_seed`` maps each seed to its run's metrics. A row holds each metric's mean over the seeds; with
    several seeds also its sample standard deviation (``<metric>_std``) and the per-seed values
    (``<metric>_seeds``, in the order of ``row["seeds"]``).
    """
    softmax_scores = VARIANTS[name][0] == SOFTMAX and name != "softmax_posthoc_gmm"
    scores = ["msp", "entropy"] if softmax_scores else ["gmm"]
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
        for key, seen in values.items():
            if any(v is None for v in seen):
                row[key] = None
                continue
            row[key] = statistics.fmean(seen)
            if len(seen) > 1:
                row[f"{key}_std"] = sample_std(seen)
                row[f"{key}_seeds"] = seen
        rows.append(row)
    return rows


def sample_std(values: list[float]) -> float:
    """Sample standard deviation that returns NaN for NaN input.

    ``statistics.stdev`` raises on NaN (a class absent from a short run's predictions and
    labels has IoU NaN), so the spread is computed directly.
    """
    mean = math.fsum(values) / len(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def markdown(rows: list[dict], header: str) -> str:
    def f(row, key):
        value = row[key]
        if value is None:
            return "-"
        spread = row.get(f"{key}_std")
        return f"{value:.2f}" + ("" if spread is None else f" ± {spread:.2f}")

    def g(row, key):
        return "-" if row[key] is None else f"{row[key]:.2f}"

    lines = [
        header,
        "",
        "| variant | val mIoU | stuff / digit mIoU | val ECE | score | AUROC | AP | FPR95 "
        "| near AUROC / AP / FPR95 | far AUROC / AP / FPR95 |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        near = " / ".join(g(r, f"near/{m}") for m in ("AUROC", "AP", "FPR95"))
        far = " / ".join(g(r, f"far/{m}") for m in ("AUROC", "AP", "FPR95"))
        groups = f"{g(r, 'stuff mIoU')} / {g(r, 'digit mIoU')}"
        lines.append(
            f"| {r['description']} | {f(r, 'mIoU')} | {groups} | {f(r, 'ECE')} | {r['score']} | "
            f"{f(r, 'AUROC')} | {f(r, 'AP')} | {f(r, 'FPR95')} | {near} | {far} |"
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
    parser.add_argument("--iters", type=int, default=600, help="training iterations per variant (batch 16)")
    parser.add_argument("--output", default=str(REPO / "output" / "benchmark_digitscapes"))
    parser.add_argument(
        "--only", nargs="+", choices=list(VARIANTS), default=None, help="run these variants only"
    )
    parser.add_argument("--probes", action="store_true", help="add the probes (PROBES) to the variants")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="train every variant with each")
    parser.add_argument("--name", default="results", help="the table's files: OUTPUT/<name>.{md,json,png}")
    parser.add_argument(
        "--quick", action="store_true", help="a few iterations on a tiny dataset (pipeline check)"
    )
    args = parser.parse_args(argv)
    names = args.only or ABLATIONS + (list(PROBES) if args.probes else [])
    if args.only and args.probes:
        names = names + list(PROBES)
    seeds = list(dict.fromkeys(args.seeds))
    if "softmax_posthoc_gmm" in names and "softmax" not in names:
        names = ["softmax", *names]
    names = [n for n in VARIANTS if n in names]  # softmax before its post-hoc variant
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    iters = 4 if args.quick else args.iters
    env = {**os.environ, "GMMSEG_BENCH_FLAGS": "--quick" if args.quick else ""}
    if args.quick:
        from gmmseg.data.digitscapes import generate_digitscapes

        datasets = Path(tempfile.mkdtemp(prefix="digitscapes-quick-"))
        generate_digitscapes(
            str(datasets), seed=0, image_size=64, counts={"train": 8, "val": 4, "anomaly_val": 4}
        )
        env["DETECTRON2_DATASETS"] = str(datasets)
    else:
        datasets = Path(env.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets")))
        if not (datasets / "digitscapes" / "meta.json").is_file():
            subprocess.run(
                [sys.executable, str(REPO / "datasets" / "prepare_digitscapes.py"), "--root", str(datasets)],
                check=True,
            )
    trained = [n for n in names if n != "softmax_posthoc_gmm"]
    progress = Progress(iters * len(trained) * len(seeds))
    start = time.time()
    results: dict[str, dict[int, dict]] = {name: {} for name in names}
    try:
        for seed in seeds:  # all variants of one seed first: a comparable table as early as possible
            opts = schedule_overrides(iters, args.quick, seed)
            for name in names:
                progress.describe(name if len(seeds) == 1 else f"{name}, seed {seed}")
                results[name][seed] = run_variant(name, root, opts, env, progress, iters, seed)
    finally:
        progress.close()
    rows = [row for name in names for row in rows_for(name, results[name])]
    seeds_text = (
        f"seed {seeds[0]}"
        if len(seeds) == 1
        else f"seeds {', '.join(map(str, seeds))}: mean ± sample standard deviation"
    )
    header = (
        f"### DigitScapes: softmax vs GMMSeg DeepLabV3+ R18 and ablations ({iters} iterations at batch "
        f"{2 if args.quick else 16}, {seeds_text}{', --quick' if args.quick else ''})"
    )
    table = markdown(rows, header)
    files = {ext: root / f"{args.name}.{ext}" for ext in ("md", "json", "png")}
    files["md"].write_text(table)
    files["json"].write_text(
        json.dumps({"iters": iters, "quick": args.quick, "seeds": seeds, "rows": rows}, indent=2)
    )
    plot(rows, files["png"])
    print(table)
    print(f"wrote {', '.join(str(p) for p in files.values())} in {time.time() - start:,.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
