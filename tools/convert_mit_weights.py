#!/usr/bin/env python
"""Convert SegFormer's official MiT ImageNet weights (``mit_b0.pth`` ... ``mit_b5.pth``) for Detectron2.

    python tools/convert_mit_weights.py mit_b5.pth mit_b5_d2.pth

then give ``MODEL.WEIGHTS mit_b5_d2.pth`` with a ``D2MixTransformer`` backbone of the same size
(``MODEL.MIT.VARIANT B5``). The output is ``{"model": {"backbone.<name>": tensor}}``, which Detectron2's
``DetectionCheckpointer`` loads by exact name. The names are those of timm's PVTv2 modules that
``gmmseg.modeling.backbone.D2MixTransformer`` keeps; the official ones map to them as follows:

    patch_embed1.*            -> patch_embed.*               (the 7x7 stride-4 embedding)
    patch_embed<k>.*, k>1     -> stages.<k-1>.downsample.*   (the 3x3 stride-2 embeddings)
    block<k>.<j>.*            -> stages.<k-1>.blocks.<j>.*   (attn.{q,kv,proj,sr,norm}, norm1/2, mlp.fc1/2
                                                              keep their names)
    block<k>.<j>.mlp.dwconv.dwconv.* -> ....mlp.dwconv.*     (timm has no wrapper around the conv)
    norm<k>.*                 -> stages.<k-1>.norm.*         (each stage's final LayerNorm)
    head.*                    -> dropped (the ImageNet classifier)

Any other name is an error, so weights in another layout are not loaded half-way: mmsegmentation's own
MiT layout (``layers.0.0.projection.*``, e.g. ``mit_b5_mmseg.pth``, which the GMMSeg authors load) is
refused with a message; convert from the original ``mit_b5.pth``. Only torch is needed (and
``gmmseg.checkpoint_conversion``, which the HRNet converter shares; not Detectron2).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping

import torch

from gmmseg.checkpoint_conversion import load_official_state_dict, rename_backbone_tensors

PARAM = r"\.(weight|bias)"
PATCH_EMBED = re.compile(r"patch_embed([1-4])\.(proj|norm)" + PARAM)
BLOCK_LAYER = r"(norm1|norm2|attn\.(?:q|kv|proj|sr|norm)|mlp\.(?:fc1|fc2|dwconv\.dwconv))"
BLOCK = re.compile(r"block([1-4])\.(\d+)\." + BLOCK_LAYER + PARAM)
STAGE_NORM = re.compile(r"norm([1-4])" + PARAM)


def timm_name(name: str) -> str | None:
    """The timm name of an official MiT parameter; None for the classifier (``head.*``), which is dropped.
    ValueError for a name outside the official layout."""
    if name.startswith("head."):
        return None
    if match := PATCH_EMBED.fullmatch(name):
        stage, layer, param = int(match[1]) - 1, match[2], match[3]
        return f"patch_embed.{layer}.{param}" if stage == 0 else f"stages.{stage}.downsample.{layer}.{param}"
    if match := BLOCK.fullmatch(name):
        layer = match[3].replace("dwconv.dwconv", "dwconv")  # timm's MLP holds the conv itself
        return f"stages.{int(match[1]) - 1}.blocks.{match[2]}.{layer}.{match[4]}"
    if match := STAGE_NORM.fullmatch(name):
        return f"stages.{int(match[1]) - 1}.norm.{match[2]}"
    if name.startswith("layers."):
        raise ValueError(
            f"'{name}' is mmsegmentation's MiT layout (as mit_b*_mmseg.pth); convert the original SegFormer "
            "weights (mit_b*.pth) instead"
        )
    raise ValueError(f"'{name}' is not a parameter of SegFormer's official MiT (mit_b*.pth)")


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official MiT state dict -> ``{"backbone.<timm name>": tensor}`` (classifier dropped)."""
    return rename_backbone_tensors(state, timm_name, "no MiT parameter found: is this a mit_b*.pth file?")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", help="official MiT weights, e.g. mit_b5.pth")
    parser.add_argument("output", help="where to write the Detectron2 checkpoint (.pth)")
    args = parser.parse_args(argv)
    state = load_official_state_dict(args.source)
    converted = convert_state_dict(state)
    torch.save({"model": converted, "__author__": "tools/convert_mit_weights.py"}, args.output)
    dropped = len(state) - len(converted)
    print(f"{len(converted)} tensors written to {args.output} ({dropped} classifier tensors dropped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
