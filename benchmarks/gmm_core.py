"""Benchmark of the GMM core (``gmmseg.gmm``) against the straightforward formulations it replaces.

1. Component log-likelihoods, N x (C*K) x D: ``diag_gaussian_log_prob`` (two matrix products into the
   (N, M) output) vs the broadcast formula of the reference's ``MultivariateNormalDiag.log_prob``
   (materialises (N, M, D) arrays). Time, peak extra memory and error vs a float64 reference, and our
   kernel's time over that of ONE (N, D) x (D, M) matrix product (``gemm_ratio``: issue 17's yardstick).
2. One memory enqueue + one M-step for C classes x K components at a given capacity: ``FeatureMemory``
   (vectorised enqueue with running sums, M-step from them) vs the reference's per-class/per-component
   Python loops (``_dequeue_and_enqueue_k`` + ``update_GMM``, reading each queue's filled part).

Peak memory. CPU: every measured call runs once more in a fresh subprocess that builds the inputs, warms
up on a small slice, resets the kernel's peak-RSS mark (``/proc/self/clear_refs``) and reports how far the
peak resident set (``VmHWM``) rises above the resident set before the call. Large blocks are mmap-ed and
given back to the OS when freed, so this is the call's high-water mark of extra memory, output included.
The bytes of the arrays alive at the worst moment are also given analytically.
CUDA: growth of ``torch.cuda.max_memory_allocated`` over the call.

Usage: ``python benchmarks/gmm_core.py [--device cpu|cuda] [--quick] [--threads 2]``.
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from gmmseg.gmm import FeatureMemory, diag_gaussian_log_prob, m_step

LOG_2PI = math.log(2 * math.pi)


# --- baselines -------------------------------------------------------------------------------------------


def broadcast_log_prob(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """The reference's ``MultivariateNormalDiag(means, stds).log_prob(x[:, None])``."""
    diff = x[:, None, :] - means
    return -0.5 * means.shape[-1] * LOG_2PI - stds.log().sum(-1) - 0.5 * (diff / stds).pow(2).sum(-1)


def float64_reference(
    x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, rows: int = 2048
) -> torch.Tensor:
    x, means, stds = x.double(), means.double(), stds.double()
    return torch.cat([broadcast_log_prob(x[i : i + rows], means, stds) for i in range(0, x.shape[0], rows)])


@torch.no_grad()
def looped_enqueue(
    buf: torch.Tensor, ptr: torch.Tensor, count: torch.Tensor, feats, labels, assign, limit: int
) -> list[int]:
    """The reference's ``_dequeue_and_enqueue_k`` for every class present (plus fill counts)."""
    num_c, num_k, cap, _ = buf.shape
    present = [c for c in labels.unique().tolist() if 0 <= c < num_c]
    for c in present:
        mask = labels == c
        embs, cluster = feats[mask], assign[mask]
        for k in range(num_k):
            sel = cluster == k
            if torch.sum(sel) == 0:
                continue
            q = embs[sel]
            n = q.shape[0]
            if limit != -1 and n > limit:
                q = q[torch.linspace(0, n - 1, limit, dtype=torch.int64, device=q.device)]
                n = limit
            p = int(ptr[c, k])
            if p + n >= cap:
                fir = cap - p
                buf[c, k, p:] = q[:fir]
                buf[c, k, : n - fir] = q[fir:]
            else:
                buf[c, k, p : p + n] = q
            ptr[c, k] = (p + n) % cap
            count[c, k] = min(int(count[c, k]) + n, cap)
    return present


@torch.no_grad()
def looped_m_step(buf, count, means, stds, present, mean_momentum=0.999, cov_momentum=0.0, floor=0.01):
    """The reference's ``update_GMM``: per class present, per component, over the filled slots."""
    means, stds = means.clone(), stds.clone()
    for c in present:
        for k in range(buf.shape[1]):
            q = buf[c, k, : int(count[c, k])]
            f = F.normalize(q.sum(0), dim=-1)
            means[c, k] = F.normalize(mean_momentum * means[c, k] + (1 - mean_momentum) * f, dim=-1)
            shift = q - f[None]
            var = (shift**2).sum(0) / shift.shape[0] + floor
            stds[c, k] = cov_momentum * stds[c, k] + (1 - cov_momentum) * var.sqrt()
    return means, stds


# --- timing helpers --------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call: CUDA events around it on GPU, wall clock on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000.0
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(_seconds(fn, device) for _ in range(repeats))


def time_pair(
    baseline: Callable[[], object], candidate: Callable[[], object], device: torch.device, repeats: int
) -> dict:
    """Times two calls interleaved, for a ratio that drift in machine speed cannot bias.

    Timing one model after the other lets any slow-down in between (another process, frequency
    scaling, the allocator) land on one side only; on a 2-core machine that moved GMM / softmax
    ratios by +-15% between runs. Here each round times both, in alternating order (AB, BA, ...),
    and the ratio is the median of the per-round ratios. Returns the medians, that ratio, its range
    and every round's times.
    """
    baseline()
    candidate()
    sync(device)
    times_a, times_b = [], []
    for round_index in range(repeats):
        if round_index % 2 == 0:
            times_a.append(_seconds(baseline, device))
            times_b.append(_seconds(candidate, device))
        else:
            times_b.append(_seconds(candidate, device))
            times_a.append(_seconds(baseline, device))
    ratios = [b / a for a, b in zip(times_a, times_b)]
    return {
        "baseline": statistics.median(times_a),
        "candidate": statistics.median(times_b),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "baseline_times": times_a,
        "candidate_times": times_b,
    }


def loglik_inputs(n: int, num_c: int, k: int, d: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator().manual_seed(0)
    means = F.normalize(torch.randn(num_c * k, d, generator=g), dim=-1)
    # features near some component (unit norm, as in GMMSeg), stds like a fitted memory: sqrt(var + 0.01)
    x = F.normalize(
        means[torch.randint(num_c * k, (n,), generator=g)] + 0.15 * torch.randn(n, d, generator=g), dim=-1
    )
    stds = (0.01 + 0.02 * torch.rand(num_c * k, d, generator=g)).sqrt()
    return x.to(device, dtype), means.to(device, dtype), stds.to(device, dtype)


def measure_peak(kind: str, n: int, num_c: int, k: int, d: int, device: torch.device, threads: int) -> int:
    """Peak extra bytes of one call of ``kind`` ("ours" or "broadcast"), float32."""
    if device.type == "cuda":
        x, mu, s = loglik_inputs(n, num_c, k, d, torch.float32, device)
        fn = diag_gaussian_log_prob if kind == "ours" else broadcast_log_prob
        with torch.no_grad():
            fn(x[:64], mu, s)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            out = fn(x, mu, s)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        del out
        return peak
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss", kind, "--_shape", f"{n},{num_c},{k},{d}"]
    cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1])


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth(fn: Callable[[], object]) -> int:
    """Bytes by which the resident set peaks above its level before ``fn()`` (Linux).

    Resets the kernel's peak-RSS mark first (``/proc/self/clear_refs``), so earlier peaks (e.g. from
    ``import torch``) do not hide the call's; falls back to ``ru_maxrss`` growth where that is refused.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _proc_status_kib("VmRSS")
        out = fn()
        after = _proc_status_kib("VmHWM")
    except OSError:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out = fn()
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    del out
    return max(0, after - before) * 1024


def _rss_child(kind: str, shape: str) -> None:
    n, num_c, k, d = (int(v) for v in shape.split(","))
    x, mu, s = loglik_inputs(n, num_c, k, d, torch.float32, torch.device("cpu"))
    fn = diag_gaussian_log_prob if kind == "ours" else broadcast_log_prob
    with torch.no_grad():
        fn(x[:64], mu, s)  # warm-up: lazy initialisation, thread pools
        print(peak_rss_growth(lambda: fn(x, mu, s)))


# --- benchmarks ------------------------------------------------------------------------------------------


def mib(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB"


def gemm_ratio(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor, repeats: int) -> dict:
    """Our log-likelihood kernel against ONE (N, D) x (D, M) matrix product (``torch.mm``, same dtype and
    device), timed interleaved (``time_pair``): the floor any GEMM-based kernel of this output has. The
    ratio is the median of the per-round ratios, kernel / GEMM, with their range."""
    weight = means.t().contiguous()  # (D, M): the GEMM's right-hand side, as the kernel's
    timing = time_pair(
        lambda: torch.mm(x, weight), lambda: diag_gaussian_log_prob(x, means, stds), x.device, repeats
    )
    return {
        "gemm_seconds": timing["baseline"],
        "gemm_ratio": timing["ratio"],
        "gemm_ratio_range": timing["ratio_range"],
    }


def measure_loglik(device: torch.device, quick: bool, threads: int) -> dict:
    """The log-likelihood table's measurements (``loglik_table``), as a JSON-ready dict: the shape and, per
    method (``ours_float32``, ``broadcast_float32``, ``ours_float64``), median seconds, errors, memory and,
    for ours, the ratio to one GEMM (``gemm_ratio``)."""
    n, num_c, k, d = (4096 if quick else 65536), 19, 5, 64
    m = num_c * k
    x, mu, s = loglik_inputs(n, num_c, k, d, torch.float32, device)
    ref = float64_reference(x.cpu(), mu.cpu(), s.cpu())
    scale = ref.abs().amax()

    def errors(out: torch.Tensor) -> dict:
        err = (out.cpu().double() - ref).abs()
        return {
            "err_max": float(err.amax() / scale),
            "err_rel": float((err / ref.abs().clamp_min(1.0)).amax()),
        }

    reps = 5 if quick else 10
    x64, mu64, s64 = x.double(), mu.double(), s.double()
    with torch.no_grad():
        rows = {
            "ours_float32": {"seconds": time_call(lambda: diag_gaussian_log_prob(x, mu, s), device, reps)},
            "broadcast_float32": {"seconds": time_call(lambda: broadcast_log_prob(x, mu, s), device, 3)},
            "ours_float64": {
                "seconds": time_call(lambda: diag_gaussian_log_prob(x64, mu64, s64), device, reps)
            },
        }
        rows["ours_float32"].update(errors(diag_gaussian_log_prob(x, mu, s)), **gemm_ratio(x, mu, s, reps))
        rows["broadcast_float32"].update(errors(broadcast_log_prob(x, mu, s)))
        rows["ours_float64"].update(
            errors(diag_gaussian_log_prob(x64, mu64, s64)), **gemm_ratio(x64, mu64, s64, reps)
        )
    out_bytes = n * m * 4
    chunk_rows = min(n, (1 << 18) // d)
    rows["ours_float32"].update(peak=measure_peak("ours", n, num_c, k, d, device, threads))
    rows["ours_float32"]["analytic"] = out_bytes + 2 * chunk_rows * d * 4
    rows["broadcast_float32"].update(peak=measure_peak("broadcast", n, num_c, k, d, device, threads))
    # diff, diff/s and its square live at once, then the output
    rows["broadcast_float32"]["analytic"] = 3 * n * m * d * 4 + out_bytes
    rows["ours_float64"].update(peak=None, analytic=2 * rows["ours_float32"]["analytic"])
    return {"n": n, "classes": num_c, "components": k, "dim": d, "device": device.type, "rows": rows}


def loglik_table(measured: dict) -> str:
    """The Markdown table of ``measure_loglik``'s measurements."""
    n, num_c, k, d = (measured[key] for key in ("n", "classes", "components", "dim"))
    m, rows = num_c * k, measured["rows"]
    t_bc = rows["broadcast_float32"]["seconds"]
    names = {
        "ours_float32": "ours (`diag_gaussian_log_prob`), float32",
        "broadcast_float32": "broadcast (`MultivariateNormalDiag.log_prob`), float32",
        "ours_float64": "ours, float64",
    }
    lines = []
    for key, name in names.items():
        row = rows[key]
        gemm = (
            f"{row['gemm_ratio']:.2f} ({row['gemm_ratio_range'][0]:.2f}-{row['gemm_ratio_range'][1]:.2f})"
            if "gemm_ratio" in row
            else "-"
        )
        peak = "-" if row["peak"] is None else mib(row["peak"])
        lines.append(
            f"| {name} | {row['seconds'] * 1e3:,.1f} ms | {t_bc / row['seconds']:,.1f}x | {gemm} | {peak} | "
            f"{mib(row['analytic'])} | {row['err_max']:.1e} | {row['err_rel']:.1e} |"
        )
    head = (
        f"### Log-likelihood: N = {n:,}, C = {num_c}, K = {k} (M = {m}), D = {d}, "
        f"device {measured['device']}\n\n"
        f"(N, M) output: {mib(n * m * 4)}; one (N, M, D) float32 array: {mib(n * m * d * 4)}. "
        f"log-likelihood / one GEMM: the kernel's time over that of one ({n:,}, {d}) x ({d}, {m}) `torch.mm` "
        "in the same dtype, timed interleaved (median of per-round ratios, range).\n\n"
        "| method | time (median) | speed-up vs broadcast | log-likelihood / one GEMM (range) | "
        "peak extra memory (measured) | largest live arrays (analytic) | max abs err / max abs ref | "
        "max abs err / max(abs ref, 1) |\n"
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    )
    return head + "\n" + "\n".join(lines) + "\n"


def bench_loglik(device: torch.device, quick: bool, threads: int) -> str:
    return loglik_table(measure_loglik(device, quick, threads))


def filled_memory(num_c: int, k: int, d: int, cap: int, device: torch.device) -> FeatureMemory:
    """A memory in steady state: every queue full, write pointers spread over the ring."""
    mem = FeatureMemory(num_c, k, d, capacity=cap, device=device)
    g = torch.Generator(device=device).manual_seed(1)
    for c in range(num_c):  # filled class by class to keep temporaries small
        block = torch.randn(k, cap, d, generator=g, device=device)
        mem.features[c] = F.normalize(block, dim=-1)
    mem.count.fill_(cap)
    mem.ptr.copy_(torch.randint(0, cap, (num_c, k), generator=g, device=device))
    mem.recompute_statistics()
    return mem


def bench_memory_one(num_c: int, cap: int, device: torch.device, quick: bool) -> list[str]:
    k, d, n, limit = 5, 64, 65536, 20
    mem = filled_memory(num_c, k, d, cap, device)
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(device)
    labels = torch.randint(0, num_c, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.1] = 255
    labels = labels.to(device)
    assign = torch.randint(0, k, (n,), generator=g).to(device)
    means = F.normalize(torch.randn(num_c, k, d, generator=g), dim=-1).to(device)
    stds = torch.ones(num_c, k, d, device=device)
    # the looped baseline works on the same buffer (contents do not affect the timings)
    ptr, count = mem.ptr.clone(), mem.count.clone()
    present: list[int] = []

    def loop_enqueue() -> None:
        present[:] = looped_enqueue(mem.features, ptr, count, feats, labels, assign, limit)

    reps, loop_reps = 5, (3 if quick else 2)
    t_enq = time_call(lambda: mem.enqueue(feats, labels, assign), device, reps)
    t_m = time_call(lambda: m_step(mem, means, stds), device, reps)
    t_exact = time_call(lambda: m_step(mem, means, stds, exact=True), device, loop_reps, warmup=0)
    t_lenq = time_call(loop_enqueue, device, loop_reps)
    t_lm = time_call(lambda: looped_m_step(mem.features, count, means, stds, present), device, loop_reps, 0)
    base = t_lenq + t_lm
    tag = f"C = {num_c}, capacity {cap:,} ({mib(mem.features.numel() * mem.features.element_size())})"
    return [
        f"| {tag} | ours | {t_enq * 1e3:,.1f} ms | {t_m * 1e3:,.2f} ms | {(t_enq + t_m) * 1e3:,.1f} ms | "
        f"{base / (t_enq + t_m):,.0f}x |",
        f"| {tag} | ours, M-step recomputed from the buffer (`exact=True`) | {t_enq * 1e3:,.1f} ms | "
        f"{t_exact * 1e3:,.0f} ms | {(t_enq + t_exact) * 1e3:,.0f} ms | {base / (t_enq + t_exact):,.1f}x |",
        f"| {tag} | looped (reference) | {t_lenq * 1e3:,.1f} ms | {t_lm * 1e3:,.0f} ms | "
        f"{base * 1e3:,.0f} ms | 1x |",
    ]


def bench_memory(device: torch.device, quick: bool) -> str:
    cap = 500 if quick else 32000
    rows = bench_memory_one(19, cap, device, quick) + bench_memory_one(150, cap, device, quick)
    head = (
        "### Memory enqueue + M-step: batch N = 65,536 (10% ignored), K = 5, D = 64, at most 20 per queue "
        f"per step, all queues full, float32 storage, device {device.type}\n\n"
        "| memory | method | enqueue | M-step | enqueue + M-step | speed-up |\n"
        "| --- | --- | ---: | ---: | ---: | ---: |"
    )
    return head + "\n" + "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (runs in seconds)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--only", choices=["loglik", "memory"], default=None)
    parser.add_argument("--_rss", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args._rss:
        _rss_child(args._rss, args._shape)
        return
    device = torch.device(args.device)
    desc = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    if device.type == "cuda":
        desc = torch.cuda.get_device_name(device)
    print(f"torch {torch.__version__}, {desc}, torch threads {torch.get_num_threads()}, quick={args.quick}\n")
    if args.only in (None, "loglik"):
        print(bench_loglik(device, args.quick, args.threads))
    if args.only in (None, "memory"):
        print(bench_memory(device, args.quick))


if __name__ == "__main__":
    main()
