"""Speed and memory of whole models with the GMM classifier against the same models with softmax, in one run.

1. Inference on a 512x1024 image (the paper's Cityscapes-like setting), as users run it: backbone, head,
   class posteriors at the input resolution and one anomaly score (GMMSeg: ``-max_c log p(x|c)``;
   softmax: MSP). Median time and peak extra memory of the call, for each softmax / GMM pair of configs.
2. One training step (forward, backward, optimizer step) on a batch of 512x512 crops, for the softmax and
   the GMM model, and the cost of its online EM (``OnlineGMM``) on the step's EM batch: the E-step (which
   the GMM step's loss already runs, once, in training) and enqueue of every step, the M-step (every
   ``MODEL.GMM.UPDATE_INTERVAL`` steps) and their per-step average.
3. The GMM core against the reference formulation (``benchmarks/gmm_core.py``'s two tables); the
   log-likelihood table also gives the kernel's time over that of ONE (N, D) x (D, C*K) matrix product
   ("log-likelihood / one GEMM", timed interleaved; in the JSON under ``loglik``).

All ratios in a table come from the same run on the same machine. Timing: the softmax and the GMM model
of a pair are loaded together and timed interleaved, round after round, so that drift in the machine's
speed affects both; times are medians over rounds after a warm-up and the ratio is the median of the
per-round ratios (``gmm_core.time_pair``); on CUDA with CUDA events and synchronisation. Peak memory:
on CPU the growth of the process's peak resident set over the call, each call in a fresh subprocess after
a warm-up call (``gmm_core.peak_rss_growth``); on CUDA the growth of ``torch.cuda.max_memory_allocated``.

Usage: ``python benchmarks/speed.py [--device cpu|cuda] [--quick] [--threads 2] [--pairs ...]
[--output FILE]``
(``--quick``: 128x256 inputs, 1 repeat, the small core tables: a pipeline check in seconds).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import gmm_core  # this folder's core benchmark (timing and peak-memory helpers), next to the running script
import torch

REPO = Path(__file__).resolve().parent.parent
# softmax / GMM config pairs (configs/<pair>_softmax.yaml, configs/<pair>_gmmseg.yaml)
DEFAULT_PAIRS = (
    "digitscapes/deeplabv3plus_R18",
    "digitscapes/mask2former_R18",
    "digitscapes/segformer_B0",
    "digitscapes/upernet_R18",
    "digitscapes/ocrnet_HRNetW18",
    "cityscapes/deeplabv3plus_R101",
)
SYNC_NORM_KEYS = ("MODEL.RESNETS.NORM", "MODEL.SEM_SEG_HEAD.NORM", "MODEL.FPN.NORM", "MODEL.HRNET.NORM")


def load_model(config: Path, device: str, training: bool):
    """The config's model on ``device`` (random weights: speed does not depend on them), one anomaly
    score, plain BN instead of SyncBN (one process)."""
    from detectron2.modeling import build_model

    from gmmseg import load_cfg, setup_cfg

    cfg = load_cfg(config)  # what the config says, to choose the overrides
    opts = ["MODEL.DEVICE", device, "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "()", "DATASETS.TEST", "()"]
    is_gmm = (
        "GMM" in cfg.MODEL.META_ARCHITECTURE
        or cfg.MODEL.SEM_SEG_HEAD.NAME.startswith("GMM")
        or cfg.MODEL.GMM.ENABLED
    )
    opts += ["TEST.ANOMALY_SCORES", "('gmm',)" if is_gmm else "('msp',)"]
    opts += ["TEST.SLIDING_WINDOW.ENABLED", "False"]
    for key in SYNC_NORM_KEYS:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part, None)
        if value in ("SyncBN", "nnSyncBN", "naiveSyncBN"):  # needs a process group
            opts += [key, "BN"]
    if cfg.INPUT.CROP.ENABLED:  # DeepLabV3+'s ASPP pools with a window of CROP.SIZE / 16
        opts += ["INPUT.CROP.SIZE", "(512, 512)"]
    cfg = setup_cfg(config, opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train(training)
    return cfg, model


def inference_inputs(size: tuple[int, int], device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8).to(device)
    return [{"image": image, "height": size[0], "width": size[1]}]


def training_inputs(size: tuple[int, int], batch: int, num_classes: int, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(batch):
        image = torch.randint(0, 256, (3, *size), generator=g, dtype=torch.uint8)
        # blocky labels: every class present, as in a real scene
        coarse = torch.randint(0, num_classes, (size[0] // 32, size[1] // 32), generator=g)
        label = coarse.repeat_interleave(32, 0).repeat_interleave(32, 1)
        out.append({"image": image.to(device), "sem_seg": label.to(device)})
    return out


def _peak_child(config: str, device: str, size: str, threads: int) -> None:
    torch.set_num_threads(threads)
    _, model = load_model(Path(config), device, training=False)
    inputs = inference_inputs(tuple(int(v) for v in size.split("x")), device)
    with torch.no_grad():
        model(inputs)  # warm-up: lazy initialisation, thread pools, allocator
        print(gmm_core.peak_rss_growth(lambda: model(inputs)))


def inference_peak(config: Path, device: torch.device, size: tuple[int, int], threads: int, model) -> int:
    if device.type == "cuda":
        inputs = inference_inputs(size, str(device))
        with torch.no_grad():
            model(inputs)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            model(inputs)
            torch.cuda.synchronize(device)
            return torch.cuda.max_memory_allocated(device) - base
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--_peak",
        str(config),
        "--_size",
        f"{size[0]}x{size[1]}",
    ]
    cmd += ["--threads", str(threads), "--device", "cpu"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"peak-memory subprocess failed for {config}:\n{res.stderr[-2000:]}")
    return int(res.stdout.strip().splitlines()[-1])


def bench_inference(pairs, device: torch.device, size, repeats: int, threads: int) -> list[dict]:
    """Both models of a pair are loaded together and timed interleaved (``gmm_core.time_pair``)."""
    rows = []
    for pair in pairs:
        configs = {kind: REPO / "configs" / f"{pair}_{kind}.yaml" for kind in ("softmax", "gmmseg")}
        models = {kind: load_model(path, str(device), training=False)[1] for kind, path in configs.items()}
        inputs = inference_inputs(size, str(device))
        calls = {kind: functools.partial(model, inputs) for kind, model in models.items()}
        with torch.no_grad():
            timing = gmm_core.time_pair(calls["softmax"], calls["gmmseg"], device, repeats)
        for kind, side in (("softmax", "baseline"), ("gmmseg", "candidate")):
            row = {
                "pair": pair,
                "kind": kind,
                "seconds": timing[side],
                "times": timing[f"{side}_times"],
                "peak": inference_peak(configs[kind], device, size, threads, models[kind]),
                "params": sum(p.numel() for p in models[kind].parameters()),
            }
            if kind == "gmmseg":
                row["ratio"], row["ratio_range"] = timing["ratio"], timing["ratio_range"]
            rows.append(row)
        del models
    return rows


def bench_training(pairs, device: torch.device, size, batch: int, repeats: int) -> list[dict]:
    """Training steps of the two models of a pair interleaved, then the online EM on the GMM model's batch."""
    from gmmseg.engine.hooks import GMMEMHook, find_gmm_predictors
    from gmmseg.solver import build_optimizer

    def make_step(model, optimizer, inputs):
        def step():
            loss = sum(model(inputs).values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    rows = []
    for pair in pairs:
        setups = {}
        for kind in ("softmax", "gmmseg"):
            cfg, model = load_model(REPO / "configs" / f"{pair}_{kind}.yaml", str(device), training=True)
            inputs = training_inputs(size, batch, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, str(device))
            setups[kind] = (cfg, model, make_step(model, build_optimizer(cfg, model), inputs))
        timing = gmm_core.time_pair(setups["softmax"][2], setups["gmmseg"][2], device, repeats)
        times = timing["baseline_times"]
        rows.append({"pair": pair, "kind": "softmax", "step": timing["baseline"], "times": times})
        cfg, model, step = setups["gmmseg"]
        row = {
            "pair": pair,
            "kind": "gmmseg",
            "step": timing["candidate"],
            "times": timing["candidate_times"],
            "ratio": timing["ratio"],
            "ratio_range": timing["ratio_range"],
        }
        predictor = find_gmm_predictors(model)[0]
        online = GMMEMHook.from_config(cfg, predictor).online
        received = []
        predictor.em_observer = received.append
        step()  # hands this step's EM batch to the observer
        batch_em = received[-1]

        def em_update(o=online, b=batch_em):  # E-step (as in the loss) + enqueue
            o.observe(b.embeddings, b.labels, b.correct)

        def m_step(o=online):
            o.seen.fill_(True)  # every class updated: the worst case
            o.maximise()

        row["e_step_enqueue"] = gmm_core.time_call(em_update, device, repeats)
        row["m_step"] = gmm_core.time_call(m_step, device, repeats)
        row["interval"] = cfg.MODEL.GMM.UPDATE_INTERVAL
        row["hook"] = row["e_step_enqueue"] + row["m_step"] / row["interval"]
        row["pixels"] = int(batch_em.labels.numel())
        rows.append(row)
        del setups, model, step
    return rows


def by_pair(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """{pair: {"softmax": row, "gmmseg": row}} in the order measured."""
    grouped: dict[str, dict[str, dict]] = {}
    for row in rows:
        grouped.setdefault(row["pair"], {})[row["kind"]] = row
    return grouped


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def inference_table(rows: list[dict], size) -> str:
    lines = [
        f"### Inference, one {size[0]}x{size[1]} image (posteriors + one anomaly score at input resolution)",
        "",
        "| model | classifier | parameters | time | GMM / softmax time (range over rounds) "
        "| peak extra memory | GMM / softmax memory |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pair, kinds in by_pair(rows).items():
        soft, gmm = kinds["softmax"], kinds["gmmseg"]
        lines.append(
            f"| {pair} | softmax | {soft['params'] / 1e6:,.2f} M | {ms(soft['seconds'])} | 1.00 | "
            f"{gmm_core.mib(soft['peak'])} | 1.00 |"
        )
        lines.append(
            f"| {pair} | GMM | {gmm['params'] / 1e6:,.2f} M | {ms(gmm['seconds'])} | "
            f"{gmm['ratio']:.2f} ({gmm['ratio_range'][0]:.2f}-{gmm['ratio_range'][1]:.2f}) | "
            f"{gmm_core.mib(gmm['peak'])} | "
            f"{gmm['peak'] / max(soft['peak'], 1):.2f} |"
        )
    return "\n".join(lines) + "\n"


def training_table(rows: list[dict], size, batch: int) -> str:
    lines = [
        f"### Training step, batch {batch} x {size[0]}x{size[1]} (forward, backward, optimizer step) "
        "and the EM hook",
        "",
        "| model | softmax step | GMM step | GMM / softmax (range) | E-step + enqueue | M-step (every n) "
        "| hook per step | hook / GMM step |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pair, kinds in by_pair(rows).items():
        soft, gmm = kinds["softmax"], kinds["gmmseg"]
        lines.append(
            f"| {pair} | {ms(soft['step'])} | {ms(gmm['step'])} | {gmm['ratio']:.2f} "
            f"({gmm['ratio_range'][0]:.2f}-{gmm['ratio_range'][1]:.2f}) | "
            f"{ms(gmm['e_step_enqueue'])} | {ms(gmm['m_step'])} (n = {gmm['interval']}) | "
            f"{ms(gmm['hook'])} | {100 * gmm['hook'] / gmm['step']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="small inputs, one repeat: a pipeline check")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--pairs", nargs="+", default=list(DEFAULT_PAIRS), help="config pairs under configs/")
    parser.add_argument("--skip-core", action="store_true", help="leave out the GMM core tables")
    parser.add_argument("--output", default=None, help="also write the tables (Markdown) to this file")
    parser.add_argument("--json", default=None, help="also write the raw measurements to this JSON file")
    parser.add_argument("--_peak", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--_size", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args._peak:
        _peak_child(args._peak, args.device, args._size, args.threads)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    size = (128, 256) if args.quick else (512, 1024)
    crop, batch = ((128, 128), 1) if args.quick else ((512, 512), 2)
    repeats = 1 if args.quick else 7
    desc = f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs"
    if device.type == "cuda":
        desc = torch.cuda.get_device_name(device)
    header = (
        f"torch {torch.__version__}, {desc}, torch threads {torch.get_num_threads()}, quick={args.quick}, "
        f"softmax and GMM timed interleaved, {repeats} rounds after a warm-up: medians, and the median "
        "(range) of the per-round GMM / softmax ratios\n"
    )
    print(header, flush=True)
    start = time.time()
    inference = bench_inference(args.pairs, device, size, repeats, args.threads)
    tables = [header, inference_table(inference, size)]
    print(tables[-1], flush=True)
    training = bench_training(args.pairs, device, crop, batch, repeats)
    tables.append(training_table(training, crop, batch))
    print(tables[-1], flush=True)
    loglik = None
    if not args.skip_core:
        loglik = gmm_core.measure_loglik(device, args.quick, args.threads)
        tables.append(gmm_core.loglik_table(loglik))
        print(tables[-1], flush=True)
        tables.append(gmm_core.bench_memory(device, args.quick))
        print(tables[-1], flush=True)
    print(f"(benchmark took {time.time() - start:,.0f} s)")
    if args.output:
        Path(args.output).write_text("\n".join(tables))
    if args.json:
        measured = {"inference": inference, "training": training, "loglik": loglik}
        Path(args.json).write_text(json.dumps(measured, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
