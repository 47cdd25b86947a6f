"""One prepared run for a lent accelerator: the speed tables and a short DigitScapes training, AMP off and on.

A GPU machine is lent to some sessions only, for minutes, so everything it should measure is in this one
command, which records its tables where the repository keeps results:

1. ``benchmarks/speed.py --device D``: inference and training-step time and memory of every softmax / GMM
   pair at 512x1024, and the GMM core tables (``speed_<device>.md`` / ``.json``);
2. DigitScapes DeepLabV3+ R-18, softmax and GMMSeg, trained for ``--iters`` iterations (the configs'
   protocol shortened, poly decay over them) with ``SOLVER.AMP.ENABLED`` False and True (float16 with a
   GradScaler on CUDA, bfloat16 on the CPU: ``SOLVER.AMP.DTYPE auto``), each evaluated once: wall time,
   median seconds per iteration, val mIoU, anomaly AUROC / AP / FPR95, and whether any logged loss was
   NaN or inf (``training_<device>.md`` / ``.json``).

Usage: ``python benchmarks/device_check.py --device cuda [--iters 300] [--output benchmarks/results/device]``.
``--quick`` (tiny generated data, a few iterations, the quick speed tables) checks the pipeline on the CPU
in a minute: ``python benchmarks/device_check.py --device cpu --quick --output /tmp/device_check``.
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
import subprocess
import sys
import time
from pathlib import Path

from runs import REPO, benchmark_env

CONFIGS = REPO / "configs" / "digitscapes"
MODELS = {
    "softmax": (CONFIGS / "deeplabv3plus_R18_softmax.yaml", "entropy"),
    "gmmseg": (CONFIGS / "deeplabv3plus_R18_gmmseg.yaml", "gmm"),
}
QUICK_TRAINING = [
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1", "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MIN_SIZE_TEST", "64", "MODEL.GMM.MEMORY_PER_STEP", "5", "MODEL.GMM.UPDATE_INTERVAL", "2",
]  # fmt: skip


def read_metrics_log(out: Path) -> list[dict]:
    """Detectron2's ``metrics.json``: one JSON object per logged iteration (and one per evaluation)."""
    path = out / "metrics.json"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def training_row(model: str, amp: bool, out: Path, wall: float, score: str) -> dict:
    """What one training run measured: its times, its final metrics and whether a loss went non-finite."""
    logged = read_metrics_log(out)
    losses = [v for entry in logged for k, v in entry.items() if k.startswith("loss") or k == "total_loss"]
    times = [entry["time"] for entry in logged if "time" in entry]
    final = json.loads((out / "inference" / "metrics.json").read_text())
    val = final["digitscapes_val"]["sem_seg"]
    anomaly = final["digitscapes_anomaly_val"]["anomaly"]
    return {
        "model": model,
        "amp": amp,
        "wall_s": wall,
        "s_per_iter": statistics.median(times) if times else None,
        "mIoU": val["mIoU"],
        "ECE": val["ECE"],
        "score": score,
        **{key: anomaly.get(f"{score}/{key}") for key in ("AUROC", "AP", "FPR95")},
        "finite_losses": all(math.isfinite(v) for v in losses),
        "logged_losses": len(losses),
    }


def train(model: str, amp: bool, device: str, iters: int, quick: bool, root: Path, env: dict) -> dict:
    config, score = MODELS[model]
    out = root / f"{model}_amp{int(amp)}"
    cmd = [
        sys.executable, str(REPO / "train_net.py"), "--config-file", str(config),
        "MODEL.DEVICE", device, "SOLVER.AMP.ENABLED", str(amp), "SOLVER.MAX_ITER", str(iters),
        "SOLVER.CHECKPOINT_PERIOD", str(iters), "OUTPUT_DIR", str(out), *(QUICK_TRAINING if quick else []),
    ]  # fmt: skip
    start = time.time()
    with open(root / f"{model}_amp{int(amp)}.log", "w") as log:
        subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    return training_row(model, amp, out, time.time() - start, score)


def training_table(rows: list[dict], device: str, iters: int) -> str:
    def f(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    lines = [
        f"### DigitScapes DeepLabV3+ R18 on {device}: {iters} iterations, AMP off and on",
        "",
        "| model | AMP | wall (s) | s / iteration | val mIoU | val ECE | score | AUROC | AP | FPR95 "
        "| losses finite |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {'on' if r['amp'] else 'off'} | {r['wall_s']:.0f} | {f(r['s_per_iter'], 4)} "
            f"| {f(r['mIoU'])} | {f(r['ECE'])} | {r['score']} | {f(r['AUROC'])} | {f(r['AP'])} "
            f"| {f(r['FPR95'])} | {'yes' if r['finite_losses'] else 'NO'} ({r['logged_losses']}) |"
        )
    return "\n".join(lines) + "\n"


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--iters", type=int, default=300, help="training iterations per run")
    parser.add_argument("--output", default=str(REPO / "benchmarks" / "results" / "device"))
    parser.add_argument("--quick", action="store_true", help="tiny data, a few iterations: a pipeline check")
    parser.add_argument("--skip-speed", action="store_true", help="only the training runs")
    args = parser.parse_args(argv)
    root = Path(args.output)
    root.mkdir(parents=True, exist_ok=True)
    env = benchmark_env(args.quick)
    tag = args.device.split(":")[0]
    if not args.skip_speed:
        speed = [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--device", args.device]
        speed += ["--output", str(root / f"speed_{tag}.md"), "--json", str(root / f"speed_{tag}.json")]
        subprocess.run(speed + (["--quick"] if args.quick else []), check=True, env=env, cwd=REPO)
    iters = 4 if args.quick else args.iters
    rows = [train(m, amp, args.device, iters, args.quick, root, env) for m in MODELS for amp in (False, True)]
    table = training_table(rows, device_name(args.device), iters)
    print(table)
    (root / f"training_{tag}.md").write_text(table)
    data = {"device": device_name(args.device), "iters": iters, "quick": args.quick, "rows": rows}
    (root / f"training_{tag}.json").write_text(json.dumps(data, indent=2))
    return 0 if all(r["finite_losses"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
