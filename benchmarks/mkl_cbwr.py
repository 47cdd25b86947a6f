"""What pinning MKL's code branch (``gmmseg.reproducibility``: ``MKL_CBWR=COMPATIBLE``) costs on CPU.

Two measurements, each setting in its own process (MKL reads ``MKL_CBWR`` once per process), settings
interleaved round after round (order alternating) so that drift in a shared machine's speed affects all:

1. the GMM log-likelihood kernel ``diag_gaussian_log_prob`` alone at N=65536 pixels, C*K=60 components,
   D=64 (forward without autograd, and forward + backward): the fastest of ``--repeats`` calls (the one
   least disturbed by other work on the machine), then the median over rounds;
2. training steps of the DigitScapes GMMSeg and softmax DeepLabV3+ (``train_net.py``, ``--iters``
   iterations on ``$DETECTRON2_DATASETS/digitscapes``, no evaluation): Detectron2's "Overall training
   speed" (seconds per iteration after the first two), and the time per iteration spent in MKL calls, as
   ``MKL_VERBOSE=1`` reports each call's own time: that row is what the setting changes, undisturbed by
   the rest of the step and by other work on the machine. The softmax DeepLabV3+ calls no MKL routine,
   so its step times show the noise level.

Settings: ``off`` (``GMMSEG_MKL_CBWR=off``: MKL's own, machine-dependent dispatch), ``AUTO`` (CNR on the
machine's own branch) and ``COMPATIBLE`` (the project's default). The "branch" row is MKL's own answer
(``mkl_branch``): on a non-Intel CPU ``AVX2`` shows up as ``AUTO``.

Usage: ``python benchmarks/mkl_cbwr.py [--iters 10] [--rounds 3] [--train-rounds 1] [--threads 2]
[--branches off AUTO COMPATIBLE] [--no-training]``; prints a markdown table.
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "digitscapes"
MODELS = {"GMMSeg": "deeplabv3plus_R18_gmmseg.yaml", "softmax": "deeplabv3plus_R18_softmax.yaml"}
VERBOSE = re.compile(r"^MKL_VERBOSE \w+\(.*\) ([0-9.]+)(ns|us|ms|s) ", re.MULTILINE)
UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}
SPEED = re.compile(r"Overall training speed: \d+ iterations in \S+ \(([0-9.]+) s / it\)")


def branch_env(branch: str, threads: int) -> dict[str, str]:
    """The environment of a child process under one setting."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "GMMSEG_MKL_CBWR")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    if branch.lower() == "off":
        env["GMMSEG_MKL_CBWR"] = "off"
    else:
        env["MKL_CBWR"] = branch
    return env


def kernel_child(repeats: int) -> None:
    """Time the kernel in this process and print one JSON line."""
    import torch

    from gmmseg.gmm import diag_gaussian_log_prob
    from gmmseg.reproducibility import mkl_branch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(65536, 64, generator=g)
    means = torch.randn(60, 64, generator=g)
    stds = torch.rand(60, 64, generator=g) + 0.5
    xg = x.clone().requires_grad_()

    def forward() -> None:
        with torch.no_grad():
            diag_gaussian_log_prob(x, means, stds)

    def forward_backward() -> None:
        xg.grad = None
        diag_gaussian_log_prob(xg, means, stds).logsumexp(1).sum().backward()

    result = {"branch": mkl_branch()}
    for name, fn in (("forward", forward), ("forward_backward", forward_backward)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[name] = min(times)
    print(json.dumps(result))


def run_kernel(branch: str, threads: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--kernel-child", "--repeats", str(repeats)]
    proc = subprocess.run(cmd, env=branch_env(branch, threads), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mkl_seconds(log: str) -> float:
    """Total time of the MKL calls that ``MKL_VERBOSE=1`` logged (each line gives its call's own time)."""
    return sum(float(t) * UNITS[u] for t, u in VERBOSE.findall(log))


def run_training(branch: str, threads: int, config: str, iters: int) -> tuple[float, float]:
    """Seconds per iteration of ``iters`` training iterations of ``config`` under ``branch``, and the
    seconds per iteration spent in MKL (from ``MKL_VERBOSE``: not disturbed by the rest of the step)."""
    with tempfile.TemporaryDirectory(prefix="mkl_cbwr_") as out:
        cmd = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(CONFIGS / config)]
        cmd += ["SOLVER.MAX_ITER", str(iters), "SOLVER.CHECKPOINT_PERIOD", "1000000"]
        cmd += ["DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out]
        env = branch_env(branch, threads)
        env.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
        env["MKL_VERBOSE"] = "1"
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    match = SPEED.search(log)
    if proc.returncode != 0 or match is None:
        raise RuntimeError(
            f"training failed under MKL_CBWR={branch} (exit {proc.returncode}):\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
        )
    return float(match.group(1)), mkl_seconds(proc.stdout) / iters


def interleaved(branches: list[str], rounds: int, measure) -> dict[str, list]:
    """``measure(branch)`` for every branch, round after round, the order reversed every other round."""
    results: dict[str, list] = {b: [] for b in branches}
    for r in range(rounds):
        for branch in branches if r % 2 == 0 else branches[::-1]:
            results[branch].append(measure(branch))
    return results


def table(rows: list[tuple[str, dict[str, str]]], branches: list[str]) -> str:
    head = "| | " + " | ".join(f"`{b}`" if b != "off" else "off (MKL default)" for b in branches) + " |"
    lines = [head, "|---" * (len(branches) + 1) + "|"]
    lines += [
        "| " + name + " | " + " | ".join(cells.get(b, "") for b in branches) + " |" for name, cells in rows
    ]
    return "\n".join(lines)


def ratio_cells(values: dict[str, float], branches: list[str], unit: str, scale: float) -> dict[str, str]:
    base = values.get("off", values[branches[0]])
    digits = 3 if unit == "s" else 1
    return {
        b: f"{values[b] * scale:.{digits}f} {unit} ({values[b] / base:.2f}x)"
        if base
        else f"{values[b] * scale:.{digits}f} {unit}"
        for b in branches
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--branches", nargs="+", default=["off", "AUTO", "COMPATIBLE"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="kernel rounds")
    parser.add_argument("--train-rounds", type=int, default=1, help="training rounds")
    parser.add_argument("--repeats", type=int, default=7, help="kernel calls timed per process")
    parser.add_argument("--iters", type=int, default=10, help="training iterations per run")
    parser.add_argument("--no-training", action="store_true", help="time the kernel only")
    parser.add_argument("--kernel-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.kernel_child:
        kernel_child(args.repeats)
        return 0

    start = time.time()
    branches = args.branches
    kernel = interleaved(branches, args.rounds, lambda b: run_kernel(b, args.threads, args.repeats))
    rows = [("MKL's branch (`mkl_branch()`)", {b: str(kernel[b][0]["branch"]) for b in branches})]
    for key, label in (("forward", "forward"), ("forward_backward", "forward + backward")):
        med = {b: statistics.median(r[key] for r in kernel[b]) for b in branches}
        rows.append(
            (f"log-likelihood kernel, {label} (N=65536, C*K=60, D=64)", ratio_cells(med, branches, "ms", 1e3))
        )
    if not args.no_training:
        for model, config in MODELS.items():
            runs = interleaved(
                branches, args.train_rounds, lambda b, c=config: run_training(b, args.threads, c, args.iters)
            )
            step = {b: statistics.median(r[0] for r in runs[b]) for b in branches}
            mkl = {b: statistics.median(r[1] for r in runs[b]) for b in branches}
            rows.append(
                (f"{model} training step (the config's batch and size)", ratio_cells(step, branches, "s", 1))
            )
            rows.append((f"{model} step: time in MKL calls", ratio_cells(mkl, branches, "ms", 1e3)))
    print(table(rows, branches))
    print(
        f"\n{args.rounds} kernel rounds of {args.repeats} calls, {args.train_rounds} training rounds of "
        f"{args.iters} iterations, {args.threads} threads; medians over rounds; ratios against "
        f"{'off' if 'off' in branches else branches[0]}; {time.time() - start:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
