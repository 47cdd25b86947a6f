"""Why does a GMMSeg model misclassify a class? Decompose its class scores on the pixels it gets wrong.

For a per-pixel GMM head (DeepLabV3+ / FPN), each class score is its best component's log-likelihood

    log N(x | mu, diag(s^2)) = -0.5 * sum_d ((x_d - mu_d) / s_d)^2  -  sum_d log s_d  -  D/2 log(2 pi)
                               \\_______ quadratic (distance) ______/   \\_ log-det: broad Gaussians pay _/

and the posterior is the softmax of the normalised scores (LayerNorm over the classes). For every
misclassified pixel this script compares the true class with the predicted one: is the embedding closer
to the true class in Mahalanobis distance (an error of the log-det or of the normalisation), or is it
closer to the wrong class (an error of the embedding)? It also reports each class's accuracy with the
posterior and with the plain Bayes rule on the raw scores (no normalisation).

With ``--linear-probe N`` it also fits a linear classifier (multinomial logistic regression, scikit-learn)
to the embeddings of N training images and scores the test pixels with it: if the probe does no better
than the GMM head, the embeddings themselves do not separate the classes (feature learning is what lags),
rather than the mixtures failing to model separable embeddings.

Pixels are taken at the head's resolution (the embeddings' grid, labels resized by nearest neighbour).

Usage::

    python benchmarks/gmm_errors.py --config-file configs/digitscapes/deeplabv3plus_R18_gmmseg.yaml \\
        --weights output/digitscapes/deeplabv3plus_R18_gmmseg/model_final.pth --summary-classes 4-11 \\
        --linear-probe 300
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

# first, before anything loads torch: MKL reads MKL_CBWR at its first call (gmmseg/reproducibility.py)
pin_mkl_branch()
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent


def parse_classes(text: str) -> list[int]:
    """'4-11' or '4,5,7' -> class indices."""
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out += list(range(int(low), int(high or low) + 1))
    return out


def load_model(cfg) -> tuple[torch.nn.Module, object]:
    """The model in eval mode with ``cfg.MODEL.WEIGHTS`` loaded, and its per-pixel GMM predictor."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    predictor = getattr(model.sem_seg_head, "gmm_predictor", None)
    if predictor is None:
        raise SystemExit(f"{cfg.MODEL.SEM_SEG_HEAD.NAME}: not a per-pixel GMM head (no gmm_predictor)")
    return model, predictor


def collect(
    model, predictor, dataset: str, max_images: int, image_format: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model's inference on the first ``max_images`` of ``dataset``; return the embeddings (N, D)
    and their labels (N,) at the embeddings' resolution."""
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image
    from PIL import Image

    captured: list[torch.Tensor] = []
    handle = predictor.register_forward_hook(
        lambda module, inputs, outputs: captured.append(outputs["embeddings"])
    )
    embeddings, labels = [], []
    try:
        with torch.no_grad():
            for record in DatasetCatalog.get(dataset)[:max_images]:
                image = read_image(record["file_name"], format=image_format)
                captured.clear()
                tensor = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
                model([{"image": tensor, "height": image.shape[0], "width": image.shape[1]}])
                grid = captured[0][0]  # (h, w, D)
                label = torch.as_tensor(np.array(Image.open(record["sem_seg_file_name"]), dtype=np.int64))
                label = F.interpolate(label[None, None].float(), size=grid.shape[:2], mode="nearest")
                embeddings.append(grid.reshape(-1, grid.shape[-1]))
                labels.append(label.reshape(-1).long())
    finally:
        handle.remove()
    return torch.cat(embeddings), torch.cat(labels)


def fit_linear_probe(
    embeddings: torch.Tensor, labels: torch.Tensor, num_classes: int, max_samples: int = 60000
):
    """Multinomial logistic regression on (at most ``max_samples``, drawn with a fixed seed) labelled
    embeddings; returns the fitted scikit-learn classifier."""
    from sklearn.linear_model import LogisticRegression

    keep = (labels >= 0) & (labels < num_classes)
    x, y = embeddings[keep].double().numpy(), labels[keep].numpy()
    chosen = np.random.default_rng(0).permutation(len(y))[:max_samples]
    return LogisticRegression(C=10.0, max_iter=500).fit(x[chosen], y[chosen])


def mean_iou(pred: torch.Tensor, labels: torch.Tensor, classes: list[int], num_classes: int) -> float:
    """Mean over ``classes`` of IoU = TP / (TP + FP + FN), pooled over all pixels with a label in
    ``[0, num_classes)``; classes with neither a pixel nor a prediction are left out of the mean (the
    evaluator's ``confusion_matrix`` and ``segmentation_metrics``)."""
    from gmmseg.evaluation import confusion_matrix, segmentation_metrics
    from gmmseg.evaluation.report import group_mean_iou

    keep = (labels >= 0) & (labels < num_classes)
    confusion = confusion_matrix(labels[keep].numpy(), pred[keep].numpy(), num_classes, ignore_label=-1)
    names = [str(c) for c in range(num_classes)]
    return group_mean_iou(segmentation_metrics(confusion, names), [names[c] for c in classes])


def decompose(embeddings: torch.Tensor, labels: torch.Tensor, predictor) -> dict[str, torch.Tensor]:
    """Float64 quadratic and log-det terms of each class's best component, posterior and raw predictions."""
    from gmmseg.gmm import diag_gaussian_log_prob

    means, stds = (t.double() for t in predictor.gmm.parameters_in_use())
    num_classes, num_components, dim = means.shape
    keep = labels < num_classes  # drop ignored pixels
    x, y = embeddings[keep].double(), labels[keep]
    component = diag_gaussian_log_prob(x, means.reshape(-1, dim), stds.reshape(-1, dim))
    component = component.view(-1, num_classes, num_components)
    reference = predictor.gmm.component_log_prob(embeddings[keep]).double()  # what the model computes
    scale = component.abs().amax().clamp_min(1.0)
    if not ((reference - component).abs().amax() / scale < 1e-4):
        raise RuntimeError("float64 log-likelihoods disagree with the model's: check the decomposition")
    log_det = -torch.log(stds).sum(-1)  # (C, K)
    quadratic = component - log_det - (-0.5 * dim * math.log(2 * math.pi))
    best = component.argmax(-1, keepdim=True)  # (N, C, 1)
    class_scores = predictor.gmm.class_log_prob(x.float(), component.float()).double()
    posterior_pred = predictor.logit_norm(class_scores.float()).argmax(-1)
    return {
        "labels": y,
        "quadratic": quadratic.gather(-1, best)[..., 0],
        "log_det": log_det.expand_as(component).gather(-1, best)[..., 0],
        "class_scores": class_scores,
        "posterior_pred": posterior_pred,
        "raw_pred": class_scores.argmax(-1),
    }


def rows(terms: dict[str, torch.Tensor], groups: dict[str, list[int]]) -> list[dict]:
    y, pred = terms["labels"], terms["posterior_pred"]
    index = torch.arange(len(y))
    out = []
    for name, classes in groups.items():
        member = torch.isin(y, torch.tensor(classes))
        wrong = member & (pred != y)
        row = {"classes": name, "pixels": int(member.sum()), "wrong": int(wrong.sum())}
        if row["pixels"]:
            row["acc"] = 100 * float((pred == y)[member].float().mean())
            row["raw_acc"] = 100 * float((terms["raw_pred"] == y)[member].float().mean())
        if row["wrong"]:
            t, p = y[wrong], pred[wrong]
            rows_wrong = index[wrong]
            d_quad = terms["quadratic"][rows_wrong, t] - terms["quadratic"][rows_wrong, p]
            d_det = terms["log_det"][rows_wrong, t] - terms["log_det"][rows_wrong, p]
            row["closer_to_true"] = 100 * float((d_quad > 0).float().mean())
            row["median_d_quad"] = float(d_quad.quantile(0.5))
            row["median_d_logdet"] = float(d_det.quantile(0.5))
        out.append(row)
    return out


def markdown(table: list[dict]) -> str:
    head = (
        "| classes | pixels | accuracy (posterior) | accuracy (raw Bayes rule) | misclassified | "
        "of which closer to the true class | median quadratic term, true - predicted | "
        "median log-det term, true - predicted |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n"
    )

    def f(row, key, fmt):
        return format(row[key], fmt) if key in row else "-"

    def line(r: dict) -> str:
        cells = [
            r["classes"],
            f"{r['pixels']:,}",
            f(r, "acc", ".1f"),
            f(r, "raw_acc", ".1f"),
            f"{r['wrong']:,}",
            f(r, "closer_to_true", ".1f") + "%",
            f(r, "median_d_quad", "+.2f"),
            f(r, "median_d_logdet", "+.2f"),
        ]
        return "| " + " | ".join(cells) + " |\n"

    body = "".join(line(r) for r in table)
    return head + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", required=True, help="model_final.pth of a GMMSeg per-pixel model")
    parser.add_argument("--dataset", default=None, help="default: the config's first test dataset")
    parser.add_argument("--max-images", type=int, default=100)
    parser.add_argument("--summary-classes", default=None, help="also one row over these classes: '4-11'")
    parser.add_argument(
        "--linear-probe", type=int, default=0, metavar="N", help="fit a linear probe on N training images"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides")
    args = parser.parse_args(argv)
    if not Path(args.weights).is_file():
        parser.error(f"--weights {args.weights}: no such file")
    from detectron2.data import MetadataCatalog

    from gmmseg import setup_cfg

    os.environ.setdefault("DETECTRON2_DATASETS", str(REPO / "datasets"))
    opts = [*args.opts, "MODEL.WEIGHTS", args.weights, "MODEL.DEVICE", "cpu"]
    if args.dataset:
        opts += ["DATASETS.TEST", repr((args.dataset,))]
    cfg = setup_cfg(args.config_file, opts)

    model, predictor = load_model(cfg)
    dataset = cfg.DATASETS.TEST[0]
    embeddings, labels = collect(model, predictor, dataset, args.max_images, cfg.INPUT.FORMAT)
    terms = decompose(embeddings, labels, predictor)
    names = MetadataCatalog.get(dataset).stuff_classes
    groups = {name: [c] for c, name in enumerate(names)}
    summary = None
    if args.summary_classes:
        chosen = parse_classes(args.summary_classes)
        summary = (f"{names[chosen[0]]} to {names[chosen[-1]]}", chosen)
        groups[summary[0]] = chosen
    groups["all classes"] = list(range(len(names)))
    print(f"{dataset} (first {args.max_images} images), {args.weights}\n")
    print(markdown(rows(terms, groups)))
    if args.linear_probe > 0:
        train = cfg.DATASETS.TRAIN[0]
        train_embeddings, train_labels = collect(model, predictor, train, args.linear_probe, cfg.INPUT.FORMAT)
        probe = fit_linear_probe(train_embeddings, train_labels, len(names))
        keep = terms["labels"]
        probe_pred = torch.as_tensor(probe.predict(embeddings[labels < len(names)].double().numpy()))
        predictions = {
            "GMM head (posterior)": terms["posterior_pred"],
            "GMM head (raw Bayes rule)": terms["raw_pred"],
            f"linear probe ({train}, {args.linear_probe} images)": probe_pred,
        }
        columns = {"all classes": list(range(len(names)))}
        if summary is not None:
            columns[summary[0]] = summary[1]
            columns["the other classes"] = [c for c in range(len(names)) if c not in summary[1]]
        print(f"Mean IoU (%) on {dataset} at the embeddings' resolution, same embeddings:\n")
        print("| classifier | " + " | ".join(columns) + " |")
        print("| --- |" + " ---: |" * len(columns))
        for name, pred in predictions.items():
            cells = [f"{mean_iou(pred, keep, c, len(names)):.1f}" for c in columns.values()]
            print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
