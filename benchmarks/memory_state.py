"""What the GMM memory holds at the end of a run: per class, the fitted stds and how much of its queues is
real features rather than the random unit vectors ``MODEL.GMM.MEMORY_INIT random`` starts them with; how
far the fitted means still are from what their queues hold; and how the mixtures score the queues' own
features.

The M-step moves a mean only ``1 - MEAN_MOMENTUM`` of the way towards its queue's normalised mean, while the
stds are measured around the queue's mean: "turn left" is the angle between the two, averaged over a class's
components (0 when the mean has caught up; random directions in 64 dimensions are about 90 degrees apart).
"Scored own" is the share of a class's queue features whose highest class score (``max_k log N(x | mean,
std)``, as the classifier's "wta") is their own class; for Mask2Former (``class_predictor`` in the keys)
the last class is "no object" and "scored no object" the share it claims. Filled slots are read whole: with
``MEMORY_INIT random`` they include the random vectors still there.

Random unit vectors in D dimensions have per-dimension std 1/sqrt(D), so a component fitted on them has
stds of about sqrt(1/D + VAR_FLOOR) (0.16 for D = 64 and the 0.01 floor); real features sit close to their
component's mean. A slot counts as real when the cosine of its feature with its component's mean exceeds
``--threshold`` (a random unit vector in 64 dimensions passes 0.3 with probability below 1%), and the write
pointer of a queue that has not wrapped yet (``memory.ptr``) gives the number of features written.

Usage: ``python benchmarks/memory_state.py CHECKPOINT ... [--dataset digitscapes_val] [--output FILE.md]``
(a Detectron2 checkpoint of a GMMSeg model trained by ``GMMSegTrainer``, which saves the memory with it).
"""

from __future__ import annotations

from gmmseg.reproducibility import pin_mkl_branch

pin_mkl_branch()  # before torch loads MKL (gmmseg/reproducibility.py)
# ruff: noqa: E402  (the imports below must follow pin_mkl_branch())

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from gmmseg.gmm.classifier import GaussianMixtureClassifier

HOOK = "GMMEMHook"


def queue_scores(
    means: torch.Tensor, stds: torch.Tensor, features: torch.Tensor, filled: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class: the angle (degrees) between each fitted mean and its queue's normalised mean, averaged
    over the filled queues, and the top class (``max_k`` log-likelihood) of each filled slot's feature."""
    classes, comps, _, dim = features.shape
    mask = filled.unsqueeze(-1).to(features.dtype)
    queue_mean = F.normalize((features * mask).sum(2), dim=-1)  # (C, K, D)
    cosine = (queue_mean * F.normalize(means.float(), dim=-1)).sum(-1).clamp(-1.0, 1.0)
    has = filled.any(-1)
    angle = torch.rad2deg(torch.acos(cosine)) * has
    turn = angle.sum(1) / has.sum(1).clamp(min=1)
    classifier = GaussianMixtureClassifier(classes, comps, dim, score="wta")
    classifier.update_parameters(means.float(), stds.float())
    # one class's queues at a time bounds the (slots, C, K) scores
    top = [classifier.class_log_prob(features[c][filled[c]]).argmax(-1) for c in range(classes)]
    return turn, top


def memory_state(model: dict[str, torch.Tensor], hook: dict[str, torch.Tensor], threshold: float) -> dict:
    """Per class (index order): mean fitted std, share of slots holding real features, write pointer, the
    turn left to the queue means, and the shares of its queue features scored as own class / last class."""
    means = next(v for k, v in model.items() if k.endswith("gmm.means"))  # (C, K, D)
    stds = next(v for k, v in model.items() if k.endswith("gmm.stds"))
    features = hook["memory.features"].float()  # (C, K, capacity, D)
    count = hook["memory.count"]  # (C, K) filled slots
    cosine = torch.einsum("ckqd,ckd->ckq", F.normalize(features, dim=-1), F.normalize(means.float(), dim=-1))
    slots = torch.arange(features.shape[2]).view(1, 1, -1)
    filled = slots < count.unsqueeze(-1)
    real = ((cosine > threshold) & filled).sum(-1).float() / count.clamp(min=1)  # (C, K)
    turn, top = queue_scores(means, stds, features, filled)
    last = len(top) - 1
    return {
        "std": stds.float().mean(dim=(1, 2)).tolist(),
        "real_share": real.mean(dim=1).tolist(),
        "written": hook["memory.ptr"].float().mean(dim=1).tolist(),
        "capacity": features.shape[2],
        "turn_left": turn.tolist(),
        "scored_own": [(t == c).float().mean().item() if t.numel() else 0.0 for c, t in enumerate(top)],
        "scored_last": [(t == last).float().mean().item() if t.numel() else 0.0 for t in top],
        "no_object": any("class_predictor.gmm" in k for k in model),
    }


def markdown(name: str, state: dict, class_names: list[str] | None) -> str:
    no_object = state["no_object"]
    rows = [
        f"#### {name}",
        "",
        f"| class | mean std | real share of the queues | write pointer (of {state['capacity']:,}) "
        f"| turn left (deg) | scored own |{' scored no object |' if no_object else ''}",
        f"| --- | ---: | ---: | ---: | ---: | ---: |{' ---: |' if no_object else ''}",
    ]
    columns = zip(
        state["std"], state["real_share"], state["written"], state["turn_left"], state["scored_own"]
    )
    for c, (std, real, written, turn, own) in enumerate(columns):
        label = (
            class_names[c] if class_names and c < len(class_names) else ("no object" if no_object else str(c))
        )
        claimed = f" {100 * state['scored_last'][c]:.0f}% |" if no_object else ""
        rows.append(
            f"| {label} | {std:.3f} | {100 * real:.0f}% | {written:,.0f} | {turn:.1f} | "
            f"{100 * own:.0f}% |{claimed}"
        )
    return "\n".join(rows) + "\n"


def class_names_of(dataset: str | None) -> list[str] | None:
    if dataset is None:
        return None
    from detectron2.data import MetadataCatalog

    from gmmseg.data.folder_dataset import register_all_folder_datasets

    register_all_folder_datasets()  # DigitScapes and any dataset folder under $DETECTRON2_DATASETS
    return list(MetadataCatalog.get(dataset).stuff_classes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--threshold", type=float, default=0.3, help="cosine above which a slot is real")
    parser.add_argument("--dataset", default=None, help="registered dataset whose class names to print")
    parser.add_argument("--output", default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    names = class_names_of(args.dataset)
    tables = []
    for path in args.checkpoints:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        hook = checkpoint.get("trainer", {}).get("hooks", {}).get(HOOK)
        if hook is None:
            raise SystemExit(f"{path}: no {HOOK} state (not a GMMSeg model trained with its EM hook)")
        tables.append(markdown(path, memory_state(checkpoint["model"], hook, args.threshold), names))
    text = "\n".join(tables)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
