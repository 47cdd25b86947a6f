"""UperNet's config rules (``UPerNetHead``, ``MODEL.UPERNET``): a per-key table and one cross-key rule, which
``gmmseg.config_validation`` adds to its own (kept apart so that module stays short)."""

from __future__ import annotations

from detectron2.config import CfgNode

from gmmseg.config import MASK2FORMER_IMPORT_ERROR
from gmmseg.config_rules import Rule, at_least, check, integer, lookup

__all__ = ["BACKBONE_OUTPUTS", "UPERNET_KEY_RULES", "upernet_head_reads_backbone_outputs"]

POOL_SCALES = Rule(
    lambda v: len(v) > 0 and len(set(v)) == len(v) and all(isinstance(s, int) and s > 0 for s in v),
    "distinct positive integers (grid sizes of the pyramid pooling module)",
)
UPERNET_KEY_RULES: dict[str, Rule] = {
    "MODEL.UPERNET.POOL_SCALES": POOL_SCALES,
    "MODEL.UPERNET.AUX_CHANNELS": integer(1),
    "MODEL.UPERNET.AUX_LOSS_WEIGHT": at_least(0),
}
# backbone -> the key that lists its outputs
BACKBONE_OUTPUTS = {
    "build_resnet_backbone": "MODEL.RESNETS.OUT_FEATURES",
    "build_resnet_deeplab_backbone": "MODEL.RESNETS.OUT_FEATURES",
    "D2SwinTransformer": "MODEL.SWIN.OUT_FEATURES",
    "D2MixTransformer": "MODEL.MIT.OUT_FEATURES",
}
# strides of the four stages of those backbones (a dilated res5 is never the finest input)
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


def upernet_head_reads_backbone_outputs(cfg: CfgNode) -> None:
    """For ``UPerNetHead``: a positive width, an installed Swin, inputs and auxiliary input among the
    backbone's outputs, and ``COMMON_STRIDE`` the finest input's stride."""
    head, upernet = cfg.MODEL.SEM_SEG_HEAD, cfg.MODEL.UPERNET
    if head.NAME != "UPerNetHead":
        return
    check(
        integer(1).accepts(head.CONVS_DIM), "MODEL.SEM_SEG_HEAD.CONVS_DIM", head.CONVS_DIM, "an integer >= 1"
    )
    backbone = cfg.MODEL.BACKBONE.NAME
    check(
        backbone != "D2SwinTransformer" or MASK2FORMER_IMPORT_ERROR is None,
        "MODEL.BACKBONE.NAME",
        backbone,
        f"an installed Mask2Former, which has Swin (tools/install.py; {MASK2FORMER_IMPORT_ERROR})",
    )
    inputs = list(head.IN_FEATURES)
    check(
        len(inputs) > 0 and len(set(inputs)) == len(inputs),
        "MODEL.SEM_SEG_HEAD.IN_FEATURES",
        inputs,
        "distinct names",
    )
    if backbone in BACKBONE_OUTPUTS:
        key = BACKBONE_OUTPUTS[backbone]
        outputs = list(lookup(cfg, key))
        check(
            set(inputs) <= set(outputs),
            "MODEL.SEM_SEG_HEAD.IN_FEATURES",
            inputs,
            f"names among {key} {outputs}",
        )
        check(
            upernet.AUX_LOSS_WEIGHT == 0 or upernet.AUX_IN_FEATURE in outputs,
            "MODEL.UPERNET.AUX_IN_FEATURE",
            upernet.AUX_IN_FEATURE,
            f"a name among {key} {outputs} (or MODEL.UPERNET.AUX_LOSS_WEIGHT 0: no auxiliary head)",
        )
    if set(inputs) <= set(STAGE_STRIDES):
        finest = min(STAGE_STRIDES[name] for name in inputs)
        stride = head.COMMON_STRIDE
        check(stride == finest, "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", stride, f"{finest} (finest input)")
