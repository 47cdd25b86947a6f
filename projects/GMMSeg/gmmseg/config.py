"""GMMSeg-D2's config keys and their defaults, each documented where it is added.

Like Detectron2's ``projects/DeepLab/deeplab/config.py``, this only adds keys; which values are valid is
``gmmseg.config_validation``, and building a run's config (file, overrides, validation, datasets) is
``gmmseg.engine.setup_cfg``.
"""

from __future__ import annotations

from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["MASK2FORMER_IMPORT_ERROR", "add_gmmseg_config"]

try:  # Mask2Former (maskformer2) is installed by tools/install.py; without it its models are unavailable
    import mask2former  # noqa: F401
except ImportError as _err:
    MASK2FORMER_IMPORT_ERROR: ImportError | None = _err
else:
    MASK2FORMER_IMPORT_ERROR = None


def add_gmmseg_config(cfg: CN) -> None:
    """Add the keys GMMSeg-D2 uses (Detectron2's DeepLab keys included) to ``cfg`` in place."""
    if not hasattr(cfg.SOLVER, "POLY_LR_POWER"):
        add_deeplab_config(cfg)
    if MASK2FORMER_IMPORT_ERROR is None and not hasattr(cfg.MODEL, "MASK_FORMER"):
        from mask2former import add_maskformer2_config

        add_maskformer2_config(cfg)  # MODEL.MASK_FORMER, MODEL.SWIN, pixel-decoder keys
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
    # lr multiplier (on top of the head's) for the LayerNorm over a GMM predictor's class scores: its scale
    # is the posteriors' inverse temperature, which AdamW moves by about one learning rate per step
    cfg.SOLVER.LOGIT_NORM_MULTIPLIER = 1.0
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # Number of equal-width confidence bins of the expected calibration error (ECE).
    cfg.TEST.CALIBRATION_BINS = 15
    # Per-pixel anomaly scores to evaluate (all from the same forward pass): any of "gmm" (GMM heads),
    # "gmm_fullres" (per-pixel GMM heads: -max_c log p(x|c) scored per input pixel on the upsampled,
    # re-normalised embeddings, not upsampled from stride 4), "gmm_mahalanobis" (per-pixel GMM heads: the
    # distance to the nearest component in its own stds, "gmm" without the log-determinant terms: not the
    # paper's), "gmm_assigned" (GMMMaskFormer: the likelihood of the query that claims the pixel), "msp",
    # "entropy", "max_logit", "energy", "rba" (Mask2Former: Rejected by All, -sum_c tanh(s_c)),
    # "mahalanobis". Empty: "gmm" for GMM heads; the four logit-based
    # ones (+ "rba" for Mask2Former, + "mahalanobis" when MAHALANOBIS_STATS is set) for softmax heads. The
    # scores, what each needs and these defaults are declared once, in gmmseg/modeling/anomaly_scores.py.
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

    # SegFormer (gmmseg/modeling/backbone/mit.py, segformer_head.py). The Mix Transformer encoder, backbone
    # "D2MixTransformer": its size, "B0" ... "B5" (SegFormer's MiT-B0 ... B5); the stochastic-depth rate of
    # its last block (linear from 0 over all blocks; 0.1 in the official sizes); its outputs, among "res2"
    # ... "res5" (strides 4 ... 32; channels 32/64/160/256 for B0, 64/128/320/512 for B1-B5).
    cfg.MODEL.MIT = CN()
    cfg.MODEL.MIT.VARIANT = "B0"
    cfg.MODEL.MIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.MIT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Dropout (channel-wise) before the classifier of SegFormerHead, whose embedding dim is
    # MODEL.SEM_SEG_HEAD.CONVS_DIM (DeepLab's heads use ASPP_DROPOUT instead).
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1

    # UperNet (gmmseg/modeling/upernet_head.py, UPerNetHead; its convs have MODEL.SEM_SEG_HEAD.CONVS_DIM
    # channels, 512 in mmsegmentation's configs, and dropout MODEL.SEM_SEG_HEAD.DROPOUT before the
    # classifier). The pyramid pooling module's grid sizes on the coarsest input; the auxiliary FCN head of
    # mmsegmentation's UperNet configs, trained only: the backbone output it reads, its channels, and the
    # weight of its cross-entropy (0: no auxiliary head).
    cfg.MODEL.UPERNET = CN()
    cfg.MODEL.UPERNET.POOL_SCALES = [1, 2, 3, 6]
    cfg.MODEL.UPERNET.AUX_IN_FEATURE = "res4"
    cfg.MODEL.UPERNET.AUX_CHANNELS = 256
    cfg.MODEL.UPERNET.AUX_LOSS_WEIGHT = 0.4

    # GMMSeg: the generative classifier that replaces a head's softmax predictor (reference values).
    cfg.MODEL.GMM = CN()
    # GMMSeg on any per-pixel head (PosteriorSemanticSegmentor): build MODEL.SEM_SEG_HEAD.NAME as usual, then
    # replace its 1x1 softmax classifier by the GMM predictor: Detectron2's SemSegFPNHead, DeepLabV3PlusHead,
    # DeepLabV3Head, or your own head of the same contract (gmmseg.modeling.convert_head_to_gmm). False for
    # the GMM heads GMMDeepLabV3PlusHead and GMMSemSegFPNHead, which are that already.
    cfg.MODEL.GMM.ENABLED = False
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
    # How the queues start: "random" (the authors': every slot a random unit vector, seeded by SEED or 0; the
    # M-step reads all slots and updates every class present in the batches, so every class's stds start
    # broad and equal) | "empty" (real features only). "random" since its three-seed DigitScapes rows
    # (README, Results): same mIoU, an anomaly score 4x more stable across seeds. Ignored with
    # MEMORY_CAPACITY 0 (no memory).
    cfg.MODEL.GMM.MEMORY_INIT = "random"
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
    # Log the mixtures' per-class statistics (mean std, memory share, features offered / written per step,
    # turn of the means) and the class-score LayerNorm's scale every this many iterations, as gmm_diag/* in
    # metrics.json (tools/plot_gmm_diagnostics.py plots them). 0: off. A multiple of 20, the period at which
    # Detectron2 writes metrics.json (it keeps only each key's latest value).
    cfg.MODEL.GMM.DIAGNOSTICS_PERIOD = 0

    # HRNet (gmmseg/modeling/backbone/hrnet.py), backbone "D2HRNet": its size, "W18_SMALL", "W18_SMALL_V2",
    # "W18", "W30", "W32", "W40", "W44", "W48" or "W64" (HRNet-Image-Classification's); its norm, "BN",
    # "SyncBN" or "FrozenBN"; its outputs, the last stage's branches among "res2" ... "res5" (strides 4 ...
    # 32, channels W, 2W, 4W, 8W: 48/96/192/384 for W48).
    cfg.MODEL.HRNET = CN()
    cfg.MODEL.HRNET.VARIANT = "W48"
    cfg.MODEL.HRNET.NORM = "BN"
    cfg.MODEL.HRNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # OCRNet's head (gmmseg/modeling/ocr_head.py, "OCRHead"): the channels of its pixel and object-contextual
    # representations (512), of its attention keys and queries (256), and the weight of the cross-entropy of
    # its auxiliary soft-region classifier (0.4, mmsegmentation's ocrnet_hr* configs). Its norm is
    # MODEL.SEM_SEG_HEAD.NORM, its dropout before the classifier MODEL.SEM_SEG_HEAD.DROPOUT.
    cfg.MODEL.OCR = CN()
    cfg.MODEL.OCR.CHANNELS = 512
    cfg.MODEL.OCR.KEY_CHANNELS = 256
    cfg.MODEL.OCR.AUX_LOSS_WEIGHT = 0.4
    # Anomaly evaluation conventions (README "Anomaly segmentation evaluation"). AGGREGATION: "pooled" (all
    # non-void pixels of a split, SegmentMeIfYouCan's) or "per_image" (mean over images, pytorch-ood's).
    # COMPONENTS: SegmentMeIfYouCan's sIoU / PPV / mean F1; size filters in pixels, -1 = the dataset's
    # (metadata component_min_pred_size / component_min_gt_size, else the anomaly track's 500 / 100);
    # THRESHOLD None = the pooled pixel curve's best-F1 point (needs TEST.ANOMALY_EVAL_MODE "exact" or an
    # "auto" split that stays exact), or a fixed score threshold (prediction: score > threshold).
    cfg.TEST.ANOMALY_AGGREGATION = "pooled"
    cfg.TEST.ANOMALY_COMPONENTS = CN()
    cfg.TEST.ANOMALY_COMPONENTS.ENABLED = True
    cfg.TEST.ANOMALY_COMPONENTS.MIN_PRED_SIZE = -1
    cfg.TEST.ANOMALY_COMPONENTS.MIN_GT_SIZE = -1
    cfg.TEST.ANOMALY_COMPONENTS.THRESHOLD = None
    # Mixed precision (SOLVER.AMP.ENABLED, gmmseg.compat.AnyDeviceAMPTrainer): the autocast dtype. "auto":
    # float16 with a GradScaler on CUDA, bfloat16 on the CPU; "float16" | "bfloat16" force one. The GMM's
    # log-likelihoods, E-step, memory and M-step run in float32 whatever it is (gmmseg.gmm.precision).
    cfg.SOLVER.AMP.DTYPE = "auto"
