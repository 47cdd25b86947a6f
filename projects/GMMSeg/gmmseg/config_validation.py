"""Which config values GMMSeg-D2 accepts, checked before a run builds or writes anything.

Declarative where it can be: ``KEY_RULES`` maps a key to a ``Rule`` (``gmmseg.config_rules``: what one
value must be, and the text that says so), checked by one loop; the few rules that relate keys to each
other, or to the datasets' metadata, are the small functions of ``CROSS_KEY_RULES`` (those about anomaly
scores read the scores' declarations, ``gmmseg.modeling.anomaly_scores``). Any bad value raises
``ConfigValueError`` naming the full key. Nothing here registers datasets: ``gmmseg.engine.setup_cfg``
does that, before validating.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from gmmseg.config import MASK2FORMER_IMPORT_ERROR
from gmmseg.config_rules import (
    BOOLEAN,
    DEVICE,
    FRACTION,
    HEIGHT_WIDTH,
    POSITIVE,
    ConfigValueError,
    Rule,
    at_least,
    check,
    existing_file,
    head_reads_backbone_outputs,
    in_range,
    integer,
    lookup,
    one_of,
)
from gmmseg.config_validation_ocrnet import OCRNET_CROSS_KEY_RULES, OCRNET_KEY_RULES
from gmmseg.config_validation_upernet import UPERNET_KEY_RULES, upernet_head_reads_backbone_outputs
from gmmseg.modeling.anomaly_scores import (
    ANOMALY_SCORES,
    MASK_CLASSIFICATION_MAPS,
    MASK_CLASSIFICATION_SOFTMAX_MAPS,
    SCORE_NAMES,
    scores_needing_more_than,
)
from gmmseg.modeling.backbone.mit import MIT_FEATURES, MIT_STRIDES, MIT_VARIANTS
from gmmseg.modeling.gmm_head import GMMHead

__all__ = [
    "KEY_RULES",
    "MASK_FORMER_ARCHITECTURES",
    "RESUMABLE_TRAIN_SAMPLERS",
    "ConfigValueError",
    "Rule",
    "validate_gmmseg_config",
]

# meta-architectures built on Mask2Former, and the transformer decoder each needs
MASK_FORMER_ARCHITECTURES = {
    "PosteriorMaskFormer": "MultiScaleMaskedTransformerDecoder",
    "GMMMaskFormer": "GMMMultiScaleMaskedTransformerDecoder",
}
# ... and the maps each gives to anomaly scores (its ``head_maps``)
MASK_FORMER_MAPS = {
    "PosteriorMaskFormer": MASK_CLASSIFICATION_SOFTMAX_MAPS,
    "GMMMaskFormer": MASK_CLASSIFICATION_MAPS,
}
# DATALOADER.SAMPLER_TRAIN: shuffled epochs and the authors' class-balanced draws (GMMSegTrainer resumes
# both mid-stream), or Detectron2's own samplers
RESUMABLE_TRAIN_SAMPLERS = ("TrainingSampler", "ClassBalancedSampler")
TRAIN_SAMPLERS = (*RESUMABLE_TRAIN_SAMPLERS, "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


ANOMALY_SCORE_NAMES = Rule(
    lambda v: all(s in SCORE_NAMES for s in v) and len(set(v)) == len(v),
    f"distinct names among {list(SCORE_NAMES)}",
)
MIT_OUTPUTS = Rule(
    lambda v: len(v) > 0 and len(set(v)) == len(v) and set(v) <= set(MIT_FEATURES),
    f"distinct names among {list(MIT_FEATURES)}",
)
# DefaultTrainer's PeriodicWriter writes metrics.json every 20 iterations, each key's latest value only
METRICS_WRITE_PERIOD = 20
DIAGNOSTICS_PERIOD = Rule(
    lambda v: isinstance(v, int) and v >= 0 and v % METRICS_WRITE_PERIOD == 0,
    f"0 (off) or a multiple of {METRICS_WRITE_PERIOD} (metrics.json keeps one value per key per write)",
)
SEMANTIC_ONLY = Rule(lambda v: not v, "False (GMMSeg-D2 runs semantic inference only)")

# Checked in this order for every config; the first bad key is reported.
KEY_RULES: dict[str, Rule] = {
    "TEST.CALIBRATION_BINS": integer(1),
    "MODEL.SEM_SEG_HEAD.NUM_CLASSES": integer(1),
    "INPUT.RANDOM_FLIP": one_of("none", "horizontal", "vertical"),
    "SOLVER.IMS_PER_BATCH": integer(1),
    "SOLVER.MAX_ITER": integer(1),
    "SOLVER.BASE_LR": POSITIVE,
    "MODEL.DEVICE": DEVICE,
    "SOLVER.OPTIMIZER": one_of("SGD", "ADAMW"),
    "SOLVER.BACKBONE_MULTIPLIER": at_least(0),
    "SOLVER.HEAD_MULTIPLIER": at_least(0),
    "SOLVER.LOGIT_NORM_MULTIPLIER": at_least(0),
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": one_of("value", "norm", "full_model"),
    "DATALOADER.SAMPLER_TRAIN": one_of(*TRAIN_SAMPLERS),
    "MODEL.GMM.ENABLED": BOOLEAN,
    "MODEL.GMM.MEMORY_CAPACITY": integer(0, "0: no memory, the current batches only"),
    "MODEL.GMM.EMBED_DIM": integer(1),
    "MODEL.GMM.NUM_COMPONENTS": integer(1),
    "MODEL.GMM.MEMORY_PER_STEP": integer(1),
    "MODEL.GMM.UPDATE_INTERVAL": integer(1),
    "MODEL.GMM.SINKHORN_ITERS": integer(1),
    "MODEL.GMM.MEMORY_SAMPLING": one_of("uniform", "random"),
    "MODEL.GMM.MEMORY_DTYPE": one_of("float32", "float16"),
    "MODEL.GMM.MEMORY_INIT": one_of("empty", "random"),
    "MODEL.GMM.E_STEP": one_of("sinkhorn", "vanilla"),
    "MODEL.GMM.CLASS_SCORE": one_of("wta", "mixture"),
    "MODEL.GMM.LOGIT_NORM": one_of("layernorm", "none"),
    "MODEL.GMM.PROJECTION_ACTIVATION": one_of("relu", "none"),
    "MODEL.GMM.FIT": one_of("em", "backprop"),
    "MODEL.GMM.MEAN_MOMENTUM": in_range(0.0, 1.0),
    "MODEL.GMM.COV_MOMENTUM": in_range(0.0, 1.0),
    "MODEL.GMM.VAR_FLOOR": in_range(0.0, math.inf, low_open=True),
    "MODEL.GMM.SINKHORN_EPSILON": in_range(0.0, math.inf, low_open=True),
    "MODEL.GMM.COMPONENT_LOSS_WEIGHT": in_range(0.0, math.inf),
    "MODEL.GMM.LOGIT_NORM_INIT_SCALE": in_range(0.0, math.inf, low_open=True),
    "MODEL.GMM.ENQUEUE_CORRECT_ONLY": BOOLEAN,
    "MODEL.GMM.DIAGNOSTICS_PERIOD": DIAGNOSTICS_PERIOD,
    "MODEL.MIT.VARIANT": one_of(*MIT_VARIANTS),
    "MODEL.MIT.DROP_PATH_RATE": FRACTION,
    "MODEL.MIT.OUT_FEATURES": MIT_OUTPUTS,
    "MODEL.SEM_SEG_HEAD.DROPOUT": FRACTION,
    **UPERNET_KEY_RULES,
    "TEST.ANOMALY_SCORES": ANOMALY_SCORE_NAMES,
    "TEST.MAHALANOBIS_STATS": existing_file("fit_mahalanobis.py"),
    "TEST.POSTHOC_GMM": existing_file("fit_posthoc_gmm.py"),
    "TEST.ANOMALY_EVAL_MODE": one_of("auto", "exact", "histogram"),
    # anomaly evaluation conventions (gmmseg.evaluation.anomaly_aggregation, anomaly_components)
    "TEST.ANOMALY_AGGREGATION": one_of("pooled", "per_image"),
    "TEST.ANOMALY_COMPONENTS.ENABLED": BOOLEAN,
    "TEST.ANOMALY_COMPONENTS.MIN_PRED_SIZE": integer(-1, "-1: the dataset's default"),
    "TEST.ANOMALY_COMPONENTS.MIN_GT_SIZE": integer(-1, "-1: the dataset's default"),
    "TEST.ANOMALY_COMPONENTS.THRESHOLD": Rule(
        lambda v: v is None or (type(v) in (int, float) and math.isfinite(v)),
        "None (the best-F1 point of the pixel curve) or a finite number",
    ),
    # mixed precision (gmmseg.compat.AnyDeviceAMPTrainer)
    "SOLVER.AMP.ENABLED": BOOLEAN,
    "SOLVER.AMP.DTYPE": one_of("auto", "float16", "bfloat16"),
    "TEST.ANOMALY_MAX_EXACT_PIXELS": integer(1),
    "TEST.ANOMALY_NUM_BINS": integer(2),
    "TEST.SLIDING_WINDOW.SIZE": HEIGHT_WIDTH,
    "TEST.SLIDING_WINDOW.STRIDE": HEIGHT_WIDTH,
    **OCRNET_KEY_RULES,
}
# Keys that exist (Mask2Former installed) and matter only for the Mask2Former meta-architectures.
MASK_FORMER_KEY_RULES: dict[str, Rule] = {
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": SEMANTIC_ONLY,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": SEMANTIC_ONLY,
    "MODEL.MASK_FORMER.DEC_LAYERS": integer(1),
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": integer(1),
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": integer(1),
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": at_least(0),
}


def check_rules(cfg: CfgNode, rules: Mapping[str, Rule]) -> None:
    """The one loop over a table of per-key rules."""
    for key, rule in rules.items():
        value = lookup(cfg, key)
        check(rule.accepts(value), key, value, rule.expected)


def _ignore_value_is_not_a_class(cfg: CfgNode) -> None:
    head = cfg.MODEL.SEM_SEG_HEAD
    check(
        isinstance(head.IGNORE_VALUE, int)
        and (head.IGNORE_VALUE < 0 or head.IGNORE_VALUE >= head.NUM_CLASSES),
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
        head.IGNORE_VALUE,
        "a value that is not a class index",
    )


def _scores_have_their_statistics(cfg: CfgNode) -> None:
    """Every score named that reads fitted statistics (``AnomalyScore.statistics``) has its file set."""
    for name in cfg.TEST.ANOMALY_SCORES:
        if ANOMALY_SCORES[name].statistics is None:
            continue
        key, tool = ANOMALY_SCORES[name].statistics
        value = lookup(cfg, key)
        check(
            bool(value), key, value, f"a statistics file (tools/{tool}) when TEST.ANOMALY_SCORES has {name!r}"
        )


def _sliding_window_has_no_gaps(cfg: CfgNode) -> None:
    window = cfg.TEST.SLIDING_WINDOW
    check(
        all(st <= sz for st, sz in zip(window.STRIDE, window.SIZE)),
        "TEST.SLIDING_WINDOW.STRIDE",
        window.STRIDE,
        f"no larger than TEST.SLIDING_WINDOW.SIZE {list(window.SIZE)} (no gaps)",
    )


def _posthoc_gmm_replaces_a_softmax_head(cfg: CfgNode) -> None:
    check(
        not cfg.TEST.POSTHOC_GMM
        or (
            cfg.MODEL.META_ARCHITECTURE == "PosteriorSemanticSegmentor"
            and not cfg.MODEL.SEM_SEG_HEAD.NAME.startswith("GMM")
            and not cfg.MODEL.GMM.ENABLED
        ),
        "TEST.POSTHOC_GMM",
        cfg.TEST.POSTHOC_GMM,
        "empty for GMM heads and Mask2Former (it replaces a per-pixel softmax head's classifier)",
    )


def _gmm_enabled_converts_a_softmax_head(cfg: CfgNode) -> None:
    """``MODEL.GMM.ENABLED`` converts the head that ``PosteriorSemanticSegmentor`` builds; a registered
    GMM head (``GMMHead``) has no softmax classifier left to convert."""
    if not cfg.MODEL.GMM.ENABLED:
        return
    arch, name = cfg.MODEL.META_ARCHITECTURE, cfg.MODEL.SEM_SEG_HEAD.NAME
    check(
        arch == "PosteriorSemanticSegmentor",
        "MODEL.GMM.ENABLED",
        True,
        f"False for MODEL.META_ARCHITECTURE '{arch}' (it converts PosteriorSemanticSegmentor's head; "
        "Mask2Former's GMM model is GMMMaskFormer)",
    )
    head = SEM_SEG_HEADS_REGISTRY.get(name) if name in SEM_SEG_HEADS_REGISTRY else None
    check(
        not (isinstance(head, type) and issubclass(head, GMMHead)),
        "MODEL.GMM.ENABLED",
        True,
        f"False for MODEL.SEM_SEG_HEAD.NAME '{name}', a GMM head already (or name its softmax head)",
    )


def _mask_former(cfg: CfgNode) -> None:
    """Mask2Former is installed, its decoder and head match the meta-architecture, and no score it cannot
    give (per-pixel head scores; GMM scores of the softmax one) is asked of it."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch not in MASK_FORMER_ARCHITECTURES:
        return
    check(
        MASK2FORMER_IMPORT_ERROR is None,
        "MODEL.META_ARCHITECTURE",
        arch,
        "an installed Mask2Former (python tools/install.py installs maskformer2; "
        f"{MASK2FORMER_IMPORT_ERROR})",
    )
    decoder = MASK_FORMER_ARCHITECTURES[arch]
    check(
        cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME == decoder,
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
        cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME,
        f"'{decoder}' for MODEL.META_ARCHITECTURE '{arch}'",
    )
    check(
        cfg.MODEL.SEM_SEG_HEAD.NAME == "MaskFormerHead",
        "MODEL.SEM_SEG_HEAD.NAME",
        cfg.MODEL.SEM_SEG_HEAD.NAME,
        f"'MaskFormerHead' for MODEL.META_ARCHITECTURE '{arch}'",
    )
    check_rules(cfg, MASK_FORMER_KEY_RULES)
    refused = scores_needing_more_than(MASK_FORMER_MAPS[arch])
    names = [repr(n) for n in refused]
    check(
        not set(refused) & set(cfg.TEST.ANOMALY_SCORES) and not cfg.TEST.MAHALANOBIS_STATS,
        "TEST.ANOMALY_SCORES",
        cfg.TEST.ANOMALY_SCORES,
        f"no {', '.join(names[:-1])} or {names[-1]} (scores MODEL.META_ARCHITECTURE '{arch}' cannot give)",
    )


def _crop_size(cfg: CfgNode) -> None:
    if cfg.INPUT.CROP.ENABLED:
        size = list(cfg.INPUT.CROP.SIZE)
        check(len(size) == 2 and all(s > 0 for s in size), "INPUT.CROP.SIZE", size, "two positive numbers")


def _datasets_agree_with_metadata(cfg: CfgNode) -> None:
    """Every dataset is registered, and its class count and ignore label are the head's."""
    head = cfg.MODEL.SEM_SEG_HEAD
    registered = set(DatasetCatalog.list())
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            check(
                name in registered,
                key,
                names,
                f"registered datasets ('{name}' is not; gmmseg.engine.setup_cfg registers them)",
            )
            meta = MetadataCatalog.get(name)
            classes = meta.get("stuff_classes", None)
            if classes is not None:
                check(
                    len(classes) == head.NUM_CLASSES,
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                    head.NUM_CLASSES,
                    f"{len(classes)}, the number of classes of {key} dataset '{name}'",
                )
            ignore = meta.get("ignore_label", None)
            if ignore is not None:
                check(
                    ignore == head.IGNORE_VALUE,
                    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
                    head.IGNORE_VALUE,
                    f"{ignore}, the ignore_label of {key} dataset '{name}'",
                )


# After KEY_RULES, in this order.
CROSS_KEY_RULES: tuple[Callable[[CfgNode], None], ...] = (
    _ignore_value_is_not_a_class,
    _scores_have_their_statistics,
    _sliding_window_has_no_gaps,
    _posthoc_gmm_replaces_a_softmax_head,
    _gmm_enabled_converts_a_softmax_head,
    head_reads_backbone_outputs("D2MixTransformer", "MODEL.MIT.OUT_FEATURES", MIT_STRIDES, "SegFormerHead"),
    upernet_head_reads_backbone_outputs,
    _mask_former,
    _crop_size,
    _datasets_agree_with_metadata,
    *OCRNET_CROSS_KEY_RULES,
)


def validate_gmmseg_config(cfg: CfgNode) -> None:
    """Check the values GMMSeg-D2 relies on; raise ConfigValueError naming the first bad key.

    The datasets ``cfg`` names must be registered already (``gmmseg.engine.setup_cfg`` does it): their
    metadata give the class count and ignore label the head must have.
    """
    check_rules(cfg, KEY_RULES)
    for rule in CROSS_KEY_RULES:
        rule(cfg)
