"""The inputs of the decode heads on multi-scale backbones (``SegFormerHead``, ``UPerNetHead``, ``OCRHead``).

Each head reads the backbone outputs named by ``MODEL.SEM_SEG_HEAD.IN_FEATURES`` and upsamples its logits
by ``MODEL.SEM_SEG_HEAD.COMMON_STRIDE`` to the input, so that stride must be its finest input's. The
checks live here, once, so that the three heads refuse the same configs with the same words, naming the
key and the head.
"""

from __future__ import annotations

from collections.abc import Mapping

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec

__all__ = ["configured_inputs", "sorted_in_features"]


def configured_inputs(head_cfg: CfgNode, input_shape: Mapping[str, ShapeSpec]) -> dict[str, ShapeSpec]:
    """The shapes of the backbone outputs ``head_cfg.IN_FEATURES`` names (for a head's ``from_config``);
    ValueError naming the key for a name the backbone does not give."""
    missing = [name for name in head_cfg.IN_FEATURES if name not in input_shape]
    if missing:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.IN_FEATURES = {list(head_cfg.IN_FEATURES)} is invalid: the backbone gives "
            f"{sorted(input_shape)}, not {missing}"
        )
    return {name: input_shape[name] for name in head_cfg.IN_FEATURES}


def sorted_in_features(
    input_shape: Mapping[str, ShapeSpec], common_stride: int, head: str, *, coarsest_first: bool = False
) -> list[str]:
    """The input names by stride, finest first (or coarsest first), after checking that there is one and
    that ``common_stride`` is the finest input's stride; ValueError naming the key and ``head`` if not."""
    if not input_shape:
        raise ValueError(f"{head} needs an input feature (MODEL.SEM_SEG_HEAD.IN_FEATURES)")
    finest = min(shape.stride for shape in input_shape.values())
    if common_stride != finest:
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE = {common_stride} is invalid: expected {finest}, the "
            f"stride of {head}'s finest input (its logits are upsampled by it to the input)"
        )
    sign = -1 if coarsest_first else 1
    return sorted(input_shape, key=lambda name: sign * input_shape[name].stride)
