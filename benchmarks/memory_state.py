"""What the GMM memory holds at the end of a run: per class, the fitted stds and how much of its queues is
real features rather than the random unit vectors ``MODEL.GMM.MEMORY_INIT random`` starts them with.

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

HOOK = "GMMEMHook"


def memory_state(model: dict[str, torch.Tensor], hook: dict[str, torch.Tensor], threshold: float) -> dict:
    """Per class (index order): mean fitted std, share of slots holding real features, write pointer."""
    means = next(v for k, v in model.items() if k.endswith("gmm.means"))  # (C, K, D)
    stds = next(v for k, v in model.items() if k.endswith("gmm.stds"))
    features = hook["memory.features"].float()  # (C, K, capacity, D)
    count = hook["memory.count"]  # (C, K) filled slots
    cosine = torch.einsum("ckqd,ckd->ckq", F.normalize(features, dim=-1), F.normalize(means.float(), dim=-1))
    slots = torch.arange(features.shape[2]).view(1, 1, -1)
    filled = slots < count.unsqueeze(-1)
    real = ((cosine > threshold) & filled).sum(-1).float() / count.clamp(min=1)  # (C, K)
    return {
        "std": stds.float().mean(dim=(1, 2)).tolist(),
        "real_share": real.mean(dim=1).tolist(),
        "written": hook["memory.ptr"].float().mean(dim=1).tolist(),
        "capacity": features.shape[2],
    }


def markdown(name: str, state: dict, class_names: list[str] | None) -> str:
    rows = [
        f"#### {name}",
        "",
        f"| class | mean std | real share of the queues | write pointer (of {state['capacity']:,}) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for c, (std, real, written) in enumerate(zip(state["std"], state["real_share"], state["written"])):
        label = class_names[c] if class_names else str(c)
        rows.append(f"| {label} | {std:.3f} | {100 * real:.0f}% | {written:,.0f} |")
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
