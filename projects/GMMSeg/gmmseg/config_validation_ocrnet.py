"""The config rules of OCRNet on HRNet (``MODEL.HRNET.*``, ``MODEL.OCR.*``), kept apart from
``gmmseg.config_validation`` so that its table stays short; that module checks these with the others."""

from __future__ import annotations

import math
from collections.abc import Callable

from detectron2.config import CfgNode

from gmmseg.config_rules import Rule, head_reads_backbone_outputs, in_range, integer, one_of
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


# After gmmseg.config_validation's own cross-key rules.
OCRNET_CROSS_KEY_RULES: tuple[Callable[[CfgNode], None], ...] = (
    head_reads_backbone_outputs("D2HRNet", "MODEL.HRNET.OUT_FEATURES", HRNET_STRIDES, "OCRHead"),
)
