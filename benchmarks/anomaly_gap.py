"""Where does GMMSeg's anomaly score lose to the softmax model's entropy? Break the gap down by pixel groups.

Both models run on the same images through their own inference code (``PosteriorSemanticSegmentor``);
every metric is ``gmmseg.evaluation.anomaly_metrics`` (exact, scikit-learn's tie handling) on a subset of
the pooled non-void pixels, anomalies against known pixels. Scores: ``gmm`` (the paper's -max_c log p(x|c),
scored on the head's stride-4 grid and upsampled), ``gmm_fullres`` (scored per input pixel on upsampled,
re-normalised embeddings), ``gmm_mahalanobis`` (the distance to the nearest component in its own stds: the
paper's score without the log-determinant terms), and the softmax model's ``entropy`` and ``msp``. Subsets:

- all anomalies, and each family (DigitScapes: near = unseen digits 8/9, far = shapes) against all known;
- per background: all anomalies against the known pixels of one class group only (``--groups``, default
  stuff = classes 0-3, digits = 4-11), and each family against each group: are the false positives
  stuff or digits?
- boundary / interior: both sides restricted to pixels within ``--boundary-width`` px (Chebyshev) of a
  region change in the label / anomaly maps (a region = a known class, an anomaly family, or void), or
  farther: does scoring at stride 4 cost GMMSeg its edges?
- per scene style (DigitScapes' manifest.json), when the split has one.

It also reports per known class the median of log p(x|c_true) and of max_c log p(x|c) (full resolution),
how often the true class is the most likely one, and each score's false-positive rate at its own TPR-95
threshold (which known classes look anomalous), and draws the score histograms per pixel group.

Usage::

    python benchmarks/anomaly_gap.py \\
        --gmmseg configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml output/.../model_final.pth \\
        --softmax configs/digitscapes/deeplabv3plus_R18_softmax.yaml output/.../model_final.pth \\
        --output output/anomaly_gap

writes ``anomaly_gap.md``, ``anomaly_gap.json`` and ``anomaly_gap.png`` (histograms) into ``--output``.
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
GMM_SCORES = ("gmm", "gmm_fullres", "gmm_mahalanobis")
SOFTMAX_SCORES = ("entropy", "msp")
SCORES = GMM_SCORES + SOFTMAX_SCORES
FAMILIES = {1: "near", 2: "far"}
VOID = 255


def parse_groups(items: list[str]) -> dict[str, list[int]]:
    """['stuff=0-3', 'digits=4-11'] -> {'stuff': [0, 1, 2, 3], 'digits': [4, ..., 11]}."""
    groups: dict[str, list[int]] = {}
    for item in items:
        name, _, spec = item.partition("=")
        classes: list[int] = []
        for part in spec.split(","):
            low, _, high = part.partition("-")
            classes += list(range(int(low), int(high or low) + 1))
        groups[name] = classes
    return groups


def boundary_mask(region: np.ndarray, width: int) -> np.ndarray:
    """True where the (2 width + 1)^2 window around a pixel holds more than one region id."""
    from scipy import ndimage

    size = 2 * width + 1
    low = ndimage.minimum_filter(region, size=size, mode="nearest")
    return ndimage.maximum_filter(region, size=size, mode="nearest") != low


def grouped_median(values: np.ndarray, groups: np.ndarray, num_groups: int) -> np.ndarray:
    """Median of ``values`` per group id in [0, num_groups) with one sort; NaN for empty groups."""
    order = np.lexsort((values, groups))
    v = values[order]
    counts = np.bincount(groups, minlength=num_groups)
    starts = np.cumsum(counts) - counts
    out = np.full(num_groups, np.nan)
    has = counts > 0
    out[has] = 0.5 * (v[starts[has] + (counts[has] - 1) // 2] + v[starts[has] + counts[has] // 2])
    return out


def load_model(config: str, weights: str, scores: tuple[str, ...], opts: list[str], dataset: str):
    """Frozen config and eval-mode model with ``weights``, computing ``scores`` at inference."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gmmseg import setup_cfg

    test = ["DATASETS.TRAIN", "()", "DATASETS.TEST", repr((dataset,))]  # no training set needed
    cfg = setup_cfg(
        config, [*opts, "MODEL.WEIGHTS", weights, *test, "TEST.ANOMALY_SCORES", repr(list(scores))]
    )
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(weights)
    return cfg, model


def _read(path: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path))


def collect(gmm: tuple, softmax: tuple, records: list[dict], width: int) -> dict[str, np.ndarray]:
    """Per non-void pixel of ``records``: image index, family (0 known, 1 near, 2 far, 3 no family),
    known class (-1 if none), boundary flag, the four scores, and (GMMSeg, full resolution) log p(x|c_true)
    and whether c_true is the most likely class."""
    import torch
    from detectron2.modeling.postprocessing import sem_seg_postprocess

    from gmmseg.data.dataset_mapper import SemanticDatasetMapper

    (gmm_cfg, gmm_model), (sm_cfg, sm_model) = gmm, softmax
    if gmm_cfg.TEST.SLIDING_WINDOW.ENABLED:
        raise SystemExit(
            "anomaly_gap.py reads the GMM embeddings of whole-image inference: no sliding windows"
        )
    head = gmm_model.sem_seg_head
    predictor = head.gmm_predictor
    captured: list[torch.Tensor] = []
    handle = predictor.register_forward_hook(lambda m, i, out: captured.append(out["embeddings"]))
    mappers = SemanticDatasetMapper(gmm_cfg, is_train=False), SemanticDatasetMapper(sm_cfg, is_train=False)
    parts: dict[str, list[np.ndarray]] = {}
    try:
        for index, record in enumerate(records):
            captured.clear()
            with torch.no_grad():
                gmm_in, sm_in = (m(dict(record)) for m in mappers)
                g_out, s_out = gmm_model([gmm_in])[0], sm_model([sm_in])[0]
                emb = captured[0]  # (1, h, w, D) at the padded input size / stride
                size = (emb.shape[1] * head.common_stride, emb.shape[2] * head.common_stride)
                log_p_in = predictor.fullres_class_log_prob(emb, size)[0].permute(2, 0, 1)
                shape = (tuple(gmm_in["image"].shape[-2:]), gmm_in["height"], gmm_in["width"])
                # the model scores at its input size, then resizes the map to the image's (as this check)
                fullres = sem_seg_postprocess(-log_p_in.max(0).values[None], *shape)[0].cpu().numpy()
                log_p = sem_seg_postprocess(log_p_in, *shape).permute(1, 2, 0)
            ood = _read(record["ood_file_name"])
            label = _read(record["sem_seg_file_name"]).astype(np.int64)
            family_file = record.get("ood_family_file_name")
            family = _read(family_file).astype(np.int64) if family_file else np.where(ood == 1, 3, 0)
            family = np.where(ood == 1, np.where(np.isin(family, (1, 2)), family, 3), 0)
            cls = np.where((ood == 0) & (label < log_p.shape[-1]), label, -1)
            region = np.where(ood == VOID, -1, np.where(ood == 1, 1000 + family, cls))
            keep = ood != VOID
            lp = log_p.cpu().numpy()
            scores = {n: g_out["anomaly_scores"][n] for n in GMM_SCORES}
            scores.update({n: s_out["anomaly_scores"][n] for n in SOFTMAX_SCORES})
            if not np.allclose(fullres, scores["gmm_fullres"].cpu().numpy(), rtol=1e-4, atol=1e-3):
                raise RuntimeError("log p(x|c) from the captured embeddings disagrees with gmm_fullres")
            true = np.take_along_axis(lp, np.clip(cls, 0, None)[..., None], -1)[..., 0]
            row = {
                "image": np.full(int(keep.sum()), index, np.int32),
                "family": family[keep].astype(np.int8),
                "cls": cls[keep].astype(np.int16),
                "boundary": boundary_mask(region, width)[keep],
                "log_p_true": np.where(cls >= 0, true, np.nan)[keep].astype(np.float32),
                "true_is_max": (lp.argmax(-1) == cls)[keep],
                **{n: s.float().cpu().numpy()[keep] for n, s in scores.items()},
            }
            for key, value in row.items():
                parts.setdefault(key, []).append(value)
    finally:
        handle.remove()
    return {key: np.concatenate(value) for key, value in parts.items()}


def subsets(px: dict[str, np.ndarray], groups: dict[str, list[int]], styles: list[str]) -> dict[str, tuple]:
    """Named (positive, negative) pixel masks: which anomalies are ranked against which known pixels."""
    anomaly, known = px["family"] > 0, px["family"] == 0
    out = {"all": (anomaly, known)}
    fams = {name: px["family"] == value for value, name in FAMILIES.items()}
    out.update({f"{name} vs all known": (mask, known) for name, mask in fams.items()})
    in_group = {g: known & np.isin(px["cls"], classes) for g, classes in groups.items()}
    out.update({f"all vs known {g}": (anomaly, mask) for g, mask in in_group.items()})
    for name, fam in fams.items():
        out.update({f"{name} vs known {g}": (fam, mask) for g, mask in in_group.items()})
    edge = px["boundary"]
    out["boundary (both sides)"] = (anomaly & edge, known & edge)
    out["interior (both sides)"] = (anomaly & ~edge, known & ~edge)
    if styles:
        style = np.asarray(styles)[px["image"]]
        for s in sorted(set(styles)):
            out[f"style {s}"] = (anomaly & (style == s), known & (style == s))
    return out


def subset_metrics(px: dict[str, np.ndarray], positive: np.ndarray, negative: np.ndarray) -> dict[str, Any]:
    """AUROC / AP / FPR95 (%) of every score on ``positive`` (anomalies) against ``negative`` pixels."""
    from gmmseg.evaluation import anomaly_metrics

    row: dict[str, Any] = {"anomalies": int(positive.sum()), "known": int(negative.sum())}
    if row["anomalies"] and row["known"]:
        keep = positive | negative
        labels = positive[keep].astype(np.uint8)
        row["scores"] = {
            n: {k: 100.0 * v for k, v in anomaly_metrics(px[n][keep], labels).items()} for n in SCORES
        }
    return row


def per_class(px: dict[str, np.ndarray], num_classes: int) -> dict[str, Any]:
    """Per known class: pixels, medians of log p(x|c_true) and max_c log p(x|c), share of pixels whose true
    class is the most likely, and per score the share flagged at the TPR-95 threshold (the class's FPR95)."""
    known = (px["family"] == 0) & (px["cls"] >= 0)
    cls = px["cls"][known].astype(np.int64)
    counts = np.bincount(cls, minlength=num_classes)
    out: dict[str, Any] = {
        "pixels": counts.tolist(),
        "median_log_p_true": grouped_median(px["log_p_true"][known], cls, num_classes).tolist(),
        "median_max_log_p": grouped_median(-px["gmm_fullres"][known], cls, num_classes).tolist(),
        "true_is_max": (
            np.bincount(cls, px["true_is_max"][known], num_classes) / np.maximum(counts, 1)
        ).tolist(),
    }
    anomaly = px["family"] > 0
    for name in SCORES:
        pos = np.sort(px[name][anomaly])[::-1]
        threshold = pos[max(math.ceil(0.95 * pos.size) - 1, 0)] if pos.size else np.inf
        flagged = np.bincount(cls, px[name][known] >= threshold, num_classes)
        out[f"fpr95_{name}"] = (100.0 * flagged / np.maximum(counts, 1)).tolist()
    return out


def _cell(row: dict[str, Any], name: str) -> str:
    if "scores" not in row:
        return "-"
    m = row["scores"][name]
    return f"{m['auroc']:.2f} / {m['ap']:.2f} / {m['fpr95']:.2f}"


def markdown(result: dict[str, Any], class_names: list[str]) -> str:
    lines = [
        f"# Anomaly gap on {result['dataset']} ({result['images']} images)",
        "",
        f"GMMSeg: `{result['gmmseg'][1]}`; softmax: `{result['softmax'][1]}`. Each cell: AUROC / AP / FPR95 "
        f"(%). Boundary = within {result['boundary_width']} px of a region change.",
        "",
        "| anomalies vs known pixels | anomalies | known | " + " | ".join(SCORES) + " |",
        "| --- | ---: | ---: |" + " --- |" * len(SCORES),
    ]
    for name, row in result["subsets"].items():
        cells = [name, f"{row['anomalies']:,}", f"{row['known']:,}", *(_cell(row, s) for s in SCORES)]
        lines.append("| " + " | ".join(cells) + " |")
    pc = result["per_class"]
    lines += [
        "",
        "Known classes (GMMSeg at full resolution; FPR95 columns: % of the class's pixels flagged at the "
        "threshold where each score finds 95% of the anomalies):",
        "",
        "| class | pixels | median log p(x\\|c_true) | median max_c log p(x\\|c) | true class most likely | "
        + " | ".join(f"FPR95 {s}" for s in SCORES)
        + " |",
        "| --- | ---: | ---: | ---: | ---: |" + " ---: |" * len(SCORES),
    ]
    for c, name in enumerate(class_names):
        cells = [
            name,
            f"{pc['pixels'][c]:,}",
            f"{pc['median_log_p_true'][c]:.1f}",
            f"{pc['median_max_log_p'][c]:.1f}",
            f"{100 * pc['true_is_max'][c]:.1f}%",
            *(f"{pc[f'fpr95_{s}'][c]:.1f}" for s in SCORES),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(px: dict[str, np.ndarray], groups: dict[str, list[int]], path: Path) -> None:
    """Histograms (density) per pixel group: max_c log p(x|c) of both GMM scores, softmax entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    known = px["family"] == 0
    masks = {f"known {g}": known & np.isin(px["cls"], c) for g, c in groups.items()}
    masks.update({f"anomaly {n}": px["family"] == v for v, n in FAMILIES.items()})
    panels = [
        ("GMMSeg: max_c log p(x|c), stride 4 upsampled (gmm)", -px["gmm"]),
        ("GMMSeg: max_c log p(x|c), full resolution", -px["gmm_fullres"]),
        ("softmax: entropy of p(c|x)", px["entropy"]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4))
    for ax, (title, values) in zip(axes, panels):
        low, high = np.percentile(values, [0.5, 99.5])
        bins = np.linspace(low, high if high > low else low + 1, 81)
        for label, mask in masks.items():
            if mask.any():
                ax.hist(
                    np.clip(values[mask], bins[0], bins[-1]), bins, density=True, histtype="step", label=label
                )
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("value (0.5-99.5 percentile range, tails clipped into the end bins)", fontsize=8)
    axes[0].set_ylabel("density")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gmmseg", nargs=2, required=True, metavar=("CONFIG", "WEIGHTS"))
    parser.add_argument("--softmax", nargs=2, required=True, metavar=("CONFIG", "WEIGHTS"))
    parser.add_argument("--output", required=True, help="folder for anomaly_gap.{md,json,png}")
    parser.add_argument("--dataset", default="digitscapes_anomaly_val")
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="the first 8 images only (tests)")
    parser.add_argument("--groups", nargs="+", default=["stuff=0-3", "digits=4-11"], metavar="NAME=CLASSES")
    parser.add_argument("--boundary-width", type=int, default=2)
    parser.add_argument("--save-pixels", action="store_true", help="also write the pooled pixels (npz)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="config overrides for both")
    args = parser.parse_args(argv)
    for _, weights in (args.gmmseg, args.softmax):
        if not Path(weights).is_file():
            parser.error(f"{weights}: no such file")
    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    from detectron2.data import DatasetCatalog, MetadataCatalog

    gmm = load_model(*args.gmmseg, GMM_SCORES, args.opts, args.dataset)
    softmax = load_model(*args.softmax, SOFTMAX_SCORES, args.opts, args.dataset)
    limit = 8 if args.quick else args.max_images
    records = DatasetCatalog.get(args.dataset)[:limit]
    manifest = Path(records[0]["file_name"]).parent.parent / "manifest.json"
    styles: list[str] = []
    if manifest.is_file():
        images = json.loads(manifest.read_text())["images"]
        styles = [images[Path(r["file_name"]).stem]["style"] for r in records]
    px = collect(gmm, softmax, records, args.boundary_width)
    class_names = list(MetadataCatalog.get(args.dataset).stuff_classes)
    groups = parse_groups(args.groups)
    result = {
        "dataset": args.dataset,
        "images": len(records),
        "gmmseg": args.gmmseg,
        "softmax": args.softmax,
        "boundary_width": args.boundary_width,
        "groups": groups,
        "subsets": {k: subset_metrics(px, *m) for k, m in subsets(px, groups, styles).items()},
        "per_class": {"classes": class_names, **per_class(px, len(class_names))},
    }
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, class_names)
    (out / "anomaly_gap.md").write_text(text)
    (out / "anomaly_gap.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(px, groups, out / "anomaly_gap.png")
    if args.save_pixels:
        np.savez_compressed(out / "pixels.npz", **px)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
