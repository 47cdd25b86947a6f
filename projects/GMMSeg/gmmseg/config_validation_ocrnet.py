"""The config rules of OCRNet on HRNet (``MODEL.HRNET.*``, ``MODEL.OCR.*``), kept apart from
``gmmseg.config_validation`` so that its table stays short; that module checks these with the others."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from detectron2.config import CfgNode

from gmmseg.config_rules import ConfigValueError, Rule, in_range, integer, one_of
from gmmseg.modeling.backbone.hrnet import HRNET_FEATURES, HRNET_NORMS, HRNET_STRIDES, HRNET_VARIANTS

__all__ = ["OCRNET_CROSS_KEY_RULES", "OCRNET_KEY_RULES"]

HRNET_OUTPUTS = Rule(
    lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(HRNET_FEATURES),
    f"distinct names among {list(HRNET_FEATURES)}",
)

OCRNET_KEY_RULES: dict[str, Rule] = {
    "MODEL.HRNET.VARIANT": one_of(*HRNET_VARIANTS),
    "MODEL.HRNET.NORM": one_of(*HRNET_NORMS),
    "MODEL.HRNET.OUT_FEATURES": HRNET_OUTPUTS,
    "MODEL.OCR.CHANNELS": integer(1),
    "MODEL.OCR.KEY_CHANNELS": integer(1),
    "MODEL.OCR.AUX_LOSS_WEIGHT": in_range(0.0, math.inf),
}


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise ConfigValueError(key, list(value) if isinstance(value, tuple) else value, expected)


def _head_reads_hrnet_outputs(cfg: CfgNode) -> None:
    """On an HRNet the head reads branches it gives, and OCRHead's stride is that of its finest input."""
    if cfg.MODEL.BACKBONE.NAME != "D2HRNet":
        return
    head, outputs = cfg.MODEL.SEM_SEG_HEAD, list(cfg.MODEL.HRNET.OUT_FEATURES)
    _check(
        len(head.IN_FEATURES) > 0 and set(head.IN_FEATURES) <= set(outputs),
        "MODEL.SEM_SEG_HEAD.IN_FEATURES",
        head.IN_FEATURES,
        f"names among MODEL.HRNET.OUT_FEATURES {outputs}",
    )
    if head.NAME == "OCRHead":
        finest = min(HRNET_STRIDES[name] for name in head.IN_FEATURES)
        stride = head.COMMON_STRIDE
        _check(stride == finest, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", stride, f"{finest} (finest input)")


# After gmmseg.config_validation's own cross-key rules.
OCRNET_CROSS_KEY_RULES: tuple[Callable[[CfgNode], None], ...] = (_head_reads_hrnet_outputs,)
