"""Where a GMM model's extra inference time goes: torch.profiler on a softmax / GMM config pair.

Both models of the pair (``speed.load_model``: random weights, one anomaly score) run ``--rounds`` calls
on one image under the profiler. Each call is split into three ranges: the backbone, the semantic head,
and the rest (posteriors, upsampling to the input, the anomaly score). The backbones are identical, so the
head and the rest hold the GMM's extra cost; their operators are listed by self CPU time per call, GMM
against softmax. Self-time shares within one run are informative even on a busy machine, where absolute
times are not.

Usage: ``python benchmarks/profile_gmm_head.py [--pair digitscapes/deeplabv3plus_R18] [--size 512 1024]
[--threads 1] [--rounds 3] [--top 15] [--output FILE]``
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import speed  # this folder's model loading, next to the running script
import torch
from torch.profiler import ProfilerActivity, profile, record_function

RANGES = ("backbone", "head", "rest")


def _wrap(module: torch.nn.Module, name: str) -> None:
    """Run ``module``'s forward inside a profiler range ``name`` (an instance attribute shadows the
    class's forward)."""
    forward = module.forward

    def ranged(*args, **kwargs):
        with record_function(name):
            return forward(*args, **kwargs)

    module.forward = ranged


def profile_model(config: Path, size: tuple[int, int], rounds: int) -> dict[str, dict[str, float]]:
    """{range: {op: self CPU ms per call}} for ``rounds`` profiled inference calls after a warm-up; the
    range's own time outside any operator (Python) is the op ``(python)``."""
    _, model = speed.load_model(config, "cpu", training=False)
    _wrap(model.backbone, "backbone")
    _wrap(model.sem_seg_head, "head")
    inputs = speed.inference_inputs(size, "cpu")
    with torch.no_grad():
        model(inputs)  # warm-up: lazy initialisation, allocator
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(rounds):
                with record_function("rest"):
                    model(inputs)
    table: dict[str, dict[str, float]] = {name: defaultdict(float) for name in RANGES}
    for event in prof.events():
        parent = event
        while parent is not None and parent.name not in RANGES:
            parent = parent.cpu_parent
        if parent is None:
            continue
        op = "(python)" if event.name in RANGES else event.name
        table[parent.name][op] += event.self_cpu_time_total / 1e3 / rounds
    return table


def report(pair: str, tables: dict[str, dict], top: int, command: str) -> str:
    soft, gmm = tables["softmax"], tables["gmmseg"]
    totals = {kind: {r: sum(t[r].values()) for r in RANGES} for kind, t in tables.items()}
    lines = [
        f"### {pair}: self CPU time per call by range (ms)",
        "",
        f"Command: `{command}`; torch {torch.__version__}, {torch.get_num_threads()} thread(s).",
        "",
        "| range | softmax | GMM | GMM - softmax |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in (*RANGES, "total"):
        s = sum(totals["softmax"].values()) if r == "total" else totals["softmax"][r]
        g = sum(totals["gmmseg"].values()) if r == "total" else totals["gmmseg"][r]
        lines.append(f"| {r} | {s:,.1f} | {g:,.1f} | {g - s:+,.1f} ({100 * (g - s) / s:+.1f}%) |")
    ops: dict[str, tuple[float, float]] = {}
    for r in ("head", "rest"):
        for op in set(soft[r]) | set(gmm[r]):
            s0, g0 = ops.get(op, (0.0, 0.0))
            ops[op] = (s0 + soft[r].get(op, 0.0), g0 + gmm[r].get(op, 0.0))
    extra = sum(totals["gmmseg"][r] - totals["softmax"][r] for r in ("head", "rest"))
    gmm_total = sum(totals["gmmseg"].values())
    lines += [
        "",
        f"### {pair}: operators of the head and the rest, by GMM - softmax self CPU time (top {top})",
        "",
        f"Extra time of head + rest: {extra:,.1f} ms per call, {100 * extra / gmm_total:.1f}% of the GMM "
        "model's total.",
        "",
        "| operator | softmax ms | GMM ms | GMM - softmax ms | share of the GMM model's total |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    ranked = sorted(ops.items(), key=lambda item: -abs(item[1][1] - item[1][0]))[:top]
    for op, (s, g) in ranked:
        lines.append(f"| `{op}` | {s:,.2f} | {g:,.2f} | {g - s:+,.2f} | {100 * g / gmm_total:.2f}% |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="digitscapes/deeplabv3plus_R18", help="configs/<pair>_*.yaml")
    parser.add_argument("--size", nargs=2, type=int, default=(512, 1024))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", default=None, help="also write the Markdown report to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tables = {
        kind: profile_model(
            speed.REPO / "configs" / f"{args.pair}_{kind}.yaml", tuple(args.size), args.rounds
        )
        for kind in ("softmax", "gmmseg")
    }
    command = "python benchmarks/profile_gmm_head.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = report(args.pair, tables, args.top, command.strip())
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
