"""What the converters of official ImageNet weights (``tools/convert_mit_weights.py``,
``tools/convert_hrnet_weights.py``) share: reading the official checkpoint, and renaming its tensors into
the ``{"backbone.<name>": tensor}`` state dict that Detectron2's ``DetectionCheckpointer`` loads by exact
name. Each converter keeps its own name mapping; this module needs torch only (no Detectron2), so
converting needs no more than it did."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["PREFIX", "load_official_state_dict", "rename_backbone_tensors"]

PREFIX = "backbone."


def load_official_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The state dict in an official checkpoint: saved bare, or under "state_dict" / "model"."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return state


def rename_backbone_tensors(
    state: Mapping[str, torch.Tensor], backbone_name: Callable[[str], str | None], nothing_found: str
) -> dict[str, torch.Tensor]:
    """``{PREFIX + backbone_name(name): tensor}`` for every tensor ``backbone_name`` keeps (it returns None
    for one to drop, e.g. the classifier, and raises for one outside the official layout); ValueError with
    ``nothing_found`` when it keeps none."""
    converted = {}
    for name, value in state.items():
        target = backbone_name(name)
        if target is not None:
            converted[PREFIX + target] = value
    if not converted:
        raise ValueError(nothing_found)
    return converted
