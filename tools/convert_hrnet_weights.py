#!/usr/bin/env python
"""Convert the official HRNet ImageNet weights (HRNet-Image-Classification, e.g.
``hrnetv2_w48_imagenet_pretrained.pth``, which HRNet-Semantic-Segmentation and OCRNet start from) for
Detectron2.

    python tools/convert_hrnet_weights.py hrnetv2_w48_imagenet_pretrained.pth hrnetv2_w48_d2.pth --variant W48

then give ``MODEL.WEIGHTS hrnetv2_w48_d2.pth`` with a ``D2HRNet`` backbone of the same size
(``MODEL.HRNET.VARIANT W48``). The output is ``{"model": {"backbone.<name>": tensor}}``, which Detectron2's
``DetectionCheckpointer`` loads by exact name. timm's HRNet, which ``gmmseg.modeling.backbone.D2HRNet``
keeps, uses the official names, so the backbone's keep theirs:

    conv1, bn1, conv2, bn2 (stem), layer1 (first stage), transition1..3, stage2..4 -> backbone.<same name>
    incre_modules, downsamp_modules, final_layer, classifier -> dropped (the classification head)

(the official code leaves ``None`` where timm has ``nn.Identity``: neither has parameters, so no name
moves). Any other name is an error, so weights in another layout are not loaded half-way. With
``--variant`` the result is also checked, name by name and shape by shape, against ``D2HRNet`` of that
size (Detectron2 would skip a tensor of the wrong shape with a warning only); that check needs gmmseg's
models (Detectron2), the conversion only torch and ``gmmseg.checkpoint_conversion`` (the MiT converter's too).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping

import torch

from gmmseg.checkpoint_conversion import PREFIX, load_official_state_dict, rename_backbone_tensors

BACKBONE = re.compile(r"(conv[12]|bn[12]|layer1|transition[1-3]|stage[2-4])\..+")
CLASSIFICATION_HEAD = re.compile(r"(incre_modules|downsamp_modules|final_layer|classifier)\..+")


def timm_name(name: str) -> str | None:
    """The timm name of an official HRNet tensor (the same name); None for the classification head
    (dropped). ValueError for a name outside the official layout."""
    if BACKBONE.fullmatch(name):
        return name
    if CLASSIFICATION_HEAD.fullmatch(name):
        return None
    raise ValueError(f"'{name}' is not a tensor of the official HRNet (HRNet-Image-Classification) layout")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official HRNet state dict -> ``{"backbone.<name>": tensor}`` (classification head dropped)."""
    nothing_found = "no HRNet backbone tensor found: is this an HRNet ImageNet checkpoint?"
    return rename_backbone_tensors(state, timm_name, nothing_found)


def check_against_variant(converted: Mapping[str, torch.Tensor], variant: str) -> None:
    """ValueError unless ``converted`` holds exactly the tensors of ``D2HRNet(variant)``, in their shapes."""
    from gmmseg.modeling.backbone.hrnet import D2HRNet

    with torch.device("meta"):
        expected = {PREFIX + k: tuple(v.shape) for k, v in D2HRNet(variant=variant).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in converted.items()}
    missing, unexpected = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & got.keys() if expected[k] != got[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"not HRNet-{variant} weights: {len(missing)} tensors missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(wrong)} of another shape "
            f"(e.g. {wrong[:3]})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="official HRNet weights, e.g. hrnetv2_w48_imagenet_pretrained.pth")
    parser.add_argument("output", help="where to write the Detectron2 checkpoint (.pth)")
    parser.add_argument("--variant", help="check the result against D2HRNet of this size (e.g. W48)")
    args = parser.parse_args(argv)
    state = load_official_state_dict(args.source)
    converted = convert_state_dict(state)
    if args.variant:
        check_against_variant(converted, args.variant)
    torch.save({"model": converted, "__author__": "tools/convert_hrnet_weights.py"}, args.output)
    dropped = len(state) - len(converted)
    print(
        f"{len(converted)} tensors written to {args.output} ({dropped} classification-head tensors dropped)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
