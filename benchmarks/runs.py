"""Resumable training runs for the DigitScapes benchmarks (``digitscapes.py``, ``convergence.py``).

A run is ``train_net.py --config-file CONFIG *opts OUTPUT_DIR <dir>``. It is skipped when ``<dir>/done.json``
holds the same settings key (config text + overrides), and continued with ``--resume`` from its last
checkpoint when it was interrupted. One progress bar covers all runs of an invocation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
ITER_RE = re.compile(r"\biter: (\d+)\b")
# Keys the project stopped setting without changing any run, at the value every run had: put back into
# the hashed config so that runs finished before that keep their settings key (and are not trained again).
# INPUT.DATASET_MAPPER_NAME: Mask2Former's key, read only by Mask2Former's own train_net.
REMOVED_KEYS = {"INPUT.DATASET_MAPPER_NAME": "semantic"}

__all__ = [
    "REPO",
    "Progress",
    "benchmark_env",
    "last_iteration",
    "run_logged",
    "run_training",
    "settings_key",
    "write_results",
]


def benchmark_env(quick: bool) -> dict:
    """The environment of the runs: with ``quick``, a tiny DigitScapes generated into a temporary folder;
    otherwise ``$DETECTRON2_DATASETS`` (default ``datasets/``), where DigitScapes is generated if missing."""
    env = {**os.environ, "GMMSEG_BENCH_FLAGS": "--quick" if quick else ""}
    if quick:
        from gmmseg_datasets.digitscapes import generate_digitscapes

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
    return env


def write_results(
    root: Path, name: str, table: str, data: dict, plot: Callable[[Path], None], start: float
) -> None:
    """Write ``root/<name>.md`` (the table), ``.json`` (``data``) and ``.png`` (``plot(path)``); print the
    table and what was written, with the seconds since ``start``."""
    files = {ext: root / f"{name}.{ext}" for ext in ("md", "json", "png")}
    files["md"].write_text(table)
    files["json"].write_text(json.dumps(data, indent=2))
    plot(files["png"])
    print(table)
    print(f"wrote {', '.join(str(p) for p in files.values())} in {time.time() - start:,.0f} s")


def settings_key(name: str, config: Path, opts: list[str]) -> str:
    """Identifies a run's settings: a finished run is reused only for the same settings.

    The key hashes the merged config (the file, its ``_BASE_`` chain and ``opts``, as ``train_net.py``
    builds it; ``OUTPUT_DIR`` left out), so an edit of a base config invalidates the runs it changes,
    while comments and layout do not.
    """
    from gmmseg import load_cfg

    # as train_net.py merges it, not validated: the runs' datasets are in their environment, not this one's
    cfg = load_cfg(config, opts)
    cfg.OUTPUT_DIR = ""
    for key, value in REMOVED_KEYS.items():
        *parents, leaf = key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        node[leaf] = value
    return hashlib.sha256(json.dumps([name, cfg.dump()]).encode()).hexdigest()[:16]


class Progress:
    """One bar over all runs' iterations, with the time left estimated from the measured pace."""

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


def is_done(out: Path, key: str) -> bool:
    done_file = out / "done.json"
    return done_file.is_file() and json.loads(done_file.read_text()).get("key") == key


def mark_done(out: Path, key: str) -> None:
    (out / "done.json").write_text(json.dumps({"key": key, "time": time.time()}))


def run_training(
    name: str, config: Path, opts: list[str], out: Path, env: dict, progress: Progress | None, iters: int
) -> dict:
    """Train (or resume, or reuse) one run in ``out`` and return its ``inference/metrics.json``."""
    key = settings_key(name, config, opts)
    if is_done(out, key):
        if progress is not None:
            progress.skip(iters)
        return json.loads((out / "inference" / "metrics.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    start = last_iteration(out)
    if progress is not None:
        progress.skip(start)
    train = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(config)]
    train += ["--resume"] if start > 0 else []
    train += [*opts, "OUTPUT_DIR", str(out)]
    run_logged(train, out / "log.txt", env, progress, start)
    mark_done(out, key)
    return json.loads((out / "inference" / "metrics.json").read_text())
