"""GMMSeg-D2's config keys, and the validation that makes a bad value fail at start with the key named."""

from __future__ import annotations

import os

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_gmmseg_config", "validate_gmmseg_config", "ConfigValueError", "MASK_FORMER_ARCHITECTURES"]

try:  # Mask2Former (maskformer2) is installed by tools/install.py; without it its models are unavailable
    import mask2former  # noqa: F401
except ImportError as _err:
    MASK2FORMER_IMPORT_ERROR: ImportError | None = _err
else:
    MASK2FORMER_IMPORT_ERROR = None

# meta-architectures built on Mask2Former, and the transformer decoder each needs
MASK_FORMER_ARCHITECTURES = {
    "PosteriorMaskFormer": "MultiScaleMaskedTransformerDecoder",
    "GMMMaskFormer": "GMMMultiScaleMaskedTransformerDecoder",
}
# DATALOADER.SAMPLER_TRAIN: shuffled epochs and the authors' class-balanced draws (GMMSegTrainer resumes
# both mid-stream), or Detectron2's own samplers
RESUMABLE_TRAIN_SAMPLERS = ("TrainingSampler", "ClassBalancedSampler")
TRAIN_SAMPLERS = (*RESUMABLE_TRAIN_SAMPLERS, "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")


class ConfigValueError(ValueError):
    """An invalid config value; the message starts with the full key."""

    def __init__(self, key: str, value, expected: str) -> None:
        super().__init__(f"{key} = {value!r} is invalid: expected {expected}")
        self.key = key


def add_gmmseg_config(cfg: CN) -> None:
    """Add the keys GMMSeg-D2 uses (Detectron2's DeepLab keys included) to ``cfg`` in place."""
    if not hasattr(cfg.SOLVER, "POLY_LR_POWER"):
        add_deeplab_config(cfg)
    if MASK2FORMER_IMPORT_ERROR is None and not hasattr(cfg.MODEL, "MASK_FORMER"):
        from mask2former import add_maskformer2_config

        add_maskformer2_config(cfg)  # MODEL.MASK_FORMER, MODEL.SWIN, pixel-decoder keys
    # How training images are read: "semantic" = gmmseg.data.SemanticDatasetMapper (all models).
    cfg.INPUT.DATASET_MAPPER_NAME = "semantic"
    # Mask2Former's photometric augmentation (brightness, contrast, saturation, hue), in training.
    cfg.INPUT.COLOR_AUG_SSD = False
    # Optimizer: "SGD" (DeepLab, FPN on the public datasets) | "ADAMW" (Mask2Former, the DigitScapes configs);
    # lr multiplier for the backbone; weight decay of embeddings (learned queries, Swin position tables).
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": clip the norm of all gradients together
    # (Mask2Former).
    cfg.SOLVER.OPTIMIZER = "SGD"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # lr multiplier for the semantic segmentation head (MODEL.SEM_SEG_HEAD); the GMMSeg authors use 10
    cfg.SOLVER.HEAD_MULTIPLIER = 1.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Number of equal-width confidence bins of the expected calibration error (ECE).
    cfg.TEST.CALIBRATION_BINS = 15
    # Per-pixel anomaly scores to evaluate (all from the same forward pass): any of "gmm" (GMM heads),
    # "gmm_fullres" (per-pixel GMM heads: -max_c log p(x|c) scored per input pixel on the upsampled,
    # re-normalised embeddings, not upsampled from stride 4), "msp", "entropy", "max_logit", "energy",
    # "mahalanobis". Empty: "gmm" for GMM heads; the four
    # logit-based ones (+ "mahalanobis" when MAHALANOBIS_STATS is set) for softmax heads.
    cfg.TEST.ANOMALY_SCORES = []
    # Class means and shared precision of penultimate features (tools/fit_mahalanobis.py), for "mahalanobis".
    cfg.TEST.MAHALANOBIS_STATS = ""
    # GMMs fitted to a softmax model's penultimate features after training (tools/fit_posthoc_gmm.py): they
    # replace its classifier and give the "gmm" score (the paper's post-hoc ablation).
    cfg.TEST.POSTHOC_GMM = ""
    # Anomaly metrics: "exact" (keeps every scored pixel), "histogram" (streaming, with an error bound),
    # or "auto" (exact up to ANOMALY_MAX_EXACT_PIXELS pixels per split, then histogram).
    cfg.TEST.ANOMALY_EVAL_MODE = "auto"
    cfg.TEST.ANOMALY_MAX_EXACT_PIXELS = 50_000_000
    cfg.TEST.ANOMALY_NUM_BINS = 65536
    # Sliding-window inference (the paper's Cityscapes evaluation: window 768, stride 512).
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.SIZE = (768, 768)
    cfg.TEST.SLIDING_WINDOW.STRIDE = (512, 512)

    # GMMSeg: the generative classifier that replaces a head's softmax predictor (reference values).
    cfg.MODEL.GMM = CN()
    cfg.MODEL.GMM.EMBED_DIM = 64  # D: pixel features are projected to D dims, LayerNorm-ed, L2-normalised
    # Activation after the per-pixel heads' 1x1 projection (+ norm): "relu" (reference) | "none". After a
    # ReLU, the LayerNorm maps every zeroed channel to the same value, which limits the embeddings'
    # directions; "none" lets them reach any point of the sphere (the random initial means included).
    cfg.MODEL.GMM.PROJECTION_ACTIVATION = "relu"
    cfg.MODEL.GMM.NUM_COMPONENTS = 5  # K: Gaussian components per class
    # Features per (class, component) FIFO queue. 0 = no memory ("batch only", the paper's memory
    # ablation): each M-step sees only the features enqueued since the previous one.
    cfg.MODEL.GMM.MEMORY_CAPACITY = 32000
    cfg.MODEL.GMM.MEMORY_PER_STEP = 20  # at most this many new features per queue per iteration
    cfg.MODEL.GMM.MEMORY_SAMPLING = "uniform"  # which candidates: "uniform" (evenly spaced) | "random"
    cfg.MODEL.GMM.MEMORY_DTYPE = "float32"  # storage of the memory: "float32" | "float16"
    # How the queues start: "empty" (real features only) | "random" (the reference: every slot a random unit
    # vector, seeded by SEED or 0; the M-step reads all slots and updates every class present in the batches).
    cfg.MODEL.GMM.MEMORY_INIT = "empty"
    cfg.MODEL.GMM.UPDATE_INTERVAL = 5  # run the M-step every this many iterations
    cfg.MODEL.GMM.MEAN_MOMENTUM = 0.999  # mean <- m * mean + (1 - m) * new mean
    cfg.MODEL.GMM.COV_MOMENTUM = 0.0  # std <- m * std + (1 - m) * new std (0: replace)
    cfg.MODEL.GMM.VAR_FLOOR = 0.01  # added to every variance
    cfg.MODEL.GMM.SINKHORN_EPSILON = 0.05
    cfg.MODEL.GMM.SINKHORN_ITERS = 3
    cfg.MODEL.GMM.E_STEP = "sinkhorn"  # "sinkhorn" (equipartition, GMMSeg) | "vanilla" (plain EM)
    cfg.MODEL.GMM.CLASS_SCORE = "wta"  # "wta": max over components | "mixture": logsumexp - log K
    cfg.MODEL.GMM.LOGIT_NORM = "layernorm"  # over the C class scores before softmax: "layernorm" | "none"
    # Initial scale (LayerNorm weight) of the normalised class scores: an inverse temperature that the
    # network otherwise has to learn; 1.0 as the reference. Short schedules profit from a larger start.
    cfg.MODEL.GMM.LOGIT_NORM_INIT_SCALE = 1.0
    cfg.MODEL.GMM.COMPONENT_LOSS_WEIGHT = 0.01  # cross-entropy over the C*K components (Sinkhorn targets)
    # Only pixels the model classifies correctly enter the memory (reference); False: all labelled pixels.
    cfg.MODEL.GMM.ENQUEUE_CORRECT_ONLY = True
    # How the mixtures are fitted: "em" (GMMSeg: Sinkhorn EM on the memory, no gradient) | "backprop"
    # (the paper's "discriminative GMMSeg" ablation: means and stds learned by back-propagation, no memory).
    cfg.MODEL.GMM.FIT = "em"


def _check(cond: bool, key: str, value, expected: str) -> None:
    if not cond:
        raise ConfigValueError(key, value, expected)


def validate_gmmseg_config(cfg: CN) -> None:
    """Check the values GMMSeg-D2 relies on; raise ConfigValueError naming the first bad key.

    Dataset-dependent checks (class count, ignore label) need the datasets registered, so this also
    registers every dataset the config names (raising, with the path, if a folder is missing or broken).
    """
    _check(
        cfg.INPUT.DATASET_MAPPER_NAME in ("semantic",),
        "INPUT.DATASET_MAPPER_NAME",
        cfg.INPUT.DATASET_MAPPER_NAME,
        "'semantic'",
    )
    _check(
        isinstance(cfg.TEST.CALIBRATION_BINS, int) and cfg.TEST.CALIBRATION_BINS >= 1,
        "TEST.CALIBRATION_BINS",
        cfg.TEST.CALIBRATION_BINS,
        "an integer >= 1",
    )
    head = cfg.MODEL.SEM_SEG_HEAD
    _check(
        isinstance(head.NUM_CLASSES, int) and head.NUM_CLASSES >= 1,
        "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
        head.NUM_CLASSES,
        "an integer >= 1",
    )
    _check(
        isinstance(head.IGNORE_VALUE, int)
        and (head.IGNORE_VALUE < 0 or head.IGNORE_VALUE >= head.NUM_CLASSES),
        "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
        head.IGNORE_VALUE,
        "a value that is not a class index",
    )
    _check(
        cfg.INPUT.RANDOM_FLIP in ("none", "horizontal", "vertical"),
        "INPUT.RANDOM_FLIP",
        cfg.INPUT.RANDOM_FLIP,
        "'none', 'horizontal' or 'vertical'",
    )
    _check(cfg.SOLVER.IMS_PER_BATCH >= 1, "SOLVER.IMS_PER_BATCH", cfg.SOLVER.IMS_PER_BATCH, "an integer >= 1")
    _check(cfg.SOLVER.MAX_ITER >= 1, "SOLVER.MAX_ITER", cfg.SOLVER.MAX_ITER, "an integer >= 1")
    _check(cfg.SOLVER.BASE_LR > 0, "SOLVER.BASE_LR", cfg.SOLVER.BASE_LR, "a positive number")
    _check(
        cfg.MODEL.DEVICE == "cpu" or cfg.MODEL.DEVICE.startswith("cuda"),
        "MODEL.DEVICE",
        cfg.MODEL.DEVICE,
        "'cpu' or 'cuda[:N]'",
    )
    _check(
        cfg.SOLVER.OPTIMIZER in ("SGD", "ADAMW"), "SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, "'SGD' or 'ADAMW'"
    )
    for multiplier in ("BACKBONE_MULTIPLIER", "HEAD_MULTIPLIER"):
        value = getattr(cfg.SOLVER, multiplier)
        _check(value >= 0, f"SOLVER.{multiplier}", value, "a number >= 0")
    _check(
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE in ("value", "norm", "full_model"),
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
        cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
        "'value', 'norm' or 'full_model'",
    )
    _check(
        cfg.DATALOADER.SAMPLER_TRAIN in TRAIN_SAMPLERS,
        "DATALOADER.SAMPLER_TRAIN",
        cfg.DATALOADER.SAMPLER_TRAIN,
        " or ".join(repr(s) for s in TRAIN_SAMPLERS),
    )
    _validate_gmm(cfg.MODEL.GMM)
    _validate_test(cfg.TEST)
    _check(
        not cfg.TEST.POSTHOC_GMM
        or (
            cfg.MODEL.META_ARCHITECTURE == "PosteriorSemanticSegmentor"
            and not cfg.MODEL.SEM_SEG_HEAD.NAME.startswith("GMM")
        ),
        "TEST.POSTHOC_GMM",
        cfg.TEST.POSTHOC_GMM,
        "empty for GMM heads and Mask2Former (it replaces a per-pixel softmax head's classifier)",
    )
    if cfg.MODEL.META_ARCHITECTURE in MASK_FORMER_ARCHITECTURES:
        _validate_mask_former(cfg)
    if cfg.INPUT.CROP.ENABLED:
        size = list(cfg.INPUT.CROP.SIZE)
        _check(len(size) == 2 and all(s > 0 for s in size), "INPUT.CROP.SIZE", size, "two positive numbers")

    _validate_datasets(cfg)


def _validate_gmm(gmm: CN) -> None:
    def positive_int(name: str) -> None:
        value = getattr(gmm, name)
        _check(isinstance(value, int) and value >= 1, f"MODEL.GMM.{name}", value, "an integer >= 1")

    def choice(name: str, options: tuple[str, ...]) -> None:
        value = getattr(gmm, name)
        _check(value in options, f"MODEL.GMM.{name}", value, " or ".join(repr(o) for o in options))

    def in_range(name: str, low: float, high: float, low_open: bool = False) -> None:
        value = getattr(gmm, name)
        ok = isinstance(value, (int, float)) and (low < value if low_open else low <= value) and value <= high
        bracket = "(" if low_open else "["
        _check(ok, f"MODEL.GMM.{name}", value, f"a number in {bracket}{low}, {high}]")

    _check(
        isinstance(gmm.MEMORY_CAPACITY, int) and gmm.MEMORY_CAPACITY >= 0,
        "MODEL.GMM.MEMORY_CAPACITY",
        gmm.MEMORY_CAPACITY,
        "an integer >= 0 (0: no memory, the current batches only)",
    )
    for name in (
        "EMBED_DIM",
        "NUM_COMPONENTS",
        "MEMORY_PER_STEP",
        "UPDATE_INTERVAL",
        "SINKHORN_ITERS",
    ):
        positive_int(name)
    choice("MEMORY_SAMPLING", ("uniform", "random"))
    choice("MEMORY_DTYPE", ("float32", "float16"))
    choice("MEMORY_INIT", ("empty", "random"))
    _check(
        gmm.MEMORY_INIT == "empty" or gmm.MEMORY_CAPACITY > 0,
        "MODEL.GMM.MEMORY_INIT",
        gmm.MEMORY_INIT,
        "'empty' with MODEL.GMM.MEMORY_CAPACITY 0 (no memory: nothing to start full of random vectors)",
    )
    choice("E_STEP", ("sinkhorn", "vanilla"))
    choice("CLASS_SCORE", ("wta", "mixture"))
    choice("LOGIT_NORM", ("layernorm", "none"))
    choice("PROJECTION_ACTIVATION", ("relu", "none"))
    choice("FIT", ("em", "backprop"))
    in_range("MEAN_MOMENTUM", 0.0, 1.0)
    in_range("COV_MOMENTUM", 0.0, 1.0)
    in_range("VAR_FLOOR", 0.0, float("inf"), low_open=True)
    in_range("SINKHORN_EPSILON", 0.0, float("inf"), low_open=True)
    in_range("COMPONENT_LOSS_WEIGHT", 0.0, float("inf"))
    in_range("LOGIT_NORM_INIT_SCALE", 0.0, float("inf"), low_open=True)
    _check(
        isinstance(gmm.ENQUEUE_CORRECT_ONLY, bool),
        "MODEL.GMM.ENQUEUE_CORRECT_ONLY",
        gmm.ENQUEUE_CORRECT_ONLY,
        "True or False",
    )


def _validate_mask_former(cfg: CN) -> None:
    arch = cfg.MODEL.META_ARCHITECTURE
    _check(
        MASK2FORMER_IMPORT_ERROR is None,
        "MODEL.META_ARCHITECTURE",
        arch,
        "an installed Mask2Former (python tools/install.py installs maskformer2; "
        f"{MASK2FORMER_IMPORT_ERROR})",
    )
    mf = cfg.MODEL.MASK_FORMER
    decoder = MASK_FORMER_ARCHITECTURES[arch]
    _check(
        mf.TRANSFORMER_DECODER_NAME == decoder,
        "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME",
        mf.TRANSFORMER_DECODER_NAME,
        f"'{decoder}' for MODEL.META_ARCHITECTURE '{arch}'",
    )
    _check(
        cfg.MODEL.SEM_SEG_HEAD.NAME == "MaskFormerHead",
        "MODEL.SEM_SEG_HEAD.NAME",
        cfg.MODEL.SEM_SEG_HEAD.NAME,
        f"'MaskFormerHead' for MODEL.META_ARCHITECTURE '{arch}'",
    )
    for key in ("PANOPTIC_ON", "INSTANCE_ON"):
        _check(
            not getattr(mf.TEST, key),
            f"MODEL.MASK_FORMER.TEST.{key}",
            getattr(mf.TEST, key),
            "False (GMMSeg-D2 runs semantic inference only)",
        )
    for key in ("DEC_LAYERS", "NUM_OBJECT_QUERIES", "TRAIN_NUM_POINTS"):
        value = getattr(mf, key)
        _check(isinstance(value, int) and value >= 1, f"MODEL.MASK_FORMER.{key}", value, "an integer >= 1")
    _check(
        mf.NO_OBJECT_WEIGHT >= 0, "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT", mf.NO_OBJECT_WEIGHT, "a number >= 0"
    )
    _check(
        not {"mahalanobis", "gmm_fullres"} & set(cfg.TEST.ANOMALY_SCORES) and not cfg.TEST.MAHALANOBIS_STATS,
        "TEST.ANOMALY_SCORES",
        list(cfg.TEST.ANOMALY_SCORES),
        "no 'mahalanobis' or 'gmm_fullres' (per-pixel head scores) for mask-classification models",
    )


def _validate_test(test: CN) -> None:
    from gmmseg.modeling.anomaly_scores import SCORE_NAMES

    scores = list(test.ANOMALY_SCORES)
    _check(
        all(s in SCORE_NAMES for s in scores) and len(set(scores)) == len(scores),
        "TEST.ANOMALY_SCORES",
        scores,
        f"distinct names among {list(SCORE_NAMES)}",
    )
    _check(
        "mahalanobis" not in scores or bool(test.MAHALANOBIS_STATS),
        "TEST.MAHALANOBIS_STATS",
        test.MAHALANOBIS_STATS,
        "a statistics file (tools/fit_mahalanobis.py) when TEST.ANOMALY_SCORES has 'mahalanobis'",
    )
    for key, tool in (("MAHALANOBIS_STATS", "fit_mahalanobis.py"), ("POSTHOC_GMM", "fit_posthoc_gmm.py")):
        path = getattr(test, key)
        _check(
            not path or os.path.isfile(path),
            f"TEST.{key}",
            path,
            f"an existing file (tools/{tool} writes it)",
        )
    _check(
        test.ANOMALY_EVAL_MODE in ("auto", "exact", "histogram"),
        "TEST.ANOMALY_EVAL_MODE",
        test.ANOMALY_EVAL_MODE,
        "'auto', 'exact' or 'histogram'",
    )
    _check(
        isinstance(test.ANOMALY_MAX_EXACT_PIXELS, int) and test.ANOMALY_MAX_EXACT_PIXELS >= 1,
        "TEST.ANOMALY_MAX_EXACT_PIXELS",
        test.ANOMALY_MAX_EXACT_PIXELS,
        "an integer >= 1",
    )
    _check(
        isinstance(test.ANOMALY_NUM_BINS, int) and test.ANOMALY_NUM_BINS >= 2,
        "TEST.ANOMALY_NUM_BINS",
        test.ANOMALY_NUM_BINS,
        "an integer >= 2",
    )
    window = test.SLIDING_WINDOW
    for key in ("SIZE", "STRIDE"):
        value = list(getattr(window, key))
        _check(
            len(value) == 2 and all(isinstance(v, int) and v > 0 for v in value),
            f"TEST.SLIDING_WINDOW.{key}",
            value,
            "two positive integers (height, width)",
        )
    _check(
        all(st <= sz for st, sz in zip(window.STRIDE, window.SIZE)),
        "TEST.SLIDING_WINDOW.STRIDE",
        list(window.STRIDE),
        f"no larger than TEST.SLIDING_WINDOW.SIZE {list(window.SIZE)} (no gaps)",
    )


def _validate_datasets(cfg: CN) -> None:
    from detectron2.data import MetadataCatalog

    from gmmseg.data.folder_dataset import ensure_registered

    head = cfg.MODEL.SEM_SEG_HEAD
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST)):
        for name in names:
            ensure_registered(name)
            meta = MetadataCatalog.get(name)
            classes = meta.get("stuff_classes", None)
            if classes is not None:
                _check(
                    len(classes) == head.NUM_CLASSES,
                    "MODEL.SEM_SEG_HEAD.NUM_CLASSES",
                    head.NUM_CLASSES,
                    f"{len(classes)}, the number of classes of {key} dataset '{name}'",
                )
            ignore = meta.get("ignore_label", None)
            if ignore is not None:
                _check(
                    ignore == head.IGNORE_VALUE,
                    "MODEL.SEM_SEG_HEAD.IGNORE_VALUE",
                    head.IGNORE_VALUE,
                    f"{ignore}, the ignore_label of {key} dataset '{name}'",
                )
